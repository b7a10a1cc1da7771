"""Sign feedback against its definition: GPTQ's sweep for a two-level quantizer, the row refit, the block choice."""

from __future__ import annotations

import pytest
import torch

from compressor.methods.quant.bitstack.feedback import (
    best_block,
    feedback_signs,
    inverse_cholesky,
    output_error,
    refit_rows,
)
from compressor.methods.quant.bitstack.ops import channel_scale, decompose, output_errors, top_factors


def _correlated_H(columns: int, seed: int, samples: int = 200) -> torch.Tensor:
    """``X^T X / n`` of inputs whose channels co-vary strongly (a shared factor) and differ in scale."""
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(samples, 3, generator=g) @ torch.randn(3, columns, generator=g)
    X = (X + 0.3 * torch.randn(samples, columns, generator=g)) * (torch.rand(columns, generator=g) + 0.2)
    return X.T @ X / samples


def _slow_signs(R: torch.Tensor, M: torch.Tensor, H: torch.Tensor) -> torch.Tensor:
    """The definition: column j takes the sign of the optimal target given columns < j fixed (no Cholesky).

    With ``d = R - Q`` fixed on the chosen columns ``f``, the free columns' best target is
    ``R_F + d_f H_fF H_FF^-1`` (minimising ``tr(d H d^T)`` over the free part).
    """
    out, columns = R.shape
    H = H.double()
    Q = torch.zeros(out, columns, dtype=torch.float64)
    S = torch.zeros(out, columns)
    for j in range(columns):
        target = R[:, j].double()
        if j:
            f, F = slice(0, j), slice(j, columns)
            d = R[:, f].double() - Q[:, f]
            target = target + (d @ H[f, F] @ torch.linalg.inv(H[F, F]))[:, 0]
        sign = torch.where(target >= 0, 1.0, -1.0)
        S[:, j] = sign.float()
        Q[:, j] = sign * M[:, j].double()
    return S


def test_a_diagonal_metric_gives_the_plain_signs() -> None:
    g = torch.Generator().manual_seed(0)
    R, M = torch.randn(7, 11, generator=g), torch.rand(7, 11, generator=g) * 3
    H = torch.diag(torch.rand(11, generator=g) + 0.1)
    assert torch.equal(feedback_signs(R, M, inverse_cholesky(H, 0.0)), torch.where(R >= 0, 1.0, -1.0))


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_the_sweep_equals_its_definition(seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    R = torch.randn(6, 9, generator=g)
    M = (torch.rand(6, 1, generator=g) + 0.2) * (torch.rand(1, 9, generator=g) + 0.2)  # rank-1 magnitudes
    H = _correlated_H(9, seed)
    expected = _slow_signs(R, M, H)
    for block in (1, 4, 32):  # lazy batches change nothing
        assert torch.equal(feedback_signs(R, M, inverse_cholesky(H, 0.0), block=block), expected)
    assert not torch.equal(expected, torch.where(R >= 0, 1.0, -1.0))  # the feedback did change some signs


def test_the_row_refit_is_the_least_squares_solution() -> None:
    g = torch.Generator().manual_seed(4)
    out, columns, rank = 5, 12, 2
    v = torch.randn(rank, columns, generator=g)
    S = torch.where(torch.randn(out, columns, generator=g) >= 0, 1.0, -1.0)
    H = _correlated_H(columns, 4)
    u_true = torch.randn(out, rank, generator=g)
    # known answer: a residual that is exactly such a block
    torch.testing.assert_close(refit_rows(S * (u_true @ v), S, v, H), u_true, rtol=1e-3, atol=1e-3)
    # a general residual: each row's weighted least squares, solved through H = L L^T
    R = torch.randn(out, columns, generator=g)
    L = torch.linalg.cholesky(H.double())
    for chunk in (2, 256):
        u = refit_rows(R, S, v, H, chunk=chunk)
        for i in range(out):
            A = (v * S[i]).double()  # [r, in]
            slow = torch.linalg.lstsq((A @ L).T, (R[i].double() @ L)[:, None]).solution[:, 0]
            torch.testing.assert_close(u[i].double(), slow, rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("seed", [5, 6, 7, 8])
def test_the_chosen_block_is_never_worse_than_plain_signs_on_the_same_magnitudes(seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    R = torch.randn(24, 40, generator=g) ** 3
    H = _correlated_H(40, seed)
    U, S, Vh = top_factors(R.abs(), 2, torch.Generator().manual_seed(0))
    u, v = (U * S.sqrt()).half(), (S.sqrt()[:, None] * Vh).half()
    plain = output_error(R - torch.where(R >= 0, 1.0, -1.0) * (u.float() @ v.float()), H)
    for refit in (False, True):
        signs, u_new, v_new = best_block(R, u, v, H, inverse_cholesky(H), torch.float16, refit=refit)
        assert u_new.dtype == v_new.dtype == torch.float16 and torch.equal(v_new, v)
        chosen = output_error(R - signs * (u_new.float() @ v_new.float()), H)
        assert chosen <= plain and chosen <= output_error(R, H)
        assert chosen < 0.9 * plain, (refit, chosen, plain)  # and on co-varying inputs, clearly better


def test_feedback_output_error_never_rises_and_beats_plain_signs_in_its_metric() -> None:
    g = torch.Generator().manual_seed(9)
    W = torch.randn(32, 48, generator=g) * (torch.rand(48, generator=g) + 0.1)
    H = _correlated_H(48, 9)
    scale = channel_scale(H)
    plain_stack = decompose(W, 6, 2, scale)
    for dampening in (0.0, 0.3):
        # the guarantees hold in the metric the blocks are chosen in: H + dampening * mean(diag Hs) * s s^T-diagonal
        mean = float((torch.diagonal(H) / scale.half().float() ** 2).mean())
        metric = H + dampening * mean * torch.diag(scale.half().float() ** 2)
        feedback = output_errors(W, decompose(W, 6, 2, scale, signs="feedback", H=H, dampening=dampening), metric)
        plain = output_errors(W, plain_stack, metric)
        assert all(b <= a * (1 + 1e-6) for a, b in zip(feedback, feedback[1:], strict=False)), (dampening, feedback)
        assert feedback[1] <= plain[1] * (1 + 1e-6)  # block one: same magnitudes, the better signs
        assert feedback[-1] < plain[-1]


def test_feedback_keeps_the_rank_one_case_exact() -> None:
    g = torch.Generator().manual_seed(10)
    a, b = torch.rand(9, generator=g) + 0.1, torch.rand(13, generator=g) + 0.1
    W = torch.where(torch.randn(9, 13, generator=g) >= 0, 1.0, -1.0) * torch.outer(a, b)
    H = _correlated_H(13, 10)
    decomposition = decompose(W, 1, 1, torch.ones(13), dtype=torch.float32, signs="feedback", H=H)
    torch.testing.assert_close(decomposition.reconstruct(1), W, rtol=1e-5, atol=1e-5)


def test_feedback_needs_the_hessian() -> None:
    with pytest.raises(ValueError, match="needs the calibration Hessian"):
        decompose(torch.randn(4, 4), 1, 1, signs="feedback")


def test_a_singular_hessian_is_damped_until_it_factors() -> None:
    H = torch.zeros(5, 5)
    H[0, 0] = 1.0  # four dead channels
    upper = inverse_cholesky(H, 0.0)
    assert torch.isfinite(upper).all() and torch.equal(upper, torch.triu(upper))


def test_magnitudes_that_only_add_error_give_the_zero_block() -> None:
    g = torch.Generator().manual_seed(11)
    R = torch.randn(8, 10, generator=g)
    H = _correlated_H(10, 11)
    u, v = torch.full((8, 1), 30.0).half(), torch.full((1, 10), 30.0).half()  # |u v| = 900 >> |R|
    signs, u_new, v_new = best_block(R, u, v, H, inverse_cholesky(H), torch.float16, refit=False)
    assert not u_new.any() and not v_new.any()
    assert output_error(R - signs * (u_new.float() @ v_new.float()), H) == output_error(R, H)
