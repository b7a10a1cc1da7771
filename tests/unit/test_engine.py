"""The engine's capture and layer chaining reproduce the model's own forward pass."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import torch
from tiny import FAMILIES, tiny_model

from compressor.engine import LayerContext, ModelContext, run_stages, split_passes
from compressor.errors import UnsupportedModelError
from compressor.methods.base import LayerRecord, Method, MethodConfig
from compressor.methods.quant.baq import BAQConfig
from compressor.methods.quant.bitstack import BitStackConfig
from compressor.methods.quant.ops import QuantizedWeight
from compressor.methods.registry import get_method
from compressor.models import get_adapter


class _Observe(Method):
    """Records each layer's output hidden states without changing anything."""

    config_class = MethodConfig

    def __init__(self, model_level: bool = False) -> None:
        super().__init__(MethodConfig(method="observe"))
        self.outputs: list[torch.Tensor] = []
        self.model_level = model_level  # type: ignore[misc]

    def apply(self, ctx: LayerContext) -> list[LayerRecord]:
        self.outputs.append(torch.cat(ctx.forward()))
        return [LayerRecord(module=ctx.prefix, method="observe")]


def _tokens(n: int = 4, length: int = 16) -> torch.Tensor:
    return torch.randint(0, 300, (n, length), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("family", FAMILIES)
def test_layer_chain_matches_model_hidden_states(family: str) -> None:
    model = tiny_model(family)
    tokens = _tokens()
    with torch.no_grad():
        expected = model(tokens, output_hidden_states=True).hidden_states
    observe = _Observe()
    run = ModelContext(model, get_adapter(model), tokens, torch.device("cpu"), batch_size=3)
    records = run_stages(run, [observe])
    assert [r.module for r in records] == [run.adapter.layer_prefix(i) for i in range(3)]
    # hidden_states[i + 1] is layer i's output, except the last which transformers reports after the final norm
    for i in range(2):
        torch.testing.assert_close(observe.outputs[i], expected[i + 1], rtol=1e-5, atol=1e-5)


def test_hessian_is_two_over_n_xtx() -> None:
    model = tiny_model("llama")
    run = ModelContext(model, get_adapter(model), _tokens(), torch.device("cpu"), batch_size=2)
    layer = run.adapter.layers()[0]
    ctx = LayerContext(0, layer, run, run.capture_inputs().layer(0))
    group = run.adapter.linear_groups()[0]
    seen = []
    handle = ctx.module(group.names[0]).register_forward_pre_hook(lambda m, a: seen.append(a[0].reshape(-1, 64)))
    ctx.forward()
    handle.remove()
    X = torch.cat(seen).double()
    torch.testing.assert_close(ctx.hessian(group).double(), 2 * X.T @ X / X.shape[0], rtol=1e-4, atol=1e-5)


def test_model_level_stage_closes_a_pass() -> None:
    a, b, c = _Observe(), _Observe(model_level=True), _Observe()
    assert split_passes([a, b, c]) == [[a, b], [c]]
    assert split_passes([a, c]) == [[a, c]]


def test_a_stage_that_runs_the_whole_model_in_prepare_opens_a_pass() -> None:
    """BAQ's and BitStack's fisher run the model in ``prepare``: an earlier stage of the pass must have finished."""
    a, c = _Observe(), _Observe()
    fisher = get_method("bitstack")(BitStackConfig(method="bitstack"))
    relative = get_method("bitstack")(BitStackConfig(method="bitstack", order="relative"))
    baq = get_method("baq")(BAQConfig(method="baq"))
    assert split_passes([a, fisher]) == [[a], [fisher]]
    assert split_passes([fisher]) == [[fisher]]
    assert split_passes([a, relative, c]) == [[a, relative], [c]]  # bitstack and baq are model-level: they close one
    assert split_passes([a, baq, c]) == [[a], [baq], [c]]


def _layer_context(family: str) -> LayerContext:
    model = tiny_model(family)
    run = ModelContext(model, get_adapter(model), _tokens(), torch.device("cpu"), batch_size=3)
    return LayerContext(0, run.adapter.layers()[0], run, run.capture_inputs().layer(0))


@contextmanager
def _without_replays(ctx: LayerContext) -> Iterator[None]:
    """Recompute every sublayer inside the block; the replays come back after it."""
    replays = dict(ctx._replays)
    ctx.thaw()
    try:
        yield
    finally:
        ctx._replays.update(replays)


def _full_forward(ctx: LayerContext) -> list[torch.Tensor]:
    with _without_replays(ctx):
        return ctx.forward()


@pytest.mark.parametrize("family", FAMILIES)
def test_replayed_sublayers_give_the_recomputed_outputs(family: str) -> None:
    """After the o and down Hessians with replay, forwards reuse their inputs and apply the live projection."""
    ctx = _layer_context(family)
    qkv, o, fc_in, fc_out, *_ = ctx.adapter.linear_groups()
    ctx.hessian(qkv, replay=True)
    assert not ctx._replays  # q/k/v share an input but close no sublayer
    ctx.hessian(o, replay=True)
    assert list(ctx._replays) == [ctx.adapter.attention(ctx.layer)]
    with torch.no_grad():
        ctx.module(o.names[0]).weight.mul_(0.5)  # the projection changes after its inputs were kept
    with _without_replays(ctx):
        recomputed_hessian = ctx.hessian(fc_in)
    torch.testing.assert_close(ctx.hessian(fc_in), recomputed_hessian)
    ctx.hessian(fc_out, replay=True)
    # OPT's fc1/fc2 live on the layer; a MoE's output is the routed sum of every expert's down, no one projection
    assert len(ctx._replays) == (1 if family == "opt" or len(ctx.adapter.mlp_outputs(ctx.layer)) > 1 else 2)
    with torch.no_grad():
        ctx.module(fc_out.names[0]).weight.mul_(0.5)
    replayed, recomputed = ctx.forward(), _full_forward(ctx)
    for got, expected in zip(replayed, recomputed, strict=True):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    assert "forward" not in vars(ctx.adapter.attention(ctx.layer))  # the patch is gone after the sweep


@pytest.mark.parametrize("family", FAMILIES)
def test_gptq_with_replay_equals_gptq_recomputing_every_sublayer(
    family: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from compressor.methods.quant.gptq import GPTQ, GPTQConfig

    def quantize() -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        model = tiny_model(family)
        run = ModelContext(model, get_adapter(model), _tokens(6, 24), torch.device("cpu"), batch_size=4)
        run_stages(run, [GPTQ(GPTQConfig(method="gptq", bits=3, group_size=16))])
        with torch.no_grad():
            logits = model(_tokens(2, 24)).logits
        return {path: q.dequantize(torch.float32) for path, q in run.quantized.items()}, logits

    replayed, replayed_logits = quantize()
    monkeypatch.setattr(LayerContext, "_replayable", lambda self, group: None)
    recomputed, recomputed_logits = quantize()
    assert replayed.keys() == recomputed.keys()
    for path, weight in replayed.items():
        torch.testing.assert_close(weight, recomputed[path], rtol=1e-4, atol=1e-4, msg=path)
    torch.testing.assert_close(replayed_logits, recomputed_logits, rtol=1e-4, atol=1e-4)


class _ZeroQuery(Method):
    """Changes a weight upstream of the attention's output projection after GPTQ left replays behind."""

    config_class = MethodConfig

    def __init__(self) -> None:
        super().__init__(MethodConfig(method="zero_query"))
        self.inputs: list[torch.Tensor] = []

    def apply(self, ctx: LayerContext) -> list[LayerRecord]:
        with torch.no_grad():
            ctx.adapter.attention_inputs(ctx.layer)[0].weight.zero_()
        self.inputs.append(torch.cat([batch.hidden for batch in ctx.inputs]))
        return []


def test_a_later_stage_in_the_same_pass_invalidates_replays() -> None:
    from compressor.methods.quant.gptq import GPTQ, GPTQConfig

    model = tiny_model("llama")
    tokens = _tokens()
    run = ModelContext(model, get_adapter(model), tokens, torch.device("cpu"), batch_size=3)
    zero = _ZeroQuery()
    run_stages(run, [GPTQ(GPTQConfig(method="gptq", bits=4, group_size=16)), zero])
    with torch.no_grad():
        hidden = model(tokens, output_hidden_states=True).hidden_states
    torch.testing.assert_close(zero.inputs[1], hidden[1], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_settled_replays_keep_the_outputs_of_the_final_projection(family: str) -> None:
    ctx = _layer_context(family)
    groups = ctx.adapter.linear_groups()
    for group in groups:
        ctx.hessian(group, replay=True)
        with torch.no_grad():
            for name in group.names:
                ctx.module(name).weight.mul_(0.5)  # the "quantization" of this group
        ctx.settle(group)
    assert all(replay.outputs is not None and not replay.inputs for replay in ctx._replays.values())
    replayed, recomputed = ctx.forward(), _full_forward(ctx)
    for got, expected in zip(replayed, recomputed, strict=True):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


# ---- every layer gets the arguments the model's own forward gives it ---------------------------------------

LAYER_TYPES = ["full_attention", "sliding_attention", "full_attention"]


def _sliding_qwen2() -> torch.nn.Module:
    """Qwen2 whose middle layer attends to a 4-token window, shorter than the 16-token sequences."""
    return tiny_model("qwen2", use_sliding_window=True, sliding_window=4, layer_types=LAYER_TYPES)


class _RecordInputs(Method):
    """Keeps the hidden states and kwargs each layer receives from the engine."""

    config_class = MethodConfig

    def __init__(self) -> None:
        super().__init__(MethodConfig(method="record_inputs"))
        self.hidden: list[torch.Tensor] = []
        self.kwargs: list[list[dict[str, object]]] = []

    def apply(self, ctx: LayerContext) -> list[LayerRecord]:
        self.hidden.append(torch.cat([batch.hidden for batch in ctx.inputs]))
        self.kwargs.append([batch.kwargs for batch in ctx.inputs])
        return []


def test_sliding_window_layers_get_their_own_mask() -> None:
    model = _sliding_qwen2()
    assert model.config.layer_types == LAYER_TYPES and model.config.sliding_window == 4
    tokens = _tokens(4, 16)
    with torch.no_grad():
        expected = model(tokens, output_hidden_states=True).hidden_states
    run = ModelContext(model, get_adapter(model), tokens, torch.device("cpu"), batch_size=3)
    seen = _RecordInputs()
    run_stages(run, [seen])
    assert len(seen.hidden) == 3
    for i, hidden in enumerate(seen.hidden):
        torch.testing.assert_close(hidden, expected[i], rtol=1e-5, atol=1e-5, msg=f"input of layer {i}")
    assert all("forward" not in vars(layer) for layer in run.adapter.layers())  # the recorders are gone

    # Not vacuous: the sliding layer given the full-attention layer's arguments computes something else.
    layer = run.adapter.layers()[1]
    with torch.no_grad():
        wrong = torch.cat([layer(h, **kw) for h, kw in zip(expected[1].split(3), seen.kwargs[0], strict=True)])
    assert (wrong - expected[2]).abs().max() > 1e-2
    # One mask per attention type and forward, shared by reference: per-layer kwargs cost no memory.
    for full, sliding, full_again in zip(*seen.kwargs, strict=True):
        assert full["attention_mask"] is full_again["attention_mask"]
        assert full["position_embeddings"] is sliding["position_embeddings"]


def test_capture_refuses_a_forward_that_skips_layers() -> None:
    model = tiny_model("qwen2")
    model.config.num_hidden_layers = 2  # the forward runs layers[:2] of 3
    run = ModelContext(model, get_adapter(model), _tokens(), torch.device("cpu"), batch_size=2)
    with pytest.raises(UnsupportedModelError, match="decoder layers"):
        run.capture_inputs()
    assert all("forward" not in vars(layer) for layer in run.adapter.layers())


# ---- finished layers' codes leave the compute device --------------------------------------------------------


class _CodeDevices(Method):
    """Records, at each layer, the devices holding every quantized weight's tensors so far."""

    config_class = MethodConfig

    def __init__(self) -> None:
        super().__init__(MethodConfig(method="code_devices"))
        self.seen: list[dict[str, set[str]]] = []

    def apply(self, ctx: LayerContext) -> list[LayerRecord]:
        self.seen.append({path: _devices(q) for path, q in ctx.run.quantized.items()})
        return []


def _devices(qweight: QuantizedWeight) -> set[str]:
    tensors = [qweight.q, qweight.scale, qweight.zero, qweight.g_idx, qweight.group_bits]
    return {t.device.type for t in tensors if t is not None}


def test_finished_layers_codes_move_to_the_storage_device() -> None:
    from compressor.methods.quant.gptq import GPTQ, GPTQConfig

    model = tiny_model("llama")
    run = ModelContext(model, get_adapter(model), _tokens(), torch.device("cpu"), batch_size=3,
                       storage_device=torch.device("meta"))
    probe = _CodeDevices()
    run_stages(run, [GPTQ(GPTQConfig(method="gptq", bits=4, group_size=16)), probe])
    for index, devices in enumerate(probe.seen):  # this layer's codes are still on the device
        prefix = run.adapter.layer_prefix(index) + "."
        assert devices and all(where == ({"cpu"} if path.startswith(prefix) else {"meta"})
                               for path, where in devices.items()), (index, devices)
    assert len(run.quantized) == 7 * 3
    assert all(_devices(q) == {"meta"} for q in run.quantized.values())


def test_quantized_weight_to_moves_every_tensor() -> None:
    ones = torch.ones(2, 1)
    qweight = QuantizedWeight(torch.zeros(2, 4, dtype=torch.uint8), ones, ones.int(), 4, 4, True,
                              g_idx=torch.tensor([0, 0, 0, 0]), group_bits=torch.tensor([4]))
    moved = qweight.to(torch.device("meta"))
    assert _devices(moved) == {"meta"} and _devices(qweight) == {"cpu"}
    assert (moved.bits, moved.group_size, moved.symmetric) == (4, 4, True)
    assert moved.g_idx is not None and moved.group_bits is not None
