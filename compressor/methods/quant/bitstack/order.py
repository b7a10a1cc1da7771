"""The global order of every block of every linear, and a memory budget to the number of blocks per linear.

Order: block ``j`` of a linear is worth its drop of the calibration output error, ``tr(dW H dW^T)`` with
that linear's own ``H`` (:func:`..ops.output_errors`), per stored byte. Why this and not the reference's
measured perplexity per block: it needs no extra forward passes (the reference runs the evaluation set
once per block per linear, ``iterations x linears`` runs, hours on a small model on CPU), it is the
objective every other quantizer here minimises (GPTQ, BAQ), and it makes the order provably the best
for the summed error at its own boundaries (below). The caller decides how linears' errors compare (the
stage divides each by the linear's output energy by default, as BAQ's ``relative``); neither says how much
the final loss cares about each linear.

Blocks of a linear load in order, so the order is that of a knapsack with chains: each chain's
(drop, bytes) steps are first merged where a later step is worth more per byte than an earlier one
(the upper concave hull, pooling adjacent violators), then the merged steps of all chains are sorted by
worth per byte. Where the chains are concave no merging happens, and every prefix of the order has the
largest total drop any choice of blocks within its bytes has (the greedy fractional-knapsack optimum is
an integer solution there). Every linear's first block comes first: a linear with no block would have a
zero weight, so one block each is the smallest loadable model.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from compressor.errors import UsageError
from compressor.models.shipped.modeling_bitstack import BitStackBudgetError, select_blocks


class BudgetError(UsageError):
    """A memory budget that cannot be read, or that no set of blocks fits."""


@dataclass(frozen=True)
class Chain:
    """One linear's blocks: ``drops[j]`` (error reduction of block j), ``sizes[j]`` (its bytes), its weight count."""

    path: str
    drops: tuple[float, ...]
    sizes: tuple[int, ...]
    params: int = 0


def _hull(chain: Chain) -> list[tuple[float, int, int]]:
    """Steps after the first block as ``(drop, bytes, blocks)``, merged so worth per byte never rises."""
    steps: list[tuple[float, int, int]] = []
    for drop, size in zip(chain.drops[1:], chain.sizes[1:], strict=True):
        step = (drop, size, 1)
        while steps and steps[-1][0] * step[1] <= step[0] * steps[-1][1]:  # previous worth <= this one's
            previous = steps.pop()
            step = (previous[0] + step[0], previous[1] + step[1], previous[2] + step[2])
        steps.append(step)
    return steps


def global_order(chains: list[Chain]) -> list[tuple[str, int]]:
    """Every block as ``(path, index)`` in loading order: all first blocks, then by error drop per byte."""
    order = [(chain.path, 0) for chain in chains if chain.sizes]
    merged = []
    for position, chain in enumerate(chains):
        start = 1
        for drop, size, count in _hull(chain):
            merged.append((-drop / size, position, start, count))
            start += count
    merged.sort(key=lambda step: (step[0], step[1], step[2]))
    for _, position, start, count in merged:
        order += [(chains[position].path, start + i) for i in range(count)]
    return order


_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "kib": 2**10, "mib": 2**20, "gib": 2**30}
_PATTERN = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:e[+-]?[0-9]+)?)\s*([a-z]*)\s*$")


@dataclass(frozen=True)
class Budget:
    """A memory budget: ``bytes`` of the whole model's weights, or ``bpw`` bits per targeted weight."""

    value: float
    unit: str  # "bytes" or "bpw"


def parse_budget(text: str | int | float) -> Budget:
    """``300MB`` (10^6), ``1.5GiB`` (2^30), ``123456`` or ``123456B`` (bytes), ``2.5bpw`` (bits per weight)."""
    if isinstance(text, int | float) and not isinstance(text, bool):
        number, unit = float(text), ""
    else:
        match = _PATTERN.match(str(text).lower())
        if match is None or match.group(2) not in (*_UNITS, "bpw"):
            raise BudgetError(f"budget '{text}': expected a size such as 300MB, 1.5GiB, 123456 (bytes) or 2.5bpw")
        number, unit = float(match.group(1)), match.group(2)
    if number <= 0:
        raise BudgetError(f"budget '{text}' must be above 0")
    if unit == "bpw":
        return Budget(number, "bpw")
    return Budget(number * _UNITS[unit], "bytes")


def blocks_for_budget(
    chains: list[Chain], order: list[tuple[str, int]], budget: Budget, fixed_bytes: int = 0
) -> dict[str, int]:
    """Blocks per linear in the longest prefix of ``order`` whose bytes fit ``budget``.

    ``fixed_bytes``: the weights outside the decomposed linears (embeddings, norms, head), which a byte
    budget covers too. A budget below one block per linear is an error naming the smallest and largest.
    The walk is the shipped modeling file's, so the stage and both loaders choose the same blocks.
    """
    sizes = {chain.path: list(chain.sizes) for chain in chains}
    params = sum(chain.params for chain in chains)
    try:
        return select_blocks(sizes, params, order, (budget.value, budget.unit), fixed_bytes)
    except BitStackBudgetError as exc:
        raise BudgetError(str(exc)) from None


@dataclass(frozen=True)
class CurvePoint:
    """One loadable prefix of the order: its length, the decomposed linears' bytes and bits per their weights,
    and their summed calibration output error relative to the summed error with no block loaded."""

    blocks: int
    linear_bytes: int
    bits: float
    rel_error: float


def error_curve(
    chains: list[Chain], errors: dict[str, list[float]], order: list[tuple[str, int]]
) -> list[CurvePoint]:
    """Every loadable prefix of ``order`` (one block per linear up to all of them) as a :class:`CurvePoint`.

    ``errors[path][k]``: the linear's calibration output error with its first ``k`` blocks (the stage's
    ``output_errors``; absolute, whatever the order's ``relative`` was, so that linears add up). Bits count
    every stored byte over the decomposed weights, as ``blocks_for_budget`` does for a ``bpw`` budget.
    Shorter prefixes leave a linear without a block (a zero weight) and are not points.
    """
    sizes = {chain.path: chain.sizes for chain in chains}
    params = sum(chain.params for chain in chains) or 1
    base = sum(errors[path][0] for path in sizes)
    norm = base if base > 0 else 1.0
    total, used, points = base, 0, []
    for n, (path, index) in enumerate(order, start=1):
        used += sizes[path][index]
        total += errors[path][index + 1] - errors[path][index]
        if n >= len(sizes):
            points.append(CurvePoint(n, used, used * 8 / params, total / norm))
    return points


def thin_curve(points: list[CurvePoint], limit: int, keep: tuple[int, ...] = ()) -> list[CurvePoint]:
    """At most ``limit`` points evenly spaced along ``points``, plus the first, the last and those whose
    ``blocks`` is in ``keep`` (the stage's budget), in order."""
    if len(points) <= limit:
        return list(points)
    last = len(points) - 1
    chosen = {round(i * last / (limit - 1)) for i in range(limit)}
    chosen |= {i for i, point in enumerate(points) if point.blocks in keep}
    return [points[i] for i in sorted(chosen)]
