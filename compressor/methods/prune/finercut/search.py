"""The state FinerCut's greedy search works on: cached hidden states and trial removals of sublayers.

``states[l][b]`` holds calibration batch ``b``'s hidden states entering decoder layer ``l`` of the model as
pruned so far (``states[L]``: after the last layer); ``kwargs[l][b]`` the keyword arguments the model's own
forward gives layer ``l`` (a sliding-window layer's mask differs from a full-attention layer's). A trial
removal in layer ``i`` only changes what comes after it, so a candidate is scored by running ``states[i]``
through layers ``i..L-1`` alone; committing a removal recomputes only ``states[i+1..L]``. The original
model's outputs are kept once, at the scored positions, as the reference every candidate is compared with.

A screen scores a candidate on the first ``screen_samples`` calibration sequences only (rows of the cached
batches; the layers' batch-shaped kwargs are cut to the same rows). Its divergence sum is kept until the next
commit, so a full evaluation of a screened candidate runs only the remaining sequences.

The bounded search (``ops.bounded_removal``) scores a candidate one chunk at a time: ``chunk_rows`` sequences
of one batch (:meth:`score_chunk`). :meth:`evaluate` then sums the same chunks in the same order, so a complete
chunked score is bit for bit the full one. Work is counted in layer forwards of one sequence (``forwards``).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from compressor.methods.prune.finercut.ops import Measure, divergence, reference
from compressor.models.base import ModelAdapter
from compressor.models.shipped.modeling_finercut import remove_sublayer

Key = tuple[int, str]
#: Rows ``start:stop`` of calibration batch ``batch``: ``(batch, start, stop)``.
Part = tuple[int, int, int]


class SublayerSearch:
    """Scores, screens and commits sublayer removals for :func:`~.ops.greedy_removal` and
    :func:`~.ops.screened_removal`.

    ``screen_samples``: how many sequences :meth:`screen` uses (None: no screening, every score is full).
    ``chunk_rows``: sequences per chunk of :meth:`score_chunk` and :meth:`evaluate` (None: whole batches).
    ``store(cached, new)``: what takes a cached state's place when a commit recomputes it (None: ``new``; a
    :class:`~.cache.StateCache` in files writes ``new`` into ``cached``'s file).
    """

    def __init__(
        self, adapter: ModelAdapter, states: list[list[torch.Tensor]], kwargs: list[list[dict[str, Any]]],
        positions: torch.Tensor, measure: Measure, screen_samples: int | None = None, chunk_rows: int | None = None,
        store: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    ) -> None:
        self.adapter = adapter
        self.layers = list(adapter.layers())
        self.layout = adapter.family.layout()
        self.states = states
        self.kwargs = kwargs
        self.positions = positions
        self.measure = measure
        self.store = store or _replaced
        self.references = [reference(self._output(h), measure) for h in states[-1]]
        #: Seconds spent scoring each candidate, summed over steps (for the report).
        self.seconds: dict[Key, float] = {}
        rows = [h.shape[0] for h in states[0]]
        self._screen, self._rest = _split_rows(rows, sum(rows) if screen_samples is None else screen_samples)
        #: The row ranges a full score sums over, in order: whole batches, or chunks of ``chunk_rows`` sequences.
        self.chunks: list[Part] = [(batch, first, min(first + (chunk_rows or size), size))
                                   for batch, size in enumerate(rows) for first in range(0, size, chunk_rows or size)]
        #: Scored tokens of a full score (every candidate's score divides its divergence sum by this).
        self.tokens = max(sum(ref.numel() // ref.shape[-1] for ref in self.references), 1)
        #: Layer forwards of one sequence spent scoring (commits not included).
        self.forwards = 0
        #: A screen's (divergence sum, tokens) per candidate, valid until the next commit.
        self._screened: dict[Key, tuple[float, int]] = {}

    def _output(self, hidden: torch.Tensor) -> torch.Tensor:
        """What the measure compares at the scored positions: logits (kl, js) or final hidden states."""
        hidden = hidden[:, self.positions.to(hidden.device)]
        if self.measure == "cosine":
            for module in self.adapter.after_layers():
                hidden = module(hidden)
            return hidden
        return self.adapter.logits(hidden)

    def _run(self, start: int, hidden: torch.Tensor, batch: int, rows: tuple[int, int] | None = None) -> torch.Tensor:
        """Layers ``start..L-1`` on ``hidden``: batch ``batch``'s states, or its rows ``rows`` (start, stop)."""
        for index in range(start, len(self.layers)):
            hidden = self._run_one(index, hidden, batch, rows)
        return hidden

    def evaluate(self, key: Key) -> float:
        """Mean divergence from the original outputs with sublayer ``key`` removed on top of the committed ones."""
        if key in self._screened:  # its screened rows are scored already: run the others
            total, tokens = self._screened[key]
            part, count = self._score(key, self._rest)
            return (total + part) / max(tokens + count, 1)
        total, tokens = self._score(key, self.chunks)
        return total / max(tokens, 1)

    def score_chunk(self, key: Key, chunk: int) -> float:
        """Divergence summed over chunk ``chunk`` (of :attr:`chunks`) with sublayer ``key`` removed (>= 0)."""
        return self._score(key, [self.chunks[chunk]])[0]

    def screen(self, key: Key) -> float:
        """:meth:`evaluate` on the screened sequences alone."""
        total, tokens = self._screened[key] = self._score(key, self._screen)
        return total / max(tokens, 1)

    @torch.no_grad()
    def _score(self, key: Key, parts: list[Part]) -> tuple[float, int]:
        """(divergence sum, tokens) over ``parts`` with sublayer ``key`` removed on top of the committed ones."""
        start = time.perf_counter()
        index, sublayer = key
        layer = self.layers[index]
        replaced = remove_sublayer(layer, self.layout, sublayer)
        total, tokens = 0.0, 0
        try:
            for batch, first, stop in parts:
                hidden = self._run(index, self.states[index][batch][first:stop], batch, (first, stop))
                part, count = divergence(self.references[batch][first:stop], self._output(hidden), self.measure)
                total, tokens = total + part, tokens + count
                self.forwards += (stop - first) * (len(self.layers) - index)
        finally:
            for path, module in replaced.items():
                layer.set_submodule(path, module)
        self.seconds[key] = self.seconds.get(key, 0.0) + time.perf_counter() - start
        return total, tokens

    @torch.no_grad()
    def baseline(self) -> list[float]:
        """The model as it is (no candidate removed): its cached outputs' divergence from the original's, summed
        per chunk of :attr:`chunks` as a candidate's chunk scores are. It costs the output head alone."""
        return [divergence(self.references[batch][first:stop], self._output(self.states[-1][batch][first:stop]),
                           self.measure)[0] for batch, first, stop in self.chunks]

    @torch.no_grad()
    def recompute(self) -> None:
        """Every layer's cached states again from layer 0's, and the references from them.

        For a search in another precision (bfloat16 autocast): the cached states were computed in float32, so a
        candidate's run (cached prefix + its suffix in bfloat16) would differ from a float32 reference, and from a
        bfloat16 one, by rounding that depends on where the candidate sits. Recomputed under the same autocast, every
        candidate differs from the reference by its removal alone.
        """
        self._states_after(0)
        self.references = [reference(self._output(h), self.measure) for h in self.states[-1]]

    @torch.no_grad()
    def commit(self, key: Key) -> None:
        """Remove sublayer ``key`` for good and recompute the hidden states after its layer."""
        index, sublayer = key
        remove_sublayer(self.layers[index], self.layout, sublayer)
        self._screened.clear()
        self._states_after(index)

    def _states_after(self, index: int) -> None:
        """``states[index + 1 ..]`` again, from ``states[index]`` through the layers as they are now."""
        for b in range(len(self.references)):
            hidden = self.states[index][b]
            for j in range(index, len(self.layers)):
                hidden = self._run_one(j, hidden, b)
                self.states[j + 1][b] = self.store(self.states[j + 1][b], hidden)

    def _run_one(
        self, index: int, hidden: torch.Tensor, batch: int, rows: tuple[int, int] | None = None
    ) -> torch.Tensor:
        """Layer ``index`` on batch ``batch``'s hidden states (or its rows ``rows``), with that layer's kwargs."""
        kwargs = self.kwargs[index][batch]
        size = self.states[index][batch].shape[0]
        if rows is not None and rows != (0, size):
            kwargs = {name: _rows(value, rows, size) for name, value in kwargs.items()}
        out = self.layers[index](hidden, **kwargs)
        return out[0] if isinstance(out, tuple) else out


def _replaced(cached: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
    return new


def _rows(value: Any, rows: tuple[int, int], size: int) -> Any:
    """``value`` (a layer kwarg of a batch of ``size`` sequences) for sequences ``rows`` (start, stop) alone.

    Batch-shaped tensors (at least 2-D, ``size`` first: masks, position ids and embeddings) are cut; tensors
    shared by the batch (first dimension 1, or 1-D such as cache positions) and everything else pass as they are.
    """
    if isinstance(value, torch.Tensor):
        return value[rows[0] : rows[1]] if value.dim() >= 2 and value.shape[0] == size else value
    if isinstance(value, tuple):
        return tuple(_rows(item, rows, size) for item in value)
    return value


def _split_rows(rows: list[int], screened: int) -> tuple[list[Part], list[Part]]:
    """(the first ``screened`` sequences, the others) of batches of ``rows`` sequences each, as row ranges."""
    screen: list[Part] = []
    rest: list[Part] = []
    for batch, size in enumerate(rows):
        cut = min(max(screened, 0), size)
        if cut:
            screen.append((batch, 0, cut))
        if cut < size:
            rest.append((batch, cut, size))
        screened -= cut
    return screen, rest


def sublayer_params(layer: nn.Module, layout: dict[str, Any], sublayer: str) -> tuple[int, int]:
    """(parameters, bytes) that removing ``sublayer`` from ``layer`` frees (the layer is left unchanged).

    ``layout``: the family's :meth:`~compressor.models.base.Family.layout`.
    """
    replaced = remove_sublayer(layer, layout, sublayer)
    for path, module in replaced.items():
        layer.set_submodule(path, module)
    seen: dict[int, torch.Tensor] = {}
    for module in replaced.values():
        for param in module.parameters():
            seen[id(param)] = param
    return sum(p.numel() for p in seen.values()), sum(p.numel() * p.element_size() for p in seen.values())
