"""Data-parallel calibration: 2 CPU processes on gloo give one process's statistics and weights.

Five calibration sequences in batches of two make three batches, split 2 + 1: the shares are uneven, so summing
per-process means without their token counts, or skipping the all-reduce, gives other Hessians and weights.
The per-module solves handed to ``ctx.solve_each`` are split between the processes and broadcast: each process
solves a strict subset, and the weights, codes and per-module results are the single process's bits.
"""

from __future__ import annotations

import faulthandler
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.multiprocessing as mp
from run_outputs import comparable_files
from tiny import VOCAB, tiny_model

from compressor import distributed
from compressor.distributed import Job, WeightedSum, owners, shard, solve_partitioned
from compressor.engine import LayerContext, ModelContext, run_stages
from compressor.errors import CompressorError, NumericalError
from compressor.methods.base import LayerRecord, Method
from compressor.methods.quant import gptq
from compressor.methods.quant.gptq import GPTQConfig
from compressor.methods.quant.gptq_ops import accumulate_hessian, gptq_quantize
from compressor.methods.quant.ops import QuantizedWeight
from compressor.methods.registry import get_method
from compressor.models import get_adapter
from compressor.pipeline import compress
from compressor.recipe import CalibrationConfig, build_stages, load_recipe

SAMPLES, LENGTH, BATCH = 5, 16, 2


def test_shards_are_contiguous_and_the_first_take_the_remainder() -> None:
    items = list(range(5))
    assert [list(shard(items, part, 2)) for part in range(2)] == [[0, 1, 2], [3, 4]]
    assert [list(shard(items, part, 3)) for part in range(3)] == [[0, 1], [2, 3], [4]]
    assert [list(shard([7], part, 2)) for part in range(2)] == [[7], []]


def test_owners_put_the_largest_job_first_on_the_least_loaded_process() -> None:
    assert owners([4, 1, 1], 2) == [0, 1, 1]  # q, k, v of a Llama layer with 4x fewer KV heads
    assert owners([2, 2], 2) == [0, 1]  # equal costs: the earlier job on the lower rank
    assert owners([3, 3, 2, 2, 2], 2) == [0, 1, 0, 1, 0]
    assert owners([1, 5, 1, 1], 3) == [1, 0, 2, 1]  # the last 1 goes to the lighter of ranks 1 and 2: rank 1
    assert owners([7], 2) == [0] and owners([1, 2], 1) == [0, 0] and owners([], 2) == []


def test_one_process_runs_every_job_in_order() -> None:
    ran: list[int] = []
    jobs = [Job(cost, partial(lambda i: ran.append(i) or i * 10, i)) for i, cost in enumerate([1.0, 9.0, 3.0])]
    assert solve_partitioned(jobs) == [0, 10, 20] and ran == [0, 1, 2]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _tokens() -> torch.Tensor:
    return torch.randint(0, VOCAB, (SAMPLES, LENGTH), generator=torch.Generator().manual_seed(1))


@contextmanager
def _rows_solved() -> Iterator[list[int]]:
    """The output rows of every weight that shipped GPTQ solves in this process (alone or stacked), in a list."""
    rows: list[int] = []
    plain = gptq.gptq_quantize

    def counted(W: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        rows.append(W.shape[0])
        return plain(W, *args, **kwargs)

    gptq.gptq_quantize = counted  # type: ignore[assignment]
    try:
        yield rows
    finally:
        gptq.gptq_quantize = plain


def _calibrate() -> dict[str, Any]:
    """In this process's share: layer 0's q/k/v Hessian (float64 sum), the weights of a GPTQ W4 g32 run and the
    rows its solver ran on here."""
    torch.set_num_threads(1)
    model = tiny_model("llama")
    adapter = get_adapter(model)
    run = ModelContext(model, adapter, distributed.shard_batches(_tokens(), BATCH), torch.device("cpu"), BATCH)
    ctx = LayerContext(0, adapter.layers()[0], run, run.capture_inputs().layer(0))
    qkv = adapter.linear_groups()[0]
    total = WeightedSum()
    ctx.collect_inputs(ctx.module(qkv.names[0]), lambda x: total.add(*accumulate_hessian(None, x, 0)))
    H = total.mean()
    with _rows_solved() as rows:
        run_stages(run, build_stages([GPTQConfig(method="gptq", bits=4, group_size=32)]))
    weights = {name: p.detach().clone() for name, p in model.named_parameters()}
    return {"H": H, "weights": weights, "codes": {k: q.q for k, q in run.quantized.items()}, "refusals": _refusals(run),
            "rows": sum(rows)}


def _refusals(run: ModelContext) -> list[str]:
    """The one-line errors of what data-parallel calibration does not do yet (none in one process)."""
    gptq = build_stages([GPTQConfig(method="gptq")])
    drop = build_stages([get_method("finercut").config_class(method="finercut", remove=1)])
    moe, half = tiny_model("mixtral"), tiny_model("llama").half()
    checks = [lambda: distributed.check_recipe(drop, CalibrationConfig(), resume=False),
              lambda: distributed.check_recipe(gptq, CalibrationConfig(samples=7, batch_size=8), resume=False),
              lambda: distributed.check_recipe(gptq, CalibrationConfig(), resume=True),
              lambda: distributed.check_model(moe, get_adapter(moe)),
              lambda: distributed.check_model(half, get_adapter(half))]
    refusals = []
    for check in checks:
        try:
            check()
        except CompressorError as exc:
            refusals.append(str(exc))
    return refusals


class _SplitGPTQ(Method):
    """GPTQ W4 g32 act-order on every linear, sequentially, its solves handed to ``ctx.solve_each``.

    ``solved`` lists the modules this process solved itself. Each job returns the codes with a note and a number,
    as a method's record would carry them.
    """

    config_class = GPTQConfig
    supports_distributed = True

    def __init__(self) -> None:
        super().__init__(GPTQConfig(method="gptq", bits=4, group_size=32))
        self.solved: list[str] = []

    def apply(self, ctx: LayerContext) -> list[LayerRecord]:
        records = []
        for group in ctx.adapter.linear_groups():
            H = ctx.hessian(group, replay=True)
            weights = {ctx.path(name): ctx.module(name).weight.data for name in group.names}
            jobs = [Job(float(W.shape[0] * W.shape[1] ** 2), partial(self._solve, path, W, H))
                    for path, W in weights.items()]
            solved = ctx.solve_each(jobs)
            for name, (path, W), (qweight, note, error) in zip(group.names, weights.items(), solved, strict=True):
                ctx.module(name).weight.data = qweight.dequantize(W.dtype)
                ctx.run.quantized[path] = qweight
                records.append(LayerRecord(module=path, method=self.name, rel_error=error, note=note))
            ctx.settle(group)
        return records

    def _solve(self, path: str, W: torch.Tensor, H: torch.Tensor) -> tuple[QuantizedWeight, str, float]:
        self.solved.append(path)
        qweight = gptq_quantize(W, H, 4, 32, True, True).qweight
        return qweight, f"solved by rank {distributed.rank()}", float((qweight.dequantize() - W).norm() / W.norm())


def _split() -> dict[str, Any]:
    """In this process's share: a pass of :class:`_SplitGPTQ`, and a job that fails on the last process."""
    torch.set_num_threads(1)
    model = tiny_model("llama")
    adapter = get_adapter(model)
    run = ModelContext(model, adapter, distributed.shard_batches(_tokens(), BATCH), torch.device("cpu"), BATCH)
    stage = _SplitGPTQ()
    records = run_stages(run, [stage])
    weights = {name: p.detach().clone() for name, p in model.named_parameters()}
    failure = ""
    try:
        solve_partitioned([Job(2.0, lambda: 1), Job(1.0, partial(_fail, distributed.world_size() - 1))])
    except NumericalError as exc:
        failure = str(exc)
    try:
        solve_partitioned([Job(2.0, lambda: 1), Job(1.0, _fail_unpicklably)])
    except Exception as exc:
        unpicklable = f"{type(exc).__name__}: {exc}"
    return {"weights": weights, "quantized": run.quantized, "solved": stage.solved, "failure": failure,
            "unpicklable": unpicklable, "records": [(r.module, r.note, r.rel_error) for r in records]}


def _fail(rank: int) -> None:
    time.sleep(0.2)  # the other process is already waiting for this job's result
    raise NumericalError(f"job failed on rank {rank}")


class _Unpicklable(Exception):
    def __init__(self) -> None:
        super().__init__("holds a lock")
        self.lock = threading.Lock()


def _fail_unpicklably() -> None:
    raise _Unpicklable


def _worker(rank: int, world: int, port: int, out: str, task: Callable[[], dict[str, Any]]) -> None:
    # One thread before anything runs: a forked child inherits the parent's OpenMP pool only in name, and a
    # multithreaded product there can wait forever for threads that no longer exist (seen in the whole suite).
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(world), RANK=str(rank),
                      LOCAL_RANK=str(rank))
    with distributed.process_group("cpu"):
        assert distributed.world_size() == world
        torch.save(task(), Path(out) / f"rank{rank}.pt")


def _in_two_processes(task: Callable[[], dict[str, Any]], out: Path) -> list[dict[str, Any]]:
    """``task()`` run by 2 gloo processes (forked: they start with everything imported); each one's result."""
    mp.start_processes(_worker, args=(2, _free_port(), str(out), task), nprocs=2, join=True, start_method="fork")
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(2)]


def one_then_two_processes(
    task: Callable[[], dict[str, Any]], out: Path
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """``task()`` here, then in each of 2 gloo processes (:func:`_in_two_processes`), each one's result.

    Here first, so the forked workers start with everything imported; this process's thread count, which a task
    sets to the workers' one, is restored.
    """
    threads = torch.get_num_threads()
    try:
        single = task()
    finally:
        torch.set_num_threads(threads)
    return single, _in_two_processes(task, out)


def compress_in_one_thread(model: Path, recipe: Path, out: Path) -> None:
    """``compress`` at the torchrun workers' 1 thread (``OMP_NUM_THREADS=1``), so matrix products sum in their order."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        compress(model, load_recipe(recipe, []), out)
    finally:
        torch.set_num_threads(threads)


def _reference_hessian() -> torch.Tensor:
    """2/N X^T X of q_proj's inputs over all sequences, in float64, from the whole model's own forward."""
    model = tiny_model("llama")
    rows: list[torch.Tensor] = []
    module = get_adapter(model).layers()[0].get_submodule(get_adapter(model).linear_groups()[0].names[0])
    handle = module.register_forward_pre_hook(lambda _m, args: rows.append(args[0].reshape(-1, args[0].shape[-1])))
    with torch.no_grad():
        model(input_ids=_tokens(), use_cache=False)
    handle.remove()
    X = torch.cat(rows).double()
    return 2 * X.T @ X / X.shape[0]


@pytest.fixture(scope="module")
def calibrated(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """:func:`_calibrate` in one process, then in each of 2 gloo processes."""
    return one_then_two_processes(_calibrate, tmp_path_factory.mktemp("ranks"))


def test_two_processes_give_one_process_hessians_and_weights(
    calibrated: tuple[dict[str, Any], list[dict[str, Any]]]
) -> None:
    single, ranks = calibrated
    reference = _reference_hessian()  # float64 products: the sums in float32 batches are ~1e-7 from it
    assert float((single["H"] - reference).norm() / reference.norm()) < 1e-6
    for result in ranks:
        assert result["H"].dtype == torch.float64
        assert float((result["H"] - single["H"]).norm() / single["H"].norm()) < 1e-10
        assert result["weights"].keys() == single["weights"].keys()
        for name, weight in single["weights"].items():
            assert torch.equal(result["weights"][name], weight), name
        for path, codes in single["codes"].items():
            assert torch.equal(result["codes"][path], codes), path
        assert result["codes"].keys() == single["codes"].keys() and len(single["codes"]) == 3 * 7
        drop, batches, resume, moe, half = result["refusals"]
        assert drop.startswith("stages.0 (finercut): does not support data-parallel calibration yet")
        assert batches.startswith("calibration: 7 samples in batches of 8 make 1 batches, fewer than the 2 processes")
        assert resume.startswith("--resume: checkpoints hold one process's activations")
        assert moe.startswith("MixtralForCausalLM: mixture-of-experts") and "float16" in half
    assert single["refusals"] == []  # one process: nothing refused


def test_shipped_gptq_splits_its_solves(calibrated: tuple[dict[str, Any], list[dict[str, Any]]]) -> None:
    single, ranks = calibrated
    assert single["rows"] == 3 * (64 + 32 + 32 + 64 + 128 + 128 + 64)  # every row of the 21 linears, once
    assert all(0 < result["rows"] < single["rows"] for result in ranks)
    assert sum(result["rows"] for result in ranks) == single["rows"]


def test_two_processes_split_the_solves_and_get_one_process_bits(tmp_path: Path) -> None:
    single, ranks = one_then_two_processes(_split, tmp_path)
    every = set(single["quantized"])
    assert len(every) == 3 * 7 and sorted(single["solved"]) == sorted(every)
    mine = [set(result["solved"]) for result in ranks]
    assert mine[0] and mine[1] and not mine[0] & mine[1] and mine[0] | mine[1] == every
    assert len(mine[0]) + len(mine[1]) == len(every)  # nothing solved twice
    for result in ranks:
        for name, weight in single["weights"].items():
            assert torch.equal(result["weights"][name], weight), name
        assert result["quantized"].keys() == every
        for path, qweight in single["quantized"].items():
            got = result["quantized"][path]
            for field in ("q", "scale", "zero"):
                assert torch.equal(getattr(got, field), getattr(qweight, field)), (path, field)
            assert (got.bits, got.group_size, got.symmetric, got.g_idx, got.group_bits) == (4, 32, True, None, None)
        # each module's note and error come from the process that solved it
        owner = {path: 0 if path in mine[0] else 1 for path in every}
        assert [row[1] for row in result["records"]] == [f"solved by rank {owner[row[0]]}" for row in result["records"]]
        assert [row[2] for row in result["records"]] == [row[2] for row in single["records"]]
        assert result["failure"] == "job failed on rank 1"
    assert single["failure"] == "job failed on rank 0"
    # the process that raised it keeps the original; the other gets its type and message
    assert [result["unpicklable"] for result in ranks] == ["RuntimeError: _Unpicklable: holds a lock",
                                                            "_Unpicklable: holds a lock"]
    assert single["unpicklable"] == "_Unpicklable: holds a lock"


RECIPE = """\
name: tiny-dist
calibration: {{dataset: "{calib}", samples: 5, seq_len: 32, batch_size: 2}}
stages:
  - method: gptq
    bits: 4
    group_size: 32
export: {{format: compressed-tensors}}
"""


def test_torchrun_writes_the_single_process_bytes(tmp_path: Path, model_dir_factory: Any, text_file: Path) -> None:
    model = model_dir_factory("llama")
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(RECIPE.format(calib=text_file))
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--monitor-interval", "0.2",
                "--master-port", str(_free_port()), "-m", "compressor", "compress", str(model), "-r", str(recipe)]
    two = tmp_path / "new" / "two"  # a parent only rank 0 may create
    done = subprocess.run([*torchrun, "-o", str(two)], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr
    assert done.stdout.count("compressed ->") == 1  # rank 0 alone reports
    compress_in_one_thread(model, recipe, tmp_path / "one")
    assert comparable_files(two) == comparable_files(tmp_path / "one")


def test_weighted_sum_is_the_float64_weighted_mean_and_leaves_its_inputs_alone() -> None:
    """Known answer: sum_b n_b m_b / sum_b n_b in float64; a float64 batch mean is not scaled in place."""
    generator = torch.Generator().manual_seed(0)
    means = [torch.randn(5, 5, generator=generator, dtype=torch.float64) for _ in range(3)]
    counts = [7, 1, 12]
    originals = [m.clone() for m in means]
    total = WeightedSum()
    for mean, count in zip(means, counts, strict=True):
        total.add(mean, count)
    expected = sum(m * c for m, c in zip(originals, counts, strict=True)) / sum(counts)
    result = total.mean()
    assert result is not None and result.dtype == torch.float64
    torch.testing.assert_close(result, expected, rtol=1e-15, atol=1e-15)
    assert all(torch.equal(m, o) for m, o in zip(means, originals, strict=True))
    assert total.mean() is None  # the sum was used up


class _PoisonLastProcess(Method):
    """Leaves every layer alone, except that layer 1's first linear becomes NaN on the last process only."""

    config_class = GPTQConfig
    supports_distributed = True

    def __init__(self) -> None:
        super().__init__(GPTQConfig(method="gptq"))

    def apply(self, ctx: LayerContext) -> list[LayerRecord]:
        if ctx.index == 1 and distributed.rank() == distributed.world_size() - 1:
            ctx.module(ctx.adapter.linear_groups()[0].names[0]).weight.data.fill_(float("nan"))
        return []


def _overflow_on_one_process() -> dict[str, Any]:
    """A pass in which one process's layer 1 outputs turn NaN; each process's error (a hang exits after 120 s)."""
    torch.set_num_threads(1)
    faulthandler.dump_traceback_later(120, exit=True)
    model = tiny_model("llama")
    run = ModelContext(model, get_adapter(model), distributed.shard_batches(_tokens(), BATCH), torch.device("cpu"),
                       BATCH)
    try:
        run_stages(run, [_PoisonLastProcess()])
        message = ""
    except NumericalError as exc:
        message = str(exc)
    finally:
        faulthandler.cancel_dump_traceback_later()
    return {"message": message}


def test_nan_outputs_on_one_process_stop_every_process(tmp_path: Path) -> None:
    """The engine's finiteness check is taken together: the healthy process raises too instead of waiting."""
    first, last = _in_two_processes(_overflow_on_one_process, tmp_path)
    assert last["message"].startswith("layer model.layers.1 produced NaN/inf outputs after")
    assert first["message"].startswith("layer model.layers.1 produced NaN/inf outputs after")
    assert first["message"].endswith("on 1 other process(es) (their share of the calibration data)")
