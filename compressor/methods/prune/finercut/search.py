"""The state FinerCut's greedy search works on: cached hidden states and trial removals of sublayers.

``states[l][b]`` holds calibration batch ``b``'s hidden states entering decoder layer ``l`` of the model as
pruned so far (``states[L]``: after the last layer); ``kwargs[l][b]`` the keyword arguments the model's own
forward gives layer ``l`` (a sliding-window layer's mask differs from a full-attention layer's). A trial
removal in layer ``i`` only changes what comes after it, so a candidate is scored by running ``states[i]``
through layers ``i..L-1`` alone; committing a removal recomputes only ``states[i+1..L]``. The original
model's outputs are kept once, at the scored positions, as the reference every candidate is compared with.
"""

from __future__ import annotations

import time
from typing import Any

import torch
from torch import nn

from compressor.methods.prune.finercut.ops import Measure, divergence, reference
from compressor.models.base import ModelAdapter
from compressor.models.shipped.modeling_finercut import remove_sublayer

Key = tuple[int, str]


class SublayerSearch:
    """Scores and commits sublayer removals for :func:`~.ops.greedy_removal`."""

    def __init__(
        self, adapter: ModelAdapter, states: list[list[torch.Tensor]], kwargs: list[list[dict[str, Any]]],
        positions: torch.Tensor, measure: Measure,
    ) -> None:
        self.adapter = adapter
        self.layers = list(adapter.layers())
        self.layout = adapter.family.layout()
        self.states = states
        self.kwargs = kwargs
        self.positions = positions
        self.measure = measure
        self.references = [reference(self._output(h), measure) for h in states[-1]]
        #: Seconds spent scoring each candidate, summed over steps (for the report).
        self.seconds: dict[Key, float] = {}

    def _output(self, hidden: torch.Tensor) -> torch.Tensor:
        """What the measure compares at the scored positions: logits (kl, js) or final hidden states."""
        hidden = hidden[:, self.positions.to(hidden.device)]
        if self.measure == "cosine":
            for module in self.adapter.after_layers():
                hidden = module(hidden)
            return hidden
        return self.adapter.logits(hidden)

    def _run(self, start: int, hidden: torch.Tensor, batch: int) -> torch.Tensor:
        for index in range(start, len(self.layers)):
            hidden = self._run_one(index, hidden, batch)
        return hidden

    @torch.no_grad()
    def evaluate(self, key: Key) -> float:
        """Mean divergence from the original outputs with sublayer ``key`` removed on top of the committed ones."""
        start = time.perf_counter()
        index, sublayer = key
        layer = self.layers[index]
        replaced = remove_sublayer(layer, self.layout, sublayer)
        total, tokens = 0.0, 0
        try:
            for batch, (hidden, ref) in enumerate(zip(self.states[index], self.references, strict=True)):
                part, count = divergence(ref, self._output(self._run(index, hidden, batch)), self.measure)
                total, tokens = total + part, tokens + count
        finally:
            for path, module in replaced.items():
                layer.set_submodule(path, module)
        self.seconds[key] = self.seconds.get(key, 0.0) + time.perf_counter() - start
        return total / max(tokens, 1)

    @torch.no_grad()
    def commit(self, key: Key) -> None:
        """Remove sublayer ``key`` for good and recompute the hidden states after its layer."""
        index, sublayer = key
        remove_sublayer(self.layers[index], self.layout, sublayer)
        for b in range(len(self.references)):
            hidden = self.states[index][b]
            for j in range(index, len(self.layers)):
                hidden = self._run_one(j, hidden, b)
                self.states[j + 1][b] = hidden

    def _run_one(self, index: int, hidden: torch.Tensor, batch: int) -> torch.Tensor:
        """Layer ``index`` on batch ``batch``'s hidden states, with the kwargs that layer gets for that batch."""
        out = self.layers[index](hidden, **self.kwargs[index][batch])
        return out[0] if isinstance(out, tuple) else out


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
