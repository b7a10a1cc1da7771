"""DGQ W4A8 against its baselines on the demo model: perplexity of the INT8-activation arithmetic, wall time,
and the time of DGQ's two-phase scale grid search; prints JSON lines, a JSON summary and a Markdown table.

    python benchmarks/dgq.py --samples 128 --seq-len 512 --eval-tokens 16384 [--rows dense,w4a16-gptq,...]
        [--group-size 128] [--clip 99] [--alpha 0.5] [--threads 1]

Rows (every one starts from the same dense weights; the model is copied, since dgq swaps modules and folds
smoothing into the norms; all are scored on the same demo:wiki windows):
  dense           the float model
  w4a16-gptq      GPTQ 4-bit symmetric groups, float activations (the weight-only reference)
  naive-w4a8      RTN 4-bit groups (one float scale per group, plain max fit) and per-token INT8 activations,
                  no clipping, no smoothing: what DGQ must beat
  dgq-rtn / dgq-gptq             DGQ W4A8, no smoothing, no clipping, solver rtn / gptq
  dgq-rtn-smooth / dgq-gptq-smooth    the same with SmoothQuant alpha ``--alpha``
  dgq-gptq-smooth-clip           and per-token activation clipping at percentile ``--clip``
  w8a8            INT8 per-channel weights (dgq weight_bits 8, gptq solver, smoothing), INT8 activations
Each dgq row's "search_seconds" is the time spent in the two-phase grid search (both phases, all linears).
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from compressor.calibration.tokens import calibration_batch
from compressor.engine import ModelContext, run_stages
from compressor.methods.quant import dgq as dgq_module
from compressor.methods.quant.dgq import DGQConfig
from compressor.methods.quant.dgq_ops import fake_quantize_activations
from compressor.methods.quant.gptq import GPTQConfig
from compressor.methods.quant.ops import effective_group_size, quantize_rtn
from compressor.models import get_adapter
from compressor.pipeline import evaluate, load
from compressor.recipe import build_stages
from compressor.report import average_bits, peak_rss_bytes

ROWS = ("dense", "w4a16-gptq", "naive-w4a8", "dgq-rtn", "dgq-gptq", "dgq-rtn-smooth", "dgq-gptq-smooth",
        "dgq-gptq-smooth-clip", "w8a8")


class NaiveA8Linear(nn.Linear):
    """A linear on RTN-dequantized weights whose input is fake-quantized to INT8 per token (max scaling)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(fake_quantize_activations(x).to(x.dtype), self.weight, self.bias)


def naive_w4a8(model: nn.Module, group_size: int) -> dict[str, Any]:
    """RTN every decoder linear (symmetric, plain max fit) and make its input INT8 per token; returns the weights."""
    quantized = {}
    for index, layer in enumerate(get_adapter(model).layers()):
        for name, module in list(layer.named_modules()):
            if type(module) is nn.Linear:
                W = module.weight.data
                qweight = quantize_rtn(W.float(), 4, effective_group_size(W.shape[1], group_size), True)
                module.weight.data = qweight.dequantize(W.dtype)
                module.__class__ = NaiveA8Linear
                quantized[f"{index}.{name}"] = qweight
    return quantized


def stage_config(row: str, args: argparse.Namespace) -> Any:
    """The stage a row runs (None for dense and naive-w4a8)."""
    if row == "w4a16-gptq":
        return GPTQConfig(method="gptq", bits=4, group_size=args.group_size, ignore=["lm_head"])
    if row == "w8a8":
        return DGQConfig(method="dgq", weight_bits=8, solver="gptq", smoothing=args.alpha, ignore=["lm_head"])
    if row.startswith("dgq-"):
        return DGQConfig(method="dgq", weight_bits=4, group_size=args.group_size, solver=row.split("-")[1],
                         smoothing=args.alpha if "smooth" in row else None,
                         act_percentile=args.clip if row.endswith("-clip") else 100.0, ignore=["lm_head"])
    return None


@contextmanager
def timed_search() -> Iterator[dict[str, float]]:
    """Add up the wall time of dgq's phase 1 and phase 2 searches while the block runs."""
    spent = {"seconds": 0.0}
    originals = {name: getattr(dgq_module, name) for name in ("search_channel_scale", "search_int_scales")}

    def timed(function: Callable[..., Any]) -> Callable[..., Any]:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                spent["seconds"] += time.perf_counter() - start
        return wrapper

    for name, function in originals.items():
        setattr(dgq_module, name, timed(function))
    try:
        yield spent
    finally:
        for name, function in originals.items():
            setattr(dgq_module, name, function)


def run_row(row: str, loaded: Any, base: nn.Module, tokens: torch.Tensor, args: argparse.Namespace) -> dict[str, Any]:
    loaded.model = copy.deepcopy(base)
    start = time.perf_counter()
    quantized: dict[str, Any] = {}
    search = {"seconds": 0.0}
    config = stage_config(row, args)
    if row == "naive-w4a8":
        quantized = naive_w4a8(loaded.model, args.group_size)
    elif config is not None:
        run = ModelContext(loaded.model, get_adapter(loaded.model), tokens, torch.device("cpu"), args.batch_size)
        with timed_search() as search:
            run_stages(run, build_stages([config]))
        quantized = run.quantized
    seconds = time.perf_counter() - start
    ppl = evaluate(loaded, args.eval_data, seq_len=args.eval_seq_len, max_tokens=args.eval_tokens, device="cpu").ppl
    bpw, bpw_meta = average_bits(quantized) if quantized else (32, 32)
    return {"row": row, "ppl": round(ppl, 4), "seconds": round(seconds, 1),
            "search_seconds": round(search["seconds"], 1) if row.startswith("dgq") or row == "w8a8" else None,
            "bits_per_weight": bpw, "bits_incl_metadata": bpw_meta}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="demo:smollm2")
    parser.add_argument("--calibration", default="demo:lee")
    parser.add_argument("--samples", type=int, default=128)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--eval-data", default="demo:wiki")
    parser.add_argument("--eval-tokens", type=int, default=16384)
    parser.add_argument("--eval-seq-len", type=int, default=512)
    parser.add_argument("--rows", default=",".join(ROWS))
    parser.add_argument("--group-size", type=int, default=128, help="4-bit groups (the largest divisor is used).")
    parser.add_argument("--alpha", type=float, default=0.5, help="SmoothQuant alpha of the *-smooth rows.")
    parser.add_argument("--clip", type=float, default=99.0, help="Activation percentile of the *-clip row.")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    loaded = load(args.model, dtype="float32")
    base = copy.deepcopy(loaded.model)
    tokens = calibration_batch(loaded.tokenizer, args.calibration, args.samples, args.seq_len, seed=0)
    rows = []
    for row in args.rows.split(","):
        if row not in ROWS:
            raise SystemExit(f"--rows: unknown row {row!r}; choose from {', '.join(ROWS)}")
        rows.append(run_row(row, loaded, base, tokens, args))
        print(json.dumps(rows[-1]), flush=True)
    result = {"model": args.model, "calibration": f"{args.calibration} {args.samples}x{args.seq_len}",
              "eval": f"{args.eval_data} {args.eval_tokens} tokens, windows of {args.eval_seq_len}",
              "group_size": args.group_size, "alpha": args.alpha, "clip": args.clip,
              "threads": torch.get_num_threads(), "peak_rss_mb": round(peak_rss_bytes() / 2**20), "rows": rows}
    print(json.dumps(result, indent=2))
    print("\n| row | ppl | bits/weight (incl. scales) | seconds | grid search s |\n|---|---|---|---|---|")
    for r in rows:
        search = "-" if r["search_seconds"] is None else r["search_seconds"]
        print(f"| {r['row']} | {r['ppl']} | {r['bits_per_weight']} ({r['bits_incl_metadata']}) | {r['seconds']} "
              f"| {search} |")


if __name__ == "__main__":
    main()
