"""The flap stage through the engine on tiny llama-layout models: what it removes, compensates, refuses, stores."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from tiny import tiny_model
from transformers import AutoConfig, AutoModelForCausalLM

from compressor.engine import ModelContext, run_stages
from compressor.errors import RecipeError
from compressor.methods.prune.flap import FLAP, FLAPConfig
from compressor.models import get_adapter
from compressor.recipe import build_stages

TOKENS = torch.randint(0, 300, (4, 32), generator=torch.Generator().manual_seed(0))


def _mistral() -> torch.nn.Module:
    """A tiny Mistral (the llama family's second model type), sized like the tiny llama."""
    torch.manual_seed(0)
    config = AutoConfig.for_model("mistral", vocab_size=320, hidden_size=64, num_hidden_layers=3, num_attention_heads=4,
                                  num_key_value_heads=2, intermediate_size=128, max_position_embeddings=256)
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()


def _model(family: str, **overrides: object) -> torch.nn.Module:
    return _mistral() if family == "mistral" else tiny_model(family, **overrides)


def _run(model: torch.nn.Module, **config: object) -> tuple[ModelContext, list]:
    run = ModelContext(model, get_adapter(model), TOKENS, torch.device("cpu"), batch_size=2)
    stages = build_stages([FLAPConfig.model_validate({"method": "flap", **config})], "dense")
    return run, run_stages(run, stages)


def _sublayer_params(run: ModelContext) -> int:
    adapter = run.adapter
    return sum(p.numel() for layer in adapter.layers() for m in (adapter.attention(layer), adapter.mlp(layer))
               for p in m.parameters())


def _quiet_kv_group(model: torch.nn.Module, layer: int = 1) -> None:
    """Scale KV group 0's value rows of one layer by 1e-2: its heads' outputs (o_proj's inputs) barely fluctuate.

    Standardised per layer, a head group scores the mean of its channels' z-scores, which in a random tiny model
    stays near 0 while MLP channels reach -1.2; a quiet group (z about -0.3) and a 50% budget give the global
    threshold a head to remove."""
    adapter = get_adapter(model)
    v_proj = adapter.attention_inputs(adapter.layers()[layer])[2]
    head_dim = model.config.hidden_size // model.config.num_attention_heads
    with torch.no_grad():
        v_proj.weight[:head_dim].mul_(1e-2)


@pytest.mark.parametrize("family", ["llama", "qwen2", "mistral"])
def test_global_flap_removes_kv_groups_and_channels_within_budget(family: str) -> None:
    model = _model(family)
    _quiet_kv_group(model)
    with torch.no_grad():
        before_logits = model(TOKENS).logits
    run = ModelContext(model, get_adapter(model), TOKENS, torch.device("cpu"), batch_size=2)
    before = _sublayer_params(run)
    run, records = _run(model, structure="global", ratio=0.5, compensate=False)
    removed = before - _sublayer_params(run)
    assert 0 < removed <= math.floor(0.5 * before)
    assert removed == sum(r.params_before - r.params_after for r in records)
    adapter, shapes = run.adapter, run.structure["flap"]["layers"]
    assert any(s["kv_heads"] < 2 for s in shapes), "a 50% budget on this model removes the quiet KV group"
    for layer, shape in zip(adapter.layers(), shapes, strict=True):
        q, k, v = adapter.attention_inputs(layer)
        # whole KV groups: 2 query heads of 16 per KV head, so q keeps twice k's rows
        assert (q.out_features, k.out_features, v.out_features) == (32 * shape["kv_heads"], 16 * shape["kv_heads"],
                                                                    16 * shape["kv_heads"])
        assert adapter.attention_output(layer).in_features == q.out_features
        assert adapter.mlp_output(layer).in_features == shape["intermediate_size"]
        assert shape["kv_heads"] >= 1 and shape["intermediate_size"] >= 1
    assert len(records) == 2 * adapter.num_layers
    assert {"heads_after", "removed_kv_groups"} <= set(records[0].extra)
    with torch.no_grad():
        logits = model(TOKENS).logits
    assert logits.shape == before_logits.shape and torch.isfinite(logits).all()


def _constant_channel_model(down_bias: bool = True) -> torch.nn.Module:
    """Tiny llama with MLP biases whose channel 5 has zero gate and up rows: its down_proj input is a constant.

    Without ``down_bias`` down_proj has none, so compensation must create one.
    """
    model = tiny_model("llama", mlp_bias=True)
    with torch.no_grad():
        for layer in model.model.layers:
            if not down_bias:
                layer.mlp.down_proj.bias = None
            layer.mlp.gate_proj.weight[5] = 0.0
            layer.mlp.up_proj.weight[5] = 0.0
            layer.mlp.gate_proj.bias[5] = layer.mlp.up_proj.bias[5] = 3.0  # silu(3) * 3: a large constant
    return model


@pytest.mark.parametrize("down_bias", [True, False])
def test_compensation_of_a_constant_channel_keeps_the_output(down_bias: bool) -> None:
    """Uniform at 1% removes one MLP channel per layer: the constant one (fluctuation 0); its mean goes to a bias."""
    model = _constant_channel_model(down_bias)
    with torch.no_grad():
        reference = model(TOKENS).logits
    run, records = _run(model, structure="uniform", ratio=0.01, compensate=True)
    mlp_records = [r for r in records if r.module.endswith(".mlp")]
    assert [r.extra["removed_channels"] for r in mlp_records] == [1, 1, 1]
    assert all(layer.mlp.down_proj.bias is not None and layer.mlp.down_proj.in_features == 127
               for layer in model.model.layers)
    with torch.no_grad():
        torch.testing.assert_close(model(TOKENS).logits, reference, rtol=1e-5, atol=1e-5)

    uncompensated = _constant_channel_model(down_bias)
    _run(uncompensated, structure="uniform", ratio=0.01, compensate=False)
    with torch.no_grad():
        assert (uncompensated(TOKENS).logits - reference).abs().max() > 1e-2


def test_uniform_result_without_bias_reloads_in_stock_transformers(tmp_path: Path) -> None:
    model = tiny_model("qwen2")
    run, _ = _run(model, structure="uniform", ratio=0.5)
    assert run.structure["flap"]["standard"]
    assert (model.config.num_attention_heads, model.config.num_key_value_heads, model.config.intermediate_size,
            model.config.head_dim) == (2, 1, 64, 16)
    model.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    with torch.no_grad():
        assert torch.equal(reloaded(TOKENS).logits, model(TOKENS).logits)


def test_compensated_or_adaptive_result_ships_the_modeling_file() -> None:
    model = tiny_model("llama")
    run, _ = _run(model, structure="global", ratio=0.3, compensate=True)
    assert not run.structure["flap"]["standard"]
    assert model.config.intermediate_size == 128 and model.config.num_key_value_heads == 2
    spec = run.structure["remote_code"]
    assert spec["file"] == "modeling_flap.py"
    assert spec["auto_map"] == {"AutoModelForCausalLM": "modeling_flap.FLAPLlamaForCausalLM"}
    assert spec["config"]["flap"] is model.config.flap and len(model.config.flap["layers"]) == 3
    assert model.config.flap["layout"]["mlp"]["output"] == "mlp.down_proj"


@pytest.mark.parametrize(("family", "reason"), [
    ("opt", "not a gate/up/down triple"), ("gemma3", "post-norms"), ("phi3", "fuses q/k/v"),
    ("mixtral", "mixture of experts"), ("qwen3_moe", "mixture of experts"),
])
def test_families_it_cannot_narrow_are_refused_before_any_work(family: str, reason: str) -> None:
    model = tiny_model(family)
    get_adapter(model)  # a MoE adapter gives the experts their own linears: compare from there
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(RecipeError, match=reason):
        _run(model, structure="global", compensate=True)
    assert all(torch.equal(v, weights[k]) for k, v in model.state_dict().items())


def test_recipe_validation_refuses_what_cannot_be_stored() -> None:
    from compressor.methods.prune.layer_drop import LayerDropConfig

    def check(fmt: str, later: list | None = None, **config: object) -> str | None:
        return FLAP.check_recipe(FLAPConfig.model_validate({"method": "flap", **config}), later or [], fmt)

    assert check("dense") is None
    assert check("dense", structure="global", compensate=True) is None
    assert check("compressed-tensors", structure="global", compensate=True) is None
    assert "gguf cannot store" in (check("gguf") or "")
    assert check("bitstack", structure="global", compensate=True) is None  # its directory ships modeling_flap.py
    assert "compressor-int8 cannot store" in (check("compressor-int8") or "")
    later_prune = check("dense", [LayerDropConfig.model_validate({"method": "layer_drop", "remove": 1})])
    assert "flap must be the last pruning stage: layer_drop" in (later_prune or "")
    with pytest.raises(ValueError, match="ratio"):
        FLAPConfig.model_validate({"method": "flap", "ratio": 1.5})
    with pytest.raises(ValueError, match="extra"):
        FLAPConfig.model_validate({"method": "flap", "heads": 2})


def test_later_quantizer_sees_the_narrower_shapes() -> None:
    from compressor.methods.quant.rtn import RTNConfig

    model = tiny_model("llama")
    run = ModelContext(model, get_adapter(model), TOKENS, torch.device("cpu"), batch_size=2)
    configs = [FLAPConfig(method="flap", structure="global", ratio=0.3), RTNConfig(method="rtn")]
    records = run_stages(run, build_stages(configs, "dense"))
    rtn = {r.module: r for r in records if r.method == "rtn"}
    down = f"{run.adapter.layer_prefix(0)}.mlp.down_proj"
    assert rtn[down].params_before == model.model.layers[0].mlp.down_proj.weight.numel() < 64 * 128


def test_per_layer_keeps_each_layer_within_its_own_budget() -> None:
    model = tiny_model("llama", num_key_value_heads=4)  # no GQA: a KV group is one head
    run = ModelContext(model, get_adapter(model), TOKENS, torch.device("cpu"), batch_size=2)
    adapter = run.adapter
    before = [sum(p.numel() for m in (adapter.attention(layer), adapter.mlp(layer)) for p in m.parameters())
              for layer in adapter.layers()]
    run, records = _run(model, structure="per_layer", ratio=0.25)
    for index, layer in enumerate(adapter.layers()):
        after = sum(p.numel() for m in (adapter.attention(layer), adapter.mlp(layer)) for p in m.parameters())
        assert 0 < before[index] - after <= math.floor(0.25 * before[index])
        q, k, _ = adapter.attention_inputs(layer)
        assert q.out_features == k.out_features == 16 * run.structure["flap"]["layers"][index]["kv_heads"]
    with torch.no_grad():
        assert torch.isfinite(model(TOKENS).logits).all()


def test_recipe_with_the_papers_settings_validates_and_gguf_is_refused_before_a_model_loads() -> None:
    from compressor.recipe import recipe_from_dict

    stage = {"method": "flap", "ratio": 0.2, "structure": "global", "compensate": True}
    data = {"name": "t", "calibration": {"dataset": "demo:lee", "samples": 2, "seq_len": 16}, "stages": [stage]}
    assert recipe_from_dict({**data, "export": {"format": "dense"}}).stages
    gptq = {"method": "gptq", "bits": 4, "group_size": 128}
    assert recipe_from_dict({**data, "stages": [stage, gptq], "export": {"format": "compressed-tensors"}}).stages
    with pytest.raises(RecipeError, match="stages.0: flap: gguf cannot store"):
        recipe_from_dict({**data, "stages": [{"method": "flap"}, gptq], "export": {"format": "gguf"}})


def test_round_to_keeps_a_multiple_of_channels_within_the_budget() -> None:
    model = tiny_model("llama")
    run = ModelContext(model, get_adapter(model), TOKENS, torch.device("cpu"), batch_size=2)
    before = _sublayer_params(run)
    run, records = _run(model, structure="global", ratio=0.3, compensate=True, round_to=32)
    widths = [s["intermediate_size"] for s in run.structure["flap"]["layers"]]
    assert all(w % 32 == 0 for w in widths) and min(widths) < 128, widths
    assert 0 < before - _sublayer_params(run) <= math.floor(0.3 * before)
    with pytest.raises(ValueError, match="round_to"):
        FLAPConfig.model_validate({"method": "flap", "round_to": 0})


def test_global_choice_does_not_depend_on_a_layers_overall_scale() -> None:
    """The paper standardises each layer's scores on their own: scaling the last layer's down_proj by 1e-2 scales
    all its channel scores by 1e-4 (and touches no other layer's statistics), which must not change what global
    FLAP removes; standardised across layers, that layer's channels would all fall below the threshold."""
    shapes = []
    for scale in (1.0, 1e-2):
        model = tiny_model("llama")
        with torch.no_grad():
            get_adapter(model).mlp_output(get_adapter(model).layers()[-1]).weight.mul_(scale)
        run, _ = _run(model, structure="global", ratio=0.3, compensate=False)
        shapes.append(run.structure["flap"]["layers"])
    assert shapes[0] == shapes[1]
