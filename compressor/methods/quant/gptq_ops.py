"""The GPTQ solver (Frantar et al. 2022, Algorithm 1) as pure functions on tensors.

``accumulate_hessian`` folds calibration inputs into ``H = 2/n * sum_k x_k x_k^T`` (the Hessian of the
layer-wise objective ``||X W^T - X W_hat^T||^2``); ``gptq_quantize`` quantizes ``W: [out, in]`` one column
at a time, left to right (or by descending ``diag(H)`` with ``act_order``), and after each column spreads
its rounding error over the columns not yet quantized through the upper Cholesky factor of ``H^-1``
(Eq. 3 of the paper with the Cholesky reformulation of Sec. 3.3), updating lazily in blocks (Sec. 3.2).

The paper's symbols are kept: ``H`` the Hessian, ``Hinv`` the upper Cholesky factor of its dampened
inverse, ``W1``/``Err1`` the current block of weights and of scaled errors. The column sweep itself, where the
solve spends most of its time, is in ``gptq_sweep.py``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Literal

import torch

from compressor.methods.quant.gptq_sweep import _Groups, _sweep
from compressor.methods.quant.ops import Grid, QuantizedWeight, ScaleSearch

_MAX_RETRIES = 6  # dampening grows tenfold per retry: 0.01 -> 1e4 at most
_RETRY_START = 0.01  # first retry when the caller asked for no dampening at all


@dataclass
class GPTQResult:
    """What ``gptq_quantize`` returns for one weight.

    ``qweight`` holds the codes in original column order with contiguous groups (no ``g_idx``), and
    ``W_hat = qweight.dequantize()``: ``[out, in]`` float32. ``dampening`` is the fraction of
    ``mean(diag H)`` finally added to the diagonal (larger than asked after ``cholesky_retries``).
    ``loss`` is ``sum_j ||w_j - q_j||^2 / (2 [Hinv]_jj^2)``, the reference's ``Losses``. ``dead_columns``
    counts inputs that were always zero (``H[j, j] == 0``); their weights are zeroed.
    ``bits_per_group`` echoes the per-group widths when mixed precision was asked, else ``None``; then
    ``qweight.bits`` is their maximum and ``qweight.group_bits`` holds them.
    """

    qweight: QuantizedWeight
    dampening: float
    cholesky_retries: int
    loss: float
    dead_columns: int
    bits_per_group: list[int] | None = None
    #: ``[out, in]`` float32, original column order: the value each code rounded (the weight as updated by the
    #: errors of the columns before it), so ``q == clamp(round(rounded / scale) + zero)``; block-wise refinement
    #: (``refine_ops``) learns its rounding offsets around it.
    rounded: torch.Tensor | None = None

    @property
    def W_hat(self) -> torch.Tensor:
        """``qweight.dequantize()``, computed when asked (the engine dequantizes to the module's dtype itself)."""
        return self.qweight.dequantize()


FitOn = Literal["auto", "original", "sweep"]


def accumulate_hessian(
    H: torch.Tensor | None, x: torch.Tensor, n_seen: int, dtype: torch.dtype = torch.float32
) -> tuple[torch.Tensor, int]:
    """Fold a batch ``x: [..., in]`` into the running mean ``H = 2/n * sum_k x_k x_k^T``: ``[in, in]``.

    ``n`` counts input vectors (every row of ``x`` flattened to ``[-1, in]``, i.e. tokens; the reference
    counts sequences, which only rescales ``H``, and GPTQ is invariant to the scale of ``H``). The old
    mean is rescaled by ``n_seen / n_new`` as in the reference. ``H is None`` starts a new sum in ``dtype``
    (float32, or float64 for long calibration runs); otherwise ``H``'s own dtype is kept. Returns the new
    ``H`` (the argument is not modified) and ``n_new``.
    """
    rows = x.reshape(-1, x.shape[-1])
    columns = rows.shape[1]
    if H is None:
        # a new sum has beta 0, so addmm never reads it: a broadcast zero holds no [in, in] memory
        H = torch.zeros((), dtype=dtype, device=x.device).expand(columns, columns)
    if H.shape != (columns, columns):
        raise ValueError(f"Hessian of shape {tuple(H.shape)} does not match inputs of width {columns}")
    n_new = n_seen + rows.shape[0]
    if rows.shape[0] == 0:
        return H.contiguous(), n_seen
    rows = rows.to(H.dtype)
    return _symmetric_update(H, rows, beta=n_seen / n_new, alpha=2 / n_new), n_new


def asymmetric_target(
    W: torch.Tensor, H: torch.Tensor, D: torch.Tensor, dampening: float, strength: float = 1.0
) -> torch.Tensor:
    """The weight to give GPTQ (with ``H``) so that it minimises ``||X_f W^T - X Q^T||^2``: GPTAQ's asymmetric
    objective, in which the quantized layer, fed the quantized prefix's inputs ``X``, is fitted to what the float
    weights make of the float model's inputs ``X_f``. ``float32 [out, in]``.

    With ``H = 2/n X^T X`` and ``D = 2/n (X_f - X)^T X`` (``engine.LayerContext.asymmetric_hessian``) the
    objective of one output row ``q`` is ``(q - w')^T H (q - w') + const`` with ``w'^T = w^T (I + D H^-1)``, the
    least-squares weight on ``X``: so GPTQ's own sweep on ``w'`` (the symmetric objective's minimiser) is the
    asymmetric one's, column for column. ``H`` is dampened as GPTQ dampens it (``dampening * mean(diag H)``,
    inputs that were always zero set to 1) so the correction is the ridge solution GPTQ's factor implies.
    ``strength`` scales the correction: 0 is plain GPTQ, 1 the full least-squares target; between them a
    shrunken one (the GPTAQ reference scales its correction by 0.25).
    """
    if strength == 0:
        return W.float()
    Hd = H.double().clone()
    diagonal = torch.diagonal(Hd)
    diagonal[diagonal == 0] = 1
    diagonal.add_(dampening * diagonal.mean())
    L, info = torch.linalg.cholesky_ex(Hd)
    if int(info) != 0:
        raise ValueError("the dampened Hessian is not positive definite: use a larger dampening")
    correction = torch.cholesky_solve(D.double().T, L).T  # D H^-1 (H symmetric)
    return (W.double() + strength * (W.double() @ correction)).float()


def _symmetric_update(H: torch.Tensor, rows: torch.Tensor, beta: float, alpha: float, block: int = 192) -> torch.Tensor:
    """``beta * H + alpha * rows^T rows``, computing only the blocks on and above the diagonal.

    ``H`` is symmetric, so the blocks below mirror those above: for a 1536-wide input (an MLP's down
    projection) that is 36 of 64 block products, for a 576-wide one 6 of 9, of the work that dominates GPTQ's
    statistics. Blocks of 192 measured fastest on one core (576 wide: 25% less time than blocks of 512, which
    computed all of it; 1536 wide: 5-10% less; smaller blocks lose more to the BLAS than they skip). Each entry is
    one dot product whatever the blocks; with ``alpha`` a power of two the bits do not depend on the block.
    """
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


def gptq_quantize(
    W: torch.Tensor,
    H: torch.Tensor,
    bits: int,
    group_size: int,
    symmetric: bool,
    act_order: bool,
    block_size: int = 128,
    dampening: float = 0.01,
    *,
    bits_per_group: torch.Tensor | None = None,
    grid: Grid = "restricted",
    scale_search: ScaleSearch = "none",
    fit_on: FitOn = "auto",
    keep_rounded: bool = True,
) -> GPTQResult:
    """Quantize ``W: [out, in]`` against the Hessian ``H: [in, in]`` of its inputs (GPTQ, Algorithm 1).

    ``group_size`` -1 is one group per row, otherwise it must divide ``in``. Without ``act_order`` a
    group's scale and zero are fitted when the sweep reaches its first column, on the weights as updated
    by every earlier column's error (the result does not depend on ``block_size``; the reference fits on
    weights missing the current block's updates). With ``act_order`` columns go by descending
    ``diag(H)`` but groups are static: fitted on the original ``W``'s contiguous groups before the sweep,
    so the stored groups stay contiguous and no ``g_idx`` is needed. ``dampening * mean(diag H)`` is added
    to the diagonal, multiplied by 10 up to 6 times while the Cholesky factorisation fails.
    ``bits_per_group: [n_groups]`` gives each group its own width (see ``GPTQResult``). ``grid`` and
    ``scale_search`` choose each group's scale (``ops.compute_qparams`` / ``ops.search_qparams``; the weighted
    search weighs columns by ``diag(H)``). ``fit_on`` says when groups are fitted: ``original`` before the sweep
    on the original ``W`` (static), ``sweep`` when the sweep reaches a group's first column, on the weights as
    updated by every earlier column's error (with act-order the group's columns are gathered from wherever the
    order put them), ``auto`` the reference's choice (``original`` with act-order, ``sweep`` without).
    The caller's tensors are not modified; the sweep runs in float32 (the inverse in float64 when ``H``
    is float64), on the device ``W`` and ``H`` share. ``keep_rounded`` False leaves ``GPTQResult.rounded`` None
    (only refinement reads it); the solve then holds one weight-sized float32 tensor less.
    Memory: besides the caller's ``W`` and ``H``, at most two ``[in, in]`` matrices at once (the factorisation
    works on a fresh permuted copy per attempt instead of keeping one to clone), and no copy of ``W`` when
    act-order permutes it anyway: a 5632-wide down projection's solve needs 3 Hessian-sized matrices, not 6.
    Raises ``ValueError`` on bad arguments, non-finite ``W`` or ``H``, or a Hessian that stays singular.
    """
    out, columns = _check_shapes(W, H, block_size, dampening)
    size = columns if group_size == -1 else group_size
    group_bits = _group_bits(bits, group_size, columns, bits_per_group)
    W = W.detach().float()
    H = H.detach().to(torch.float64 if H.dtype == torch.float64 else torch.float32)
    dead = torch.nonzero(torch.diagonal(H) == 0).squeeze(1)
    if dead.numel():  # private copies: the caller's tensors are not modified
        W, H = W.clone(), H.clone()
        H[dead, dead] = 1
        W[:, dead] = 0
    static = act_order if fit_on == "auto" else fit_on == "original"
    groups, perm = _plan_groups(W, H, size, group_bits, symmetric, act_order, static, grid, scale_search)
    if act_order:
        W = W.index_select(1, perm)
    elif not dead.numel():
        W = W.clone()  # the sweep updates it in place
    fresh = partial(_permute_symmetric, H, perm) if act_order else H.clone
    Hinv, used, retries = _damped_inverse_factor(fresh, dampening)
    codes, rounded, loss = _sweep(W, Hinv, groups, block_size, keep_rounded=keep_rounded)
    del W, Hinv
    codes = codes.to(torch.uint8)  # the codes are integers 0..255 in float32: exact
    if act_order:
        inverse = torch.argsort(perm)
        codes = codes.index_select(1, inverse)
        rounded = None if rounded is None else rounded.index_select(1, inverse)
    qweight = QuantizedWeight(
        q=codes,
        scale=groups.scale,
        zero=groups.zero.to(torch.int32),
        bits=max(group_bits),
        group_size=group_size,
        symmetric=symmetric,
        group_bits=None if bits_per_group is None else torch.tensor(group_bits, dtype=torch.int64),
    )
    mixed = None if bits_per_group is None else group_bits
    return GPTQResult(qweight, used, retries, loss, int(dead.numel()), mixed, rounded)


def _check_shapes(W: torch.Tensor, H: torch.Tensor, block_size: int, dampening: float) -> tuple[int, int]:
    """``(out, in)`` of ``W``, after checking ``H: [in, in]``, finiteness and the sweep settings."""
    if W.dim() != 2:
        raise ValueError(f"weight must be 2-D [out, in], got shape {tuple(W.shape)}")
    out, columns = W.shape
    if H.shape != (columns, columns):
        raise ValueError(f"Hessian of shape {tuple(H.shape)} does not match a weight with {columns} inputs")
    if not _finite(H):
        raise ValueError("Hessian has NaN or inf entries (overflowing activations in calibration?)")
    if not _finite(W):
        raise ValueError("weight has NaN or inf entries")
    if block_size < 1:
        raise ValueError(f"block_size must be at least 1, got {block_size}")
    if not dampening >= 0:
        raise ValueError(f"dampening must be >= 0, got {dampening}")
    return out, columns


def _finite(x: torch.Tensor) -> bool:
    """Every entry of ``x`` is finite: its largest and smallest are (NaN propagates through both), a tenth the
    time of ``isfinite(x).all()`` on a Hessian."""
    return x.numel() == 0 or bool(torch.isfinite(x.amax()) & torch.isfinite(x.amin()))


def _permute_symmetric(H: torch.Tensor, perm: torch.Tensor) -> torch.Tensor:
    """``H[perm][:, perm]`` (any ``H: [in, in]``) by gathering whole rows twice, with a transpose after each:
    gathering columns is several times slower."""
    return H.index_select(0, perm).T.contiguous().index_select(0, perm).T.contiguous()


def _group_bits(bits: int, group_size: int, columns: int, bits_per_group: torch.Tensor | None) -> list[int]:
    """The width of every group, ``[n_groups]`` ints in 2..8, after checking ``group_size`` divides."""
    if group_size != -1 and (group_size < 1 or columns % group_size):
        raise ValueError(f"group_size {group_size} must be -1 (per channel) or divide the {columns} inputs")
    n_groups = 1 if group_size == -1 else columns // group_size
    if bits_per_group is None:
        widths = [bits] * n_groups
    else:
        if bits_per_group.shape != (n_groups,):
            raise ValueError(f"bits_per_group must have shape ({n_groups},), got {tuple(bits_per_group.shape)}")
        widths = [int(b) for b in bits_per_group.tolist()]
    if any(b < 2 or b > 8 for b in widths):
        raise ValueError(f"bits must lie in 2..8, got {sorted(set(widths))}")
    return widths


def _plan_groups(
    W: torch.Tensor,
    H: torch.Tensor,
    size: int,
    group_bits: list[int],
    symmetric: bool,
    act_order: bool,
    static: bool,
    grid: Grid,
    scale_search: ScaleSearch,
) -> tuple[_Groups, torch.Tensor]:
    """The sweep order ``perm: [in]`` (descending ``diag(H)`` with act-order) and the groups.

    With ``static`` every group is fitted here, on the unpermuted ``W``'s contiguous columns.
    """
    out, columns = W.shape
    perm = torch.arange(columns, device=W.device)
    if act_order:
        perm = torch.argsort(torch.diagonal(H), descending=True, stable=True)
    n_groups = columns // size
    of_column = perm // size
    positions = [torch.nonzero(of_column == g).squeeze(1) for g in range(n_groups)]
    diagonal = torch.diagonal(H).float()
    groups = _Groups(
        size=size,
        bits=group_bits,
        symmetric=symmetric,
        grid=grid,
        scale_search=scale_search,
        static=static,
        of_column=of_column.tolist(),
        positions=positions,
        first=[int(p[0]) for p in positions],
        importance=diagonal[perm],
        scale=W.new_ones(out, n_groups),
        zero=W.new_zeros(out, n_groups),
    )
    if static:
        for g in range(n_groups):
            columns_g = slice(g * size, (g + 1) * size)
            groups.fit(g, W[:, columns_g], diagonal[columns_g])
    return groups, perm


def _inverse_cholesky(H: torch.Tensor, dampening: float) -> tuple[torch.Tensor, float, int]:
    """Upper Cholesky factor of ``(H + dampening * mean(diag H) * I)^-1``, float32 ``[in, in]``.

    Retries with tenfold dampening while a factorisation fails or turns non-finite. Returns the factor,
    the dampening fraction used and the number of retries; raises ``ValueError`` after the last retry.
    """
    return _damped_inverse_factor(H.clone, dampening)


def _damped_inverse_factor(fresh: Callable[[], torch.Tensor], dampening: float) -> tuple[torch.Tensor, float, int]:
    """:func:`_inverse_cholesky` of the ``H`` that ``fresh()`` makes anew (a copy the caller keeps nothing of).

    Each attempt dampens a new copy in place, and every intermediate (the dampened copy, its factor, the inverse) is
    dropped as soon as the next is made: two ``[in, in]`` matrices at most, where keeping ``H`` to clone and every
    intermediate alive held five. The values are those of the clone-per-attempt form (same operations).
    """
    fraction = dampening
    for retries in range(_MAX_RETRIES + 1):
        Hd = fresh()
        mean_diag = torch.diagonal(Hd).mean()
        Hd.diagonal().add_(fraction * mean_diag)
        L, info = torch.linalg.cholesky_ex(Hd)
        del Hd
        if int(info) == 0:
            inverse = torch.cholesky_inverse(L)
            del L
            Hinv, info = torch.linalg.cholesky_ex(inverse, upper=True)
            del inverse
            if int(info) == 0 and _finite(Hinv):
                return Hinv.float(), fraction, retries
        if retries < _MAX_RETRIES:
            fraction = fraction * 10 if fraction > 0 else _RETRY_START
    raise ValueError(
        f"Cholesky factorisation of the Hessian failed even with dampening {fraction:g} "
        f"after {_MAX_RETRIES} retries; use more calibration samples or a larger dampening"
    )
