"""bitsandbytes NF4 / LLM.int8() on the demo model: perplexity in memory and through bitsandbytes' own loader.

    python benchmarks/bnb.py [--eval-tokens 16384] [--loader-tokens 2048] [--seq-len 512] [--methods nf4,nf4-dq,int8]
        [--threads 2]

Every row starts from the same dense weights, is quantized by the nf4/int8 stages (data-free; the calibration
batch only feeds the report's per-module errors) and scored on the same demo:wiki windows of 512 tokens, as
benchmarks/quant.py scores RTN/GPTQ (compare with its w4g64 / w8pc rows). Each setting is scored twice: the
in-memory model (what ``compressor compress --eval`` reports) and the ``format: bitsandbytes`` directory loaded
by plain ``AutoModelForCausalLM.from_pretrained(DIR, device_map="cpu")``. For nf4 the two are the same model on
bitsandbytes' dequantizing CPU path; on a CPU with AVX512-BF16 its default forward is a fused bfloat16 kernel that
moves the loader's number slightly (``--loader-path dequantize`` turns it off; the result records which path ran).
For int8 the loader also rounds activations to int8 per token (columns above the threshold unrounded), so its row
is the number a bitsandbytes user sees.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from compressor.calibration.tokens import calibration_batch
from compressor.engine import ModelContext, run_stages
from compressor.export.bnb import write_bitsandbytes
from compressor.methods.quant.bnb import INT8, NF4, INT8Config, NF4Config
from compressor.models import get_adapter
from compressor.models.loading import LoadedModel
from compressor.pipeline import evaluate, load
from compressor.report import average_bits, peak_rss_bytes

STAGES = {
    "nf4": lambda: NF4(NF4Config(method="nf4")),
    "nf4-dq": lambda: NF4(NF4Config(method="nf4", double_quant=True)),
    "int8": lambda: INT8(INT8Config(method="int8")),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="demo:smollm2")
    parser.add_argument("--eval-tokens", type=int, default=16384)
    parser.add_argument("--seq-len", type=int, default=512, help="Evaluation windows and calibration sequences.")
    parser.add_argument("--loader-tokens", type=int, default=None,
                        help="Evaluation tokens for the bitsandbytes loader's model (default: --eval-tokens). Its CPU "
                        "kernels are slow: about 10x our in-memory model's time per token here.")
    parser.add_argument("--loader-path", choices=["default", "dequantize"], default="default",
                        help="nf4 loader's CPU forward: bitsandbytes' default (fused bfloat16 on AVX512-BF16 CPUs), "
                        "or its dequantize-then-matmul path, which gives the in-memory model's numbers exactly.")
    parser.add_argument("--methods", default=",".join(STAGES))
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice).")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    loaded = load(args.model)
    dense = {k: v.clone() for k, v in loaded.model.state_dict().items()}
    tokens = calibration_batch(loaded.tokenizer, "demo:lee", 16, args.seq_len, seed=0)

    def ppl(target: LoadedModel, tokens: int | None = None) -> float:
        result = evaluate(target, "demo:wiki", seq_len=args.seq_len, max_tokens=tokens or args.eval_tokens,
                          device="cpu")
        return round(result.ppl, 4)

    rows = [{"method": "dense", "ppl": ppl(loaded), "ppl_bitsandbytes_loader": None, "seconds": 0.0}]
    print(json.dumps(rows[0]), flush=True)
    for name in args.methods.split(","):
        loaded.model.load_state_dict(dense)
        stage = STAGES[name]()
        run = ModelContext(loaded.model, get_adapter(loaded.model), tokens, torch.device("cpu"), 8)
        start = time.perf_counter()
        records = run_stages(run, [stage])
        seconds = round(time.perf_counter() - start, 1)
        bits, bits_meta = average_bits({}, records)
        row = {"method": name, "ppl": ppl(loaded), "seconds": seconds, "bits_incl_metadata": bits_meta}
        with tempfile.TemporaryDirectory() as tmp:
            write_bitsandbytes(run, [stage], Path(tmp), max_shard_bytes=2**31)
            from transformers import AutoModelForCausalLM

            reloaded = AutoModelForCausalLM.from_pretrained(tmp, device_map="cpu").eval()
            row["nf4_cpu_path"] = _nf4_path(reloaded, args.loader_path)
            row["ppl_bitsandbytes_loader"] = ppl(LoadedModel(reloaded, loaded.tokenizer, tmp, Path(tmp)),
                                                 args.loader_tokens)
            if args.loader_tokens:  # the in-memory model on the loader's tokens, to compare like with like
                row["ppl_on_loader_tokens"] = ppl(loaded, args.loader_tokens)
        rows.append(row)
        print(json.dumps(row), flush=True)
    result = {"model": args.model, "eval": f"demo:wiki {args.eval_tokens} tokens, windows of {args.seq_len}",
              "threads": torch.get_num_threads(), "peak_rss_mb": round(peak_rss_bytes() / 2**20), "rows": rows}
    print(json.dumps(result, indent=2))
    print("\n| method | ppl in memory | ppl via bitsandbytes loader (in memory, same tokens) | bits/weight incl. "
          "scales | seconds |")
    print("|---|---|---|---|---|")
    for row in rows:
        same = f" ({row['ppl_on_loader_tokens']})" if "ppl_on_loader_tokens" in row else ""
        print(f"| {row['method']} | {row['ppl']} | {row['ppl_bitsandbytes_loader'] or '-'}{same} | "
              f"{row.get('bits_incl_metadata') or 32} | {row['seconds']} |")


def _nf4_path(model: torch.nn.Module, choice: str) -> str | None:
    """Which CPU forward bitsandbytes runs for the model's Linear4bit modules (after ``choice`` is applied): the
    fused bfloat16 kernel or dequantize-then-matmul in the compute dtype (None: no Linear4bit)."""
    import bitsandbytes as bnb

    linears = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    for module in linears:
        if choice == "dequantize":
            module.support_avx512bf16_for_cpu = False
    if not linears:
        return None
    return "fused bfloat16" if linears[0].support_avx512bf16_for_cpu else "dequantize + compute dtype"


if __name__ == "__main__":
    main()
