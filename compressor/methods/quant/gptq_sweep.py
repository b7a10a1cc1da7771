"""GPTQ's column sweep (Frantar et al. 2022, Algorithm 1 with the lazy batch updates of Sec. 3.2), apart from the
solver's set-up in ``gptq_ops.py``: the loop where the solve spends most of its time.

Each column is rounded, its error divided by the Cholesky diagonal and spread over the columns not yet quantized
(``W1[:, j+1:] -= err Hinv[j, j+1:]``). A block is held transposed so a column is a contiguous row, and each step
is written with ``out=`` buffers: the same float32 operations, in the same order, as the plain column form kept in
``tests/unit/methods/quant/gptq_speed_reference.py``, so the codes are bit for bit those of that form.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy
import torch

from compressor.methods.quant.ops import Grid, ScaleSearch, fit_qparams


@dataclass
class _Groups:
    """Scale and zero of every (row, group) as the sweep fills them in: ``[out, n_groups]`` float32.

    ``of_column[j]`` is the group of the column quantized ``j``-th (``perm[j] // size``); ``positions[g]`` the
    sweep positions of group ``g``'s columns (ascending); ``bits[g]`` its width; ``importance: [in]`` is
    ``diag(H)`` in sweep order (for the weighted search). ``static`` means every group was fitted before the
    sweep, on the original weights; otherwise a group is fitted when the sweep reaches its first column.
    """

    size: int
    bits: list[int]
    symmetric: bool
    grid: Grid
    scale_search: ScaleSearch
    static: bool
    of_column: list[int]
    positions: list[torch.Tensor]
    first: list[int]
    importance: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor

    def fit(self, g: int, w: torch.Tensor, importance: torch.Tensor) -> None:
        """Fit group ``g`` to the weights ``w: [out, size]`` whose columns have ``importance: [size]``."""
        scale, zero = fit_qparams(w.contiguous(), self.bits[g], self.symmetric, self.grid, self.scale_search,
                                  importance)
        self.scale[:, g] = scale
        self.zero[:, g] = zero


def _sweep(
    W: torch.Tensor, Hinv: torch.Tensor, groups: _Groups, block_size: int, *, keep_rounded: bool = True
) -> tuple[torch.Tensor, torch.Tensor | None, float]:
    """Quantize all columns of ``W: [out, in]`` (sweep order) in blocks; codes, rounded values ``[out, in]``, loss.

    Each block is quantized column by column, then its accumulated error is applied to the columns right
    of it at once: ``W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]`` (the lazy batch update, Sec. 3.2). ``W`` is
    updated in place. The block works on transposed copies (a column of ``W`` is a contiguous row there), so
    the per-column steps, which dominate the solve's time, touch contiguous memory.

    ``keep_rounded`` False returns no rounded values and the codes as uint8 (they are integers 0..255, so the
    conversion is exact): the blocks then share one block-sized buffer instead of a weight-sized one, and the
    transposed result is a quarter of the float32 one.
    """
    out, columns = W.shape
    codes = W.new_empty(columns, out)  # transposed: row j holds column j's codes
    # rows already rounded are only read back as the result: without it, one block's rows suffice
    rounded = W.new_empty(columns if keep_rounded else min(block_size, columns), out)
    rows = _GroupRows.of(groups)
    sums: list[torch.Tensor] = []
    # buffers for every block: fresh large temporaries cost page faults (each block would make five)
    block = min(block_size, columns)
    errors, product, errors_t = W.new_empty(block, out), W.new_empty(block, out), W.new_empty(out, block)
    update = W.new_empty(out * max(columns - block, 0))
    for i1 in range(0, columns, block_size):
        i2 = min(i1 + block_size, columns)
        n = i2 - i1
        # the block, transposed; row i is never updated after column i was rounded
        W1 = rounded[i1:i2] if keep_rounded else rounded[:n]
        W1.copy_(W[:, i1:i2].T)
        Err1 = errors[:n]
        _quantize_block(W, W1, Err1, product[:n], Hinv, i1, groups, rows, codes[i1:i2])
        sums.append(Err1.square().sum(1))
        if i2 < columns:  # nothing is right of the last block
            E = errors_t.copy_(Err1.T) if n == block else Err1.T.contiguous()  # [out, n] as the column form
            W[:, i2:] -= torch.mm(E, Hinv[i1:i2, i2:], out=update[: out * (columns - i2)].view(out, columns - i2))
    # the column form's running float32 total, column after column
    loss = numpy.add.accumulate(torch.cat(sums).numpy(), dtype=numpy.float32)[-1] if sums else 0.0
    del update, rows, errors, product, errors_t
    if not keep_rounded:
        return codes.to(torch.uint8).T.contiguous(), None, float(loss) / 2
    return codes.T.contiguous(), rounded.T.contiguous(), float(loss) / 2


@dataclass
class _GroupRows:
    """``groups``' scale and zero transposed to ``[n_groups, out]`` rows, with each row's signed level range
    ``low = -zero`` and ``high = 2**b - 1 - zero`` (refreshed by :meth:`refresh` when the sweep fits a group)."""

    scale: torch.Tensor
    zero: torch.Tensor
    low: torch.Tensor
    high: torch.Tensor
    #: The rows above as lists of views (indexing a list is cheaper than indexing a tensor, once per column)
    rows: tuple[tuple[torch.Tensor, ...], ...] = ()

    @classmethod
    def of(cls, groups: _Groups) -> _GroupRows:
        scale, zero = groups.scale.T.contiguous(), groups.zero.T.contiguous()
        maxq = torch.tensor([(1 << b) - 1 for b in groups.bits], dtype=zero.dtype, device=zero.device)
        low, high = -zero, maxq[:, None] - zero
        return cls(scale, zero, low, high, (scale.unbind(0), low.unbind(0), high.unbind(0)))

    def refresh(self, groups: _Groups, g: int) -> None:
        self.scale[g], self.zero[g] = groups.scale[:, g], groups.zero[:, g]
        torch.neg(self.zero[g], out=self.low[g])
        torch.sub((1 << groups.bits[g]) - 1, self.zero[g], out=self.high[g])


def _quantize_block(
    W: torch.Tensor,
    W1: torch.Tensor,
    Err1: torch.Tensor,
    product: torch.Tensor,
    Hinv: torch.Tensor,
    i1: int,
    groups: _Groups,
    rows: _GroupRows,
    codes: torch.Tensor,
) -> None:
    """Quantize the block ``W1 = W[:, i1:i2]^T`` one column (row of ``W1``) at a time with in-block feedback.

    For column ``j``: ``q = clamp(round(w_j / s) + z, 0, 2**b - 1)``, ``err = (w_j - s (q - z)) / Hinv[j, j]`` and
    ``W1[j+1:] -= Hinv[j, j+1:]^T err`` (Eq. 3 with the Cholesky rows of ``H^-1``), each step the same float32
    operations as the reference's column form. Writes the codes into ``codes: [i2-i1, out]`` and the scaled errors
    into ``Err1: [i2-i1, out]`` (``product``, of that shape too, is scratch).
    """
    n = W1.shape[0]
    Hinv1 = Hinv[i1 : i1 + n, i1 : i1 + n]
    weights, errs, levels = W1.unbind(0), Err1.unbind(0), codes.unbind(0)
    diagonal, h = Hinv1.diagonal().unbind(0), Hinv1.unsqueeze(2).unbind(0)  # h[i]: [n, 1]
    scales, lows, highs = rows.rows
    for i in range(n):
        j = i1 + i
        g = groups.of_column[j]
        if not groups.static and j == groups.first[g]:
            at = groups.positions[g]
            groups.fit(g, _current_columns(W, W1, Err1, Hinv, i1, i, at), groups.importance[at])
            rows.refresh(groups, g)
        s, w, level, err = scales[g], weights[i], levels[i], errs[i]
        # q - z = clamp(round(w / s), -z, 2**b - 1 - z): the codes' own values, as z is an integer (exact in float32)
        torch.div(w, s, out=level).round_().clamp_(lows[g], highs[g])
        torch.sub(w, torch.mul(level, s, out=err), out=err).div_(diagonal[i])
        if i + 1 < n:
            rest = product[i + 1 :]
            W1[i + 1 :].sub_(torch.mul(h[i][i + 1 :], err, out=rest))
    codes.add_(rows.zero[groups.of_column[i1 : i1 + n]])


def _current_columns(
    W: torch.Tensor, W1: torch.Tensor, Err1: torch.Tensor, Hinv: torch.Tensor, i1: int, i: int, at: torch.Tensor
) -> torch.Tensor:
    """Columns at sweep positions ``at`` (all ``>= i1 + i``) as an unblocked sweep would see them now.

    Inside the block ``W1: [i2-i1, out]`` (transposed) is up to date; columns past the block still owe the
    block's errors so far, ``Err1[:i]^T @ Hinv[i1:i1+i, at]`` (``Err1: [i2-i1, out]``). Returns ``[out, len(at)]``.
    """
    n = W1.shape[0]
    inside = at < i1 + n
    if bool(inside.all()):
        return W1[at - i1].T
    current = W.new_empty(W.shape[0], at.numel())
    current[:, inside] = W1[at[inside] - i1].T
    outside = at[~inside]
    errors = Err1.T.contiguous()  # [out, i2-i1], the layout the column form multiplies
    current[:, ~inside] = W[:, outside] - errors[:, :i] @ Hinv[i1 : i1 + i, outside]
    return current
