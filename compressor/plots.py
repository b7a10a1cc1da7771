"""PNG plots of a compression report: the layer x module-type heatmap, the bit allocation, removal scores, and
BitStack's size-vs-error curve.

matplotlib is the optional 'plots' extra: it is imported only inside the drawing functions, and without it
no plot is written (the report says the same in JSON and Markdown). The grid that a heatmap draws is built
by :func:`layer_grid`, a pure function of the report rows, so its shape is testable without pixels.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from compressor.report import split_layer_path
from compressor.report_sections import score_or_bound, scored_rows

if TYPE_CHECKING:
    from compressor.report import Report

log = logging.getLogger(__name__)

#: At most this many layer labels on a heatmap's y axis; deeper models get every Nth layer labelled.
MAX_LAYER_LABELS = 20


@dataclass(frozen=True)
class LayerGrid:
    """One value per (decoder layer, module type); ``None`` where a layer has no such module (skipped).

    ``values[i][j]`` belongs to layer ``layers[i]`` and module type ``columns[j]`` (the module's path below
    its layer, e.g. ``self_attn.q_proj``); ``labels`` are the short column names drawn on the x axis.
    """

    layers: list[int]
    columns: list[str]
    labels: list[str]
    values: list[list[float | None]]


def layer_grid(rows: list[dict[str, Any]], key: str) -> LayerGrid | None:
    """The heatmap data for report rows' ``key`` (``rel_error`` or ``bits``): layers down, module types across.

    Columns keep the modules' data-flow order (the order rows arrive in); a module recorded twice (a
    pruning stage, then a quantizer) shows its last value. None when no row inside a layer carries ``key``.
    """
    cells: dict[tuple[int, str], float] = {}
    for row in rows:
        where = split_layer_path(row["module"])
        if where is None or row.get(key) is None or not where[2]:
            continue
        cells[(where[1], where[2])] = float(row[key])
    if not cells:
        return None
    layers = sorted({layer for layer, _ in cells})
    columns = list(dict.fromkeys(column for _, column in cells))
    leaves = [column.rpartition(".")[2] for column in columns]
    labels = leaves if len(set(leaves)) == len(leaves) else columns
    values = [[cells.get((layer, column)) for column in columns] for layer in layers]
    return LayerGrid(layers, columns, labels, values)


def layer_label_step(n_layers: int) -> int:
    """Label every Nth layer so at most :data:`MAX_LAYER_LABELS` labels show (1, 2, 5, 10, 20, ...)."""
    for step in (1, 2, 4, 5, 10, 20, 50, 100):
        if math.ceil(n_layers / step) <= MAX_LAYER_LABELS:
            return step
    return math.ceil(n_layers / MAX_LAYER_LABELS)


def _pyplot() -> Any:
    """matplotlib.pyplot on the file-only Agg backend, or None without the 'plots' extra."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def write_plots(report: Report, out_dir: Path) -> list[str]:
    """The heatmap, the bit allocation, removal scores and BitStack's curve when there are any; nothing without
    matplotlib."""
    if _pyplot() is None:
        log.info("matplotlib not installed: no plots (pip install 'compressor[plots]')")
        return []
    return (plot_layer_heatmap(report, out_dir) + plot_bit_allocation(report, out_dir)
            + plot_scores(report, out_dir) + plot_bitstack(report, out_dir))


def plot_layer_heatmap(report: Report, out_dir: Path) -> list[str]:
    """``layers.png``: relative output error per layer x module type, plus bits when they vary by module."""
    errors = layer_grid(report.layers, "rel_error")
    if errors is None:
        return []
    panels = [(errors, "relative output error", True)]
    bits = layer_grid(report.layers, "bits")
    if bits is not None and len({v for row in bits.values for v in row if v is not None}) > 1:
        panels.append((bits, "bits per weight", False))
    plt = _pyplot()
    height = min(16.0, max(3.5, 0.16 * len(errors.layers) + 2.2))
    width = sum(max(4.0, 0.7 * len(grid.columns) + 2.5) for grid, _, _ in panels)
    fig, axes = plt.subplots(1, len(panels), figsize=(width, height), squeeze=False)
    for ax, (grid, title, log_scale) in zip(axes[0], panels, strict=True):
        _draw_grid(fig, ax, grid, title, log_scale)
    fig.suptitle(f"{report.recipe.get('name')}: per-module {' and '.join(t for _, t, _ in panels)}")
    fig.tight_layout()
    fig.savefig(out_dir / "layers.png", dpi=90)
    plt.close(fig)
    return ["layers.png"]


def _draw_grid(fig: Any, ax: Any, grid: LayerGrid, title: str, log_scale: bool) -> None:
    """One heatmap panel: empty cells grey, values written in the cells when the grid is small."""
    import matplotlib
    import matplotlib.colors as colors
    import numpy as np

    data = np.array([[np.nan if v is None else v for v in row] for row in grid.values], dtype=float)
    positive = data[np.isfinite(data) & (data > 0)]
    levels = np.unique(data[np.isfinite(data)])
    cmap = matplotlib.colormaps["magma" if log_scale else "viridis"]
    norm: Any = None
    if log_scale and positive.size and positive.max() > positive.min():
        norm = colors.LogNorm(vmin=positive.min(), vmax=positive.max())
        data = np.where(data > 0, data, np.nan)
    elif not log_scale and 1 < len(levels) <= 8:  # a few widths: one colour each, a tick per width
        cmap = cmap.resampled(len(levels))
        norm = colors.BoundaryNorm(np.concatenate([[levels[0] - 0.5], (levels[:-1] + levels[1:]) / 2,
                                                   [levels[-1] + 0.5]]), len(levels))
    image = ax.imshow(data, aspect="auto", cmap=cmap.with_extremes(bad="lightgrey"), norm=norm,
                      interpolation="nearest")
    ax.set_xticks(range(len(grid.labels)), grid.labels, rotation=45, ha="right", fontsize=8)
    step = layer_label_step(len(grid.layers))
    ticks = [i for i, layer in enumerate(grid.layers) if layer % step == 0]
    ax.set_yticks(ticks, [str(grid.layers[i]) for i in ticks], fontsize=8)
    ax.set_ylabel("decoder layer")
    ax.set_title(title)
    ax.set_xlabel("module (grey: not recorded)")
    fig.colorbar(image, ax=ax, fraction=0.06, ticks=levels if isinstance(norm, colors.BoundaryNorm) else None)
    if len(grid.layers) * len(grid.columns) <= 96:
        for (i, j), value in np.ndenumerate(data):
            if np.isfinite(value):
                shade = "black" if float(image.norm(value)) > 0.6 else "white"
                ax.text(j, i, f"{value:.3g}", ha="center", va="center", fontsize=7, color=shade)


def plot_bit_allocation(report: Report, out_dir: Path) -> list[str]:
    """``bit_allocation.png``: planned bits as a heatmap of layer x module, and predicted vs measured error.

    Drawn from rows whose ``extra`` carries ``planned_bits``, ``layer`` and ``name`` (BAQ's rows).
    """
    planned = [r for r in report.layers if r["extra"].get("planned_bits") is not None and "layer" in r["extra"]]
    plt = _pyplot() if planned else None
    if plt is None:
        return []
    import numpy as np

    names = list(dict.fromkeys(r["extra"]["name"] for r in planned))
    layers = sorted({r["extra"]["layer"] for r in planned})
    grid = np.full((len(layers), len(names)), np.nan)
    for r in planned:
        grid[layers.index(r["extra"]["layer"]), names.index(r["extra"]["name"])] = r["extra"]["planned_bits"]
    measured = {r["module"]: r["rel_error"] for r in report.layers if r["rel_error"] is not None}
    pairs = [(r["extra"].get("predicted_rel_error"), measured.get(r["module"])) for r in planned]
    pairs = [(p, m) for p, m in pairs if p and m]
    fig, axes = plt.subplots(1, 2, figsize=(12, max(4, 0.22 * len(layers) + 1.5)))
    image = axes[0].imshow(grid, aspect="auto", cmap="viridis", interpolation="nearest")
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


def plot_scores(report: Report, out_dir: Path) -> list[str]:
    """``scores.png``: each method's per-layer removal scores (one line per sublayer kind), removed ones marked."""
    rows = scored_rows(report.layers)
    plt = _pyplot() if rows else None
    if plt is None:
        return []
    methods = list(dict.fromkeys(r["method"] for r in rows))
    fig, axes = plt.subplots(len(methods), 1, figsize=(12, 3.5 * len(methods)), squeeze=False)
    for ax, method in zip(axes[:, 0], methods, strict=True):
        mine = [r for r in rows if r["method"] == method]
        for series in dict.fromkeys(r["extra"].get("sublayer", "layer") for r in mine):
            part = [r for r in mine if r["extra"].get("sublayer", "layer") == series]
            exact = [r for r in part if r["extra"].get("score") is not None]
            ax.plot([r["extra"]["layer"] for r in exact], [r["extra"]["score"] for r in exact], marker=".",
                    label=series)
            bounds = [r for r in part if r["extra"].get("score") is None]  # ruled out on a lower bound
            if bounds:
                ax.plot([r["extra"]["layer"] for r in bounds], [r["extra"]["score_at_least"] for r in bounds], "^",
                        color="gray", markersize=5, label=f"{series} (at least)")
            gone = [r for r in exact if r["extra"].get("removed")]
            ax.plot([r["extra"]["layer"] for r in gone], [r["extra"]["score"] for r in gone], "rx", markersize=9)
        scores = [found[0] for r in mine if (found := score_or_bound(r["extra"])) is not None]
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


def plot_bitstack(report: Report, out_dir: Path) -> list[str]:
    """``bitstack.png``: relative calibration output error against bits per weight along BitStack's block order
    (``structure.bitstack``, see the stage's ``_curve_section``), log y, the run's budget marked.

    The y axis is the order's own estimate (summed ``tr(dW H dW^T)`` of the decomposed linears), not
    perplexity: it shows where the size steps are cheap or dear, which a user choosing a budget later wants.
    """
    section: dict[str, Any] = report.structure.get("bitstack") or {}
    plt = _pyplot() if section.get("curve") else None
    if plt is None:
        return []
    points = [p for p in section["curve"] if p["rel_error"] > 0]  # a log axis has no place for an exact 0
    loaded = section["loaded"]
    params, fixed = section["params"], section["fixed_bytes"]
    fig, ax = plt.subplots(figsize=(8, 5))
    ax.plot([p["bits"] for p in points], [p["rel_error"] for p in points], "-", marker=".", markersize=3,
            label=f"prefixes of the order ({section['blocks']} blocks, {section['linears']} linears)")
    if loaded["rel_error"] > 0:
        budget = "every block" if section["budget"] is None else f"budget {section['budget']}"
        ax.plot([loaded["bits"]], [loaded["rel_error"]], "ro", markersize=8,
                label=f"{budget}: {loaded['bits']:.3f} bpw, {loaded['bytes'] / 1e6:.3f} MB, "
                      f"rel. error {loaded['rel_error']:.4g}")
    ax.set_yscale("log")
    ax.set_xlabel("bits per decomposed weight (signs, factors and scales counted)")
    ax.set_ylabel("calibration output error / error with no block")
    if params:  # the same prefixes as whole-model weight bytes, what a byte budget counts
        top = ax.secondary_xaxis("top", functions=(lambda bits: (bits * params / 8 + fixed) / 1e6,
                                                   lambda mb: (mb * 1e6 - fixed) * 8 / params))
        top.set_xlabel("model weights (MB)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(f"{report.recipe.get('name')}: BitStack's calibration-error estimate of its order (not perplexity)",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(out_dir / "bitstack.png", dpi=90)
    plt.close(fig)
    return ["bitstack.png"]
