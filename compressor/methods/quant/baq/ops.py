"""BAQ's math: Hessian-proxy sensitivities and the closed-form bit allocation (pure functions on tensors).

The loss model (BAQ, after GPTQ's error feedback). Quantizing column ``j`` of ``W: [out, in]`` with a
uniform grid of step ``Delta_rj = range_rg / (2^b - 1)`` (``range_rg`` the min/max range, zero included,
of row ``r`` over the quantizer group ``g`` holding ``j``) leaves a rounding error of variance
``Delta^2 / 12``; GPTQ's sweep turns it into an output error ``err^2 / d_j^2`` with ``d_j`` the j-th
diagonal of the upper Cholesky factor of the dampened ``H^-1``. Summed, the layer loss
``tr(dW H dW^T)`` is predicted as

    loss_u(b) = S_u / (2^b - 1)^2,    S_u = sum_{j in u} sum_r range_rg^2 / (12 d_j^2),

for any unit ``u`` of columns (a module, a group, one column) stored at ``b`` bits. ``S_u`` is the
unit's *sensitivity*; with plain rounding (RTN, no error feedback) ``1 / d_j^2`` becomes ``H_jj``.
A symmetric full-range grid (``grid: full``: levels ``-2^(b-1) .. 2^(b-1)-1``, the largest magnitude on
``-2^(b-1)``) has ``2^b`` steps across the range instead of ``2^b - 1``, so its model is ``S_u / 4^b``
(``steps_short = 0`` below; 1 for the restricted and asymmetric grids): at 2 bits the two differ by 1.78x,
at 4 bits by 1.14x, which moves the allocation between narrow and wide candidates.

The allocation minimises ``sum_u loss_u(b_u)`` subject to ``sum_u n_u b_u <= avg_bits * sum_u n_u``
(``n_u`` parameters per unit). The continuous problem is convex; its optimum puts every unit at the
same loss per parameter ``L`` ("equal loss", the paper's ``b_j = -0.5 log2(12 L d_j^2)``):
``b_u(L) = log2(1 + sqrt(S_u / (n_u L)))`` clipped to the candidate range, with ``L`` found by bisection
so the budget is met exactly. Integer widths come from flooring each ``b_u`` to a candidate (which
never exceeds the budget) and then spending what is left greedily, best loss decrease per bit first,
on upgrades that still fit: the result never exceeds the budget, and when it falls short no single
further upgrade fits (a budget the candidates can express, like 3.0 out of {2, 3, 4, 8} on equal units,
is met exactly).
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Callable

import torch

_BISECTION_STEPS = 200
_FLOOR_TOLERANCE = 1e-6  # a continuous width within this of a candidate counts as that candidate


def column_sensitivity(
    W: torch.Tensor,
    H: torch.Tensor,
    dampening: float = 0.01,
    group_size: int = -1,
    act_order: bool = False,
    error_feedback: bool = True,
) -> torch.Tensor:
    """Sensitivity ``S_j`` of every input column of ``W: [out, in]`` under ``H: [in, in]``: ``[in]`` float64.

    ``S_j = sum_r range_rg^2 / 12 * c_j`` with ``c_j = column_weight(H, ...)`` (see there) and ``range_rg``
    the min/max range (zero included) of row ``r`` over the quantizer group of ``group_size`` columns
    (-1: whole rows) holding ``j``, which sets the step. Columns that never see input get 0.
    """
    if W.dim() != 2 or H.shape != (W.shape[1], W.shape[1]):
        raise ValueError(f"need W: [out, in] and H: [in, in], got {tuple(W.shape)} and {tuple(H.shape)}")
    return range_sensitivity(W, column_weight(H, dampening, act_order, error_feedback), group_size)


def column_weight(H: torch.Tensor, dampening: float, act_order: bool, error_feedback: bool = True) -> torch.Tensor:
    """How much a unit of rounding variance in column ``j`` costs in ``tr(dW H dW^T)``: ``[in]`` float64.

    With GPTQ's error feedback ``c_j = 1 / d_j^2``, ``d`` the diagonal of the upper Cholesky factor of
    ``(H + dampening * mean(diag H) I)^-1`` in the sweep order (descending ``diag(H)`` with ``act_order``);
    without it (plain rounding) ``c_j = H_jj``. Dead columns (``H_jj == 0``) get 0. One weight serves
    every linear that reads the same input.
    """
    dead = torch.diagonal(H) == 0
    weight = cholesky_diagonal_weight(H, dampening, act_order) if error_feedback else torch.diagonal(H).double()
    return torch.where(dead, torch.zeros_like(weight), weight)


def range_sensitivity(
    W: torch.Tensor, weight: torch.Tensor, group_size: int = -1, row_weight: torch.Tensor | None = None
) -> torch.Tensor:
    """``S_j = sum_r a_r range_rg^2 / 12 * weight_j`` for ``W: [out, in]``, ``weight: [in]``: ``[in]`` float64.

    ``row_weight: [out]`` (``a_r``, default 1) weighs each output row, e.g. by the inverse of its output
    energy (``row_energy``) to count every output channel by its relative error.
    """
    columns = W.shape[1]
    size = columns if group_size <= 0 else group_size
    if columns % size:
        raise ValueError(f"group size {size} does not divide {columns} columns")
    Wd = W.detach().double() * (weight > 0)  # dead columns are zeroed, as GPTQ does
    blocks = Wd.reshape(W.shape[0], columns // size, size)
    ranges_sq = (blocks.amax(dim=2).clamp(min=0) - blocks.amin(dim=2).clamp(max=0)).square()  # [out, n_groups]
    if row_weight is not None:
        ranges_sq = ranges_sq * row_weight.double().unsqueeze(1)
    return ranges_sq.sum(dim=0).repeat_interleave(size) / 12 * weight.double()


def row_energy(W: torch.Tensor, H: torch.Tensor) -> torch.Tensor:
    """Output energy of every row of ``W: [out, in]`` under ``H: [in, in]``: ``diag(W H W^T)``, ``[out]`` float64."""
    Wd = W.detach().double()
    return ((Wd @ H.detach().double()) * Wd).sum(dim=1)


def cholesky_diagonal_weight(H: torch.Tensor, dampening: float, act_order: bool) -> torch.Tensor:
    """``1 / d_j^2`` for every column of ``H: [in, in]``, in original column order: ``[in]`` float64.

    ``d`` is the diagonal of the upper Cholesky factor ``U`` of the dampened inverse that GPTQ's sweep
    uses (dead columns get ``H_jj = 1`` first, as there). ``H^-1 = U^T U`` means ``H = R R^T`` with
    ``R = U^-1`` upper triangular, so ``1 / d_j = R_jj``: the Cholesky factor of ``H`` with rows and
    columns reversed, one factorisation instead of three. Dampening grows tenfold while it fails.
    """
    H = H.detach().double().clone()
    diag = torch.diagonal(H)
    diag[diag == 0] = 1
    perm = torch.argsort(diag, descending=True, stable=True) if act_order else torch.arange(H.shape[0])
    reverse = perm.flip(0)
    H = H[reverse][:, reverse]
    fraction, mean = dampening, float(torch.diagonal(H).mean())
    for _ in range(7):
        Hd = H.clone()
        Hd.diagonal().add_(fraction * mean)
        L, info = torch.linalg.cholesky_ex(Hd)
        if int(info) == 0 and torch.isfinite(L).all():
            weight = torch.empty_like(diag)
            weight[reverse] = torch.diagonal(L).square()
            return weight
        fraction = fraction * 10 if fraction > 0 else 0.01
    raise ValueError(f"Cholesky factorisation of the Hessian failed even with dampening {fraction / 10:g}")


def predicted_loss(sensitivity: torch.Tensor, bits: torch.Tensor, steps_short: int = 1) -> torch.Tensor:
    """``S / (2^b - steps_short)^2`` elementwise: the modelled ``tr(dW H dW^T)`` of each unit at ``bits``."""
    return sensitivity.double() / (torch.pow(2.0, bits.double()) - steps_short).square()


def continuous_bits(
    sensitivity: torch.Tensor, sizes: torch.Tensor, avg_bits: float, lo: int, hi: int, steps_short: int = 1
) -> torch.Tensor:
    """The convex optimum: equal loss per parameter, ``b_u = log2(c + sqrt(S_u / (n_u L)))`` in ``[lo, hi]``.

    ``c`` is ``steps_short`` (1: ``2^b - 1`` steps per range, 0: the full grid's ``2^b``).

    ``sensitivity, sizes: [units]``; ``L`` is found by bisection on ``log L`` so that
    ``sum n_u b_u = avg_bits * sum n_u`` (to float precision). Returns ``[units]`` float64 widths. When
    even the largest useful widths cannot spend the budget (insensitive units), the widths at the
    smallest ``L`` are returned and the rounding step spends the rest.
    """
    S = sensitivity.double().clamp(min=0)
    n = sizes.double()
    sigma = S / n
    target = avg_bits * float(n.sum())

    def widths(log_L: float) -> torch.Tensor:
        return torch.log2(steps_short + torch.sqrt(sigma / math.exp(log_L))).clamp(lo, hi)

    positive = sigma[sigma > 0]
    if positive.numel() == 0:
        return torch.full_like(S, float(lo))
    low = math.log(float(positive.min())) - 2 * hi * math.log(2) - 1  # every sensitive unit at hi
    high = math.log(float(positive.max())) + 1  # every unit at lo
    for _ in range(_BISECTION_STEPS):
        mid = (low + high) / 2
        if float((n * widths(mid)).sum()) > target:
            low = mid
        else:
            high = mid
    return widths(high)


def allocate_bits(
    sensitivity: torch.Tensor,
    sizes: torch.Tensor,
    candidates: list[int],
    avg_bits: float,
    pool: torch.Tensor | None = None,
    steps_short: int = 1,
) -> torch.Tensor:
    """Integer widths from ``candidates`` for every unit, averaging at most ``avg_bits`` per parameter.

    ``sensitivity, sizes: [elements]`` (``S`` and parameter counts). Without ``pool`` every element is
    a unit. With ``pool: [elements]`` (unit index of each element, e.g. the quantizer group of each
    column) the closed form is solved per element and each unit starts from the size-weighted mean of
    its elements' widths (the paper's per-column widths, pooled into stored units); rounding and the
    budget then work on units. Returns ``[units]`` int64. See the module docstring for the guarantee.
    """
    choices = sorted(set(candidates))
    if not choices or not choices[0] <= avg_bits <= choices[-1]:
        raise ValueError(f"avg_bits {avg_bits} must lie within the candidates {choices}")
    widths = continuous_bits(sensitivity, sizes, avg_bits, choices[0], choices[-1], steps_short)
    S, n = sensitivity.double().clamp(min=0), sizes.double()
    if pool is not None:
        units = int(pool.max()) + 1
        S = torch.zeros(units, dtype=torch.float64).index_add_(0, pool, S)
        n_units = torch.zeros(units, dtype=torch.float64).index_add_(0, pool, n)
        widths = torch.zeros(units, dtype=torch.float64).index_add_(0, pool, n * widths) / n_units
        n = n_units
    grid = torch.tensor(choices, dtype=torch.float64)
    start = grid[(torch.searchsorted(grid, widths + _FLOOR_TOLERANCE, right=True) - 1).clamp(min=0)]
    sizes_int = [int(v) for v in n.round().tolist()]
    budget = math.floor(avg_bits * sum(sizes_int) + 1e-9 * sum(sizes_int))
    bits = [int(b) for b in start.tolist()]
    def loss(s: float, b: int) -> float:
        return s / float((1 << b) - steps_short) ** 2

    _trim(bits, S.tolist(), sizes_int, choices, budget, loss)
    _fill(bits, S.tolist(), sizes_int, choices, budget, loss)
    return torch.tensor(bits, dtype=torch.int64)


def _fill(bits: list[int], S: list[float], n: list[int], choices: list[int], budget: int,
          loss: Callable[[float, int], float]) -> None:
    """Spend ``budget - sum n b`` on upgrades to the next candidate, best loss decrease per bit first."""
    left = budget - sum(b * k for b, k in zip(bits, n, strict=True))
    heap: list[tuple[float, int]] = []

    def push(u: int) -> None:
        nxt = choices.index(bits[u]) + 1
        if nxt < len(choices):
            cost = n[u] * (choices[nxt] - bits[u])
            heapq.heappush(heap, (-(loss(S[u], bits[u]) - loss(S[u], choices[nxt])) / cost, u))

    for u in range(len(bits)):
        push(u)
    while heap and left > 0:
        _, u = heapq.heappop(heap)
        nxt = choices[choices.index(bits[u]) + 1]
        cost = n[u] * (nxt - bits[u])
        if cost <= left:  # else this unit's upgrades never fit again (the budget only shrinks)
            bits[u], left = nxt, left - cost
            push(u)


def _trim(bits: list[int], S: list[float], n: list[int], choices: list[int], budget: int,
          loss: Callable[[float, int], float]) -> None:
    """While over ``budget`` (only float noise in the floor can cause it), downgrade the cheapest loss."""
    over = sum(b * k for b, k in zip(bits, n, strict=True)) - budget
    while over > 0:
        lowerable = [u for u in range(len(bits)) if bits[u] > choices[0]]
        u = min(lowerable, key=lambda v: loss(S[v], choices[choices.index(bits[v]) - 1]) - loss(S[v], bits[v]))
        lower = choices[choices.index(bits[u]) - 1]
        over -= n[u] * (bits[u] - lower)
        bits[u] = lower
