"""Data-parallel calibration under ``torchrun``: the process group, the split of the data, the sums across processes.

``torchrun --nproc-per-node N -m compressor compress ...`` starts N processes with ``WORLD_SIZE``/``RANK`` (and
``MASTER_ADDR``/``MASTER_PORT``) set; :func:`process_group` joins them (gloo on CPU, NCCL on CUDA, one GPU per
local rank). Every process loads the model and builds the same calibration set, then keeps a contiguous share of
its *batches* (:func:`shard`): the first ``batches % N`` processes get one batch more. Splitting whole batches, not
sequences, keeps every batch exactly as one process would run it, so each batch's statistics are the same bits.

Statistics are sums: each process adds its batches' contributions in float64 (:class:`WeightedSum`, weighted by
the true token counts, so uneven shares are exact), the sums are all-reduced, and every process divides by the
total count. The per-module solver work that follows (a GPTQ column sweep, a weighted scale search) is split:
:func:`solve_partitioned` gives each module's :class:`Job` one owner process (:func:`owners`, largest cost first
onto the least-loaded process), the owners solve in parallel, and each result is broadcast from its owner, so every
process continues with the same weights (the same bits as one process, as each solve is the same computation on
the same statistics). Only rank 0 (:func:`is_writer`) writes. Without torchrun (``WORLD_SIZE`` unset or 1)
everything here is the identity: one process is a world of one.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import os
import pickle
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Generic, TypeVar

import torch
import torch.distributed as dist

from compressor.errors import NumericalError, RecipeError, UnsupportedModelError, UsageError

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


def wire_device() -> torch.device:
    """Where the process group's collectives take tensors: this process's GPU under NCCL, else the CPU."""
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def failures_elsewhere(failed: bool) -> int:
    """How many *other* processes say they failed at this point (0 in one process).

    Every process must call it at the same point of the run, failed or not: a process that raised alone would
    leave the others waiting in their next collective until the backend's timeout, so each checks here first and
    all of them raise together.
    """
    if not is_distributed():
        return 0
    status = all_reduce_sum_float64(torch.tensor([float(failed)], device=wire_device()))
    return int(status.item()) - int(failed)


def raise_together(failed: bool, message: str) -> None:
    """:class:`NumericalError` ``message`` here if this process ``failed``, or on every process if any did."""
    others = failures_elsewhere(failed)
    if failed:
        raise NumericalError(message)
    if others:
        raise NumericalError(f"{message} on {others} other process(es) (their share of the calibration data)")


def all_reduce_sum_float64(tensor: torch.Tensor) -> torch.Tensor:
    """The sum of ``tensor`` over every process, in float64 (a float64 copy in one process); same shape and device.

    The sum travels on :func:`wire_device` (NCCL takes GPU tensors only), whatever device ``tensor`` is on.
    """
    total = tensor.to(torch.float64, copy=True)
    if is_distributed():
        wire = total.to(wire_device())
        dist.all_reduce(wire, op=dist.ReduceOp.SUM)
        total = wire.to(tensor.device)
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
            self.total = mean.to(torch.float64, copy=True)
            self.total.mul_(count)  # in place: one float64 [in, in] alive, not two (a streamed run's peak)
        else:
            self.total.add_(mean, alpha=count)  # in float64: the product of a float32 and an integer is exact
        self.count += count

    def mean(self) -> torch.Tensor | None:
        """The mean over every process's items (float64); None when nothing was added here.

        Every process must call it in the same order (it all-reduces); NaN when no process saw any item. It uses
        the sum up (reduced and divided in place, so a down projection's float64 Hessian exists once, not three
        times), so it is called once; adding after it starts a new sum.
        """
        if self.total is None:
            return None
        count = all_reduce_sum_float64(torch.tensor([self.count], device=self.total.device))
        total, self.total, self.count = self.total, None, 0
        if is_distributed():
            dist.all_reduce(total, op=dist.ReduceOp.SUM)
        return total.div_(count)


@dataclass(frozen=True)
class Job(Generic[T]):
    """One module's solver work: its relative ``cost`` (rows x cols^2 for GPTQ) and the call that does it.

    ``solve()`` must be a function of what every process holds identically (the all-reduced statistics, the
    weights), so it gives the same value wherever it runs. The value may hold tensors, dataclasses of tensors
    (``QuantizedWeight``), tuples, lists, dicts, strings and numbers: that is what the other processes receive.
    """

    cost: float
    solve: Callable[[], T]


def owners(costs: Sequence[float], parts: int) -> list[int]:
    """The process that solves each job: largest cost first, each onto the least-loaded process (greedy LPT).

    Deterministic (equal costs keep their order, equal loads go to the lower rank), so every process computes
    the same owners without talking. With q, k, v of a Llama layer (costs 4, 1, 1) on 2 processes: [0, 1, 1].
    """
    load = [0.0] * parts
    result = [0] * len(costs)
    for index in sorted(range(len(costs)), key=lambda i: -costs[i]):  # sorted is stable
        part = min(range(parts), key=load.__getitem__)  # min keeps the first of equal loads
        result[index] = part
        load[part] += costs[index]
    return result


def solve_partitioned(jobs: Sequence[Job[T]]) -> list[T]:
    """Every job's result on every process, each job solved by its owner only (:func:`owners`).

    Each process first solves its own jobs, then every result is broadcast from its owner, in job order. A job
    that raises has its exception broadcast in place of its result and raised on every process, so none waits
    for a result that will not come. Every process must call it at the same point with the same jobs' costs (it
    is collective); in one process the jobs simply run in order.
    """
    if not is_distributed():
        return [job.solve() for job in jobs]
    owner, me = owners([job.cost for job in jobs], world_size()), rank()
    solved: dict[int, Any] = {}
    for index, job in enumerate(jobs):
        if owner[index] == me:
            try:
                solved[index] = job.solve()
            except Exception as exc:  # every process raises it at this job's broadcast
                solved[index] = _Failed(exc)
    results = []
    for index in range(len(jobs)):
        value = _broadcast(solved.get(index), owner[index])
        if isinstance(value, _Failed):
            raise value.error
        results.append(value)
    return results


@dataclass
class _Failed:
    """A job's exception, sent in place of its result."""

    error: Exception


@dataclass(frozen=True)
class _Slot:
    """Where tensor number ``index`` of a broadcast value was: tensors travel apart, by ``dist.broadcast``."""

    index: int


def _broadcast(value: Any, src: int) -> Any:
    """``value`` of process ``src`` on every process (``src`` keeps its own object).

    Tensors go by ``dist.broadcast`` onto the process group's device (this process's GPU under NCCL, else the
    CPU), the structure around them (and any exception) is pickled by ``broadcast_object_list``.
    """
    tensors: list[torch.Tensor] = []
    header: list[Any] = [None]
    if rank() == src:
        sent = _Failed(_picklable(value.error)) if isinstance(value, _Failed) else value  # src raises the original
        header = [(_strip(sent, tensors), [(t.shape, t.dtype) for t in tensors])]
    dist.broadcast_object_list(header, src=src)
    skeleton, specs = header[0]
    device = wire_device()
    if rank() != src:
        tensors = [torch.empty(shape, dtype=_WIRE_DTYPES.get(dtype, dtype), device=device) for shape, dtype in specs]
    for index, (tensor, (_, dtype)) in enumerate(zip(tensors, specs, strict=True)):
        wire = tensor.detach().contiguous().to(device, _WIRE_DTYPES.get(dtype, dtype))
        dist.broadcast(wire, src=src)
        tensors[index] = wire.to(dtype)
    return value if rank() == src else _fill(skeleton, tensors)


#: Dtypes a backend cannot broadcast, sent widened (exactly) and narrowed back: gloo has no int16.
_WIRE_DTYPES = {torch.int16: torch.int32}


def _picklable(error: Exception) -> Exception:
    """``error`` when it survives pickling, else a RuntimeError with its type and message."""
    try:
        pickle.loads(pickle.dumps(error))
        return error
    except Exception:
        return RuntimeError(f"{type(error).__name__}: {error}")


def _strip(value: Any, tensors: list[torch.Tensor]) -> Any:
    """``value`` with each tensor appended to ``tensors`` and replaced by its :class:`_Slot`."""

    def slot(tensor: torch.Tensor) -> _Slot:
        tensors.append(tensor)
        return _Slot(len(tensors) - 1)

    return _map(value, slot)


def _fill(skeleton: Any, tensors: list[torch.Tensor]) -> Any:
    """The inverse of :func:`_strip`: each slot replaced by its tensor."""
    return _map(skeleton, lambda slot: tensors[slot.index], leaf=_Slot)


def _map(value: Any, change: Callable[[Any], Any], leaf: type = torch.Tensor) -> Any:
    """``value`` rebuilt with ``change`` applied to every ``leaf`` inside tuples, lists, dicts and dataclasses."""
    if isinstance(value, leaf):
        return change(value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        rebuilt = copy.copy(value)  # no __init__ / __post_init__: the fields may hold slots for a while
        for item in dataclasses.fields(value):
            object.__setattr__(rebuilt, item.name, _map(getattr(value, item.name), change, leaf))
        return rebuilt
    if isinstance(value, (list, tuple)):
        items = [_map(item, change, leaf) for item in value]
        return type(value)(*items) if hasattr(value, "_fields") else type(value)(items)
    if isinstance(value, dict):
        return {key: _map(item, change, leaf) for key, item in value.items()}
    return value


def check_recipe(stages: list[Method], calibration: CalibrationConfig, resume: bool) -> None:
    """Refuse, before any loading, what data-parallel calibration cannot do yet (one line each; none in one process)."""
    world = world_size()
    if world == 1:
        return
    for index, stage in enumerate(stages):
        if not stage.supports_distributed:
            from compressor.methods.registry import get_method, method_names

            splitting = ", ".join(name for name in method_names() if get_method(name).supports_distributed)
            raise RecipeError(f"stages.{index} ({stage.name}): does not support data-parallel calibration yet "
                              f"(WORLD_SIZE={world}); run it in one process (methods that split the data: "
                              f"{splitting})")
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
