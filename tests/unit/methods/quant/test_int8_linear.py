"""The INT8 linear against exact integer arithmetic written out by hand, and against the simulated (fake-quant)
A8W4 forward: float32 activations already rounded to their INT8 grid times the dequantized weight."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from compressor.methods.quant.dgq_ops import (
    DualGrainedWeight,
    fake_quantize_activations,
    gptq_dual_grained,
    quantize_dual_grained,
    search_channel_scale,
)
from compressor.methods.quant.int8_linear import Int8Linear, float_activations, int8_matmul

BACKENDS = ["auto", "int_mm", "float"]


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _weight() -> DualGrainedWeight:
    return DualGrainedWeight(
        codes=torch.tensor([[3, -8, 1, 7], [7, -1, -8, 0]], dtype=torch.int8),
        int_scale=torch.tensor([[2, 16], [16, 1]], dtype=torch.int16),
        channel_scale=torch.tensor([0.5, 0.25]),
        bits=4,
        group_size=2,
    )


def test_exact_integer_arithmetic_by_hand() -> None:
    layer = Int8Linear(_weight(), torch.tensor([1.0, -1.0]))
    x = torch.tensor([[1.0, -2.0, 0.5, 4.0]])
    # x -> codes [32, -64, 16, 127] at scale 4/127; INT8 weight rows [6, -16, 16, 112] and [112, -16, -8, 0]
    acc0 = 32 * 6 + (-64) * (-16) + 16 * 16 + 127 * 112  # 15696
    acc1 = 32 * 112 + (-64) * (-16) + 16 * (-8) + 127 * 0  # 4480
    expected = torch.tensor([[acc0 * (4 / 127) * 0.5 + 1.0, acc1 * (4 / 127) * 0.25 - 1.0]])
    torch.testing.assert_close(layer(x), expected, rtol=1e-6, atol=0)
    assert torch.equal(layer.weight_int8, torch.tensor([[6, -16, 16, 112], [112, -16, -8, 0]], dtype=torch.int8))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(("n", "k", "m"), [(1, 3, 5), (7, 64, 24), (33, 576, 16)])
def test_int8_matmul_exact(n: int, k: int, m: int, backend: str) -> None:
    a = torch.randint(-128, 128, (n, k), dtype=torch.int8, generator=_gen(0))
    w = torch.randint(-128, 128, (m, k), dtype=torch.int8, generator=_gen(1))
    result = int8_matmul(a, w.t(), backend)  # the transposed view Int8Linear passes
    assert result.dtype == torch.int32
    assert torch.equal(result.long(), a.long() @ w.long().t())


@pytest.mark.parametrize("backend", BACKENDS)
def test_int8_matmul_exact_beyond_float32(backend: str) -> None:
    """Sums past 2**24 (4096 products near 2**14) that one float32 matmul would round."""
    a = torch.randint(100, 128, (3, 4096), dtype=torch.int8, generator=_gen(11))
    w = torch.randint(-128, -100, (5, 4096), dtype=torch.int8, generator=_gen(12))
    w[:, 0] = 7  # an odd term keeps the exact sum off float32's grid
    assert torch.equal(int8_matmul(a, w.t(), backend).long(), a.long() @ w.long().t())
    with pytest.raises(ValueError, match="backend"):
        int8_matmul(a, w.t(), "fast")


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("percentile", [100.0, 99.0])
def test_equals_simulated_a8_forward(bits: int, percentile: float) -> None:
    """Within float32 rounding of the simulated matmul: |diff| <= 1e-5 * max|y| (the INT8 path is exact until
    the int32 accumulator is converted to float32)."""
    out, columns = 48, 128
    W = torch.randn(out, columns, generator=_gen(2)) * torch.rand(1, columns, generator=_gen(3)) * 2
    X = torch.randn(2, 10, columns, generator=_gen(4)) * torch.linspace(0.1, 8, columns)
    group = 32 if bits == 4 else -1
    H = X.reshape(-1, columns).T @ X.reshape(-1, columns)
    channel, ints = search_channel_scale(W, H, bits, group)
    weight = gptq_dual_grained(W, H, channel, ints, bits, group)
    bias = torch.randn(out, generator=_gen(5))
    layer = Int8Linear(weight, bias, act_percentile=percentile)
    with torch.no_grad():
        y = layer(X)
        simulated = fake_quantize_activations(X, percentile) @ weight.dequantize().T + bias
    assert y.shape == (2, 10, out)
    assert float((y - simulated).abs().max()) <= 1e-5 * float(simulated.abs().max())
    # and it is really A8: the float forward on the same weights differs by more than rounding
    assert float((y - nn.functional.linear(X, weight.dequantize(), bias)).abs().max()) > 1e-3


def test_state_dict_is_a_plain_linear() -> None:
    W = torch.randn(6, 8, generator=_gen(6))
    weight = quantize_dual_grained(W, torch.full((6,), 0.05), torch.full((6, 1), 3, dtype=torch.int16), 4, -1)
    linear = nn.Linear(8, 6)
    layer = Int8Linear.from_linear(linear, weight)
    state = layer.state_dict()
    assert set(state) == {"weight", "bias"}
    assert torch.equal(state["weight"], weight.dequantize()) and torch.equal(state["bias"], linear.bias.data)
    assert isinstance(layer, nn.Linear) and layer.in_features == 8 and layer.out_features == 6


def test_float_activations_runs_the_dequantized_weight() -> None:
    W = torch.randn(6, 8, generator=_gen(7))
    weight = quantize_dual_grained(W, torch.full((6,), 0.05), torch.full((6, 1), 3, dtype=torch.int16), 4, -1)
    model = nn.Sequential(Int8Linear(weight, None))
    x = torch.randn(3, 8, generator=_gen(8))
    with torch.no_grad():
        quantized = model(x)
        with float_activations(model):
            plain = model(x)
        again = model(x)
    assert torch.equal(plain, x @ weight.dequantize().T)
    assert torch.equal(again, quantized) and not torch.equal(plain, quantized)


def test_keeps_input_dtype() -> None:
    W = torch.randn(6, 8, generator=_gen(9))
    weight = quantize_dual_grained(W, torch.full((6,), 0.05), torch.full((6, 1), 3, dtype=torch.int16), 4, -1)
    layer = Int8Linear(weight, None, dtype=torch.bfloat16)
    x = torch.randn(2, 8, generator=_gen(10)).bfloat16()
    with torch.no_grad():
        assert layer(x).dtype == torch.bfloat16 and layer.weight.dtype == torch.bfloat16
