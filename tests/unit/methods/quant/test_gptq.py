"""GPTQ through the engine: beats RTN on every module's output error on every family, and gives the codes of a
slow reference (with and without act-order) on the Hessians the engine collects."""

from __future__ import annotations

import pytest
import torch
from reference_gptq import reference_gptq
from tiny import FAMILIES, tiny_model

from compressor.engine import ModelContext, run_stages
from compressor.errors import RecipeError
from compressor.methods.quant import gptq as gptq_module
from compressor.methods.quant.gptq import GPTQ, GPTQConfig
from compressor.methods.quant.gptq_ops import GPTQResult, gptq_quantize
from compressor.methods.quant.rtn import RTN, RTNConfig
from compressor.methods.registry import get_method
from compressor.models import get_adapter
from compressor.recipe import build_stages


def _errors(family: str, method: object) -> dict[str, float]:
    model = tiny_model(family)
    tokens = torch.randint(0, 300, (8, 32), generator=torch.Generator().manual_seed(1))
    run = ModelContext(model, get_adapter(model), tokens, torch.device("cpu"), batch_size=4)
    return {r.module: r.rel_error for r in run_stages(run, [method])}


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize(("bits", "group_size"), [(4, -1), (3, 32), (2, 16)])
def test_gptq_beats_rtn_on_layer_error(family: str, bits: int, group_size: int) -> None:
    scheme = dict(bits=bits, group_size=group_size, symmetric=True)
    gptq = _errors(family, GPTQ(GPTQConfig(method="gptq", act_order=False, **scheme)))
    rtn = _errors(family, RTN(RTNConfig(method="rtn", **scheme)))
    assert gptq.keys() == rtn.keys()
    assert sum(gptq.values()) < sum(rtn.values())
    # module by module, except where both errors are already tiny
    assert sum(g < r for g, r in zip(gptq.values(), rtn.values(), strict=True)) >= 0.8 * len(gptq)


@pytest.mark.parametrize("act_order", [True, False])
def test_engine_gives_the_slow_reference_codes(act_order: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every linear of a real pass gets the codes of tests/reference_gptq.py on the Hessian the engine built.

    The reference orders columns itself (descending diag(H) with act-order), so a stage that dropped or
    ignored ``act_order`` fails here; the asymmetric grid has no halfway ties (see test_gptq_ops.py).
    """
    calls: list[tuple[torch.Tensor, torch.Tensor, GPTQResult]] = []

    def recording(W: torch.Tensor, H: torch.Tensor, *args: object, **kwargs: object) -> GPTQResult:
        result = gptq_quantize(W, H, *args, **kwargs)  # type: ignore[arg-type]
        calls.append((W.clone(), H.clone(), result))
        return result

    monkeypatch.setattr(gptq_module, "gptq_quantize", recording)
    # the reference's min/max scales: no search (GPTQ's default searches them, weighted by diag(H))
    config = GPTQConfig(method="gptq", bits=3, group_size=32, symmetric=False, act_order=act_order,
                        scale_search="none")
    model = tiny_model("llama")
    tokens = torch.randint(0, 300, (8, 32), generator=torch.Generator().manual_seed(1))
    run = ModelContext(model, get_adapter(model), tokens, torch.device("cpu"), batch_size=4)
    records = run_stages(run, build_stages([config]))
    assert len(records) == 21 and len(calls) == 12  # 3 layers x 7 linears, q/k/v and gate/up solved stacked
    reordered = 0
    for W, H, result in calls:
        codes, W_hat = reference_gptq(W, H, 3, 32, symmetric=False, act_order=act_order)
        other, _ = reference_gptq(W, H, 3, 32, symmetric=False, act_order=not act_order)
        reordered += int((codes != other).sum())
        assert torch.equal(result.qweight.q.double(), codes)
        torch.testing.assert_close(result.W_hat.double(), W_hat, rtol=1e-6, atol=1e-6)
    assert reordered > 0.05 * sum(W.numel() for W, _, _ in calls)  # the order matters on these Hessians


def test_bits_must_be_storable() -> None:
    with pytest.raises(ValueError, match="bits 2, 3, 4 or 8"):
        GPTQConfig(method="gptq", bits=5)


#: The second stage on linears the first already quantized: gptq solves q/k/v stacked, rtn one linear at a time;
#: dgq and bitstack claim each linear through the same check (common.claim_linear).
SECOND_STAGES = {"gptq": {"bits": 4, "group_size": 32}, "rtn": {"bits": 4, "group_size": 32}, "dgq": {},
                 "bitstack": {"iterations": 2, "rank": 2, "order": "relative"}}


@pytest.mark.parametrize("method", list(SECOND_STAGES))
def test_a_linear_quantized_by_two_stages_is_refused(method: str) -> None:
    second = get_method(method).config_class(method=method, **SECOND_STAGES[method])
    first = second if method in ("gptq", "rtn") else RTNConfig(method="rtn", bits=4, group_size=32)
    model = tiny_model("llama")
    run = ModelContext(model, get_adapter(model), torch.randint(0, 300, (2, 16)), torch.device("cpu"), batch_size=2)
    with pytest.raises(RecipeError, match=r"model\.layers\.0\.self_attn\.q_proj is quantized by two stages"):
        run_stages(run, build_stages([first, second]))
