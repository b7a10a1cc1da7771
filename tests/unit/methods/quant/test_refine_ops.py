"""Refinement math against answers worked out by hand on one row of four weights.

Setting: 3 bits symmetric (zero 4, codes 0..7), scale 0.5, one group. Codes are
``clamp(round(base / f + V) + 4, 0, 7)`` and the weight ``0.5 f (codes - 4)``; the loss is ``sum c * w``.
"""

from __future__ import annotations

import pytest
import torch

from compressor.methods.quant.refine_ops import (
    decayed_lr,
    output_error,
    refined_codes,
    refined_weight,
    rounding_base,
    signed_step,
    ste_round,
)

SCALE = torch.full((1, 4), 0.5)
ZERO = torch.full((1, 4), 4.0)
MAXQ = torch.tensor(7.0)
BASE = torch.tensor([[0.45, -1.45, 2.2, 3.6]])
C = torch.tensor([[-1.0, -2.0, 3.0, 4.0]])


def test_rounding_base_keeps_each_value_inside_its_codes_bin() -> None:
    # rounded / scale = [0.4, -1.8, 2.4, 4.0] against levels [0, -1, 2, 3]: fractions 0.4, -0.8, 0.4, 1.0;
    # the two beyond half a level are pulled to just inside the bin (0.499), so rounding gives the codes back
    codes = torch.tensor([[4, 3, 6, 7]], dtype=torch.uint8)
    base = rounding_base(codes, SCALE, ZERO, torch.tensor([[0.2, -0.9, 1.2, 2.0]]))
    torch.testing.assert_close(base, torch.tensor([[0.4, -1.499, 2.4, 3.499]]))
    assert torch.equal(torch.round(base) + ZERO, codes.float())
    assert torch.equal(rounding_base(codes, SCALE, ZERO, None), torch.tensor([[0.0, -1.0, 2.0, 3.0]]))


def test_ste_round_rounds_forward_and_passes_gradients_through() -> None:
    x = torch.tensor([0.4, 1.6, -2.7], requires_grad=True)
    y = ste_round(x)
    (y * torch.tensor([1.0, 2.0, 3.0])).sum().backward()
    assert y.tolist() == [0.0, 2.0, -3.0]
    assert x.grad is not None and x.grad.tolist() == [1.0, 2.0, 3.0]


def test_one_signed_step_by_hand() -> None:
    offset = torch.tensor([[0.0, 0.45, -0.3, 0.1]], requires_grad=True)
    factor = torch.ones(1, 4, requires_grad=True)
    # levels 0.45, -1.0, 1.9, 3.7 round to 0, -1, 2, 4; +4 = 4, 3, 6, 8 and the last clamps to 7
    assert refined_codes(BASE, ZERO, MAXQ, offset, factor).tolist() == [[4, 3, 6, 7]]
    weight = refined_weight(BASE, SCALE, ZERO, MAXQ, offset, factor)
    assert weight.tolist() == [[0.0, -0.5, 1.0, 1.5]]
    g_offset, g_factor = torch.autograd.grad((C * weight).sum(), [offset, factor])
    # d w / d V = scale * f where the code is inside the grid, 0 where it clamped
    assert g_offset.tolist() == [[-0.5, -1.0, 1.5, 0.0]]
    # d w / d f = scale * (r - base / f) inside the grid (r the rounded level), scale * (code - zero) clamped:
    # -0.225, 0.225, -0.1, 1.5, times c: 0.225 - 0.45 - 0.3 + 6 (one group: the sum)
    torch.testing.assert_close(g_factor.sum(), torch.tensor(5.475))
    stepped = signed_step(offset.detach(), g_offset, 0.1, -0.5, 0.5)
    # against the gradient's sign by 0.1, clamped to 1/2; a zero gradient leaves the offset where it was
    torch.testing.assert_close(stepped, torch.tensor([[0.1, 0.5, -0.4, 0.1]]))
    # the first weight's level is now 0.55: it rounds up, the others keep their codes
    assert refined_codes(BASE, ZERO, MAXQ, stepped, factor.detach()).tolist() == [[5, 3, 6, 7]]
    assert signed_step(torch.ones(1), torch.tensor([5.475]), 0.1, 0.5, 1.5).tolist() == [pytest.approx(0.9)]


def test_codes_stay_on_the_grid_for_any_offset_and_factor() -> None:
    base = torch.tensor([[-9.0, -4.2, 3.4, 12.0]])
    for factor in (0.5, 1.0, 1.5):
        for shift in (-0.5, 0.5):
            codes = refined_codes(base, ZERO, MAXQ, torch.full((1, 4), shift), torch.full((1, 4), factor))
            assert codes.min() >= 0 and codes.max() <= 7


def test_decayed_lr_is_linear_to_zero() -> None:
    assert [decayed_lr(0.1, step, 4) for step in range(4)] == pytest.approx([0.1, 0.075, 0.05, 0.025])


def test_output_error_plain_and_normalized_per_token() -> None:
    """Two sequences of two tokens, hidden 2. Targets: a massive token [30, 40] (mean square 1250) and a plain one
    [1, 1] (mean square 1); both off by [1, 0] in sequence 0, by [0, 2] in sequence 1. Plain: 1 + 1 and 4 + 4;
    normalized: 1/1250 + 1 and 4/1250 + 4."""
    target = torch.tensor([[[30.0, 40.0], [1.0, 1.0]]]).repeat(2, 1, 1)
    off = torch.tensor([[[1.0, 0.0]], [[0.0, 2.0]]])
    out = target + off
    torch.testing.assert_close(output_error(out, target, "mse"), torch.tensor([2.0, 8.0]))
    torch.testing.assert_close(output_error(out, target, "normalized"), torch.tensor([1 + 1 / 1250, 4 + 4 / 1250]))


@pytest.mark.parametrize("per_column_maxq", [False, True])
def test_refined_weight_has_the_composed_forms_value_and_gradients(per_column_maxq: bool) -> None:
    """The hand-written backward against autograd through the definition (``refined_codes``' straight-through
    round and clamps), on weights some of which the grid clamps, with per-group factors expanded to columns."""
    generator = torch.Generator().manual_seed(0)
    out, n_groups, size = 6, 3, 4
    base = torch.randn(out, n_groups * size, generator=generator) * 5  # beyond the 3-bit grid's +-4 often
    scale = torch.rand(out, n_groups * size, generator=generator) + 0.1
    zero = torch.full_like(base, 4.0)
    maxq = torch.tensor([7.0, 15.0, 3.0]).repeat_interleave(size).expand_as(base) if per_column_maxq else MAXQ
    zero = torch.minimum(zero, torch.as_tensor(maxq).expand_as(base).ceil() / 2)
    weights = torch.randn(out, n_groups * size, generator=generator)
    results = []
    for composed in (True, False):
        offset = (torch.rand(out, n_groups * size, generator=torch.Generator().manual_seed(2)) - 0.5).requires_grad_()
        factor = (torch.rand(out, n_groups, generator=torch.Generator().manual_seed(1)) + 0.5).requires_grad_()
        columns = factor[:, :, None].expand(out, n_groups, size).reshape(out, -1)
        if composed:
            w = scale * columns * (refined_codes(base, zero, maxq, offset, columns) - zero)
        else:
            w = refined_weight(base, scale, zero, maxq, offset, columns)
        (w * weights).sum().backward()
        results.append((w.detach(), offset.grad, factor.grad))
    for expected, actual in zip(results[0], results[1], strict=True):
        torch.testing.assert_close(actual, expected)
    assert (results[0][1] == 0).any() and (results[0][1] != 0).any()  # some codes clamped, some not
