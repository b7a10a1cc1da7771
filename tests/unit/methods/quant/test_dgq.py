"""The dgq stage: strict config, refused exports, and what it leaves in a tiny model of every family (INT8 linears
whose forward really multiplies in INT8, smoothing that keeps each layer's float function)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from tiny import FAMILIES, tiny_model
from torch import nn
from transformers import AutoModelForCausalLM

from compressor.engine import LayerContext, ModelContext, run_stages
from compressor.errors import RecipeError
from compressor.methods.quant import dgq as dgq_module
from compressor.methods.quant import int8_linear
from compressor.methods.quant.dgq import DGQConfig, _smooth
from compressor.methods.quant.int8_linear import Int8Linear, float_activations
from compressor.models import get_adapter
from compressor.pipeline import compress, evaluate, load
from compressor.recipe import build_stages, recipe_from_dict

ROUTED = ("mixtral", "qwen3_moe")  # a router reads the MLP norm's output besides the experts


def _run(family: str, **config: Any) -> tuple[ModelContext, list[Any]]:
    model = tiny_model(family)
    tokens = torch.randint(0, 300, (4, 32), generator=torch.Generator().manual_seed(0))
    run = ModelContext(model, get_adapter(model), tokens, torch.device("cpu"), batch_size=2)
    stages = build_stages([DGQConfig.model_validate({"method": "dgq", **config})])
    return run, run_stages(run, stages)


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"weight_bits": 8, "group_size": 128}, "group_size: weight_bits 8"),
        ({"weight_bits": 3}, "weight_bits"),
        ({"act_percentile": 0}, "act_percentile must be in"),
        ({"smoothing": 1.5}, "smoothing must be an alpha"),
        ({"solver": "awq"}, "solver"),
        ({"bits": 4}, "Extra inputs"),
    ],
)
def test_config_is_strict(fields: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        DGQConfig.model_validate({"method": "dgq", **fields})


@pytest.mark.parametrize("export", ["gguf", "bitstack"])
def test_exports_without_int8_activations_are_refused_at_validation(export: str) -> None:
    data = {"name": "x", "stages": [{"method": "dgq"}], "export": {"format": export}}
    with pytest.raises(RecipeError, match=f"stages.0: dgq cannot be exported as {export} "):
        recipe_from_dict(data)
    for ok in ("dense", "compressed-tensors"):
        assert recipe_from_dict({**data, "export": {"format": ok}}).stages[0].method == "dgq"


@pytest.mark.parametrize(("fields", "group_size"), [({}, 128), ({"weight_bits": 8}, -1), ({"group_size": 64}, 64)])
def test_unset_group_size_is_resolved(fields: dict[str, Any], group_size: int) -> None:
    """The export checks read bits/group_size/symmetric from every quantizing stage: dgq states its real ones."""
    config = DGQConfig.model_validate({"method": "dgq", **fields})
    assert (config.group_size, config.bits, config.symmetric) == (group_size, fields.get("weight_bits", 4), True)


@pytest.mark.parametrize("bits", [4, 8])
def test_linears_become_int8_and_match_the_stored_form(bits: int) -> None:
    group = {"group_size": 32} if bits == 4 else {}
    run, records = _run("llama", weight_bits=bits, **group)
    modules = dict(run.model.named_modules())
    assert {r.module for r in records} == set(run.quantized)
    for record in records:
        module = modules[record.module]
        assert isinstance(module, Int8Linear)
        stored = run.quantized[record.module]
        assert stored.bits == bits and record.bits == bits
        assert record.group_size == (32 if bits == 4 else -1) and stored.group_size == record.group_size
        assert torch.equal(stored.dequantize(), module.weight.data)  # the group-scale form is exact
        assert torch.equal(module.weight_int8.float() * module.channel_scale[:, None], module.weight.data)
        assert 0 < record.rel_error < 0.5 and record.extra["activation_bits"] == 8


def test_model_forward_multiplies_in_int8(monkeypatch: pytest.MonkeyPatch) -> None:
    run, records = _run("llama", group_size=32, solver="rtn")
    calls: list[tuple[int, ...]] = []
    real = int8_linear.int8_matmul

    def spy(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        calls.append(tuple(a.shape))
        return real(a, b)

    monkeypatch.setattr(int8_linear, "int8_matmul", spy)
    tokens = run.tokens[:1, :8]
    with torch.no_grad():
        logits = run.model(tokens).logits
        assert len(calls) == len(records)  # every quantized linear, once
        with float_activations(run.model):
            dense = run.model(tokens).logits
    assert len(calls) == len(records)
    assert torch.isfinite(logits).all() and not torch.allclose(logits, dense, atol=1e-4)


@pytest.mark.parametrize("family", FAMILIES)
def test_smoothing_keeps_the_layer_and_skips_routed_mlps(family: str) -> None:
    model = tiny_model(family)
    adapter = get_adapter(model)
    tokens = torch.randint(0, 300, (2, 16), generator=torch.Generator().manual_seed(1))
    run = ModelContext(model, adapter, tokens, torch.device("cpu"), batch_size=2)
    layer = adapter.layers()[1]
    ctx = LayerContext(index=1, layer=layer, run=run, inputs=run.capture_inputs().layer(1))
    ctx.inputs = [type(b)(b.hidden * torch.linspace(0.5, 5, b.hidden.shape[-1]), b.kwargs) for b in ctx.inputs]
    before = ctx.forward()
    attention_norm = adapter.attention_norm(layer).weight.detach().clone()
    mlp_norm = adapter.mlp_norm(layer).weight.detach().clone()
    targeted = {ctx.path(n) for n, m in layer.named_modules() if isinstance(m, nn.Linear)}
    notes = _smooth(ctx, DGQConfig(method="dgq", smoothing=0.5), targeted)
    after = ctx.forward()
    for b, a in zip(before, after, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    assert not torch.equal(adapter.attention_norm(layer).weight, attention_norm)
    q = ctx.path(adapter.family.attention.inputs[0])
    assert notes[q].startswith("smoothed")
    mlp_paths = [ctx.path(n) for n, m in layer.named_modules() if m in adapter.mlp_inputs(layer)]
    if family in ROUTED:
        assert torch.equal(adapter.mlp_norm(layer).weight, mlp_norm)
        assert all("not smoothed" in notes[p] and "router" in notes[p] for p in mlp_paths)
    else:
        assert not torch.equal(adapter.mlp_norm(layer).weight, mlp_norm)
        assert all(notes[p].startswith("smoothed") for p in mlp_paths)


def test_post_norm_opt_is_not_smoothed() -> None:
    """OPT with LayerNorm after each block: its norms do not feed q/k/v or fc1, so no scale is folded."""
    model = tiny_model("opt", do_layer_norm_before=False)
    adapter = get_adapter(model)
    tokens = torch.randint(0, 300, (2, 16), generator=torch.Generator().manual_seed(1))
    run = ModelContext(model, adapter, tokens, torch.device("cpu"), batch_size=2)
    layer = adapter.layers()[0]
    ctx = LayerContext(index=0, layer=layer, run=run, inputs=run.capture_inputs().layer(0))
    norms = [n.weight.detach().clone() for n in (adapter.attention_norm(layer), adapter.mlp_norm(layer))]
    targeted = {ctx.path(n) for n, m in layer.named_modules() if isinstance(m, nn.Linear)}
    notes = _smooth(ctx, DGQConfig(method="dgq"), targeted)
    assert torch.equal(adapter.attention_norm(layer).weight, norms[0])
    assert torch.equal(adapter.mlp_norm(layer).weight, norms[1])
    assert notes and all("do_layer_norm_before=false" in note for note in notes.values())


def test_hessian_sees_the_int8_predecessors(monkeypatch: pytest.MonkeyPatch) -> None:
    """o_proj's Hessian is gathered after q/k/v are already INT8 linears (sequential, like GPTQ)."""
    seen: list[list[str]] = []
    real = dgq_module._hessian

    def spy(ctx: LayerContext, group: Any) -> torch.Tensor:
        seen.append([type(m).__name__ for m in ctx.layer.modules() if isinstance(m, nn.Linear)])
        return real(ctx, group)

    monkeypatch.setattr(dgq_module, "_hessian", spy)
    _run("llama", smoothing=None)
    assert "Int8Linear" not in seen[0] and seen[1].count("Int8Linear") == 3  # q, k, v before o_proj


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_compress_evaluates_int8_and_writes_dense_weights(
    model_dir_factory: Any, text_file: Path, tmp_path: Path, dtype: str
) -> None:
    """compress() with eval: the 'after' perplexity is the INT8 model's (the in-memory model keeps Int8Linears);
    the dense file reloads as the same weights with float activations."""
    data = {
        "name": "t",
        "calibration": {"dataset": str(text_file), "samples": 4, "seq_len": 32, "batch_size": 2},
        "stages": [{"method": "dgq", "group_size": 32}],
        "export": {"format": "dense"},
    }
    loaded = load(model_dir_factory("llama"), dtype=dtype)
    report = compress(loaded, recipe_from_dict(data), tmp_path / "out", device="cpu", eval_data=str(text_file),
                      eval_max_tokens=256)
    assert {r["method"] for r in report.layers} == {"dgq"}
    int8 = [m for m in loaded.model.modules() if isinstance(m, Int8Linear)]
    assert len(int8) == len(report.layers)
    tokens = torch.tensor([[5, 17, 42, 99, 3, 250, 7, 8]])
    with torch.no_grad():
        after = evaluate(loaded, str(text_file), seq_len=32, max_tokens=256, device="cpu").ppl
        with float_activations(loaded.model):
            expected = loaded.model(tokens).logits
        reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=getattr(torch, dtype))
        torch.testing.assert_close(reloaded(tokens).logits, expected, rtol=0, atol=0)
    assert report.eval is not None and report.eval["after"]["ppl"] == pytest.approx(after)
    # the report says, for every module, that the file runs float activations
    told = [w for w in report.warnings if "INT8 activations are computed in memory" in str(w)]
    assert sum(w["count"] for w in told) == len(report.layers)


def test_group_scales_float16_cannot_hold_are_refused() -> None:
    """A channel scale below float16's normal range would be stored rounded in compressed-tensors: refused, naming
    the module and the format that keeps float32 scales; other formats store it as it is."""
    from compressor.errors import ExportError
    from compressor.methods.quant.dgq import _check_stored_scales
    from compressor.methods.quant.dgq_ops import DualGrainedWeight

    weight = DualGrainedWeight(torch.ones(2, 4, dtype=torch.int8), torch.tensor([[3], [5]], dtype=torch.int16),
                               torch.tensor([2.0**-10, 3 * 2.0**-30]), bits=4, group_size=-1)
    with pytest.raises(ExportError, match="model.layers.0.mlp.up_proj: a group scale .* not exact in float16 .* "
                                          "compressor-int8"):
        _check_stored_scales("model.layers.0.mlp.up_proj", weight, torch.float16, "compressed-tensors")
    _check_stored_scales("x", weight, torch.float16, "compressor-int8")
    _check_stored_scales("x", weight, torch.bfloat16, "compressed-tensors")  # bf16 has float32's range
