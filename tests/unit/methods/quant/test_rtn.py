"""RTN against its definition: codes on the grid, known answers, error shrinking with bits."""

from __future__ import annotations

import pytest
import torch

from compressor.methods.quant.ops import effective_group_size, quantize_rtn, relative_error


def test_symmetric_known_answer() -> None:
    w = torch.tensor([[-1.0, -0.5, 0.0, 0.75]])
    q = quantize_rtn(w, bits=4, group_size=-1, symmetric=True)
    scale = 2 * 1.0 / 15
    assert q.scale.item() == pytest.approx(scale)
    assert q.zero.item() == 8
    expected = torch.round(w / scale).clamp(-8, 7) * scale
    assert torch.equal(q.dequantize(), expected)
    assert torch.equal(q.signed(), torch.round(w / scale).clamp(-8, 7).to(torch.int8))


def test_asymmetric_uses_full_range() -> None:
    w = torch.tensor([[-0.3, -0.1, 0.2, 0.6]])  # the range always includes zero, as in GPTQ
    q = quantize_rtn(w, bits=2, group_size=-1, symmetric=False)
    assert int(q.q.min()) == 0 and int(q.q.max()) == 3
    assert relative_error(w, q.dequantize()) < 0.3


@pytest.mark.parametrize("group_size", [-1, 16, 32])
def test_error_falls_with_bits(group_size: int) -> None:
    w = torch.randn(32, 64, generator=torch.Generator().manual_seed(0))
    errors = [relative_error(w, quantize_rtn(w, b, group_size, True).dequantize()) for b in (2, 3, 4, 8)]
    assert errors == sorted(errors, reverse=True)
    assert errors[-1] < 0.01


def test_groups_have_their_own_scales() -> None:
    w = torch.cat([torch.full((2, 8), 0.01), torch.full((2, 8), 10.0)], dim=1)
    q = quantize_rtn(w, 4, 8, True)
    assert q.scale.shape == (2, 2)
    torch.testing.assert_close(q.dequantize(), w, rtol=0.1, atol=1e-3)


def test_zero_rows_do_not_divide_by_zero() -> None:
    q = quantize_rtn(torch.zeros(3, 8), 4, -1, False)
    assert torch.equal(q.dequantize(), torch.zeros(3, 8))


def test_effective_group_size() -> None:
    assert effective_group_size(576, 128) == 64
    assert effective_group_size(576, 96) == 96
    assert effective_group_size(100, 48) == 4
    assert effective_group_size(1536, 128) == 128
    assert effective_group_size(576, -1) == -1
