"""compressed-tensors export of a mixture of experts: one packed linear per expert projection, under the
checkpoint's names, which transformers 5.23 loads (its dequantizing loader, asked for by the file) into its
3-D experts with the in-memory model's logits, bit for bit.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from tiny import tiny_model
from transformers import AutoModelForCausalLM

from compressor.engine import ModelContext, run_stages
from compressor.errors import ExportError
from compressor.export.compressed_tensors import write_compressed_tensors
from compressor.methods.registry import get_method
from compressor.models import FAMILIES as FAMILY_TABLE
from compressor.models import get_adapter
from compressor.models.moe import MoEAdapter
from compressor.recipe import build_stages

#: Every mixture-of-experts family in the table (8 experts, top-2 in tests/tiny.py).
MOE_FAMILIES = [family.name for family in FAMILY_TABLE if issubclass(family.adapter, MoEAdapter)]
TOKENS = torch.randint(0, 300, (4, 32), generator=torch.Generator().manual_seed(0))
#: _EXACT: transformers multiplies gate and up as one [2I, H] matrix, we as two; on more than one thread the GEMMs
#: round differently in the last bits (~1e-7), so reloads are compared to 1e-5 (a wrong code moves logits by 1e-3+).
_EXACT = 1e-5


def _quantized(family: str, **settings: object) -> ModelContext:
    model = tiny_model(family)
    run = ModelContext(model, get_adapter(model), TOKENS, torch.device("cpu"), batch_size=2)
    config = get_method("gptq").config_class.model_validate({"method": "gptq", "bits": 4, **settings})
    run_stages(run, build_stages([config], "compressed-tensors"))
    return run


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_per_expert_weights_reload_in_transformers_with_equal_logits(family: str, tmp_path: Path) -> None:
    run = _quantized(family, group_size=16)
    adapter = run.adapter
    written = write_compressed_tensors(run.model, run.quantized, tmp_path)
    assert written["dequantize"] is True
    e = adapter.experts
    expert_paths = {f"model.layers.{i}.{e.module}.{x}.{name}" for i in range(3) for x in range(8)
                    for name in (e.gate, e.up, e.down)}
    assert expert_paths <= set(run.quantized)
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert {f"{p}.weight_packed" for p in expert_paths} <= keys
    assert not any(key.endswith((".gate_up_proj", ".down_proj")) for key in keys)
    assert {f"model.layers.{i}.{e.router}.weight" for i in range(3)} <= keys  # the router stays dense
    groups = written["config_groups"].values()
    assert sorted(any("experts" in t for t in g["targets"]) for g in groups) == [False, True]  # apart, one each
    assert all(all("experts" in t for t in g["targets"]) or not any("experts" in t for t in g["targets"])
               for g in groups)

    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(reloaded.get_submodule(f"model.layers.0.{e.module}")).__name__ != "LinearExperts"
    with torch.no_grad():
        torch.testing.assert_close(reloaded(TOKENS).logits, run.model(TOKENS).logits, rtol=0, atol=_EXACT)
    for x in (0, 7):  # the 3-D weights hold exactly the in-memory fake-quantized experts
        expert = run.model.get_submodule(f"model.layers.1.{e.module}.{x}")
        stacked = reloaded.get_submodule(f"model.layers.1.{e.module}")
        gate_up = torch.cat([expert.get_submodule(e.gate).weight, expert.get_submodule(e.up).weight])
        assert torch.equal(stacked.gate_up_proj[x], gate_up)
        assert torch.equal(stacked.down_proj[x], expert.get_submodule(e.down).weight)


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_experts_a_loader_would_misread_are_refused(family: str, tmp_path: Path) -> None:
    # group 32 covers all 32 columns of each down projection: per channel there, groups of 32 on gate/up
    with pytest.raises(ExportError, match="experts are quantized with 2 schemes"):
        write_compressed_tensors(*_args(_quantized(family, group_size=32)), tmp_path)
    with pytest.raises(ExportError, match="asymmetric experts"):
        write_compressed_tensors(*_args(_quantized(family, group_size=16, symmetric=False)), tmp_path)
    assert not (tmp_path / "config.json").exists()


def test_dense_models_keep_the_default_loader(tmp_path: Path) -> None:
    run = _quantized("llama", group_size=16)
    written = write_compressed_tensors(run.model, run.quantized, tmp_path)
    assert "dequantize" not in written
    assert "dequantize" not in json.loads((tmp_path / "config.json").read_text())["quantization_config"]


def _args(run: ModelContext) -> tuple:
    return run.model, run.quantized


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_shortgpt_then_gptq_on_experts_reloads_with_equal_logits(family: str, tmp_path: Path) -> None:
    """ShortGPT removes a whole MoE layer (the one made the identity), the survivors' experts are renumbered."""
    model = tiny_model(family)
    adapter = get_adapter(model)
    with torch.no_grad():  # layer 1 adds nothing to the stream: the one ShortGPT must remove
        adapter.attention_output(adapter.layers()[1]).weight.zero_()
        for down in adapter.mlp_outputs(adapter.layers()[1]):
            down.weight.zero_()
    survivors = [adapter.layers()[0], adapter.layers()[2]]
    run = ModelContext(model, adapter, TOKENS, torch.device("cpu"), batch_size=2)
    configs = [get_method("layer_drop").config_class.model_validate({"method": "layer_drop", "remove": 1}),
               get_method("gptq").config_class.model_validate({"method": "gptq", "bits": 4, "group_size": 16})]
    run_stages(run, build_stages(configs, "compressed-tensors"))
    assert list(adapter.layers()) == survivors and model.config.num_hidden_layers == 2
    assert len([p for p in run.quantized if ".experts." in p]) == 2 * 3 * adapter.num_experts
    write_compressed_tensors(model, run.quantized, tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert reloaded.config.num_hidden_layers == 2
    with torch.no_grad():
        torch.testing.assert_close(reloaded(TOKENS).logits, model(TOKENS).logits, rtol=0, atol=_EXACT)


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_export_command_restores_a_moe_run_as_dense(family: str, tmp_path: Path, tiny_tokenizer) -> None:
    """`compressor export` reads the per-expert packed weights back into the per-expert layout and writes a dense
    model that transformers loads with the run's logits."""
    from compressor.pipeline import export
    from compressor.recipe import ExportConfig

    run = _quantized(family, group_size=16)
    (tmp_path / "ct").mkdir()
    write_compressed_tensors(run.model, run.quantized, tmp_path / "ct")
    tiny_tokenizer.save_pretrained(tmp_path / "ct")
    export(tmp_path / "ct", ExportConfig(format="dense"), tmp_path / "dense")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "dense").eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(TOKENS).logits, run.model(TOKENS).logits, rtol=0, atol=_EXACT)
