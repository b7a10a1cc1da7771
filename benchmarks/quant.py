"""RTN vs GPTQ on the demo model: perplexity, wall time, peak RSS; prints JSON and a Markdown table.

    python benchmarks/quant.py --samples 128 --seq-len 512 --eval-tokens 16384 [--settings w4g128,w3g128]
        [--methods rtn,gptq] [--grid full] [--scale-search weighted] [--fit-on original] [--no-act-order]
        [--refine-iters 50 --refine-batch 2 --refine-target float_input --refine-loss normalized
        --refine-lr 0.005]

Every setting starts from the same dense weights and is scored on the same demo:wiki windows. The
"floor" is one plain forward pass of the calibration set through the decoder. RTN needs no calibration: it
is applied here weight by weight (the engine's pass would only add each module's output error for the
report, at the cost of a Hessian pass), so its "seconds" is the rounding alone; with
``--scale-search weighted`` it needs each input's diag(H), so it then runs through the engine and its seconds
include the Hessian pass. ``--grid`` / ``--scale-search`` apply to both methods, ``--fit-on`` and
``--no-act-order`` to GPTQ (see GPTQConfig).
"""

from __future__ import annotations

import argparse
import json
import re
import time

import torch

from compressor.calibration.tokens import calibration_batch
from compressor.engine import ModelContext, run_stages
from compressor.methods.quant.gptq import GPTQ, GPTQConfig
from compressor.methods.quant.ops import QuantizedWeight, effective_group_size, quantize_rtn
from compressor.methods.quant.rtn import RTN, RTNConfig
from compressor.models import get_adapter
from compressor.pipeline import evaluate, load
from compressor.report import average_bits, peak_rss_bytes

SETTINGS = {  # name: (bits, group_size)
    "w8pc": (8, -1),
    "w4g128": (4, 128),
    "w4g64": (4, 64),  # llm-compressor's scheme on this model (it refuses 128 on the 576-wide modules)
    "w4pc": (4, -1),
    "w3g128": (3, 128),
    "w2g64": (2, 64),
}


def setting(name: str) -> tuple[int, int]:
    """``(bits, group_size)`` of a named setting, or of any ``w<bits>g<group>`` / ``w<bits>pc`` (per channel)."""
    if name in SETTINGS:
        return SETTINGS[name]
    found = re.fullmatch(r"w(\d+)(?:g(\d+)|pc)", name)
    if found is None:
        raise SystemExit(f"--settings: unknown setting {name!r} (w<bits>g<group> or w<bits>pc, e.g. w3g64)")
    return int(found.group(1)), int(found.group(2) or -1)


def round_to_nearest(model: torch.nn.Module, bits: int, group_size: int, grid: str,
                     scale_search: str) -> dict[str, QuantizedWeight]:
    """Symmetric RTN of every decoder linear in place (as the rtn recipes target: all but lm_head)."""
    quantized = {}
    for index, layer in enumerate(get_adapter(model).layers()):
        for name, module in layer.named_modules():
            if isinstance(module, torch.nn.Linear):
                W = module.weight.data
                size = effective_group_size(W.shape[1], group_size)
                qweight = quantize_rtn(W.float(), bits, size, True, grid=grid,  # type: ignore[arg-type]
                                       scale_search=scale_search)  # type: ignore[arg-type]
                module.weight.data = qweight.dequantize(W.dtype)
                quantized[f"{index}.{name}"] = qweight
    return quantized


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="demo:smollm2")
    parser.add_argument("--samples", type=int, default=128)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--eval-tokens", type=int, default=16384)
    parser.add_argument("--settings", default=",".join(SETTINGS))
    parser.add_argument("--methods", default="rtn,gptq")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice).")
    parser.add_argument("--skip-dense", action="store_true", help="Do not evaluate the dense model.")
    parser.add_argument("--grid", default="restricted", choices=["restricted", "full", "full_positive"])
    parser.add_argument("--scale-search", default="none", choices=["none", "mse", "weighted"])
    parser.add_argument("--fit-on", default="auto", choices=["auto", "original", "sweep"],
                        help="GPTQ: when group scales are fitted.")
    parser.add_argument("--no-act-order", action="store_true", help="GPTQ without act-order.")
    parser.add_argument("--dampening", type=float, default=0.01, help="GPTQ: fraction of mean(diag H) added to H.")
    parser.add_argument("--asymmetric", type=float, default=0.0,
                        help="GPTQ: strength of the asymmetric (GPTAQ) correction toward the float model's inputs.")
    parser.add_argument("--refine-iters", type=int, default=0,
                        help="Block-wise refinement steps per layer after rtn/gptq (0: off; rtn then runs through "
                        "the engine).")
    parser.add_argument("--refine-batch", type=int, default=2, help="Sequences per refinement step.")
    parser.add_argument("--refine-target", default="float_input", choices=["float_input", "quantized_input"],
                        help="What each refined layer reproduces (see WeightQuantConfig.refine_target).")
    parser.add_argument("--refine-loss", default="normalized", choices=["mse", "normalized"],
                        help="The refinement's loss (see WeightQuantConfig.refine_loss).")
    parser.add_argument("--refine-lr", type=float, default=None, help="Refinement step size (default 1/iters).")
    parser.add_argument("--refine-dtype", default="auto", choices=["auto", "float32", "bfloat16"],
                        help="Precision of the refinement's steps (see WeightQuantConfig.refine_dtype).")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    loaded = load(args.model)
    dense = {k: v.clone() for k, v in loaded.model.state_dict().items()}
    tokens = calibration_batch(loaded.tokenizer, "demo:lee", args.samples, args.seq_len, seed=0)

    def ppl() -> float:
        return round(evaluate(loaded, "demo:wiki", seq_len=512, max_tokens=args.eval_tokens, device="cpu").ppl, 4)

    start = time.perf_counter()
    with torch.no_grad():
        for batch in tokens.split(8):
            loaded.model.model(batch)
    floor = round(time.perf_counter() - start, 1)
    dense_ppl = ppl() if not args.skip_dense else None
    rows = [{"setting": "dense", "method": "-", "options": "-", "ppl": dense_ppl, "seconds": 0.0}]
    print(json.dumps({"floor_forward_seconds": floor, **rows[0]}), flush=True)
    for name in args.settings.split(","):
        bits, group = setting(name)
        for method in args.methods.split(","):
            loaded.model.load_state_dict(dense)
            start = time.perf_counter()
            scheme = {"bits": bits, "group_size": group, "grid": args.grid, "scale_search": args.scale_search,
                      "refine_iters": args.refine_iters, "refine_batch": args.refine_batch,
                      "refine_target": args.refine_target, "refine_lr": args.refine_lr,
                      "refine_loss": args.refine_loss, "refine_dtype": args.refine_dtype}
            if method == "gptq" or args.scale_search == "weighted" or args.refine_iters:
                stage = (GPTQ(GPTQConfig(method="gptq", act_order=not args.no_act_order, fit_on=args.fit_on,
                                         dampening=args.dampening, asymmetric=args.asymmetric, **scheme))
                         if method == "gptq" else RTN(RTNConfig(method="rtn", **scheme)))
                run = ModelContext(loaded.model, get_adapter(loaded.model), tokens, torch.device("cpu"), 8)
                run_stages(run, [stage])
                quantized = run.quantized
            else:
                quantized = round_to_nearest(loaded.model, bits, group, args.grid, args.scale_search)
            seconds = round(time.perf_counter() - start, 1)
            bpw, bpw_meta = average_bits(quantized)
            options = f"{args.grid}/{args.scale_search}" + (
                f"/refine{args.refine_iters}b{args.refine_batch}/{args.refine_target}/{args.refine_loss}"
                + (f"/lr{args.refine_lr}" if args.refine_lr else "") + f"/{args.refine_dtype}"
                if args.refine_iters else "") + (
                f"/{args.fit_on}/{'no-' if args.no_act_order else ''}act-order/damp{args.dampening}"
                + (f"/asym{args.asymmetric}" if args.asymmetric else "") if method == "gptq" else "")
            rows.append({"setting": name, "method": method, "options": options, "ppl": ppl(), "seconds": seconds,
                         "bits_per_weight": bpw, "bits_incl_metadata": bpw_meta})
            print(json.dumps(rows[-1]), flush=True)
    result = {"model": args.model, "options": {k: getattr(args, k) for k in ("grid", "scale_search", "fit_on",
                                                                           "refine_iters", "refine_batch",
                                                                           "refine_target", "refine_lr",
                                                                           "refine_loss", "refine_dtype")}
              | {"act_order": not args.no_act_order, "dampening": args.dampening, "asymmetric": args.asymmetric},
              "calibration": f"demo:lee {args.samples}x{args.seq_len}",
              "eval": f"demo:wiki {args.eval_tokens} tokens, windows of 512", "floor_forward_seconds": floor,
              "threads": torch.get_num_threads(), "peak_rss_mb": round(peak_rss_bytes() / 2**20), "rows": rows}
    print(json.dumps(result, indent=2))
    print("\n| setting | method | options | ppl | bits/weight (incl. scales) | seconds |\n|---|---|---|---|---|---|")
    for row in rows:
        bits = f"{row.get('bits_per_weight', 32)} ({row.get('bits_incl_metadata', 32)})"
        print(f"| {row['setting']} | {row['method']} | {row['options']} | {row['ppl']} | {bits} | {row['seconds']} |")


if __name__ == "__main__":
    main()
