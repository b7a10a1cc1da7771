"""FinerCut's math: output divergences and the greedy search over removal candidates (pure functions)."""

from __future__ import annotations

import math
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from typing import Generic, Literal, TypeVar

import torch

Measure = Literal["kl", "js", "cosine"]
K = TypeVar("K", bound=Hashable)


def scored_positions(seq_len: int, positions: int | None) -> torch.Tensor:
    """``positions`` evenly spaced token indices ending at the last one (all of them for None): ``int64 [P]``."""
    if positions is None or positions >= seq_len:
        return torch.arange(seq_len)
    return (torch.arange(1, positions + 1) * seq_len) // positions - 1


def reference(output: torch.Tensor, measure: Measure) -> torch.Tensor:
    """What the original model's output is compared in: log-probabilities (kl, js) or unit vectors (cosine).

    ``output``: logits ``[..., V]`` for kl/js, final hidden states ``[..., H]`` for cosine; float32 result.
    """
    if measure == "cosine":
        return torch.nn.functional.normalize(output.float(), dim=-1)
    return torch.log_softmax(output.float(), dim=-1)


def divergence(ref: torch.Tensor, output: torch.Tensor, measure: Measure) -> tuple[float, int]:
    """(sum over tokens, token count) of the distance from the reference to the pruned model's ``output``.

    kl: ``KL(p_ref || p)``; js: Jensen-Shannon divergence (natural log, at most ln 2); cosine: ``1 - cos``.
    ``ref`` comes from :func:`reference`; ``output`` has the same shape as the tensor it was made from.
    """
    cur = reference(output, measure)
    tokens = ref.numel() // ref.shape[-1]
    if measure == "cosine":
        return float((1 - (ref * cur).sum(-1)).sum()), tokens
    if measure == "kl":
        return float((ref.exp() * (ref - cur)).sum()), tokens
    mid = torch.logaddexp(ref, cur) - math.log(2.0)
    js = 0.5 * (ref.exp() * (ref - mid)).sum() + 0.5 * (cur.exp() * (cur - mid)).sum()
    return float(js), tokens


@dataclass
class Step(Generic[K]):
    """One greedy removal: the candidate, its score when chosen, and how many candidates were scored."""

    key: K
    score: float
    evaluations: int


@dataclass
class SearchResult(Generic[K]):
    steps: list[Step[K]]
    #: Every candidate's score in the first step (the unpruned model minus that candidate alone).
    first_scores: dict[K, float] = field(default_factory=dict)
    evaluations: int = 0


def greedy_removal(
    candidates: list[K],
    cost: dict[K, int],
    evaluate: Callable[[K], float],
    commit: Callable[[K], None],
    count: int | None = None,
    budget: int | None = None,
    lazy: bool = True,
) -> SearchResult[K]:
    """Remove candidates one at a time, each time the one whose removal scores lowest (``evaluate``).

    Stops after ``count`` removals, or when no remaining candidate's ``cost`` fits in what is left of
    ``budget`` (the budget is never exceeded). ``commit(key)`` makes a removal permanent before the next step.
    Exact search scores every remaining candidate at every step. Lazy search (lazy greedy) keeps each
    candidate's last score as a lower bound, rescoring only the current best until the best is fresh: exact
    when removing more never makes another removal less harmful, and far fewer evaluations in practice.
    """
    bound: dict[K, float] = {key: -math.inf for key in candidates}
    result: SearchResult[K] = SearchResult(steps=[])
    spent = 0
    while count is None or len(result.steps) < count:
        eligible = [k for k in candidates if k in bound and (budget is None or spent + cost[k] <= budget)]
        if not eligible:
            break
        fresh: set[K] = set()
        evaluations = 0
        if not lazy:
            for key in eligible:
                bound[key] = evaluate(key)
            fresh, evaluations = set(eligible), len(eligible)
        while True:
            best = min(eligible, key=lambda k: (bound[k], candidates.index(k)))
            if best in fresh:
                break
            bound[best] = evaluate(best)
            fresh.add(best)
            evaluations += 1
        if not result.steps:
            result.first_scores = {k: bound[k] for k in eligible}
        result.steps.append(Step(best, bound.pop(best), evaluations))
        result.evaluations += evaluations
        spent += cost[best]
        commit(best)
    return result
