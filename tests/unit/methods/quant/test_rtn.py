"""RTN against known answers worked out by hand from the documented grid, and error shrinking with bits."""

from __future__ import annotations

import pytest
import torch

from compressor.methods.quant.ops import effective_group_size, quantize_rtn, relative_error

# Known answers, worked out by hand from the grid ops.py documents: maxq = 2**b - 1, codes
# q = clamp(round(w / scale) + zero, 0, maxq), w_hat = scale * (q - zero), the range always holding 0.
# Symmetric: scale = 2 * max|w| / maxq, zero = 2**(b-1) (signed levels -2**(b-1) .. 2**(b-1) - 1, so +max|w|
# sits half a step above the top level and clamps to it). Asymmetric: scale = (max - min) / maxq,
# zero = round(-min / scale). No entry below lies on a rounding tie except +max|w|, where both
# neighbours clamp to the same top code.
ROW_SYM = [0.0, -0.5, 1.0, -0.25]
ROW_ASYM = [0.0, 0.5, -1.0, 0.2]


@pytest.mark.parametrize(
    ("bits", "scale", "codes", "values"),
    [
        # 2/3 per step: -0.5 -> -0.75 steps -> -1; 1.0 -> 1.5 -> top level 1; -0.25 -> -0.375 -> 0
        (2, 2 / 3, [2, 1, 3, 2], [0.0, -2 / 3, 2 / 3, 0.0]),
        # 2/7 per step: -1.75 -> -2; 3.5 -> top 3; -0.875 -> -1
        (3, 2 / 7, [4, 2, 7, 3], [0.0, -4 / 7, 6 / 7, -2 / 7]),
        # 2/15 per step: -3.75 -> -4; 7.5 -> top 7; -1.875 -> -2
        (4, 2 / 15, [8, 4, 15, 6], [0.0, -8 / 15, 14 / 15, -4 / 15]),
    ],
)
def test_symmetric_known_answers(bits: int, scale: float, codes: list[int], values: list[float]) -> None:
    q = quantize_rtn(torch.tensor([ROW_SYM]), bits=bits, group_size=-1, symmetric=True)
    assert q.scale.item() == pytest.approx(scale, rel=1e-6)
    assert q.zero.item() == 2 ** (bits - 1)
    assert q.q.tolist() == [codes]
    assert q.signed().tolist() == [[c - 2 ** (bits - 1) for c in codes]]
    torch.testing.assert_close(q.dequantize(), torch.tensor([values]))


@pytest.mark.parametrize(
    ("bits", "scale", "zero", "codes", "values"),
    [
        # range 1.5: step 0.5, zero round(1 / 0.5) = 2; 0.2 -> 0.4 steps -> 0
        (2, 0.5, 2, [2, 3, 0, 2], [0.0, 0.5, -1.0, 0.0]),
        # step 1.5 / 7 = 3/14, zero round(14/3 = 4.67) = 5; 0.5 -> 2.33 -> 2; -1 -> -4.67 -> -5; 0.2 -> 0.93 -> 1
        (3, 3 / 14, 5, [5, 7, 0, 6], [0.0, 3 / 7, -15 / 14, 3 / 14]),
        # step 0.1, zero 10: every entry is a whole number of steps
        (4, 0.1, 10, [10, 15, 0, 12], [0.0, 0.5, -1.0, 0.2]),
    ],
)
def test_asymmetric_known_answers(bits: int, scale: float, zero: int, codes: list[int], values: list[float]) -> None:
    q = quantize_rtn(torch.tensor([ROW_ASYM]), bits=bits, group_size=-1, symmetric=False)
    assert q.scale.item() == pytest.approx(scale, rel=1e-6)
    assert q.zero.item() == zero
    assert q.q.tolist() == [codes]
    torch.testing.assert_close(q.dequantize(), torch.tensor([values]))


def test_asymmetric_range_keeps_zero() -> None:
    """All-positive weights: the range is [0, 0.9], step 0.3, zero 0 (0.2 -> 0.67 steps -> 1)."""
    q = quantize_rtn(torch.tensor([[0.2, 0.5, 0.6, 0.9]]), bits=2, group_size=-1, symmetric=False)
    assert q.scale.item() == pytest.approx(0.3, rel=1e-6) and q.zero.item() == 0
    assert q.q.tolist() == [[1, 2, 2, 3]]
    torch.testing.assert_close(q.dequantize(), torch.tensor([[0.3, 0.6, 0.6, 0.9]]))


def test_symmetric_per_group_known_answer() -> None:
    """Two rows x two groups of 4 at 3 bits: every (row, group) has its own scale; an all-zero group gets 1."""
    w = torch.tensor([[*ROW_SYM, 2.0, -1.25, 1.0, 3.5],  # groups: step 2/7 as above; step 2*3.5/7 = 1
                      [7.0, -1.2, 2.2, 0.0, 0.0, 0.0, 0.0, 0.0]])  # step 2*7/7 = 2: -0.6 -> -1, 1.1 -> 1; zeros
    q = quantize_rtn(w, bits=3, group_size=4, symmetric=True)
    torch.testing.assert_close(q.scale, torch.tensor([[2 / 7, 1.0], [2.0, 1.0]]))
    assert q.zero.tolist() == [[4, 4], [4, 4]]
    assert q.q.tolist() == [[4, 2, 7, 3, 6, 3, 5, 7], [7, 3, 5, 4, 4, 4, 4, 4]]
    expected = [[0.0, -4 / 7, 6 / 7, -2 / 7, 2.0, -1.0, 1.0, 3.0], [6.0, -2.0, 2.0, 0.0, 0.0, 0.0, 0.0, 0.0]]
    torch.testing.assert_close(q.dequantize(), torch.tensor(expected))


def test_asymmetric_per_group_known_answer() -> None:
    """The 2-bit asymmetric rows above side by side as two groups: each keeps its own scale and zero."""
    q = quantize_rtn(torch.tensor([[*ROW_ASYM, 0.2, 0.5, 0.6, 0.9]]), bits=2, group_size=4, symmetric=False)
    torch.testing.assert_close(q.scale, torch.tensor([[0.5, 0.3]]))
    assert q.zero.tolist() == [[2, 0]]
    assert q.q.tolist() == [[2, 3, 0, 2, 1, 2, 2, 3]]
    torch.testing.assert_close(q.dequantize(), torch.tensor([[0.0, 0.5, -1.0, 0.0, 0.3, 0.6, 0.6, 0.9]]))


def test_per_group_widths_known_answer() -> None:
    """Group 0 at 2 bits (the row above), group 1 at 4 bits: step 2/15, zero 8; -0.75 -> -5.625 -> -6."""
    w = torch.tensor([[*ROW_SYM, 0.0, 0.5, -0.75, 1.0]])
    q = quantize_rtn(w, bits=4, group_size=4, symmetric=True, bits_per_group=torch.tensor([2, 4]))
    torch.testing.assert_close(q.scale, torch.tensor([[2 / 3, 2 / 15]]))
    assert q.zero.tolist() == [[2, 8]] and q.bits == 4
    assert q.q.tolist() == [[2, 1, 3, 2, 8, 12, 2, 15]]
    assert q.signed().tolist() == [[0, -1, 1, 0, 0, 4, -6, 7]]
    expected = [0.0, -2 / 3, 2 / 3, 0.0, 0.0, 8 / 15, -12 / 15, 14 / 15]
    torch.testing.assert_close(q.dequantize(), torch.tensor([expected]))


@pytest.mark.parametrize("group_size", [-1, 16, 32])
def test_error_falls_with_bits(group_size: int) -> None:
    w = torch.randn(32, 64, generator=torch.Generator().manual_seed(0))
    errors = [relative_error(w, quantize_rtn(w, b, group_size, True).dequantize()) for b in (2, 3, 4, 8)]
    assert errors == sorted(errors, reverse=True)
    assert errors[-1] < 0.01


def test_zero_rows_do_not_divide_by_zero() -> None:
    q = quantize_rtn(torch.zeros(3, 8), 4, -1, False)
    assert torch.equal(q.dequantize(), torch.zeros(3, 8))


def test_effective_group_size() -> None:
    assert effective_group_size(576, 128) == 64
    assert effective_group_size(576, 96) == 96
    assert effective_group_size(100, 48) == 4
    assert effective_group_size(1536, 128) == 128
    assert effective_group_size(576, -1) == -1
