"""The compression report: JSON for CI, Markdown for people, PNG plots where a picture says it faster.

The method-specific Markdown sections (bit allocation, removal scores, experts, BitStack) live in
``report_sections.py``.

Everything here is a rendering of the engine's per-module records plus run-level totals; nothing is
measured here.
"""

from __future__ import annotations

import json
import logging
import platform
import re
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import torch
from torch import nn

from compressor.methods.base import LayerRecord
from compressor.methods.quant.ops import QuantizedWeight
from compressor.report_sections import allocation_markdown, bitstack_markdown, experts_markdown, scores_markdown

log = logging.getLogger(__name__)


@dataclass
class Report:
    model: str
    recipe: dict[str, Any]
    recipe_hash: str
    seed: int
    export_format: str
    size_bytes: dict[str, int]
    params: dict[str, int]
    avg_bits_per_weight: float | None
    avg_bits_incl_metadata: float | None
    compression_ratio: float
    layers: list[dict[str, Any]]
    timings: dict[str, float]
    peak_rss_bytes: int
    versions: dict[str, str]
    calibration: dict[str, Any]
    eval: dict[str, Any] | None = None
    quality_gate: dict[str, Any] | None = None
    structure: dict[str, Any] = field(default_factory=dict)
    #: One entry per distinct note: ``{message, count, pattern, modules}`` (see :func:`group_warnings`).
    warnings: list[dict[str, Any]] = field(default_factory=list)
    files: list[str] = field(default_factory=list)
    #: The dtype the model was loaded, compressed and exported in (``--dtype auto`` keeps the checkpoint's).
    dtype: str = ""

    @staticmethod
    def grouped_warnings(records: Iterable[LayerRecord]) -> list[dict[str, Any]]:
        """The records' notes grouped by message (:func:`group_warnings`), for the constructor's ``warnings``."""
        return group_warnings(records)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, default=str)

    def summary(self) -> dict[str, str]:
        """What a person asks first, formatted for reading; ``to_dict`` keeps the numbers for machines."""
        before, after = self.size_bytes["before"], self.size_bytes["after"]
        bits = "not quantized" if self.avg_bits_per_weight is None else f"{self.avg_bits_per_weight:.2f}"
        if self.avg_bits_incl_metadata is not None:
            bits += f" ({self.avg_bits_incl_metadata:.2f} with scales)"
        rows = {"bits per weight": bits,
                "size on disk": f"{format_bytes(before)} -> {format_bytes(after)}{_ratio_text(before, after)}"}
        if self.eval:
            ppl_before, ppl_after = self.eval["before"]["ppl"], self.eval["after"]["ppl"]
            rows["perplexity"] = f"{ppl_before:.2f} -> {ppl_after:.2f} ({self.eval['increase_pct']:+.2f}%)"
        rows["time"] = format_duration(sum(self.timings.values()))
        params_before, params_after = self.params["before"], self.params["after"]
        rows["parameters"] = format_count(params_before) + (
            f" -> {format_count(params_after)}" if params_after != params_before else "")
        rows |= {"model": self.model, "recipe": str(self.recipe.get("name")), "format": self.export_format}
        if self.dtype:
            rows["dtype"] = self.dtype
        return rows


def _ratio_text(before: int, after: int) -> str:
    if not before or not after:
        return ""
    return f" ({before / after:.2f}x smaller)" if after <= before else f" ({after / before:.2f}x larger)"


#: A value that would print as 1000.0 of one unit is shown as 1.0 of the next.
_ROUND_UP = 1 - 5e-5


def format_count(count: int) -> str:
    """134_515_008 -> ``134.5M``: thousands (K), millions (M), billions (B) with one decimal."""
    for scale, unit in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if abs(count) >= scale * _ROUND_UP:
            return f"{count / scale:.1f}{unit}"
    return str(count)


def format_bytes(size: int) -> str:
    """538_060_032 -> ``538.1 MB``: decimal units (1 MB = 10^6 bytes, as model hubs count), GB to 2 decimals."""
    for scale, unit, digits in ((1e9, "GB", 2), (1e6, "MB", 1), (1e3, "kB", 1)):
        if size >= scale * _ROUND_UP:
            return f"{size / scale:.{digits}f} {unit}"
    return f"{size} B"


def format_duration(seconds: float) -> str:
    """112 -> ``1 m 52 s``; under a minute one decimal (``4.2 s``); from an hour on ``1 h 5 m``."""
    if seconds < 59.95:
        return f"{seconds:.1f} s"
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes} m" if hours else f"{minutes} m {secs} s"


def unique_parameters(model: nn.Module) -> dict[str, torch.Tensor]:
    """Parameters and buffers by name, tied tensors counted once (the first name wins)."""
    seen: set[int] = set()
    tensors: dict[str, torch.Tensor] = {}
    for name, tensor in list(model.named_parameters()):
        if id(tensor) in seen:
            continue
        seen.add(id(tensor))
        tensors[name] = tensor
    return tensors


def model_size(model: nn.Module, quantized: dict[str, QuantizedWeight] | None = None) -> tuple[int, int]:
    """(parameters, bytes) with quantized weights counted at their stored size incl. scales."""
    quantized = quantized or {}
    params, size = 0, 0
    for name, tensor in unique_parameters(model).items():
        params += tensor.numel()
        qweight = quantized.get(name.removesuffix(".weight")) if name.endswith(".weight") else None
        size += (qweight.storage_bits() + 7) // 8 if qweight else tensor.numel() * tensor.element_size()
    return params, size


def average_bits(
    quantized: dict[str, QuantizedWeight], stored: Iterable[LayerRecord] = ()
) -> tuple[float | None, float | None]:
    """Mean code bits per quantized weight, and the same including scales and zero points.

    ``stored``: report rows of weights a quantizing stage stores without integer codes (BitStack's sign x
    low-rank blocks); their ``bytes_after`` already counts everything stored, so they add it to both means.
    """
    rows = [r for r in stored if r.module not in quantized]
    numel = sum(q.q.numel() for q in quantized.values()) + sum(r.params_after for r in rows)
    if not numel:
        return None, None
    codes = sum(q.code_bits() for q in quantized.values()) + sum(8 * r.bytes_after for r in rows)
    total = sum(q.storage_bits() for q in quantized.values()) + sum(8 * r.bytes_after for r in rows)
    return round(codes / numel, 4), round(total / numel, 4)


def peak_rss_bytes() -> int:
    try:
        import resource

        return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024
    except ImportError:  # pragma: no cover - not Unix
        import psutil

        return int(psutil.Process().memory_info().rss)


def versions() -> dict[str, str]:
    found = {"python": platform.python_version()}
    for package in ("compressor", "torch", "transformers", "compressed-tensors", "gguf", "safetensors", "bitsandbytes"):
        try:
            found[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            found[package] = "not installed"
    return found


def records_to_rows(records: list[LayerRecord]) -> list[dict[str, Any]]:
    return [r.to_dict() for r in records]


_IN_LAYER = re.compile(r"^(?P<head>.*?)\.(?P<index>\d+)(?:\.(?P<tail>.+))?$")


def split_layer_path(path: str) -> tuple[str, int, str] | None:
    """``model.layers.12.mlp.up_proj`` -> ``("model.layers", 12, "mlp.up_proj")``: split at the first
    numbered segment (the layer index); None for a path without one (``lm_head``)."""
    match = _IN_LAYER.match(path)
    return None if match is None else (match["head"], int(match["index"]), match["tail"] or "")


def natural_key(text: str) -> tuple[Any, ...]:
    """Sort key that orders numbers by value: ``layers.2`` before ``layers.10``."""
    return tuple(int(part) if part.isdigit() else part for part in re.split(r"(\d+)", text))


def group_warnings(records: Iterable[LayerRecord]) -> list[dict[str, Any]]:
    """One entry per distinct note, most frequent first.

    Each entry is ``{message, count, pattern, modules}``: the modules sorted by layer number and the
    compact ``pattern`` of :func:`module_pattern`, so 180 identical group-size notes are one line. A note
    is kept whole: notes themselves contain ``"; "``, so the several a record may join cannot be told apart.
    """
    found: dict[str, list[str]] = {}
    for record in records:
        if record.note:
            found.setdefault(record.note, []).append(record.module)
    groups = []
    for message, modules in found.items():
        in_order = list(dict.fromkeys(modules))
        groups.append({"message": message, "count": len(in_order), "pattern": module_pattern(in_order),
                       "modules": sorted(in_order, key=natural_key)})
    return sorted(groups, key=lambda g: (-g["count"], natural_key(g["message"])))


def module_pattern(modules: list[str], limit: int = 4) -> str:
    """Module paths folded into brace patterns, e.g. ``model.layers.{0..29}.self_attn.{q,k,v,o}_proj``.

    Modules sharing a parent and the same set of layers fold together; names keep the given (data-flow)
    order. More than ``limit`` patterns end in ``... +N more``.
    """
    by_tail: dict[tuple[str, str], list[int]] = {}
    parts: list[str] = []
    for path in dict.fromkeys(modules):
        where = split_layer_path(path)
        if where is None:
            parts.append(path)
        else:
            by_tail.setdefault((where[0], where[2]), []).append(where[1])
    folded: dict[tuple[str, str, str], list[str]] = {}
    for (head, tail), indices in by_tail.items():
        parent, _, leaf = tail.rpartition(".")
        folded.setdefault((head, _index_set(indices), parent), []).append(leaf)
    parts = [".".join(p for p in (head, index, parent, _braces(leaves)) if p)
             for (head, index, parent), leaves in folded.items()] + parts
    more = f", ... +{len(parts) - limit} more" if len(parts) > limit else ""
    return ", ".join(parts[:limit]) + more


def _index_set(indices: list[int]) -> str:
    """``[0, 1, 2, 3, 7]`` -> ``{0..3,7}``; one index stays bare."""
    values = sorted(set(indices))
    if len(values) == 1:
        return str(values[0])
    runs: list[list[int]] = []
    for value in values:
        if runs and value == runs[-1][-1] + 1:
            runs[-1].append(value)
        else:
            runs.append([value])
    text = [f"{r[0]}..{r[-1]}" if len(r) > 2 else ",".join(map(str, r)) for r in runs]
    return "{" + ",".join(text) + "}"


def _braces(names: list[str]) -> str:
    """``[q_proj, k_proj]`` -> ``{q,k}_proj``: the common prefix and suffix outside the braces."""
    if len(names) == 1:
        return names[0]
    shortest = min(len(n) for n in names)
    prefix = 0
    while prefix < shortest and len({n[prefix] for n in names}) == 1:
        prefix += 1
    suffix = 0
    while suffix < shortest - prefix and len({n[len(n) - 1 - suffix] for n in names}) == 1:
        suffix += 1
    middles = [n[prefix:len(n) - suffix] for n in names]
    return names[0][:prefix] + "{" + ",".join(middles) + "}" + names[0][len(names[0]) - suffix:]


def warning_lines(groups: list[dict[str, Any]]) -> list[str]:
    """One line per warning group: ``module: message`` when alone, else ``message (N modules: pattern)``."""
    return [f"{g['modules'][0]}: {g['message']}" if g["count"] == 1 else
            f"{g['message']} ({g['count']} modules: {g['pattern']})" for g in groups]


def to_markdown(report: Report) -> str:
    """The report for people: the summary first, then warnings (grouped), evaluation, timings, modules."""
    lines = [f"# Compression report: {report.recipe.get('name')}", "", "| | |", "|---|---|"]
    lines += [f"| {key} | {value} |" for key, value in report.summary().items()]
    if report.quality_gate:
        gate = report.quality_gate
        lines += ["", f"**Quality gate {'passed' if gate['passed'] else 'FAILED'}:** {gate['message']}"]
    if report.warnings:
        lines += ["", "## Warnings", ""] + [f"- {line}" for line in warning_lines(report.warnings)]
        lines += ["", "Every module of each warning is listed in compression_report.json (`warnings`)."]
    if report.eval:
        lines += ["", "## Evaluation", "", "| model | ppl | tokens |", "|---|---|---|"]
        for which in ("before", "after"):
            if which in report.eval:
                result = report.eval[which]
                lines.append(f"| {which} | {result['ppl']:.4f} | {result['tokens']} |")
        if "increase_pct" in report.eval:
            lines.append(f"\nPerplexity change: {report.eval['increase_pct']:+.2f}% on {report.eval['source']}.")
    lines += ["", "## Timings", "", "| phase | time |", "|---|---|"]
    lines += [f"| {k} | {format_duration(v)} |" for k, v in report.timings.items()]
    lines += ["", f"Peak RSS: {format_bytes(report.peak_rss_bytes)}. Seed: {report.seed}. "
              f"Recipe hash: {report.recipe_hash}.", ""]
    lines += ["## Modules", "", "| module | method | bits | group | kept | rel. error | s | note |",
              "|---|---|---|---|---|---|---|---|"]
    for row in report.layers:
        err = f"{row['rel_error']:.4f}" if row["rel_error"] is not None else ""
        lines.append(
            f"| {row['module']} | {row['method']} | {_fmt(row['bits'])} | {_fmt(row['group_size'])} | "
            f"{_fmt(row['kept_fraction'])} | {err} | {row['seconds']:.2f} | {row['note']} |"
        )
    lines += allocation_markdown(report.layers)
    lines += scores_markdown(report.layers)
    lines += experts_markdown(report.layers)
    lines += bitstack_markdown(report.structure, report.files)
    lines += ["", "Versions: " + ", ".join(f"{k} {v}" for k, v in report.versions.items()), ""]
    return "\n".join(lines)


def _fmt(value: Any) -> str:
    return "" if value is None else str(value)


def write_plots(report: Report, out_dir: Path) -> list[str]:
    """The PNG plots (``compressor/plots.py``, imported only here so matplotlib stays an optional extra)."""
    from compressor.plots import write_plots as draw

    return draw(report, out_dir)


def write_report(report: Report, out_dir: Path) -> None:
    (out_dir / "compression_report.json").write_text(report.to_json() + "\n")
    (out_dir / "compression_report.md").write_text(to_markdown(report))

