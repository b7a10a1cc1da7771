"""A slow GPTQ written from the paper for tests, sharing no code with ``compressor``.

Optimal Brain Quantization order (Frantar et al. 2022, Eq. 2 and Algorithm 1 before its Cholesky and
lazy-batch rewrites): keep the full inverse ``Hinv = (H + damp)^-1``; quantize one column ``j`` at a time in
the chosen order; move every other weight by ``-(w_j - q_j) / Hinv[j, j] * Hinv[j, :]``; eliminate ``j``
from the inverse (``Hinv -= Hinv[:, j] Hinv[j, :] / Hinv[j, j]``). Columns stay in place: act-order only
changes the order (descending ``diag(H)``, ties by index), so there is nothing to un-permute. Groups
follow ``gptq_ops.gptq_quantize``'s documentation: with act-order, static (fitted on the original
contiguous columns before the sweep); without, fitted when the sweep reaches a group's first column on the
weights as updated so far. The grid is ops.py's documented one: ``q = clamp(round(w / s) + z, 0, 2**b - 1)``;
symmetric ``s = 2 max|w| / (2**b - 1)``, ``z = 2**(b-1)``; asymmetric ``s = (max - min) / (2**b - 1)``,
``z = round(-min / s)``; the range always holds 0, and an all-zero row gets ``s = 1``.
Runs in float64; returns ``(codes, W_hat)``, both ``[out, in]`` (codes as float64 integers).
"""

from __future__ import annotations

import torch


def grid(w: torch.Tensor, bits: int, symmetric: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero of every row of ``w: [out, k]`` (``[out]`` each), min/max without clipping."""
    maxq = 2**bits - 1
    low = w.min(dim=1).values.clamp(max=0)
    high = w.max(dim=1).values.clamp(min=0)
    if symmetric:
        scale = 2 * torch.maximum(-low, high) / maxq
        scale = torch.where(scale == 0, torch.ones_like(scale), scale)
        return scale, torch.full_like(scale, 2 ** (bits - 1))
    scale = (high - low) / maxq
    dead = scale == 0
    scale = torch.where(dead, torch.ones_like(scale), scale)
    zero = torch.where(dead, torch.zeros_like(scale), torch.round(-low / scale)).clamp(0, maxq)
    return scale, zero


def reference_gptq(
    W: torch.Tensor, H: torch.Tensor, bits: int, group_size: int, symmetric: bool, act_order: bool,
    dampening: float = 0.01,
) -> tuple[torch.Tensor, torch.Tensor]:
    """GPTQ of ``W: [out, in]`` against ``H: [in, in]``, one column at a time (see the module docstring)."""
    W, H = W.detach().double().clone(), H.detach().double().clone()
    columns = W.shape[1]
    size = columns if group_size == -1 else group_size
    dead = torch.diagonal(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    static = [grid(W[:, k : k + size], bits, symmetric) for k in range(0, columns, size)]
    order = torch.argsort(torch.diagonal(H), descending=True, stable=True) if act_order else torch.arange(columns)
    H += dampening * torch.diagonal(H).mean() * torch.eye(columns, dtype=H.dtype)
    Hinv = torch.cholesky_inverse(torch.linalg.cholesky(H))
    codes, W_hat = torch.zeros_like(W), torch.zeros_like(W)
    maxq = 2**bits - 1
    for j in order.tolist():
        if act_order:
            scale, zero = static[j // size]
        elif j % size == 0:
            scale, zero = grid(W[:, j : j + size], bits, symmetric)
        codes[:, j] = torch.clamp(torch.round(W[:, j] / scale) + zero, 0, maxq)
        W_hat[:, j] = scale * (codes[:, j] - zero)
        err = (W[:, j] - W_hat[:, j]) / Hinv[j, j]
        W -= torch.outer(err, Hinv[j, :])
        Hinv -= torch.outer(Hinv[:, j], Hinv[j, :]) / Hinv[j, j]
    return codes, W_hat
