"""The report as people and CI read it: grouped warnings, numbers formatted for people, the heatmap's grid."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from compressor.methods.base import LayerRecord
from compressor.plots import layer_grid, layer_label_step, write_plots
from compressor.report import (
    Report,
    format_bytes,
    format_count,
    format_duration,
    group_warnings,
    module_pattern,
    to_markdown,
    warning_lines,
)

NOTE = "group_size 128 does not divide 576 columns; used 64"
NARROW = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
          "mlp.up_proj"]


def _smollm2_records() -> list[LayerRecord]:
    """SmolLM2's 30 layers in data-flow order: six 576-wide linears per layer carry the group-size note."""
    records = []
    for layer in range(30):
        for name in [*NARROW, "mlp.down_proj"]:
            note = "" if name == "mlp.down_proj" else NOTE
            if layer == 7 and name == "mlp.down_proj":
                note = "Cholesky retried 1x, dampening 0.1"
            records.append(LayerRecord(module=f"model.layers.{layer}.{name}", method="rtn", bits=4, group_size=64,
                                       rel_error=0.01 * (layer + 1), note=note))
    return records


def _report(records: list[LayerRecord], **fields: Any) -> Report:
    values: dict[str, Any] = dict(
        model="demo:smollm2", recipe={"name": "w4a16-rtn"}, recipe_hash="abc", seed=0,
        export_format="compressed-tensors", size_bytes={"before": 538_060_032, "after": 141_000_000},
        params={"before": 134_515_008, "after": 134_515_008}, avg_bits_per_weight=4.0, avg_bits_incl_metadata=4.25,
        compression_ratio=3.816, layers=[r.to_dict() for r in records], timings={"load": 2.5, "compress": 109.5},
        peak_rss_bytes=1_930_000_000, versions={}, calibration={}, warnings=Report.grouped_warnings(records))
    values.update(fields)
    return Report(**values)


def test_repeated_notes_become_one_warning_with_count_pattern_and_natural_order() -> None:
    groups = group_warnings(_smollm2_records())
    assert [(g["message"], g["count"]) for g in groups] == [(NOTE, 180), ("Cholesky retried 1x, dampening 0.1", 1)]
    first = groups[0]
    assert first["pattern"] == ("model.layers.{0..29}.self_attn.{q,k,v,o}_proj, "
                                "model.layers.{0..29}.mlp.{gate,up}_proj")
    # natural order: layer 2 before layer 10, every module once (names alphabetical inside a layer)
    assert first["modules"] == [f"model.layers.{i}.{n}" for i in range(30) for n in sorted(NARROW)]
    assert warning_lines(groups) == [
        f"{NOTE} (180 modules: {first['pattern']})",
        "model.layers.7.mlp.down_proj: Cholesky retried 1x, dampening 0.1",
    ]


@pytest.mark.parametrize(("modules", "pattern"), [
    (["model.layers.0.fc1", "model.layers.1.fc1", "model.layers.3.fc1", "model.layers.3.fc2", "lm_head"],
     "model.layers.{0,1,3}.fc1, model.layers.3.fc2, lm_head"),
    (["model.decoder.layers.5.self_attn.out_proj"], "model.decoder.layers.5.self_attn.out_proj"),
    ([f"model.layers.{i}" for i in (0, 1, 2, 3, 7, 9, 10)], "model.layers.{0..3,7,9,10}"),
    ([f"m.{i}.x{j}" for i in range(6) for j in range(i)], "m.{1..5}.x0, m.{2..5}.x1, m.{3..5}.x2, m.{4,5}.x3, "
                                                           "... +1 more"),
])
def test_module_pattern_folds_layers_and_names(modules: list[str], pattern: str) -> None:
    assert module_pattern(modules) == pattern


def test_report_json_keeps_every_module_and_markdown_one_line_per_warning() -> None:
    report = _report(_smollm2_records())
    data = json.loads(report.to_json())
    assert data["warnings"][0]["count"] == 180 and len(data["warnings"][0]["modules"]) == 180
    assert data["size_bytes"]["after"] == 141_000_000  # machine fields stay numbers
    markdown = to_markdown(report)
    warnings = markdown.split("## Warnings")[1].split("##")[0]
    assert [line for line in warnings.splitlines() if line.startswith("- ")] == [
        f"- {line}" for line in warning_lines(report.warnings)]
    assert f"model.layers.10.self_attn.q_proj: {NOTE}" not in markdown


@pytest.mark.parametrize(("count", "text"), [
    (134_515_008, "134.5M"), (7_241_732_096, "7.2B"), (3_540_000, "3.5M"), (12_300, "12.3K"), (999, "999"),
    (999_960, "1.0M"), (0, "0"),
])
def test_format_count(count: int, text: str) -> None:
    assert format_count(count) == text


@pytest.mark.parametrize(("size", "text"), [
    (538_060_032, "538.1 MB"), (141_000_000, "141.0 MB"), (14_483_456_000, "14.48 GB"), (999_990_000, "1.00 GB"),
    (2_048, "2.0 kB"), (512, "512 B"),
])
def test_format_bytes(size: int, text: str) -> None:
    assert format_bytes(size) == text


@pytest.mark.parametrize(("seconds", "text"), [
    (112, "1 m 52 s"), (112.4, "1 m 52 s"), (4.21, "4.2 s"), (59.97, "1 m 0 s"), (3725, "1 h 2 m"), (0.0, "0.0 s"),
])
def test_format_duration(seconds: float, text: str) -> None:
    assert format_duration(seconds) == text


def test_summary_leads_with_what_people_ask_first() -> None:
    evaluation = {"source": "demo:wiki", "before": {"ppl": 23.634}, "after": {"ppl": 24.1}, "increase_pct": 1.9717}
    summary = _report(_smollm2_records(), eval=evaluation, dtype="bfloat16").summary()
    assert list(summary)[:4] == ["bits per weight", "size on disk", "perplexity", "time"]
    assert summary["bits per weight"] == "4.00 (4.25 with scales)"
    assert summary["size on disk"] == "538.1 MB -> 141.0 MB (3.82x smaller)"
    assert summary["perplexity"] == "23.63 -> 24.10 (+1.97%)"
    assert summary["time"] == "1 m 52 s"
    assert summary["parameters"] == "134.5M"
    assert summary["dtype"] == "bfloat16"
    pruned = _report([], params={"before": 134_515_008, "after": 106_000_000}, avg_bits_per_weight=None,
                     avg_bits_incl_metadata=None, size_bytes={"before": 538_060_032, "after": 600_000_000})
    assert pruned.summary()["bits per weight"] == "not quantized"
    assert pruned.summary()["parameters"] == "134.5M -> 106.0M"
    assert pruned.summary()["size on disk"] == "538.1 MB -> 600.0 MB (1.12x larger)"


def _row(module: str, rel_error: float | None, bits: float | None = 4) -> dict[str, Any]:
    return LayerRecord(module=module, method="gptq", bits=bits, rel_error=rel_error).to_dict()


def test_heatmap_grid_is_layers_by_module_types() -> None:
    rows = [_row(f"model.layers.{i}.{n}", 0.1 * i + j, bits=4 if j else 8)
            for i in range(3) for j, n in enumerate([*NARROW, "mlp.down_proj"])
            if (i, n) != (1, "mlp.up_proj")]
    rows.append(_row("lm_head", 0.5))  # outside the decoder layers: not a cell
    rows.append(_row("model.layers.0.self_attn.k_proj", None))  # a row without an error leaves the cell alone
    grid = layer_grid(rows, "rel_error")
    assert grid is not None
    assert grid.layers == [0, 1, 2]
    assert grid.labels == ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    assert [len(row) for row in grid.values] == [7, 7, 7]
    assert grid.values[1][5] is None  # layer 1 has no up_proj record
    assert grid.values[2][6] == pytest.approx(0.2 + 6)
    bits = layer_grid(rows, "bits")
    assert bits is not None and [row[0] for row in bits.values] == [8, 8, 8]
    assert layer_grid([_row("lm_head", 0.5)], "rel_error") is None


def test_heatmap_columns_keep_full_names_when_short_ones_collide() -> None:
    rows = [_row(f"model.layers.{i}.{n}", 0.1) for i in range(80) for n in ("attn.dense", "mlp.dense")]
    grid = layer_grid(rows, "rel_error")
    assert grid is not None
    assert grid.labels == ["attn.dense", "mlp.dense"] and len(grid.layers) == 80


@pytest.mark.parametrize(("layers", "step"), [(3, 1), (20, 1), (32, 2), (80, 4), (100, 5), (1000, 50)])
def test_deep_models_label_every_nth_layer(layers: int, step: int) -> None:
    assert layer_label_step(layers) == step


def test_heatmap_png_written(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    records = _smollm2_records()
    records[3] = LayerRecord(module=records[3].module, method="rtn", bits=8, rel_error=0.001)
    assert write_plots(_report(records), tmp_path) == ["layers.png"]
    assert (tmp_path / "layers.png").stat().st_size > 10_000


def test_versions_name_every_library_an_export_depends_on() -> None:
    from compressor.report import versions

    found = versions()
    for package in ("torch", "transformers", "compressed-tensors", "gguf", "safetensors", "bitsandbytes"):
        assert package in found, package


def test_finercut_rows_ruled_out_on_a_bound_show_at_least(tmp_path: Path) -> None:
    """A candidate the search never scored in full has ``score_at_least`` only: shown as ">= x", plotted apart."""
    def row(layer: int, sublayer: str, **extra: Any) -> LayerRecord:
        return LayerRecord(module=f"model.layers.{layer}.{sublayer}", method="finercut",
                           extra={"layer": layer, "sublayer": sublayer, "measure": "kl", **extra})

    records = [row(0, "attention", score=0.5, removed=True, order=1), row(1, "attention", score=None,
               score_at_least=2.25), row(1, "mlp", score=None, score_at_least=None)]
    markdown = to_markdown(_report(records))
    assert "| model.layers.0.attention | finercut | 0.5 | yes | 1 |" in markdown
    assert "| model.layers.1.attention | finercut | >= 2.25 |  |  |" in markdown
    assert "model.layers.1.mlp" not in markdown.split("## Removal scores")[1]
    pytest.importorskip("matplotlib")
    assert "scores.png" in write_plots(_report(records), tmp_path)
