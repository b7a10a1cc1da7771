"""Layer-level proxy for the block-wise refinement (refine_iters): held-out output error of one decoder layer.

    python benchmarks/refine_proxy.py --layer 11 --samples 16 --held-out 8 --seq-len 512 --threads 1 \
        --variants none,quantized_input,float_input,float_input:lr=0.005

Layers before ``--layer`` are quantized with RTN (W4 g64, full grid, weighted scale search, no refinement), as
the engine would leave them; then layer ``--layer`` is quantized and refined on the calibration sequences
(Lee) by each variant in turn, from the same starting weights. Reported per variant: the layer output's mean
squared error against the *float model's* own layer output (float inputs all the way) on the calibration
sequences and on held-out Wikipedia sequences never trained on, the refinement's seconds, and the error
relative to plain RTN; each error also normalized per token by the target's mean square (what the next RMSNorm
sees). A variant is ``target[:key=value[:key=value...]]`` with keys ``lr``, ``iters``, ``batch``, ``loss``, ``dtype``
(``none``: RTN alone, first). Full-model perplexity stays the judge (benchmarks/quant.py); this only sorts variants
cheaply.
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

import torch

from compressor.calibration.tokens import calibration_batch
from compressor.engine import LayerContext, ModelContext
from compressor.methods.quant import refine
from compressor.methods.quant.refine_ops import output_error
from compressor.methods.quant.rtn import RTN, RTNConfig
from compressor.models import get_adapter
from compressor.pipeline import load

SCHEME: dict[str, Any] = {"bits": 4, "group_size": 64, "grid": "full", "scale_search": "weighted"}


def _variant(text: str, default_iters: int) -> tuple[str, dict[str, Any]]:
    target, *items = text.split(":")
    options: dict[str, Any] = {"refine_iters": default_iters}
    for item in items:
        key, value = item.split("=")
        field = {"lr": "refine_lr", "iters": "refine_iters", "batch": "refine_batch", "loss": "refine_loss",
                 "dtype": "refine_dtype"}[key]
        options[field] = float(value) if key == "lr" else value if key in ("loss", "dtype") else int(value)
    return target, options


def _error(ctx: LayerContext, targets: list[torch.Tensor]) -> tuple[float, float]:
    """Mean squared error of the layer's output (as it is now) against ``targets``, plain and normalized per
    token by the target's mean square (``refine_ops.output_error``), each averaged over the elements."""
    outs = ctx.forward()
    count = sum(t.numel() for t in targets)
    return tuple(sum(float(output_error(o, t, loss).sum()) for o, t in zip(outs, targets, strict=True)) / count
                 for loss in ("mse", "normalized"))  # type: ignore[return-value]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="demo:smollm2")
    parser.add_argument("--layer", type=int, default=11)
    parser.add_argument("--samples", type=int, default=16)
    parser.add_argument("--held-out", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--iters", type=int, default=50)
    parser.add_argument("--variants", default="none,quantized_input,float_input")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    loaded = load(args.model)
    calib = calibration_batch(loaded.tokenizer, "demo:lee", args.samples, args.seq_len, seed=0)
    held = calibration_batch(loaded.tokenizer, "demo:wiki", args.held_out, args.seq_len, seed=1)
    batch = 8
    run = ModelContext(loaded.model, get_adapter(loaded.model), torch.cat([calib, held]), torch.device("cpu"), batch)
    captured = run.capture_inputs()
    n_calib = -(-args.samples // batch)
    layers = run.adapter.layers()
    float_hidden = quant_hidden = captured.hidden
    prefix = RTN(RTNConfig(method="rtn", **SCHEME))
    prefix.prepare(run)
    for index in range(args.layer):  # the float stream, then the quantized prefix through the same layer
        ctx = LayerContext(index, layers[index], run, captured.layer(index, float_hidden))
        float_hidden = ctx.forward()
        ctx = LayerContext(index, layers[index], run, captured.layer(index, quant_hidden))
        prefix.apply(ctx)
        quant_hidden = ctx.forward()
    layer = layers[args.layer]
    dense = {k: v.clone() for k, v in layer.state_dict().items()}
    float_out = LayerContext(args.layer, layer, run, captured.layer(args.layer, float_hidden)).forward()
    inputs = captured.layer(args.layer, quant_hidden)
    rows = []
    for text in args.variants.split(","):
        target, options = _variant(text, args.iters)
        layer.load_state_dict(dense)
        run.quantized = {}
        config = RTNConfig(method="rtn", **SCHEME, **({} if target == "none" else {**options,
                                                                                   "refine_target": target}))
        stage = RTN(config)
        stage.prepare(run)
        ctx = LayerContext(args.layer, layer, run, inputs[:n_calib])
        run.plans[refine._STREAMS] = {id(config): refine._FloatStream(args.layer, float_hidden[:n_calib])}
        start = time.perf_counter()
        records = stage.apply(ctx)
        seconds = time.perf_counter() - start
        calib_error = _error(LayerContext(args.layer, layer, run, inputs[:n_calib]), float_out[:n_calib])
        held_error = _error(LayerContext(args.layer, layer, run, inputs[n_calib:]), float_out[n_calib:])
        summary = next((r.extra["refine"] for r in records if "refine" in r.extra), {})
        rows.append({"variant": text, "calib_mse": calib_error[0], "held_out_mse": held_error[0],
                     "calib_norm": calib_error[1], "held_out_norm": held_error[1],
                     "seconds": round(seconds, 1), "refine": summary})
        for key in ("calib_mse", "held_out_mse", "calib_norm", "held_out_norm"):
            rows[-1][key + "_vs_rtn"] = round(rows[-1][key] / rows[0][key], 4)
        print(json.dumps(rows[-1]), flush=True)
    print(json.dumps({"layer": args.layer, "samples": args.samples, "held_out": args.held_out,
                      "threads": torch.get_num_threads(), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
