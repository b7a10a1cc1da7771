"""FLAP's per-layer plan and its application to one decoder layer's tensors: pure, no statistics pass, no I/O.

Kept apart from ``flap.py`` (the pass: measuring, scoring, choosing units, recording shapes and shipping the
modeling file) because two callers apply a plan: ``FLAP.finalize`` on the resident layers in RAM, and, under layer
streaming (``compressor.streaming``), the streamer on a layer's checkpoint tensors whenever it reads them again
(``run.stream.reshape`` holds a ``partial`` of :func:`apply_plan`). A plan (:class:`LayerPlan`) comes from one
layer's statistics alone (:class:`LayerStats`, the model's :class:`Heads` layout) and names the linears it
narrows by their paths in the layer (:class:`Roles`), so it needs no model and works on meta tensors too.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from compressor.methods.prune import flap_ops as ops
from compressor.models.base import ModelAdapter


@dataclass
class LayerStats:
    """What the pass keeps of one layer: per-unit scores and the output projections' input means (float64)."""

    attention_scores: torch.Tensor  # [o_proj inputs]: squared channel scores
    mlp_scores: torch.Tensor  # [intermediate]
    attention_mean: torch.Tensor  # [heads * head_dim]
    mlp_mean: torch.Tensor  # [intermediate]


@dataclass(frozen=True)
class Heads:
    """Head layout read from the config and checked against the weights."""

    heads: int
    kv_heads: int
    head_dim: int

    @property
    def per_group(self) -> int:
        return self.heads // self.kv_heads


@dataclass(frozen=True)
class Roles:
    """The linears FLAP narrows, as paths relative to a decoder layer (the family's description)."""

    query: str
    key: str
    value: str
    attention_output: str
    gate: str
    up: str
    mlp_output: str

    @classmethod
    def of(cls, adapter: ModelAdapter) -> Roles:
        attention, mlp = adapter.family.attention, adapter.family.mlp
        query, key, value = attention.inputs  # flap._blocker: separate q/k/v and a gate/up/down MLP
        gate, up = mlp.inputs
        return cls(query, key, value, attention.output, gate, up, mlp.output)

    @property
    def linears(self) -> tuple[str, ...]:
        return (self.query, self.key, self.value, self.attention_output, self.gate, self.up, self.mlp_output)


@dataclass(frozen=True)
class LayerPlan:
    """What FLAP does to one decoder layer, decided at finalize from that layer's statistics alone.

    Small (indices and the two output projections' input means), so a streamed run keeps every layer's plan
    while the weights are on disk. :func:`apply_plan` turns the layer's tensors into the pruned ones: in RAM
    at finalize, under layer streaming whenever the layer is next read from the checkpoint (the next pass, or
    the export's copy); the compensation bias needs the output projection's full weight, so it is computed there.
    """

    removed_groups: tuple[int, ...]
    kept_groups: tuple[int, ...]
    group_width: int  # o_proj input channels per KV group (its query heads x head_dim)
    head_dim: int
    attention_mean: torch.Tensor  # [heads * head_dim] float64: o_proj's input means
    width: int  # MLP channels before
    removed_channels: tuple[int, ...]
    mlp_mean: torch.Tensor  # [intermediate] float64: down_proj's input means
    compensate: bool

    @property
    def attention_bias(self) -> bool:
        """Whether o_proj gets a compensation bias (only for removed channels)."""
        return self.compensate and bool(self.removed_groups)

    @property
    def mlp_bias(self) -> bool:
        return self.compensate and bool(self.removed_channels)


def plan_layer(layout: Heads, stats: LayerStats, groups: list[int], channels: list[int],
               compensate: bool) -> LayerPlan:
    """The plan of one layer that loses KV ``groups`` and MLP ``channels`` (pure)."""
    return LayerPlan(
        removed_groups=tuple(groups), kept_groups=tuple(g for g in range(layout.kv_heads) if g not in groups),
        group_width=layout.per_group * layout.head_dim, head_dim=layout.head_dim,
        attention_mean=stats.attention_mean, width=stats.mlp_scores.numel(), removed_channels=tuple(channels),
        mlp_mean=stats.mlp_mean, compensate=compensate,
    )


def apply_plan(state: dict[str, torch.Tensor], plan: LayerPlan, roles: Roles) -> dict[str, torch.Tensor]:
    """One decoder layer's tensors (names relative to the layer) as FLAP leaves them; the input is not changed.

    q keeps the kept groups' query rows and k/v their KV rows, o_proj the matching columns; gate/up keep the kept
    channels' rows and down_proj those columns. With ``compensate`` each output projection gets (or adds to its
    bias) ``W[:, removed] @ mean[removed]`` computed from its full weight (:func:`flap_ops.compensation_bias`).
    Works on meta tensors too (a streamed skeleton's shapes).
    """
    out = dict(state)
    kept = torch.tensor(plan.kept_groups)
    _narrow(out, (roles.query, roles.key, roles.value), roles.attention_output,
            (ops.group_channels(kept, plan.group_width), ops.group_channels(kept, plan.head_dim)),
            ops.group_channels(torch.tensor(plan.removed_groups, dtype=torch.long), plan.group_width),
            plan.attention_mean, plan.compensate)
    removed = set(plan.removed_channels)
    channels = torch.tensor([c for c in range(plan.width) if c not in removed])
    _narrow(out, (roles.gate, roles.up), roles.mlp_output, (channels, channels),
            torch.tensor(plan.removed_channels, dtype=torch.long), plan.mlp_mean, plan.compensate)
    return out


def _narrow(state: dict[str, torch.Tensor], inputs: tuple[str, ...], writer: str,
            rows: tuple[torch.Tensor, torch.Tensor], removed: torch.Tensor, mean: torch.Tensor,
            compensate: bool) -> None:
    """Keep ``rows[0]`` of the first input linear and of the writer's columns, ``rows[1]`` of the other inputs.

    The bias is computed from the writer's full weight before it narrows.
    """
    if removed.numel() == 0:
        return
    W = state[f"{writer}.weight"]
    device = W.device
    bias = ops.compensation_bias(W, mean.to(device), removed.to(device))
    for number, name in enumerate(inputs):
        keep = rows[0 if number == 0 else 1].to(device)
        state[f"{name}.weight"] = state[f"{name}.weight"].index_select(0, keep)
        if f"{name}.bias" in state:
            state[f"{name}.bias"] = state[f"{name}.bias"].index_select(0, keep)
    state[f"{writer}.weight"] = W.index_select(1, rows[0].to(device))
    if compensate:
        key = f"{writer}.bias"
        state[key] = state[key] + bias if key in state else bias


def assign(layer: nn.Module, state: dict[str, torch.Tensor], roles: Roles) -> None:
    """Give the layer's linears the tensors of ``state`` (from :func:`apply_plan`) and their new sizes."""
    for name in roles.linears:
        linear = layer.get_submodule(name)
        assert isinstance(linear, nn.Linear)
        weight = state[f"{name}.weight"]
        if weight is not linear.weight:
            linear.weight = nn.Parameter(weight, requires_grad=linear.weight.requires_grad)
            linear.out_features, linear.in_features = weight.shape
        bias = state.get(f"{name}.bias")
        if bias is not None and bias is not linear.bias:
            linear.bias = nn.Parameter(bias, requires_grad=True if linear.bias is None else linear.bias.requires_grad)
