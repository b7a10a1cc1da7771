"""`compressor compress` on tiny Gemma 3 (text) and Phi-3 checkpoints saved to disk, each export reloaded by a user.

The user is a fresh Python that cannot import ``compressor`` (``tests/isolation.py``) and loads the output with
``AutoModelForCausalLM.from_pretrained`` alone; its logits must equal, bit for bit, those of the model the CLI
compressed in memory (the engine's dequantized weights), which the test keeps by watching the CLI's load.
Gemma 3's window (8) is shorter than the tokens, so sliding and full layers both matter; Phi-3's fused
``qkv_proj`` / ``gate_up_proj`` are quantized and stored as one linear each.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from isolation import reload_without_compressor
from typer.testing import CliRunner

import compressor.pipeline
from compressor.cli import app
from compressor.models import get_adapter
from compressor.models.loading import LoadedModel

TOKENS = torch.tensor([[5, 17, 42, 99, 3, 250, 7, 8, 11, 12, 13, 14, 200, 201, 2, 9]])
CALIBRATION = {"samples": 4, "seq_len": 32, "batch_size": 2}
GPTQ_W4 = {"method": "gptq", "bits": 4, "group_size": 32}
RTN_W8 = {"method": "rtn", "bits": 8, "group_size": 32}
SHORTGPT = {"method": "layer_drop", "metric": "block_influence", "remove": 1}



def recipe_text(text_file: Path, stage: dict[str, Any], export: str) -> str:
    """A recipe in YAML (JSON is YAML) with one stage, the test's calibration and ``export`` format."""
    return json.dumps({"name": f"{stage['method']}-{export}", "stages": [stage], "export": {"format": export},
                       "calibration": {"dataset": str(text_file), **CALIBRATION}})


def compress_cli(runner: CliRunner, monkeypatch: pytest.MonkeyPatch, model_dir: Path, recipe: str,
                 tmp_path: Path) -> tuple[dict[str, Any], LoadedModel, Path]:
    """Run ``compressor compress --json``; returns the report, the model it compressed in memory and the output."""
    kept: list[LoadedModel] = []
    real_load = compressor.pipeline.load_model

    def watch(*args: Any, **kwargs: Any) -> LoadedModel:  # the real loader; the test only keeps what it returns
        kept.append(real_load(*args, **kwargs))
        return kept[-1]

    monkeypatch.setattr(compressor.pipeline, "load_model", watch)
    recipe_path, out = tmp_path / "recipe.yaml", tmp_path / "out"
    recipe_path.write_text(recipe)
    result = runner.invoke(app, ["compress", str(model_dir), "-r", str(recipe_path), "-o", str(out), "--json"])
    assert result.exit_code == 0, result.output
    assert len(kept) == 1
    return json.loads(result.stdout), kept[0], out


def reload_elsewhere(loaded: LoadedModel, out: Path) -> dict[str, Any]:
    """Save the in-memory model's logits next to the export and let a Python without compressor compare."""
    with torch.no_grad():
        logits = loaded.model(TOKENS).logits
    return reload_without_compressor(out, TOKENS, logits)


FAMILIES = {"gemma3": "Gemma3ForCausalLM", "phi3": "Phi3ForCausalLM"}


@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("stage", [GPTQ_W4, RTN_W8], ids=["gptq-w4", "rtn-w8"])
def test_quantized_compressed_tensors_reload_with_equal_logits(
    family: str, stage: dict[str, Any], runner: CliRunner, monkeypatch: pytest.MonkeyPatch,
    model_dir_factory: Callable[[str], Path], text_file: Path, tmp_path: Path,
) -> None:
    report, loaded, out = compress_cli(runner, monkeypatch, model_dir_factory(family),
                                       recipe_text(text_file, stage, "compressed-tensors"), tmp_path)
    quantization = json.loads((out / "config.json").read_text())["quantization_config"]
    assert quantization["format"] == "pack-quantized"
    weights = [group["weights"] for group in quantization["config_groups"].values()]
    assert {(w["num_bits"], w["group_size"]) for w in weights} == {(stage["bits"], 32)}
    rows = {row["module"]: row for row in report["layers"] if row["method"] == stage["method"]}
    adapter = get_adapter(loaded.model)
    linears = {f"{adapter.layer_prefix(i)}.{name}" for i in range(3) for name in adapter.linear_names()}
    assert set(rows) == linears  # Phi-3: qkv_proj and gate_up_proj whole
    assert {row["bits"] for row in rows.values()} == {stage["bits"]}
    seen = reload_elsewhere(loaded, out)
    assert (seen["class"], seen["layers"], seen["diff"]) == (FAMILIES[family], 3, 0.0)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_shortgpt_removes_a_layer_and_reloads_as_a_standard_model(
    family: str, runner: CliRunner, monkeypatch: pytest.MonkeyPatch, model_dir_factory: Callable[[str], Path],
    text_file: Path, tmp_path: Path,
) -> None:
    report, loaded, out = compress_cli(runner, monkeypatch, model_dir_factory(family),
                                       recipe_text(text_file, SHORTGPT, "dense"), tmp_path)
    config = json.loads((out / "config.json").read_text())
    assert config["num_hidden_layers"] == 2 and "auto_map" not in config
    removed = [row for row in report["layers"] if row["extra"].get("removed")]
    assert len(removed) == 1
    if family == "gemma3":  # the per-layer attention types follow the kept layers
        kinds = ["sliding_attention", "full_attention", "sliding_attention"]
        del kinds[removed[0]["extra"]["layer"]]
        assert config["layer_types"] == kinds
    seen = reload_elsewhere(loaded, out)
    assert (seen["class"], seen["layers"], seen["diff"]) == (FAMILIES[family], 2, 0.0)
