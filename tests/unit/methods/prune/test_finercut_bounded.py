"""FinerCut's lazy search on partial sums (ops.bounded_removal): the same removals as scoring every touched
candidate on everything, for a fraction of the chunk scores."""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Any

import pytest
import torch
from test_finercut import run_cut, silence_sublayer
from test_layer_drop import deep_model

from compressor.methods.prune.finercut.ops import (
    SearchResult,
    Step,
    _bound,
    _bounded_step,
    bounded_removal,
    greedy_removal,
)
from compressor.methods.prune.finercut.saved import Searched, from_state, to_state
from compressor.methods.prune.finercut.search import Key, SublayerSearch

# ---- the search on synthetic per-chunk divergences -----------------------------------------------------


class Chunks:
    """Per-chunk divergence sums that grow with every removal (lazy greedy's assumption) and log what ran.

    ``chunk(key, j)`` is ``terms[key][j] * (1 + growth * removed)``; ``evaluate`` sums the chunks in order over
    ``tokens``, the arithmetic of ``SublayerSearch.evaluate``.
    """

    def __init__(self, terms: dict[str, list[float]], tokens: int, growth: float = 0.25) -> None:
        self.terms, self.tokens, self.growth = terms, tokens, growth
        self.removed: list[str] = []
        self.calls: list[tuple[str, int]] = []

    def chunk(self, key: str, index: int) -> float:
        self.calls.append((key, index))
        return self.terms[key][index] * (1 + self.growth * len(self.removed))

    def evaluate(self, key: str) -> float:
        total = 0.0
        for index in range(len(self.terms[key])):
            total += self.chunk(key, index)
        return total / self.tokens

    @property
    def chunks(self) -> int:
        return len(next(iter(self.terms.values())))


def _three_ways(terms: dict[str, list[float]], tokens: int, **stop: Any) -> tuple[SearchResult[str], ...]:
    """(bounded, lazy, exact) searches on fresh copies of the same synthetic divergences.

    ``stop``: count / budget, and optionally ``cost`` and the bounded search's ``margin``.
    """
    cost = stop.pop("cost", dict.fromkeys(terms, 1))
    margin = stop.pop("margin", 1.0)
    bounded = Chunks(terms, tokens)
    new = bounded_removal(list(terms), cost, bounded.chunk, bounded.chunks, tokens, bounded.removed.append,
                          margin=margin, **stop)
    lazy, exact = Chunks(terms, tokens), Chunks(terms, tokens)
    old = greedy_removal(list(terms), cost, lazy.evaluate, lazy.removed.append, lazy=True, **stop)
    paper = greedy_removal(list(terms), cost, exact.evaluate, exact.removed.append, lazy=False, **stop)
    assert new.chunk_evaluations == len(bounded.calls)
    return new, old, paper


TERMS = {  # four chunks each; tokens 40
    "a": [0.5, 0.4, 0.6, 0.5],
    "b": [9.0, 8.0, 7.0, 9.0],  # far above the best after one chunk: dropped there
    "c": [0.1, 0.2, 0.1, 0.2],
    "d": [0.0, 0.0, 0.0, 3.0],  # looks free on three chunks: a partial sum over the chunks so far would pick it
    "e": [1.0, 1.1, 0.9, 1.2],
    "f": [0.3, 0.1, 0.2, 0.3],
}


def test_same_removals_and_scores_as_the_lazy_and_exact_searches_for_fewer_chunks() -> None:
    new, old, paper = _three_ways(TERMS, 40, count=4)
    assert [s.key for s in new.steps] == [s.key for s in old.steps] == [s.key for s in paper.steps]
    assert [s.key for s in new.steps] == ["c", "f", "a", "d"]
    assert [s.score for s in new.steps] == [s.score for s in old.steps] == [s.score for s in paper.steps]
    assert new.chunk_evaluations < old.evaluations * 4 < paper.evaluations * 4
    assert new.chunks == 4 and new.chunk_evaluations == sum(s.chunks for s in new.steps)
    assert new.evaluations == sum(s.evaluations for s in new.steps) < old.evaluations


def test_a_candidate_far_above_the_best_is_dropped_after_one_chunk() -> None:
    bounded = Chunks(TERMS, 40)
    result = bounded_removal(list(TERMS), dict.fromkeys(TERMS, 1), bounded.chunk, 4, 40, bounded.removed.append,
                             count=1)
    assert [index for key, index in bounded.calls if key == "b"] == [0]
    # scored whole: the winner, and d, whose divergence is all in its last chunk
    assert result.first_scores == {"c": pytest.approx(0.6 / 40), "d": pytest.approx(3.0 / 40)}
    assert result.first_bounds["b"] == 9.0 / 40  # one chunk over every token
    for key, bound in result.first_bounds.items():  # lower bounds of the first-step scores
        assert bound <= sum(TERMS[key]) / 40
    (step,) = result.steps
    assert (step.key, step.evaluations, step.touched, step.chunks) == ("c", 2, 6, len(bounded.calls)) == ("c", 2, 6, 15)


def test_the_bound_divides_by_every_token_not_the_tokens_scored_so_far() -> None:
    """c's divergence is all in its first chunk, d's in its last. Over every token, c's first chunk bounds its
    score by 0.6/40, below d's full 2/40; a mean over the tokens scored so far (0.6/10) would pass d's and
    remove d, whose score is higher."""
    terms = {"c": [0.6, 0.0, 0.0, 0.0], "d": [0.0, 0.0, 0.0, 2.0], "g": [2.0, 0.0, 0.0, 0.0]}
    new, old, _ = _three_ways(terms, 40, count=1)
    assert new.steps[0].key == old.steps[0].key == "c"
    assert new.steps[0].score == old.steps[0].score == 0.6 / 40


def test_a_margin_banks_a_bound_above_the_best_and_changes_no_choice() -> None:
    """x wins (2.4/40 against a's 4/40). With margin 1, a is scored until its bound passes x's (3 chunks); with
    margin 2 until it passes twice x's, which only its full score does."""
    terms = {"a": [1.0, 1.0, 1.0, 1.0], "x": [0.6, 0.6, 0.6, 0.6]}
    for margin, a_chunks in ((1.0, 3), (2.0, 4)):
        log = Chunks(terms, 40)
        result = bounded_removal(list(terms), dict.fromkeys(terms, 1), log.chunk, 4, 40, log.removed.append,
                                 count=1, margin=margin)
        assert result.steps[0].key == "x" and result.steps[0].score == 2.4 / 40
        assert len([key for key, _ in log.calls if key == "a"]) == a_chunks
        assert ("a" in result.first_scores) == (a_chunks == 4)


def test_a_candidate_scores_first_the_chunk_where_it_diverged_most() -> None:
    new, _, _ = _three_ways(TERMS, 40, count=4)
    log = Chunks(TERMS, 40)
    bounded_removal(list(TERMS), dict.fromkeys(TERMS, 1), log.chunk, 4, 40, log.removed.append, count=4)
    d_calls = [index for key, index in log.calls if key == "d"]
    assert d_calls[:4] == [0, 1, 2, 3] and d_calls[4] == 3  # its last chunk held all of its divergence
    assert new.steps[-1].key == "d" and new.steps[-1].score == 3.0 * 1.75 / 40  # summed in chunk order


@pytest.mark.parametrize("margin", [1.0, 2.0, 3.0])
def test_random_monotone_searches_agree_with_lazy_and_exact(margin: float) -> None:
    rng = random.Random(7)
    saved = 0
    for _ in range(40):
        terms = {f"k{n}": [rng.random() * rng.choice([0.05, 1.0, 20.0]) for _ in range(6)] for n in range(10)}
        cost = {key: rng.choice([1, 2, 3]) for key in terms}
        new, old, paper = _three_ways(terms, 60, budget=12, cost=cost, margin=margin)
        assert [(s.key, s.score) for s in new.steps] == [(s.key, s.score) for s in old.steps]
        assert [s.key for s in new.steps] == [s.key for s in paper.steps]
        assert sum(cost[s.key] for s in new.steps) <= 12
        saved += old.evaluations * 6 - new.chunk_evaluations
    assert saved > 0


def test_no_chunks_is_refused() -> None:
    with pytest.raises(ValueError, match="at least one chunk and one token and a margin of at least 1"):
        bounded_removal(["a"], {"a": 1}, lambda key, index: 0.0, 0, 10, lambda key: None)
    with pytest.raises(ValueError, match="margin of at least 1, got 4, 10 and 0.5"):
        bounded_removal(["a"], {"a": 1}, lambda key, index: 0.0, 4, 10, lambda key: None, margin=0.5)


class Damage(Chunks):
    """:class:`Chunks` on top of the damage already done: every removed candidate's terms stay in every later
    score, as a removed sublayer's divergence stays in every later candidate's (the search's ``baseline``)."""

    def base(self, index: int) -> float:
        return sum(self.terms[key][index] * (1 + self.growth * n) for n, key in enumerate(self.removed))

    def chunk(self, key: str, index: int) -> float:
        return self.base(index) + super().chunk(key, index)

    def baseline(self) -> list[float]:
        return [self.base(index) for index in range(self.chunks)]


def test_bounds_raised_by_the_baseline_keep_the_exact_choices_for_far_fewer_chunks() -> None:
    """Scores include the damage done so far, so unraised carried bounds lag every score by it and nearly every
    candidate is touched again each step; raised by the baseline's rise, and counting the baseline for the chunks
    not scored yet, they stay tight: the exact search's removals for fewer than half the chunks after the first
    step (harm growing 5% per removal here; 16 candidates, 8 chunks, 8 removals, 20 random cases)."""
    rng = random.Random(11)
    later = {"raised": 0, "plain": 0}
    for _ in range(20):
        terms = {f"k{n}": [rng.random() * rng.choice([0.05, 1.0, 3.0]) for _ in range(8)] for n in range(16)}
        raised, plain, exact = Damage(terms, 80, 0.05), Damage(terms, 80, 0.05), Damage(terms, 80, 0.05)
        new = bounded_removal(list(terms), dict.fromkeys(terms, 1), raised.chunk, 8, 80, raised.removed.append,
                              count=8, baseline=raised.baseline)
        old = bounded_removal(list(terms), dict.fromkeys(terms, 1), plain.chunk, 8, 80, plain.removed.append,
                              count=8)
        paper = greedy_removal(list(terms), dict.fromkeys(terms, 1), exact.evaluate, exact.removed.append,
                               lazy=False, count=8)
        assert [s.key for s in new.steps] == [s.key for s in old.steps] == [s.key for s in paper.steps]
        assert [s.score for s in new.steps] == [s.score for s in paper.steps]  # summed in chunk order
        assert new.steps[0].chunks == old.steps[0].chunks  # no baseline rise yet: the same first step
        later["raised"] += sum(s.chunks for s in new.steps[1:])
        later["plain"] += sum(s.chunks for s in old.steps[1:])
    assert later["raised"] * 2 < later["plain"]


def test_an_incomplete_bound_counts_the_baseline_for_the_chunks_not_scored() -> None:
    assert _bound({0: 1.0}, 3, 10, [0.5, 0.2, 0.3]) == pytest.approx((1.0 + 0.2 + 0.3) / 10)
    assert _bound({0: 1.0}, 3, 10) == pytest.approx(1.0 / 10)
    assert _bound({2: 0.3, 0: 1.0, 1: 0.2}, 3, 10, [9.0, 9.0, 9.0]) == (1.0 + 0.2 + 0.3) / 10  # complete: exact
    # the winner's bound is its exact score once complete, whatever its carried bound and the floor
    bound = {"a": 0.5, "b": 0.4}
    best, terms = _bounded_step(["a", "b"], bound, {}, lambda key, j: 0.0 if key == "b" else 3.0, 4, 10, 1.0,
                                [0.2] * 4)
    assert best == "b" and bound["b"] == 0.0 and terms == {"b": dict.fromkeys(range(4), 0.0)}


# ---- on models: the previous lazy search, bit for bit -----------------------------------------------------


def _previous_lazy(
    candidates: list[Key], cost: dict[Key, int], score_chunk: Callable[[Key, int], float], chunks: int,
    tokens: int, commit: Callable[[Key], None], count: int | None = None, budget: int | None = None,
    margin: float = 1.0, baseline: Callable[[], list[float]] | None = None,
) -> SearchResult[Key]:
    """``bounded_removal``'s stand-in: the lazy search before partial sums, every touched candidate scored whole
    (and its bounds not raised by the ``baseline``)."""
    search = score_chunk.__self__  # type: ignore[attr-defined]
    assert isinstance(search, SublayerSearch) and (len(search.chunks), search.tokens) == (chunks, tokens)
    return greedy_removal(candidates, cost, search.evaluate, commit, count=count, budget=budget, lazy=True)


@pytest.mark.parametrize(("family", "settings"), [
    ("llama", {"remove": 5}),
    ("qwen2", {"ratio": 0.3, "measure": "js", "positions": 8}),
    ("opt", {"remove": 4, "measure": "cosine", "positions": None}),
])
def test_same_removals_as_the_previous_lazy_search_with_fewer_forwards(
    family: str, settings: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    new, _ = run_cut(deep_model(family, 6), **settings)
    with monkeypatch.context() as patch:
        patch.setattr("compressor.methods.prune.finercut.bounded_removal", _previous_lazy)
        old, _ = run_cut(deep_model(family, 6), **settings)
    new_cut, old_cut = new.structure["finercut"], old.structure["finercut"]
    assert new_cut["removed"] == old_cut["removed"]  # keys, order and (rounded) scores
    assert new.model.config.finercut_removed == old.model.config.finercut_removed
    assert new_cut["layer_forwards"] < old_cut["layer_forwards"]
    assert new_cut["chunk_evaluations"] < old_cut["evaluations"] * new_cut["chunks"]
    assert new_cut["evaluation_equivalents"] == round(new_cut["chunk_evaluations"] / new_cut["chunks"], 2)


def test_the_baseline_saves_layer_forwards_on_a_model(monkeypatch: pytest.MonkeyPatch) -> None:
    new, _ = run_cut(deep_model("llama", 6), remove=6)
    with monkeypatch.context() as patch:
        def unraised(*args: Any, **kwargs: Any) -> SearchResult[Key]:
            return bounded_removal(*args, **{**kwargs, "baseline": None})
        patch.setattr("compressor.methods.prune.finercut.bounded_removal", unraised)
        old, _ = run_cut(deep_model("llama", 6), **{"remove": 6})
    new_cut, old_cut = new.structure["finercut"], old.structure["finercut"]
    assert new_cut["removed"] == old_cut["removed"]
    assert new_cut["layer_forwards"] < old_cut["layer_forwards"]


def test_a_silent_sublayer_is_found_with_chunks_of_two_sequences() -> None:
    model = deep_model("llama")
    silence_sublayer(model, 1, "attention")
    run, records = run_cut(model, remove=1, chunk_samples=2)
    cut = run.structure["finercut"]
    assert cut["removed"][0][:2] == [1, "attention"] and cut["chunks"] == 3  # batches of 3 and 1: 2+1, 1
    silent = next(r for r in records if (r.extra["layer"], r.extra["sublayer"]) == (1, "attention"))
    assert silent.extra["score"] == pytest.approx(0.0, abs=1e-6) and silent.extra["score_at_least"] is None
    assert all((r.extra["score"] is None) != (r.extra["score_at_least"] is None) for r in records)


# ---- the saved search ----------------------------------------------------------------------------------


def test_the_saved_search_round_trips_and_an_older_state_still_reads() -> None:
    result: SearchResult[Key] = SearchResult(
        steps=[Step((1, "mlp"), 0.1 / 3, 2, chunks=9, touched=4), Step((0, "attention"), 0.25, 1, chunks=5, touched=3)],
        first_scores={(1, "mlp"): 0.1 / 3}, first_bounds={(0, "attention"): 0.01, (0, "mlp"): 2.0},
        evaluations=3, chunk_evaluations=14, chunks=4, touched=7)
    candidates: list[Key] = [(0, "attention"), (0, "mlp"), (1, "attention"), (1, "mlp")]
    searched = Searched(candidates, result, {(1, "mlp"): 0.5}, 12.5, forwards=321)
    back = from_state(to_state(searched))
    assert back.result == result and back.candidates == candidates and back.forwards == 321
    assert back.seconds == {**dict.fromkeys(candidates, 0.0), (1, "mlp"): 0.5} and back.wall == 12.5
    older = {name: value for name, value in to_state(searched).items() if name not in ("first_bounds", "forwards")}
    older["step_evaluations"] = torch.tensor([2, 1])  # one count per step, two totals
    older["evaluations"] = torch.tensor([3, 0])
    old = from_state(older).result
    assert [(s.evaluations, s.chunks, s.touched) for s in old.steps] == [(2, 0, 0), (1, 0, 0)]
    assert (old.evaluations, old.chunk_evaluations, old.first_bounds) == (3, 0, {})
