"""FinerCut's screened search: the shortlist logic, its equivalences with the exact and lazy searches, row cuts."""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import pytest
import torch
from test_finercut import _KeptSearch, _oracle, run_cut, silence_sublayer
from test_layer_drop import TOKENS, deep_model, logits
from tiny import tiny_model

from compressor.engine import ModelContext, run_stages
from compressor.methods.prune.finercut import FinerCut, FinerCutConfig
from compressor.methods.prune.finercut.ops import greedy_removal, screened_removal
from compressor.methods.prune.finercut.search import _rows
from compressor.models import get_adapter

# ---- the search on oracles -----------------------------------------------------------------------------


def _counted(function: Callable[[str], float]) -> tuple[Callable[[str], float], list[str]]:
    calls: list[str] = []

    def counted(key: str) -> float:
        calls.append(key)
        return function(key)

    return counted, calls


def test_screened_search_is_the_exact_one_when_it_rescores_every_candidate() -> None:
    base = dict(zip("abcdefgh", [0.5, 0.1, 0.9, 0.3, 0.2, 0.8, 0.05, 0.4], strict=True))
    cost = dict.fromkeys(base, 1)
    exact = greedy_removal(list(base), cost, *_oracle(base, 0.3), count=5, lazy=False)
    evaluate, commit = _oracle(base, 0.3)
    screen, screened = _counted(lambda key: -base[key])  # a screen that ranks everything backwards
    result = screened_removal(list(base), cost, screen, evaluate, commit, count=5, top=len(base))
    assert [s.key for s in result.steps] == [s.key for s in exact.steps] == ["g", "b", "e", "d", "h"]
    assert [s.score for s in result.steps] == [s.score for s in exact.steps]
    assert screened == [] and result.screen_evaluations == 0 and result.first_scores == base


def test_the_screen_picks_the_shortlist_and_full_scores_pick_the_removal() -> None:
    full = {"a": 0.30, "b": 0.20, "c": 0.10, "d": 0.40}
    rough = {"a": 0.05, "b": 0.15, "c": 0.25, "d": 0.35}  # the screen misranks: c is the best, a only looks it
    cost = dict.fromkeys(full, 1)

    def pick(top: int) -> tuple[str, list[str]]:
        evaluate, evaluated = _counted(full.__getitem__)
        result = screened_removal(list(full), cost, rough.__getitem__, evaluate, lambda key: None, count=1, top=top)
        return result.steps[0].key, evaluated

    assert pick(1) == ("a", ["a"])  # only the screen's best gets a full score
    assert pick(2) == ("b", ["a", "b"])  # the better of the two shortlisted, by full score
    assert pick(3) == ("c", ["a", "b", "c"])  # the exact choice once it ranks in the screen's top


def test_screening_is_lazy_and_keeps_the_budget() -> None:
    base = dict(zip("abcdefgh", [0.5, 0.1, 0.9, 0.3, 0.2, 0.8, 0.05, 0.4], strict=True))
    cost = {key: 2 if key in "bg" else 1 for key in base}
    screen, screened = _counted(_oracle(base, 0.3)[0])
    evaluate, commit = _oracle(base, 0.3)
    result = screened_removal(list(base), cost, screen, evaluate, commit, budget=5, top=2)
    assert sum(cost[s.key] for s in result.steps) <= 5
    assert [s.key for s in result.steps] == ["g", "b", "e"]  # the exact order (the screen: first-step scores)
    assert len(screened) == result.screen_evaluations < len(base) * len(result.steps)
    assert screened[: len(base)] == list(base) and result.evaluations == 2 * len(result.steps)


# ---- on models ----------------------------------------------------------------------------------------


def test_screened_search_equals_exact_when_the_shortlist_covers_every_candidate() -> None:
    exact, _ = run_cut(deep_model("llama"), remove=4, search="exact")
    screened, _ = run_cut(deep_model("llama"), remove=4, search="screened", screen_samples=1, rescore_top=10)
    assert screened.structure["finercut"]["removed"] == exact.structure["finercut"]["removed"]
    assert screened.structure["finercut"]["screen_evaluations"] == 0


def test_a_screen_of_every_sequence_with_one_rescored_is_the_lazy_search() -> None:
    lazy, _ = run_cut(deep_model("qwen2"), remove=4, search="lazy", positions=8)
    screened, _ = run_cut(deep_model("qwen2"), remove=4, search="screened", screen_samples=4, rescore_top=1,
                          positions=8)
    lazy_removed, screened_removed = lazy.structure["finercut"]["removed"], screened.structure["finercut"]["removed"]
    assert [r[:2] for r in screened_removed] == [r[:2] for r in lazy_removed]
    assert [r[2] for r in screened_removed] == pytest.approx([r[2] for r in lazy_removed], rel=1e-5)


@pytest.mark.parametrize("search", ["exact", "screened"])
def test_both_searches_remove_a_silent_sublayer_first(search: str) -> None:
    model = deep_model("llama")
    silence_sublayer(model, 2, "attention")
    screening = {"screen_samples": 1, "rescore_top": 2} if search == "screened" else {}
    run, _ = run_cut(model, remove=1, search=search, **screening)
    ((index, kind, score),) = run.structure["finercut"]["removed"]
    assert (index, kind) == (2, "attention") and score == pytest.approx(0.0, abs=1e-6)


def _kl_from(reference_model: Any, model: Any, tokens: torch.Tensor) -> float:
    """Mean KL(original || pruned) over every position, from two whole-model forwards (the slow reference)."""
    p_log = torch.log_softmax(logits(reference_model, tokens).double(), dim=-1)
    q_log = torch.log_softmax(logits(model, tokens).double(), dim=-1)
    return float((p_log.exp() * (p_log - q_log)).sum(-1).mean())


def test_a_screen_scores_the_first_sequences_with_their_own_masks(monkeypatch: pytest.MonkeyPatch) -> None:
    """Screens cut batches (and a sliding-window layer's batch-shaped mask) to rows; full scores add the rest."""
    model = tiny_model("qwen2", use_sliding_window=True, sliding_window=4,
                       layer_types=["full_attention", "sliding_attention", "full_attention"])
    tokens = TOKENS[:, :16]
    original, cut = copy.deepcopy(model), copy.deepcopy(model)
    silence_sublayer(cut, 0, "attention")  # the scored run goes through the sliding-window layer's attention
    monkeypatch.setattr("compressor.methods.prune.finercut.SublayerSearch", _KeptSearch)
    _KeptSearch.made = []
    run = ModelContext(model, get_adapter(model), tokens, torch.device("cpu"), batch_size=3)
    run_stages(run, [FinerCut(FinerCutConfig(method="finercut", remove=0, positions=None, search="screened",
                                             screen_samples=2))])
    (search,) = _KeptSearch.made
    key = (0, "attention")
    plain = search.evaluate(key)  # nothing screened yet: every batch whole
    assert search.screen(key) == pytest.approx(_kl_from(original, cut, tokens[:2]), rel=1e-4)
    assert search.evaluate(key) == pytest.approx(_kl_from(original, cut, tokens), rel=1e-4)  # screened rows + the rest
    assert search.evaluate(key) == pytest.approx(plain, rel=1e-5)
    search.commit((2, "mlp"))  # removes it from ``model``; the screen scored before is stale now
    silence_sublayer(cut, 2, "mlp")
    assert search.evaluate(key) == pytest.approx(_kl_from(original, cut, tokens), rel=1e-4)


def test_only_batch_shaped_kwargs_are_cut_to_rows() -> None:
    batch, shared, mask = torch.arange(12.0).view(3, 4), torch.zeros(1, 4), torch.ones(3, 1, 4, 4)
    positions = torch.arange(3)  # 1-D: a cache position never has a batch dimension, even of the same size
    pair = _rows((batch, shared), (1, 3), 3)  # position embeddings come as a (cos, sin) pair
    assert torch.equal(pair[0], batch[1:3]) and pair[1] is shared
    assert _rows(mask, (0, 2), 3).shape == (2, 1, 4, 4)
    assert _rows(positions, (0, 2), 3) is positions and _rows(None, (0, 2), 3) is None
