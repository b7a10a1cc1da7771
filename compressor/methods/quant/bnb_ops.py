"""bitsandbytes NF4 and LLM.int8() weights as pure functions on tensors, computed by bitsandbytes itself.

The codes and scales come from bitsandbytes' own quantize functions, called exactly as transformers calls them when
it quantizes a model at load time, so the file we write holds what a bitsandbytes user's loader would have made:

- NF4 (QLoRA): blocks of 64 consecutive weights of the flattened row-major ``W: [out, in]`` (so any width works:
  a block may span two rows), each scaled by its absmax to [-1, 1] and rounded to the nearest of the 16
  NormalFloat levels; ``double_quant`` stores the float32 absmaxes themselves as 8-bit codes
  (blocks of 256, minus their mean). ``W_hat = level * absmax`` in float32, cast to the model dtype: the
  bitsandbytes CPU forward dequantizes the same way and multiplies in the compute dtype.
- LLM.int8(): one scale per output row, ``SCB = max|W_row|`` of the float16 weight (bitsandbytes casts to
  float16 first), codes ``CB = round(127 * W / SCB)`` in int8. ``W_hat = CB * SCB / 127``. The loader's forward
  additionally rounds each token's activations to int8 and multiplies the columns holding an activation above the
  threshold unrounded (the outlier decomposition); that is activation arithmetic, not a property of the weights.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Any

import torch

from compressor.errors import RecipeError

#: NF4 block size: QLoRA's and transformers' default (``bnb_4bit_blocksize`` is not configurable there).
NF4_BLOCKSIZE = 64


def bitsandbytes() -> Any:
    """The ``bitsandbytes`` module, or a one-line error saying how to install it (an optional dependency)."""
    try:
        import bitsandbytes
    except ImportError:
        raise RecipeError("nf4/int8 and format bitsandbytes need bitsandbytes: pip install 'compressor[bnb]' "
                          "(bitsandbytes 0.50.2 runs on CPU)") from None
    return bitsandbytes


@dataclass
class NF4Weight:
    """One linear's NF4 form: ``packed: [ceil(out * in / 2), 1]`` uint8 (two codes per byte, first in the high
    nibble) and bitsandbytes' ``QuantState`` (absmax per block, or its 8-bit codes with the nested state)."""

    packed: torch.Tensor
    state: Any

    def dequantize(self, dtype: torch.dtype) -> torch.Tensor:
        """``W_hat: [out, in]`` in ``dtype`` by the format's definition: each 4-bit code's level (``state.code``)
        times the absmax of its block of 64 in the flattened weight, in float32, then cast (bitsandbytes'
        ``dequantize_4bit`` computes the same on CUDA and in its scalar and pure-torch CPU paths).

        Not a call of ``dequantize_4bit`` itself: bitsandbytes 0.50.2's AVX-512 CPU kernel (taken when the row
        width is a multiple of 16) restarts the blocks at each row, which is right only when ``in % 64 == 0``; on
        a width such as 96 the in-memory weights, and so every number in the report, would depend on the machine.
        """
        state = self.state
        absmax = state.absmax
        if state.nested:  # 8-bit codes of the absmaxes (blocks of 256) plus their mean, as dequantize_4bit does
            absmax = bitsandbytes().functional.dequantize_blockwise(state.absmax, state.state2) + state.offset
        packed = self.packed.reshape(-1)
        codes = torch.stack([packed >> 4, packed & 0xF], dim=1).reshape(-1)[: math.prod(state.shape)].long()
        blocks = torch.arange(codes.numel(), device=codes.device) // state.blocksize
        levels = state.code.to(device=codes.device, dtype=torch.float32)[codes]
        return (levels * absmax.float()[blocks]).reshape(state.shape).to(dtype)

    def to(self, device: torch.device | str) -> NF4Weight:
        state = copy.deepcopy(self.state)
        state.to(device)  # QuantState.to moves its tensors (absmax, code, nested state) in place
        return NF4Weight(self.packed.to(device), state)

    def storage_bytes(self) -> int:
        """Codes plus the absmaxes as bitsandbytes stores them (float32, or uint8 + the nested float32 state)."""
        tensors = [self.packed, *(v for v in self.state.as_dict(packed=True).values())]
        return sum(t.numel() * t.element_size() for t in tensors)


@dataclass
class Int8Weight:
    """One linear's LLM.int8() form: ``codes: [out, in]`` int8 (bitsandbytes' ``CB``), ``scale: [out]`` float32
    (``SCB``, each row's absmax)."""

    codes: torch.Tensor
    scale: torch.Tensor

    def dequantize(self, dtype: torch.dtype) -> torch.Tensor:
        """``CB * SCB / 127`` in float32, cast to ``dtype`` (the weight the int8 matmul's rescaling implies)."""
        return (self.codes.float() * (self.scale.float() / 127.0).unsqueeze(1)).to(dtype)

    def to(self, device: torch.device | str) -> Int8Weight:
        return Int8Weight(self.codes.to(device), self.scale.to(device))

    def storage_bytes(self) -> int:
        return self.codes.numel() + 4 * self.scale.numel()


def quantize_nf4(W: torch.Tensor, double_quant: bool) -> NF4Weight:
    """``W: [out, in]`` (any float dtype) -> its NF4 form, by ``bitsandbytes.functional.quantize_4bit``.

    Called as ``Params4bit`` does when transformers loads a model with ``load_in_4bit``: the weight in its own
    dtype (the absmaxes are then values of that dtype), blocks of 64, uint8 storage.
    """
    functional = bitsandbytes().functional
    packed, state = functional.quantize_4bit(
        W.contiguous(), blocksize=NF4_BLOCKSIZE, compress_statistics=double_quant, quant_type="nf4",
        quant_storage=torch.uint8,
    )
    return NF4Weight(packed, state)


def quantize_int8(W: torch.Tensor) -> Int8Weight:
    """``W: [out, in]`` -> its LLM.int8() form, by ``bitsandbytes.functional.int8_vectorwise_quant`` on the
    float16 weight (as ``Int8Params`` does when transformers loads a model with ``load_in_8bit``)."""
    functional = bitsandbytes().functional
    codes, scale, _ = functional.int8_vectorwise_quant(W.contiguous().to(torch.float16))
    return Int8Weight(codes, scale.float())
