"""The quantizer's grids and scale search against answers worked out by hand, and the config knobs.

Grids (ops.compute_qparams), with ``half = 2**(b-1)`` and signed levels ``-half .. half - 1`` in every case:
restricted ``s = 2 max|w| / (2**b - 1)``; full ``s = -m / half`` with ``m`` the weight of largest magnitude
(so ``m`` lands on ``-half``; ``s < 0`` when ``m > 0``); full_positive ``s = max(-min / half, max / (half - 1))``.
The search keeps, per group, the candidate whose least-squares refit leaves the least (weighted) error.
"""

from __future__ import annotations

import pytest
import torch
from pydantic import ValidationError

from compressor.methods.quant.gptq import GPTQConfig
from compressor.methods.quant.ops import quantize_rtn
from compressor.methods.quant.rtn import RTNConfig

C = 0.125  # a power of two: every value below is exact in float32


def _squared_error(w: list[float], grid: str, bits: int = 4, search: str = "none",
                   importance: list[float] | None = None) -> tuple[float, torch.Tensor]:
    row = torch.tensor([w])
    weights = None if importance is None else torch.tensor(importance)
    q = quantize_rtn(row, bits, -1, True, grid=grid, scale_search=search, importance=weights)  # type: ignore[arg-type]
    a = torch.ones(len(w)) if weights is None else weights
    return float((a * (q.dequantize() - row).square()).sum()), q


@pytest.mark.parametrize(("group", "scale"), [([-8, 1, 2, 3], C), ([8, -1, -2, -3], -C)])
def test_full_grid_is_exact_where_restricted_is_not(group: list[int], scale: float) -> None:
    """[-8, 1, 2, 3] c at 4 bits: the full grid puts -8c on level -8 with step c (exact; the mirrored group
    gets step -c). Restricted: step 16c/15, so the levels nearest 1, 2, 3 are 16c/15, 32c/15, 48c/15 (errors
    c/15, 2c/15, 3c/15) and |8c| sits 7.5 steps out, 8c/15 from either neighbouring level: total
    (64 + 1 + 4 + 9) c^2 / 225."""
    w = [v * C for v in group]
    error, full = _squared_error(w, "full")
    assert error == 0
    assert full.scale.item() == scale
    assert full.signed().tolist() == [[-8, 1, 2, 3]]
    restricted, _ = _squared_error(w, "restricted")
    assert restricted == pytest.approx(78 / 225 * C**2, rel=1e-5)


def test_full_positive_grid_known_answer() -> None:
    """[8, -1, -2, -3] c with a positive scale: s = max(3c / 8, 8c / 7) = 8c/7; w / s = 7, -7/8, -7/4, -21/8
    -> levels 7, -1, -2, -3; errors 0, c/7, 2c/7, 3c/7: total 14 c^2 / 49, below restricted's 78 c^2 / 225."""
    error, q = _squared_error([8 * C, -C, -2 * C, -3 * C], "full_positive")
    assert q.scale.item() == pytest.approx(8 * C / 7, rel=1e-6)
    assert q.signed().tolist() == [[7, -1, -2, -3]]
    assert error == pytest.approx(14 / 49 * C**2, rel=1e-5)


# w = [1.0, 0.6] at 2 bits on the full grid (levels -2..1, m = 1.0 on -2). The candidate codes are
# [-2, -1] (the plain fit, s = -1/2), [-1, -1] (wider ranges) and [-2, -2] (clipped ranges).
# Plain: w_hat = [1.0, 0.5]. Least squares s = sum a w l / sum a l^2 for each code set:
#   unweighted: [-2,-1] -> s = -2.6/5 = -0.52, error 1.36 - 2.6^2/5 = 0.008; [-1,-1] and [-2,-2] leave 0.08.
#   a = [1, 100]: [-2,-1] -> s = -62/104, error 37 - 62^2/104 = 1/26; [-1,-1] 37 - 61^2/101 = 0.158;
#   [-2,-2] 37 - 122^2/404 = 0.158.
# Re-rounding at either refit scale keeps the codes [-2, -1].
@pytest.mark.parametrize(
    ("search", "scale", "weighted_error"),
    [
        ("none", -0.5, 100 * 0.1**2),
        ("mse", -0.52, 0.04**2 + 100 * 0.08**2),
        ("weighted", -62 / 104, 1 / 26),
    ],
)
def test_weighted_search_known_answer(search: str, scale: float, weighted_error: float) -> None:
    error, q = _squared_error([1.0, 0.6], "full", bits=2, search=search, importance=[1.0, 100.0])
    assert q.scale.item() == pytest.approx(scale, rel=1e-6)
    assert q.signed().tolist() == [[-2, -1]]
    assert error == pytest.approx(weighted_error, rel=1e-5)


@pytest.mark.parametrize("grid", ["restricted", "full", "full_positive"])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_search_never_worse_than_plain_fit(grid: str, symmetric: bool, bits: int) -> None:
    """Per group and in the norm it minimises: the plain fit is one of the candidates."""
    generator = torch.Generator().manual_seed(bits)
    W = torch.randn(32, 128, generator=generator) * torch.rand(32, 1, generator=generator)
    W[3] = 0  # an all-zero row stays exact
    importance = torch.rand(128, generator=generator) ** 3
    plain = quantize_rtn(W, bits, 32, symmetric, grid=grid)  # type: ignore[arg-type]
    for search, a in (("mse", torch.ones(128)), ("weighted", importance)):
        found = quantize_rtn(W, bits, 32, symmetric, grid=grid, scale_search=search,  # type: ignore[arg-type]
                             importance=importance)
        per_group = [(a * (q.dequantize() - W).square()).reshape(32, 4, 32).sum(-1) for q in (found, plain)]
        assert bool((per_group[0] <= per_group[1] * (1 + 1e-5) + 1e-12).all())
        assert float(per_group[0].sum()) < float(per_group[1].sum())
        assert torch.equal(found.dequantize()[3], torch.zeros(128))
        if grid != "full" and symmetric:
            assert bool((found.scale > 0).all())


def test_weighted_search_needs_importance() -> None:
    with pytest.raises(ValueError, match="weighted.*importance"):
        quantize_rtn(torch.randn(4, 32), 4, 32, True, scale_search="weighted")


@pytest.mark.parametrize("config", [RTNConfig, GPTQConfig])
def test_mse_key_names_its_replacement(config: type) -> None:
    with pytest.raises(ValidationError, match="mse was replaced by scale_search"):
        config(method=config.__name__[:-6].lower(), mse=True)
    assert config(method="x", grid="full", scale_search="weighted").scale_search == "weighted"
    with pytest.raises(ValidationError, match="grid"):
        config(method="x", grid="wide")
