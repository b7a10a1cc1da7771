"""The report's method-specific Markdown sections: bit allocation, removal scores, experts, BitStack's curve.

Each is a rendering of the report's rows (or a stage's ``structure`` entry) and is empty when its method did not
run; :func:`compressor.report.to_markdown` appends them after the module table.
"""

from __future__ import annotations

from typing import Any

#: Rows of the BitStack size table in the Markdown (the JSON keeps every point of the curve).
BITSTACK_ROWS = 8


def allocation_markdown(layers: list[dict[str, Any]]) -> list[str]:
    """The bit allocation (rows whose ``extra`` has ``planned_bits``): planned bits, predicted vs measured.

    "Measured" is the relative output error of the quantizer's row for the same module; "predicted" is
    the planner's model of it. Empty when no stage planned bits.
    """
    planned = [r for r in layers if r["extra"].get("planned_bits") is not None]
    if not planned:
        return []
    measured = {r["module"]: r["rel_error"] for r in layers if r["rel_error"] is not None}
    params = sum(r["params_before"] for r in planned)
    average = sum(r["extra"]["planned_bits"] * r["params_before"] for r in planned) / max(params, 1)
    lines = ["", "## Bit allocation", "",
             f"Planned average: {average:.4f} bits per weight over {len(planned)} modules ({params} weights).", "",
             "| module | planned bits | predicted rel. error | measured rel. error |", "|---|---|---|---|"]
    for row in planned:
        predicted, real = row["extra"].get("predicted_rel_error"), measured.get(row["module"])
        lines.append(f"| {row['module']} | {row['extra']['planned_bits']:.3f} | "
                     f"{'' if predicted is None else f'{predicted:.4f}'} | {'' if real is None else f'{real:.4f}'} |")
    return lines

def scored_rows(layers: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Rows of layer-removal methods: ``extra`` carries a per-layer ``score`` (layer_drop, finercut), or only
    ``score_at_least`` where FinerCut's search ruled a candidate out on a lower bound without scoring it in full."""
    return [r for r in layers if "layer" in r["extra"] and score_or_bound(r["extra"]) is not None]


def score_or_bound(extra: dict[str, Any]) -> tuple[float, bool] | None:
    """(the row's score, True) or (its lower bound ``score_at_least``, False), or None when it has neither."""
    if extra.get("score") is not None:
        return float(extra["score"]), True
    if extra.get("score_at_least") is not None:
        return float(extra["score_at_least"]), False
    return None


def scores_markdown(layers: list[dict[str, Any]]) -> list[str]:
    """Removal scores per layer (or sublayer) and what was removed, in order; empty when nothing was scored."""
    rows = scored_rows(layers)
    if not rows:
        return []
    lines = ["", "## Removal scores", "", "| module | method | score | removed | order |", "|---|---|---|---|---|"]
    for row in rows:
        extra = row["extra"]
        order = extra.get("order") or extra.get("rank") or ""
        found = score_or_bound(extra)
        assert found is not None  # scored_rows keeps only rows with a score or a bound
        value, exact = found
        lines.append(f"| {row['module']} | {row['method']} | {'' if exact else '>= '}{value:.6g} | "
                     f"{'yes' if extra.get('removed') else ''} | {order} |")
    return lines


def experts_markdown(layers: list[dict[str, Any]]) -> list[str]:
    """Tokens the router sent each expert (in the pass that gathered its statistics; every expert was calibrated
    on every token), per mixture-of-experts module and method; empty for dense models."""
    counts: dict[tuple[str, str], dict[int, int]] = {}
    for row in layers:
        if "routed_tokens" in row["extra"]:  # <experts>.<index>.<projection>: one count per expert
            experts = row["module"].rsplit(".", 2)[0]
            counts.setdefault((experts, row["method"]), {}).setdefault(row["extra"]["expert"],
                                                                        row["extra"]["routed_tokens"])
    if not counts:
        return []
    lines = ["", "## Experts", "", "| experts | method | routed tokens per expert | never routed |",
             "|---|---|---|---|"]
    for (experts, method), routed in counts.items():
        never = ", ".join(str(e) for e in sorted(routed) if routed[e] == 0) or "-"
        lines.append(f"| {experts} | {method} | {' '.join(str(routed[e]) for e in sorted(routed))} | {never} |")
    return lines


def bitstack_markdown(structure: dict[str, Any], files: list[str]) -> list[str]:
    """BitStack's size-vs-error curve (``structure["bitstack"]``): what the run loaded and what other budgets cost.

    A few points of the curve, evenly along the order, and the loaded one; ``bitstack.png`` is named when it
    was written (``files``). Empty when no bitstack stage ran.
    """
    section = structure.get("bitstack")
    if not section or not section.get("curve"):
        return []
    curve, loaded = section["curve"], section["loaded"]
    budget = "no budget: every block" if section["budget"] is None else f"budget {section['budget']}"
    lines = ["", "## BitStack", "",
             f"{section['blocks']} blocks of {section['linears']} linears in one order ({section['order']}); "
             f"{budget}: {loaded['blocks']} blocks loaded, {loaded['bits']:.3f} bits per decomposed weight, "
             f"{loaded['bytes'] / 1e6:.3f} MB of weights. Other budgets (`compressor bitstack materialize DIR "
             "--budget ...`) and their calibration output error relative to no block, the order's estimate, "
             "not perplexity:", "",
             "| blocks | bits per weight | weights (MB) | rel. calibration error |", "|---|---|---|---|"]
    last = len(curve) - 1
    picked = {round(i * last / (BITSTACK_ROWS - 1)) for i in range(BITSTACK_ROWS)} if last else {0}
    rows = {curve[i]["blocks"]: curve[i] for i in picked} | {loaded["blocks"]: loaded}
    for blocks, point in sorted(rows.items()):
        mark = " (loaded)" if blocks == loaded["blocks"] else ""
        lines.append(f"| {blocks}{mark} | {point['bits']:.3f} | {point['bytes'] / 1e6:.3f} | "
                     f"{point['rel_error']:.4g} |")
    where = "`bitstack.png` plots the curve; " if "bitstack.png" in files else ""
    lines += ["", f"{where}`structure.bitstack.curve` in compression_report.json has {len(curve)} points of it."]
    return lines
