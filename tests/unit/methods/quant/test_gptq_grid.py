"""GPTQ with the quantizer's grids, scale searches and group-fit times (``fit_on``).

A slow reference (column by column on the full inverse, as tests/reference_gptq.py, sharing no compressor
code) fits each group either before the sweep on the original weights or when the sweep first reaches one
of the group's columns, on the weights as updated so far, wherever act-order put those columns. Its grid is
written here: the full grid puts a group's largest-magnitude weight ``m`` on level ``-2**(b-1)`` with step
``-m / 2**(b-1)``; the min/max asymmetric grid is reference_gptq's (no halfway ties, see test_gptq_ops.py).
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from reference_gptq import grid as minmax_grid
from test_gptq import _errors
from tiny import FAMILIES

from compressor.methods.quant.gptq import GPTQ, GPTQConfig
from compressor.methods.quant.gptq_ops import gptq_quantize
from compressor.methods.quant.rtn import RTN, RTNConfig

Fit = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def _full_grid(w: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Step and zero of every row of ``w: [out, k]`` on the full symmetric grid; an all-zero row gets step 1."""
    extreme = w.gather(1, w.abs().argmax(dim=1, keepdim=True)).squeeze(1)
    scale = -extreme / 2 ** (bits - 1)
    scale = torch.where(scale == 0, torch.ones_like(scale), scale)
    return scale, torch.full_like(scale, 2 ** (bits - 1))


def _slow_gptq(W: torch.Tensor, H: torch.Tensor, bits: int, size: int, fit: Fit, act_order: bool,
               on_sweep: bool) -> torch.Tensor:
    """Codes ``[out, in]`` of the OBQ-order sweep with groups fitted by ``fit`` (see the module docstring)."""
    W, H = W.double().clone(), H.double().clone()
    columns = W.shape[1]
    order = torch.argsort(torch.diagonal(H), descending=True, stable=True) if act_order else torch.arange(columns)
    fitted = {} if on_sweep else {g: fit(W[:, g * size : (g + 1) * size]) for g in range(columns // size)}
    H += 0.01 * torch.diagonal(H).mean() * torch.eye(columns, dtype=H.dtype)
    Hinv = torch.cholesky_inverse(torch.linalg.cholesky(H))
    codes = torch.zeros_like(W)
    for j in order.tolist():
        g = j // size
        if g not in fitted:  # the sweep's first column of this group: none of its columns is quantized yet
            fitted[g] = fit(W[:, g * size : (g + 1) * size])
        scale, zero = fitted[g]
        codes[:, j] = torch.clamp(torch.round(W[:, j] / scale) + zero, 0, 2**bits - 1)
        err = (W[:, j] - scale * (codes[:, j] - zero)) / Hinv[j, j]
        W -= torch.outer(err, Hinv[j, :])
        Hinv -= torch.outer(Hinv[:, j], Hinv[j, :]) / Hinv[j, j]
    return codes


def _layer(seed: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    """``W: [32, 96]`` and the Hessian of correlated inputs (far from diagonal, so updates matter)."""
    gen = torch.Generator().manual_seed(seed)
    W = torch.randn(32, 96, generator=gen)
    X = torch.randn(256, 96, generator=gen) @ (torch.randn(96, 96, generator=gen) / 96**0.5)
    X = X + 0.3 * torch.randn(256, 1, generator=gen)
    return W, 2 / X.shape[0] * X.T @ X


@pytest.mark.parametrize("grid", ["full", "restricted"])
@pytest.mark.parametrize(("act_order", "fit_on"), [(True, "sweep"), (False, "original"), (True, "original"),
                                                   (False, "sweep")])
@pytest.mark.parametrize("block_size", [128, 20])
def test_group_fit_times_match_slow_reference(grid: str, act_order: bool, fit_on: str, block_size: int) -> None:
    W, H = _layer()
    symmetric = grid == "full"  # the restricted grid is compared asymmetric (min/max), free of ties
    fit: Fit = (lambda w: _full_grid(w, 4)) if symmetric else (lambda w: minmax_grid(w, 4, False))
    codes = _slow_gptq(W, H, 4, 32, fit, act_order, on_sweep=fit_on == "sweep")
    result = gptq_quantize(W, H, 4, 32, symmetric, act_order, block_size, grid=grid,  # type: ignore[arg-type]
                           fit_on=fit_on)  # type: ignore[arg-type]
    mismatched = int((result.qweight.q.double() != codes).sum())
    assert mismatched == 0, f"{mismatched} of {codes.numel()} codes differ from the reference"
    other = _slow_gptq(W, H, 4, 32, fit, act_order, on_sweep=fit_on != "sweep")
    assert int((other != codes).sum()) > 0.01 * codes.numel()  # the fit time matters on this Hessian


def test_weighted_search_in_gptq_uses_diag_h() -> None:
    """With a diagonal H there are no updates: GPTQ's groups are the weighted search's fit with diag(H)."""
    W, _ = _layer()
    importance = torch.rand(96, generator=torch.Generator().manual_seed(0)) ** 3 + 0.01
    for fit_on in ("original", "sweep"):
        result = gptq_quantize(W, torch.diag(importance), 3, 32, True, True, grid="full", scale_search="weighted",
                               fit_on=fit_on)  # type: ignore[arg-type]
        unweighted = gptq_quantize(W, torch.diag(importance), 3, 32, True, True, grid="full", scale_search="mse",
                                   fit_on=fit_on)  # type: ignore[arg-type]
        errors = [float((importance * (r.W_hat - W).square()).sum()) for r in (result, unweighted)]
        assert errors[0] < errors[1]


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize(
    ("grid", "scale_search", "fit_on", "act_order"),
    [("full", "weighted", "original", True), ("full", "weighted", "sweep", True),
     ("full_positive", "mse", "sweep", False)],
)
def test_gptq_beats_rtn_with_searched_grids(family: str, grid: str, scale_search: str, fit_on: str,
                                            act_order: bool) -> None:
    """RTN gets the same grid and search (weighted by the same diag(H)): GPTQ's error feedback still wins."""
    scheme = dict(bits=3, group_size=32, symmetric=True, grid=grid, scale_search=scale_search)
    gptq = _errors(family, GPTQ(GPTQConfig(method="gptq", act_order=act_order, fit_on=fit_on, **scheme)))
    rtn = _errors(family, RTN(RTNConfig(method="rtn", **scheme)))
    assert gptq.keys() == rtn.keys()
    assert sum(gptq.values()) < sum(rtn.values())
    assert sum(g < r for g, r in zip(gptq.values(), rtn.values(), strict=True)) >= 0.8 * len(gptq)
