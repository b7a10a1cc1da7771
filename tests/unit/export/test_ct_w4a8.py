"""compressed-tensors W4A8 (pack-quantized) and W8A8 (int-quantized) files of a dgq result.

The stored integers and scales, decoded by the library's own decompressors, are our dual-grained weights bit for
bit; transformers' default loader runs them with INT8 per-token activations (checked against a slow reference
written here), so its logits differ from our in-memory INT8 model only by the activation scale's denominator
(compressed-tensors divides a token's max by 127.5, we and vLLM's int8 kernels by 127).
"""

from __future__ import annotations

import json
import types
from pathlib import Path
from typing import Any

import pytest
import torch
from compressed_tensors.compressors.naive_quantized.base import IntQuantizationCompressor
from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
from compressed_tensors.quantization import QuantizationScheme
from safetensors.torch import load_file
from tiny import tiny_model
from transformers import AutoModelForCausalLM

from compressor.engine import ModelContext, run_stages
from compressor.errors import ExportError, RecipeError
from compressor.export.compressed_tensors import write_compressed_tensors
from compressor.methods.quant.dgq import DGQConfig
from compressor.methods.quant.int8_linear import Int8Linear, float_activations
from compressor.models import get_adapter
from compressor.pipeline import compress, load
from compressor.recipe import build_stages, load_recipe, recipe_from_dict

SCHEMES = {4: {"weight_bits": 4, "group_size": 32}, 8: {"weight_bits": 8}}


def _dgq_model(bits: int, **extra: Any) -> ModelContext:
    model = tiny_model("llama")
    tokens = torch.randint(0, 300, (4, 32), generator=torch.Generator().manual_seed(0))
    run = ModelContext(model, get_adapter(model), tokens, torch.device("cpu"), batch_size=2)
    config = DGQConfig.model_validate({"method": "dgq", **SCHEMES[bits], **extra})
    run_stages(run, build_stages([config], "compressed-tensors"))
    return run


@pytest.fixture(scope="module", params=[4, 8], ids=["w4a8", "w8a8"])
def exported(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[int, Any, Path]:
    """(bits, dgq-quantized in-memory model, its compressed-tensors directory), made once per scheme."""
    run = _dgq_model(request.param)
    out = tmp_path_factory.mktemp(f"ct{request.param}")
    write_compressed_tensors(run.model, run.quantized, out)
    return request.param, run.model, out


def _int8_linears(model: torch.nn.Module) -> dict[str, Int8Linear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, Int8Linear)}


def test_config_declares_int8_token_activations_and_the_format(exported: tuple[int, Any, Path]) -> None:
    bits, model, out = exported
    quant = json.loads((out / "config.json").read_text())["quantization_config"]
    expected_format = "pack-quantized" if bits == 4 else "int-quantized"  # W4A8 set explicitly, not inferred
    assert quant["format"] == expected_format and quant["quantization_status"] == "compressed"
    (group,) = quant["config_groups"].values()
    assert group["format"] == expected_format
    assert {k: group["input_activations"][k] for k in ("num_bits", "type", "symmetric", "strategy", "dynamic")} == {
        "num_bits": 8, "type": "int", "symmetric": True, "strategy": "token", "dynamic": True}
    weights = group["weights"]
    assert (weights["num_bits"], weights["strategy"], weights["group_size"]) == (
        (4, "group", 32) if bits == 4 else (8, "channel", None))
    assert len(group["targets"]) == len(_int8_linears(model)) and quant["ignore"] == ["lm_head"]


def test_stored_weights_decode_to_our_int8_weights_bit_for_bit(exported: tuple[int, Any, Path]) -> None:
    """Decoded by the library's own decompressor, the file's codes and scales (integer x channel scale products)
    give ``weight_int8 * channel_scale``: the weight our INT8 matmul multiplies, bit for bit."""
    bits, model, out = exported
    tensors = load_file(str(out / "model.safetensors"))
    scheme = QuantizationScheme.model_validate(
        next(iter(json.loads((out / "config.json").read_text())["quantization_config"]["config_groups"].values())))
    compressor = PackedQuantizationCompressor if bits == 4 else IntQuantizationCompressor
    for path, module in _int8_linears(model).items():
        names = ("weight_packed", "weight_scale", "weight_shape") if bits == 4 else ("weight", "weight_scale")
        stored = {name: tensors[f"{path}.{name}"] for name in names}
        if bits == 8:
            assert stored["weight"].dtype == torch.int8 and torch.equal(stored["weight"], module.weight_int8)
            assert torch.equal(stored["weight_scale"][:, 0], module.channel_scale)
        decoded = compressor.decompress(stored, scheme)["weight"]
        expected = module.weight_int8.double() * module.channel_scale.double()[:, None]  # exact in float64
        assert torch.equal(decoded.double(), expected), path


def _loader_reference(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """Slow reference of compressed-tensors' dynamic per-token INT8 fake quantization on our dequantized weights:
    scale = max|x| / 127.5 (its symmetric range (127 - -128) / 2), codes clamp(round(x / scale), -128, 127)."""

    def forward(self: Int8Linear, x: torch.Tensor) -> torch.Tensor:
        scale = x.abs().amax(dim=-1, keepdim=True) / 127.5
        codes = torch.clamp(torch.round(x / scale), -128, 127)
        return torch.nn.functional.linear(codes * scale, self.weight, self.bias)

    saved = {m: m.forward for m in _int8_linears(model).values()}
    try:
        for module in saved:
            module.forward = types.MethodType(forward, module)  # type: ignore[method-assign]
        with torch.no_grad():
            return model(ids).logits
    finally:
        for module, original in saved.items():
            module.forward = original  # type: ignore[method-assign]


def test_transformers_loader_applies_int8_activations(exported: tuple[int, Any, Path]) -> None:
    """transformers 5.23's default load keeps each module's compressed-tensors scheme and quantized forward
    (status DECOMPRESSED after the first forward): inputs are fake-quantized to INT8 per token, weights are ours."""
    bits, model, out = exported
    ids = torch.randint(0, 300, (2, 16), generator=torch.Generator().manual_seed(1))
    loaded = AutoModelForCausalLM.from_pretrained(out).eval()
    with torch.no_grad():
        theirs = loaded(ids).logits
        ours_int8 = model(ids).logits
        with float_activations(model):
            ours_float = model(ids).logits
        torch.testing.assert_close(theirs, _loader_reference(model, ids), rtol=0, atol=1e-6)
        # measured on this tiny llama: max |diff| 0.008 (W4A8) and 0.006 (W8A8) from our INT8 model, whose token
        # scale is max / 127; the float-activation logits are as far: activation rounding, not the weights
        assert 0 < float((theirs - ours_int8).abs().max()) < 0.05
        assert 0 < float((theirs - ours_float).abs().max()) < 0.05
        for module in loaded.modules():
            if hasattr(module, "quantization_scheme"):
                module.quantization_enabled = False
        assert torch.equal(loaded(ids).logits, ours_float)  # without its activation step: exactly our weights


def test_clipped_activations_are_refused(tmp_path: Path) -> None:
    data = {"name": "x", "stages": [{"method": "dgq", "act_percentile": 99.0}],
            "export": {"format": "compressed-tensors"}}
    with pytest.raises(RecipeError, match="stages.0: act_percentile 99 cannot be stored in compressed-tensors"):
        recipe_from_dict(data)
    run = _dgq_model(4, act_percentile=99.0, smoothing=None)
    with pytest.raises(ExportError, match="clipped at percentile 99 cannot be stored"):
        write_compressed_tensors(run.model, run.quantized, tmp_path)


def test_compress_writes_w4a8_that_transformers_loads(model_dir_factory: Any, text_file: Path, tmp_path: Path) -> None:
    """The whole pipeline: recipe validation, calibration, INT8 evaluation, compressed-tensors writer."""
    data = {
        "name": "t",
        "calibration": {"dataset": str(text_file), "samples": 4, "seq_len": 32, "batch_size": 2},
        "stages": [{"method": "dgq", "group_size": 32}],
        "export": {"format": "compressed-tensors"},
    }
    loaded = load(model_dir_factory("llama"), dtype="float32")
    report = compress(loaded, recipe_from_dict(data), tmp_path / "out", device="cpu")
    assert {r["method"] for r in report.layers} == {"dgq"}
    assert not [w for w in report.warnings if "INT8 activations are computed in memory" in str(w)]
    ids = torch.tensor([[5, 17, 42, 99, 3, 250, 7, 8]])
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, _loader_reference(loaded.model, ids), rtol=0, atol=1e-6)


@pytest.mark.parametrize(("name", "fmt"), [("w4a8-dgq", "pack-quantized"), ("w8a8", "int-quantized")])
def test_shipped_recipes_write_int8_activation_files(name: str, fmt: str, model_dir_factory: Any, text_file: Path,
                                                     tmp_path: Path) -> None:
    """The shipped recipes on a tiny Llama (64 wide: groups of 32 stand in for 128) write what their name says."""
    recipe = load_recipe(name)
    assert recipe.stages[0].method == "dgq" and recipe.stages[0].solver == "gptq"
    assert recipe.stages[0].smoothing is not None and recipe.export.format == "compressed-tensors"
    overrides = [f"calibration.dataset={text_file}", "calibration.samples=4", "calibration.seq_len=32",
                 "calibration.batch_size=2"]
    if recipe.stages[0].weight_bits == 4:
        overrides.append("stages.0.group_size=32")
    loaded = load(model_dir_factory("llama"))
    compress(loaded, load_recipe(name, overrides), tmp_path / name, device="cpu")
    quant = json.loads((tmp_path / name / "config.json").read_text())["quantization_config"]
    assert quant["format"] == fmt
    assert all(g["input_activations"]["num_bits"] == 8 for g in quant["config_groups"].values())
    ids = torch.tensor([[5, 17, 42, 99, 3, 250, 7, 8]])
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / name).eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, _loader_reference(loaded.model, ids), rtol=0, atol=1e-6)


@pytest.mark.parametrize("bits", [4, 8], ids=["w4a8", "w8a8"])
def test_bf16_file_holds_the_in_memory_int8_model(bits: int, tmp_path: Path) -> None:
    """bf16 stores each group scale ``u * s`` in bf16: the channel scales keep few enough significant bits that every
    stored scale is exact, so the file decodes to the integers and scales our INT8 matmul uses, and transformers'
    model (activation step off) gives our float-activation logits bit for bit."""
    base = tiny_model("llama")
    model = AutoModelForCausalLM.from_config(base.config, dtype=torch.bfloat16)  # as a loader builds it
    model.load_state_dict(base.state_dict())
    tokens = torch.randint(0, 300, (4, 32), generator=torch.Generator().manual_seed(0))
    run = ModelContext(model.eval(), get_adapter(model), tokens, torch.device("cpu"), batch_size=2)
    records = run_stages(run, build_stages([DGQConfig.model_validate({"method": "dgq", **SCHEMES[bits]})],
                                           "compressed-tensors"))
    assert all(f"rounded to {4 if bits == 4 else 8} significant bits" in r.note for r in records)
    write_compressed_tensors(run.model, run.quantized, tmp_path)
    tensors = load_file(str(tmp_path / "model.safetensors"))
    for path, module in _int8_linears(run.model).items():
        stored = tensors[f"{path}.weight_scale"]
        assert stored.dtype == torch.bfloat16
        exact = module.int_scale.double() * module.channel_scale.double()[:, None]  # the in-memory group scales
        assert torch.equal(stored.double(), exact), path
    ids = torch.randint(0, 300, (2, 16), generator=torch.Generator().manual_seed(1))
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    for module in loaded.modules():
        if hasattr(module, "quantization_scheme"):
            module.quantization_enabled = False
    with torch.no_grad(), float_activations(run.model):
        assert torch.equal(loaded(ids).logits, run.model(ids).logits)
