"""Data-parallel calibration under ``torchrun``: the process group, the split of the data, the sums across processes.

``torchrun --nproc-per-node N -m compressor compress ...`` starts N processes with ``WORLD_SIZE``/``RANK`` (and
``MASTER_ADDR``/``MASTER_PORT``) set; :func:`process_group` joins them (gloo on CPU, NCCL on CUDA, one GPU per
local rank). Every process loads the model and builds the same calibration set, then keeps a contiguous share of
its *batches* (:func:`shard`): the first ``batches % N`` processes get one batch more. Splitting whole batches, not
sequences, keeps every batch exactly as one process would run it, so each batch's statistics are the same bits.

Statistics are sums: each process adds its batches' contributions in float64 (:class:`WeightedSum`, weighted by
the true token counts, so uneven shares are exact), the sums are all-reduced, and every process divides by the
total count. Every process then runs the same solver on the same statistics and gets the same weights; only rank
0 (:func:`is_writer`) writes. Partitioning the solver work across processes is a later step. Without torchrun
(``WORLD_SIZE`` unset or 1) everything here is the identity: one process is a world of one.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, TypeVar

import torch
import torch.distributed as dist

from compressor.errors import RecipeError, UnsupportedModelError, UsageError

if TYPE_CHECKING:
    from compressor.methods.base import Method
    from compressor.models.base import ModelAdapter
    from compressor.recipe import CalibrationConfig

log = logging.getLogger(__name__)
T = TypeVar("T")


def launched_world_size() -> int:
    """Processes torchrun started (``WORLD_SIZE``), 1 without torchrun."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_distributed() -> bool:
    """True inside :func:`process_group` with more than one process."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def rank() -> int:
    """This process's rank: the process group's, else ``RANK`` (so a CLI can go quiet before the group exists)."""
    return dist.get_rank() if is_distributed() else int(os.environ.get("RANK", "0"))


def is_writer() -> bool:
    """Rank 0 writes the output, the report and the console output; the others only compute."""
    return rank() == 0


@contextmanager
def process_group(device: str) -> Iterator[str]:
    """Join torchrun's processes for the block (when ``WORLD_SIZE`` > 1); yields this process's ``--device``.

    gloo for CPU tensors, NCCL for CUDA ones (then each process takes GPU ``LOCAL_RANK``: ``cuda`` becomes
    ``cuda:<LOCAL_RANK>``). Without torchrun ``device`` comes back as given. A group that is already up (a
    caller's own) is used and left up; one made here is destroyed on exit.
    """
    if launched_world_size() <= 1 or dist.is_initialized():
        yield device
        return
    from compressor.models.loading import resolve_device

    target = resolve_device(device)
    if target.type == "cuda":
        target = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(target)
    dist.init_process_group(backend="nccl" if target.type == "cuda" else "gloo")
    log.info("rank %d of %d on %s", dist.get_rank(), dist.get_world_size(), target)
    try:
        yield str(target)
    finally:
        dist.destroy_process_group()


def barrier() -> None:
    """Wait for every process (nothing in one process)."""
    if is_distributed():
        dist.barrier()


def all_reduce_sum_float64(tensor: torch.Tensor) -> torch.Tensor:
    """The sum of ``tensor`` over every process, in float64 (a float64 copy in one process); same shape."""
    total = tensor.to(torch.float64, copy=True)
    if is_distributed():
        dist.all_reduce(total, op=dist.ReduceOp.SUM)
    return total


def shard(items: Sequence[T], part: int | None = None, parts: int | None = None) -> Sequence[T]:
    """Process ``part``'s contiguous share of ``items`` (default: this process of this world).

    The first ``len(items) % parts`` shares hold one item more: 5 batches on 2 processes are 3 + 2.
    """
    part, parts = rank() if part is None else part, world_size() if parts is None else parts
    size, extra = divmod(len(items), parts)
    start = part * size + min(part, extra)
    return items[start : start + size + (part < extra)]


def shard_batches(tokens: torch.Tensor, batch_size: int) -> torch.Tensor:
    """This process's calibration sequences ``[n, L]``: whole batches of ``batch_size``, a contiguous share.

    A share starts on a batch boundary, so iterating it in ``batch_size`` steps gives exactly the batches one
    process would run (the short last batch stays last).
    """
    starts = shard(range(0, tokens.shape[0], batch_size))
    if len(starts) == 0:
        return tokens[:0]
    return tokens[starts[0] : starts[-1] + batch_size]


@dataclass
class WeightedSum:
    """``sum_b n_b m_b`` of per-batch means ``m_b`` (each over ``n_b`` items) and ``sum_b n_b``, in float64.

    A float32 batch mean times an integer count is exact in float64, and sums of such terms barely round, so the
    total does not depend on how batches were split across processes: :meth:`mean` all-reduces both sums and
    divides, giving the one-process mean (to ~1e-16) however uneven the shares are.
    """

    total: torch.Tensor | None = None
    count: int = 0

    def add(self, mean: torch.Tensor, count: int) -> None:
        """Fold one batch's ``mean`` over ``count`` items (``count`` 0 only fixes the shape)."""
        if self.total is None:
            self.total = mean.to(torch.float64) * count
        else:
            self.total.add_(mean, alpha=count)  # in float64: the product of a float32 and an integer is exact
        self.count += count

    def mean(self) -> torch.Tensor | None:
        """The mean over every process's items (float64); None when nothing was added here.

        Every process must call it in the same order (it all-reduces); NaN when no process saw any item.
        """
        if self.total is None:
            return None
        count = all_reduce_sum_float64(torch.tensor([self.count], device=self.total.device))
        return all_reduce_sum_float64(self.total) / count


def check_recipe(stages: list[Method], calibration: CalibrationConfig, resume: bool) -> None:
    """Refuse, before any loading, what data-parallel calibration cannot do yet (one line each; none in one process)."""
    world = world_size()
    if world == 1:
        return
    for index, stage in enumerate(stages):
        if not stage.supports_distributed:
            raise RecipeError(f"stages.{index} ({stage.name}): does not support data-parallel calibration yet "
                              f"(WORLD_SIZE={world}); run it in one process (only gptq and rtn split the data)")
    batches = -(-calibration.samples // calibration.batch_size)
    if batches < world:
        raise RecipeError(f"calibration: {calibration.samples} samples in batches of {calibration.batch_size} make "
                          f"{batches} batches, fewer than the {world} processes; lower batch_size or add samples")
    if resume:
        raise UsageError(f"--resume: checkpoints hold one process's activations; resume in one process, not "
                         f"WORLD_SIZE={world}")


def check_model(model: torch.nn.Module, adapter: ModelAdapter) -> None:
    """Refuse models whose per-process statistics are not yet combined across processes (none in one process)."""
    if world_size() == 1:
        return
    if adapter.num_experts:
        raise UnsupportedModelError(f"{type(model).__name__}: mixture-of-experts routing counts are per process; "
                                    f"compress it in one process (WORLD_SIZE={world_size()})")
    if any(p.dtype == torch.float16 for p in model.parameters()):
        raise UnsupportedModelError(f"{type(model).__name__} is float16, whose overflow check runs on each "
                                    "process's share; pass --dtype bfloat16 or float32, or use one process")
