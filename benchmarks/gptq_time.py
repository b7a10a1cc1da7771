"""Where GPTQ's wall time goes: the floor forward, then the layer-wise pass split into its phases.

    OMP_NUM_THREADS=1 python benchmarks/gptq_time.py --samples 16 --threads 1 \
        --set stages.0.grid=restricted --set stages.0.scale_search=none --save-codes /tmp/codes.pt

Phases (seconds summed over all layers; nested phases are listed under their parent):
``hessian`` (forwards up to each linear group plus ``X^T X``; ``accumulate_hessian`` is its matrix part),
``settle`` (replayed projections computed once), ``layer_output`` (the final forward making the next layer's
inputs), ``gptq_solve`` (``gptq_quantize``) split into ``plan_groups`` (static group fits),
``fit_qparams`` (every group fit, the scale search), ``inverse_cholesky`` and ``sweep``, and ``record`` (the
report row's error). ``--save-codes`` writes every module's codes, scales and zeros for a bit-exact comparison
of two runs (``--compare`` another such file).
"""

from __future__ import annotations

import argparse
import json
import time
from collections import defaultdict
from collections.abc import Callable
from typing import Any

import torch

from compressor import engine
from compressor.calibration.tokens import calibration_batch
from compressor.engine import LayerContext, ModelContext, run_stages
from compressor.methods.quant import common, gptq_ops, gptq_sweep
from compressor.methods.registry import get_method
from compressor.models import get_adapter
from compressor.pipeline import load
from compressor.recipe import load_recipe

TIMES: dict[str, float] = defaultdict(float)


def _timed(owner: Any, name: str, label: str) -> None:
    """Replace ``owner.name`` by a wrapper adding its wall time to ``TIMES[label]``."""
    inner: Callable[..., Any] = getattr(owner, name)

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        try:
            return inner(*args, **kwargs)
        finally:
            TIMES[label] += time.perf_counter() - start

    setattr(owner, name, wrapper)


def _instrument() -> None:
    _timed(LayerContext, "hessian", "hessian")
    _timed(LayerContext, "settle", "settle")
    _timed(LayerContext, "forward", "layer_output")
    _timed(engine, "accumulate_hessian", "hessian/accumulate_hessian")
    _timed(gptq_ops, "gptq_quantize", "gptq_solve")
    _timed(gptq_ops, "_plan_groups", "gptq_solve/plan_groups")
    _timed(gptq_sweep, "fit_qparams", "gptq_solve/fit_qparams")
    _timed(gptq_ops, "_inverse_cholesky", "gptq_solve/inverse_cholesky")
    _timed(gptq_ops, "_sweep", "gptq_solve/sweep")
    _timed(common, "_record", "record")
    # gptq.py imported gptq_quantize by name: point it at the timed one.
    from compressor.methods.quant import gptq

    gptq.gptq_quantize = gptq_ops.gptq_quantize  # type: ignore[attr-defined]


SOLVES: list[dict[str, Any]] = []


def _record_solves(layers: set[int], per_layer: int = 4) -> None:
    """Keep the arguments of ``gptq_quantize`` for the decoder layers ``layers`` (``per_layer`` calls each: q/k/v,
    o, gate/up and down are one solve each)."""
    inner = gptq_ops.gptq_quantize
    calls = [0]

    def wrapper(W: torch.Tensor, H: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        if calls[0] // per_layer in layers:
            SOLVES.append({"call": calls[0], "W": W.clone(), "H": H.clone(), "args": args, "kwargs": kwargs})
        calls[0] += 1
        return inner(W, H, *args, **kwargs)

    gptq_ops.gptq_quantize = wrapper  # type: ignore[assignment]


def _codes(run: ModelContext) -> dict[str, dict[str, torch.Tensor]]:
    return {path: {"q": w.q.cpu(), "scale": w.scale.cpu(), "zero": w.zero.cpu()} for path, w in run.quantized.items()}


def _compare(mine: dict[str, dict[str, torch.Tensor]], other: dict[str, dict[str, torch.Tensor]]) -> dict[str, Any]:
    """Modules whose codes, scales or zeros differ (bitwise), and the share of differing codes."""
    differ = {}
    for path, parts in mine.items():
        bad = [k for k, v in parts.items() if not torch.equal(v, other[path][k])]
        if bad:
            differ[path] = {"parts": bad, "codes_differing": float((parts["q"] != other[path]["q"]).float().mean())}
    return {"modules": len(mine), "differing": differ}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="demo:smollm2")
    parser.add_argument("--recipe", default="w4a16-gptq")
    parser.add_argument("--samples", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--layers", type=int, default=0, help="quantize only the first N decoder layers (0: all)")
    parser.add_argument("--set", action="append", default=[], help="recipe override, as compressor's --set")
    parser.add_argument("--save-codes", default=None)
    parser.add_argument("--compare", default=None)
    parser.add_argument("--dump-solves", default=None, help="save gptq_quantize's arguments of --dump-layers")
    parser.add_argument("--dump-layers", default="0,5,11,20,29")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    overrides = [f"calibration.samples={args.samples}", f"calibration.seq_len={args.seq_len}", *args.set]
    if args.layers:
        overrides.append(f"stages.0.targets=['re:model\\.layers\\.({'|'.join(map(str, range(args.layers)))})\\.']")
    recipe = load_recipe(args.recipe, overrides)
    loaded = load(args.model)
    tokens = calibration_batch(loaded.tokenizer, recipe.calibration.dataset, args.samples, args.seq_len, recipe.seed)
    start = time.perf_counter()
    with torch.no_grad():
        for batch in tokens.split(recipe.calibration.batch_size):
            loaded.model.model(batch)
    floor = time.perf_counter() - start
    if args.dump_solves:
        _record_solves({int(i) for i in args.dump_layers.split(",")})
    _instrument()
    adapter = get_adapter(loaded.model)
    run = ModelContext(loaded.model, adapter, tokens, torch.device("cpu"), recipe.calibration.batch_size)
    stages = [get_method(c.method)(c) for c in recipe.stages]
    start = time.perf_counter()
    run_stages(run, stages)
    total = time.perf_counter() - start
    output: dict[str, Any] = {
        "recipe": args.recipe, "overrides": args.set, "calibration": f"{args.samples}x{args.seq_len}",
        "threads": torch.get_num_threads(), "floor_forward": round(floor, 2), "layerwise_pass": round(total, 2),
        "ratio_to_floor": round(total / floor, 2), "phases": {k: round(v, 2) for k, v in sorted(TIMES.items())},
    }
    if args.save_codes:
        torch.save(_codes(run), args.save_codes)
    if args.dump_solves:
        torch.save(SOLVES, args.dump_solves)
    if args.compare:
        output["compare"] = _compare(_codes(run), torch.load(args.compare))
    print(json.dumps(output, indent=2))


if __name__ == "__main__":
    main()
