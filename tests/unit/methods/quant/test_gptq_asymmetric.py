"""GPTQ's asymmetric calibration (``asymmetric``, GPTAQ): the retargeted weight is the least-squares fit of the float
outputs, the engine's cross term is the one written out from the two forwards, and a whole pass fits the float
model's outputs better than plain GPTQ does."""

from __future__ import annotations

import copy

import pytest
import torch
from tiny import FAMILIES, tiny_model

from compressor.calibration.capture import FloatReference
from compressor.engine import LayerContext, ModelContext, run_stages
from compressor.methods.quant.gptq import GPTQ, GPTQConfig
from compressor.methods.quant.gptq_ops import accumulate_hessian, asymmetric_target, gptq_quantize
from compressor.models import get_adapter

TOKENS = torch.randint(3, 300, (16, 32), generator=torch.Generator().manual_seed(1))


def _inputs(tokens: int = 512, width: int = 48, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(W, X_f, X): a weight, float inputs with uneven channels, and the quantized prefix's version of them."""
    generator = torch.Generator().manual_seed(seed)
    X_f = torch.randn(tokens, width, generator=generator) * torch.linspace(0.2, 3.0, width)
    X = X_f + 0.3 * torch.randn(tokens, width, generator=generator) * X_f.std(0)
    return torch.randn(24, width, generator=generator), X_f, X


def _cross(X_f: torch.Tensor, X: torch.Tensor) -> torch.Tensor:
    return 2 / X.shape[0] * (X_f - X).T @ X


def _asymmetric_loss(W: torch.Tensor, Q: torch.Tensor, X_f: torch.Tensor, X: torch.Tensor) -> float:
    return float(((X_f.double() @ W.double().T - X.double() @ Q.double().T) ** 2).sum())


def test_full_target_is_the_least_squares_fit_of_the_float_outputs() -> None:
    W, X_f, X = _inputs()
    H = accumulate_hessian(None, X, 0)[0]
    target = asymmetric_target(W, H, _cross(X_f, X), dampening=0.0, strength=1.0)
    fit = torch.linalg.lstsq(X.double(), X_f.double() @ W.double().T).solution.T  # min ||X Q^T - X_f W^T||
    torch.testing.assert_close(target.double(), fit, rtol=1e-4, atol=1e-4)


def test_the_asymmetric_loss_is_gptqs_loss_on_the_target_plus_a_constant() -> None:
    """So GPTQ's sweep on the target minimises the asymmetric objective: their difference does not depend on Q."""
    W, X_f, X = _inputs()
    H = accumulate_hessian(None, X, 0)[0]
    target = asymmetric_target(W, H, _cross(X_f, X), dampening=0.0, strength=1.0)
    generator = torch.Generator().manual_seed(5)
    gaps = []
    for _ in range(3):
        Q = W + 0.2 * torch.randn(W.shape, generator=generator)
        symmetric = float(((X.double() @ (target.double() - Q.double()).T) ** 2).sum())
        gaps.append(_asymmetric_loss(W, Q, X_f, X) - symmetric)
    assert max(gaps) - min(gaps) < 1e-6 * abs(gaps[0]) + 1e-6


def test_strength_zero_is_the_weight_itself() -> None:
    W, X_f, X = _inputs()
    H = accumulate_hessian(None, X, 0)[0]
    assert torch.equal(asymmetric_target(W, H, _cross(X_f, X), 0.01, 0.0), W)


@pytest.mark.parametrize("bits", [3, 4])
def test_gptq_on_the_target_fits_the_float_outputs_better(bits: int) -> None:
    for seed in range(3):
        W, X_f, X = _inputs(seed=seed)
        H = accumulate_hessian(None, X, 0)[0]
        plain = gptq_quantize(W, H, bits, 16, True, True, grid="full").W_hat
        target = asymmetric_target(W, H, _cross(X_f, X), dampening=0.01, strength=1.0)
        aimed = gptq_quantize(target, H, bits, 16, True, True, grid="full").W_hat
        assert _asymmetric_loss(W, aimed, X_f, X) < 0.9 * _asymmetric_loss(W, plain, X_f, X)


def test_engine_cross_term_pairs_the_two_forwards_token_by_token() -> None:
    """D from :meth:`asymmetric_hessian` equals 2/n (X_f - X)^T X built from hooks on the two layers by hand."""
    model = tiny_model("llama")
    run = ModelContext(model, get_adapter(model), TOKENS, torch.device("cpu"), batch_size=4)
    ctx = LayerContext(index=0, layer=run.adapter.layers()[0], run=run, inputs=run.capture_inputs().layer(0))
    float_layer = copy.deepcopy(ctx.layer)
    with torch.no_grad():
        ctx.layer.self_attn.v_proj.weight.mul_(0.5)  # the live layer differs upstream of o_proj
    hidden = [batch.hidden + torch.randn_like(batch.hidden) for batch in ctx.inputs]
    group = next(g for g in run.adapter.linear_groups() if g.names == ("self_attn.o_proj",))
    H, D = ctx.asymmetric_hessian(group, FloatReference(float_layer, hidden))

    def inputs(layer: torch.nn.Module, states: list[torch.Tensor]) -> torch.Tensor:
        seen: list[torch.Tensor] = []
        handle = layer.self_attn.o_proj.register_forward_pre_hook(lambda m, a: seen.append(a[0]))
        with torch.no_grad():
            for state, batch in zip(states, ctx.inputs, strict=True):
                layer(state, **batch.kwargs)
        handle.remove()
        return torch.cat([x.reshape(-1, x.shape[-1]) for x in seen]).double()

    X, X_f = inputs(ctx.layer, [batch.hidden for batch in ctx.inputs]), inputs(float_layer, hidden)
    torch.testing.assert_close(H.double(), 2 / X.shape[0] * X.T @ X, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(D.double(), 2 / X.shape[0] * (X_f - X).T @ X, rtol=1e-5, atol=1e-6)
    assert D.abs().max() > 0.1 * H.abs().max()  # the two inputs really differ


def _float_output_error(family: str, asymmetric: float) -> float:
    """Squared error of the quantized model's last hidden states against the float model's, on held-out tokens."""
    model = tiny_model(family)
    held_out = torch.randint(3, 300, (8, 32), generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        reference = model.model(held_out).last_hidden_state
    run = ModelContext(model, get_adapter(model), TOKENS, torch.device("cpu"), batch_size=4)
    run_stages(run, [GPTQ(GPTQConfig(method="gptq", bits=3, group_size=16, asymmetric=asymmetric))])
    with torch.no_grad():
        return float(((model.model(held_out).last_hidden_state - reference) ** 2).mean())


@pytest.mark.parametrize("family", FAMILIES)
def test_a_pass_with_asymmetric_calibration_runs_and_quantizes_every_linear(family: str) -> None:
    model = tiny_model(family)
    run = ModelContext(model, get_adapter(model), TOKENS, torch.device("cpu"), batch_size=4)
    records = run_stages(run, [GPTQ(GPTQConfig(method="gptq", bits=4, group_size=16, asymmetric=0.5))])
    plain_model = tiny_model(family)
    plain = ModelContext(plain_model, get_adapter(plain_model), TOKENS, torch.device("cpu"), batch_size=4)
    plain_records = run_stages(plain, [GPTQ(GPTQConfig(method="gptq", bits=4, group_size=16))])
    assert [r.module for r in records] == [r.module for r in plain_records]
    changed = sum(not torch.equal(run.quantized[r.module].q, plain.quantized[r.module].q) for r in records)
    assert changed > len(records) // 2  # past the first group the targets differ


def test_asymmetric_calibration_brings_the_output_closer_to_the_float_model() -> None:
    assert _float_output_error("llama", 1.0) < _float_output_error("llama", 0.0)
