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
    #: Every candidate's score in the first step (the unpruned model minus that candidate alone); in a screened
    #: search the full score for the shortlisted candidates and the screen score for the others.
    first_scores: dict[K, float] = field(default_factory=dict)
    #: Full evaluations (every calibration sample), summed over steps.
    evaluations: int = 0
    #: Screen evaluations (a few samples) of a screened search, summed over steps.
    screen_evaluations: int = 0


def _eligible(
    candidates: list[K], bound: dict[K, float], cost: dict[K, int], spent: int, budget: int | None
) -> list[K]:
    """The candidates not yet removed whose cost still fits in the budget."""
    return [k for k in candidates if k in bound and (budget is None or spent + cost[k] <= budget)]


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
        eligible = _eligible(candidates, bound, cost, spent, budget)
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


def screened_removal(
    candidates: list[K],
    cost: dict[K, int],
    screen: Callable[[K], float],
    evaluate: Callable[[K], float],
    commit: Callable[[K], None],
    count: int | None = None,
    budget: int | None = None,
    top: int = 3,
) -> SearchResult[K]:
    """Greedy removal that ranks candidates by a cheap ``screen`` and fully ``evaluate``s only the ``top`` best.

    Each step finds the ``top`` eligible candidates with the lowest screen scores (lazily, as the lazy greedy
    search does with full scores: a candidate's last screen score is a lower bound), scores those on everything
    and removes the lowest. The screen only decides which candidates get the expensive score, so the result
    is the exact search's whenever the exact choice ranks in the screen's ``top``; with ``top`` at least the
    number of eligible candidates nothing is screened and the search is the exact one. Stopping rules and
    ``commit`` are those of :func:`greedy_removal`.
    """
    bound: dict[K, float] = {key: -math.inf for key in candidates}
    result: SearchResult[K] = SearchResult(steps=[])
    spent = 0
    while count is None or len(result.steps) < count:
        eligible = _eligible(candidates, bound, cost, spent, budget)
        if not eligible:
            break
        shortlist, screened = _shortlist(eligible, bound, screen, top, candidates.index)
        scores = {key: evaluate(key) for key in shortlist}
        best = min(shortlist, key=lambda k: (scores[k], candidates.index(k)))
        if not result.steps:
            result.first_scores = {**{k: bound[k] for k in eligible}, **scores}
        bound.pop(best)
        result.steps.append(Step(best, scores[best], len(shortlist)))
        result.evaluations += len(shortlist)
        result.screen_evaluations += screened
        spent += cost[best]
        commit(best)
    return result


def _shortlist(
    eligible: list[K], bound: dict[K, float], screen: Callable[[K], float], top: int, order: Callable[[K], int]
) -> tuple[list[K], int]:
    """(the ``top`` candidates with the lowest fresh screen scores, screen evaluations spent); updates ``bound``."""
    if top >= len(eligible):
        return list(eligible), 0
    fresh: set[K] = set()
    while True:
        shortlist = sorted(eligible, key=lambda k: (bound[k], order(k)))[:top]
        stale = [k for k in shortlist if k not in fresh]
        if not stale:
            return shortlist, len(fresh)
        for key in stale:
            bound[key] = screen(key)
            fresh.add(key)
