"""GGUF blocks filled with our own integer codes (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0), or requantized on request.

Every type here is a block of 32 weights with an fp16 scale ``d``. The symmetric ones store ``d * (c - 2^(b-1))``
(Q4_0, Q5_0; Q8_0 the signed byte), the asymmetric ones ``d * c + m`` (Q4_1, Q5_1), ``c`` a b-bit code. Our
weight is ``scale * (q - zero)`` per group, so:

- symmetric codes go in as ``c = q - zero + 2^(b-1)``: exact once the engine rounded its scales to fp16
  (:func:`round_scales_fp16`), since an fp16 scale times a code below 256 is exact in float32;
- asymmetric codes go in as ``c = q`` with ``m = -d * zero``. ``d * zero`` is exact in float32 but ``m`` is stored
  in fp16, so a block whose ``d * zero`` needs more than fp16's 11 significant bits is off by m's rounding:
  at most ``2^-11 * |m|`` per weight (``zero * 2^-11`` steps: at most 0.73 % of one quantization step at 4 bits,
  1.5 % at 5; ``2^-25`` where ``m`` is subnormal). Measured on a Gaussian 512 x 512, group 32: 57 % (Q4_1) and 76 %
  (Q5_1) of blocks are inexact, relative weight error 4e-4. Nothing cheaper stores it exactly (a coarser ``d``
  moves every weight more), so the writer uses Q4_1/Q5_1 with that bound; ``gguf_type: Q5_0`` (4-bit) or
  ``Q8_0`` (5-bit) store asymmetric codes exactly, as ``q - zero`` fits their signed range, at 0.5 / 2.5 bits
  per weight more.

A group of 64, 128 ... (or one per channel) is a scale repeated over its 32-blocks: exact. 2-, 3-, 6- and 7-bit
codes have no type of their width: refused by default (the file would be wider than the recipe says), with the
wider type that holds them exactly named (Q4_0 for up to 3 bits, Q8_0 up to 7). Asymmetric 8-bit codes and
groups that are not whole 32-blocks fit no type. An explicit ``gguf_type`` stores our codes wherever they fit
it and otherwise requantizes: llama.cpp's own RTN (``gguf.quants.quantize``) of our dequantized weight, with the
relative error it added reported.

The rule of which schemes a type stores exactly (:func:`validate_gguf`, the widths and symmetries of each type) is
``methods/quant/gguf_schemes.py``'s, which BAQ reads as well (methods do not import ``export/``); this module adds
llama.cpp's enums and the packing.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import gguf
import numpy as np
import torch

from compressor.errors import ExportError
from compressor.methods.quant.gguf_schemes import (
    BLOCK,
    SCHEMES,
    exact_scheme,
    validate_gguf,
    wider_exact_scheme,
)
from compressor.methods.quant.ops import QuantizedWeight

_Q = gguf.GGMLQuantizationType
_F = gguf.LlamaFileType
#: llama.cpp's tensor and file type of each scheme ``gguf_schemes.SCHEMES`` names.
_ENUMS = {"Q4_0": (_Q.Q4_0, _F.MOSTLY_Q4_0), "Q4_1": (_Q.Q4_1, _F.MOSTLY_Q4_1), "Q5_0": (_Q.Q5_0, _F.MOSTLY_Q5_0),
          "Q5_1": (_Q.Q5_1, _F.MOSTLY_Q5_1), "Q8_0": (_Q.Q8_0, _F.MOSTLY_Q8_0)}


@dataclass(frozen=True)
class BlockType:
    """One GGUF block type we write: code width, symmetric (``d * (c - 2^(b-1))``) or not (``d * c + m``)."""

    name: str
    bits: int
    symmetric: bool
    ggml: gguf.GGMLQuantizationType
    file_type: gguf.LlamaFileType


TYPES: dict[str, BlockType] = {name: BlockType(name, s.bits, s.symmetric, *_ENUMS[name]) for name, s in SCHEMES.items()}
#: Bits per weight of each type's 32-weight block, fp16 scale (and minimum) included.
BLOCK_BITS = {name: s.bits_per_weight for name, s in SCHEMES.items()}


def exact_type(bits: int, symmetric: bool) -> BlockType | None:
    """The type that stores (bits, symmetric) codes at their own width, or None (3-bit, 2-bit, asymmetric 8-bit)."""
    scheme = exact_scheme(bits, symmetric)
    return None if scheme is None else TYPES[scheme.name]


def wider_exact_type(bits: int, symmetric: bool) -> BlockType:
    """The narrowest symmetric type holding ``q - zero`` of (bits, symmetric) codes exactly (``gguf_schemes``)."""
    return TYPES[wider_exact_scheme(bits, symmetric).name]


def round_scales_fp16(qweight: QuantizedWeight) -> QuantizedWeight:
    """The same weight with scales rounded to fp16 (kept as float32), as a GGUF block stores them.

    ``dequantize()`` of the result equals what llama.cpp and transformers' GGUF loader read back from a
    symmetric block: the product of an fp16 scale and a code below 256 is exact in float32.
    """
    return replace(qweight, scale=qweight.scale.to(torch.float16).float())


def block_groups(qweight: QuantizedWeight) -> torch.Tensor | None:
    """The group of every 32-column block ``[in / 32]``, or None when a block would mix groups."""
    columns = qweight.shape[1]
    if columns % BLOCK:
        return None
    groups = qweight.column_groups().cpu().reshape(columns // BLOCK, BLOCK)
    return groups[:, 0] if bool((groups == groups[:, :1]).all()) else None


def codes_for(qweight: QuantizedWeight, block: BlockType) -> torch.Tensor | None:
    """The unsigned b-bit codes ``c`` of ``block`` holding ``qweight`` exactly (up to m's rounding), or None."""
    if block_groups(qweight) is None:
        return None
    zero = qweight.zero[:, qweight.column_groups()].to(torch.int16)
    codes = qweight.q.to(torch.int16) - zero + (1 << (block.bits - 1)) if block.symmetric else qweight.q.to(torch.int16)
    if int(codes.min()) < 0 or int(codes.max()) >= 1 << block.bits:
        return None
    return codes


def pack_blocks(qweight: QuantizedWeight, block: BlockType | None = None) -> np.ndarray:
    """``[out, in / 32 * block bytes]`` uint8 rows of ``block`` (default: the type of the weight's own bits and
    symmetry) holding our codes, in HF row order."""
    if block is None:
        problem = validate_gguf(qweight.bits, qweight.group_size, qweight.symmetric)
        if problem:
            raise ExportError(problem)
        block = exact_type(qweight.bits, qweight.symmetric)
        assert block is not None
    groups = block_groups(qweight)
    if groups is None:
        raise ExportError(f"GGUF blocks need {qweight.shape[1]} columns in whole blocks of {BLOCK} per group")
    codes = codes_for(qweight, block)
    if codes is None:
        raise ExportError(f"codes leave the {block.bits}-bit range of {block.name}: not a {block.bits}-bit weight")
    out, columns = qweight.shape
    d = qweight.scale[:, groups.to(qweight.scale.device)].to(torch.float16)
    header = [d]
    if not block.symmetric:  # m = -d * zero: exact in float32, rounded once to fp16 (module docstring)
        header.append((-(d.float() * qweight.zero[:, groups.to(qweight.zero.device)].float())).to(torch.float16))
    if not all(bool(torch.isfinite(h).all()) for h in header):
        raise ExportError(f"a scale or minimum overflows fp16; {block.name} blocks store fp16 values")
    head = [h.cpu().numpy().reshape(out, columns // BLOCK, 1).view(np.uint8) for h in header]
    values = codes.cpu().numpy().astype(np.uint8).reshape(out, columns // BLOCK, BLOCK)
    return np.ascontiguousarray(np.concatenate([*head, *_payload(values, block.bits)], axis=-1).reshape(out, -1))


def _payload(codes: np.ndarray, bits: int) -> list[np.ndarray]:
    """The code bytes of each block: Q8_0 signed bytes; 4-bit low nibbles ``c[j] | c[j+16] << 4``; Q5 first the
    32 fifth bits as a little-endian uint32 (``qh``), then the low nibbles."""
    if bits == 8:
        return [(codes.astype(np.int16) - 128).astype(np.int8).view(np.uint8)]
    low = codes & np.uint8(0x0F)
    nibbles = low[..., :16] | (low[..., 16:] << np.uint8(4))
    if bits == 4:
        return [nibbles]
    return [np.packbits((codes >> np.uint8(4)) & np.uint8(1), axis=-1, bitorder="little"), nibbles]


def requantize(qweight: QuantizedWeight, block: BlockType) -> tuple[np.ndarray, float, float]:
    """llama.cpp's RTN of our dequantized weight into ``block``: rows, ``||error||^2`` and ``||weight||^2``."""
    values = qweight.dequantize().cpu().numpy()
    if values.shape[1] % BLOCK:
        raise ExportError(f"GGUF blocks need columns in multiples of {BLOCK}; this weight has {values.shape[1]}")
    rows = gguf.quants.quantize(values, block.ggml)
    back = gguf.quants.dequantize(rows, block.ggml)
    error = float(np.square(back.astype(np.float64) - values).sum())
    return np.ascontiguousarray(rows), error, float(np.square(values.astype(np.float64)).sum())


def store(qweight: QuantizedWeight, requested: str | None) -> tuple[np.ndarray, BlockType, tuple[float, float] | None]:
    """Rows, their type, and ``(||error||^2, ||weight||^2)`` when requantized (None: our codes are stored).

    Without ``requested`` the weight's own type is used and must hold it; with it our codes are stored when
    they fit that type, and llama.cpp's RTN of the weight otherwise.
    """
    if requested is None:
        block = exact_type(qweight.bits, qweight.symmetric)
        return pack_blocks(qweight), block, None  # type: ignore[return-value]  # pack_blocks refused None
    block = TYPES[requested]
    if codes_for(qweight, block) is not None:
        return pack_blocks(qweight, block), block, None
    rows, error, norm = requantize(qweight, block)
    return rows, block, (error, norm)
