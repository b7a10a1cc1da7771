"""Layer streaming on a generated Llama-shaped checkpoint: wall time and peak RSS against the checkpoint's size.

    python benchmarks/streaming.py [--hidden 2048] [--layers 16] [--intermediate 5632] [--dtype float32]
        [--samples 4] [--seq-len 512] [--memory-budget 1GB] [--threads 2] [--compare] [--workdir DIR] [--keep]

Writes a random-init checkpoint (N(0, 0.02) weights, unit norms; shards of ``--shard-mb``) tensor by tensor, so
this process never holds more than one tensor of it, with a byte-level BPE tokenizer trained on generated text
and a calibration file of the same text. Then runs ``python -m compressor compress CKPT --recipe w4a16-gptq``
(GPTQ W4, groups of 128, act-order; compressed-tensors) in a fresh process with ``--memory-budget`` below the
checkpoint's size, so its layers stream, and reads the peak RSS from that process's report
(``compressor.report.peak_rss_bytes``: ``ru_maxrss``, which counts file pages it touched as well); the peaks of
its anonymous and file-backed parts are sampled from ``/proc`` meanwhile (``sampled_peaks_bytes``). The defaults
(hidden 2048, 16 layers, MLP 5632, 32/4 heads, vocab 32000, float32) make 0.84B parameters, 3.3 GB on disk; 44M
parameters, 176 MB per layer in float32 (``--dtype bfloat16 --layers 30``: 2.9 GB). ``--compare`` runs the same
command whole in RAM (``--memory-budget none``) and compares the output files byte for byte: only for sizes
that fit. Prints one JSON object (and writes it to ``--json-out`` when given).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from compressor.export.streamed import TensorSpec, write_shards_streamed

WORDS = ("the model reads text and predicts the next token while a layer of weights turns numbers into other numbers "
         "news from the council said the budget would rise as rain fell on the river near the old bridge").split()


def _text(words: int, seed: int) -> str:
    rng = random.Random(seed)
    return " ".join(rng.choice(WORDS) for _ in range(words))


def write_checkpoint(directory: Path, args: argparse.Namespace) -> int:
    """Config, tokenizer and random shards of a Llama of the given shape; returns the weight bytes."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import AutoModelForCausalLM, LlamaConfig, PreTrainedTokenizerFast

    dtype = getattr(torch, args.dtype)
    config = LlamaConfig(hidden_size=args.hidden, intermediate_size=args.intermediate, num_hidden_layers=args.layers,
                         num_attention_heads=args.heads, num_key_value_heads=args.kv_heads, vocab_size=args.vocab,
                         max_position_embeddings=4096, tie_word_embeddings=False, dtype=args.dtype)
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config, dtype=dtype)
    specs = [TensorSpec(name, t.dtype, tuple(t.shape)) for name, t in skeleton.state_dict().items()]
    generator = torch.Generator().manual_seed(0)

    def make(name: str) -> torch.Tensor:
        spec = next(s for s in specs if s.name == name)
        if "norm" in name:
            return torch.ones(spec.shape, dtype=dtype)
        return (torch.randn(spec.shape, generator=generator) * 0.02).to(dtype)

    directory.mkdir(parents=True, exist_ok=True)
    write_shards_streamed(specs, make, directory, args.shard_mb * 2**20)
    config.save_pretrained(directory)
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=min(1000, args.vocab), special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator([_text(2000, seed) for seed in range(5)], trainer)
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<|endoftext|>", bos_token="<|endoftext|>",
                            unk_token="<|endoftext|>").save_pretrained(directory)
    return sum(spec.nbytes for spec in specs)


def run_compress(checkpoint: Path, calib: Path, out: Path, budget: str, args: argparse.Namespace) -> dict[str, Any]:
    """One ``compressor compress`` in a fresh process; its wall time and report."""
    command = [sys.executable, "-m", "compressor", "compress", str(checkpoint), "--recipe", "w4a16-gptq",
               "--calib", str(calib), "--calib-samples", str(args.samples), "--seq-len", str(args.seq_len),
               "--out", str(out), "--memory-budget", budget, "--no-checkpoint", "--json", "--device", "cpu"]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    start = time.perf_counter()
    with tempfile.TemporaryFile("w+") as stdout_file, tempfile.TemporaryFile("w+") as stderr_file:
        process = subprocess.Popen(command, stdout=stdout_file, stderr=stderr_file, text=True, env=env)
        peaks = _sample_rss(process)
        stdout_file.seek(0)
        stderr_file.seek(0)
        stdout, stderr = stdout_file.read(), stderr_file.read()
    wall = time.perf_counter() - start
    if process.returncode != 0:
        raise SystemExit(f"compress failed ({process.returncode}): {stderr.strip().splitlines()[-1:]}")
    report = json.loads(stdout)
    return {"command": " ".join(command), "wall_seconds": round(wall, 1), "timings": report["timings"],
            "peak_rss_bytes": report["peak_rss_bytes"], "sampled_peaks_bytes": peaks,
            "size_after_bytes": report["size_bytes"]["after"],
            "streaming_note": next((w["message"] for w in report["warnings"] if "streamed" in w["message"]), None)}


def _sample_rss(process: subprocess.Popen[str], every: float = 0.02) -> dict[str, int]:
    """Until ``process`` exits: the largest ``RssAnon`` (heap, tensors), ``RssFile`` (mapped files: libraries and
    the safetensors a tensor was read from) and ``VmRSS`` in its ``/proc/PID/status``, sampled every 20 ms
    (``ru_maxrss`` gives the exact peak of their sum; these say which part it was). Empty off Linux."""
    peaks: dict[str, int] = {}
    status = Path(f"/proc/{process.pid}/status")
    while process.poll() is None:
        try:
            text = status.read_text()
        except OSError:
            break
        for line in text.splitlines():
            key, _, value = line.partition(":")
            if key in ("RssAnon", "RssFile", "VmRSS"):
                peaks[key] = max(peaks.get(key, 0), int(value.split()[0]) * 1024)
        time.sleep(every)
    process.wait()
    return peaks


def _same_outputs(a: Path, b: Path) -> bool:
    skip = {"compression_report.json", "compression_report.md", "layers.png"}
    names = sorted(p.name for p in a.iterdir())
    return names == sorted(p.name for p in b.iterdir()) and all(
        (a / n).read_bytes() == (b / n).read_bytes() for n in names if n not in skip)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--intermediate", type=int, default=5632)
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--dtype", default="float32", choices=("bfloat16", "float16", "float32"))
    parser.add_argument("--shard-mb", type=int, default=500, help="Shard size of the generated checkpoint (MiB).")
    parser.add_argument("--samples", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--memory-budget", default="1GB",
                        help="Passed to compress; it must be below the checkpoint's size (a smaller --layers needs "
                        "a smaller budget, e.g. 100MB for 2 layers), or the benchmark stops.")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--compare", action="store_true", help="Also run whole in RAM and compare the outputs.")
    parser.add_argument("--workdir", type=Path, default=None, help="Where the checkpoint and outputs go (temp dir).")
    parser.add_argument("--keep", action="store_true", help="Keep the working directory.")
    parser.add_argument("--json-out", type=Path, default=None)
    args = parser.parse_args()
    root = args.workdir or Path(tempfile.mkdtemp(prefix="streaming-bench-"))
    checkpoint, calib = root / "checkpoint", root / "calib.txt"
    start = time.perf_counter()
    weight_bytes = write_checkpoint(checkpoint, args)
    calib.write_text("\n\n".join(_text(600, 100 + seed) for seed in range(max(8, args.samples * 2))))
    result: dict[str, Any] = {
        "shape": {k: getattr(args, k) for k in ("hidden", "layers", "intermediate", "heads", "kv_heads", "vocab",
                                                 "dtype")},
        "checkpoint_bytes": weight_bytes, "generate_seconds": round(time.perf_counter() - start, 1),
        "calibration": {"samples": args.samples, "seq_len": args.seq_len}, "threads": args.threads,
        "load_average_before": os.getloadavg(),
    }
    streamed = run_compress(checkpoint, calib, root / "streamed", args.memory_budget, args)
    if streamed["streaming_note"] is None:  # the budget was above the checkpoint: an in-RAM run, not the measurement
        raise SystemExit(f"the run did not stream: --memory-budget {args.memory_budget} is not below the checkpoint's "
                         f"{weight_bytes / 1e9:.2f} GB of weights; give a smaller one (e.g. 100MB)")
    streamed["peak_rss_over_checkpoint"] = round(streamed["peak_rss_bytes"] / weight_bytes, 3)
    result["streamed"] = streamed
    if args.compare:
        result["in_ram"] = run_compress(checkpoint, calib, root / "in_ram", "none", args)
        result["identical_outputs"] = _same_outputs(root / "streamed", root / "in_ram")
    result["load_average_after"] = os.getloadavg()
    if not args.keep:
        import shutil

        shutil.rmtree(root, ignore_errors=True)
    text = json.dumps(result, indent=2)
    print(text)
    if args.json_out:
        args.json_out.write_text(text + "\n")


if __name__ == "__main__":
    main()
