"""GPTQ's solver against its definition: beats RTN on correlated inputs, equals RTN when H = I,
gives the codes of a slow column-by-column reference (tests/reference_gptq.py, no compressor code) with and
without act-order, and survives dead columns and bad Hessians.

Comparisons with the reference use asymmetric grids: the symmetric grid puts -max|w| of a group exactly
halfway between two levels, and when such a weight is quantized before any update (a group's first
column, or the first column of the act-order sweep) float rounding of the scale picks the level, so two
correct implementations in float32 and float64 may differ there and everywhere the error then reaches."""

from __future__ import annotations

import pytest
import torch
from reference_gptq import reference_gptq

from compressor.methods.quant.gptq_ops import GPTQResult, accumulate_hessian, gptq_quantize
from compressor.methods.quant.ops import group_qparams, quantize_rtn


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _layer(out: int = 64, columns: int = 128, tokens: int = 512, seed: int = 0) -> tuple[torch.Tensor, ...]:
    """``W: [out, in]`` and correlated inputs ``X = Z A: [tokens, in]`` (H far from diagonal)."""
    W = torch.randn(out, columns, generator=_gen(seed))
    A = torch.randn(columns, columns, generator=_gen(seed + 1)) / columns**0.5
    X = torch.randn(tokens, columns, generator=_gen(seed + 2)) @ A
    X = X + 0.3 * torch.randn(tokens, 1, generator=_gen(seed + 3))  # a shared component: strong correlation
    return W, X


def _hessian(X: torch.Tensor) -> torch.Tensor:
    return 2 / X.shape[0] * X.T @ X


def _output_error(X: torch.Tensor, W: torch.Tensor, W_hat: torch.Tensor) -> float:
    return float((X @ W.T - X @ W_hat.T).norm())


@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("group_size", [-1, 32])
@pytest.mark.parametrize("bits", [4, 3, 2])
def test_output_error_below_rtn(bits: int, group_size: int, act_order: bool) -> None:
    W, X = _layer()
    result = gptq_quantize(W, _hessian(X), bits, group_size, symmetric=True, act_order=act_order)
    rtn = quantize_rtn(W, bits, group_size, symmetric=True).dequantize()
    assert _output_error(X, W, result.W_hat) < 0.9 * _output_error(X, W, rtn)


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("bits", [2, 4, 8])
def test_codes_and_dequantize(bits: int, act_order: bool, symmetric: bool) -> None:
    W, X = _layer(out=16, columns=64, tokens=128)
    result = gptq_quantize(W.half(), _hessian(X), bits, 16, symmetric=symmetric, act_order=act_order)
    qw = result.qweight
    assert qw.q.dtype == torch.uint8 and qw.q.shape == (16, 64)
    assert int(qw.q.max()) <= (1 << bits) - 1
    assert qw.scale.dtype == torch.float32 and qw.scale.shape == (16, 4)
    assert qw.zero.dtype == torch.int32 and qw.zero.shape == (16, 4)
    assert qw.bits == bits and qw.group_size == 16 and qw.g_idx is None and qw.symmetric == symmetric
    if symmetric:
        assert bool((qw.zero == 1 << (bits - 1)).all())
    assert result.W_hat.dtype == torch.float32
    assert torch.equal(qw.dequantize(), result.W_hat)
    assert result.loss > 0 and result.dead_columns == 0 and result.cholesky_retries == 0


@pytest.mark.parametrize("search", ["none", "mse", "weighted"])
@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("group_size", [-1, 32])
def test_identity_hessian_equals_rtn(group_size: int, act_order: bool, search: str) -> None:
    W, _ = _layer()
    result = gptq_quantize(W, torch.eye(128), 3, group_size, symmetric=False, act_order=act_order,
                           scale_search=search)  # type: ignore[arg-type]
    rtn = quantize_rtn(W, 3, group_size, symmetric=False, scale_search=search,  # type: ignore[arg-type]
                       importance=torch.ones(128))
    assert torch.equal(result.qweight.q, rtn.q)
    assert torch.equal(result.qweight.scale, rtn.scale)
    assert torch.equal(result.qweight.zero, rtn.zero)


def test_loss_known_answer_for_diagonal_hessian() -> None:
    """H = 2 I: Hinv = I / sqrt(2 * 1.01), so the loss is sum (w - q)^2 * 2.02 / 2."""
    W, _ = _layer(out=8, columns=32)
    result = gptq_quantize(W, 2 * torch.eye(32), 4, -1, symmetric=True, act_order=False)
    rtn = quantize_rtn(W, 4, -1, symmetric=True).dequantize()
    assert result.loss == pytest.approx(float((W - rtn).square().sum()) * 2.02 / 2, rel=1e-5)


@pytest.mark.parametrize("act_order", [False, True])
def test_loss_equals_weighted_error(act_order: bool) -> None:
    """W - W_hat = Err Hinv and Hinv Hd Hinv^T = I, so tr((W - W_hat) Hd (W - W_hat)^T) = 2 * loss."""
    W, X = _layer(seed=4)
    H = _hessian(X).double()
    result = gptq_quantize(W, H, 3, 32, symmetric=False, act_order=act_order)
    Hd = H + 0.01 * torch.diagonal(H).mean() * torch.eye(128, dtype=torch.float64)
    D = (W - result.W_hat).double()
    assert result.loss == pytest.approx(float(torch.trace(D @ Hd @ D.T)) / 2, rel=1e-4)


def test_act_order_groups_are_static_and_contiguous() -> None:
    W, X = _layer()
    result = gptq_quantize(W, _hessian(X), 4, 32, symmetric=True, act_order=True)
    scale, zero = group_qparams(W, 4, 32, symmetric=True)
    assert torch.equal(result.qweight.scale, scale)
    assert torch.equal(result.qweight.zero, zero.to(torch.int32))


def _assert_matches_reference(result: GPTQResult, codes: torch.Tensor, W_hat: torch.Tensor) -> None:
    """Every code equal; the weights equal up to float32 rounding of the scales."""
    mismatched = int((result.qweight.q.double() != codes).sum())
    assert mismatched == 0, f"{mismatched} of {codes.numel()} codes differ from the reference"
    torch.testing.assert_close(result.W_hat.double(), W_hat, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize(
    ("group_size", "act_order", "block_size"),
    [(-1, False, 128), (32, False, 128), (32, False, 20), (48, False, 7), (32, True, 128), (-1, True, 16)],
)
def test_blocked_sweep_matches_unblocked_reference(group_size: int, act_order: bool, block_size: int) -> None:
    W, X = _layer(out=32, columns=96, tokens=256, seed=3)
    H = _hessian(X)
    result = gptq_quantize(W, H, 4, group_size, symmetric=False, act_order=act_order, block_size=block_size)
    _assert_matches_reference(result, *reference_gptq(W, H, 4, group_size, symmetric=False, act_order=act_order))


@pytest.mark.parametrize("group_size", [-1, 16, 32])
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_act_order_matches_the_slow_reference(bits: int, group_size: int) -> None:
    """Columns by descending diag(H) with static groups: the reference's codes, which the order changes."""
    W, X = _layer(out=32, columns=64, tokens=256, seed=11)
    X[:, 7] = 0  # a dead column: its weights are zeroed before the sweep
    H = _hessian(X)
    codes, W_hat = reference_gptq(W, H, bits, group_size, symmetric=False, act_order=True)
    plain, _ = reference_gptq(W, H, bits, group_size, symmetric=False, act_order=False)
    assert int((codes != plain).sum()) > 0.05 * codes.numel()  # the order matters here
    result = gptq_quantize(W, H, bits, group_size, symmetric=False, act_order=True, block_size=24)
    _assert_matches_reference(result, codes, W_hat)


def test_dead_column() -> None:
    W, X = _layer()
    X[:, 5] = 0
    H = _hessian(X)
    H_before, W_before = H.clone(), W.clone()
    result = gptq_quantize(W, H, 4, 32, symmetric=False, act_order=True)
    assert result.dead_columns == 1
    assert bool((result.W_hat[:, 5] == 0).all())
    assert bool(torch.isfinite(result.W_hat).all())
    assert torch.equal(H, H_before) and torch.equal(W, W_before)  # inputs untouched


def test_indefinite_hessian_retries_with_more_dampening() -> None:
    B = torch.randn(8, 32, generator=_gen(5))
    S = B.T @ B / 8  # rank 8 of 32
    H = S - 0.05 * torch.diagonal(S).mean() * torch.eye(32)  # smallest eigenvalue -0.05 mean(diag S)
    W = torch.randn(16, 32, generator=_gen(6))
    result = gptq_quantize(W, H, 4, -1, symmetric=True, act_order=False)
    assert result.cholesky_retries > 0
    assert result.dampening == pytest.approx(0.01 * 10**result.cholesky_retries)
    assert bool(torch.isfinite(result.W_hat).all())


def test_hopeless_hessian_raises_naming_dampening() -> None:
    with pytest.raises(ValueError, match="dampening"):
        gptq_quantize(torch.randn(4, 8), -torch.eye(8), 4, -1, symmetric=True, act_order=False)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_hessian_raises(bad: float) -> None:
    H = torch.eye(8)
    H[2, 3] = bad
    with pytest.raises(ValueError, match="NaN or inf"):
        gptq_quantize(torch.randn(4, 8), H, 4, -1, symmetric=True, act_order=False)


@pytest.mark.parametrize(("kwargs", "match"), [({"group_size": 24}, "divide"), ({"bits": 9}, "2..8")])
def test_bad_arguments_raise(kwargs: dict[str, int], match: str) -> None:
    args = {"bits": 4, "group_size": 32, "symmetric": True, "act_order": False} | kwargs
    with pytest.raises(ValueError, match=match):
        gptq_quantize(torch.randn(4, 64), torch.eye(64), **args)


def test_bits_per_group() -> None:
    W, X = _layer()
    H = _hessian(X)
    uniform = gptq_quantize(W, H, 4, 32, symmetric=True, act_order=False)
    same = gptq_quantize(W, H, 4, 32, True, False, bits_per_group=torch.tensor([4, 4, 4, 4]))
    assert torch.equal(same.qweight.q, uniform.qweight.q) and torch.equal(same.W_hat, uniform.W_hat)
    widths = torch.tensor([2, 8, 3, 4])
    for act_order in (False, True):
        mixed = gptq_quantize(W, H, 4, 32, True, act_order, bits_per_group=widths)
        assert mixed.bits_per_group == [2, 8, 3, 4] and mixed.qweight.bits == 8
        for g, b in enumerate(widths.tolist()):
            assert int(mixed.qweight.q[:, 32 * g : 32 * (g + 1)].max()) <= (1 << b) - 1
            assert bool((mixed.qweight.zero[:, g] == 1 << (b - 1)).all())
        assert torch.equal(mixed.qweight.dequantize(), mixed.W_hat)
    identity = gptq_quantize(W, torch.eye(128), 4, 32, True, False, bits_per_group=widths)
    for g, b in enumerate(widths.tolist()):
        block = W[:, 32 * g : 32 * (g + 1)]
        assert torch.equal(identity.qweight.q[:, 32 * g : 32 * (g + 1)], quantize_rtn(block, b, -1, True).q)


def test_accumulate_hessian_matches_one_shot() -> None:
    x1 = torch.randn(3, 10, 16, generator=_gen(7))
    x2 = torch.randn(5, 16, generator=_gen(8))
    H, n = accumulate_hessian(None, x1, 0)
    H, n = accumulate_hessian(H, x2, n)
    X = torch.cat([x1.reshape(-1, 16), x2])
    assert n == 35 and H.dtype == torch.float32
    torch.testing.assert_close(H, 2 / 35 * X.T @ X)
    H64, _ = accumulate_hessian(None, x1.half(), 0, dtype=torch.float64)
    assert H64.dtype == torch.float64
    torch.testing.assert_close(H64, 2 / 30 * x1.half().double().reshape(-1, 16).T @ x1.half().double().reshape(-1, 16))


def test_wide_inputs_accumulate_blockwise_to_the_same_symmetric_hessian() -> None:
    """Above 192 columns only the upper blocks are multiplied; the result must still be the full X^T X."""
    x1 = torch.randn(40, 1100, generator=_gen(9))  # five blocks of 192 and one of 140
    x2 = torch.randn(24, 1100, generator=_gen(10))
    H, n = accumulate_hessian(None, x1, 0)
    H, n = accumulate_hessian(H, x2, n)
    X = torch.cat([x1, x2]).double()
    assert torch.equal(H[:192, 192:], H[192:, :192].T)  # mirrored, not recomputed
    assert torch.equal(H[960:, :960], H[:960, 960:].T)
    torch.testing.assert_close(H.double(), 2 / 64 * X.T @ X, rtol=1e-5, atol=1e-5)
