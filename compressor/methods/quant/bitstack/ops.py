"""BitStack's math on one weight: scaling, residual blocks of sign x low-rank magnitude, packing, bytes, errors.

One block of ``W: [out, in]`` stores ``sign(R)`` at 1 bit per parameter and a rank-``r`` approximation
``u @ v`` (``u: [out, r]``, ``v: [r, in]``) of ``|R|``, the magnitudes of the current residual ``R``; the
block's contribution is ``sign(R) * (u @ v)`` and the next block starts from what is left. The residual's
Frobenius norm never rises: ``|sign(R) * (|R| - B)| = ||R| - B|`` elementwise, and ``B`` is an orthogonal
projection of ``|R|`` (the truncated SVD, or its subspace-iteration estimate :func:`top_factors`), so it is no
farther from ``|R|`` than 0 is. ``sign(0)`` is stored as +1 so that this holds with one bit per entry.

Everything is decomposed in a scaled space, ``W * s`` with one ``s`` per input channel (see
:func:`channel_scale`), and divided by ``s`` again on reconstruction.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch

# The unpacking and the sum of blocks are the shipped modeling file's, so the stage, compressor.load and
# transformers alone (trust_remote_code) compute the same weights from the same blocks.
from compressor.methods.quant.bitstack.feedback import best_block, inverse_cholesky
from compressor.models.shipped.modeling_bitstack import scaled_sum, unpack_signs

#: The dtype factors and scales are stored in (the reference stores fp16 too).
FACTOR_DTYPE = torch.float16

#: How each block's top-``rank`` factors of ``|R|`` are found: subspace iteration (:func:`top_factors`) or a full SVD.
SVDMode = Literal["lowrank", "full"]

#: How each block's signs are chosen: ``sign(R)`` (residual) or GPTQ-style error feedback in the calibration
#: metric with the row factor refitted (feedback, ``feedback.best_block``).
SignMode = Literal["residual", "feedback"]


def channel_scale(H: torch.Tensor, floor: float = 1e-2) -> torch.Tensor:
    """Per-input-channel importance ``s = sqrt(diag(H))``, normalised to mean 1: ``[in]``, float32.

    Why ``diag(H)`` (mean squared activation) rather than mean ``|x|``: with this ``s`` the squared
    Frobenius error of the scaled weight, ``sum_ij dW_ij^2 s_j^2``, is exactly the diagonal part of the
    calibration output error ``tr(dW H dW^T)`` the global order ranks blocks by, so each block's SVD
    minimises (the diagonal of) the quantity that is later measured; and ``H`` is already collected, so
    it costs no extra pass. (The reference's per-sequence L2 norm of the inputs is the same RMS up to a
    constant factor, which a decomposition is invariant to.) Channels are floored at ``floor`` times the
    mean so that a dead channel's reconstruction is not divided by ~0; all-zero statistics (an expert no
    calibration token reached) give ``s = 1``.
    """
    rms = torch.diagonal(H).float().clamp(min=0).sqrt()
    mean = rms.mean()
    if not torch.isfinite(mean) or mean <= 0:
        return torch.ones_like(rms)
    return (rms / mean).clamp(min=floor)


def pack_signs(R: torch.Tensor) -> torch.Tensor:
    """``R >= 0`` as bits, 8 per byte, element ``8b + i`` in bit ``i`` of byte ``b``: uint8 ``[ceil(numel/8)]``."""
    bits = (R.reshape(-1) >= 0).to(torch.uint8)
    pad = -bits.numel() % 8
    if pad:
        bits = torch.cat([bits, bits.new_zeros(pad)])
    weights = (2 ** torch.arange(8, dtype=torch.int32, device=R.device))
    return (bits.reshape(-1, 8).to(torch.int32) * weights).sum(dim=1).to(torch.uint8)


def block_bytes(out_features: int, in_features: int, rank: int, factor_bytes: int = 2, scale_bytes: int = 0) -> int:
    """Stored bytes of one block: packed signs + both factors (+ the per-channel scales, held by block 0)."""
    return (out_features * in_features + 7) // 8 + (out_features + in_features) * rank * factor_bytes + scale_bytes


@dataclass
class Block:
    """One residual block: packed ``sign(R)`` (uint8) and the factors of ``|R|`` (``u: [out, r]``, ``v: [r, in]``)."""

    signs: torch.Tensor
    u: torch.Tensor
    v: torch.Tensor


@dataclass
class Decomposition:
    """A weight ``[out, in]`` as per-channel scales and an ordered stack of blocks (a prefix is a weight)."""

    shape: tuple[int, int]
    scale: torch.Tensor  # [in], FACTOR_DTYPE (or the dtype asked for)
    blocks: list[Block] = field(default_factory=list)

    @property
    def rank(self) -> int:
        return int(self.blocks[0].u.shape[1]) if self.blocks else 0

    def block_bytes(self) -> list[int]:
        """Stored bytes of each block, the scales counted with block 0 (no block loads without them)."""
        out, columns = self.shape
        item = self.blocks[0].u.element_size() if self.blocks else 0
        scales = self.scale.numel() * self.scale.element_size()
        return [block_bytes(out, columns, self.rank, item, scales if i == 0 else 0) for i in range(len(self.blocks))]

    def scaled_sum(self, k: int) -> torch.Tensor:
        """``sum_{j<k} sign_j * (u_j @ v_j)``: the first ``k`` blocks in the scaled space, float32 ``[out, in]``.

        Computed by the shipped modeling file, as both loaders do, so the stage's weights are theirs bit for bit.
        """
        return scaled_sum(self.shape, [(b.signs, b.u, b.v) for b in self.blocks[:k]], self.scale.device)

    def reconstruct(self, k: int | None = None) -> torch.Tensor:
        """The weight the first ``k`` blocks (default all) stand for: float32 ``[out, in]``."""
        return self.scaled_sum(len(self.blocks) if k is None else k) / self.scale.float()[None, :]


def top_factors(
    A: torch.Tensor, rank: int, generator: torch.Generator, start: torch.Tensor | None = None,
    oversample: int = 8, power_iterations: int = 6,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-``rank`` singular triplets of ``A: [m, n]`` by subspace iteration: ``U [m, r]``, ``S [r]``, ``Vh [r, n]``.

    Why not ``torch.linalg.svd``: a block needs ``rank`` (4-16) of ``min(m, n)`` (576) triplets, and the full SVD
    was ~90% of the decomposition's time. A basis of ``k = rank + oversample`` columns, started from ``start``
    (``[n, j]``, e.g. the previous block's right factors: the residuals' magnitudes keep much of their row
    structure) completed by Gaussian columns from ``generator``, goes through ``power_iterations`` rounds of
    ``Q <- orth(A orth(A^T Q))``; then the exact SVD of the small ``Q^T A`` (Rayleigh-Ritz). The result is always
    an orthogonal projection of ``A`` (``B = P A``, ``P = Q U_b U_b^T Q^T``), so ``|A - B| <= |A|`` holds as for
    the exact SVD, and a rank-``<= k`` ``A`` is recovered exactly. Cost ``O(m n k (2 power_iterations + 2))``.
    On the demo model's layers 0/15/29 (16 blocks, 6 rounds, warm start) the output error after 16 blocks is
    within +3.2% / -2.6% of the full SVD's at rank 16 (mean +0.6%), and +0.4% / -1.8% at rank 4.
    """
    m, n = A.shape
    k = min(rank + oversample, m, n)
    columns = 0 if start is None else min(start.shape[1], k)
    fresh = torch.randn(n, k - columns, generator=generator, device=generator.device).to(A.device, A.dtype)
    omega = fresh if start is None or columns == 0 else torch.cat([start[:, :columns].to(A.dtype), fresh], dim=1)
    Q = torch.linalg.qr(A @ omega).Q
    for _ in range(power_iterations):
        Q = torch.linalg.qr(A @ torch.linalg.qr(A.T @ Q).Q).Q
    Ub, S, Vh = torch.linalg.svd(Q.T @ A, full_matrices=False)
    return (Q @ Ub[:, :rank]), S[:rank], Vh[:rank]


def decompose(
    W: torch.Tensor, iterations: int, rank: int, scale: torch.Tensor | None = None, dtype: torch.dtype = FACTOR_DTYPE,
    svd: SVDMode = "lowrank", seed: int = 0, signs: SignMode = "residual", H: torch.Tensor | None = None,
    dampening: float = 0.3,
) -> Decomposition:
    """BitStack's iterative decomposition of ``W: [out, in]`` scaled by ``scale: [in]`` (default ones).

    Each step stores ``sign(R)`` and the top-``rank`` factors of ``|R|`` split evenly (``u = U sqrt(S)``,
    ``v = sqrt(S) V^T``, so both factors have the same range in ``dtype``), then continues on
    ``R - sign(R) * (u @ v)`` computed from the stored (rounded) factors, so the residual is the
    reconstruction's true error. ``rank`` is capped at ``min(out, in)``. ``svd="lowrank"`` finds the factors by
    :func:`top_factors` (Gaussian start from ``seed``, then warm-started from the previous block's right
    factors; same ``W`` and seed give the same bytes on the same hardware), ``"full"`` by ``torch.linalg.svd``.
    ``signs="feedback"`` (needs the calibration ``H: [in, in]``) picks each block's signs and row factor by
    ``feedback.best_block`` in the damped metric ``Hs + dampening * mean(diag Hs) * I`` of the scaled space
    (``Hs = H / (s s^T)``, whose diagonal is nearly constant, so this is ``H + dampening * diag(H)`` up to
    a factor: a shrinkage of the input correlations that keeps the signs from fitting the calibration tokens'
    noise); in that metric the error never rises from block to block and is never above plain signs' on the same
    magnitudes. The Frobenius bound above is plain signs' own.
    """
    out, columns = W.shape
    rank = min(rank, out, columns)
    s = (torch.ones(columns, device=W.device) if scale is None else scale).to(dtype)
    R = W.float() * s.float()[None, :]
    decomposition = Decomposition((out, columns), s)
    generator = torch.Generator().manual_seed(seed)
    start: torch.Tensor | None = None
    metric = inverse = None
    if signs == "feedback":
        if H is None:
            raise ValueError("signs='feedback' needs the calibration Hessian H")
        inverse_scale = 1 / s.float()
        metric = H.float().to(W.device) * inverse_scale[:, None] * inverse_scale[None, :]  # tr(E H E^T) = tr(R Hs R^T)
        metric.diagonal().add_(dampening * float(metric.diagonal().mean().clamp(min=0)))
        inverse = inverse_cholesky(metric, 0.0)
    for _ in range(iterations):
        if svd == "full":
            U, S, Vh = torch.linalg.svd(R.abs(), full_matrices=False)
            U, S, Vh = U[:, :rank], S[:rank], Vh[:rank]
        else:
            U, S, Vh = top_factors(R.abs(), rank, generator, start)
            start = Vh.T
        root = S.sqrt()
        u = (U * root[None, :]).to(dtype)
        v = (root[:, None] * Vh).to(dtype)
        if metric is None or inverse is None:
            sign = torch.where(R >= 0, 1.0, -1.0)
        else:
            sign, u, v = best_block(R, u, v, metric, inverse, dtype)
        R = R - sign * (u.float() @ v.float())
        decomposition.blocks.append(Block(pack_signs(sign), u, v))
    return decomposition


def output_errors(W: torch.Tensor, decomposition: Decomposition, H: torch.Tensor,
                  row_weights: torch.Tensor | None = None) -> list[float]:
    """``tr(dW H dW^T)`` of the reconstruction from the first ``k`` blocks, for ``k = 0 .. n``: ``n + 1`` floats.

    The calibration output error of each prefix (``dW = W - W_hat_k``, ``H: [in, in]``); block ``k``'s
    error reduction is ``errors[k] - errors[k + 1]``. It may be negative: blocks minimise the scaled
    Frobenius norm, of which this is the full (not only diagonal) counterpart. With ``row_weights`` (``[out]``)
    each output channel's error ``(dW H dW^T)_oo`` counts that many times: with the loss's squared gradients
    (``calibration.fisher.output_fisher``) the sum is twice the second-order estimate of the loss rise.
    """
    W = W.float()
    H = H.float().to(W.device)
    weights = None if row_weights is None else row_weights.to(device=W.device, dtype=torch.float32)[:, None]
    inverse = 1 / decomposition.scale.float()[None, :]

    def error(dW: torch.Tensor) -> float:
        rows = (dW @ H) * dW
        return float(rows.sum() if weights is None else (rows * weights).sum())

    running = torch.zeros_like(W)
    errors = [error(W)]
    for block in decomposition.blocks:
        running += unpack_signs(block.signs, decomposition.shape) * (block.u.float() @ block.v.float())
        errors.append(error(W - running * inverse))
    return errors
