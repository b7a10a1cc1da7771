"""FLAP (An et al., 2024): remove attention heads and MLP channels whose inputs barely fluctuate, add their mean back.

The pass measures, per decoder layer, the running mean and variance of every input channel of the attention
output projection and of the MLP output projection (``flap_ops``), and scores heads and channels. ``finalize``
standardises each layer's scores per module, picks the units to remove under the parameter budget (one global threshold,
per layer, or uniform), narrows the linears in memory, and with ``compensate`` adds the removed channels' mean
contribution as a bias of the output projections. The stage is model-level: the global choice needs every
layer's scores, and the stages after it (GPTQ...) get a fresh pass over the narrower model. Under torchrun each
process measures its share of the batches and the moments are merged across processes before any score is
taken, so every process holds the one-process statistics and makes the same plan.

Plan and application are split so that a streamed model (``compressor.streaming``) runs the same code: the plan
of a layer (``flap_plan.LayerPlan``: removed and kept groups and channels, the input means) comes from its
statistics alone, and ``flap_plan.apply_plan`` is a pure function on the layer's tensors, kept in that module with
the plan's types; this one is the pass (measure, score, choose, record). In RAM it runs on the resident layer at
finalize; streamed, on the meta skeleton at finalize (shapes, config) and on the layer's checkpoint tensors
whenever the streamer reads them again (the next pass, or the export's copy), where the compensation bias is
computed from the output projection's full weight as in RAM.

Heads go as whole KV groups (a key/value head and the query heads that read it). Removing query heads evenly
inside each group would keep the KV cache, but every layer's ``num_key_value_groups`` would then differ from
what the config says; removing whole groups keeps the family's attention code unchanged (its head count comes
from the weights' shapes, its query-per-KV ratio from the config, which stays right), so each layer stays
loadable with only per-layer head counts. Without GQA a group is one head.

Storage: a model whose layers all keep the same heads and width and got no new bias is a standard, smaller
model of its family (the config's head counts, ``head_dim`` and ``intermediate_size`` are updated, so
``format: dense`` reloads it in stock transformers). Anything else ships
``compressor/models/shipped/modeling_flap.py``: config.json ``flap`` records every layer's head counts, width
and output biases, and ``auto_map`` names the class that builds the stock model and resizes its linears before
the weights load (the same function sets the in-memory attention modules' head counts). ``dense`` and
``compressed-tensors`` (after a quantizing stage) store both; GGUF and BitStack cannot.
"""

from __future__ import annotations

from functools import partial
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from pydantic import Field
from torch import nn

from compressor.distributed import is_distributed, world_size
from compressor.errors import RecipeError
from compressor.methods.base import LayerRecord, Method, MethodConfig
from compressor.methods.prune import flap_ops as ops
from compressor.methods.prune.flap_plan import (
    Heads,
    LayerPlan,
    LayerStats,
    Roles,
    apply_plan,
    assign,
    plan_layer,
)
from compressor.methods.registry import register_method
from compressor.models.base import ModelAdapter
from compressor.models.shipped import auto_class_name
from compressor.models.shipped.modeling_flap import PREFIX, set_head_counts

if TYPE_CHECKING:
    from compressor.engine import LayerContext, ModelContext

REMOTE_CODE_FILE = "modeling_flap.py"
#: Formats that store the per-layer shapes and biases (the modeling file travels with each; bitstack's loads into it).
STORABLE_FORMATS = ("dense", "compressed-tensors", "bitstack")
#: What config.json ``flap.layers`` holds per layer (what ``modeling_flap.narrow_layer`` reads).
SHAPE_KEYS = ("heads", "kv_heads", "intermediate_size", "attention_output_bias", "mlp_output_bias")


class FLAPConfig(MethodConfig):
    """Fluctuation-based structured pruning of whole KV head groups and MLP channels, with bias compensation.

    ```yaml
    - method: flap
      ratio: 0.2             # fraction of the attention + MLP parameters to remove (never exceeded)
      metric: fluctuation    # fluctuation (the paper's WIFV) | weight_norm | activation_norm
      structure: uniform     # uniform | per_layer | global (the paper's adaptive structure)
      compensate: false      # add the removed channels' mean contribution as o_proj / down_proj biases
      round_to: 1            # keep a multiple of this many MLP channels per layer (e.g. a later group_size)
    ```
    Defaults give a standard model that stock transformers loads (same heads and width in every layer, no
    bias); ``structure: global`` and ``compensate: true`` (the paper's) are stored with FLAP's shipped
    modeling file (``auto_map``), in ``format: dense`` or ``compressed-tensors``.
    """

    ratio: float = Field(0.2, gt=0, lt=1, description="Fraction of the attention and MLP parameters to remove.")
    metric: ops.Metric = Field(
        "fluctuation", description="fluctuation: input variance x squared weight-column norm (WIFV); weight_norm: "
        "squared column norm; activation_norm: RMS of the input x column norm."
    )
    structure: ops.Structure = Field(
        "uniform", description="global: one threshold over standardised scores of every layer; per_layer: each "
        "layer loses ratio of its parameters; uniform: each layer loses floor(ratio x groups) head groups and spends "
        "the rest of its ratio on channels (the same counts in every layer)."
    )
    compensate: bool = Field(False, description="Add the removed input channels' mean contribution as a bias.")
    round_to: int = Field(
        1, ge=1, description="Each layer keeps a multiple of this many MLP channels (rounded up: fewer are removed "
        "than ratio allows); set it to a later quantizer's group_size so its groups divide down_proj's input."
    )


def _blocker(adapter: ModelAdapter) -> str | None:
    """Why FLAP cannot narrow this model's layers yet, or None (llama layout: separate q/k/v, gated MLP)."""
    family, layer = adapter.family, adapter.layers()[0]
    if adapter.num_experts:
        return f"{family.name} is a mixture of experts (router and per-expert MLPs): not supported yet"
    if len(family.attention.inputs) != 3:
        return f"{family.name} fuses q/k/v into {family.attention.inputs[0]}: not supported yet"
    if len(family.mlp.inputs) != 2:
        return f"{family.name}'s MLP is not a gate/up/down triple ({', '.join(family.mlp.inputs)}): not supported yet"
    if adapter.post_norms(layer) or adapter.uses_layernorm:
        return f"{family.name} has post-norms or LayerNorm branches: not supported yet"
    return None


def _heads(adapter: ModelAdapter) -> Heads:
    config = adapter.config
    heads = int(config.num_attention_heads)
    kv_heads = int(getattr(config, "num_key_value_heads", None) or heads)
    head_dim = int(getattr(config, "head_dim", None) or adapter.hidden_size // heads)
    for index, layer in enumerate(adapter.layers()):
        q, k, _ = adapter.attention_inputs(layer)
        if heads % kv_heads or q.out_features != heads * head_dim or k.out_features != kv_heads * head_dim:
            raise RecipeError(f"flap: {adapter.layer_prefix(index)}'s attention does not have the config's "
                              f"{heads} heads / {kv_heads} KV heads of {head_dim} (already pruned?)")
    return Heads(heads, kv_heads, head_dim)


def _moments_of_every_process(local: ops.Moments | None, linear: nn.Linear) -> ops.Moments:
    """The moments of ``linear``'s inputs over every process's tokens (this process's ``local`` in one process).

    Each process's (count, mean, M2) is gathered and merged in rank order (:func:`flap_ops.merge_moments`), so the
    variance is that of all tokens, not an average of per-process variances. Collective: every process calls it
    for the same linears in the same order; a process without tokens sends a count of 0 rather than skipping.
    """
    width = linear.in_features
    if local is None:
        zeros = torch.zeros(width, dtype=torch.float64, device=linear.weight.device)
        local = ops.Moments(0, zeros, zeros)
    if not is_distributed():
        return local
    packed = torch.cat([local.mean.new_tensor([float(local.n)]), local.mean, local.m2])  # float64: counts < 2^53
    parts = [torch.empty_like(packed) for _ in range(world_size())]
    dist.all_gather(parts, packed)
    merged: ops.Moments | None = None
    for part in parts:
        merged = ops.merge_moments(merged, ops.Moments(int(part[0]), part[1 : 1 + width], part[1 + width :]))
    assert merged is not None
    return merged


@register_method("flap")
class FLAP(Method):
    config_class = FLAPConfig
    kind = "prune"
    model_level = True
    #: Its moments are merged across processes (:func:`_moments_of_every_process`); the plan then follows from
    #: statistics every process holds identically, so every process prunes the same units.
    supports_distributed = True

    def __init__(self, config: MethodConfig) -> None:
        super().__init__(config)
        self._stats: list[LayerStats] = []
        self._layout: Heads | None = None

    @property
    def cfg(self) -> FLAPConfig:
        assert isinstance(self.config, FLAPConfig)
        return self.config

    @classmethod
    def check_recipe(cls, config: MethodConfig, later: list[MethodConfig], export_format: str) -> str | None:
        from compressor.methods.registry import get_method

        assert isinstance(config, FLAPConfig)
        if export_format not in STORABLE_FORMATS:
            return (f"flap: {export_format} cannot store per-layer head counts, MLP widths and new biases; "
                    f"use format: {' or '.join(STORABLE_FORMATS)}")
        for stage in later:
            if get_method(stage.method).kind == "prune":
                return (f"flap must be the last pruning stage: {stage.method} after it would change the layers "
                        "whose shapes it records")
        return None

    def prepare(self, run: ModelContext) -> list[LayerRecord]:
        reason = _blocker(run.adapter)
        if reason:
            raise RecipeError(f"flap cannot prune this model: {reason}")
        shipped = (run.structure.get("remote_code") or {}).get("file")
        if shipped or getattr(run.adapter.config, "flap", None):
            what = f"that ships {shipped}" if shipped else "FLAP already pruned"
            raise RecipeError(f"flap cannot prune a model {what}; start from the original model")
        self._layout = _heads(run.adapter)
        self._stats = []
        return []

    def apply(self, ctx: LayerContext) -> list[LayerRecord]:
        """Measure the inputs of the two output projections and score this layer's head groups and channels."""
        assert self._layout is not None
        o_proj, down = ctx.adapter.attention_output(ctx.layer), ctx.adapter.mlp_output(ctx.layer)
        moments: dict[str, ops.Moments | None] = {"attention": None, "mlp": None}

        def folder(key: str) -> Any:
            def fold(x: torch.Tensor) -> None:
                moments[key] = ops.accumulate_moments(moments[key], x)
            return fold

        ctx.collect_many([(o_proj, folder("attention")), (down, folder("mlp"))])
        attention = _moments_of_every_process(moments["attention"], o_proj)
        mlp = _moments_of_every_process(moments["mlp"], down)
        # o_proj's channel scores are squared before they are standardised and averaged per head (the reference's
        # choice): a head is then scored mostly by its strongest channels.
        attention_scores = ops.channel_scores(self.cfg.metric, attention, o_proj.weight).square()
        mlp_scores = ops.channel_scores(self.cfg.metric, mlp, down.weight)
        self._stats.append(LayerStats(attention_scores, mlp_scores, attention.mean, mlp.mean))
        return []

    def _units(self, run: ModelContext) -> list[ops.Unit]:
        """Every head group and channel with its standardised score and the parameters it removes."""
        assert self._layout is not None
        layer = run.adapter.layers()[0]
        qkv_bias = run.adapter.attention_inputs(layer)[0].bias is not None
        gate_bias = run.adapter.mlp_inputs(layer)[0].bias is not None
        hidden = run.adapter.hidden_size
        group_cost = ops.head_group_params(hidden, self._layout.head_dim, self._layout.per_group, qkv_bias)
        channel_cost = ops.mlp_channel_params(hidden, len(run.adapter.family.mlp.inputs), gate_bias)
        group_width = self._layout.per_group * self._layout.head_dim
        attention = [ops.group_means(ops.standardize(s.attention_scores), group_width) for s in self._stats]
        mlp = [ops.standardize(s.mlp_scores) for s in self._stats]
        units = []
        for index in range(len(self._stats)):
            units += [ops.Unit(index, "attention", i, float(v), group_cost) for i, v in enumerate(attention[index])]
            units += [ops.Unit(index, "mlp", i, float(v), channel_cost) for i, v in enumerate(mlp[index])]
        return units

    def finalize(self, run: ModelContext) -> list[LayerRecord]:
        """Choose every layer's plan from the statistics and apply it: to the resident layers in RAM, or, streamed,
        to the meta skeleton (its shapes and config) and to each layer's checkpoint tensors when next read."""
        assert self._layout is not None
        units = self._units(run)
        chosen = ops.round_kept_channels(units, ops.select_units(units, self.cfg.ratio, self.cfg.structure),
                                         self.cfg.round_to)
        roles = Roles.of(run.adapter)
        records: list[LayerRecord] = []
        shapes: list[dict[str, Any]] = []
        for index, layer in enumerate(run.adapter.layers()):
            groups = sorted(u.index for u in chosen if u.layer == index and u.kind == "attention")
            channels = sorted(u.index for u in chosen if u.layer == index and u.kind == "mlp")
            plan = plan_layer(self._layout, self._stats[index], groups, channels, self.cfg.compensate)
            layer_records, shape = self._prune_layer(run.adapter, index, layer, plan, roles)
            if run.stream is not None:  # the skeleton is on meta: the real tensors get the plan when read
                run.stream.reshape(layer, partial(apply_plan, plan=plan, roles=roles))
            records += layer_records
            shapes.append(shape)
        self._stats = []
        standard = _make_standard(run.adapter, self._layout, shapes)
        if not standard:
            _ship_modeling_file(run, self._layout, shapes)
        run.structure["flap"] = {
            "metric": self.cfg.metric, "structure": self.cfg.structure, "ratio": self.cfg.ratio,
            "compensate": self.cfg.compensate, "head_dim": self._layout.head_dim, "layers": shapes,
            "standard": standard,
        }
        return records

    def _prune_layer(
        self, adapter: ModelAdapter, index: int, layer: nn.Module, plan: LayerPlan, roles: Roles
    ) -> tuple[list[LayerRecord], dict[str, Any]]:
        """Apply ``plan`` to one layer's modules; one record per sublayer and the layer's new shape."""
        assert self._layout is not None
        layout = self._layout
        attention_linears = [*adapter.attention_inputs(layer), adapter.attention_output(layer)]
        mlp_linears = [*adapter.mlp_inputs(layer), adapter.mlp_output(layer)]
        before = [_numel(attention_linears), _numel(mlp_linears)]
        with torch.no_grad():  # the layer's own parameters go in, so unchanged ones are kept as they are
            assign(layer, apply_plan(dict(layer.state_dict(keep_vars=True)), plan, roles), roles)
        attention_linears = [*adapter.attention_inputs(layer), adapter.attention_output(layer)]
        mlp_linears = [*adapter.mlp_inputs(layer), adapter.mlp_output(layer)]
        after = [_numel(attention_linears), _numel(mlp_linears)]
        prefix = adapter.layer_prefix(index)
        shape = {"kv_heads": len(plan.kept_groups), "heads": len(plan.kept_groups) * layout.per_group,
                 "intermediate_size": plan.width - len(plan.removed_channels),
                 "attention_bias": plan.attention_bias, "mlp_bias": plan.mlp_bias,
                 "attention_output_bias": adapter.attention_output(layer).bias is not None,
                 "mlp_output_bias": adapter.mlp_output(layer).bias is not None}
        set_head_counts(adapter.attention(layer), shape["heads"], shape["kv_heads"])
        groups = list(plan.removed_groups)
        facts: list[dict[str, Any]] = [
            {"heads_before": layout.heads, "heads_after": shape["heads"], "kv_heads_after": shape["kv_heads"],
             "removed_kv_groups": groups, "bias_added": plan.attention_bias},
            {"width_before": plan.width, "width_after": shape["intermediate_size"],
             "removed_channels": len(plan.removed_channels), "bias_added": plan.mlp_bias},
        ]
        records = []
        for sub, b, a, extra in zip((adapter.family.attention, adapter.family.mlp), before, after, facts, strict=True):
            note = f"{a}/{b} parameters kept" + (", bias compensation added" if extra["bias_added"] else "")
            records.append(LayerRecord(
                module=f"{prefix}.{sub.modules[0]}", method=self.name, kept_fraction=a / b, params_before=b,
                params_after=a, note=note, extra={"layer": index, "metric": self.cfg.metric, **extra},
            ))
        return records, shape



def _numel(linears: list[nn.Linear]) -> int:
    return sum(p.numel() for linear in linears for p in linear.parameters())


def _ship_modeling_file(run: ModelContext, layout: Heads, shapes: list[dict[str, Any]]) -> None:
    """Record the per-layer shapes in the config (``flap``) and ship ``modeling_flap.py`` to rebuild them."""
    spec = {
        "version": 1, "head_dim": layout.head_dim, "layout": run.adapter.family.layout(),
        "layers": [{key: shape[key] for key in SHAPE_KEYS} for shape in shapes],
    }
    run.adapter.config.flap = spec
    try:
        class_name = auto_class_name(PREFIX, run.model)
    except LookupError as exc:
        raise RecipeError(f"flap: no modeling class for this model: {exc}") from None
    run.structure["remote_code"] = {
        "file": REMOTE_CODE_FILE,
        "auto_map": {"AutoModelForCausalLM": f"{REMOTE_CODE_FILE.removesuffix('.py')}.{class_name}"},
        "config": {"flap": spec},
    }


def _make_standard(adapter: ModelAdapter, layout: Heads, shapes: list[dict[str, Any]]) -> bool:
    """Update the config to the new head counts and width when every layer agrees and got no bias.

    Returns True when the model is then a standard one of its family (stock transformers loads it); otherwise
    the config is left alone and the per-layer shapes are only in the structure record.
    """
    config = adapter.config
    first = shapes[0]
    uniform = all(s["kv_heads"] == first["kv_heads"] and s["intermediate_size"] == first["intermediate_size"]
                  for s in shapes)
    biased = any(s["attention_bias"] or s["mlp_bias"] for s in shapes)
    if not uniform or biased or not hasattr(config, "intermediate_size"):
        return False
    config.num_attention_heads = first["heads"]
    config.num_key_value_heads = first["kv_heads"]
    config.head_dim = layout.head_dim  # no longer hidden_size / heads once heads go
    config.intermediate_size = first["intermediate_size"]
    return True
