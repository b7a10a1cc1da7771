"""Mixture-of-experts families: per-expert linears that compute what transformers' 3-D experts compute, every
expert calibrated on every token (the layer's output untouched), per-expert Hessians, routed-token counts.

References are written here: the router's top-k (Mixtral's and Qwen3-MoE's formula) and the expert MLP
``down(silu(gate(x)) * up(x))`` on the MoE block's input, read from the unpatched model by a hook.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F  # noqa: N812
from tiny import tiny_model
from torch import nn

from compressor.engine import LayerContext, ModelContext, run_stages
from compressor.errors import UnsupportedModelError
from compressor.methods.registry import get_method
from compressor.models import FAMILIES as FAMILY_TABLE
from compressor.models import get_adapter
from compressor.models.base import LinearGroup
from compressor.models.moe import MoEAdapter
from compressor.recipe import build_stages

#: Every mixture-of-experts family in the table (8 experts, top-2 in tests/tiny.py).
MOE_FAMILIES = [family.name for family in FAMILY_TABLE if issubclass(family.adapter, MoEAdapter)]
TOKENS = torch.randint(0, 300, (4, 32), generator=torch.Generator().manual_seed(0))


def _top_k(router: nn.Module, x: torch.Tensor, banned: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference routing of ``x: [T, H]``: softmax over the router's logits, top-k, renormalized (Mixtral)."""
    logits = F.linear(x, router.weight)
    if banned is not None:
        logits[:, banned] = float("-inf")
    probs = torch.softmax(logits.float(), dim=-1)
    weights, index = torch.topk(probs, router.top_k, dim=-1)
    if getattr(router, "norm_topk_prob", True):
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights.to(x.dtype), index


def _ban(router: nn.Module, expert: int) -> None:
    """Make the router never pick ``expert`` (its logit is -inf), as the model's own forward returns it."""

    def forward(hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x = hidden_states.reshape(-1, router.hidden_dim)
        weights, index = _top_k(router, x, banned=expert)
        return F.linear(x, router.weight), weights, index

    router.forward = forward


def _mlp_inputs(model: nn.Module, layer: int) -> torch.Tensor:
    """What the MoE block of ``layer`` reads on TOKENS, ``[T, H]``, from a plain forward."""
    seen: list[torch.Tensor] = []
    handle = model.model.layers[layer].mlp.register_forward_pre_hook(lambda _m, args: seen.append(args[0]))
    with torch.no_grad():
        model(TOKENS)
    handle.remove()
    return torch.cat([s.reshape(-1, s.shape[-1]) for s in seen])


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_linear_experts_compute_what_the_3d_experts_compute(family: str) -> None:
    model = tiny_model(family)
    with torch.no_grad():
        native = model(TOKENS).logits
        model.set_experts_implementation("eager")
        eager = model(TOKENS).logits
        adapter = get_adapter(model)
        linear = model(TOKENS).logits
    experts = adapter.layers()[0].get_submodule(adapter.experts.module)
    assert type(experts).__name__ == "LinearExperts" and len(experts) == adapter.num_experts == 8
    assert torch.equal(linear, eager)
    torch.testing.assert_close(linear, native)
    assert get_adapter(model).layers()[0].get_submodule(adapter.experts.module) is experts  # idempotent


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_statistics_send_every_token_to_every_expert_and_leave_the_output(family: str) -> None:
    model = tiny_model(family)
    adapter = get_adapter(model)
    layer = adapter.layers()[1]
    with torch.no_grad():
        plain = model(TOKENS).logits
    seen: dict[str, int] = {}
    hooks = [module.register_forward_pre_hook(lambda m, args, name=name: seen.__setitem__(name, args[0].shape[0]))
             for name, module in layer.named_modules() if isinstance(module, nn.Linear) and ".experts." in name]
    with torch.no_grad(), adapter.statistics(layer):
        during = model(TOKENS).logits
    for hook in hooks:
        hook.remove()
    assert torch.equal(during, plain)
    assert len(seen) == 3 * adapter.num_experts and set(seen.values()) == {TOKENS.numel()}
    with torch.no_grad():
        after = model(TOKENS).logits
    assert torch.equal(after, plain)


def _engine_layer(model: nn.Module, index: int) -> LayerContext:
    adapter = get_adapter(model)
    run = ModelContext(model, adapter, TOKENS, torch.device("cpu"), batch_size=2)
    captured = run.capture_inputs()
    hidden = captured.hidden
    for i in range(index):  # the inputs of layer ``index`` from the unchanged layers before it
        hidden = LayerContext(index=i, layer=adapter.layers()[i], run=run, inputs=captured.layer(i, hidden)).forward()
    return LayerContext(index=index, layer=adapter.layers()[index], run=run, inputs=captured.layer(index, hidden))


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_each_expert_has_its_own_hessian_from_every_token(family: str) -> None:
    model = tiny_model(family)
    ctx = _engine_layer(model, 1)
    names = ctx.adapter.experts
    x = _mlp_inputs(model, 1).double()
    n = x.shape[0]
    torch.testing.assert_close(ctx.hessian(ctx.adapter.linear_groups()[2]), (2 / n * x.T @ x).float())
    for expert in (0, 5):
        mlp = ctx.module(f"{names.module}.{expert}")
        gate, up = mlp.get_submodule(names.gate).weight.double(), mlp.get_submodule(names.up).weight.double()
        act = F.silu(x @ gate.T) * (x @ up.T)
        H = ctx.hessian(LinearGroup((f"{names.module}.{expert}.{names.down}",)))
        torch.testing.assert_close(H, (2 / n * act.T @ act).float())


@pytest.mark.parametrize("family", MOE_FAMILIES)
@pytest.mark.parametrize("method", ["rtn", "gptq"])
def test_an_expert_the_router_never_picks_is_quantized_with_finite_scales(family: str, method: str) -> None:
    model = tiny_model(family)
    adapter = get_adapter(model)
    banned = adapter.num_experts - 1
    for layer in adapter.layers():
        _ban(adapter.router(layer), banned)
    before = {name: m.weight.detach().clone() for name, m in model.named_modules() if isinstance(m, nn.Linear)}
    routers_before = [adapter.router(layer).weight.detach().clone() for layer in adapter.layers()]
    run = ModelContext(model, adapter, TOKENS, torch.device("cpu"), batch_size=2)
    config = get_method(method).config_class.model_validate({"method": method, "bits": 4, "group_size": 16})
    records = {r.module: r for r in run_stages(run, build_stages([config], "dense"))}
    experts = [path for path in before if ".experts." in path]
    assert len(experts) == 3 * 3 * adapter.num_experts and set(experts) <= set(records)
    for path in experts:
        qweight, record = run.quantized[path], records[path]
        assert torch.isfinite(qweight.scale).all() and (qweight.scale != 0).all(), path
        assert not torch.equal(model.get_submodule(path).weight, before[path]), path
        assert record.rel_error is not None and 0 < record.rel_error < 1, path
        expert = int(path.split(".experts.")[1].split(".")[0])
        assert record.extra["expert"] == expert
        assert (record.extra["routed_tokens"] == 0) == (expert == banned), (path, record.extra)
    routers = [adapter.router(layer) for layer in adapter.layers()]
    assert not any(path.endswith(f".{adapter.experts.router}") for path in records)  # never a target
    assert all(torch.equal(r.weight, w) for r, w in zip(routers, routers_before, strict=True))


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_records_count_the_tokens_the_router_sent(family: str) -> None:
    """RTN gathers layer 0's statistics before changing anything: the counts are the plain model's routing."""
    model = tiny_model(family)
    router = get_adapter(model).router(get_adapter(model).layers()[0])
    _, index = _top_k(router, _mlp_inputs(model, 0))
    expected = torch.bincount(index.flatten(), minlength=8)
    run = ModelContext(model, get_adapter(model), TOKENS, torch.device("cpu"), batch_size=2)
    config = get_method("rtn").config_class.model_validate({"method": "rtn", "bits": 4, "group_size": 16})
    records = run_stages(run, build_stages([config], "dense"))
    counted = _by_expert(records, "model.layers.0.", lambda extra: extra["routed_tokens"])
    assert counted == expected.tolist()
    assert sum(counted) == TOKENS.numel() * router.top_k


def _by_expert(records: list, prefix: str, value: Callable[[dict], int]) -> list[int]:
    rows = {r.extra["expert"]: value(r.extra) for r in records if r.module.startswith(prefix) and "expert" in r.extra}
    return [rows[e] for e in sorted(rows)]


def test_layers_mixing_dense_and_expert_mlps_are_refused() -> None:
    with pytest.raises(UnsupportedModelError, match=r"model\.layers\.1\.mlp is Qwen3MoeMLP, .*mix dense and expert"):
        get_adapter(tiny_model("qwen3_moe", mlp_only_layers=[1]))


def test_report_lists_the_tokens_routed_to_each_expert() -> None:
    from compressor.report import experts_markdown

    rows = [{"module": f"model.layers.{i}.mlp.experts.{e}.{p}", "method": "gptq",
             "extra": {"expert": e, "routed_tokens": [5, 0, 3][e] + i}} for i in range(2) for e in range(3)
            for p in ("w1", "w2")]
    rows.append({"module": "model.layers.0.self_attn.q_proj", "method": "gptq", "extra": {}})
    assert experts_markdown(rows)[-2:] == ["| model.layers.0.mlp.experts | gptq | 5 0 3 | 1 |",
                                           "| model.layers.1.mlp.experts | gptq | 6 1 4 | - |"]
    assert experts_markdown(rows[-1:]) == []
