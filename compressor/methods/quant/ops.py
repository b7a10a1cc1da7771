"""Uniform integer quantization primitives shared by RTN, GPTQ, BAQ and the exports.

One representation everywhere: unsigned codes ``q`` in ``[0, 2**bits - 1]``, a float ``scale`` and an
integer ``zero`` per (output row, group), and ``w = scale * (q - zero)``. Symmetric quantization is the
special case ``zero = 2**(bits - 1)``, so the signed value ``q - zero`` lies in
``[-2**(bits-1), 2**(bits-1) - 1]`` (what compressed-tensors stores and what GGUF Q4_0/Q8_0 hold).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Literal

import torch


@dataclass
class QuantizedWeight:
    """The integer form of one linear weight ``W: [out, in]``.

    ``q: [out, in]`` uint8 codes; ``scale: [out, n_groups]`` float32; ``zero: [out, n_groups]`` int32.
    Column ``j`` uses group ``g_idx[j]`` when ``g_idx`` is set, else ``j // group_size`` (per channel:
    one group covering every column). ``bits`` is the code width (2..8). ``group_bits: [n_groups]``
    int64, when set, gives each group its own width (mixed precision planned by BAQ); ``bits`` is then
    their maximum, and the per-group ``zero`` already holds each group's midpoint when symmetric.
    """

    q: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor
    bits: int
    group_size: int
    symmetric: bool
    g_idx: torch.Tensor | None = None
    group_bits: torch.Tensor | None = None

    @property
    def shape(self) -> tuple[int, int]:
        return (int(self.q.shape[0]), int(self.q.shape[1]))

    def to(self, device: torch.device | str) -> QuantizedWeight:
        """The same weight with every tensor on ``device`` (the engine moves finished layers' codes off the GPU)."""
        g_idx = None if self.g_idx is None else self.g_idx.to(device)
        group_bits = None if self.group_bits is None else self.group_bits.to(device)
        return replace(self, q=self.q.to(device), scale=self.scale.to(device), zero=self.zero.to(device),
                       g_idx=g_idx, group_bits=group_bits)

    def column_groups(self) -> torch.Tensor:
        """Group index of every input column, ``[in]`` int64."""
        if self.g_idx is not None:
            return self.g_idx.long()
        columns = self.q.shape[1]
        size = columns if self.group_size <= 0 else self.group_size
        return torch.arange(columns, device=self.q.device) // size

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        groups = self.column_groups()
        scale = self.scale.index_select(1, groups).float()  # index_select: gathering columns by [:, groups] is slow
        zero = self.zero.index_select(1, groups).float()
        return (scale * (self.q.float() - zero)).to(dtype)

    def signed(self) -> torch.Tensor:
        """``q - zero`` for symmetric weights, as int8: the values compressed-tensors and GGUF store."""
        if not self.symmetric:
            raise ValueError("signed() is only defined for symmetric quantization")
        if self.group_bits is None:
            return (self.q.to(torch.int16) - (1 << (self.bits - 1))).to(torch.int8)
        offset = torch.bitwise_left_shift(1, self.group_bits.long()[self.column_groups()] - 1)
        return (self.q.to(torch.int16) - offset.to(torch.int16)).to(torch.int8)

    def column_bits(self) -> torch.Tensor:
        """Code width of every input column, ``[in]`` int64."""
        if self.group_bits is None:
            return torch.full((self.shape[1],), self.bits, dtype=torch.int64)
        return self.group_bits.long().cpu()[self.column_groups().cpu()]

    def code_bits(self) -> int:
        """Bits of the codes alone: ``out * sum of the column widths``."""
        return self.shape[0] * int(self.column_bits().sum())

    def average_bits(self) -> float:
        """Mean code width per weight (``bits`` unless the groups are mixed)."""
        return self.code_bits() / self.q.numel() if self.q.numel() else float(self.bits)

    def storage_bits(self) -> int:
        """Bits of codes plus per-group metadata (16-bit scale, and zero point when asymmetric).

        An asymmetric zero point is stored at its group's code width.
        """
        out = self.shape[0]
        n_groups = int(self.scale.shape[1])
        if self.group_bits is None:
            zero_bits = n_groups * self.bits
        else:
            zero_bits = int(self.group_bits.long().sum())
        return self.code_bits() + out * n_groups * 16 + (0 if self.symmetric else out * zero_bits)


def effective_group_size(columns: int, group_size: int) -> int:
    """The group size to use for ``columns`` when ``group_size`` was asked (-1: per channel).

    Formats need whole groups, and serving kernels want power-of-two groups: when ``group_size`` does
    not divide the width, take the largest power of two below it that does (SmolLM2's 576-wide
    projections cannot take 128, so they get 64).
    """
    if group_size <= 0 or group_size >= columns:
        return -1 if group_size <= 0 else columns
    if columns % group_size == 0:
        return group_size
    size = 1 << (group_size.bit_length() - 1)
    while columns % size:
        size //= 2
    return size


Grid = Literal["restricted", "full", "full_positive"]
ScaleSearch = Literal["none", "mse", "weighted"]
#: Candidate scales of the search: the grid's min/max scale times ``2**(b-1) / (2**(b-1) + delta)``, i.e. the
#: group's extreme placed ``delta`` levels beyond (clipping) or inside the outermost level, as llama.cpp's
#: ``make_qx_quants`` and auto-round's ``search_scales`` step their inverse scales.
SEARCH_DELTAS = tuple(i / 10 for i in range(-10, 11) if i)


def compute_qparams(
    w: torch.Tensor, bits: int, symmetric: bool, clip: float = 1.0, grid: Grid = "restricted"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Min/max scale and zero over the last dim of ``w: [..., cols]`` -> ``scale, zero: [...]``.

    Symmetric grids (codes ``q - 2**(b-1)`` in ``[-2**(b-1), 2**(b-1) - 1]`` in every case):
    ``restricted`` (the GPTQ reference's): ``scale = 2 max|w| / (2**b - 1)``, so ``max|w|`` sits at
    ``(2**b - 1) / 2`` steps; the positive extreme clamps half a step short and the level ``-2**(b-1)`` is only
    reached by a negative extreme. ``full`` (llama.cpp's Q4_0): the weight of largest magnitude ``m`` lands
    exactly on ``-2**(b-1)``, ``scale = -m / 2**(b-1)`` (negative when ``m > 0``): every level is used.
    ``full_positive``: the smallest positive scale that fits both ends on the full levels,
    ``max(-min / 2**(b-1), max / (2**(b-1) - 1))``, for consumers that need positive scales.
    Asymmetric ranges already use all ``2**b`` levels (``grid`` is ignored). ``clip`` scales the range (the
    search tries values around 1). Groups that are all zero get scale 1 so they quantize exactly to zero.
    """
    maxq = (1 << bits) - 1
    half = 1 << (bits - 1)
    w = w.float()
    wmin = torch.clamp(w.amin(dim=-1), max=0) * clip  # amin/amax: min/max without their indices (8x faster)
    wmax = torch.clamp(w.amax(dim=-1), min=0) * clip
    if symmetric:
        if grid == "full":
            scale = torch.where(wmax > -wmin, -wmax, -wmin) / half  # -(the signed extreme) / half
        elif grid == "full_positive":
            scale = torch.maximum(-wmin / half, wmax / (half - 1))
        else:
            scale = 2 * torch.maximum(wmin.abs(), wmax) / maxq
        zero = torch.full_like(scale, float(half))
    else:
        scale = (wmax - wmin) / maxq
        zero = torch.round(-wmin / torch.where(scale == 0, torch.ones_like(scale), scale))
    dead = scale == 0
    scale = torch.where(dead, torch.ones_like(scale), scale)
    if not symmetric:
        zero = torch.where(dead, torch.zeros_like(zero), zero)
    return scale, zero.clamp(0, maxq)


def quantize_codes(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    """Codes ``clamp(round(w / scale) + zero, 0, 2**bits - 1)``; scale/zero broadcast against ``w``."""
    maxq = (1 << bits) - 1
    return torch.clamp(torch.round(w.float() / scale) + zero, 0, maxq)


def fake_quantize(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    """Quantize then dequantize (the GPTQ reference's ``quantize``), in float32."""
    return scale * (quantize_codes(w, scale, zero, bits) - zero)


def search_qparams(
    w: torch.Tensor,
    bits: int,
    symmetric: bool,
    grid: Grid = "restricted",
    importance: torch.Tensor | None = None,
    deltas: tuple[float, ...] = SEARCH_DELTAS,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero over the last dim of ``w: [..., cols]`` minimising ``sum a (w - w_hat)^2`` -> ``[...]``.

    ``importance`` (``a``, broadcastable to ``w``; default 1) weighs each input column: GPTQ's ``diag(H)``, the
    mean squared activation (llama.cpp's importance matrix), makes the error the one the layer output sees
    when inputs are uncorrelated. Candidates: the plain min/max fit of ``grid``, then its range scaled by
    ``2**(b-1) / (2**(b-1) + delta)`` for each ``delta``. Each candidate's codes ``l`` get their least-squares
    scale (and, asymmetric, offset); the candidate whose refit leaves the least error wins. Rounding again at
    the refit scale can only lower the error further, so the result is never worse than the plain fit.
    ``full_positive`` and ``restricted`` keep positive scales; ``full`` keeps the sign that puts the extreme on
    ``-2**(b-1)``.
    """
    w = w.float()
    a = torch.ones_like(w) if importance is None else importance.float().expand_as(w)
    ratios = [(1 << (bits - 1)) / ((1 << (bits - 1)) + delta) for delta in (0.0, *deltas)]
    if not symmetric:
        return _search_asymmetric(w, a, bits, ratios)
    # Every step is row-wise (a row: the last dim), so pieces of rows give the same bits as the whole, and a
    # piece's float64 temporaries stay in cache: the search is memory-bound otherwise.
    shape, columns = w.shape[:-1], w.shape[-1]
    rows, weights = w.reshape(-1, columns), a.reshape(-1, columns)
    step = max(1, _SEARCH_PIECE // max(columns, 1))
    pieces = [
        _search_symmetric(rows[i : i + step], weights[i : i + step], bits, grid, ratios)
        for i in range(0, rows.shape[0], step)
    ]
    if not pieces:
        return compute_qparams(w, bits, True, grid=grid)
    return torch.cat([p[0] for p in pieces]).reshape(shape), torch.cat([p[1] for p in pieces]).reshape(shape)


#: Elements of ``w`` the symmetric search takes at a time (its float64 temporaries then fit a core's L2 cache).
_SEARCH_PIECE = 1 << 17


def _search_symmetric(
    w: torch.Tensor, a: torch.Tensor, bits: int, grid: Grid, ratios: list[float]
) -> tuple[torch.Tensor, torch.Tensor]:
    """For codes ``l``, the refit ``s = sum a w l / sum a l^2`` leaves ``sum a w^2 - (sum a w l)^2 / sum a l^2``:
    the candidate with the largest ``(sum a w l)^2 / sum a l^2`` wins (llama.cpp's ``make_qx_quants`` rule)."""
    half = 1 << (bits - 1)
    base, zero = compute_qparams(w, bits, True, grid=grid)
    aw, a = (a * w).double(), a.double()  # the gains differ from sum a w^2 by the error: float32 cannot tell
    best_gain = torch.full_like(base, -float("inf"), dtype=torch.float64)
    best_scale = base
    # one set of buffers for every candidate: fresh large temporaries cost page faults, more than the arithmetic
    level, level64, product = torch.empty_like(w), torch.empty_like(aw), torch.empty_like(aw)
    for ratio in ratios:
        scale = base * ratio
        torch.mul(w, (1 / scale)[..., None], out=level).round_().clamp_(-half, half - 1)
        level64.copy_(level)
        s1 = torch.mul(aw, level64, out=product).sum(-1)  # what vecdot computes, without its temporaries
        s2 = torch.mul(a, level64.mul_(level64), out=product).sum(-1)
        positive = s2 > 0
        divisor = torch.where(positive, s2, 1.0)
        fit = (s1 / divisor).float()
        # a refit that would flip the grid's sign is no candidate
        gain = s1 * s1 / divisor
        better = positive & (fit * scale > 0) & (gain > best_gain)
        best_gain = torch.where(better, gain, best_gain)
        best_scale = torch.where(better, fit, best_scale)
    return best_scale, zero


def _search_asymmetric(
    w: torch.Tensor, a: torch.Tensor, bits: int, ratios: list[float]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Each candidate range and its joint (scale, offset) refit, the offset rounded to an integer zero point;
    both scored by their exact error (the integer zero makes the refit's own error a bound, not a value)."""
    best_scale, best_zero = compute_qparams(w, bits, False)
    best_err = _error(w, a, best_scale, best_zero, bits)
    for ratio in ratios:
        scale, zero = compute_qparams(w, bits, False, ratio)
        for candidate in ((scale, zero), _refit_asymmetric(w, a, scale, zero, bits)):
            err = _error(w, a, *candidate, bits)
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best_scale = torch.where(better, candidate[0], best_scale)
            best_zero = torch.where(better, candidate[1], best_zero)
    return best_scale, best_zero


def _error(w: torch.Tensor, a: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    """``sum a (w - fake_quantize(w))^2`` over the last dim."""
    return (a * (fake_quantize(w, scale[..., None], zero[..., None], bits) - w).square()).sum(-1)


def _refit_asymmetric(
    w: torch.Tensor, a: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """``w ~ s q + c`` solved by weighted least squares for the codes ``q`` of ``(scale, zero)``, then
    ``zero = round(-c / s)``. A degenerate fit (constant codes, a non-positive scale) keeps the input."""
    q = quantize_codes(w, scale[..., None], zero[..., None], bits)
    s_a, s_q, s_qq = a.sum(-1), torch.linalg.vecdot(a, q), torch.linalg.vecdot(a, q.square())
    s_w, s_wq = torch.linalg.vecdot(a, w), torch.linalg.vecdot(a * w, q)
    det = s_a * s_qq - s_q.square()
    fit = (s_a * s_wq - s_q * s_w) / torch.where(det > 0, det, torch.ones_like(det))
    ok = (det > 0) & (fit > 0)
    fit = torch.where(ok, fit, scale)
    offset = (s_w - fit * s_q) / torch.where(s_a > 0, s_a, torch.ones_like(s_a))
    fit_zero = torch.round(-offset / fit).clamp(0, (1 << bits) - 1)
    return fit, torch.where(ok, fit_zero, zero)


def fit_qparams(
    w: torch.Tensor,
    bits: int,
    symmetric: bool,
    grid: Grid = "restricted",
    scale_search: ScaleSearch = "none",
    importance: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One group fit over the last dim of ``w``: the grid's min/max scale, or the searched one.

    ``importance`` (broadcastable to ``w``) is used only by ``scale_search="weighted"``, which requires it.
    """
    if scale_search == "none":
        return compute_qparams(w, bits, symmetric, grid=grid)
    if scale_search == "weighted":
        if importance is None:
            raise ValueError("scale_search 'weighted' needs the input importance (diag of the Hessian)")
        return search_qparams(w, bits, symmetric, grid, importance)
    if scale_search == "mse":
        return search_qparams(w, bits, symmetric, grid)
    raise ValueError(f"scale_search must be none, mse or weighted, got {scale_search!r}")


def group_qparams(
    w: torch.Tensor,
    bits: int,
    group_size: int,
    symmetric: bool,
    grid: Grid = "restricted",
    scale_search: ScaleSearch = "none",
    importance: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero for every (row, group) of ``w: [out, in]`` -> two ``[out, n_groups]`` tensors.

    ``importance: [in]`` weighs the input columns for the weighted search (see ``search_qparams``).
    """
    out, columns = w.shape
    size = columns if group_size <= 0 else group_size
    if columns % size:
        raise ValueError(f"group size {size} does not divide {columns} columns")
    blocks = w.float().reshape(out, columns // size, size)
    weights = None if importance is None else importance.float().reshape(1, columns // size, size)
    scale, zero = fit_qparams(blocks, bits, symmetric, grid, scale_search, weights)
    return scale.contiguous(), zero.contiguous()


def quantize_rtn(
    w: torch.Tensor,
    bits: int,
    group_size: int,
    symmetric: bool,
    *,
    grid: Grid = "restricted",
    scale_search: ScaleSearch = "none",
    importance: torch.Tensor | None = None,
    bits_per_group: torch.Tensor | None = None,
) -> QuantizedWeight:
    """Round-to-nearest of ``w: [out, in]`` with per-group ranges: the baseline every method must beat.

    ``grid`` / ``scale_search`` / ``importance: [in]`` choose each group's scale (see ``compute_qparams`` and
    ``search_qparams``). ``bits_per_group: [n_groups]`` gives each group its own width (``bits`` is then ignored).
    """
    size = w.shape[1] if group_size <= 0 else group_size
    groups = torch.arange(w.shape[1], device=w.device) // size
    if bits_per_group is None:
        scale, zero = group_qparams(w, bits, group_size, symmetric, grid, scale_search, importance)
        q = quantize_codes(w, scale[:, groups], zero[:, groups], bits)
        widths = None
    else:
        widths = bits_per_group.long().to(w.device)
        if widths.shape != (w.shape[1] // size,) or bool(((widths < 2) | (widths > 8)).any()):
            raise ValueError(f"bits_per_group must be {w.shape[1] // size} widths in 2..8, got {widths.tolist()}")
        scale = torch.zeros(w.shape[0], widths.numel(), device=w.device)
        zero = torch.zeros_like(scale)
        blocks = w.float().reshape(w.shape[0], widths.numel(), size)
        weights = None if importance is None else importance.float().reshape(1, widths.numel(), size)
        for width in sorted(set(widths.tolist())):
            # Each group is fitted alone: fit (and search) only the groups planned at this width.
            mask = widths == width
            part = None if weights is None else weights[:, mask]
            scale[:, mask], zero[:, mask] = fit_qparams(blocks[:, mask], width, symmetric, grid, scale_search, part)
        maxq = torch.bitwise_left_shift(1, widths[groups]) - 1
        q = torch.minimum((torch.round(w.float() / scale[:, groups]) + zero[:, groups]).clamp(min=0), maxq.float())
        bits = int(widths.max())
    return QuantizedWeight(
        q=q.to(torch.uint8),
        scale=scale.float(),
        zero=zero.to(torch.int32),
        bits=bits,
        group_size=group_size,
        symmetric=symmetric,
        group_bits=widths,
    )


def relative_error(reference: torch.Tensor, approx: torch.Tensor) -> float:
    """``||reference - approx||_F / ||reference||_F`` (0 when the reference is zero)."""
    denom = reference.float().norm()
    if denom == 0:
        return 0.0
    return float((reference.float() - approx.float()).norm() / denom)
