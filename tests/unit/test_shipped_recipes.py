"""Shipped recipes keep their word: a recipe that quantizes writes a packed file unless its name says dense,
and every packed single-stage recipe's settings load back in transformers with the in-memory logits."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from compressor.methods.registry import get_method
from compressor.pipeline import compress, load
from compressor.recipe import load_recipe, shipped_recipe_names


def _quantizes(name: str) -> bool:
    return any(get_method(stage.method).kind == "quant" for stage in load_recipe(name).stages)


QUANTIZING = [n for n in shipped_recipe_names() if _quantizes(n)]


def test_most_shipped_recipes_quantize() -> None:
    assert len(QUANTIZING) >= 8 and "shortgpt-25pct" not in QUANTIZING


@pytest.mark.parametrize("name", QUANTIZING)
def test_quantizing_recipes_write_a_packed_format_unless_named_dense(name: str) -> None:
    fmt = load_recipe(name).export.format
    assert "dense" in name or fmt != "dense", f"{name} quantizes but writes dense weights"


PACKED_SINGLE_STAGE = [n for n in shipped_recipe_names()
                       if load_recipe(n).export.format == "compressed-tensors" and len(load_recipe(n).stages) == 1
                       and load_recipe(n).stages[0].method != "dgq"]  # INT8 activations: tests/unit/export/test_ct_w4a8


def test_the_packed_single_stage_recipes_include_the_formerly_dense_ones() -> None:
    assert {"w3a16-gptq", "w4a16-rtn", "w8a16-rtn", "w4a16-gptq", "w8a16-gptq"} <= set(PACKED_SINGLE_STAGE)


@pytest.mark.parametrize("name", PACKED_SINGLE_STAGE)
def test_packed_recipe_loads_in_transformers_with_identical_logits(name: str, model_dir_factory, text_file: Path,
                                                                   tmp_path: Path) -> None:
    """The recipe's own bits and symmetry on a tiny Llama (64 wide, so groups of 32 stand in for 128)."""
    stage = load_recipe(name).stages[0]
    overrides = [f"calibration.dataset={text_file}", "calibration.samples=4", "calibration.seq_len=32",
                 "calibration.batch_size=2"]
    if stage.group_size > 0:
        overrides.append("stages.0.group_size=32")
    loaded = load(model_dir_factory("llama"))
    out = tmp_path / name
    report = compress(loaded, load_recipe(name, overrides), out, device="cpu")
    config = json.loads((out / "config.json").read_text())["quantization_config"]
    assert config["format"] == "pack-quantized"
    assert {g["weights"]["num_bits"] for g in config["config_groups"].values()} == {stage.bits}
    assert report.size_bytes["after"] < report.size_bytes["before"]
    tokens = torch.tensor([[5, 17, 42, 99, 3, 250, 7, 8]])
    reloaded = AutoModelForCausalLM.from_pretrained(out)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(tokens).logits, loaded.model(tokens).logits, rtol=0, atol=0)
