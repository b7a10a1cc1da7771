"""Data-parallel layer_drop (ShortGPT) and FLAP: 2 gloo processes give one process's scores, moments and pruning.

The harness is test_distributed's: five sequences in batches of two make three batches, split 2 + 1 between the
processes, so a score or a variance taken on one process's share, or a mean of the two processes' means, differs
from the one-process value. Each case runs layer_drop then FLAP (two passes) on a 5-layer tiny llama and compares
every process with one process: the block scores and the FLAP statistics (scores built from the per-channel
variances, and the input means the compensation bias uses) within 1e-10, the removed layers, the kept head groups
and widths, and every output weight bit for bit.
"""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

import pytest
import torch
from test_distributed import BATCH, _tokens, one_then_two_processes
from tiny import tiny_model

from compressor import distributed
from compressor.engine import ModelContext, run_stages
from compressor.methods.base import LayerRecord, MethodConfig
from compressor.methods.prune.flap import FLAP, FLAPConfig
from compressor.methods.prune.layer_drop import LayerDrop, LayerDropConfig
from compressor.models import get_adapter
from compressor.recipe import CalibrationConfig, build_stages

#: name -> (layer_drop settings, flap settings); both compensate, so the input means reach the weights.
CASES: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {
    "shortgpt+fluctuation": ({"metric": "block_influence", "remove": 2},
                             {"metric": "fluctuation", "structure": "uniform", "ratio": 0.5, "compensate": True}),
    "angular+activation_norm": ({"metric": "angular", "remove": 2},
                                {"metric": "activation_norm", "structure": "global", "ratio": 0.3,
                                 "compensate": True}),
}


class _KeptFLAP(FLAP):
    """FLAP that keeps every layer's statistics past ``finalize`` (which drops them), for the comparison."""

    def __init__(self, config: MethodConfig) -> None:
        super().__init__(config)
        self.kept: list[dict[str, torch.Tensor]] = []

    def finalize(self, run: ModelContext) -> list[LayerRecord]:
        self.kept = [asdict(stats) for stats in self._stats]
        return super().finalize(run)


def _prune() -> dict[str, Any]:
    """In this process's share, per case: the block scores, the FLAP statistics, the decisions and the weights."""
    torch.set_num_threads(1)
    results: dict[str, Any] = {}
    for name, (drop_settings, flap_settings) in CASES.items():
        model = tiny_model("llama", num_hidden_layers=5)
        run = ModelContext(model, get_adapter(model), distributed.shard_batches(_tokens(), BATCH), torch.device("cpu"),
                           BATCH)
        drop = LayerDrop(LayerDropConfig(method="layer_drop", **drop_settings))
        flap = _KeptFLAP(FLAPConfig(method="flap", **flap_settings))
        flap.bind([], "dense")
        records = run_stages(run, [drop, flap])
        results[name] = {
            "scores": torch.tensor(drop._scores, dtype=torch.float64), "stats": flap.kept,
            "removed": run.structure["layer_drop"]["removed"], "shapes": run.structure["flap"]["layers"],
            "decisions": [(r.module, r.kept_fraction, r.extra.get("removed_kv_groups"), r.extra.get("removed"))
                          for r in records],
            "weights": {key: p.detach().clone() for key, p in model.named_parameters()},
        }
    stages = build_stages([LayerDropConfig(method="layer_drop"), FLAPConfig(method="flap")], "dense")
    distributed.check_recipe(stages, CalibrationConfig(), resume=False)  # raises if either is refused
    return results


@pytest.fixture(scope="module")
def pruned(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """:func:`_prune` in one process, then in each of 2 gloo processes."""
    return one_then_two_processes(_prune, tmp_path_factory.mktemp("ranks"))


def _relative(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got - want).norm() / want.norm())


@pytest.mark.parametrize("case", CASES)
def test_two_processes_give_one_process_block_scores_and_removed_layers(
    pruned: tuple[dict[str, Any], list[dict[str, Any]]], case: str
) -> None:
    single, ranks = pruned
    want = single[case]
    assert want["scores"].dtype == torch.float64 and len(want["removed"]) == 2
    for result in ranks:
        got = result[case]
        assert got["scores"].shape == want["scores"].shape and _relative(got["scores"], want["scores"]) < 1e-10
        assert got["removed"] == want["removed"]


@pytest.mark.parametrize("case", CASES)
def test_two_processes_give_one_process_flap_statistics_and_weights(
    pruned: tuple[dict[str, Any], list[dict[str, Any]]], case: str
) -> None:
    single, ranks = pruned
    want = single[case]
    assert len(want["stats"]) == 3  # the layers layer_drop left
    assert all(shape["mlp_bias"] and shape["intermediate_size"] < 128 for shape in want["shapes"])
    if CASES[case][1]["structure"] == "uniform":  # a head group goes from every layer: o_proj's means are used too
        assert all(shape["attention_bias"] and shape["kv_heads"] == 1 for shape in want["shapes"])
    for result in ranks:
        got = result[case]
        for layer, (mine, theirs) in enumerate(zip(got["stats"], want["stats"], strict=True)):
            for key, value in theirs.items():
                assert mine[key].dtype == torch.float64 and _relative(mine[key], value) < 1e-10, (layer, key)
        assert got["shapes"] == want["shapes"] and got["decisions"] == want["decisions"]
        assert got["weights"].keys() == want["weights"].keys()
        for key, weight in want["weights"].items():
            assert torch.equal(got["weights"][key], weight), key
