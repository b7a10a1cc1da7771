"""The compression report: JSON for CI, Markdown for people, PNG plots where a picture says it faster.

Everything here is a rendering of the engine's per-module records plus run-level totals; nothing is
measured here.
"""

from __future__ import annotations

import json
import logging
import platform
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import torch
from torch import nn

from compressor.methods.base import LayerRecord
from compressor.methods.quant.ops import QuantizedWeight

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
    warnings: list[str] = field(default_factory=list)
    files: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, default=str)

    def summary(self) -> dict[str, Any]:
        """The few numbers a person or a CI log wants first."""
        data = {
            "model": self.model,
            "recipe": self.recipe.get("name"),
            "format": self.export_format,
            "size_before_mb": round(self.size_bytes["before"] / 2**20, 2),
            "size_after_mb": round(self.size_bytes["after"] / 2**20, 2),
            "packed_estimate_mb": round(self.size_bytes.get("packed_estimate", 0) / 2**20, 2),
            "compression_ratio": round(self.compression_ratio, 3),
            "avg_bits_per_weight": self.avg_bits_per_weight,
            "params_before": self.params["before"],
            "params_after": self.params["after"],
            "seconds": round(sum(self.timings.values()), 1),
        }
        if self.eval:
            data.update(
                ppl_before=round(self.eval["before"]["ppl"], 4),
                ppl_after=round(self.eval["after"]["ppl"], 4),
                ppl_increase_pct=self.eval["increase_pct"],
            )
        return data


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


def average_bits(quantized: dict[str, QuantizedWeight]) -> tuple[float | None, float | None]:
    """Mean code bits per quantized weight, and the same including scales and zero points."""
    numel = sum(q.q.numel() for q in quantized.values())
    if not numel:
        return None, None
    codes = sum(q.code_bits() for q in quantized.values())
    total = sum(q.storage_bits() for q in quantized.values())
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
    for package in ("compressor", "torch", "transformers", "compressed-tensors", "gguf", "safetensors"):
        try:
            found[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            found[package] = "not installed"
    return found


def records_to_rows(records: list[LayerRecord]) -> list[dict[str, Any]]:
    return [r.to_dict() for r in records]


def to_markdown(report: Report) -> str:
    lines = [f"# Compression report: {report.recipe.get('name')}", ""]
    lines += ["| | value |", "|---|---|"]
    for key, value in report.summary().items():
        lines.append(f"| {key} | {value} |")
    if report.eval:
        lines += ["", "## Evaluation", "", "| model | ppl | tokens |", "|---|---|---|"]
        for which in ("before", "after"):
            if which in report.eval:
                result = report.eval[which]
                lines.append(f"| {which} | {result['ppl']:.4f} | {result['tokens']} |")
        if "increase_pct" in report.eval:
            lines.append(f"\nPerplexity change: {report.eval['increase_pct']:+.2f}% on {report.eval['source']}.")
    if report.quality_gate:
        gate = report.quality_gate
        lines += ["", f"**Quality gate {'passed' if gate['passed'] else 'FAILED'}:** {gate['message']}"]
    if report.warnings:
        lines += ["", "## Warnings", ""] + [f"- {w}" for w in report.warnings]
    lines += ["", "## Timings (s)", "", "| phase | seconds |", "|---|---|"]
    lines += [f"| {k} | {v:.2f} |" for k, v in report.timings.items()]
    lines += ["", f"Peak RSS: {report.peak_rss_bytes / 2**20:.0f} MiB. Seed: {report.seed}. "
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
    lines += ["", "Versions: " + ", ".join(f"{k} {v}" for k, v in report.versions.items()), ""]
    return "\n".join(lines)


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


def _fmt(value: Any) -> str:
    return "" if value is None else str(value)


def write_plots(report: Report, out_dir: Path) -> list[str]:
    """Bits and error per module, the bit allocation and removal scores when there are any; silently nothing
    without matplotlib (the 'plots' extra)."""
    return _plot_layers(report, out_dir) + plot_bit_allocation(report, out_dir) + plot_scores(report, out_dir)


def plot_bit_allocation(report: Report, out_dir: Path) -> list[str]:
    """``bit_allocation.png``: planned bits as a heatmap of layer x module, and predicted vs measured error.

    Drawn from rows whose ``extra`` carries ``planned_bits``, ``layer`` and ``name`` (BAQ's rows).
    """
    planned = [r for r in report.layers if r["extra"].get("planned_bits") is not None and "layer" in r["extra"]]
    if not planned:
        return []
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    names = list(dict.fromkeys(r["extra"]["name"] for r in planned))
    layers = sorted({r["extra"]["layer"] for r in planned})
    grid = torch.full((len(layers), len(names)), float("nan"))
    for r in planned:
        grid[layers.index(r["extra"]["layer"]), names.index(r["extra"]["name"])] = r["extra"]["planned_bits"]
    measured = {r["module"]: r["rel_error"] for r in report.layers if r["rel_error"] is not None}
    pairs = [(r["extra"].get("predicted_rel_error"), measured.get(r["module"])) for r in planned]
    pairs = [(p, m) for p, m in pairs if p and m]
    fig, axes = plt.subplots(1, 2, figsize=(12, max(4, 0.22 * len(layers) + 1.5)))
    image = axes[0].imshow(grid.numpy(), aspect="auto", cmap="viridis", interpolation="nearest")
    axes[0].set_xticks(range(len(names)), names, rotation=45, ha="right", fontsize=7)
    axes[0].set_yticks(range(len(layers)), [str(i) for i in layers], fontsize=7)
    axes[0].set_ylabel("layer")
    axes[0].set_title("planned bits per weight")
    fig.colorbar(image, ax=axes[0])
    if pairs:
        axes[1].loglog([p for p, _ in pairs], [m for _, m in pairs], ".", alpha=0.6)
        low, high = min(min(pair) for pair in pairs), max(max(pair) for pair in pairs)
        axes[1].plot([low, high], [low, high], "k--", linewidth=0.8)
    axes[1].set_xlabel("predicted relative output error")
    axes[1].set_ylabel("measured relative output error")
    axes[1].set_title("allocation model vs quantizer")
    fig.suptitle(f"{report.recipe.get('name')}: bit allocation")
    fig.tight_layout()
    fig.savefig(out_dir / "bit_allocation.png", dpi=90)
    plt.close(fig)
    return ["bit_allocation.png"]


def _plot_layers(report: Report, out_dir: Path) -> list[str]:
    rows = [r for r in report.layers if r["rel_error"] is not None]
    if not rows:
        return []
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.info("matplotlib not installed: no plots (pip install 'compressor[plots]')")
        return []
    fig, axes = plt.subplots(2, 1, figsize=(12, 6), sharex=True)
    x = range(len(rows))
    axes[0].bar(x, [r["bits"] or 0 for r in rows])
    axes[0].set_ylabel("bits")
    axes[1].plot(x, [r["rel_error"] for r in rows], marker=".")
    axes[1].set_ylabel("relative output error")
    axes[1].set_xlabel("module (data-flow order)")
    fig.suptitle(f"{report.recipe.get('name')}: per-module bits and error")
    fig.tight_layout()
    fig.savefig(out_dir / "layers.png", dpi=90)
    plt.close(fig)
    return ["layers.png"]


def _scored(layers: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Rows of layer-removal methods: ``extra`` carries a per-layer ``score`` (layer_drop, finercut)."""
    return [r for r in layers if r["extra"].get("score") is not None and "layer" in r["extra"]]


def scores_markdown(layers: list[dict[str, Any]]) -> list[str]:
    """Removal scores per layer (or sublayer) and what was removed, in order; empty when nothing was scored."""
    rows = _scored(layers)
    if not rows:
        return []
    lines = ["", "## Removal scores", "", "| module | method | score | removed | order |", "|---|---|---|---|---|"]
    for row in rows:
        extra = row["extra"]
        order = extra.get("order") or extra.get("rank") or ""
        lines.append(f"| {row['module']} | {row['method']} | {extra['score']:.6g} | "
                     f"{'yes' if extra.get('removed') else ''} | {order} |")
    return lines


def plot_scores(report: Report, out_dir: Path) -> list[str]:
    """``scores.png``: each method's per-layer removal scores (one line per sublayer kind), removed ones marked."""
    rows = _scored(report.layers)
    if not rows:
        return []
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    methods = list(dict.fromkeys(r["method"] for r in rows))
    fig, axes = plt.subplots(len(methods), 1, figsize=(12, 3.5 * len(methods)), squeeze=False)
    for ax, method in zip(axes[:, 0], methods, strict=True):
        mine = [r for r in rows if r["method"] == method]
        for series in dict.fromkeys(r["extra"].get("sublayer", "layer") for r in mine):
            part = [r for r in mine if r["extra"].get("sublayer", "layer") == series]
            ax.plot([r["extra"]["layer"] for r in part], [r["extra"]["score"] for r in part], marker=".", label=series)
            gone = [r for r in part if r["extra"].get("removed")]
            ax.plot([r["extra"]["layer"] for r in gone], [r["extra"]["score"] for r in gone], "rx", markersize=9)
        scores = [r["extra"]["score"] for r in mine]
        if min(scores) > 0 and max(scores) / min(scores) > 100:
            ax.set_yscale("log")
        metric = mine[0]["extra"].get("metric") or mine[0]["extra"].get("measure") or "score"
        ax.set_ylabel(str(metric))
        ax.set_title(f"{method}: per-layer scores (x = removed)")
        ax.legend(fontsize=8)
    axes[-1, 0].set_xlabel("layer")
    fig.tight_layout()
    fig.savefig(out_dir / "scores.png", dpi=90)
    plt.close(fig)
    return ["scores.png"]


def write_report(report: Report, out_dir: Path) -> None:
    (out_dir / "compression_report.json").write_text(report.to_json() + "\n")
    (out_dir / "compression_report.md").write_text(to_markdown(report))

