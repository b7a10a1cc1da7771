"""Uniform GPTQ / RTN vs BAQ-allocated GPTQ / RTN on the demo model at the same average bits.

    python benchmarks/baq.py --samples 64 --seq-len 512 --eval-tokens 16384 [--settings ...] [--json out.json]

A setting may name its BAQ objective after "@" (``baq-module-3.0@fisher``); otherwise ``--objective``.

Every setting starts from the same dense weights, uses the same calibration tokens and is scored on
the same demo:wiki windows (512 tokens). BAQ's sensitivities do not depend on the budget, so one
measuring pass serves every BAQ setting (both proxies, GPTQ's error feedback and plain rounding, are
measured in that pass); each setting then allocates (``BAQ.finalize``) and runs its quantizer. The
"split" row is the naive alternative at 2.5 bits: the first half of the layers at 3 bits, the rest at 2.
Bits per weight count the codes; "incl. metadata" adds the 16-bit scales (and zero points).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import torch

from compressor.calibration.tokens import calibration_batch
from compressor.engine import ModelContext, run_pass, run_stages
from compressor.methods.base import Method
from compressor.methods.quant.baq import BAQ, BAQConfig
from compressor.methods.quant.common import WeightQuantConfig
from compressor.methods.quant.gptq import GPTQ, GPTQConfig
from compressor.methods.quant.rtn import RTN, RTNConfig
from compressor.models import get_adapter
from compressor.pipeline import evaluate, load
from compressor.report import average_bits, peak_rss_bytes

GROUP = 128
Allocation = tuple[float, str, bool, str]  # (avg_bits, granularity, error_feedback, budget)
#: name: (quantizer, uniform bits or None, BAQ allocation or None, split). "-mb": budget module (every module
#: keeps avg_bits, bits move between its own groups); otherwise budget model (modules compete for bits).
SETTINGS: dict[str, tuple[str, int | None, Allocation | None, bool]] = {
    "gptq-w3": ("gptq", 3, None, False),
    "baq-module-3.0": ("gptq", None, (3.0, "module", True, "model"), False),
    "baq-group-3.0": ("gptq", None, (3.0, "group", True, "model"), False),
    "baq-group-3.0-mb": ("gptq", None, (3.0, "group", True, "module"), False),
    "rtn-w3": ("rtn", 3, None, False),
    "baq-module-3.0+rtn": ("rtn", None, (3.0, "module", False, "model"), False),
    "baq-group-3.0-mb+rtn": ("rtn", None, (3.0, "group", False, "module"), False),
    "gptq-w2": ("gptq", 2, None, False),
    "gptq-split2.5": ("gptq", 2, None, True),
    "baq-module-2.5": ("gptq", None, (2.5, "module", True, "model"), False),
    "baq-group-2.5": ("gptq", None, (2.5, "group", True, "model"), False),
    "baq-group-2.5-mb": ("gptq", None, (2.5, "group", True, "module"), False),
    "gptq-w4": ("gptq", 4, None, False),
    "baq-module-4.0": ("gptq", None, (4.0, "module", True, "model"), False),
    "baq-group-4.0": ("gptq", None, (4.0, "group", True, "model"), False),
    "baq-group-4.0-mb": ("gptq", None, (4.0, "group", True, "module"), False),
    "baq-group-3.0+rtn": ("rtn", None, (3.0, "group", False, "model"), False),
}


def _quantizer_config(name: str, bits: int) -> WeightQuantConfig:
    if name == "gptq":
        return GPTQConfig(method="gptq", bits=bits, group_size=GROUP)
    return RTNConfig(method="rtn", bits=bits, group_size=GROUP)


def _quantizer(name: str, bits: int) -> Method:
    config = _quantizer_config(name, bits)
    return GPTQ(config) if name == "gptq" else RTN(config)


def _baq(avg_bits: float, granularity: str, error_feedback: bool, budget: str = "model",
         objective: str = "fisher") -> BAQ:
    """A BAQ stage planning for the quantizer it models: GPTQ with error feedback, RTN without (both GROUP)."""
    stage = BAQ(BAQConfig.model_validate({"method": "baq", "avg_bits": avg_bits, "granularity": granularity,
                                          "error_feedback": error_feedback, "budget": budget,
                                          "objective": objective}))
    stage.bind([_quantizer_config("gptq" if error_feedback else "rtn", 3)], "dense")
    return stage


def _measure(run: ModelContext, objective: str) -> tuple[dict[bool, list[Any]], float]:
    """One pass measuring both proxies; returns the measured modules by ``error_feedback`` and seconds.
    With objective fisher each stage also takes the loss gradients (one forward and backward each)."""
    start = time.perf_counter()
    stages = {feedback: _baq(3.0, "module", feedback, objective=objective) for feedback in (True, False)}
    run_pass(run, list(stages.values()))  # the plans it writes are dropped with this context
    return {k: list(v.measured) for k, v in stages.items()}, round(time.perf_counter() - start, 1)


def _plan(run: ModelContext, setting: tuple[str, int | None, Allocation | None, bool],
          measured: dict[bool, list[Any]], objective: str) -> tuple[list[Any], float]:
    """Fill ``run.plans`` for one setting; returns BAQ's rows (empty for uniform) and the seconds taken."""
    _, _, allocation, split = setting
    start = time.perf_counter()
    rows: list[Any] = []
    if allocation:
        stage = _baq(*allocation, objective=objective)
        stage.measured = list(measured[allocation[2]])
        rows = stage.finalize(run)
    elif split:
        half = run.adapter.num_layers // 2
        run.plans["bits"] = {
            f"{run.adapter.layer_prefix(i)}.{name}": 3 if i < half else 2
            for i in range(run.adapter.num_layers) for name in run.adapter.linear_names()
        }
    return rows, round(time.perf_counter() - start, 2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="demo:smollm2")
    parser.add_argument("--samples", type=int, default=64)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--eval-tokens", type=int, default=16384)
    parser.add_argument("--settings", default=",".join(SETTINGS))
    parser.add_argument("--skip-dense", action="store_true", help="Do not evaluate the dense model.")
    parser.add_argument("--objective", default="fisher", help="BAQ objective: fisher, relative, channel or absolute.")
    parser.add_argument("--json", type=Path, default=None, help="Also write the result here.")
    args = parser.parse_args()
    loaded = load(args.model)
    dense = {k: v.clone() for k, v in loaded.model.state_dict().items()}
    tokens = calibration_batch(loaded.tokenizer, "demo:lee", args.samples, args.seq_len, seed=0)

    def ppl() -> float:
        return round(evaluate(loaded, "demo:wiki", seq_len=512, max_tokens=args.eval_tokens, device="cpu").ppl, 4)

    def context() -> ModelContext:
        return ModelContext(loaded.model, get_adapter(loaded.model), tokens, torch.device("cpu"), 8)

    rows: list[dict[str, Any]] = []
    if not args.skip_dense:
        rows.append({"setting": "dense", "ppl": ppl(), "seconds": 0.0})
        print(json.dumps(rows[-1]), flush=True)
    # "name@objective" runs a setting with another objective; fisher measured once serves them all
    wanted = [(n.partition("@")[0], n.partition("@")[2] or args.objective) for n in args.settings.split(",")]
    needs_fisher = any(objective == "fisher" for _, objective in wanted)
    measured, measure_seconds = _measure(context(), "fisher" if needs_fisher else args.objective)

    def result() -> dict[str, Any]:
        return {"model": args.model, "calibration": f"demo:lee {args.samples}x{args.seq_len}",
                "eval": f"demo:wiki {args.eval_tokens} tokens, windows of 512", "group_size": GROUP,
                "objective": args.objective,
                "baq_measure_seconds": measure_seconds, "threads": torch.get_num_threads(),
                "peak_rss_mb": round(peak_rss_bytes() / 2**20), "rows": rows}

    for name, objective in wanted:
        setting = SETTINGS[name]
        loaded.model.load_state_dict(dense)
        run = context()
        baq_rows, plan_seconds = _plan(run, setting, measured, objective)
        start = time.perf_counter()
        records = run_stages(run, [_quantizer(setting[0], setting[1] or 3)])
        bpw, bpw_meta = average_bits(run.quantized)
        predicted = {r.module: r.extra["predicted_rel_error"] for r in baq_rows}
        pairs = [(predicted[r.module], r.rel_error) for r in records if r.module in predicted and r.rel_error]
        by_width: dict[float, list[float]] = {}
        for r in records:
            if r.module in predicted and r.rel_error:
                by_width.setdefault(r.bits or 0.0, []).append(r.rel_error / predicted[r.module])
        rows.append({
            "setting": name if setting[2] is None else f"{name}@{objective}", "quantizer": setting[0],
            "ppl": ppl(), "bits_per_weight": bpw,
            "bits_incl_metadata": bpw_meta, "seconds": round(time.perf_counter() - start + plan_seconds, 1),
            "widths": _histogram(run),
            "predicted_over_measured_error": round(sum(p for p, _ in pairs) / sum(m for _, m in pairs), 3)
            if pairs else None,
            "measured_over_predicted_by_width": {w: round(sum(v) / len(v), 3) for w, v in sorted(by_width.items())},
        })
        print(json.dumps(rows[-1]), flush=True)
        if args.json:  # after every row, so an interrupted run keeps what it measured
            args.json.write_text(json.dumps(result(), indent=2) + "\n")
    print(json.dumps(result(), indent=2))
    print("\n| setting | ppl | bits/weight | incl. metadata | widths (share of weights) | seconds |")
    print("|---|---|---|---|---|---|")
    for row in rows:
        widths = ", ".join(f"{b}b {share:.0%}" for b, share in row.get("widths", {}).items())
        print(f"| {row['setting']} | {row['ppl']} | {row.get('bits_per_weight', 32)} | "
              f"{row.get('bits_incl_metadata', 32)} | {widths} | {row['seconds']} |")


def _histogram(run: ModelContext) -> dict[int, float]:
    """Share of the quantized weights stored at each width."""
    counts: dict[int, int] = {}
    for qweight in run.quantized.values():
        for bits, n in zip(*torch.unique(qweight.column_bits(), return_counts=True), strict=True):
            counts[int(bits)] = counts.get(int(bits), 0) + int(n) * qweight.shape[0]
    total = sum(counts.values())
    return {b: round(n / total, 4) for b, n in sorted(counts.items())}


if __name__ == "__main__":
    main()
