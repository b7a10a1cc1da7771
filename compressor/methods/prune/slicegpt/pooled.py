"""The ``shared`` scheme's statistics: the stream's covariance pooled over every block input of the unsliced model.

Measured layer by layer over the captured calibration inputs, as the engine's passes run, rather than by forwards of
the whole model: a streamed run (each layer loaded, folded, measured and released before the pass that rotates it)
then sums the same tensors in the same order as an in-RAM one, and picks the same basis bit for bit.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
from torch import nn

from compressor.methods.prune.slicegpt import ops

if TYPE_CHECKING:
    from compressor.engine import ModelContext


@torch.no_grad()
def pooled_covariance(run: ModelContext, layer_at: Callable[[int], nn.Module],
                      done: Callable[[int], None]) -> torch.Tensor:
    """Covariance of the inputs of every layer's two norms and of the final norm, each token at unit RMS.

    ``layer_at(i)``: decoder layer ``i`` folded and rebuilt (rotation-ready, not rotated); ``done(i)``: it was
    measured (a streamed run releases it).
    """
    from compressor.engine import LayerContext, _move_embeddings

    adapter = run.adapter
    state: dict[str, torch.Tensor | None] = {"cov": None}

    def fold(module: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
        state["cov"] = ops.accumulate_covariance(state["cov"], args[0], normalize=True)

    _move_embeddings(adapter, run.device)
    captured = run.capture_inputs()
    _move_embeddings(adapter, torch.device("cpu"))
    hidden = captured.hidden if run.stream is None else run.stream.keep(captured.hidden)
    for index in range(adapter.num_layers):
        layer = layer_at(index).to(run.device)
        handles = [norm.register_forward_pre_hook(fold) for norm in (adapter.attention_norm(layer),
                                                                      adapter.mlp_norm(layer))]
        try:
            ctx = LayerContext(index, layer, run, captured.layer(index, hidden))
            hidden = ctx.forward(run.stream.sink(hidden) if run.stream else None)
        finally:
            for handle in handles:
                handle.remove()
        layer.to("cpu")
        done(index)
    for out in hidden:
        fold(adapter.final_norm(), (out,))
    assert state["cov"] is not None
    return state["cov"]
