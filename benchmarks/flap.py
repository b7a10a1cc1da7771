"""FLAP on the demo model: perplexity, parameters and time per ratio, the paper's settings against ablations.

    python benchmarks/flap.py --samples 64 --seq-len 512 --eval-tokens 16384 \
        [--ratios 0.1,0.2,0.3] [--variants paper,no_compensation,uniform,weight_norm] [--threads 2] \
        [--out benchmarks/results/flap.json]

Variants (``ratio``: fraction of the attention + MLP parameters removed, never exceeded):

- ``paper``: structure global, metric fluctuation (WIFV), compensate true (FLAP's choice, recipe flap-20pct);
- ``no_compensation``: the same without the bias compensation;
- ``uniform``: every layer loses floor(ratio x groups) KV groups and the rest of its share in channels, the same
  counts in every layer (fluctuation, compensation);
- ``weight_norm``: the global structure scored by weight-column norms only (no activations), with compensation.

A dense row comes first. Every setting starts from the same dense weights (reloaded in a fresh process, so its
peak RSS is its own), calibrates on the same demo:lee windows and is scored on the same demo:wiki windows.
"flap s (cpu s)": wall and process CPU time of the stage (the machine may be shared, so wall time alone can
mislead). ShortGPT and SliceGPT at a similar parameter count: benchmarks/layer_drop.py and slicegpt.py print
the same ``params`` column.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import time
from pathlib import Path
from typing import Any

#: Variant name -> the flap stage's settings other than ratio.
VARIANTS: dict[str, dict[str, Any]] = {
    "paper": {"structure": "global", "metric": "fluctuation", "compensate": True},
    "no_compensation": {"structure": "global", "metric": "fluctuation", "compensate": False},
    "uniform": {"structure": "uniform", "metric": "fluctuation", "compensate": True},
    "weight_norm": {"structure": "global", "metric": "weight_norm", "compensate": True},
}


def _unique_params(model: Any) -> int:
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


def _flap(loaded: Any, args: dict[str, Any]) -> dict[str, Any]:
    """Run the flap stage on ``loaded.model`` in place; the structure it chose, summarised."""
    import torch

    from compressor.calibration.tokens import calibration_batch
    from compressor.engine import ModelContext, run_stages
    from compressor.methods.prune.flap import FLAP, FLAPConfig
    from compressor.models import get_adapter

    tokens = calibration_batch(loaded.tokenizer, "demo:lee", args["samples"], args["seq_len"], seed=0)
    run = ModelContext(loaded.model, get_adapter(loaded.model), tokens, torch.device("cpu"), 8)
    config = FLAPConfig(method="flap", ratio=args["ratio"], **VARIANTS[args["variant"]])
    run_stages(run, [FLAP(config)])
    layers = run.structure["flap"]["layers"]
    heads, widths = [s["heads"] for s in layers], [s["intermediate_size"] for s in layers]
    return {"heads": f"{min(heads)}-{max(heads)}", "mlp_width": f"{min(widths)}-{max(widths)}",
            "biases": sum(bool(s["attention_bias"]) + bool(s["mlp_bias"]) for s in layers),
            "standard": run.structure["flap"]["standard"]}


def run_setting(args: dict[str, Any]) -> dict[str, Any]:
    """One setting in this process: load, prune (unless dense), evaluate."""
    import resource

    import torch

    from compressor.pipeline import evaluate, load

    torch.set_num_threads(args["threads"])
    loaded = load(args["model"])
    row: dict[str, Any] = {"variant": args["variant"], "ratio": args["ratio"]}
    params_before = _unique_params(loaded.model)
    wall, cpu = time.perf_counter(), time.process_time()
    if args["variant"] != "dense":
        row.update(_flap(loaded, args))
    row.update(seconds=round(time.perf_counter() - wall, 1), cpu_seconds=round(time.process_time() - cpu, 1))
    start = time.perf_counter()
    result = evaluate(loaded, "demo:wiki", seq_len=args["eval_seq_len"], max_tokens=args["eval_tokens"], device="cpu")
    row.update(ppl=round(result.ppl, 3), eval_seconds=round(time.perf_counter() - start, 1),
               params=_unique_params(loaded.model), params_before=params_before,
               peak_rss_mb=round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024))
    return row


def _table(rows: list[dict[str, Any]]) -> str:
    lines = ["| variant | ratio | params (M) | heads / layer | MLP width / layer | new biases | ppl | "
             "flap s (cpu s) | peak RSS MB |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['variant']} | {r['ratio']:.0%} | {r['params'] / 1e6:.2f} | {r.get('heads', '')} | "
                     f"{r.get('mlp_width', '')} | {r.get('biases', '')} | {r['ppl']} | "
                     f"{r['seconds']} ({r['cpu_seconds']}) | {r['peak_rss_mb']} |")
    return "\n".join(lines)


def _settings(args: argparse.Namespace) -> list[dict[str, Any]]:
    variants = args.variants.split(",")
    unknown = sorted(set(variants) - set(VARIANTS))
    if unknown:
        raise SystemExit(f"unknown variants {unknown}; choose from {', '.join(VARIANTS)}")
    common = {"model": args.model, "samples": args.samples, "seq_len": args.seq_len, "eval_tokens": args.eval_tokens,
              "eval_seq_len": args.eval_seq_len, "threads": args.threads}
    settings = [{**common, "variant": "dense", "ratio": 0.0}]
    settings += [{**common, "variant": variant, "ratio": float(ratio)}
                 for ratio in args.ratios.split(",") for variant in variants]
    return settings


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="demo:smollm2")
    parser.add_argument("--samples", type=int, default=64)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--eval-tokens", type=int, default=16384)
    parser.add_argument("--eval-seq-len", type=int, default=512)
    parser.add_argument("--ratios", default="0.1,0.2,0.3")
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"Comma-separated: {', '.join(VARIANTS)}.")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=None, help="Also write the JSON result here.")
    args = parser.parse_args()
    start = time.perf_counter()
    rows = []
    context = multiprocessing.get_context("spawn")
    for setting in _settings(args):
        with context.Pool(1) as pool:  # a fresh process per setting: its own peak RSS
            rows.append(pool.apply(run_setting, (setting,)))
        print(json.dumps(rows[-1]), flush=True)
    result = {"model": args.model, "calibration": f"demo:lee {args.samples}x{args.seq_len}",
              "eval": f"demo:wiki {args.eval_tokens} tokens, windows of {args.eval_seq_len}", "threads": args.threads,
              "total_seconds": round(time.perf_counter() - start, 1), "variants": VARIANTS, "rows": rows}
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    print()
    print(_table(rows))


if __name__ == "__main__":
    main()
