"""DGQ (dual-grained quantization, A8W4) and W8A8 as pure functions on tensors.

Weights ``W: [out, in]`` are stored as signed codes ``c`` (INT4 in ``[-8, 7]``, or INT8 in ``[-128, 127]``), one
small unsigned integer scale ``u`` per (row, group) in ``[1, 16]`` and one float scale ``s`` per output row:
``W_hat = (c * u) * s``. ``c * u`` lies in ``[-128, 112]``, so an INT4 group expanded with its integer scale is
an INT8 weight, and the matmul runs INT8 x INT8 -> INT32 with one float rescale per row and token. Every ``s``
is rounded to 16 significant bits, so ``c * u * s`` is exact in float32 in any order (3 + 4 + 16 bits < 24):
the product form ``c * (u * s)`` that group-scale formats store dequantizes bit for bit the same.

Scales come from the paper's two-phase grid search, each phase minimising the layer's output error on the
calibration inputs, ``tr(dW H dW^T)`` with ``H = X^T X``: phase 1 the channel scale ``s`` (candidates below the
plain fit clip the largest group), phase 2 the integer group scales ``u`` (coordinate descent over groups,
every ``u`` in ``[1, 16]`` tried against the error the other groups leave). ``gptq_dual_grained`` adds GPTQ's
error feedback (``gptq_ops``' column sweep) at the searched channel scales, each group's ``u`` fitted on the
fed-back weights when the sweep reaches it.

Activations are quantized per token, dynamic and symmetric, to INT8 with an optional percentile clip; SmoothQuant's
per-channel scales move activation outliers into the weights and fold into the norm (or linear) before them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from compressor.methods.quant.gptq_ops import _Groups, _inverse_cholesky, _sweep
from compressor.methods.quant.ops import QuantizedWeight

#: Largest integer group scale: an INT4 code times it stays in INT8 (``-8 * 16 = -128``, ``7 * 16 = 112``).
MAX_INT_SCALE = 16
#: Significant bits kept in a channel scale, so products with INT8 integers are exact in float32.
SCALE_SIGNIFICAND_BITS = 16
#: Phase 1 candidates: the plain channel scale times each ratio (below 1 the largest groups clip).
CHANNEL_RATIOS = tuple(1 - i / 40 for i in range(21))


@dataclass
class DualGrainedWeight:
    """The dual-grained integer form of one weight ``W: [out, in]``.

    ``codes: [out, in]`` int8 (INT4 values when ``bits == 4``); ``int_scale: [out, n_groups]`` int16 in
    ``[1, 16]`` (all ones for INT8 weights); ``channel_scale: [out]`` float32 with 16 significant bits;
    ``group_size`` -1 means one group per row.
    """

    codes: torch.Tensor
    int_scale: torch.Tensor
    channel_scale: torch.Tensor
    bits: int
    group_size: int

    def column_int_scale(self) -> torch.Tensor:
        """The integer scale of every weight, ``[out, in]`` int16."""
        columns = self.codes.shape[1]
        size = columns if self.group_size <= 0 else self.group_size
        return self.int_scale.repeat_interleave(size, dim=1)

    def int8_weight(self) -> torch.Tensor:
        """``codes * int_scale``: ``[out, in]`` int8, the weight the INT8 matmul multiplies."""
        return (self.codes.to(torch.int16) * self.column_int_scale()).to(torch.int8)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """``(codes * int_scale) * channel_scale``: ``[out, in]`` (exact in float32)."""
        return (self.int8_weight().float() * self.channel_scale[:, None].float()).to(dtype)

    def to_quantized_weight(self) -> QuantizedWeight:
        """The same weight as one float scale per group, ``int_scale * channel_scale`` (exact products)."""
        half = 1 << (self.bits - 1)
        scale = self.int_scale.float() * self.channel_scale[:, None].float()
        return QuantizedWeight(
            q=(self.codes.to(torch.int16) + half).to(torch.uint8),
            scale=scale,
            zero=torch.full_like(self.int_scale, half, dtype=torch.int32),
            bits=self.bits,
            group_size=self.group_size,
            symmetric=True,
        )


def stored_scale_bits(weight_bits: int, dtype: torch.dtype) -> int:
    """Significant bits a channel scale ``s`` may keep so that every group scale ``u * s`` is exact in ``dtype``.

    Formats that store one float scale per group in the model dtype (compressed-tensors) round ``u * s``; with
    ``s`` at this many bits they store it exactly, so the file holds the in-memory INT8 model. ``u`` takes up to
    4 significant bits (15; 16 is a power of two), so INT4 leaves the dtype's significand minus 4: bfloat16 (8
    bits) 4, float16 (11) 7; INT8 weights (``u = 1``) keep the whole significand. Never more than 16.
    """
    significand = {torch.bfloat16: 8, torch.float16: 11}.get(dtype, 24)
    return min(SCALE_SIGNIFICAND_BITS, significand - 4 if weight_bits == 4 else significand)


def round_significand(x: torch.Tensor, bits: int = SCALE_SIGNIFICAND_BITS) -> torch.Tensor:
    """``x`` rounded to ``bits`` significant bits (float32), so products with small integers stay exact."""
    mantissa, exponent = torch.frexp(x.float())
    return torch.ldexp(torch.round(mantissa * (1 << bits)) / (1 << bits), exponent.float())


def _code_range(bits: int) -> tuple[int, int]:
    if bits not in (4, 8):
        raise ValueError(f"dual-grained weights are 4 or 8 bits, got {bits}")
    return -(1 << (bits - 1)), (1 << (bits - 1)) - 1


def _groups(W: torch.Tensor, group_size: int) -> tuple[int, int]:
    """``(size, n_groups)`` of ``W: [out, in]``; ``group_size`` -1 is one group per row."""
    columns = W.shape[1]
    size = columns if group_size <= 0 else group_size
    if columns % size:
        raise ValueError(f"group_size {group_size} must be -1 or divide the {columns} inputs")
    return size, columns // size


def output_error(dW: torch.Tensor, H: torch.Tensor) -> torch.Tensor:
    """Each row's output error on the calibration inputs, ``d H d^T`` for every row ``d`` of ``dW``: ``[out]``."""
    return ((dW.float() @ H.float()) * dW.float()).sum(dim=1)


def quantize_dual_grained(
    W: torch.Tensor, channel_scale: torch.Tensor, int_scale: torch.Tensor, bits: int, group_size: int
) -> DualGrainedWeight:
    """Round ``W: [out, in]`` to the nearest code at the given scales (``[out]``, ``[out, n_groups]``)."""
    low, high = _code_range(bits)
    size, _ = _groups(W, group_size)
    scale = int_scale.float().repeat_interleave(size, dim=1) * channel_scale[:, None].float()
    codes = torch.clamp(torch.round(W.float() / scale), low, high).to(torch.int8)
    return DualGrainedWeight(codes, int_scale.to(torch.int16), channel_scale.float(), bits, group_size)


def initial_scales(
    W: torch.Tensor, bits: int, group_size: int, ratio: float = 1.0, scale_bits: int = SCALE_SIGNIFICAND_BITS
) -> tuple[torch.Tensor, torch.Tensor]:
    """The plain fit times ``ratio``: ``(channel_scale [out], int_scale [out, n_groups])``.

    Each group's own INT4 scale is ``max|w_g| / 7``; the channel scale puts the row's largest group scale on
    ``u = 16`` (times ``ratio``) and every group takes the nearest integer multiple in ``[1, 16]``. INT8 weights
    have one group per row, ``u = 1`` and ``s = max|w| / 127``. ``s`` keeps ``scale_bits`` significant bits.
    """
    _, high = _code_range(bits)
    size, n_groups = _groups(W, group_size)
    group_max = W.float().abs().reshape(W.shape[0], n_groups, size).amax(dim=-1)
    group_scale = group_max / high
    if bits == 8:
        channel = group_scale.amax(dim=1) * ratio
    else:
        channel = group_scale.amax(dim=1) / MAX_INT_SCALE * ratio
    channel = round_significand(torch.where(channel > 0, channel, torch.ones_like(channel)), scale_bits)
    if bits == 8:
        return channel, torch.ones_like(group_scale, dtype=torch.int16)
    ints = torch.clamp(torch.round(group_scale / channel[:, None]), 1, MAX_INT_SCALE).to(torch.int16)
    return channel, ints


def search_channel_scale(
    W: torch.Tensor, H: torch.Tensor, bits: int, group_size: int, ratios: tuple[float, ...] = CHANNEL_RATIOS,
    scale_bits: int = SCALE_SIGNIFICAND_BITS,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Phase 1: per row, the candidate channel scale whose nearest-integer group scales give the least
    output error ``d H d^T``. Returns ``(channel_scale [out], int_scale [out, n_groups])``; the plain fit
    (ratio 1) is always a candidate, so the result is never worse than it. Channel scales keep ``scale_bits``
    significant bits (:func:`stored_scale_bits`)."""
    best_error = torch.full((W.shape[0],), float("inf"), device=W.device)
    best_channel, best_ints = initial_scales(W, bits, group_size, scale_bits=scale_bits)
    for ratio in (1.0, *ratios):
        channel, ints = initial_scales(W, bits, group_size, ratio, scale_bits)
        weight = quantize_dual_grained(W, channel, ints, bits, group_size)
        error = output_error(W.float() - weight.dequantize(), H)
        better = error < best_error
        best_error = torch.where(better, error, best_error)
        best_channel = torch.where(better, channel, best_channel)
        best_ints = torch.where(better[:, None], ints, best_ints)
    return best_channel, best_ints


def search_int_scales(
    W: torch.Tensor, H: torch.Tensor, channel_scale: torch.Tensor, int_scale: torch.Tensor, bits: int,
    group_size: int, sweeps: int = 1,
) -> torch.Tensor:
    """Phase 2: coordinate descent on the integer group scales ``[out, n_groups]`` with the channel scale fixed.

    For group ``g`` with columns ``G``, replacing its error ``d_G`` by ``d_G + delta`` changes a row's output
    error by ``2 delta . (d H)_G + delta H_GG delta^T``; every ``u`` in ``[1, 16]`` is scored that way and a
    row moves only on a strict decrease, so the error never rises. ``d H`` is updated after each group.
    """
    if bits == 8:
        return int_scale.clone()
    low, high = _code_range(bits)
    size, n_groups = _groups(W, group_size)
    W, H = W.float(), H.float()
    ints = int_scale.clone().to(torch.int16)
    dW = W - quantize_dual_grained(W, channel_scale, ints, bits, group_size).dequantize()
    R = dW @ H
    candidates = [(u, torch.clamp(torch.round(W / (u * channel_scale[:, None])), low, high) * u)
                  for u in range(1, MAX_INT_SCALE + 1)]  # (u, codes * u) for every column
    for _ in range(sweeps):
        for g in range(n_groups):
            G = slice(g * size, (g + 1) * size)
            H_GG = H[G, G]
            best_change = torch.zeros(W.shape[0], device=W.device)
            best_delta = torch.zeros_like(dW[:, G])
            for u, scaled_codes in candidates:
                delta = (W[:, G] - scaled_codes[:, G] * channel_scale[:, None]) - dW[:, G]
                change = 2 * (delta * R[:, G]).sum(1) + ((delta @ H_GG) * delta).sum(1)
                better = change < best_change
                best_change = torch.where(better, change, best_change)
                best_delta = torch.where(better[:, None], delta, best_delta)
                ints[:, g] = torch.where(better, u, ints[:, g])
            dW[:, G] += best_delta
            R += best_delta @ H[G, :]
    return ints


def fit_int_scale(w: torch.Tensor, channel_scale: torch.Tensor, importance: torch.Tensor, bits: int) -> torch.Tensor:
    """The integer scale ``u`` in ``[1, 16]`` of one group ``w: [out, size]`` at channel scales ``[out]``: ``[out]``.

    Every ``u`` is tried; the one with the least ``sum_j importance_j (w_j - q_j)^2`` wins (``importance: [size]``,
    GPTQ's ``diag(H)``; the smallest ``u`` on ties). The group alone is scored: the GPTQ sweep compensates the
    other groups through its feedback, so no cross-group terms (phase 2's) are wanted here.
    """
    low, high = _code_range(bits)
    w, s, weight = w.float(), channel_scale.float()[:, None], importance.float()[None, :]
    best_error = torch.full((w.shape[0],), float("inf"), device=w.device)
    best = torch.ones(w.shape[0], device=w.device)
    for u in range(1, MAX_INT_SCALE + 1):
        q = torch.clamp(torch.round(w / (u * s)), low, high) * (u * s)
        error = ((w - q).square() * weight).sum(dim=1)
        better = error < best_error
        best_error = torch.where(better, error, best_error)
        best = torch.where(better, float(u), best)
    return best


@dataclass
class _DualGrainedGroups(_Groups):
    """GPTQ's groups at DGQ's scales ``u * s``: ``s: [out]`` fixed, each group's ``u`` fitted by
    :func:`fit_int_scale` when the sweep reaches it, on the weights as the feedback has updated them."""

    channel_scale: torch.Tensor
    int_scale: torch.Tensor

    def fit(self, g: int, w: torch.Tensor, importance: torch.Tensor) -> None:
        u = fit_int_scale(w, self.channel_scale, importance, self.bits[g])
        self.int_scale[:, g] = u
        self.scale[:, g] = u * self.channel_scale


def gptq_dual_grained(
    W: torch.Tensor, H: torch.Tensor, channel_scale: torch.Tensor, int_scale: torch.Tensor, bits: int,
    group_size: int, block_size: int = 128, dampening: float = 0.01, refit: bool = True, act_order: bool = False,
) -> DualGrainedWeight:
    """GPTQ's column sweep (error feedback through the Cholesky factor of ``H^-1``) at DGQ's channel scales.

    With ``refit`` (INT4 only) each group's integer scale is fitted when the sweep reaches the group's first
    column, on the weights as updated by every earlier column's error (GPTQ's own order for group scales), by
    :func:`fit_int_scale`; ``int_scale`` is then unused. Without it the given ``int_scale`` is kept: scales
    searched for rounding the original weights (phase 2 trades a group's clipping against the errors of the
    others) clip the fed-back weights, and on the demo model that made GPTQ worse than plain rounding end to end
    (layer 11 alone: KL 0.026 against 0.024; refitted 0.011). Each group's scale is ``u * s`` (exact), its zero
    the code midpoint. ``act_order`` sweeps the columns by descending ``diag(H)``; groups stay the contiguous
    original ones (a column keeps its own group's scale; a group is fitted when the sweep reaches the first of its
    columns, on all of them as fed back so far). Inputs that are always zero (``H[j, j] == 0``) get zero weights,
    as in ``gptq_quantize``. Raises ``ValueError`` when the Hessian stays singular.
    """
    size, n_groups = _groups(W, group_size)
    half = 1 << (bits - 1)
    W = W.detach().float().clone()
    H = H.detach().float().clone()
    dead = torch.nonzero(torch.diagonal(H) == 0).squeeze(1)
    H[dead, dead] = 1
    W[:, dead] = 0
    ints = int_scale.float().clone()
    perm = torch.arange(W.shape[1], device=W.device)
    if act_order:
        perm = torch.argsort(torch.diagonal(H), descending=True, stable=True)
        W, H = W[:, perm], H[perm][:, perm]
    of_column = perm // size  # the original group of the column swept j-th
    positions = [torch.nonzero(of_column == g).squeeze(1) for g in range(n_groups)]
    groups = _DualGrainedGroups(
        size=size, bits=[bits] * n_groups, symmetric=True, grid="restricted", scale_search="none",
        static=not (refit and bits == 4), of_column=of_column.tolist(), positions=positions,
        first=[int(p[0]) for p in positions], importance=torch.diagonal(H).clone(),
        scale=ints * channel_scale[:, None].float(), zero=torch.full_like(ints, float(half)),
        channel_scale=channel_scale.float(), int_scale=ints,
    )
    Hinv, _, _ = _inverse_cholesky(H, dampening)
    codes, _, _ = _sweep(W, Hinv, groups, block_size)
    signed = (codes[:, torch.argsort(perm)] - half).to(torch.int8)
    return DualGrainedWeight(signed, groups.int_scale.to(torch.int16), channel_scale.float(), bits, group_size)


def quantize_activations(x: torch.Tensor, percentile: float = 100.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token dynamic symmetric INT8: ``x: [..., in]`` -> codes ``[..., in]`` int8 and scales ``[..., 1]`` float32.

    A token's scale is its clip value over 127; the clip is ``max|x|`` at ``percentile`` 100, otherwise the
    ``percentile``-th percentile of ``|x|`` over the token's channels (the ``ceil(p/100 * in)``-th smallest), so
    the few largest values saturate at +-127 (or -128). An all-zero token gets scale 1.
    """
    if not 0 < percentile <= 100:
        raise ValueError(f"percentile must be in (0, 100], got {percentile}")
    magnitude = x.float().abs()
    if percentile == 100:
        clip = magnitude.amax(dim=-1, keepdim=True)
    else:
        k = max(1, math.ceil(percentile / 100 * x.shape[-1]))
        clip = magnitude.kthvalue(k, dim=-1, keepdim=True).values
    scale = torch.where(clip > 0, clip / 127, torch.ones_like(clip))
    codes = torch.clamp(torch.round(x.float() / scale), -128, 127).to(torch.int8)
    return codes, scale


def fake_quantize_activations(x: torch.Tensor, percentile: float = 100.0) -> torch.Tensor:
    """``codes * scale`` of :func:`quantize_activations`, float32 (the simulated A8 input)."""
    codes, scale = quantize_activations(x, percentile)
    return codes.float() * scale


def smoothing_scales(act_absmax: torch.Tensor, weight_absmax: torch.Tensor, alpha: float) -> torch.Tensor:
    """SmoothQuant's per-input-channel scales ``s = max|X_j|^alpha / max|W_j|^(1 - alpha)``: ``[in]``.

    The readers' weights are multiplied by ``s`` and their input divided by it: ``alpha`` moves that much of
    the activation range into the weights. Channels that never fire or have zero weights keep ``s = 1``.
    """
    if not 0 <= alpha <= 1:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    act, weight = act_absmax.float(), weight_absmax.float()
    scales = act.pow(alpha) / weight.pow(1 - alpha)
    ok = (act > 0) & (weight > 0) & torch.isfinite(scales)
    return torch.where(ok, scales, torch.ones_like(scales)).clamp(min=1e-5)


def fold_into_norm(
    weight: torch.Tensor | None, bias: torch.Tensor | None, scales: torch.Tensor, one_plus: bool = False
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A norm's ``(weight, bias)`` dividing its output by ``scales: [hidden]``.

    ``x * w`` (RMSNorm) becomes ``x * w / s``; LayerNorm's shift ``b`` becomes ``b / s``; Gemma's ``x * (1 + w)``
    becomes ``x * (1 + w')`` with ``w' = (1 + w) / s - 1``. A norm without weight is refused (nothing to fold into).
    """
    if weight is None:
        raise ValueError("the norm has no weight to fold smoothing scales into")
    new_weight = (1 + weight.float()) / scales - 1 if one_plus else weight.float() / scales
    new_bias = None if bias is None else (bias.float() / scales).to(bias.dtype)
    return new_weight.to(weight.dtype), new_bias


def fold_into_linear(
    weight: torch.Tensor, bias: torch.Tensor | None, scales: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A producing linear's ``(weight [out, in], bias [out])`` dividing its output channel ``j`` by ``scales[j]``.

    Valid when the channel reaches the smoothed readers through a positively homogeneous map (ReLU, or the
    product with another branch in a gated MLP: ``act(g) * (u / s) = (act(g) * u) / s``).
    """
    new_weight = (weight.float() / scales[:, None]).to(weight.dtype)
    new_bias = None if bias is None else (bias.float() / scales).to(bias.dtype)
    return new_weight, new_bias
