"""Data-parallel DGQ, BAQ and BitStack: 2 gloo processes give one process's statistics, plans and weights.

The harness is test_distributed's: five sequences in batches of two, three batches split 2 + 1 between the
processes, so a statistic taken on one process's share (or summed without its counts) differs from the whole
set's. Each run records every calibration statistic the stage reads, as it reads it: the engine's float64
Hessian sums (``WeightedSum.mean``), DGQ's smoothing maxima, the Fisher pass's mean squared loss gradients; then
the plan (BAQ's bit map, BitStack's blocks per linear) and the output weights and codes, which must be the single
process's bits. DGQ's searches and BitStack's decompositions are split: each process solves a strict share.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import torch
from run_outputs import comparable_files
from test_distributed import (
    BATCH,
    _free_port,
    _in_two_processes,
    _tokens,
    compress_in_one_thread,
    one_then_two_processes,
)
from tiny import tiny_model

from compressor import distributed
from compressor.calibration.fisher import output_fisher
from compressor.distributed import WeightedSum
from compressor.engine import ModelContext, run_stages
from compressor.errors import CompressorError, NumericalError
from compressor.methods.base import MethodConfig
from compressor.methods.quant import bitstack, dgq
from compressor.methods.registry import get_method
from compressor.models import get_adapter
from compressor.recipe import build_stages


def _config(method: str, **fields: Any) -> MethodConfig:
    return get_method(method).config_class.model_validate({"method": method, **fields})


@contextmanager
def _patched(owner: Any, name: str, wrap: Callable[[Any], Any]) -> Iterator[None]:
    """``owner.name`` replaced by ``wrap(original)`` for the block."""
    original = getattr(owner, name)
    setattr(owner, name, wrap(original))
    try:
        yield
    finally:
        setattr(owner, name, original)


def _recorded(into: list[Any], function: Callable[..., Any]) -> Callable[..., Any]:
    """``function`` that also appends a copy of each result to ``into``."""

    def call(*args: Any, **kwargs: Any) -> Any:
        result = function(*args, **kwargs)
        into.append(None if result is None else result.detach().clone())
        return result

    return call


def _counted(rows: list[int], function: Callable[..., Any]) -> Callable[..., Any]:
    """``function`` that also appends the rows of its first argument (a weight) to ``rows``."""

    def call(W: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        rows.append(W.shape[0])
        return function(W, *args, **kwargs)

    return call


def _compress(configs: list[MethodConfig], export_format: str = "dense") -> dict[str, Any]:
    """On this process's share of the batches: ``configs`` run by the engine, with what they read and wrote."""
    torch.set_num_threads(1)
    model = tiny_model("llama")
    adapter = get_adapter(model)
    run = ModelContext(model, adapter, distributed.shard_batches(_tokens(), BATCH), torch.device("cpu"), BATCH)
    stages = build_stages(configs, export_format)
    hessians: list[torch.Tensor] = []
    maxima: list[torch.Tensor] = []
    rows: list[int] = []
    with (_patched(WeightedSum, "mean", partial(_recorded, hessians)),
          _patched(dgq, "_input_absmax", partial(_recorded, maxima)),
          _patched(dgq, "search_channel_scale", partial(_counted, rows)),
          _patched(bitstack, "decompose", partial(_counted, rows))):
        records = run_stages(run, stages)
    state = {name: t.detach().clone() for name, t in [*model.named_parameters(), *model.named_buffers()]}
    fisher = {path: f for stage in stages for path, f in getattr(stage, "fisher", {}).items()}
    return {
        "hessians": hessians, "maxima": maxima, "fisher": fisher, "rows": sum(rows), "state": state,
        "codes": {path: (q.q, q.scale, q.zero, q.group_bits) for path, q in run.quantized.items()},
        "plan": [(r.module, r.method, r.bits, r.extra.get("bits_per_group")) for r in records],
        "errors": [(r.module, r.rel_error) for r in records],
        "refine": [r.extra.get("refine") for r in records],
        "blocks": dict(getattr(stages[0], "blocks", {})),
    }


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm().clamp(min=1e-300))


def _assert_same_run(single: dict[str, Any], result: dict[str, Any]) -> None:
    """Statistics within 1e-10 (float64), and the plan, the weights and the codes bit for bit."""
    assert len(result["hessians"]) == len(single["hessians"]) > 0
    for got, want in zip(result["hessians"], single["hessians"], strict=True):
        assert got.dtype == torch.float64 and _relative(got, want) < 1e-10
    assert len(result["maxima"]) == len(single["maxima"])
    for got, want in zip(result["maxima"], single["maxima"], strict=True):
        assert torch.equal(got, want)  # a maximum does not depend on the split
    assert result["fisher"].keys() == single["fisher"].keys()
    for path, want in single["fisher"].items():
        assert result["fisher"][path].dtype == torch.float64 and _relative(result["fisher"][path], want) < 1e-10, path
    assert result["plan"] == single["plan"] and result["blocks"] == single["blocks"]
    assert result["errors"] == single["errors"]
    assert result["state"].keys() == single["state"].keys()
    for name, tensor in single["state"].items():
        assert torch.equal(result["state"][name], tensor), name
    assert result["codes"].keys() == single["codes"].keys()
    for path, want in single["codes"].items():
        for got_part, want_part in zip(result["codes"][path], want, strict=True):
            assert (got_part is None and want_part is None) or torch.equal(got_part, want_part), path


DGQ = {
    "w4a8-gptq": ([_config("dgq", group_size=32, smoothing=0.5)], "compressed-tensors"),
    # act_percentile clips each token at a percentile of its own channels: no statistic of the set, nothing to sum
    "w8a8-rtn-clipped": ([_config("dgq", weight_bits=8, solver="rtn", act_percentile=99.0, smoothing=0.8)],
                         "compressor-int8"),
}


@pytest.mark.parametrize("setting", list(DGQ))
def test_dgq_two_processes_read_the_whole_set_and_split_the_solves(setting: str, tmp_path: Path) -> None:
    single, ranks = one_then_two_processes(partial(_compress, *DGQ[setting]), tmp_path)
    assert len(single["maxima"]) == 2 * 3  # attention and MLP inputs smoothed in each of 3 layers
    assert len(single["codes"]) == 3 * 7 and all(r[1] == "dgq" for r in single["plan"])
    for result in ranks:
        _assert_same_run(single, result)
        assert any(name.endswith("weight_int8") for name in result["state"])  # the INT8 linears' own buffers
    # every linear's search ran once, on one of the two processes
    assert all(0 < result["rows"] < single["rows"] for result in ranks)
    assert sum(result["rows"] for result in ranks) == single["rows"]


BAQ = [_config("baq", avg_bits=3.0, candidates=[2, 3, 4], granularity="group", objective="fisher"),
       _config("gptq", group_size=32)]


def test_baq_fisher_two_processes_plan_and_quantize_as_one(tmp_path: Path) -> None:
    single, ranks = one_then_two_processes(partial(_compress, BAQ), tmp_path)
    planned = [bits for _, method, _, bits in single["plan"] if method == "baq"]
    assert len(planned) == 3 * 7 and len({b for widths in planned for b in widths}) == 3  # a mixed plan
    assert len(single["fisher"]) == 3 * 7
    for result in ranks:
        _assert_same_run(single, result)


BITSTACK = [_config("bitstack", iterations=3, rank=2, budget="2.5bpw", order="fisher", signs="residual")]


def test_bitstack_fisher_two_processes_choose_the_same_blocks(tmp_path: Path) -> None:
    single, ranks = one_then_two_processes(partial(_compress, BITSTACK), tmp_path)
    assert len(single["fisher"]) == 3 * 7 and len(set(single["blocks"].values())) > 1  # an uneven choice
    for result in ranks:
        _assert_same_run(single, result)
    # every linear was decomposed once, on one of the two processes
    assert all(0 < result["rows"] < single["rows"] for result in ranks)
    assert sum(result["rows"] for result in ranks) == single["rows"]


def test_asymmetric_gptq_two_processes_solve_as_one(tmp_path: Path) -> None:
    """GPTAQ's cross terms (float model's inputs against the quantized prefix's) are summed like the Hessians, each
    process carries the float hidden states of its own sequences, and each linear is retargeted and solved once."""
    configs = [_config("gptq", bits=3, group_size=32, asymmetric=0.5)]
    single, ranks = one_then_two_processes(partial(_compress, configs), tmp_path)
    assert len(single["hessians"]) == 2 * 4 * 3  # H and D of each of 4 groups in 3 layers
    for result in ranks:
        _assert_same_run(single, result)


MSE = ("layer_mse_before", "layer_mse_after")
REFINE = [_config("gptq", bits=3, group_size=32, refine_iters=20, refine_batch=3, refine_dtype="float32")]


def test_refinement_two_processes_take_one_process_steps(tmp_path: Path) -> None:
    """Each step's 3 sequences are drawn from all 5 (a step can straddle the two processes' shares); the gradients
    and losses are summed across processes, so both processes take one process's steps and keep the same weights."""
    single, ranks = one_then_two_processes(partial(_compress, REFINE), tmp_path)
    refined = [summary for summary in single["refine"] if summary is not None]
    assert len(refined) == 3 * 7 and all(s["layer_mse_after"] < s["layer_mse_before"] for s in refined)
    for result in ranks:
        for got, want in zip(result["refine"], single["refine"], strict=True):
            assert got.keys() == want.keys()  # the losses are sums over both processes: float32 rounding apart
            assert {k: v for k, v in got.items() if "mse" not in k} == {k: v for k, v in want.items() if "mse" not in k}
            assert [got[k] for k in MSE] == pytest.approx([want[k] for k in MSE], rel=1e-6)
        for name, tensor in single["state"].items():
            assert torch.equal(result["state"][name], tensor), name
        for path, want in single["codes"].items():
            assert torch.equal(result["codes"][path][0], want[0]), path


def _fisher_failing_on_rank_1() -> dict[str, Any]:
    """The Fisher pass on this process's share, its batches raising on rank 1: the error each process gets."""
    model = tiny_model("llama")
    path = f"{get_adapter(model).layer_prefix(0)}.{get_adapter(model).linear_names()[0]}"

    def batches() -> Iterator[torch.Tensor]:
        if distributed.rank() == 1:
            raise NumericalError("rank 1 broke")
        yield distributed.shard_batches(_tokens(), BATCH)

    try:
        output_fisher(model, batches(), {path})
    except CompressorError as exc:
        return {"error": str(exc)}
    return {"error": ""}


def test_a_fisher_pass_failing_on_one_process_fails_on_every_process(tmp_path: Path) -> None:
    """No process is left waiting in the all-reduce for the sums of one that raised."""
    ranks = _in_two_processes(_fisher_failing_on_rank_1, tmp_path)
    assert [r["error"] for r in ranks] == ["fisher: the loss gradients failed on 1 other process(es); see their error",
                                           "rank 1 broke"]


RECIPES = {
    "dgq": ("  - {method: dgq, group_size: 32, smoothing: 0.5}\n", "compressed-tensors"),
    "bitstack": ("  - {method: bitstack, iterations: 2, rank: 2, budget: 2.5bpw, order: fisher, signs: residual}\n",
                 "bitstack"),
    "gptq": ("  - {method: gptq, bits: 3, group_size: 32, refine_iters: 20, refine_batch: 3, refine_dtype: float32}\n",
             "compressed-tensors"),  # with the block-wise refinement
}


@pytest.mark.parametrize("method", list(RECIPES))
def test_torchrun_writes_the_single_process_bytes(method: str, tmp_path: Path, model_dir_factory: Any,
                                                  text_file: Path) -> None:
    """The CLI under torchrun (2 processes, rank 0 writes) gives the one-process output, byte for byte."""
    assert get_method(method).supports_distributed  # else check_recipe refuses it under torchrun
    stages, export = RECIPES[method]
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"name: tiny-{method}\ncalibration: {{dataset: \"{text_file}\", samples: 5, seq_len: 32, "
                      f"batch_size: 2}}\nstages:\n{stages}export: {{format: {export}}}\n")
    model = model_dir_factory("llama")
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--monitor-interval", "0.2",
                "--master-port", str(_free_port()), "-m", "compressor", "compress", str(model), "-r", str(recipe),
                "-o", str(tmp_path / "two")]
    done = subprocess.run(torchrun, capture_output=True, text=True, timeout=180,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    compress_in_one_thread(model, recipe, tmp_path / "one")
    two, one = comparable_files(tmp_path / "two"), comparable_files(tmp_path / "one")
    if method == "gptq":  # the refinement's layer losses are sums over both processes: float32 rounding apart
        losses_two, losses_one = _refine_losses(two), _refine_losses(one)
        assert len(losses_one) == 3 * 7 * 2 and losses_two == pytest.approx(losses_one, rel=1e-6)
    assert two == one


def _refine_losses(files: dict[str, bytes]) -> list[float]:
    """The report's refinement losses (before, after) of every row, taken out of ``files``' report."""
    report = json.loads(files["compression_report.json"])
    refined = [row["extra"].pop("refine") for row in report["layers"]]
    files["compression_report.json"] = json.dumps(report).encode()
    return [summary[key] for summary in refined for key in MSE]
