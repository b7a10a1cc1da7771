"""Uniform integer quantization primitives shared by RTN, GPTQ, BAQ and the exports.

One representation everywhere: unsigned codes ``q`` in ``[0, 2**bits - 1]``, a float ``scale`` and an
integer ``zero`` per (output row, group), and ``w = scale * (q - zero)``. Symmetric quantization is the
special case ``zero = 2**(bits - 1)``, so the signed value ``q - zero`` lies in
``[-2**(bits-1), 2**(bits-1) - 1]`` (what compressed-tensors stores and what GGUF Q4_0/Q8_0 hold).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

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
        scale = self.scale[:, groups].float()
        zero = self.zero[:, groups].float()
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


def compute_qparams(
    w: torch.Tensor, bits: int, symmetric: bool, clip: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Min/max scale and zero for each row of ``w: [rows, cols]`` -> ``scale, zero: [rows]``.

    ``clip`` shrinks the range (the MSE grid search tries values below 1). Rows that are all zero get
    scale 1 so they quantize exactly to zero instead of dividing by zero.
    """
    maxq = (1 << bits) - 1
    w = w.float()
    wmin = torch.clamp(w.min(dim=1).values, max=0) * clip
    wmax = torch.clamp(w.max(dim=1).values, min=0) * clip
    if symmetric:
        wabs = torch.maximum(wmin.abs(), wmax)
        scale = 2 * wabs / maxq
        zero = torch.full_like(scale, float(1 << (bits - 1)))
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


def search_clip(
    w: torch.Tensor, bits: int, symmetric: bool, grid: int = 80, max_shrink: float = 0.8, norm: float = 2.4
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row clipping range that minimises ``|w - fake_quantize(w)|^norm`` (the GPTQ ``mse`` option).

    Tries ranges shrunk by ``1 - i / grid`` for ``i < max_shrink * grid`` and keeps the best per row.
    """
    best_scale, best_zero = compute_qparams(w, bits, symmetric)
    best_err = torch.full((w.shape[0],), float("inf"), device=w.device)
    for i in range(int(max_shrink * grid)):
        clip = 1 - i / grid
        scale, zero = compute_qparams(w, bits, symmetric, clip)
        err = (fake_quantize(w, scale[:, None], zero[:, None], bits) - w.float()).abs().pow(norm).sum(1)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_scale = torch.where(better, scale, best_scale)
        best_zero = torch.where(better, zero, best_zero)
    return best_scale, best_zero


def group_qparams(
    w: torch.Tensor, bits: int, group_size: int, symmetric: bool, mse: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero for every (row, group) of ``w: [out, in]`` -> two ``[out, n_groups]`` tensors."""
    out, columns = w.shape
    size = columns if group_size <= 0 else group_size
    if columns % size:
        raise ValueError(f"group size {size} does not divide {columns} columns")
    blocks = w.float().reshape(out, columns // size, size).transpose(0, 1).reshape(-1, size)
    scale, zero = search_clip(blocks, bits, symmetric) if mse else compute_qparams(blocks, bits, symmetric)
    n_groups = columns // size
    return scale.reshape(n_groups, out).T.contiguous(), zero.reshape(n_groups, out).T.contiguous()


def quantize_rtn(
    w: torch.Tensor,
    bits: int,
    group_size: int,
    symmetric: bool,
    mse: bool = False,
    bits_per_group: torch.Tensor | None = None,
) -> QuantizedWeight:
    """Round-to-nearest of ``w: [out, in]`` with per-group ranges: the baseline every method must beat.

    ``bits_per_group: [n_groups]`` gives each group its own width (``bits`` is then ignored).
    """
    size = w.shape[1] if group_size <= 0 else group_size
    groups = torch.arange(w.shape[1], device=w.device) // size
    if bits_per_group is None:
        scale, zero = group_qparams(w, bits, group_size, symmetric, mse)
        q = quantize_codes(w, scale[:, groups], zero[:, groups], bits)
        widths = None
    else:
        widths = bits_per_group.long().to(w.device)
        if widths.shape != (w.shape[1] // size,) or bool(((widths < 2) | (widths > 8)).any()):
            raise ValueError(f"bits_per_group must be {w.shape[1] // size} widths in 2..8, got {widths.tolist()}")
        scale = torch.zeros(w.shape[0], widths.numel(), device=w.device)
        zero = torch.zeros_like(scale)
        for width in sorted(set(widths.tolist())):
            s, z = group_qparams(w, width, group_size, symmetric, mse)
            mask = widths == width
            scale[:, mask], zero[:, mask] = s[:, mask], z[:, mask]
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
