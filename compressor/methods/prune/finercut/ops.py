"""FinerCut's math: output divergences and the greedy search over removal candidates (pure functions).

The searches differ in what they score. :func:`greedy_removal` scores candidates in full: all of them each step
(exact) or only those whose last score is below the best fresh one (lazy). :func:`bounded_removal` is the lazy
search on partial sums. Its work: each touched candidate is scored until its partial sum passes the lowest other
bound. The winner and near ties need every chunk, as in the lazy search; a candidate far above the best is
dropped after one, where the lazy search scores it in full; a candidate whose carried partial sum fell below the
best score is touched again (a chunk or so), where the lazy search's carried full score might have kept it out.
:func:`screened_removal` ranks on a cheap screen and scores only a shortlist in full (not exact).
"""

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
    """One greedy removal: the candidate, its score when chosen, and how many candidates were scored.

    ``evaluations``: candidates scored on every calibration sample; in a bounded search also ``chunks`` (chunk
    scores spent) and ``touched`` (candidates scored on at least one chunk).
    """

    key: K
    score: float
    evaluations: int
    chunks: int = 0
    touched: int = 0


@dataclass
class SearchResult(Generic[K]):
    steps: list[Step[K]]
    #: Every candidate's score in the first step (the unpruned model minus that candidate alone); in a screened
    #: search the full score for the shortlisted candidates and the screen score for the others; in a bounded
    #: search only the candidates it scored completely (the others are in ``first_bounds``).
    first_scores: dict[K, float] = field(default_factory=dict)
    #: A bounded search's first-step lower bounds of the scores it did not complete (partial sum / all tokens).
    first_bounds: dict[K, float] = field(default_factory=dict)
    #: Full evaluations (every calibration sample), summed over steps.
    evaluations: int = 0
    #: Screen evaluations (a few samples) of a screened search, summed over steps.
    screen_evaluations: int = 0
    #: A bounded search's chunk scores summed over steps, and chunks in one full evaluation (0: not chunked):
    #: ``chunk_evaluations / chunks`` is the work in full-evaluation equivalents.
    chunk_evaluations: int = 0
    chunks: int = 0
    #: A bounded search's candidates scored on at least one chunk, summed over steps (at least the candidates the
    #: lazy search of :func:`greedy_removal` scores in full: its carried bounds are partial sums, not full scores).
    touched: int = 0


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


def bounded_removal(
    candidates: list[K],
    cost: dict[K, int],
    score_chunk: Callable[[K, int], float],
    chunks: int,
    tokens: int,
    commit: Callable[[K], None],
    count: int | None = None,
    budget: int | None = None,
    margin: float = 1.0,
    baseline: Callable[[], list[float]] | None = None,
) -> SearchResult[K]:
    """The lazy greedy search, best-first on partial sums: most candidates are dropped after a few chunks.

    A candidate's score is ``(t_0 + t_1 + ... + t_{chunks-1}) / tokens``, summed left to right: ``t_j =
    score_chunk(key, j)`` is the divergence summed over chunk ``j`` of the calibration tokens (>= 0: KL, JS and
    1 - cos are non-negative per token) and ``tokens`` counts all of them, the same for every candidate. So the
    sum of any chunks over ``tokens`` is a lower bound of the full score (partial <= fresh), and the full score,
    once every chunk is in, is summed in chunk order: bit for bit the sum ``evaluate`` makes.

    Each step keeps a bound per candidate: what it had at the end of the last step (its full score or its partial
    sum then; -inf at first) until it is touched, then its partial sum over all ``tokens``, then its full score.
    Loop: take the lowest bound (ties: candidate order); if that candidate is complete, remove it; otherwise
    score its next chunks while its bound stays at most ``margin`` times the lowest other bound. The winner's
    full score is at most every other bound. Under lazy greedy's assumption (removing more never makes another
    removal less harmful) a bound from an earlier step is at most the score now, as is a partial sum; so the
    winner has the lowest full score of all: the exact search's choice, and the lazy search's (which under the
    same assumption returns it too). Scoring more chunks than needed changes no choice, only the bounds. Where
    the assumption fails, the two lazy searches may choose differently (this one carries partial sums where the
    other carries full scores, so it may rescore candidates the other leaves alone). In floating point a term of
    an unchanged output can be a rounding-level negative; that matters only between scores tied to rounding.

    ``baseline()``: the model as it is (no candidate removed), its divergence per chunk (``chunks`` terms, summed as
    a candidate's are), read after every commit. A score is that baseline plus the candidate's own harm, and every
    removal raises the baseline, so without it a bound carried from the last step lags every current score by the
    rise and nearly every candidate is touched again at every step, each scored on most chunks before its partial
    sum passes another's bound. With it, under the same assumption read per chunk (a removal on top of the
    model as it is never lowers a chunk's divergence): carried bounds are raised by the baseline's rise, and an
    incomplete candidate's bound is its scored chunks plus the baseline's other chunks. Where the assumption holds
    the removals are still the exact search's.

    ``margin`` 1 scores a candidate only until it is no longer the best bound; above 1 its bound is banked at
    ``margin`` times the best one, so it is not touched again in the next steps while the best score grows by
    less than that. A candidate scores first the chunks where it diverged most when last scored (the partial
    sum rises fastest). ``cost``, ``count``, ``budget`` and ``commit`` as in :func:`greedy_removal`.
    """
    if chunks < 1 or tokens < 1 or margin < 1:
        raise ValueError(f"bounded_removal needs at least one chunk and one token and a margin of at least 1, got "
                         f"{chunks}, {tokens} and {margin}")
    bound: dict[K, float] = {key: -math.inf for key in candidates}
    last: dict[K, dict[int, float]] = {}  # each candidate's chunk terms when it was last scored
    result: SearchResult[K] = SearchResult(steps=[], chunks=chunks)
    spent = 0
    floor = baseline() if baseline is not None else None
    while count is None or len(result.steps) < count:
        eligible = _eligible(candidates, bound, cost, spent, budget)
        if not eligible:
            break
        best, terms = _bounded_step(eligible, bound, last, score_chunk, chunks, tokens, margin, floor)
        last.update(terms)
        complete = {key for key, done in terms.items() if len(done) == chunks}
        if not result.steps:
            result.first_scores = {k: bound[k] for k in eligible if k in complete}
            result.first_bounds = {k: bound[k] for k in eligible if k not in complete}
        used = sum(len(done) for done in terms.values())
        result.steps.append(Step(best, bound.pop(best), len(complete), chunks=used, touched=len(terms)))
        result.evaluations += len(complete)
        result.chunk_evaluations += used
        result.touched += len(terms)
        spent += cost[best]
        commit(best)
        if baseline is not None and floor is not None:
            now = baseline()
            rise = (_in_order(now) - _in_order(floor)) / tokens
            bound = {key: value + rise for key, value in bound.items()}
            floor = now
    return result


def _bounded_step(
    eligible: list[K], bound: dict[K, float], last: dict[K, dict[int, float]],
    score_chunk: Callable[[K, int], float], chunks: int, tokens: int, margin: float,
    floor: list[float] | None = None,
) -> tuple[K, dict[K, dict[int, float]]]:
    """One step of :func:`bounded_removal`: (the winner, the chunk terms scored per touched candidate).

    ``eligible`` is in candidate order (ties go to the earlier one); ``bound`` is updated in place. With
    ``floor`` (the baseline's chunk terms) an incomplete candidate's bound counts the baseline's term for every
    chunk it has not scored.
    """
    order = {key: n for n, key in enumerate(eligible)}
    terms: dict[K, dict[int, float]] = {}
    while True:
        best = min(eligible, key=lambda k: (bound[k], order[k]))
        done = terms.setdefault(best, {})
        if len(done) == chunks:
            return best, terms
        lowest = min((bound[k] for k in eligible if k != best), default=math.inf)
        for chunk in _chunk_order(last.get(best, {}), chunks)[len(done):]:
            done[chunk] = score_chunk(best, chunk)
            bound[best] = _bound(done, chunks, tokens, floor)
            if bound[best] > margin * lowest:
                break


def _chunk_order(previous: dict[int, float], chunks: int) -> list[int]:
    """Chunks by falling ``previous`` term (the candidate's when last scored), then the unscored ones in order."""
    return sorted(range(chunks), key=lambda j: (-previous[j], j) if j in previous else (math.inf, j))


def _bound(done: dict[int, float], chunks: int, tokens: int, floor: list[float] | None = None) -> float:
    """Partial sum (plus ``floor``'s terms of the chunks not done) over all ``tokens``; once every chunk is in,
    the full score summed in chunk order."""
    if len(done) < chunks:
        rest = 0.0 if floor is None else sum(floor[j] for j in range(chunks) if j not in done)
        return (sum(done.values()) + rest) / tokens
    return _in_order(done) / tokens


def _in_order(terms: dict[int, float] | list[float]) -> float:
    """Chunk terms summed in chunk order (how every full score is summed, so equal terms give equal sums)."""
    values = terms if isinstance(terms, list) else [terms[j] for j in range(len(terms))]
    total = 0.0
    for value in values:
        total += value
    return total


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
