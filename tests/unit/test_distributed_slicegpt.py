"""Data-parallel SliceGPT: 2 gloo processes measure the one-process covariances and rotate with the same bases.

Five calibration sequences in batches of two make three batches, split 2 + 1 between the processes. Every covariance
SliceGPT decomposes (the pooled one of ``shared``; layer 0's input, each MLP's input and each layer's output for
``per_layer``) must be the sum over both shares: a process that decomposed its own share would pick another basis.
Rank 0 decomposes each and broadcasts it. ``per_layer`` sums its 2 + 1 batches in the one process's order, so every
bit matches; ``shared`` pools over layers and batches, whose float64 sum the split reorders (~1e-16), which moves no
llama weight and leaves the rest within float32 rounding. Through ``compress`` (slicegpt then gptq) rank 0 writes
the one process's model files.
"""

from __future__ import annotations

import json
import math
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import torch
from run_outputs import comparable_files
from test_distributed import _in_two_processes, one_then_two_processes
from tiny import VOCAB, tiny_model

import compressor.methods.prune.slicegpt.covariance as covariance
from compressor import distributed
from compressor.engine import ModelContext, run_stages
from compressor.methods.prune.slicegpt import SliceGPT, SliceGPTConfig, ops
from compressor.models import get_adapter
from compressor.pipeline import compress
from compressor.recipe import load_recipe

SAMPLES, LENGTH, BATCH = 5, 32, 2


def _tokens() -> torch.Tensor:
    return torch.randint(0, VOCAB, (SAMPLES, LENGTH), generator=torch.Generator().manual_seed(1))


def _slice(family: str, rotation: str) -> dict[str, Any]:
    """SliceGPT at 25% on this process's share: every covariance it decomposed (summed over the processes), the
    decompositions this process computed itself, the weights, the records and the logits of every sequence."""
    torch.set_num_threads(1)
    model = tiny_model(family)
    run = ModelContext(model, get_adapter(model), distributed.shard_batches(_tokens(), BATCH), torch.device("cpu"),
                       BATCH)
    covariances: list[torch.Tensor] = []
    decomposed: list[int] = []
    summed, decompose = covariance._summed_over_processes, ops.principal_basis

    def recorded(cov: torch.Tensor) -> torch.Tensor:
        total = summed(cov)
        covariances.append(total.clone())
        return total

    def counted(cov: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        decomposed.append(cov.shape[0])
        return decompose(cov)

    covariance._summed_over_processes, ops.principal_basis = recorded, counted  # type: ignore[assignment]
    try:
        records = run_stages(run, [SliceGPT(SliceGPTConfig(method="slicegpt", slicing=0.25, rotation=rotation))])
    finally:
        covariance._summed_over_processes, ops.principal_basis = summed, decompose  # type: ignore[assignment]
    with torch.no_grad():
        logits = model(input_ids=_tokens(), use_cache=False).logits
    return {"covariances": covariances, "decomposed": decomposed, "sequences": run.tokens.shape[0],
            "weights": {name: p.detach().clone() for name, p in model.state_dict().items()},
            "records": [(r.module, r.params_after, r.rel_error, r.extra) for r in records], "logits": logits}


def _reference_pooled(family: str) -> torch.Tensor:
    """The ``shared`` covariance from the whole model's own forward over all sequences: every block's two norm
    inputs and the final norm's, each token at unit RMS (an RMS-norm family: folding its norms changes no input)."""
    model = tiny_model(family)
    adapter = get_adapter(model)
    norms = [norm for layer in adapter.layers() for norm in (adapter.attention_norm(layer), adapter.mlp_norm(layer))]
    rows: list[torch.Tensor] = []
    handles = [norm.register_forward_pre_hook(lambda _m, args: rows.append(args[0].reshape(-1, args[0].shape[-1])))
               for norm in [*norms, adapter.final_norm()]]
    with torch.no_grad():
        model(input_ids=_tokens(), use_cache=False)
    for handle in handles:
        handle.remove()
    X = torch.cat(rows).double()
    X = X / X.pow(2).mean(-1, keepdim=True).sqrt()
    return X.T @ X


#: (family, rotation, covariances decomposed: shared pools one; per_layer has layer 0's input, then each layer's
#: MLP input and output)
CASES = [("llama", "shared", 1), ("llama", "per_layer", 1 + 2 * 3), ("opt", "shared", 1)]


@pytest.mark.parametrize(("family", "rotation", "count"), CASES)
def test_two_processes_give_one_process_covariances_and_weights(family: str, rotation: str, count: int,
                                                                tmp_path: Path) -> None:
    single, ranks = one_then_two_processes(partial(_slice, family, rotation), tmp_path)
    assert [result["sequences"] for result in ranks] == [4, 1]  # 3 batches of 2, 2, 1 sequences: 2 + 1
    assert single["decomposed"] == [64] * count
    assert [result["decomposed"] for result in ranks] == [[64] * count, []]  # rank 0 decomposes and broadcasts
    if (family, rotation) == ("llama", "shared"):
        reference = _reference_pooled(family)
        assert float((single["covariances"][0] - reference).norm() / reference.norm()) < 1e-6  # float32 forwards
    for result in ranks:
        assert len(result["covariances"]) == count
        for got, want in zip(result["covariances"], single["covariances"], strict=True):
            assert got.dtype == torch.float64
            assert float((got - want).norm() / want.norm()) < 1e-10
        assert [row[:2] for row in result["records"]] == [row[:2] for row in single["records"]]
        for (*_, error, extra), (*_, error_1, extra_1) in zip(result["records"], single["records"], strict=True):
            assert (error is None and error_1 is None) or error == pytest.approx(error_1, rel=1e-9)
            assert extra.get("widths") == extra_1.get("widths")
            assert extra.get("lost_energy", 0) == pytest.approx(extra_1.get("lost_energy", 0), rel=1e-9)
        assert result["weights"].keys() == single["weights"].keys()
        for name, weight in single["weights"].items():
            if rotation == "per_layer":  # 2 + 1 batches sum in the one process's order: the same bits
                assert torch.equal(result["weights"][name], weight), name
            else:  # the pooled sum's order differs (~1e-16): at most float32 rounding of the rotated weights
                torch.testing.assert_close(result["weights"][name], weight, rtol=2.4e-7, atol=1e-12, msg=name)
        torch.testing.assert_close(result["logits"], single["logits"], rtol=1e-6, atol=1e-6)
    for name, weight in ranks[0]["weights"].items():  # the processes continue with the same bits
        assert torch.equal(ranks[1]["weights"][name], weight), name
    assert all(torch.equal(a, b) for a, b in zip(*(result["covariances"] for result in ranks), strict=True))


RECIPE = """\
name: tiny-dist-slicegpt
calibration: {{dataset: "{calib}", samples: 5, seq_len: 32, batch_size: 2}}
stages:
  - method: slicegpt
    slicing: 0.25
    rotation: {rotation}
  - method: gptq
    bits: 4
    group_size: 16
export: {{format: compressed-tensors}}
"""


def _compress(model: Path, recipe: Path, out: Path) -> dict[str, Any]:
    """The whole pipeline in this process (only rank 0 writes ``out``); whether ``out`` exists once it returns."""
    torch.set_num_threads(1)  # the workers' thread count: products sum in the same order
    compress(model, load_recipe(recipe, []), out)
    return {"written": out.exists()}


@pytest.mark.parametrize("rotation", ["shared", "per_layer"])
def test_the_pipeline_in_two_processes_writes_the_single_process_model(
    rotation: str, tmp_path: Path, model_dir_factory: Any, text_file: Path
) -> None:
    """slicegpt then gptq through ``compress``: rank 0 alone writes, the tensors are the single process's."""
    model = model_dir_factory("llama")
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(RECIPE.format(calib=text_file, rotation=rotation))
    threads = torch.get_num_threads()
    try:
        assert _compress(model, recipe, tmp_path / "one") == {"written": True}
    finally:
        torch.set_num_threads(threads)
    ranks = _in_two_processes(partial(_compress, model, recipe, tmp_path / "two"), tmp_path)
    assert [result["written"] for result in ranks] == [True, True]  # rank 1 returns after rank 0 wrote
    one, two = comparable_files(tmp_path / "one"), comparable_files(tmp_path / "two")
    report_one, report_two = (json.loads(files.pop("compression_report.json")) for files in (one, two))
    assert one == two  # model.safetensors, config.json (the slicing), modeling_sliced.py... byte for byte
    # the report too, but for shared's lost energy: eigenvalues of a pooled sum added in another order (~1e-16)
    assert _close(report_two, report_one)


def _close(got: Any, want: Any) -> bool:
    """``got == want``, but for floats (inside dicts and lists) within 1e-12 of each other, relatively."""
    if isinstance(want, float) and isinstance(got, float):
        return math.isclose(got, want, rel_tol=1e-12)
    if isinstance(want, dict) and isinstance(got, dict):
        return got.keys() == want.keys() and all(_close(got[key], item) for key, item in want.items())
    if isinstance(want, list) and isinstance(got, list):
        return len(got) == len(want) and all(_close(a, b) for a, b in zip(got, want, strict=True))
    return bool(got == want)
