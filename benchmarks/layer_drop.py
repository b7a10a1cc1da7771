"""Layer and sublayer removal on the demo model: which layers to drop, at equal parameter budgets.

    python benchmarks/layer_drop.py --samples 16 --seq-len 512 --eval-tokens 16384 [--counts 2,4,8] \
        [--strategies block_influence,angular,evenly_spaced,last,finercut] [--out result.json] \
        [--finercut-search screened,lazy,exact] [--finercut-ratio 0.25] [--screen-samples 2] [--rescore-top 3]
        [--search-dtype float32|bfloat16]

For each count n of whole layers: ShortGPT's block influence (the n lowest-scoring layers), the angular
variant (the best contiguous block of n), n evenly spaced layers, the last n layers (the ShortGPT paper's
baselines), and FinerCut removing attention/MLP sublayers until the same number of parameters is gone
(``ratio = n / layers``: every decoder layer has the same size). Every setting starts from the same dense
weights, calibrates on the same demo:lee windows and is scored on the same demo:wiki windows of 512 tokens.
"seconds" is the method's own time (scoring pass + search), without loading and evaluation.

FinerCut runs once per ``--finercut-search`` value (rows ``finercut-<search>``, each with its removals, full
and screen evaluation counts, so the searches can be compared); ``--finercut-ratio`` replaces ``n / layers``
(0.25: the shipped ``finercut-25pct``, whose calibration is ``--samples 16 --seq-len 256``).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import torch

from compressor.calibration.tokens import calibration_batch
from compressor.engine import ModelContext, run_stages
from compressor.methods.base import Method
from compressor.methods.prune.finercut import FinerCut, FinerCutConfig
from compressor.methods.prune.layer_drop import LayerDrop, LayerDropConfig
from compressor.models import get_adapter
from compressor.pipeline import LoadedModel, evaluate, load

STRATEGIES = ("block_influence", "angular", "evenly_spaced", "last", "finercut")


def _unique_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


def _fixed_layers(strategy: str, count: int, layers: int) -> list[int]:
    if strategy == "last":
        return list(range(layers - count, layers))
    return [int((k + 0.5) * layers / count) for k in range(count)]  # evenly spaced, centred in each stride


def _stage(strategy: str, count: int, layers: int, finercut: dict[str, Any]) -> Method:
    if strategy.startswith("finercut"):
        settings = {"ratio": count / layers, **finercut}
        if settings["search"] != "screened":  # screen_samples / rescore_top belong to the screened search
            settings = {k: v for k, v in settings.items() if k not in ("screen_samples", "rescore_top")}
        return FinerCut(FinerCutConfig(method="finercut", **settings))
    return LayerDrop(LayerDropConfig(method="layer_drop", metric=strategy, remove=count))  # type: ignore[arg-type]


def run_setting(
    loaded: LoadedModel, tokens: torch.Tensor, strategy: str, count: int, finercut: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Prune ``loaded`` in place by ``strategy`` and describe what went (``finercut``: FinerCut's settings)."""
    adapter = get_adapter(loaded.model)
    layers = adapter.num_layers
    start = time.perf_counter()
    extra: dict[str, Any] = {}
    if strategy in ("evenly_spaced", "last"):
        removed: Any = _fixed_layers(strategy, count, layers)
        adapter.remove_layers(removed)
    else:
        run = ModelContext(loaded.model, adapter, tokens, torch.device("cpu"), 8)
        run_stages(run, [_stage(strategy, count, layers, finercut or {"search": "screened"})])
        if strategy.startswith("finercut"):
            summary = run.structure["finercut"]
            removed = [f"{index}.{'attn' if kind == 'attention' else 'mlp'}" for index, kind, _ in summary["removed"]]
            extra = {"evaluations": summary["evaluations"], "screen_evaluations": summary.get("screen_evaluations", 0),
                     "search_seconds": summary["seconds"], "params_removed": summary["params_removed"],
                     **{key: summary[key] for key in ("layer_forwards", "evaluation_equivalents", "chunk_evaluations")
                        if key in summary}}
        else:
            removed = run.structure["layer_drop"]["removed"]
    return {"strategy": strategy, "count": count, "removed": removed, "seconds": round(time.perf_counter() - start, 1),
            **extra}


def _table(rows: list[dict[str, Any]]) -> str:
    lines = ["| layers' worth removed | strategy | params (M) | ppl | seconds | removed |", "|---|---|---|---|---|---|"]
    for r in rows:
        removed = ", ".join(str(x) for x in r["removed"]) if not r["strategy"].startswith("finercut") else \
            f"{len(r['removed'])} sublayers ({sum('attn' in x for x in r['removed'])} attention)"
        lines.append(f"| {r['count']} | {r['strategy']} | {r['params'] / 1e6:.1f} | {r['ppl']} | {r['seconds']} | "
                     f"{removed} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="demo:smollm2")
    parser.add_argument("--samples", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--eval-tokens", type=int, default=16384)
    parser.add_argument("--counts", default="2,4,8")
    parser.add_argument("--strategies", default=",".join(STRATEGIES))
    parser.add_argument("--out", type=Path, default=None, help="Also write the JSON result here.")
    parser.add_argument("--finercut-search", default="screened", help="Comma-separated: screened, lazy, exact.")
    parser.add_argument("--finercut-ratio", type=float, default=None, help="FinerCut's ratio (default: n / layers).")
    parser.add_argument("--screen-samples", type=int, default=None, help="FinerCut screened: screen sequences.")
    parser.add_argument("--rescore-top", type=int, default=None, help="FinerCut screened: candidates rescored.")
    parser.add_argument("--search-dtype", default=None, choices=("float32", "bfloat16"),
                        help="FinerCut's search_dtype (default: the stage's, float32).")
    args = parser.parse_args()
    strategies = args.strategies.split(",")
    unknown = set(strategies) - set(STRATEGIES)
    if unknown:
        parser.error(f"unknown strategies {sorted(unknown)}; choose from {', '.join(STRATEGIES)}")
    searches = args.finercut_search.split(",")
    if set(searches) - {"screened", "lazy", "exact"}:
        parser.error(f"unknown --finercut-search values {sorted(set(searches) - {'screened', 'lazy', 'exact'})}")
    if "finercut" in strategies:  # one finercut row per search, in place of the plain strategy
        at = strategies.index("finercut")
        strategies[at : at + 1] = [f"finercut-{search}" for search in searches]
    given = {k: v for k, v in {"ratio": args.finercut_ratio, "screen_samples": args.screen_samples,
                                "rescore_top": args.rescore_top, "search_dtype": args.search_dtype}.items()
             if v is not None}

    def ppl(loaded: LoadedModel) -> float:
        return round(evaluate(loaded, "demo:wiki", seq_len=512, max_tokens=args.eval_tokens, device="cpu").ppl, 3)

    loaded = load(args.model)
    dense = {k: v.clone() for k, v in loaded.model.state_dict().items()}
    tokens = calibration_batch(loaded.tokenizer, "demo:lee", args.samples, args.seq_len, seed=0)
    rows = [{"strategy": "dense", "count": 0, "removed": [], "seconds": 0.0, "ppl": ppl(loaded),
             "params": _unique_params(loaded.model)}]
    print(json.dumps(rows[-1]), flush=True)
    for count in (int(c) for c in args.counts.split(",")):
        for strategy in strategies:
            loaded = load(args.model)  # a fresh model: removal changes the module tree
            loaded.model.load_state_dict(dense)
            finercut = {"search": strategy.removeprefix("finercut-"), **given}
            row = run_setting(loaded, tokens, strategy, count, finercut)
            row.update(ppl=ppl(loaded), params=_unique_params(loaded.model))
            rows.append(row)
            print(json.dumps(row), flush=True)
    result = {"model": args.model, "calibration": f"demo:lee {args.samples}x{args.seq_len}",
              "eval": f"demo:wiki {args.eval_tokens} tokens, windows of 512", "rows": rows}
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    print()
    print(_table(rows))


if __name__ == "__main__":
    main()
