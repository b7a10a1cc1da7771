"""Every covariance SliceGPT decomposes, measured over the calibration set, and the basis taken from each.

Kept apart from ``__init__.py`` (the method: widths, rotations, records) because measuring is its own concern:
hooks that fold a module's inputs into a float64 ``X^T X`` sum, forwards stopped once the statistic is in, and,
under torchrun, the sum over every process's share before one process decomposes it for all
(:func:`principal_basis`). The first basis comes from :func:`stream_covariance` (``shared``: the pooled sweep of
``pooled.py``; ``per_layer``: layer 0's input), ``per_layer``'s later bases from :func:`input_covariance` and the
layer's outputs.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from compressor.distributed import Job, all_reduce_sum_float64, is_distributed, solve_partitioned
from compressor.methods.prune.slicegpt import ops
from compressor.methods.prune.slicegpt.invariance import convert_layer
from compressor.methods.prune.slicegpt.pooled import pooled_covariance

if TYPE_CHECKING:
    from compressor.engine import LayerContext, ModelContext


def principal_basis(cov: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``ops.principal_basis`` of this process's covariance summed over every process's calibration batches.

    Under torchrun one process decomposes and broadcasts (``solve_partitioned``): LAPACK/cuSOLVER on other
    hardware or thread counts may round differently, and a near-degenerate eigenpair would then turn the kept
    subspace differently on each process, where the rotation must be the same bits everywhere. An error (a
    non-finite covariance) is raised on every process, so none waits.
    """
    total = _summed_over_processes(cov)
    return solve_partitioned([Job(float(total.shape[0]) ** 3, lambda: ops.principal_basis(total))])[0]


def _summed_over_processes(cov: torch.Tensor) -> torch.Tensor:
    """``cov`` (a float64 sum over this process's tokens) summed over every process; itself in one.

    Raw sums need no token counts: the total is the one-process sum up to float64 rounding (~1e-16).
    """
    return all_reduce_sum_float64(cov) if is_distributed() else cov  # on the wire device NCCL needs


def input_covariance(ctx: LayerContext, module: nn.Module) -> torch.Tensor:
    """Covariance of ``module``'s input over the calibration set (the forward stops there)."""
    state: dict[str, torch.Tensor | None] = {"cov": None}

    def fold(x: torch.Tensor) -> None:
        state["cov"] = ops.accumulate_covariance(state["cov"], x)

    ctx.collect_inputs(module, fold)
    assert state["cov"] is not None
    return state["cov"]


def stream_covariance(run: ModelContext, rotation: str) -> torch.Tensor:
    """The covariance the first basis comes from: pooled over every block input (shared), or layer 0's input."""
    adapter = run.adapter
    if rotation == "per_layer":
        return _entry_covariance(run, adapter.attention_norm(adapter.layers()[0]))
    stream, config = run.stream, run.model.config
    if stream is None:
        return pooled_covariance(run, adapter.layers().__getitem__, lambda index: None)
    # streamed: each layer loaded, folded as apply will fold it, measured and released
    return pooled_covariance(run, lambda index: convert_layer(adapter, stream.load(index), index, config),
                             stream.release)


class _Stop(Exception):
    """Ends a forward pass once the statistic was collected."""


@torch.no_grad()
def _entry_covariance(run: ModelContext, stop: nn.Module) -> torch.Tensor:
    """Covariance of ``stop``'s input (raw, not normalized), each forward pass ending there (before layer 0 runs).

    Runs the calibration set through the model where it is: the engine moves layers to the device only later. A
    streamed model's layers are on meta, which is never reached.
    """
    state: dict[str, torch.Tensor | None] = {"cov": None}

    def hook(module: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
        state["cov"] = ops.accumulate_covariance(state["cov"], args[0])
        raise _Stop

    handle = stop.register_forward_pre_hook(hook)
    device = next(run.adapter.embeddings()[0].parameters()).device  # (a streamed model's head is on meta)
    try:
        for start in range(0, run.tokens.shape[0], run.batch_size):
            try:
                run.model(input_ids=run.tokens[start : start + run.batch_size].to(device), use_cache=False)
            except _Stop:
                pass
    finally:
        handle.remove()
    assert state["cov"] is not None
    return state["cov"]
