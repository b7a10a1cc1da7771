"""Which integer weight schemes a GGUF block type stores exactly: the rule, without the GGUF writer.

A recipe check (``export/``: may this stage be written as GGUF?) and a planning method (BAQ: may this candidate
width be planned for a GGUF export?) ask the same question. Methods do not import ``export/``, so the answer
lives here, beside :class:`~compressor.methods.quant.ops.QuantizedWeight` whose schemes it judges, and the GGUF
writer (``export/gguf_blocks.py``) builds its block types (with llama.cpp's enums) from :data:`SCHEMES`.

Every type here is a block of 32 weights with an fp16 scale: symmetric ones store ``d * (c - 2^(b-1))`` (Q4_0,
Q5_0, Q8_0), asymmetric ones ``d * c + m`` (Q4_1, Q5_1). A group of 64, 128 ... (or one per channel) repeats a
scale over whole blocks: exact. 2-, 3-, 6- and 7-bit codes have no type of their width, asymmetric 8-bit codes and
groups that are not whole 32-blocks fit no type: refused unless an explicit ``gguf_type`` requantizes them.
"""

from __future__ import annotations

from dataclasses import dataclass

#: Weights per GGUF block (every type written here).
BLOCK = 32
REQUANTIZE_HINT = "set export.gguf_type to requantize into a GGUF type (the error it adds is reported)"


@dataclass(frozen=True)
class BlockScheme:
    """One GGUF block type's codes: width, symmetry, and bits per weight with its fp16 scale (and minimum)."""

    name: str
    bits: int
    symmetric: bool
    bits_per_weight: float


SCHEMES: dict[str, BlockScheme] = {s.name: s for s in (
    BlockScheme("Q4_0", 4, True, 4.5),
    BlockScheme("Q4_1", 4, False, 5.0),
    BlockScheme("Q5_0", 5, True, 5.5),
    BlockScheme("Q5_1", 5, False, 6.0),
    BlockScheme("Q8_0", 8, True, 8.5),
)}


def exact_scheme(bits: int, symmetric: bool) -> BlockScheme | None:
    """The type that stores (bits, symmetric) codes at their own width, or None (3-bit, 2-bit, asymmetric 8-bit)."""
    return next((s for s in SCHEMES.values() if s.bits == bits and s.symmetric == symmetric), None)


def wider_exact_scheme(bits: int, symmetric: bool) -> BlockScheme:
    """The narrowest symmetric type holding ``q - zero`` of (bits, symmetric) codes exactly (asymmetric codes
    span ``[-(2^b - 1), 2^b - 1]``, one bit more); Q8_0 for anything up to 7 bits."""
    needed = bits if symmetric else bits + 1
    return next(s for s in SCHEMES.values() if s.symmetric and s.bits >= needed)


def validate_gguf(bits: int, group_size: int, symmetric: bool, gguf_type: str | None = None) -> str | None:
    """Why a (bits, group_size, symmetric) scheme has no GGUF type storing it exactly, or None.

    An explicit ``gguf_type`` takes any scheme: tensors that do not fit it are requantized by the writer.
    """
    if gguf_type is not None:
        return None if gguf_type in SCHEMES else f"gguf_type must be one of {', '.join(SCHEMES)}; got {gguf_type}"
    if group_size > 0 and group_size % BLOCK:
        return (f"GGUF blocks hold {BLOCK} weights per scale; need group_size={BLOCK} or a multiple of it (or "
                f"per channel), not {group_size}; or {REQUANTIZE_HINT}")
    if exact_scheme(bits, symmetric) is None:
        if bits == 8:
            return f"GGUF has no asymmetric 8-bit block type; use symmetric: true (Q8_0), or {REQUANTIZE_HINT}"
        wider = wider_exact_scheme(bits, symmetric)
        return (f"GGUF export writes 4-bit (Q4_0), asymmetric 4-bit (Q4_1), 5-bit (Q5_0/Q5_1) or 8-bit (Q8_0) "
                f"codes exactly; got bits={bits}: set export.gguf_type {wider.name} to store these codes exactly "
                f"in its wider blocks ({wider.bits_per_weight:g} bits per weight), or another type to requantize "
                "(the error it adds is reported)")
    return None
