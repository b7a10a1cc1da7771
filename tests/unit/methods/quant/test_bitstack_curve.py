"""BitStack's size-vs-error curve in the report: what each prefix of the global order costs, and bitstack.png."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from tiny import tiny_model

from compressor.engine import ModelContext, run_stages
from compressor.methods.base import LayerRecord
from compressor.methods.quant.bitstack import BitStack, BitStackConfig
from compressor.methods.quant.bitstack.order import (
    Chain,
    CurvePoint,
    blocks_for_budget,
    error_curve,
    global_order,
    parse_budget,
    thin_curve,
)
from compressor.models import get_adapter
from compressor.pipeline import compress, load
from compressor.plots import write_plots
from compressor.recipe import build_stages, recipe_from_dict
from compressor.report import Report, to_markdown


def _run(**settings: object) -> tuple[BitStack, list[LayerRecord], dict[str, Any], int]:
    """The stage on the tiny Llama: the stage, its rows, ``structure["bitstack"]`` and the fixed weights' bytes."""
    model = tiny_model("llama")
    linear = sum(m.weight.numel() * 4 for p, m in model.named_modules()
                 if isinstance(m, torch.nn.Linear) and p != "lm_head")  # fp32; the tied head is the embedding
    fixed = sum(p.numel() * p.element_size() for p in model.parameters()) - linear
    tokens = torch.randint(0, 300, (4, 32), generator=torch.Generator().manual_seed(0))
    run = ModelContext(model, get_adapter(model), tokens, torch.device("cpu"), batch_size=2)
    stages = build_stages([BitStackConfig.model_validate({"method": "bitstack", "iterations": 4, "rank": 2,
                                                          **settings})])
    records = run_stages(run, stages)
    stage = stages[0]
    assert isinstance(stage, BitStack)
    return stage, records, run.structure["bitstack"], fixed


def _summed(stage: BitStack, counts: dict[str, int]) -> float:
    """Summed calibration output error (loss-weighted for order fisher, the default) at ``counts`` blocks per
    linear over the summed error with none."""
    items, order = stage.decomposed, stage.config.order  # type: ignore[attr-defined]
    errors = {p: item.order_errors(order) for p, item in items.items()}
    return sum(errors[p][counts[p]] for p in items) / sum(e[0] for e in errors.values())


@pytest.mark.parametrize("budget", [None, "4bpw", "6bpw"])
def test_the_curve_falls_with_size_ends_at_every_block_and_marks_what_the_stage_loaded(budget: str | None) -> None:
    stage, records, section, fixed = _run(budget=budget)
    curve, loaded = section["curve"], section["loaded"]
    params = sum(r.params_after for r in records)
    linears, blocks = len(stage.decomposed), sum(len(d.errors) - 1 for d in stage.decomposed.values())
    assert (section["linears"], section["blocks"], section["params"], section["fixed_bytes"]) == (
        linears, blocks, params, fixed)
    assert len(curve) == blocks - linears + 1, "every loadable prefix is a point (fewer than 200 here)"
    bits, errors = [p["bits"] for p in curve], [p["rel_error"] for p in curve]
    assert all(a < b for a, b in zip(bits, bits[1:], strict=False)), "bits rise along the order"
    assert all(b <= a for a, b in zip(errors, errors[1:], strict=False)), "error never rises along the order"
    first, last = curve[0], curve[-1]
    assert first["blocks"] == linears and first["rel_error"] == pytest.approx(_summed(stage, dict.fromkeys(
        stage.decomposed, 1)), rel=1e-5)
    every = {p: len(d.errors) - 1 for p, d in stage.decomposed.items()}
    everything = sum(sum(d.decomposition.block_bytes()) for d in stage.decomposed.values())
    assert last["blocks"] == blocks and last["bytes"] == fixed + everything
    assert last["bits"] == pytest.approx(everything * 8 / params, rel=1e-5)  # stored to 6 significant digits
    assert last["rel_error"] == pytest.approx(_summed(stage, every), rel=1e-5)
    # the loaded point is what the stage wrote: its rows' bytes, their bits, their blocks' summed error
    stored = sum(r.bytes_after for r in records)
    assert loaded["blocks"] == sum(stage.blocks.values()) and loaded["bytes"] == fixed + stored
    assert loaded["bits"] == pytest.approx(stored * 8 / params, rel=1e-5)  # stored to 6 significant digits
    assert loaded["rel_error"] == pytest.approx(_summed(stage, stage.blocks), rel=1e-5)
    assert loaded in curve
    if budget is None:
        assert loaded == last
    else:
        assert first["bits"] < loaded["bits"] <= float(budget.removesuffix("bpw")) < last["bits"]


def test_each_points_bytes_as_a_budget_load_exactly_that_prefix() -> None:
    """What the table and plot promise a user: ``--budget <bytes of a point>`` loads that point's blocks."""
    stage, _, section, fixed = _run(budget="5bpw")
    chains = [item.chain(path, stage.config.order) for path, item in stage.decomposed.items()]  # type: ignore[attr-defined]
    order = global_order(chains)
    for point in section["curve"]:
        counts = blocks_for_budget(chains, order, parse_budget(point["bytes"]), fixed)
        assert sum(counts.values()) == point["blocks"]


def _prefix_reference(chains: list[Chain], errors: dict[str, list[float]], order: list[tuple[str, int]]
                      ) -> list[tuple[int, int, float]]:
    """Slow: for every prefix length, count each linear's blocks in it and add up bytes and errors afresh."""
    sizes = {c.path: c.sizes for c in chains}
    base = sum(errors[p][0] for p in sizes)
    points = []
    for n in range(len(sizes), len(order) + 1):
        counts = {p: sum(1 for q, _ in order[:n] if q == p) for p in sizes}
        used = sum(sum(sizes[p][:k]) for p, k in counts.items())
        points.append((n, used, sum(errors[p][k] for p, k in counts.items()) / base))
    return points


@pytest.mark.parametrize("seed", range(4))
def test_error_curve_matches_recounting_every_prefix(seed: int) -> None:
    rng = random.Random(seed)
    chains, errors = [], {}
    for i in range(rng.randint(1, 5)):
        n = rng.randint(1, 6)
        values = [rng.uniform(1, 10)]
        for _ in range(n):
            values.append(values[-1] * rng.uniform(0.2, 1.1))  # a block may raise the error a little
        errors[f"l{i}"] = values
        sizes = tuple(rng.randint(10, 40) for _ in range(n))
        chains.append(Chain(f"l{i}", tuple(values[k] - values[k + 1] for k in range(n)), sizes, 100))
    order = global_order(chains)
    curve = error_curve(chains, errors, order)
    params = 100 * len(chains)
    assert [(p.blocks, p.linear_bytes) for p in curve] == [(n, used) for n, used, _ in
                                                            _prefix_reference(chains, errors, order)]
    for point, (_, used, error) in zip(curve, _prefix_reference(chains, errors, order), strict=True):
        assert point.rel_error == pytest.approx(error, rel=1e-12)
        assert point.bits == used * 8 / params


def test_thin_curve_keeps_the_ends_and_the_loaded_point_within_the_limit() -> None:
    points = [CurvePoint(n, n, float(n), 1 / n) for n in range(10, 1010)]
    thinned = thin_curve(points, 200, keep=(520,))
    assert thinned[0] == points[0] and thinned[-1] == points[-1]
    assert any(p.blocks == 520 for p in thinned) and len(thinned) <= 201
    assert [p.blocks for p in thinned] == sorted({p.blocks for p in thinned})
    assert thin_curve(points[:50], 200) == points[:50]


def test_a_long_order_is_thinned_in_the_report() -> None:
    _, _, section, _ = _run(iterations=20, rank=1, budget="12bpw", signs="residual")  # 21 linears x 20 blocks
    curve = section["curve"]
    assert len(curve) <= 201 and section["loaded"] in curve
    assert curve[0]["blocks"] == 21 and curve[-1]["blocks"] == 420


def test_compress_writes_bitstack_png_and_names_it_in_the_report(model_dir_factory, text_file: Path,
                                                                 tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    data = {"name": "bs", "calibration": {"dataset": str(text_file), "samples": 4, "seq_len": 32, "batch_size": 2},
            "stages": [{"method": "bitstack", "iterations": 3, "rank": 2, "budget": "8bpw"}],
            "export": {"format": "dense"}}
    out = tmp_path / "out"
    report = compress(load(model_dir_factory("llama")), recipe_from_dict(yaml.safe_load(yaml.safe_dump(data))), out,
                      device="cpu")
    assert (out / "bitstack.png").stat().st_size > 10_000
    saved = json.loads((out / "compression_report.json").read_text())
    assert "bitstack.png" in saved["files"] and saved["structure"]["bitstack"]["budget"] == "8bpw"
    assert saved["structure"]["bitstack"]["loaded"] == report.structure["bitstack"]["loaded"]
    markdown = (out / "compression_report.md").read_text()
    section = markdown.split("## BitStack")[1]
    assert "budget 8bpw" in section and "(loaded)" in section and "`bitstack.png` plots the curve" in section


def test_no_bitstack_stage_no_bitstack_png_nor_section(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    rows = [LayerRecord(module="model.layers.0.mlp.up_proj", method="rtn", bits=4, rel_error=0.01).to_dict()]
    report = Report(model="m", recipe={"name": "r"}, recipe_hash="h", seed=0, export_format="dense",
                    size_bytes={"before": 2, "after": 1}, params={"before": 1, "after": 1}, avg_bits_per_weight=4.0,
                    avg_bits_incl_metadata=4.0, compression_ratio=2.0, layers=rows, timings={},
                    peak_rss_bytes=0, versions={}, calibration={})
    assert "bitstack.png" not in write_plots(report, tmp_path) and not (tmp_path / "bitstack.png").exists()
    assert "## BitStack" not in to_markdown(report)
