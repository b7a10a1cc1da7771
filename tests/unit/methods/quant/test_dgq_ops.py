"""DGQ's math against its definitions, on hand-built tensors: the dual-grained form, the two-phase search,
GPTQ at fixed scales, per-token INT8 activations and SmoothQuant's folding. Errors are measured on the
inputs themselves, ``||X W^T - X W_hat^T||^2``, never with the module's own error function."""

from __future__ import annotations

import itertools

import pytest
import torch
from torch import nn
from transformers.models.gemma3.modeling_gemma3 import Gemma3RMSNorm
from transformers.models.llama.modeling_llama import LlamaRMSNorm

from compressor.methods.quant.dgq_ops import (
    DualGrainedWeight,
    fake_quantize_activations,
    fold_into_linear,
    fold_into_norm,
    gptq_dual_grained,
    initial_scales,
    quantize_activations,
    quantize_dual_grained,
    round_significand,
    search_channel_scale,
    search_int_scales,
    smoothing_scales,
    stored_scale_bits,
)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _layer(out: int = 32, columns: int = 64, tokens: int = 256, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``W: [out, in]`` with uneven groups and correlated inputs ``X: [tokens, in]``."""
    W = torch.randn(out, columns, generator=_gen(seed)) * torch.rand(1, columns, generator=_gen(seed + 1)) * 3
    A = torch.randn(columns, columns, generator=_gen(seed + 2)) / columns**0.5
    X = torch.randn(tokens, columns, generator=_gen(seed + 3)) @ A + 0.3 * torch.randn(tokens, 1, generator=_gen(9))
    return W, X


def _error(X: torch.Tensor, W: torch.Tensor, W_hat: torch.Tensor) -> float:
    return float((X.double() @ (W.double() - W_hat.double()).T).square().sum())


def test_dequantize_known_answer() -> None:
    weight = DualGrainedWeight(
        codes=torch.tensor([[3, -8, 1, 7], [7, -1, -8, 0]], dtype=torch.int8),
        int_scale=torch.tensor([[2, 16], [16, 1]], dtype=torch.int16),
        channel_scale=torch.tensor([0.5, 0.25]),
        bits=4,
        group_size=2,
    )
    expected = torch.tensor([[3.0, -8.0, 8.0, 56.0], [28.0, -4.0, -2.0, 0.0]])
    assert torch.equal(weight.dequantize(), expected)
    assert torch.equal(weight.int8_weight(), torch.tensor([[6, -16, 16, 112], [112, -16, -8, 0]], dtype=torch.int8))
    assert torch.equal(weight.to_quantized_weight().dequantize(), expected)


def test_products_exact_in_any_order() -> None:
    """Every code x integer scale x rounded channel scale equals the float64 product, in both orders."""
    s = round_significand(torch.rand(500, generator=_gen(1)) * 10 ** torch.randint(-6, 2, (500,), generator=_gen(2)))
    codes = torch.arange(-8, 8).float()
    ints = torch.arange(1, 17).float()
    for c, u in itertools.product(codes, ints):
        exact = (c.double() * u.double()) * s.double()
        assert torch.equal(((c * u) * s).double(), exact)
        assert torch.equal((c * (u * s)).double(), exact)
    wide = torch.arange(-128, 128).float()[:, None]  # INT8 weights: u = 1
    assert torch.equal((wide * s).double(), wide.double() * s.double())


def test_round_significand_known_answer() -> None:
    x = torch.tensor([1 + 2**-20, 1 + 2**-10, 3.0, 0.1])
    rounded = round_significand(x)
    assert rounded[0] == 1.0 and rounded[1] == 1 + 2**-10 and rounded[2] == 3.0
    assert abs(float(rounded[3]) - 0.1) < 0.1 * 2**-16
    mantissa, _ = torch.frexp(rounded)
    assert torch.equal(mantissa * 2**16, torch.round(mantissa * 2**16))


def test_initial_scales_known_answer() -> None:
    W = torch.tensor([[7.0, -1.0, 3.5, 0.0], [0.0, 0.0, 0.0, 0.0]])
    channel, ints = initial_scales(W, 4, 2)
    assert torch.equal(channel, torch.tensor([1 / 16, 1.0]))  # an all-zero row gets scale 1
    assert torch.equal(ints, torch.tensor([[16, 8], [1, 1]], dtype=torch.int16))
    channel8, ints8 = initial_scales(W, 8, -1)
    assert torch.equal(channel8, round_significand(torch.tensor([7 / 127, 1.0])))
    assert torch.equal(ints8, torch.ones(2, 1, dtype=torch.int16))


@pytest.mark.parametrize(("bits", "group_size"), [(4, 16), (4, -1), (8, -1)])
def test_int8_products_in_range(bits: int, group_size: int) -> None:
    W, X = _layer()
    W[3, 5] = 40.0  # an outlier
    H = X.T @ X
    channel, ints = search_channel_scale(W, H, bits, group_size)
    ints = search_int_scales(W, H, channel, ints, bits, group_size)
    for weight in (quantize_dual_grained(W, channel, ints, bits, group_size),
                   gptq_dual_grained(W, H, channel, ints, bits, group_size)):
        product = weight.codes.int() * weight.column_int_scale().int()
        assert int(product.min()) >= -128 and int(product.max()) <= 127
        assert torch.equal(weight.int8_weight().int(), product)
        low = -(1 << (bits - 1))
        assert int(weight.codes.min()) >= low and int(weight.codes.max()) <= -low - 1
        assert int(weight.int_scale.min()) >= 1 and int(weight.int_scale.max()) <= 16


@pytest.mark.parametrize(("bits", "group_size"), [(4, 16), (4, 8), (8, -1)])
def test_search_never_worse_than_its_start(bits: int, group_size: int) -> None:
    W, X = _layer()
    H = X.T @ X
    channel0, ints0 = initial_scales(W, bits, group_size)
    start = _error(X, W, quantize_dual_grained(W, channel0, ints0, bits, group_size).dequantize())
    channel, ints = search_channel_scale(W, H, bits, group_size)
    phase1 = _error(X, W, quantize_dual_grained(W, channel, ints, bits, group_size).dequantize())
    ints2 = search_int_scales(W, H, channel, ints, bits, group_size)
    phase2 = _error(X, W, quantize_dual_grained(W, channel, ints2, bits, group_size).dequantize())
    assert phase1 <= start * (1 + 1e-6)
    assert phase2 <= phase1 * (1 + 1e-6)
    if bits == 4:  # uneven groups: the integer scales have room to improve (INT8 rows only clip)
        assert phase2 < 0.95 * start


def test_int_scale_search_equals_brute_force_when_groups_are_independent() -> None:
    """With uncorrelated inputs (diagonal H) each group's best integer scale is its own: coordinate descent
    must find the minimum over all 16 values per group."""
    W = torch.randn(6, 8, generator=_gen(3))
    d = torch.rand(8, generator=_gen(4)) + 0.1
    H = torch.diag(d)
    channel, ints = initial_scales(W, 4, 4)
    found = search_int_scales(W, H, channel, ints, 4, 4)
    for row, g in itertools.product(range(6), range(2)):
        cols = slice(4 * g, 4 * g + 4)
        errors = []
        for u in range(1, 17):
            scale = u * float(channel[row])
            q = torch.clamp(torch.round(W[row, cols] / scale), -8, 7) * scale
            errors.append(float((d[cols] * (W[row, cols] - q) ** 2).sum()))
        assert errors[int(found[row, g]) - 1] == pytest.approx(min(errors), rel=1e-5)


def test_gptq_at_fixed_scales() -> None:
    """``refit=False`` keeps the given integer scales (the solver before the refit; see test_dgq_gptq_refit)."""
    W, X = _layer()
    channel, ints = initial_scales(W, 4, 16)
    rtn = quantize_dual_grained(W, channel, ints, 4, 16)
    identity = gptq_dual_grained(W, torch.eye(64), channel, ints, 4, 16, dampening=0.0, refit=False)
    assert torch.equal(identity.codes, rtn.codes)
    gptq = gptq_dual_grained(W, X.T @ X, channel, ints, 4, 16, refit=False)
    assert torch.equal(gptq.int_scale, rtn.int_scale) and torch.equal(gptq.channel_scale, rtn.channel_scale)
    assert _error(X, W, gptq.dequantize()) < 0.8 * _error(X, W, rtn.dequantize())


def test_activation_quantization_known_answer() -> None:
    x = torch.tensor([[1.0, -2.0, 0.5, 4.0], [0.0, 0.0, 0.0, 0.0]])
    codes, scale = quantize_activations(x)
    assert torch.equal(scale, torch.tensor([[4 / 127], [1.0]]))
    assert torch.equal(codes, torch.tensor([[32, -64, 16, 127], [0, 0, 0, 0]], dtype=torch.int8))
    assert torch.equal(fake_quantize_activations(x), codes.float() * scale)


def test_activation_percentile_clips_the_largest() -> None:
    x = torch.arange(1.0, 101.0)[None, :]
    codes, scale = quantize_activations(x, 99.0)  # the 99th smallest |x| is 99
    assert torch.equal(scale, torch.tensor([[99 / 127]]))
    assert int(codes[0, -1]) == 127 and int(codes[0, -2]) == 127 and int(codes[0, -3]) < 127
    with pytest.raises(ValueError, match="percentile"):
        quantize_activations(x, 0.0)


def test_smoothing_scales_known_answer() -> None:
    scales = smoothing_scales(torch.tensor([4.0, 1.0, 0.0]), torch.tensor([1.0, 4.0, 2.0]), 0.5)
    assert torch.equal(scales, torch.tensor([2.0, 0.5, 1.0]))
    assert torch.equal(smoothing_scales(torch.tensor([8.0]), torch.tensor([2.0]), 1.0), torch.tensor([8.0]))


@pytest.mark.parametrize("kind", ["rms", "rms_one_plus", "layernorm"])
def test_smoothing_folded_into_norm_keeps_output(kind: str) -> None:
    torch.manual_seed(0)
    hidden = 16
    norm: nn.Module = {"rms": LlamaRMSNorm, "rms_one_plus": Gemma3RMSNorm, "layernorm": nn.LayerNorm}[kind](hidden)
    with torch.no_grad():
        norm.weight.normal_()
        if kind == "layernorm":
            norm.bias.normal_()
    reader = nn.Linear(hidden, 8)
    x = torch.randn(4, 5, hidden) * torch.linspace(0.1, 20, hidden)
    with torch.no_grad():
        before = reader(norm(x))
        act = norm(x).abs().reshape(-1, hidden).amax(0)
        s = smoothing_scales(act, reader.weight.abs().amax(0), 0.5)
        weight, bias = fold_into_norm(norm.weight.data, getattr(norm, "bias", None), s, kind == "rms_one_plus")
        norm.weight.data = weight
        if bias is not None:
            norm.bias.data = bias
        reader.weight.data = reader.weight.data * s
        smoothed = norm(x)
        after = reader(smoothed)
    torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-5)
    assert float(smoothed.abs().reshape(-1, hidden).amax(0).max()) < float(act.max())  # outliers moved


def test_smoothing_folded_into_linear_keeps_gated_mlp_output() -> None:
    torch.manual_seed(0)
    gate, up, down = nn.Linear(8, 12), nn.Linear(8, 12), nn.Linear(12, 8)
    x = torch.randn(10, 8)
    with torch.no_grad():
        before = down(nn.functional.silu(gate(x)) * up(x))
        s = torch.rand(12) * 4 + 0.1
        up.weight.data, up.bias.data = fold_into_linear(up.weight.data, up.bias.data, s)
        down.weight.data = down.weight.data * s
        after = down(nn.functional.silu(gate(x)) * up(x))
    torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-5)


def test_int_scale_search_last_group_optimal_given_the_others() -> None:
    """With correlated inputs, after one sweep the last group's integer scale is the best of all 16 given the
    other groups' final scales (coordinate descent sees the errors the groups before it left)."""
    W, X = _layer(out=8, columns=12, tokens=64, seed=5)
    H = X.T @ X
    channel, ints = initial_scales(W, 4, 4)
    found = search_int_scales(W, H, channel, ints, 4, 4)
    for row in range(8):
        errors = []
        for u in range(1, 17):
            trial = found.clone()
            trial[row, 2] = u
            W_hat = quantize_dual_grained(W, channel, trial, 4, 4).dequantize()
            errors.append(float((X.double() @ (W[row] - W_hat[row]).double()).square().sum()))
        assert errors[int(found[row, 2]) - 1] <= min(errors) * (1 + 1e-6)


def test_stored_scale_bits_keep_every_group_scale_exact_in_the_dtype() -> None:
    """Known answers (bf16 8 significant bits, fp16 11, INT4's integer scales take 4), then every u * s checked."""
    known = {(4, torch.bfloat16): 4, (8, torch.bfloat16): 8, (4, torch.float16): 7, (8, torch.float16): 11,
             (4, torch.float32): 16, (8, torch.float32): 16}
    assert {key: stored_scale_bits(*key) for key in known} == known
    s = torch.rand(300, generator=_gen(3)) * 0.05 + 1e-3
    for (weight_bits, dtype), bits in known.items():
        channel = round_significand(s, bits)
        ints = torch.arange(1, 17).float()[:, None] if weight_bits == 4 else torch.ones(1, 1)
        scale = ints * channel
        assert torch.equal(scale.to(dtype).float(), scale), (weight_bits, dtype)
    unrounded = torch.arange(1, 17).float()[:, None] * round_significand(s)  # the float32 form: rounds in bf16
    assert not torch.equal(unrounded.to(torch.bfloat16).float(), unrounded)
