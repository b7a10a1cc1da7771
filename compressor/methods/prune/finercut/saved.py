"""A finished FinerCut search as checkpoint tensors, so a resumed run re-applies it without searching again."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from compressor.methods.prune.finercut.cache import CacheSummary
from compressor.methods.prune.finercut.ops import SearchResult, Step
from compressor.methods.prune.finercut.search import Key
from compressor.models.shipped.modeling_finercut import SUBLAYERS

#: The order of the counts in the state's ``evaluations`` tensor (a state saved before the bounded search
#: holds only the first two; the others read as 0).
_COUNTS = ("evaluations", "screen_evaluations", "chunk_evaluations", "chunks", "touched")


@dataclass
class Searched:
    """A finished search: all ``finalize`` needs to redo its removals, rows and summary without searching."""

    candidates: list[Key]
    result: SearchResult[Key]
    #: Seconds spent scoring each candidate (the rows' times); ``wall``: the whole search's.
    seconds: dict[Key, float]
    wall: float
    #: Layer forwards of one calibration sequence spent scoring candidates.
    forwards: int = 0
    #: Where the search's hidden-state cache was (None: a state saved before the cache could go to files).
    cache: CacheSummary | None = None


def _keys(keys: list[Key]) -> torch.Tensor:
    """``int64 [N, 2]``: (layer index, index into SUBLAYERS) per key."""
    return torch.tensor([[index, SUBLAYERS.index(sublayer)] for index, sublayer in keys], dtype=torch.int64).view(-1, 2)


def _per_candidate(values: dict[Key, float], candidates: list[Key]) -> torch.Tensor:
    """``float64 [N]``: the exact Python floats in candidate order, NaN for a candidate without a value."""
    return torch.tensor([values.get(k, math.nan) for k in candidates], dtype=torch.float64)


def to_state(searched: Searched) -> dict[str, torch.Tensor]:
    """The search as tensors."""
    result, candidates = searched.result, searched.candidates
    return {
        "candidates": _keys(candidates),
        "removed": _keys([step.key for step in result.steps]),
        "scores": torch.tensor([step.score for step in result.steps], dtype=torch.float64),
        "step_evaluations": torch.tensor([[s.evaluations, s.chunks, s.touched] for s in result.steps],
                                         dtype=torch.int64).view(-1, 3),
        "first_scores": _per_candidate(result.first_scores, candidates),
        "first_bounds": _per_candidate(result.first_bounds, candidates),
        "candidate_seconds": _per_candidate(searched.seconds, candidates).nan_to_num(0.0),
        "evaluations": torch.tensor([getattr(result, name) for name in _COUNTS], dtype=torch.int64),
        "forwards": torch.tensor([searched.forwards], dtype=torch.int64),
        "wall": torch.tensor([searched.wall], dtype=torch.float64),
        **_cache_state(searched.cache),
    }


def _cache_state(cache: CacheSummary | None) -> dict[str, torch.Tensor]:
    """``int64 [3]``: (in files, bytes, limit or -1); nothing when the search did not say."""
    if cache is None:
        return {}
    limit = -1 if cache.limit is None else cache.limit
    return {"state_cache": torch.tensor([int(cache.mapped), cache.bytes, limit], dtype=torch.int64)}


def from_state(state: dict[str, torch.Tensor]) -> Searched:
    """:func:`to_state`'s inverse (also reads a state saved before the bounded search)."""
    def keys(name: str) -> list[Key]:
        return [(index, SUBLAYERS[kind]) for index, kind in state[name].tolist()]

    def per_candidate(name: str) -> dict[Key, float]:
        if name not in state:
            return {}
        return {k: v for k, v in zip(candidates, state[name].tolist(), strict=True) if not math.isnan(v)}

    candidates, removed = keys("candidates"), keys("removed")
    per_step = state["step_evaluations"]
    counts = (per_step.view(-1, 1) if per_step.dim() == 1 else per_step).tolist()
    scores = state["scores"].tolist()
    steps = [Step(key, score, *count) for key, score, count in zip(removed, scores, counts, strict=True)]
    totals = dict(zip(_COUNTS, state["evaluations"].tolist(), strict=False))
    result = SearchResult(steps=steps, first_scores=per_candidate("first_scores"),
                          first_bounds=per_candidate("first_bounds"), **totals)
    seconds = dict(zip(candidates, state["candidate_seconds"].tolist(), strict=True))
    forwards = int(state["forwards"].item()) if "forwards" in state else 0
    cache = None
    if "state_cache" in state:
        mapped, size, limit = state["state_cache"].tolist()
        cache = CacheSummary(bool(mapped), size, None if limit < 0 else limit)
    return Searched(candidates, result, seconds, float(state["wall"].item()), forwards, cache)
