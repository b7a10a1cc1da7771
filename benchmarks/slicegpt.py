"""SliceGPT on the demo model: perplexity and parameters per slicing fraction, per_layer vs shared rotation.

    python benchmarks/slicegpt.py --samples 64 --seq-len 512 --eval-tokens 16384 \
        [--fractions 0.1,0.2,0.25,0.3] [--rotations per_layer,shared] [--out benchmarks/results/slicegpt.json]

Every setting starts from the same dense weights (reloaded), calibrates on the same demo:lee windows and is
scored on the same demo:wiki windows of 512 tokens. Each setting runs in a fresh process so its peak RSS is
its own; "cpu s" is the process CPU time (the machine may be shared, so wall time alone can mislead: on an
oversubscribed machine --threads 1 is faster than 2, whose OpenMP barriers wait for descheduled threads).
Reference (microsoft/TransformerCompression on this model and data, METHODS.md): dense 22.73; 10% -> 58.6;
25% (dim 432) -> 188.3 with 140.7M parameters (134.5M dense); 650-750 s per run.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import time
from pathlib import Path
from typing import Any

REFERENCE = {0.1: 58.6, 0.25: 188.3}


def _unique_params(model: Any) -> int:
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


def run_setting(args: dict[str, Any]) -> dict[str, Any]:
    """One setting in this process: load, slice (unless dense), evaluate."""
    import resource

    import torch

    from compressor.calibration.tokens import calibration_batch
    from compressor.engine import ModelContext, run_stages
    from compressor.methods.prune.slicegpt import SliceGPT, SliceGPTConfig
    from compressor.models import get_adapter
    from compressor.pipeline import evaluate, load

    torch.set_num_threads(args["threads"])
    loaded = load(args["model"])
    row: dict[str, Any] = {"rotation": args["rotation"], "slicing": args["slicing"]}
    params_before = _unique_params(loaded.model)
    wall, cpu = time.perf_counter(), time.process_time()
    if args["slicing"]:
        tokens = calibration_batch(loaded.tokenizer, "demo:lee", args["samples"], args["seq_len"], seed=0)
        run = ModelContext(loaded.model, get_adapter(loaded.model), tokens, torch.device("cpu"), 8)
        stage = SliceGPT(SliceGPTConfig(method="slicegpt", slicing=args["slicing"], rotation=args["rotation"]))
        run_stages(run, [stage])
        summary = run.structure["slicegpt"]
        row.update(width=summary["width"], shortcut_params=summary["shortcut_params"])
    else:
        row.update(width=loaded.model.config.hidden_size, shortcut_params=0)
    row.update(seconds=round(time.perf_counter() - wall, 1), cpu_seconds=round(time.process_time() - cpu, 1))
    start = time.perf_counter()
    result = evaluate(loaded, "demo:wiki", seq_len=512, max_tokens=args["eval_tokens"], device="cpu")
    row.update(ppl=round(result.ppl, 3), eval_seconds=round(time.perf_counter() - start, 1),
               params=_unique_params(loaded.model), params_before=params_before,
               peak_rss_mb=round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024))
    return row


def _table(rows: list[dict[str, Any]]) -> str:
    lines = ["| rotation | slicing | width | params (M) | shortcut params (M) | ppl | reference ppl | "
             "slice s (cpu s) | peak RSS MB |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        ref = REFERENCE.get(r["slicing"], "") if r["slicing"] else 22.73
        lines.append(f"| {r['rotation']} | {r['slicing']:.0%} | {r['width']} | {r['params'] / 1e6:.1f} | "
                     f"{r['shortcut_params'] / 1e6:.2f} | {r['ppl']} | {ref} | {r['seconds']} ({r['cpu_seconds']}) | "
                     f"{r['peak_rss_mb']} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="demo:smollm2")
    parser.add_argument("--samples", type=int, default=64)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--eval-tokens", type=int, default=16384)
    parser.add_argument("--fractions", default="0.1,0.2,0.25,0.3")
    parser.add_argument("--rotations", default="per_layer,shared")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=None, help="Also write the JSON result here.")
    args = parser.parse_args()
    common = {"model": args.model, "samples": args.samples, "seq_len": args.seq_len,
              "eval_tokens": args.eval_tokens, "threads": args.threads}
    settings = [{**common, "rotation": "dense", "slicing": 0.0}]
    settings += [{**common, "rotation": rotation, "slicing": float(fraction)}
                 for rotation in args.rotations.split(",") for fraction in args.fractions.split(",")]
    start = time.perf_counter()
    rows = []
    context = multiprocessing.get_context("spawn")
    for setting in settings:
        with context.Pool(1) as pool:  # a fresh process per setting: its own peak RSS
            rows.append(pool.apply(run_setting, (setting,)))
        print(json.dumps(rows[-1]), flush=True)
    result = {"model": args.model, "calibration": f"demo:lee {args.samples}x{args.seq_len}",
              "eval": f"demo:wiki {args.eval_tokens} tokens, windows of 512", "threads": args.threads,
              "total_seconds": round(time.perf_counter() - start, 1), "reference": REFERENCE, "rows": rows}
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    print()
    print(_table(rows))


if __name__ == "__main__":
    main()
