"""Mixture-of-experts layers as ordinary linears, and the adapter every MoE family shares.

transformers 5.23 keeps a sparse MLP's experts as two 3-D parameters (``gate_up_proj: [E, 2I, H]``,
``down_proj: [E, H, I]``) behind ``forward(hidden, top_k_index, top_k_weights)``; checkpoints, vLLM and
compressed-tensors see one ``nn.Linear`` per expert projection (Mixtral's ``experts.{e}.w1/w3/w2``,
Qwen3-MoE's ``experts.{e}.gate_proj/up_proj/down_proj``). :class:`MoEAdapter` replaces the experts module by
:class:`LinearExperts`, the same computation over per-expert linears named as the checkpoint names them, so
every quantizer, the engine's Hessian hooks, recipe targets and the exports see ordinary linears and
transformers' own loader merges them back when the saved model is read.

An expert the router rarely picks would get a Hessian from a handful of tokens (or none: no scale at all).
While the engine gathers statistics (:meth:`MoEAdapter.statistics`), every token also runs through every
expert, with outputs discarded, so each expert's gate/up see the whole calibration set and its down
projection its own activations of it; the layer's output is computed exactly as the model routes it. The
router's choices in that pass are counted per expert for the report. The router is never a target: it is not
an ``nn.Linear`` and is in no linear group.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F  # noqa: N812
from torch import nn

from compressor.errors import UnsupportedModelError
from compressor.models.base import Family, LinearGroup, ModelAdapter


@dataclass(frozen=True)
class Experts:
    """Where a family keeps its experts, and the checkpoint's names for each expert's projections.

    ``module``: the experts module in a decoder layer; ``router``: the router (``mlp.gate``); ``gate``,
    ``up``, ``down``: each expert's projection names on disk (``w1``, ``w3``, ``w2`` for Mixtral);
    ``count``: the config attribute holding the number of experts.
    """

    module: str
    router: str
    gate: str
    up: str
    down: str
    count: str


class ExpertMLP(nn.Module):
    """One expert: ``down(act(gate(x)) * up(x))`` over three linears named as the checkpoint names them."""

    def __init__(self, names: Experts, gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor,
                 act_fn: nn.Module) -> None:
        super().__init__()
        self.names = (names.gate, names.up, names.down)
        for name, weight in zip(self.names, (gate, up, down), strict=True):
            linear = nn.Linear(weight.shape[1], weight.shape[0], bias=False, device=weight.device, dtype=weight.dtype)
            linear.weight = nn.Parameter(weight.detach().clone(), requires_grad=False)
            self.add_module(name, linear)
        self.act_fn = act_fn

    def projections(self) -> tuple[nn.Linear, nn.Linear, nn.Linear]:
        gate, up, down = (self.get_submodule(name) for name in self.names)
        assert isinstance(gate, nn.Linear) and isinstance(up, nn.Linear) and isinstance(down, nn.Linear)
        return gate, up, down

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up, down = self.projections()
        return down(self.act_fn(gate(x)) * up(x))

    def functional(self, x: torch.Tensor) -> torch.Tensor:
        """The same computation without calling the modules (no hooks fire): the routed pass of statistics."""
        gate, up, down = self.projections()
        return F.linear(self.act_fn(F.linear(x, gate.weight)) * F.linear(x, up.weight), down.weight)


class LinearExperts(nn.ModuleList):
    """Drop-in for transformers' 3-D experts module: ``forward(hidden [T, H], top_k_index [T, k],
    top_k_weights [T, k]) -> [T, H]``, the experts' eager loop over one :class:`ExpertMLP` each.

    ``route_all`` (set by :meth:`MoEAdapter.statistics`): every expert also runs on every token first
    (outputs discarded, hooks see them); ``routed`` counts the tokens the router sent each expert meanwhile.
    """

    def __init__(self, experts: list[ExpertMLP]) -> None:
        super().__init__(experts)
        self.num_experts = len(experts)
        self.route_all = False
        self.routed = torch.zeros(len(experts), dtype=torch.long)

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                top_k_weights: torch.Tensor) -> torch.Tensor:
        final = torch.zeros_like(hidden_states)
        if self.route_all:
            self.routed += torch.bincount(top_k_index.flatten().cpu(), minlength=self.num_experts)
            for expert in self:
                expert(hidden_states)  # statistics only: the hooks see every token
        with torch.no_grad():
            mask = F.one_hot(top_k_index, num_classes=self.num_experts).permute(2, 1, 0)
            hit = torch.greater(mask.sum(dim=(-1, -2)), 0).nonzero()
        for index in hit[:, 0].tolist():
            expert = self[index]
            assert isinstance(expert, ExpertMLP)
            position, token = torch.where(mask[index])
            state = hidden_states[token]
            out = expert.functional(state) if self.route_all else expert(state)
            out = out * top_k_weights[token, position, None]
            final.index_add_(0, token, out.to(final.dtype))
        return final


def linearize(experts: nn.Module, names: Experts) -> LinearExperts:
    """A :class:`LinearExperts` computing what transformers' 3-D ``experts`` module computes.

    ``gate_up_proj[e]: [2I, H]`` holds gate rows then up rows (the model splits its output with ``chunk(2)``);
    ``down_proj[e]: [H, I]``.
    """
    gate_up, down = getattr(experts, "gate_up_proj", None), getattr(experts, "down_proj", None)
    if not (isinstance(gate_up, torch.Tensor) and isinstance(down, torch.Tensor) and gate_up.dim() == 3):
        raise UnsupportedModelError(
            f"{type(experts).__name__}: expected 3-D gate_up_proj [E, 2I, H] and down_proj [E, H, I] parameters"
        )
    if getattr(experts, "has_bias", False) or not getattr(experts, "is_concatenated", True):
        raise UnsupportedModelError(f"{type(experts).__name__}: biased or interleaved experts are not supported")
    inter = gate_up.shape[1] // 2
    act_fn = getattr(experts, "act_fn")  # noqa: B009
    return LinearExperts([ExpertMLP(names, gate_up[e, :inter], gate_up[e, inter:], down[e], act_fn)
                          for e in range(gate_up.shape[0])])


class MoEAdapter(ModelAdapter):
    """A decoder whose MLPs are mixtures of experts: per-expert linears in place of the 3-D experts.

    Adapting a model linearizes its experts in place (idempotent; the model computes the same function), so
    every consumer of the adapter sees the per-expert linears. Subclasses set :attr:`experts`.
    """

    experts: Experts

    def __init__(self, model: nn.Module, family: Family) -> None:
        super().__init__(model, family)
        parent, _, name = self.experts.module.rpartition(".")
        for index, layer in enumerate(self.layers()):
            mlp = layer.get_submodule(parent)
            module = getattr(mlp, name, None)
            if isinstance(module, LinearExperts):
                continue
            if not isinstance(module, nn.Module) or not hasattr(module, "gate_up_proj"):
                raise UnsupportedModelError(
                    f"{self.layer_prefix(index)}.{parent} is {type(mlp).__name__}, without 3-D experts: "
                    f"{family.name} models whose layers mix dense and expert MLPs are not supported"
                )
            mlp.register_module(name, linearize(module, self.experts))

    @property
    def num_experts(self) -> int:
        return int(getattr(self.config, self.experts.count))

    def _expert(self, index: int, name: str) -> str:
        return f"{self.experts.module}.{index}.{name}"

    def linear_groups(self) -> list[LinearGroup]:
        """q/k/v, o, every expert's gate and up (one input: every token in statistics), each expert's down."""
        attention, e = self.family.attention, self.experts
        readers = tuple(self._expert(i, name) for i in range(self.num_experts) for name in (e.gate, e.up))
        downs = [LinearGroup((self._expert(i, e.down),)) for i in range(self.num_experts)]
        return [LinearGroup(attention.inputs), LinearGroup((attention.output,)), LinearGroup(readers), *downs]

    def fused_groups(self) -> list[LinearGroup]:
        """q/k/v and the experts' gate/up, which vLLM's fused MoE layer stacks under one scheme."""
        return [LinearGroup(self.family.attention.inputs), self.linear_groups()[2]]

    def mlp_inputs(self, layer: nn.Module) -> list[nn.Linear]:
        """Every expert's gate and up projection (the router reads the norm's output too, but is no linear)."""
        return [_linear(layer, name) for name in self.linear_groups()[2].names]

    def mlp_output(self, layer: nn.Module) -> nn.Linear:
        raise UnsupportedModelError(
            f"{self.family.name}: the MLP output is the routed sum of {self.num_experts} experts' down projections, "
            "not one linear (see mlp_outputs)"
        )

    def mlp_outputs(self, layer: nn.Module) -> list[nn.Linear]:
        """Each expert's down projection."""
        return [_linear(layer, self._expert(i, self.experts.down)) for i in range(self.num_experts)]

    def router(self, layer: nn.Module) -> nn.Module:
        """The module choosing each token's experts (``mlp.gate``)."""
        return layer.get_submodule(self.experts.router)

    def rotation_blocker(self) -> str | None:
        return (f"{self.family.name} routes each token through a router and per-expert MLPs, which rotating and "
                "slicing the residual stream does not cover yet")

    @contextmanager
    def statistics(self, layer: nn.Module) -> Iterator[None]:
        """Every token through every expert while statistics are gathered; routed counts restart."""
        experts = layer.get_submodule(self.experts.module)
        assert isinstance(experts, LinearExperts)
        experts.route_all = True
        experts.routed = torch.zeros(experts.num_experts, dtype=torch.long)
        try:
            yield
        finally:
            experts.route_all = False

    def module_facts(self, layer: nn.Module, name: str) -> dict[str, Any]:
        """For an expert's projection: the tokens the router sent that expert in the last statistics pass."""
        prefix = f"{self.experts.module}."
        if not name.startswith(prefix):
            return {}
        experts = layer.get_submodule(self.experts.module)
        assert isinstance(experts, LinearExperts)
        index = int(name.removeprefix(prefix).split(".")[0])
        return {"expert": index, "routed_tokens": int(experts.routed[index])}


def _linear(layer: nn.Module, path: str) -> nn.Linear:
    module = layer.get_submodule(path)
    assert isinstance(module, nn.Linear), f"{path} is {type(module).__name__}, not a Linear"
    return module
