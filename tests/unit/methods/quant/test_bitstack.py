"""The bitstack stage through the engine: the model holds the reconstruction at the budget, the report adds up."""

from __future__ import annotations

import pytest
import torch
from tiny import tiny_model
from torch import nn

from compressor.engine import ModelContext, run_stages
from compressor.errors import RecipeError
from compressor.methods.base import LayerRecord
from compressor.methods.quant.bitstack import BitStack, BitStackConfig, _fixed_bytes
from compressor.methods.quant.bitstack.order import BudgetError, global_order
from compressor.models import get_adapter
from compressor.recipe import build_stages, recipe_from_dict


def _run(**settings: object) -> tuple[nn.Module, BitStack, list[LayerRecord], dict[str, torch.Tensor]]:
    model = tiny_model("llama")
    dense = {p: m.weight.detach().clone() for p, m in model.named_modules() if isinstance(m, nn.Linear)}
    tokens = torch.randint(0, 300, (4, 32), generator=torch.Generator().manual_seed(0))
    run = ModelContext(model, get_adapter(model), tokens, torch.device("cpu"), batch_size=2)
    stages = build_stages([BitStackConfig.model_validate({"method": "bitstack", "iterations": 4, "rank": 2,
                                                          **settings})])
    records = run_stages(run, stages)
    stage = stages[0]
    assert isinstance(stage, BitStack)
    return model, stage, records, dense


def _weight_bytes(model: nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def test_config_defaults_and_strictness() -> None:
    config = BitStackConfig(method="bitstack")
    assert (config.iterations, config.rank, config.budget) == (16, 16, None)
    assert (config.signs, config.svd, config.dampening) == ("feedback", "lowrank", 0.3)
    for key in ("signs", "svd"):
        with pytest.raises(RecipeError, match=f"stages.0.{key}"):
            recipe_from_dict({"name": "x", "stages": [{"method": "bitstack", key: "random"}]})
    with pytest.raises(RecipeError, match="stages.0.ranks: unknown key"):
        recipe_from_dict({"name": "x", "stages": [{"method": "bitstack", "ranks": 4}]})
    with pytest.raises(RecipeError, match="stages.0.budget: budget '3 parsecs': expected a size"):
        recipe_from_dict({"name": "x", "stages": [{"method": "bitstack", "budget": "3 parsecs"}]})
    with pytest.raises(RecipeError, match="stages.0.iterations"):
        recipe_from_dict({"name": "x", "stages": [{"method": "bitstack", "iterations": 0}]})


@pytest.mark.parametrize("fmt", ["compressed-tensors", "gguf"])
def test_exports_other_than_dense_and_bitstack_are_refused_at_validation(fmt: str) -> None:
    with pytest.raises(RecipeError, match=f"stages.0: bitstack .* '{fmt}' cannot hold; use export format: bitstack"):
        recipe_from_dict({"name": "x", "stages": [{"method": "bitstack"}], "export": {"format": fmt}})
    for fine in ("dense", "bitstack"):
        recipe_from_dict({"name": "x", "stages": [{"method": "bitstack"}], "export": {"format": fine}})


def test_without_a_budget_every_block_is_loaded() -> None:
    model, stage, records, dense = _run()
    modules = dict(model.named_modules())
    assert set(stage.blocks) == {r.module for r in records} == {p for p in dense if p != "lm_head"}
    for record in records:
        assert stage.blocks[record.module] == 4 and record.extra["blocks"] == 4
        decomposition = stage.decomposed[record.module].decomposition
        assert torch.equal(modules[record.module].weight, decomposition.reconstruct(4))
        assert not torch.equal(modules[record.module].weight, dense[record.module])
    assert torch.equal(modules["lm_head"].weight, dense["lm_head"])


def test_signs_feedback_lowers_every_linears_calibration_error() -> None:
    """The stage hands each linear's Hessian to the feedback signs: the full stack's output error falls below
    the plain signs' one on every linear of the tiny model (same magnitudes for block one, better signs; undamped,
    so that the guarantee is in the calibration metric itself)."""
    feedback = _run(signs="feedback", dampening=0.0)[1].decomposed
    plain = _run(signs="residual")[1].decomposed
    for path, item in feedback.items():
        assert item.errors[1] <= plain[path].errors[1] * (1 + 1e-6), path
    assert sum(item.errors[-1] for item in feedback.values()) < sum(item.errors[-1] for item in plain.values())


def test_a_byte_budget_loads_the_reconstruction_that_fits() -> None:
    _, stage, _, _ = _run()
    full = sum(sum(d.decomposition.block_bytes()) for d in stage.decomposed.values())
    first = sum(d.decomposition.block_bytes()[0] for d in stage.decomposed.values())
    fixed = _weight_bytes(tiny_model("llama")) - sum(d.decomposition.shape[0] * d.decomposition.shape[1] * 4
                                                     for d in stage.decomposed.values())  # fp32 tiny model
    budget = fixed + (first + full) // 2
    model, stage, records, _ = _run(budget=budget)
    modules = dict(model.named_modules())
    counts = set(stage.blocks.values())
    assert len(counts) > 1, "a budget between the smallest and largest gives linears different block counts"
    stored = 0
    for record in records:
        k = stage.blocks[record.module]
        decomposition = stage.decomposed[record.module].decomposition
        assert torch.equal(modules[record.module].weight, decomposition.reconstruct(k))
        # the report's bits: signs 1 bit/weight, fp16 factors, fp16 scales with block 0, from the shapes alone
        out, columns = decomposition.shape
        expected = k * ((out * columns + 7) // 8 + (out + columns) * 2 * 2) + columns * 2
        assert record.bytes_after == expected
        assert record.bits == pytest.approx(expected * 8 / (out * columns), abs=1e-4)
        stored += expected
    assert fixed + stored <= budget
    assert budget - (fixed + stored) < max(max(d.decomposition.block_bytes()) for d in stage.decomposed.values())


def test_a_bits_per_weight_budget_counts_the_linears_only() -> None:
    model, stage, records, _ = _run(budget="20bpw")  # tiny shapes: a rank-2 block is ~2.3-3 bits per weight
    bits = sum(r.bytes_after for r in records) * 8 / sum(r.params_after for r in records)
    assert bits <= 20
    assert 1 < min(stage.blocks.values()) and max(stage.blocks.values()) <= 4


def test_a_budget_below_one_block_per_linear_is_a_one_line_error() -> None:
    with pytest.raises(BudgetError) as error:
        _run(budget="1kB")
    message = str(error.value)
    assert "\n" not in message
    assert "smallest is" in message and "(one block per linear), the largest" in message



def test_order_fisher_spends_the_budget_where_the_loss_gradients_are(monkeypatch: pytest.MonkeyPatch) -> None:
    """When the loss cares about one linear only (its outputs' squared gradients ones, every other linear's zero),
    a budget of one block per linear and one more block goes to that linear, whatever the relative order says."""
    model, measured, _, _ = _run(order="relative")  # the same decompositions (fixed seeds); sizes and the order
    relative_pick = next(path for path, index in global_order([item.chain(p, "relative")
                                                                for p, item in measured.decomposed.items()])
                         if index == 1)
    favoured = next(p for p in measured.decomposed if p != relative_pick and "layers.1." in p)
    first = sum(item.decomposition.block_bytes()[0] for item in measured.decomposed.values())
    budget = first + measured.decomposed[favoured].decomposition.block_bytes()[1] + _fixed_bytes(
        model, list(measured.decomposed))

    def fake_fisher(model: nn.Module, batches: object, paths: set[str]) -> dict[str, torch.Tensor]:
        return {p: torch.ones(model.get_submodule(p).out_features, dtype=torch.float64) * (p == favoured)
                for p in paths}

    monkeypatch.setattr("compressor.methods.quant.bitstack.output_fisher", fake_fisher)
    _, stage, records, _ = _run(order="fisher", budget=budget)
    assert stage.blocks == dict.fromkeys(measured.decomposed, 1) | {favoured: 2}
    assert {r.module: r.extra["blocks"] for r in records} == stage.blocks
    item = stage.decomposed[favoured]
    assert item.fisher_errors == pytest.approx(item.errors, rel=1e-6)  # ones on every output: the plain error
    assert all(e == 0 for p, d in stage.decomposed.items() if p != favoured for e in d.fisher_errors or [1])


def test_order_fisher_measures_the_loss_gradients_of_every_decomposed_linear() -> None:
    _, stage, _, _ = _run(order="fisher", budget="6bpw")
    assert set(stage.fisher) == set(stage.decomposed)
    assert all(weights.shape == (stage.decomposed[p].decomposition.shape[0],) and bool((weights > 0).any())
               for p, weights in stage.fisher.items())
    for item in stage.decomposed.values():
        assert item.fisher_errors is not None and len(item.fisher_errors) == len(item.errors)
