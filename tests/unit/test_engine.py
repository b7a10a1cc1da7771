"""The engine's capture and layer chaining reproduce the model's own forward pass."""

from __future__ import annotations

import pytest
import torch
from tiny import FAMILIES, tiny_model

from compressor.engine import LayerContext, ModelContext, run_stages, split_passes
from compressor.methods.base import LayerRecord, Method, MethodConfig
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
    inputs = run.capture_layer_inputs()
    layer = run.adapter.layers()[0]
    ctx = LayerContext(0, layer, run, inputs)
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
