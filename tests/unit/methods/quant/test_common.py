"""The plan hand-over between a planning stage (BAQ) and its quantizer: keyed by path, used exactly."""

from __future__ import annotations

import pytest
import torch
from tiny import tiny_model

from compressor.engine import ModelContext, run_stages
from compressor.errors import RecipeError
from compressor.methods.quant.gptq import GPTQ, GPTQConfig
from compressor.methods.quant.rtn import RTN, RTNConfig
from compressor.models import get_adapter

QUANTIZERS = {"gptq": lambda: GPTQ(GPTQConfig(method="gptq", group_size=16)),
              "rtn": lambda: RTN(RTNConfig(method="rtn", group_size=16))}


def _context() -> ModelContext:
    model = tiny_model("llama")
    tokens = torch.randint(0, 300, (4, 16), generator=torch.Generator().manual_seed(1))
    return ModelContext(model, get_adapter(model), tokens, torch.device("cpu"), batch_size=2)


def _plan_every_linear(run: ModelContext, bits: int = 3) -> dict[str, int]:
    """A module plan as BAQ writes it, for the model as it is now: every grouped linear of every layer."""
    adapter = run.adapter
    return {f"{adapter.layer_prefix(i)}.{name}": bits
            for i in range(adapter.num_layers) for name in adapter.linear_names()}


@pytest.mark.parametrize("quantizer", QUANTIZERS)
def test_plan_is_taken_and_used(quantizer: str) -> None:
    run = _context()
    run.plans["bits"] = _plan_every_linear(run)
    run_stages(run, [QUANTIZERS[quantizer]()])
    assert {q.bits for q in run.quantized.values()} == {3} and len(run.quantized) == 3 * 7
    assert "bits" not in run.plans, "a plan serves one quantizer"


@pytest.mark.parametrize("quantizer", QUANTIZERS)
def test_plan_for_removed_layers_is_refused(quantizer: str) -> None:
    """Planned on 3 layers, quantized after layer 0 went: layers 1, 2 are now 0, 1 and the plan for the old
    layer 2 would be left over while each survivor got its predecessor's widths."""
    run = _context()
    run.plans["bits"] = _plan_every_linear(run)
    run.adapter.remove_layers([0])
    with pytest.raises(RecipeError, match=r"model\.layers\.2\.mlp\.down_proj \(and 6 more\): planned for "
                                          f"{quantizer}, but {quantizer} does not target such a module"):
        run_stages(run, [QUANTIZERS[quantizer]()])
    assert not run.quantized, "refused before any module was quantized"


@pytest.mark.parametrize("quantizer", QUANTIZERS)
def test_targeted_module_without_a_plan_entry_is_refused(quantizer: str) -> None:
    """Before: a module the plan missed silently got the quantizer's own bits, off the budget."""
    run = _context()
    plan = _plan_every_linear(run)
    del plan["model.layers.1.self_attn.k_proj"]
    run.plans["bits"] = plan
    with pytest.raises(RecipeError, match=rf"model\.layers\.1\.self_attn\.k_proj: {quantizer} targets it, but the "
                                          "plan from the stage before has no width for it"):
        run_stages(run, [QUANTIZERS[quantizer]()])


def test_without_a_plan_the_quantizers_bits_hold() -> None:
    run = _context()
    run_stages(run, [RTN(RTNConfig(method="rtn", bits=5, group_size=16))])
    assert {q.bits for q in run.quantized.values()} == {5}
