"""FLAP's plan and its application (flap_plan.plan_layer, flap_plan.apply_plan) on hand-built tensors: known answers."""

from __future__ import annotations

import torch

from compressor.methods.prune.flap_plan import Heads, LayerPlan, LayerStats, Roles, apply_plan, plan_layer

ROLES = Roles("attn.q", "attn.k", "attn.v", "attn.o", "mlp.gate", "mlp.up", "mlp.down")
LAYOUT = Heads(heads=4, kv_heads=2, head_dim=2)  # 2 query heads per KV group: a group owns 4 o_proj inputs


def _state() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    hidden = 5
    shapes = {"attn.q.weight": (8, hidden), "attn.q.bias": (8,), "attn.k.weight": (4, hidden),
              "attn.v.weight": (4, hidden), "attn.o.weight": (hidden, 8), "mlp.gate.weight": (3, hidden),
              "mlp.up.weight": (3, hidden), "mlp.down.weight": (hidden, 3), "mlp.down.bias": (hidden,)}
    return {**{name: torch.randn(shape, generator=g) for name, shape in shapes.items()},
            "norm.weight": torch.ones(hidden)}


def _plan(compensate: bool) -> LayerPlan:
    stats = LayerStats(torch.zeros(8), torch.zeros(3), torch.arange(8, dtype=torch.float64) / 4,
                        torch.tensor([0.5, -2.0, 1.0], dtype=torch.float64))
    return plan_layer(LAYOUT, stats, groups=[0], channels=[1], compensate=compensate)


def test_plan_keeps_the_other_group_and_channels_and_compensates_from_the_full_weights() -> None:
    state = _state()
    before = {name: t.clone() for name, t in state.items()}
    out = apply_plan(state, _plan(compensate=True), ROLES)
    assert all(torch.equal(state[name], before[name]) for name in state)  # the input is left as it was
    assert torch.equal(out["attn.q.weight"], before["attn.q.weight"][4:8])  # group 1's two query heads
    assert torch.equal(out["attn.q.bias"], before["attn.q.bias"][4:8])
    assert torch.equal(out["attn.k.weight"], before["attn.k.weight"][2:4])
    assert torch.equal(out["attn.v.weight"], before["attn.v.weight"][2:4])
    assert torch.equal(out["attn.o.weight"], before["attn.o.weight"][:, 4:8])
    mean = torch.arange(8, dtype=torch.float64) / 4
    expected = sum(before["attn.o.weight"][:, j].double() * mean[j] for j in range(4))
    torch.testing.assert_close(out["attn.o.bias"], expected.float(), rtol=0, atol=1e-6)  # o_proj had no bias
    for name in ("mlp.gate.weight", "mlp.up.weight"):
        assert torch.equal(out[name], before[name][[0, 2]])
    assert torch.equal(out["mlp.down.weight"], before["mlp.down.weight"][:, [0, 2]])
    torch.testing.assert_close(out["mlp.down.bias"], before["mlp.down.bias"] - 2.0 * before["mlp.down.weight"][:, 1],
                               rtol=0, atol=1e-6)  # added to the bias it had
    assert out["norm.weight"] is state["norm.weight"]


def test_without_compensation_no_bias_and_meta_tensors_get_the_same_shapes() -> None:
    out = apply_plan(_state(), _plan(compensate=False), ROLES)
    assert "attn.o.bias" not in out and torch.equal(out["mlp.down.bias"], _state()["mlp.down.bias"])
    meta = apply_plan({n: t.to("meta") for n, t in _state().items()}, _plan(compensate=True), ROLES)
    real = apply_plan(_state(), _plan(compensate=True), ROLES)
    assert {n: (t.shape, t.dtype) for n, t in meta.items()} == {n: (t.shape, t.dtype) for n, t in real.items()}
    assert all(t.is_meta for t in meta.values())


def test_a_plan_that_removes_nothing_leaves_every_tensor() -> None:
    stats = LayerStats(torch.zeros(8), torch.zeros(3), torch.zeros(8, dtype=torch.float64),
                        torch.zeros(3, dtype=torch.float64))
    state = _state()
    out = apply_plan(state, plan_layer(LAYOUT, stats, [], [], compensate=True), ROLES)
    assert all(out[name] is state[name] for name in state) and set(out) == set(state)
