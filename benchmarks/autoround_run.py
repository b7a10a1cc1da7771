"""Intel auto-round on the demo model, on the tokens benchmarks/llmcompressor_data.py dumped.

Runs inside a virtualenv with auto-round installed (benchmarks/autoround.sh makes it); it does not import
compressor. ``--iters 0`` is auto-round's "optimized RTN" (full-range symmetric grid, per-group scale search
weighted by the inputs' mean squared activation); ``--iters N`` is SignRound with N signed-gradient steps per
decoder block (50 is its "light" setting, 200 its default).

Calibration is exactly our ``[samples, seq_len]`` token tensor: each row goes to auto-round as one
``{"input_ids", "attention_mask"}`` sample (mask all ones), so it never tokenizes or downloads a dataset. Its
own calibration loop then masks the last position of every sample (its workaround for models that treat an
all-ones mask as none), as it does for any dataset. Quantization keeps the model in memory and writes the
quantize-dequantized weights into each ``nn.Linear`` (fake quantization, no packing, no format), so the
perplexity below scores the actual quantized weights. Before evaluating, the script counts the Linear layers whose
every group holds at most 2^bits distinct values (``quantized_linears``, 210/210 on the demo model) and stops if
none does. lm_head is tied to the embeddings and stays dense, as ours.

Group 128 on the 576-wide inputs (q/k/v/gate/up): auto-round zero-pads each row to 640 and quantizes groups of
128, so the last group holds 64 real weights (its scale comes from those 64; the zeros quantize to 0 and are
dropped). The 1536-wide down_proj has twelve full groups.

Perplexity uses the same formula as compressor/evaluate/perplexity.py and llmcompressor_run.py: exp of the summed
next-token NLL over every predicted token of every window. Seconds time ``quantize()`` only (calibration
forward passes included, model loading and evaluation excluded). Prints one JSON object and a table row.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import time
from importlib.metadata import version
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # no network: our tokens, a local model directory
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from auto_round import AutoRound  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402


@torch.no_grad()
def perplexity(model: torch.nn.Module, windows: torch.Tensor) -> float:
    nll, count = 0.0, 0
    for window in windows:
        logits = model(window.unsqueeze(0)).logits
        nll += float(F.cross_entropy(logits[0, :-1].float(), window[1:], reduction="sum"))
        count += window.numel() - 1
    return math.exp(nll / count)


def calibration_samples(calibration: torch.Tensor) -> list[dict[str, torch.Tensor]]:
    """One pre-tokenized sample per row of ``calibration`` ([samples, seq_len] int64), batch dimension 1."""
    return [{"input_ids": row.unsqueeze(0).clone(), "attention_mask": torch.ones(1, row.numel(), dtype=torch.long)}
            for row in calibration]


def _max_levels(weight: torch.Tensor, group: int) -> int:
    """Most distinct values in any group of ``group`` consecutive input columns (the last group may be short)."""
    most = 0
    for chunk in torch.split(weight.detach(), group, dim=1):
        ordered = chunk.reshape(-1, chunk.shape[1]).sort(dim=1).values
        distinct = (ordered[:, 1:] != ordered[:, :-1]).sum(dim=1) + 1
        most = max(most, int(distinct.max()))
    return most


def quantized_linears(model: torch.nn.Module, bits: int, group: int) -> tuple[int, int]:
    """(Linear layers on a 2^bits grid in every group, Linear layers other than lm_head); fails if none is.

    Guards the claim that the model evaluated is the quantized one (not the dense model, nor packed weights that
    the forward pass would not read): a dense group of 64 floats holds 64 distinct values. No dense copy is
    kept, so the peak RSS is auto-round's.
    """
    on_grid, total = 0, 0
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and name != "lm_head":
            total += 1
            on_grid += _max_levels(module.weight, group) <= 2**bits
    if on_grid == 0:
        raise SystemExit(f"no Linear weight lies on a {bits}-bit grid: nothing quantized would be evaluated")
    return on_grid, total


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, required=True, help="Directory written by llmcompressor_data.py.")
    parser.add_argument("--bits", type=int, default=4)
    parser.add_argument("--group", type=int, default=64)
    parser.add_argument("--iters", type=int, default=0, help="0: optimized RTN; 50: SignRound light; 200: default.")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice).")
    parser.add_argument("--no-compile", action="store_true", help="Turn off auto-round's torch.compile.")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    calibration = torch.load(args.data / "calibration.pt")
    windows = torch.load(args.data / "eval.pt")
    model_dir = (args.data / "model.txt").read_text().strip()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float32).eval()
    dense_ppl = perplexity(model, windows)
    rounder = AutoRound(model, tokenizer, bits=args.bits, group_size=args.group, sym=True, iters=args.iters,
                        nsamples=calibration.shape[0], seqlen=calibration.shape[1],
                        dataset=calibration_samples(calibration), device_map="cpu",
                        enable_torch_compile=False if args.no_compile else None)
    start = time.perf_counter()
    quantized, _ = rounder.quantize()
    seconds = time.perf_counter() - start
    quantized = quantized.eval()
    on_grid, linears = quantized_linears(quantized, args.bits, args.group)
    pad_id = tokenizer.pad_token_id
    result = {
        "auto_round": version("auto-round"), "transformers": version("transformers"), "torch": torch.__version__,
        "threads": torch.get_num_threads(), "torch_compile": bool(rounder.enable_torch_compile),
        "bits": args.bits, "group": args.group, "sym": True, "iters": args.iters,
        "mode": "optimized RTN" if args.iters == 0 else f"SignRound {args.iters}",
        "samples": calibration.shape[0], "seq_len": calibration.shape[1], "eval_tokens": windows.numel(),
        "pad_tokens_in_calibration": int((calibration == pad_id).sum()) if pad_id is not None else 0,
        "quantized_linears": f"{on_grid}/{linears}", "dense_ppl": round(dense_ppl, 4),
        "quant_ppl": round(perplexity(quantized, windows), 4), "quantize_seconds": round(seconds, 1),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
    }
    print(json.dumps(result))
    print("\n| tool, mode | bits | group | dense ppl | ppl | seconds | peak RSS MB |\n|---|---|---|---|---|---|---|")
    print(f"| auto-round {result['auto_round']}, {result['mode']} | {args.bits} | {args.group} | "
          f"{result['dense_ppl']} | {result['quant_ppl']} | {result['quantize_seconds']} | {result['peak_rss_mb']} |")


if __name__ == "__main__":
    main()
