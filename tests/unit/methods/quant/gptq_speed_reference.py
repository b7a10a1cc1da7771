"""The solver steps as they were before the speed work of issue 21, kept verbatim as references.

``test_speed_exact.py`` checks that the faster ``gptq_ops`` / ``ops`` functions give the same bits as these
(codes, scales, zeros, the rounded values and the loss). They share the helpers that did not change
(``compute_qparams``, ``quantize_codes``, ``_Groups``).
"""

from __future__ import annotations

import torch

from compressor.methods.quant.gptq_ops import _Groups
from compressor.methods.quant.ops import Grid, compute_qparams, quantize_codes


def search_symmetric(
    w: torch.Tensor, a: torch.Tensor, bits: int, grid: Grid, ratios: list[float]
) -> tuple[torch.Tensor, torch.Tensor]:
    """``ops._search_symmetric`` before it took its input in pieces of rows.

    For codes ``l``, the refit ``s = sum a w l / sum a l^2`` leaves ``sum a w^2 - (sum a w l)^2 / sum a l^2``:
    the candidate with the largest ``(sum a w l)^2 / sum a l^2`` wins (llama.cpp's ``make_qx_quants`` rule)."""
    half = 1 << (bits - 1)
    base, zero = compute_qparams(w, bits, True, grid=grid)
    aw, a = (a * w).double(), a.double()  # the gains differ from sum a w^2 by the error: float32 cannot tell
    best_gain = torch.full_like(base, -float("inf"), dtype=torch.float64)
    best_scale = base
    for ratio in ratios:
        scale = base * ratio
        level = torch.mul(w, (1 / scale)[..., None]).round_().clamp_(-half, half - 1).double()
        s1 = torch.linalg.vecdot(aw, level)
        s2 = torch.linalg.vecdot(a, level.mul_(level))
        fit = (s1 / torch.where(s2 > 0, s2, torch.ones_like(s2))).float()
        ok = (s2 > 0) & (fit * scale > 0)  # a refit that would flip the grid's sign is no candidate
        gain = torch.where(ok, s1 * s1 / torch.where(s2 > 0, s2, torch.ones_like(s2)), best_gain)
        better = gain > best_gain
        best_gain = torch.where(better, gain, best_gain)
        best_scale = torch.where(better, fit, best_scale)
    return best_scale, zero


def symmetric_update(H: torch.Tensor, rows: torch.Tensor, beta: float, alpha: float, block: int = 512) -> torch.Tensor:
    """``gptq_ops._symmetric_update`` with its old block width (512)."""
    columns = rows.shape[1]
    if columns <= block:
        return torch.addmm(H, rows.T, rows, beta=beta, alpha=alpha)
    out = torch.empty_like(H)
    for i in range(0, columns, block):
        left = rows[:, i : i + block]
        for j in range(i, columns, block):
            corner = H[i : i + block, j : j + block]
            product = torch.addmm(corner, left.T, rows[:, j : j + block], beta=beta, alpha=alpha)
            out[i : i + block, j : j + block] = product
            if j != i:
                out[j : j + block, i : i + block] = product.T
    return out


def sweep(
    W: torch.Tensor, Hinv: torch.Tensor, groups: _Groups, block_size: int, *, keep_rounded: bool = True
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Quantize all columns of ``W: [out, in]`` (sweep order) in blocks; codes, rounded values ``[out, in]``, loss.

    Only the form that keeps the rounded values is reproduced (``keep_rounded`` is the new sweep's argument).

    Each block is quantized column by column, then its accumulated error is applied to the columns right
    of it at once: ``W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]`` (the lazy batch update, Sec. 3.2).
    """
    assert keep_rounded, "the reference sweep keeps the rounded values"
    columns = W.shape[1]
    codes = torch.zeros_like(W)
    rounded = torch.zeros_like(W)
    loss = W.new_zeros(())
    for i1 in range(0, columns, block_size):
        i2 = min(i1 + block_size, columns)
        Err1 = _quantize_block(W, Hinv, i1, i2, groups, codes, loss, rounded)
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]
    return codes, rounded, float(loss) / 2


def _quantize_block(
    W: torch.Tensor,
    Hinv: torch.Tensor,
    i1: int,
    i2: int,
    groups: _Groups,
    codes: torch.Tensor,
    loss: torch.Tensor,
    rounded: torch.Tensor,
) -> torch.Tensor:
    """Quantize columns ``i1:i2`` one at a time with in-block error feedback; returns ``Err1: [out, i2-i1]``.

    For column ``j``: ``q = quant(w_j)``, ``err = (w_j - q) / Hinv[j, j]`` and
    ``W1[:, j:] -= err Hinv[j, j:]`` (Eq. 3 with the Cholesky rows of ``H^-1``). Writes the codes into
    ``codes[:, i1:i2]`` (the values rounded into ``rounded``) and adds ``sum err^2`` (twice the objective) to
    ``loss`` in place.
    """
    W1 = W[:, i1:i2].clone()
    Err1 = torch.zeros_like(W1)
    Hinv1 = Hinv[i1:i2, i1:i2]
    for i in range(i2 - i1):
        j = i1 + i
        g = groups.of_column[j]
        if not groups.static and j == groups.first[g]:
            at = groups.positions[g]
            groups.fit(g, _current_columns(W, W1, Err1, Hinv, i1, i, at), groups.importance[at])
        scale, zero = groups.scale[:, g], groups.zero[:, g]
        w = W1[:, i]
        q = quantize_codes(w, scale, zero, groups.bits[g])
        codes[:, j] = q
        rounded[:, j] = w
        err = (w - scale * (q - zero)) / Hinv1[i, i]
        loss += err.square().sum()
        W1[:, i:] -= err.unsqueeze(1) @ Hinv1[i, i:].unsqueeze(0)
        Err1[:, i] = err
    return Err1


def _current_columns(
    W: torch.Tensor, W1: torch.Tensor, Err1: torch.Tensor, Hinv: torch.Tensor, i1: int, i: int, at: torch.Tensor
) -> torch.Tensor:
    """Columns at sweep positions ``at`` (all ``>= i1 + i``) as an unblocked sweep would see them now.

    Inside the block ``W1`` is up to date; columns past the block (``i2 = i1 + W1.shape[1]``) still owe
    the block's errors so far, ``Err1[:, :i] @ Hinv[i1:i1+i, at]``. Returns ``[out, len(at)]``.
    """
    i2 = i1 + W1.shape[1]
    inside = at < i2
    if bool(inside.all()):
        return W1[:, at - i1]
    current = W.new_empty(W.shape[0], at.numel())
    current[:, inside] = W1[:, at[inside] - i1]
    outside = at[~inside]
    current[:, ~inside] = W[:, outside] - Err1[:, :i] @ Hinv[i1 : i1 + i, outside]
    return current
