"""BAQ for a compressed-tensors export: linears a serving engine fuses get one width, on every family.

vLLM loads q/k/v as one ``qkv_proj`` and gate/up as one ``gate_up_proj`` and gives the fused layer the
scheme of its first part, so a file where q_proj is 8-bit and k_proj 2-bit cannot be served there.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from tiny import FAMILIES, tiny_model

from compressor.errors import RecipeError
from compressor.models import get_adapter
from compressor.pipeline import compress, load
from compressor.recipe import recipe_from_dict

#: What vLLM fuses (``packed_modules_mapping`` of its llama / qwen2 models; OPT builds only ``qkv_proj``,
#: fc1 is a plain ColumnParallelLinear), written out here rather than read from our adapters.
VLLM_FUSED = {
    "llama": [("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), ("mlp.gate_proj", "mlp.up_proj")],
    "qwen2": [("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), ("mlp.gate_proj", "mlp.up_proj")],
    "opt": [("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")],
    "gemma3": [("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), ("mlp.gate_proj", "mlp.up_proj")],
    "phi3": [],  # its checkpoints hold qkv_proj and gate_up_proj already fused
    # FusedMoE stacks every expert's w1/w3 into one w13 weight under one scheme (8 experts in the tiny model)
    "mixtral": [("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
                tuple(f"mlp.experts.{e}.{name}" for e in range(8) for name in ("w1", "w3"))],
    "qwen3_moe": [("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
                  tuple(f"mlp.experts.{e}.{name}" for e in range(8) for name in ("gate_proj", "up_proj"))],
}


@pytest.mark.parametrize("family", FAMILIES)
def test_fused_groups_are_what_vllm_fuses(family: str) -> None:
    adapter = get_adapter(tiny_model(family))
    assert [g.names for g in adapter.fused_groups() if len(g.names) > 1] == VLLM_FUSED[family]


def _schemes(config: dict, path: str) -> list[str]:
    """Names of the config groups whose targets match ``path`` the way vLLM matches them (``re.match``)."""
    return [name for name, group in config["config_groups"].items()
            if any(re.match(target.removeprefix("re:"), path) for target in group["targets"])]


@pytest.mark.parametrize("quantizer", ["gptq", "rtn"])
@pytest.mark.parametrize("family", FAMILIES)
def test_config_groups_never_split_a_fused_group(family: str, quantizer: str, model_dir_factory, text_file: Path,
                                                 tmp_path: Path) -> None:
    """The first linear of every fused group is made 30x larger, so an allocation per linear gives it the
    widest width and its partners the narrowest; one width per fused group keeps them in one scheme."""
    loaded = load(model_dir_factory(family))
    adapter = get_adapter(loaded.model)
    with torch.no_grad():
        for layer in adapter.layers():
            for names in VLLM_FUSED[family]:
                layer.get_submodule(names[0]).weight.mul_(30)
    recipe = recipe_from_dict({
        "name": "baq-fused",
        "calibration": {"dataset": str(text_file), "samples": 4, "seq_len": 32},
        "stages": [{"method": "baq", "avg_bits": 3.0, "candidates": [2, 4, 8], "objective": "absolute"},
                   {"method": quantizer, "group_size": 32}],
        "export": {"format": "compressed-tensors"},
    })
    out = tmp_path / "out"
    if adapter.num_experts:  # its loaders take one scheme for every expert: refused before calibration
        with pytest.raises(RecipeError, match="one scheme for every expert"):
            compress(loaded, recipe, out, device="cpu")
        return
    compress(loaded, recipe, out, device="cpu")
    config = json.loads((out / "config.json").read_text())["quantization_config"]
    assert len(config["config_groups"]) > 1, "mixed widths, or the test shows nothing"
    for index in range(adapter.num_layers):
        for names in VLLM_FUSED[family]:
            paths = [f"{adapter.layer_prefix(index)}.{name}" for name in names]
            schemes = {path: _schemes(config, path) for path in paths}
            assert all(len(s) == 1 for s in schemes.values()), schemes
            assert len({s[0] for s in schemes.values()}) == 1, f"fused group split across schemes: {schemes}"
