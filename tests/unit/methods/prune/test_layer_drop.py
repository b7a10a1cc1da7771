"""layer_drop (ShortGPT): scores from real hidden states, standard exports, validation, composition."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from tiny import FAMILIES, tiny_config
from transformers import AutoModelForCausalLM

from compressor.engine import ModelContext, run_stages
from compressor.errors import RecipeError
from compressor.export import write_model
from compressor.methods.prune.layer_drop import (
    LayerDrop,
    LayerDropConfig,
    angular_distance,
    best_block,
    block_influence,
    lowest,
)
from compressor.models import get_adapter
from compressor.pipeline import compress, load
from compressor.recipe import ExportConfig, recipe_from_dict

TOKENS = torch.randint(0, 300, (4, 24), generator=torch.Generator().manual_seed(0))


def deep_model(family: str, layers: int = 5, seed: int = 0) -> Any:
    """A tiny model with more layers (per-layer config lists sized to match), norms and biases perturbed."""
    config: Any = tiny_config(family)
    config.num_hidden_layers = layers
    if getattr(config, "layer_types", None) is not None:
        config.layer_types = [config.layer_types[0]] * layers
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                param.add_(0.1 * torch.randn_like(param))
    return model.eval()


def silence(model: Any, index: int) -> None:
    """Make layer ``index`` the identity: zero what its attention and MLP write into the residual stream."""
    adapter = get_adapter(model)
    layer = adapter.layers()[index]
    with torch.no_grad():
        for linear in (adapter.attention_output(layer), *adapter.mlp_outputs(layer)):  # a MoE: every expert's
            linear.weight.zero_()
            if linear.bias is not None:
                linear.bias.zero_()


def run_drop(model: Any, **settings: Any) -> tuple[ModelContext, list[Any]]:
    run = ModelContext(model, get_adapter(model), TOKENS, torch.device("cpu"), batch_size=3)
    records = run_stages(run, [LayerDrop(LayerDropConfig(method="layer_drop", **settings))])
    return run, records


def logits(model: Any, tokens: torch.Tensor = TOKENS) -> torch.Tensor:
    with torch.no_grad():
        return model(tokens).logits


# ---- pure math ------------------------------------------------------------------------------------------


def test_block_influence_and_angular_known_answers() -> None:
    x = torch.tensor([[[1.0, 0.0], [0.0, 2.0]]])
    assert block_influence(x, 3 * x) == pytest.approx((0.0, 2))
    assert block_influence(x, x.flip(-1)) == pytest.approx((2.0, 2))  # orthogonal tokens: 1 - 0 each
    assert angular_distance(x, x.flip(-1)) == pytest.approx((1.0, 2))  # arccos(0) / pi = 0.5 each
    assert angular_distance(x, -x)[0] == pytest.approx(2.0)


def test_choosing_layers() -> None:
    assert lowest([0.3, 0.1, 0.2, 0.1], 2) == [1, 3]
    assert lowest([0.3, 0.1], 0) == []
    assert best_block([0.5, 0.2, 0.4], 3) == [1, 2, 3]


# ---- behaviour on models -------------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_removing_nothing_is_the_identity(family: str) -> None:
    model = deep_model(family, 3)
    get_adapter(model)  # a MoE's experts become per-expert linears here (tested equal in test_moe.py), not in the run
    before = logits(model)
    run, records = run_drop(model, remove=0)
    assert torch.equal(logits(model), before)
    assert get_adapter(model).num_layers == 3 and run.structure["layer_drop"]["removed"] == []
    assert all(r.extra["score"] is not None and not r.extra["removed"] for r in records)


@pytest.mark.parametrize("family", FAMILIES)
def test_an_identity_layer_has_the_lowest_block_influence(family: str) -> None:
    model = deep_model(family)
    silence(model, 2)
    run, records = run_drop(model, remove=1)
    scores = run.structure["layer_drop"]["scores"]
    assert len(scores) == 5 and scores[2] == pytest.approx(0.0, abs=1e-6)
    assert min(s for i, s in enumerate(scores) if i != 2) > 1e-3
    assert run.structure["layer_drop"]["removed"] == [2]
    gone = [r for r in records if r.extra["removed"]]
    assert [r.module for r in gone] == [get_adapter(model).layer_prefix(2)] and gone[0].extra["rank"] == 1
    assert gone[0].params_after == 0 and gone[0].params_before > 0 and "block influence" in gone[0].note


def test_angular_removes_the_quietest_contiguous_block() -> None:
    model = deep_model("llama", 6)
    silence(model, 3)
    silence(model, 4)
    run, _ = run_drop(model, metric="angular", remove=2)
    assert run.structure["layer_drop"]["removed"] == [3, 4]
    assert run.structure["layer_drop"]["scores"][3] == pytest.approx(0.0, abs=1e-3)
    assert len(run.structure["layer_drop"]["scores"]) == 5  # block starts 0..4


def test_removed_model_equals_a_model_built_without_those_layers() -> None:
    model = deep_model("llama")
    reference = deep_model("llama")
    run_drop(model, layers=[1, 3])
    adapter = get_adapter(reference)
    adapter.remove_layers([1, 3])
    assert torch.equal(logits(model), logits(reference))


@pytest.mark.parametrize("family", FAMILIES)
def test_export_is_a_standard_config_with_the_same_logits(family: str, tmp_path: Path, tiny_tokenizer: Any) -> None:
    model = deep_model(family)
    silence(model, 1)
    run, _ = run_drop(model, remove=2)
    write_model(ExportConfig(format="dense"), run, tiny_tokenizer, tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["num_hidden_layers"] == 3 and "auto_map" not in config
    if config.get("layer_types") is not None:
        assert len(config["layer_types"]) == 3
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert type(reloaded).__module__.startswith("transformers.models.")
    torch.testing.assert_close(logits(reloaded), logits(model), rtol=0, atol=1e-5)
    prompt = TOKENS[:1, :6]
    cached = reloaded.generate(prompt, max_new_tokens=6, do_sample=False)
    uncached = model.generate(prompt, max_new_tokens=6, do_sample=False, use_cache=False)
    assert torch.equal(cached, uncached)


# ---- validation ----------------------------------------------------------------------------------------


def _stage(**fields: Any) -> dict[str, Any]:
    return {"name": "t", "stages": [{"method": "layer_drop", **fields}]}


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"remove": -1}, r"stages\.0\.remove: remove must be 0 or more"),
        ({"ratio": 0}, r"stages\.0\.ratio: ratio must be between 0 and 1"),
        ({"ratio": 1.0}, r"stages\.0\.ratio: ratio must be between 0 and 1"),
        ({"ratio": 1.5}, r"stages\.0\.ratio"),
        ({"remove": 2, "ratio": 0.5}, r"set only one of remove, ratio and layers \(got remove and ratio\)"),
        ({"layers": [1, 1]}, r"stages\.0\.layers: layers must be distinct"),
        ({"metric": "angular", "layers": [1, 3]}, r"angular metric removes one contiguous block"),
        ({"metric": "cosine"}, r"stages\.0\.metric"),
        ({"remvoe": 2}, r"stages\.0\.remvoe: unknown key"),
    ],
)
def test_bad_values_are_rejected_naming_the_field(fields: dict[str, Any], message: str) -> None:
    with pytest.raises(RecipeError, match=message):
        recipe_from_dict(_stage(**fields))


@pytest.mark.parametrize("fields", [{"remove": 3}, {"remove": 7}, {"ratio": 0.99}, {"layers": [0, 3]}])
def test_too_many_layers_fail_before_any_work(fields: dict[str, Any]) -> None:
    model = deep_model("llama", 3)
    with pytest.raises(RecipeError, match="layer_drop: "):
        run_drop(model, **fields)
    assert get_adapter(model).num_layers == 3


def test_ratio_rounds_to_the_nearest_layer_count() -> None:
    config = LayerDropConfig(method="layer_drop", ratio=0.25)
    assert [config.count(n) for n in (3, 4, 30, 32)] == [1, 1, 8, 8]
    assert LayerDropConfig(method="layer_drop").count(30) == 8  # default 25%
    assert math.isclose(LayerDropConfig(method="layer_drop", remove=0).count(30), 0)


def test_pruning_after_quantizing_is_rejected() -> None:
    data = {"name": "t", "stages": [{"method": "rtn", "bits": 8}, {"method": "layer_drop", "remove": 1}]}
    with pytest.raises(RecipeError, match="pruning .layer_drop. must come before quantization"):
        recipe_from_dict(data)


# ---- composition through the pipeline --------------------------------------------------------------------


def test_layer_drop_then_rtn_through_compress(
    model_dir_factory: Callable[[str], Path], text_file: Path, tmp_path: Path
) -> None:
    recipe = recipe_from_dict({
        "name": "drop-then-rtn",
        "calibration": {"dataset": str(text_file), "samples": 4, "seq_len": 32, "batch_size": 2},
        "stages": [{"method": "layer_drop", "remove": 1}, {"method": "rtn", "bits": 8, "group_size": -1}],
        "export": {"format": "dense"},
    })
    out = tmp_path / "out"
    loaded = load(model_dir_factory("llama"))
    report = compress(loaded, recipe, out, device="cpu")
    assert report.structure["layer_drop"]["layers_after"] == 2
    assert report.params["after"] < report.params["before"]
    rtn_rows = [r for r in report.layers if r["method"] == "rtn"]
    assert {r["module"].split(".")[2] for r in rtn_rows} == {"0", "1"}  # the renumbered survivors
    assert all(r["bits"] == 8 for r in rtn_rows) and len(rtn_rows) == 2 * 7
    reloaded = AutoModelForCausalLM.from_pretrained(out)
    assert reloaded.config.num_hidden_layers == 2
    torch.testing.assert_close(logits(reloaded), logits(loaded.model), rtol=0, atol=1e-5)
    saved = json.loads((out / "compression_report.json").read_text())
    assert any(r["extra"].get("score") is not None for r in saved["layers"])
    assert "## Removal scores" in (out / "compression_report.md").read_text()
    pytest.importorskip("matplotlib")
    assert (out / "scores.png").is_file()
