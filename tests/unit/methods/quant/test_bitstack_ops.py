"""BitStack's math on one weight against known answers: exact rank-1 case, monotone residual, packing, bytes."""

from __future__ import annotations

import pytest
import torch

from compressor.methods.quant.bitstack.ops import (
    block_bytes,
    channel_scale,
    decompose,
    output_errors,
    pack_signs,
    top_factors,
    unpack_signs,
)


def _sign_times_rank1(out: int, columns: int, seed: int) -> torch.Tensor:
    """A weight whose magnitudes are the rank-1 ``a b^T`` (a, b > 0) under arbitrary signs."""
    g = torch.Generator().manual_seed(seed)
    a, b = torch.rand(out, generator=g) + 0.1, torch.rand(columns, generator=g) + 0.1
    signs = torch.randint(0, 2, (out, columns), generator=g).float() * 2 - 1
    return signs * torch.outer(a, b)


@pytest.mark.parametrize("svd", ["lowrank", "full"])
@pytest.mark.parametrize("scaled", [False, True])
def test_one_iteration_is_exact_when_the_magnitudes_are_rank_one(scaled: bool, svd: str) -> None:
    W = _sign_times_rank1(37, 29, seed=1)  # wider than rank + oversample, so subspace iteration is tested
    scale = torch.rand(29, generator=torch.Generator().manual_seed(2)) + 0.25 if scaled else None  # |W s| rank 1
    decomposition = decompose(W, iterations=1, rank=1, scale=scale, dtype=torch.float32, svd=svd)  # type: ignore[arg-type]
    torch.testing.assert_close(decomposition.reconstruct(1), W, rtol=1e-5, atol=1e-6)
    # the same in the stored fp16: exact up to fp16 rounding of the factors
    torch.testing.assert_close(decompose(W, 1, 1, scale, svd=svd).reconstruct(), W, rtol=2e-3, atol=2e-3)  # type: ignore[arg-type]


@pytest.mark.parametrize("svd", ["lowrank", "full"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize(("out", "columns", "rank"), [(16, 24, 1), (24, 16, 3), (9, 13, 16), (40, 50, 2)])
def test_the_residual_norm_never_rises_from_block_to_block(
    out: int, columns: int, rank: int, dtype: torch.dtype, svd: str
) -> None:
    g = torch.Generator().manual_seed(out * columns + rank)
    W = torch.randn(out, columns, generator=g) ** 3  # heavy tails
    W[0, :3] = 0.0  # sign(0) is stored as +1; the bound must still hold
    scale = torch.rand(columns, generator=g) + 0.2
    decomposition = decompose(W, iterations=10, rank=rank, scale=scale, dtype=dtype, svd=svd)  # type: ignore[arg-type]
    target = W * decomposition.scale.float()
    norms = [float((target - decomposition.scaled_sum(k)).norm()) for k in range(11)]
    for k in range(10):
        # float32 round-off of the sums only: a full-rank case reaches ~1e-11 after one block
        rise = norms[k + 1] - norms[k] * (1 + 1e-6) - 1e-6 * norms[0]
        assert rise <= 0, f"block {k}: residual {norms[k]} -> {norms[k + 1]}"
    assert norms[-1] < 0.5 * norms[0]


def _structured(out: int, columns: int, seed: int) -> torch.Tensor:
    """A weight like a trained one: a few strong input channels and rows, a low-rank part, heavy-tailed noise."""
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(out, columns, generator=g) * 0.02
    W += 0.05 * torch.randn(out, 3, generator=g) @ torch.randn(3, columns, generator=g)
    W[:, torch.randperm(columns, generator=g)[:4]] *= 20  # outlier input channels
    W *= torch.rand(out, 1, generator=g) + 0.5
    return W + 0.01 * torch.randn(out, columns, generator=g) ** 3


@pytest.mark.parametrize("rank", [1, 4, 16])
@pytest.mark.parametrize("kind", ["random", "structured", "decaying"])
def test_fast_factors_leave_almost_the_full_svds_residual(kind: str, rank: int) -> None:
    g = torch.Generator().manual_seed(rank)
    if kind == "random":
        A = torch.randn(300, 200, generator=g).abs()
    elif kind == "structured":
        A = _structured(200, 300, seed=rank).abs()
    else:  # singular values 1, 0.9, 0.81, ...: a slow decay, the hard case for subspace iteration
        U = torch.linalg.qr(torch.randn(250, 120, generator=g)).Q
        V = torch.linalg.qr(torch.randn(180, 120, generator=g)).Q
        A = (U * 0.9 ** torch.arange(120.0)) @ V.T
    U, S, Vh = top_factors(A, rank, torch.Generator().manual_seed(0))
    assert U.shape == (A.shape[0], rank) and S.shape == (rank,) and Vh.shape == (rank, A.shape[1])
    fast = float((A - (U * S) @ Vh).norm() ** 2)
    exact_S = torch.linalg.svdvals(A)
    exact = float(exact_S[rank:].square().sum())
    assert exact <= fast * (1 + 1e-5)
    # the energy the rank-r approximation fails to capture, beyond the best possible: under 1% of the best's
    captured = float(exact_S[:rank].square().sum())
    assert fast - exact <= 0.01 * captured, (fast, exact, captured)
    torch.testing.assert_close(S, exact_S[:rank], rtol=0.02, atol=0)
    # orthonormal factors, as the SVD's
    torch.testing.assert_close(U.T @ U, torch.eye(rank), atol=1e-5, rtol=0)
    torch.testing.assert_close(Vh @ Vh.T, torch.eye(rank), atol=1e-5, rtol=0)


def test_fast_decomposition_stays_close_to_the_full_svds() -> None:
    W = _structured(96, 160, seed=7)
    H = torch.eye(160)
    errors = {svd: output_errors(W, decompose(W, 8, 4, svd=svd, dtype=torch.float32), H)  # type: ignore[arg-type]
              for svd in ("lowrank", "full")}
    # the first blocks agree to ~1e-3; later residuals drift apart (each block's signs follow the previous
    # residual), as on the demo model's layers (within 3.2% of the full SVD after 16 blocks)
    for k in range(5):
        assert errors["lowrank"][k] == pytest.approx(errors["full"][k], rel=2e-3)
    for k in range(5, 9):
        assert errors["lowrank"][k] == pytest.approx(errors["full"][k], rel=0.05)


def test_fast_decomposition_is_deterministic_and_the_seed_is_used() -> None:
    W = _structured(64, 80, seed=3)
    first, again = decompose(W, 3, 4), decompose(W, 3, 4)
    other = decompose(W, 3, 4, seed=1)
    for a, b in zip(first.blocks, again.blocks, strict=True):
        assert torch.equal(a.u, b.u) and torch.equal(a.v, b.v) and torch.equal(a.signs, b.signs)
    assert not all(torch.equal(a.u, b.u) for a, b in zip(first.blocks, other.blocks, strict=True))


def test_rank_at_least_the_matrix_size_is_exact_in_one_block() -> None:
    W = torch.randn(5, 4, generator=torch.Generator().manual_seed(3))
    decomposition = decompose(W, iterations=2, rank=16, dtype=torch.float32)
    assert decomposition.rank == 4
    torch.testing.assert_close(decomposition.reconstruct(1), W, rtol=1e-5, atol=1e-5)


def test_packing_known_bytes() -> None:
    # element 8b + i -> bit i of byte b; >= 0 (zero included) is a 1 bit
    R = torch.tensor([1.0, -1, -2, 0, -1, -1, -1, 5, -3, 2])
    packed = pack_signs(R)
    assert packed.dtype == torch.uint8
    assert packed.tolist() == [1 + 8 + 128, 2]
    assert unpack_signs(packed, (10,)).tolist() == [1, -1, -1, 1, -1, -1, -1, 1, -1, 1]


@pytest.mark.parametrize("shape", [(8, 8), (3, 5), (1, 1), (17, 31)])
def test_packing_round_trips_bit_exactly(shape: tuple[int, int]) -> None:
    g = torch.Generator().manual_seed(shape[0] * 100 + shape[1])
    R = torch.randn(shape, generator=g)
    R[R.abs() < 0.2] = 0.0
    packed = pack_signs(R)
    assert packed.numel() == (R.numel() + 7) // 8
    expected = torch.where(R >= 0, 1.0, -1.0)
    assert torch.equal(unpack_signs(packed, shape), expected)
    assert torch.equal(pack_signs(unpack_signs(packed, shape)), packed)


def test_bytes_of_a_hand_case() -> None:
    # out 4, in 6, rank 2, fp16: signs ceil(24 / 8) = 3 bytes, factors (4 + 6) * 2 * 2 = 40 bytes,
    # scales 6 * 2 = 12 bytes with block 0 only
    assert block_bytes(4, 6, 2, factor_bytes=2) == 43
    assert block_bytes(4, 6, 2, factor_bytes=2, scale_bytes=12) == 55
    decomposition = decompose(torch.randn(4, 6), iterations=3, rank=2, scale=torch.ones(6))
    assert decomposition.block_bytes() == [55, 43, 43]
    stored = [sum(t.numel() * t.element_size() for t in (b.signs, b.u, b.v)) for b in decomposition.blocks]
    stored[0] += decomposition.scale.numel() * decomposition.scale.element_size()
    assert stored == [55, 43, 43]


def test_channel_scale_known_answer() -> None:
    # sqrt(diag) = [2, 1, 0, 3], mean 1.5 -> [4/3, 2/3, 0 floored to 0.01, 2]
    H = torch.diag(torch.tensor([4.0, 1.0, 0.0, 9.0]))
    torch.testing.assert_close(channel_scale(H), torch.tensor([4 / 3, 2 / 3, 0.01, 2.0]))
    assert torch.equal(channel_scale(torch.zeros(3, 3)), torch.ones(3))


def test_output_errors_match_a_slow_reference() -> None:
    g = torch.Generator().manual_seed(5)
    W = torch.randn(6, 5, generator=g)
    X = torch.randn(40, 5, generator=g)
    H = 2 * X.T @ X / 40
    decomposition = decompose(W, iterations=3, rank=1, scale=channel_scale(H))
    errors = output_errors(W, decomposition, H)
    assert len(errors) == 4
    for k, error in enumerate(errors):
        W_hat = decomposition.reconstruct(k)
        # tr(dW H dW^T) = 2/n * sum over samples of |dW x|^2
        slow = sum(float(((W - W_hat) @ x).square().sum()) for x in X) * 2 / 40
        assert error == pytest.approx(slow, rel=1e-4, abs=1e-6)
    assert errors[0] > errors[-1]


def test_weighted_output_errors_count_each_output_channel_by_its_weight() -> None:
    """Order fisher's measure: sum over samples and output channels of weight_o * (dW x)_o^2, here per sample."""
    g = torch.Generator().manual_seed(6)
    W = torch.randn(6, 5, generator=g)
    X = torch.randn(40, 5, generator=g)
    H = 2 * X.T @ X / 40
    weights = torch.tensor([0.0, 1.0, 3.0, 0.5, 10.0, 2.0], dtype=torch.float64)
    decomposition = decompose(W, iterations=3, rank=1, scale=channel_scale(H))
    weighted = output_errors(W, decomposition, H, row_weights=weights)
    for k, error in enumerate(weighted):
        dW = W - decomposition.reconstruct(k)
        slow = sum(float((weights.float() * (dW @ x).square()).sum()) for x in X) * 2 / 40
        assert error == pytest.approx(slow, rel=1e-4, abs=1e-6)
    assert output_errors(W, decomposition, H, row_weights=torch.ones(6)) == pytest.approx(
        output_errors(W, decomposition, H), rel=1e-6)
