"""What the model's own forward hands its decoder layers: captured once per pass, replayed layer by layer.

``capture_inputs`` swaps every decoder layer's forward for a recorder, runs the calibration batches through the
model and keeps layer 0's hidden states plus each layer's keyword arguments; the engine then runs one layer at a
time on them. :func:`patched_forwards` and :class:`StopForward` are the two tools it needs for that, and the
engine's statistics hooks use them too (a forward stopped at the module whose inputs were wanted).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
from torch import nn

from compressor.errors import UnsupportedModelError
from compressor.models.base import ModelAdapter


class StopForward(Exception):
    """Raised from a hook once everything needed from a forward pass was seen."""


@dataclass
class CapturedBatch:
    """Inputs of one decoder layer for one calibration batch: ``hidden: [B, L, H]`` plus kwargs."""

    hidden: torch.Tensor
    kwargs: dict[str, Any]


@dataclass
class CapturedInputs:
    """What the model's own forward hands its decoder layers, for every calibration batch.

    ``hidden[b]``: layer 0's hidden input (the embeddings' output); ``kwargs[i][b]``: layer ``i``'s keyword
    arguments. The model builds each mask (and the position embeddings) once per forward and passes the
    same tensor object to every layer of a type, so per-layer kwargs are references, not copies.
    """

    hidden: list[torch.Tensor]
    kwargs: list[list[dict[str, Any]]]

    def layer(self, index: int, hidden: list[torch.Tensor] | None = None) -> list[CapturedBatch]:
        """Inputs of layer ``index``: ``hidden`` (default: layer 0's) with that layer's own kwargs."""
        states = self.hidden if hidden is None else hidden
        return [CapturedBatch(h, kwargs) for h, kwargs in zip(states, self.kwargs[index], strict=True)]


@dataclass
class FloatReference:
    """The float model's side of a layer for asymmetric statistics (``engine.LayerContext.asymmetric_hessian``)."""

    #: The layer as it was before the stage changed it (a copy: the stage quantizes the live one in place).
    layer: nn.Module
    #: Per batch: the float model's hidden states entering this layer (the live layer gets the quantized prefix's).
    hidden: list[torch.Tensor]


@contextmanager
def patched_forwards(patches: Mapping[nn.Module, Callable[..., Any]]) -> Iterator[None]:
    """Give modules another ``forward`` (an instance attribute) for the block, then restore what was there.

    An existing instance attribute (accelerate's offload hooks put one there) is put back, not deleted.
    """
    saved = {module: vars(module).get("forward") for module in patches}
    for module, forward in patches.items():
        module.forward = forward
    try:
        yield
    finally:
        for module, previous in saved.items():
            if previous is None:
                del module.forward
            else:
                module.forward = previous


def capture_inputs(model: nn.Module, adapter: ModelAdapter, batches: Iterator[torch.Tensor]) -> CapturedInputs:
    """What the model's own forward gives each decoder layer, for each token batch.

    Every layer's forward is swapped for a recorder that keeps its kwargs and returns the hidden states
    untouched, so no layer computes (none needs to be on the device) and each gets exactly the mask and
    position embeddings of its own attention type; the last layer's recorder stops the forward before
    the final norm and head.
    """
    layers = list(adapter.layers())
    captured = CapturedInputs([], [[] for _ in layers])

    def record(index: int, *args: Any, **kwargs: Any) -> torch.Tensor:
        hidden = args[0] if args else kwargs.pop("hidden_states")
        if index == 0:
            captured.hidden.append(hidden.detach())
        kwargs = {k: v for k, v in kwargs.items() if k not in ("past_key_values", "past_key_value")}
        captured.kwargs[index].append({**kwargs, "use_cache": False})
        if index == len(layers) - 1:
            raise StopForward
        return hidden

    with patched_forwards({layer: partial(record, i) for i, layer in enumerate(layers)}), torch.no_grad():
        for tokens in batches:
            try:
                model(input_ids=tokens, use_cache=False)
            except StopForward:
                pass
            ran = [len(kwargs) for kwargs in captured.kwargs]
            if ran != [len(captured.hidden)] * len(layers):
                raise UnsupportedModelError(
                    f"{type(model).__name__}'s forward called its {len(layers)} decoder layers {ran} times for "
                    f"{len(captured.hidden)} batches: cannot capture each layer's inputs"
                )
    return captured
