"""BAQ under layer streaming: its measuring pass is a scoring pass (each layer loaded, measured, dropped), its
finalize allocates from the kept sensitivities alone, the quantizer's pass streams the layers again, and every
output file is byte for byte the in-RAM run's. ``objective: fisher`` (a whole-model backward) is refused."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import streaming_parity as parity
import torch
import yaml

from compressor.errors import RecipeError
from compressor.methods.quant.baq import BAQ
from compressor.pipeline import compress
from compressor.streaming.layers import LayerStreamer

#: BAQ's planning keys besides the objective; targets and ignore are the quantizer's too.
TARGETS = {"targets": ["Linear"], "ignore": ["lm_head"]}


def _scale_unequally(model: torch.nn.Module) -> None:
    """Layer 1's MLP output up, layer 2's queries down, every up_proj's first group of 32 columns up."""
    model.model.layers[1].mlp.down_proj.weight.mul_(4.0)
    model.model.layers[2].self_attn.q_proj.weight.mul_(0.25)
    for layer in model.model.layers:  # one group of columns that wants more bits than the others
        layer.mlp.up_proj.weight[:, :32].mul_(8.0)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory, tiny_tokenizer: Any) -> Any:
    """A tiny Llama in several safetensors shards, per (dtype, tied embeddings).

    The layers' weights are scaled unequally (:func:`_scale_unequally`), so modules, and groups inside one module,
    get different widths.
    """
    return parity.sharded_checkpoints(tmp_path_factory, tiny_tokenizer, "baq", edit=_scale_unequally)


def _recipe(text_file: Path, baq: dict[str, Any], then: str = "gptq", export: str = "compressed-tensors") -> Any:
    """``baq`` (keys over 3 bits average from 2/3/4/8 per linear) planning for ``then`` at groups of 32.

    ``baq["before"]``: a pruning stage (layer_drop, flap) that runs first.
    """
    quant: dict[str, Any] = {"method": then, **TARGETS, "group_size": 32}
    if then == "gptq":
        quant |= {"act_order": True, "dampening": 0.01}
    before = [baq["before"]] if "before" in baq else []
    planning = {k: v for k, v in baq.items() if k != "before"}
    stages = [*before, {"method": "baq", **TARGETS, "avg_bits": 3.0, "candidates": [2, 3, 4, 8], **planning}, quant]
    return parity.streaming_recipe(text_file, stages, export)


def _planned_bits(report: Any) -> dict[str, Any]:
    """BAQ's rows: each module's planned width (and per-group widths at group granularity)."""
    return {row["module"]: (row["bits"], row.get("extra", {}).get("bits_per_group")) for row in report.layers
            if row["method"] == "baq"}


@pytest.mark.parametrize(("baq", "then", "export", "dtype", "tied"), [
    ({"objective": "relative"}, "gptq", "compressed-tensors", "float32", False),  # fused q/k/v, gate/up share a width
    ({"objective": "channel"}, "gptq", "compressed-tensors", "bfloat16", True),
    ({"objective": "relative", "granularity": "group"}, "gptq", "dense", "float32", False),
    ({"objective": "channel", "granularity": "column"}, "gptq", "dense", "bfloat16", False),
    ({"objective": "channel", "granularity": "group", "budget": "module"}, "gptq", "dense", "float32", True),
    ({"objective": "relative", "error_feedback": False}, "rtn", "compressed-tensors", "float32", True),
    ({"objective": "absolute", "granularity": "group", "error_feedback": False}, "rtn", "dense", "float32", False),
    # after a pruning pass: the plan is keyed by the survivors' new paths, the layers read by their source index
    ({"objective": "relative", "before": {"method": "layer_drop", "layers": [0]}}, "gptq", "compressed-tensors",
     "float32", False),
    ({"objective": "channel", "granularity": "group", "before": {"method": "flap", "ratio": 0.5}}, "rtn", "dense",
     "float32", False),
])
def test_baq_streams_to_the_in_ram_bytes(checkpoint: Any, text_file: Path, tmp_path: Path, baq: dict[str, Any],
                                         then: str, export: str, dtype: str, tied: bool) -> None:
    recipe = _recipe(text_file, baq, then, export)
    source = str(checkpoint(dtype, tied))
    in_ram = compress(source, recipe, tmp_path / "ram", device="cpu", memory_budget="none")
    streamed = compress(source, recipe, tmp_path / "stream", device="cpu", memory_budget="1KB")
    parity.same_files(tmp_path / "ram", tmp_path / "stream")
    before = baq.get("before", {}).get("method")
    layers = 2 if before == "layer_drop" else 3  # layer_drop removes one of the 3
    planned = _planned_bits(streamed)
    assert planned == _planned_bits(in_ram) and len(planned) == layers * 7
    widths = {bits for bits, _ in planned.values()} if baq.get("granularity", "module") == "module" else \
        {b for _, per_group in planned.values() for b in per_group}
    assert len(widths) > 1, widths  # a real allocation, not every module at one width
    assert parity.timeless_rows(streamed) == parity.timeless_rows(in_ram)
    parity.same_totals(streamed, in_ram)
    message = streamed.warnings[0]["message"]
    loads = {None: "6 layer loads over 2 passes", "layer_drop": "7 layer loads over 3 passes",
             "flap": "9 layer loads over 3 passes"}[before]
    assert "streamed from disk" in message and loads in message, message
    assert not (tmp_path / "stream.partial").exists()


def test_both_passes_hold_one_layer_and_baq_keeps_no_weight(checkpoint: Any, text_file: Path, tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """BAQ's pass loads layers 0..2 one at a time and the quantizer's pass the same again; when BAQ allocates,
    every decoder layer is back on meta and what it kept per module (its sensitivities) is small CPU data."""
    def probe(self: LayerStreamer, index: int, layer: torch.nn.Module) -> tuple[int, int]:
        return index, parity.resident_layers(self.adapter)

    seen, _ = parity.watch_layer_loads(monkeypatch, probe)
    finalized: list[bool] = []
    finalize = BAQ.finalize

    def checking(self: BAQ, run: Any) -> Any:
        finalized.append(all(p.is_meta for layer in run.adapter.layers() for p in layer.parameters()))
        assert all(not m.sensitivity.is_meta and m.sensitivity.device.type == "cpu" for m in self.measured)
        return finalize(self, run)

    monkeypatch.setattr(BAQ, "finalize", checking)
    compress(str(checkpoint()), _recipe(text_file, {"objective": "relative"}), tmp_path / "o", device="cpu",
             memory_budget="1KB")
    assert seen == [(0, 1), (1, 1), (2, 1), (0, 1), (1, 1), (2, 1)]
    assert finalized == [True]


@pytest.mark.parametrize("granularity", ["module", "group"])
def test_fisher_is_refused_in_one_line_before_anything_is_written(checkpoint: Any, text_file: Path, tmp_path: Path,
                                                                  granularity: str) -> None:
    export = "compressed-tensors" if granularity == "module" else "dense"
    recipe = _recipe(text_file, {"objective": "fisher", "granularity": granularity}, export=export)
    with pytest.raises(RecipeError, match=r"^stages\.0 \(baq\) objective: fisher does not stream .*"
                                          r"use objective: relative \(or channel\)$") as raised:
        compress(str(checkpoint()), recipe, tmp_path / "o", device="cpu", memory_budget="1KB")
    assert "\n" not in str(raised.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == []


@pytest.mark.parametrize("shipped", ["baq-3bit-gptq", "baq-2.5bit-gptq-group-dense"])
def test_the_shipped_recipes_are_refused_from_the_cli_with_exit_2_and_stream_with_objective_relative(
        checkpoint: Any, text_file: Path, tmp_path: Path, runner: Any, shipped: str) -> None:
    """The shipped recipes use objective fisher: refused in one line; ``--set stages.0.objective=relative`` streams."""
    from compressor.cli import app

    small = ["--set", f"calibration.dataset={text_file}", "--set", "calibration.samples=2", "--set",
             "calibration.seq_len=32", "--set", "stages.1.group_size=32"]
    args = ["compress", str(checkpoint()), "-r", shipped, "--memory-budget", "10KB", *small]
    refused = runner.invoke(app, [*args, "--out", str(tmp_path / "f")])
    assert refused.exit_code == 2, refused.output
    assert "(baq) objective: fisher does not stream" in refused.output
    assert len(refused.output.strip().splitlines()) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == []
    done = runner.invoke(app, [*args, "--out", str(tmp_path / "o"), "--set", "stages.0.objective=relative"])
    assert done.exit_code == 0, done.output
    report = yaml.safe_load((tmp_path / "o" / "compression_report.json").read_text())
    assert "streamed from disk" in report["warnings"][0]["message"]


@pytest.mark.parametrize(("baq", "export"), [
    ({"objective": "relative"}, "compressed-tensors"),  # one config group per width, read back layer by layer
    ({"objective": "channel", "granularity": "group"}, "dense"),
])
def test_streamed_eval_scores_the_mixed_width_output_as_in_ram(checkpoint: Any, text_file: Path, tmp_path: Path,
                                                               baq: dict[str, Any], export: str) -> None:
    recipe = _recipe(text_file, baq, export=export)
    runs = [compress(str(checkpoint()), recipe, tmp_path / out, device="cpu", memory_budget=budget,
                     eval_data=str(text_file), eval_max_tokens=1024) for out, budget in (("ram", "none"), ("s", "1KB"))]
    assert runs[0].eval["after"]["ppl"] == runs[1].eval["after"]["ppl"] != runs[1].eval["before"]["ppl"]
    assert runs[0].eval["before"]["ppl"] == runs[1].eval["before"]["ppl"]
