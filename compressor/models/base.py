"""The family description and the adapter that reads it: roles of a causal LM's modules, said once per family.

A family (``models/<family>.py``) is a :class:`Family`: where its layers, embeddings and norms live, the two
residual branches of a decoder layer (:class:`Sublayer`: norm, readers, writer, what computes it, an optional
norm after it), the norm kind, the embedding scale, which linears serving stacks fuse, the rotary modules and
its GGUF architecture names. :class:`ModelAdapter` answers every role from that description, so methods never
spell attribute names; a family adds behaviour that is not data (why its layers cannot be folded, config
updates after layers are removed) by subclassing the adapter in the same file. The shipped modeling files get
the same facts through :meth:`Family.layout`, which the methods write into the exported config.json.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from contextlib import AbstractContextManager, nullcontext
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import torch
from torch import nn

#: ``rms``: ``x / rms(x) * w`` (Llama); ``rms_one_plus``: ``x / rms(x) * (1 + w)`` (Gemma);
#: ``layernorm``: ``(x - mean) / std * w + b`` (OPT).
NormKind = Literal["rms", "rms_one_plus", "layernorm"]


@dataclass(frozen=True)
class LinearGroup:
    """Linears of one decoder layer that read the same input (q/k/v; gate/up): one Hessian serves all.

    ``names`` are paths relative to the decoder layer. Groups are listed in data-flow order so a
    sequential method sees statistics produced by already-transformed predecessors.
    """

    names: tuple[str, ...]


@dataclass(frozen=True)
class Sublayer:
    """One residual branch of a decoder layer (attention or MLP); every path is relative to the layer.

    The branch computes ``x + post_norm(modules(norm(x)))``: ``modules`` are applied in order to the norm's
    output (one module, ``self_attn`` or ``mlp``, or the parts living on the layer itself, OPT's ``fc1``,
    ``activation_fn``, ``fc2``); ``inputs`` are the linears reading the norm's output, ``output`` the one
    writing back into the residual stream; ``post_norm`` normalizes the branch's output before the addition
    (Gemma), None when there is none.
    """

    norm: str
    modules: tuple[str, ...]
    inputs: tuple[str, ...]
    output: str
    post_norm: str | None = None


class ModelAdapter:
    """Roles of one model, answered from its family's description (subclasses add family behaviour)."""

    def __init__(self, model: nn.Module, family: Family) -> None:
        # Typed Any: transformers modules expose their children as dynamic attributes.
        self.model: Any = model
        self.config: Any = model.config
        self.family = family

    def _optional(self, path: str) -> nn.Module | None:
        """The module at ``path`` from the top model, or None where the model keeps None (OPT's project_out)."""
        parent, _, name = path.rpartition(".")
        module = getattr(self.model.get_submodule(parent), name, None)
        return module if isinstance(module, nn.Module) else None

    # ---- model-level roles -------------------------------------------------------------
    def decoder(self) -> nn.Module:
        """The base transformer that holds embeddings and layers (``model.model`` for Llama)."""
        return self.model.get_submodule(self.family.layers.rpartition(".")[0])

    def layers(self) -> nn.ModuleList:
        """The decoder layers, in order (``model.layers`` / ``model.decoder.layers``)."""
        layers = self.model.get_submodule(self.family.layers)
        assert isinstance(layers, nn.ModuleList)
        return layers

    def layers_path(self) -> str:
        """Dotted path of the layer list from the top model: ``model.layers``."""
        return self.family.layers

    def embeddings(self) -> list[nn.Module]:
        """Modules that write into the residual stream before layer 0 (token, and learned positions)."""
        return [self.model.get_submodule(path) for path in self.family.embeddings]

    def before_layers(self) -> list[nn.Module]:
        """Everything the decoder runs before layer 0: the embeddings and the rotary position modules."""
        rotary = [m for m in map(self._optional, self.family.rotary) if m is not None]
        return [*self.embeddings(), *rotary]

    def embedding_scale(self) -> float:
        """The factor the token embedding's lookup is multiplied by (``sqrt(hidden_size)`` for Gemma, else 1)."""
        return math.sqrt(self.hidden_size) if self.family.embedding_scale == "sqrt_hidden" else 1.0

    def final_norm(self) -> nn.Module:
        """The norm applied after the last layer, before the head."""
        return self.model.get_submodule(self.family.final_norm)

    def after_layers(self) -> list[nn.Module]:
        """Modules the decoder applies, in order, between its last layer and the head (the final norm)."""
        extra = [m for m in map(self._optional, self.family.after_final_norm) if m is not None]
        return [self.final_norm(), *extra]

    def lm_head(self) -> nn.Linear:
        """The output projection to the vocabulary."""
        head = self.model.get_output_embeddings()
        assert isinstance(head, nn.Linear)
        return head

    def attention_types(self) -> list[str]:
        """Each decoder layer's attention, ``full_attention`` or ``sliding_attention``.

        From ``config.layer_types`` (Qwen2/3, Gemma 3); without it every layer is alike, sliding when the
        config sets ``sliding_window`` (Mistral).
        """
        types = getattr(self.config, "layer_types", None)
        if isinstance(types, list) and len(types) == self.num_layers:
            return [str(t) for t in types]
        kind = "sliding_attention" if getattr(self.config, "sliding_window", None) else "full_attention"
        return [kind] * self.num_layers

    # ---- per-layer roles (paths relative to a decoder layer) -----------------------------
    def linear_groups(self) -> list[LinearGroup]:
        """Linears grouped by shared input, in data-flow order: qkv, o, gate/up (fc1), down (fc2)."""
        attention, mlp = self.family.attention, self.family.mlp
        return [LinearGroup(attention.inputs), LinearGroup((attention.output,)),
                LinearGroup(mlp.inputs), LinearGroup((mlp.output,))]

    def fused_groups(self) -> list[LinearGroup]:
        """Linears a serving engine fuses into one layer, which must therefore share one quantization scheme.

        vLLM loads q/k/v as one ``qkv_proj`` and gate/up as one ``gate_up_proj`` (its
        ``packed_modules_mapping``) and quantizes the fused layer with the scheme of its first part. Which
        linears fuse is a fact of the family (:attr:`Family.fused`): OPT fuses only q/k/v, fc1 stays alone.
        """
        return [LinearGroup(names) for names in self.family.fused]

    def attention_norm(self, layer: nn.Module) -> nn.Module:
        """The norm before attention (``input_layernorm`` / ``self_attn_layer_norm``)."""
        return layer.get_submodule(self.family.attention.norm)

    def mlp_norm(self, layer: nn.Module) -> nn.Module:
        """The norm before the MLP (``post_attention_layernorm`` / ``final_layer_norm``)."""
        return layer.get_submodule(self.family.mlp.norm)

    def post_norms(self, layer: nn.Module) -> list[nn.Module]:
        """Norms applied to a branch's output before it joins the stream (Gemma's); none for pre-norm only."""
        paths = (self.family.attention.post_norm, self.family.mlp.post_norm)
        return [layer.get_submodule(path) for path in paths if path]

    def attention(self, layer: nn.Module) -> nn.Module:
        """The self-attention sublayer."""
        return layer.get_submodule(self.family.attention.modules[0])

    def mlp(self, layer: nn.Module) -> nn.Module:
        """The MLP sublayer (for OPT, whose fc1/fc2 live on the layer itself, the layer)."""
        modules = self.family.mlp.modules
        return layer.get_submodule(modules[0]) if len(modules) == 1 else layer

    def attention_inputs(self, layer: nn.Module) -> list[nn.Linear]:
        """The linears that read the attention norm's output (q/k/v), in order."""
        return [_linear(layer, name) for name in self.family.attention.inputs]

    def mlp_inputs(self, layer: nn.Module) -> list[nn.Linear]:
        """The linears that read the MLP norm's output (gate/up; fc1), in order."""
        return [_linear(layer, name) for name in self.family.mlp.inputs]

    def attention_output(self, layer: nn.Module) -> nn.Linear:
        """The projection that writes attention back into the residual stream (o_proj / out_proj)."""
        return _linear(layer, self.family.attention.output)

    def mlp_output(self, layer: nn.Module) -> nn.Linear:
        """The projection that writes the MLP back into the residual stream (down_proj / fc2)."""
        return _linear(layer, self.family.mlp.output)

    def mlp_outputs(self, layer: nn.Module) -> list[nn.Linear]:
        """Every linear whose output the MLP sums into the stream: ``[down_proj]``; one per expert in a MoE."""
        return [self.mlp_output(layer)]

    def statistics(self, layer: nn.Module) -> AbstractContextManager[None]:
        """Entered while the engine gathers a layer's statistics: a MoE sends every token through every expert."""
        return nullcontext()

    def module_facts(self, layer: nn.Module, name: str) -> dict[str, Any]:
        """What the last statistics pass knows of one linear beyond its inputs (an expert's routed tokens)."""
        return {}

    def norm_eps(self, norm: nn.Module) -> float:
        """The epsilon a norm adds to the variance (``variance_epsilon`` in Llama's RMSNorm, else ``eps``)."""
        eps = getattr(norm, "variance_epsilon", None)
        return float(eps if eps is not None else getattr(norm, "eps"))  # noqa: B009

    def norm_affine(self, norm: nn.Module) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """The elementwise ``(scale, shift)`` a norm applies after normalizing, by the family's norm kind.

        ``w`` and None for RMSNorm, ``1 + w`` and None for Gemma's, ``w`` and ``b`` for LayerNorm; a missing
        weight or bias is None. Folding the norm into the linears that read it folds exactly these.
        """
        weight, bias = getattr(norm, "weight", None), getattr(norm, "bias", None)
        scale = None if weight is None else weight.data
        if scale is not None and self.family.norm == "rms_one_plus":
            scale = 1 + scale
        return scale, (None if bias is None or self.family.norm != "layernorm" else bias.data)

    # ---- capabilities --------------------------------------------------------------------
    @property
    def hidden_size(self) -> int:
        return int(self.config.hidden_size)

    @property
    def num_experts(self) -> int:
        """Experts in each MLP (a mixture of experts), 0 for a dense MLP."""
        return 0

    @property
    def num_layers(self) -> int:
        return len(self.layers())

    @property
    def uses_layernorm(self) -> bool:
        """True when norms subtract the mean (LayerNorm); rotation methods must fold it first."""
        return self.family.norm == "layernorm"

    def pre_norm_blocker(self) -> str | None:
        """Why this model's layers are not the pre-norm branches its family describes, or None.

        Methods that rebuild or cut branches (SliceGPT, FinerCut) refuse such a model with this reason.
        """
        return None

    def rotation_blocker(self) -> str | None:
        """Why this model's norms cannot be folded to make it rotation-invariant (SliceGPT), or None."""
        if self.post_norms(self.layers()[0]):
            return f"{self.family.name} normalizes each branch's output (post-norms), which a rotation does not pass"
        return self.pre_norm_blocker()

    @property
    def max_positions(self) -> int | None:
        """Longest sequence the model was built for, if the config says."""
        value = getattr(self.config, "max_position_embeddings", None)
        return int(value) if value else None

    # ---- helpers built on the roles ---------------------------------------------------------
    def linear_names(self) -> list[str]:
        """Every grouped linear of a layer, relative to the layer, in data-flow order."""
        return [name for group in self.linear_groups() for name in group.names]

    def layer_prefix(self, index: int) -> str:
        """Full module path of decoder layer ``index``: ``model.layers.3``."""
        return f"{self.layers_path()}.{index}"

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Next-token logits ``[..., V]`` from the last layer's output ``hidden: [..., H]``.

        Capped as the model caps them when its config sets ``final_logit_softcapping`` (Gemma).
        """
        for module in self.after_layers():
            hidden = module(hidden)
        logits = self.lm_head()(hidden)
        cap = getattr(self.config, "final_logit_softcapping", None)
        return torch.tanh(logits / cap) * cap if cap else logits

    #: Config attributes holding one entry per decoder layer, trimmed with the layers (``finercut_removed``
    #: lists the sublayers compressor's FinerCut removed from each layer).
    per_layer_config: tuple[str, ...] = ("layer_types", "finercut_removed")

    def remove_layers(self, indices: list[int]) -> None:
        """Delete decoder layers in place and make the model a standard, smaller one of its family.

        The survivors keep their order and are renumbered (module paths, every ``layer_idx`` attribute
        that indexes the KV cache); ``config.num_hidden_layers`` and per-layer config lists shrink with them.
        """
        layers = self.layers()
        count = len(layers)
        doomed = sorted(set(indices))
        if any(not 0 <= i < count for i in doomed):
            raise IndexError(f"layer indices {doomed} out of range for {count} layers")
        keep = [i for i in range(count) if i not in doomed]
        survivors = [layers[i] for i in keep]
        for _ in range(count):
            del layers[0]
        for new_index, layer in enumerate(survivors):
            layers.append(layer)
            for module in layer.modules():
                if isinstance(getattr(module, "layer_idx", None), int):
                    setattr(module, "layer_idx", new_index)  # noqa: B010  (nn.Module typing refuses ints)
        self.config.num_hidden_layers = len(survivors)
        for name in self.per_layer_config:
            values = getattr(self.config, name, None)
            if isinstance(values, list) and len(values) == count:
                setattr(self.config, name, [values[i] for i in keep])
        self._layers_removed(keep)

    def _layers_removed(self, kept: list[int]) -> None:
        """Family-specific config updates after :meth:`remove_layers` (``kept``: old indices, in order)."""
        return None


def _linear(layer: nn.Module, path: str) -> nn.Linear:
    module = layer.get_submodule(path)
    assert isinstance(module, nn.Linear), f"{path} is {type(module).__name__}, not a Linear"
    return module


@dataclass(frozen=True)
class Family:
    """What a model family is, said once: every consumer (adapter, methods, exports, tests) reads it here.

    Paths from the top model: ``layers`` (the decoder layer list), ``embeddings`` (the token embedding first,
    then learned positions), ``final_norm``, ``after_final_norm`` (modules between it and the head; absent
    ones are skipped), ``rotary`` (position modules run before layer 0). ``attention`` and ``mlp`` describe
    the two branches of a decoder layer. ``norm`` is the norm kind of every norm, ``embedding_scale`` what
    the token lookup is multiplied by (``sqrt_hidden``: Gemma). ``fused``: linears (paths in a layer) a
    serving stack fuses into one layer (vLLM's ``qkv_proj`` / ``gate_up_proj``). ``gguf_architectures``:
    llama.cpp's ``general.architecture`` for each model type that has one. ``adapter``: the adapter class,
    a subclass in the family's file when the family has behaviour beyond these facts.
    """

    name: str
    model_types: tuple[str, ...]
    layers: str
    embeddings: tuple[str, ...]
    final_norm: str
    attention: Sublayer
    mlp: Sublayer
    norm: NormKind
    fused: tuple[tuple[str, ...], ...]
    rotary: tuple[str, ...] = ()
    after_final_norm: tuple[str, ...] = ()
    embedding_scale: Literal["none", "sqrt_hidden"] = "none"
    gguf_architectures: Mapping[str, str] = field(default_factory=dict)
    adapter: type[ModelAdapter] = ModelAdapter

    def layout(self) -> dict[str, Any]:
        """The structure facts a shipped modeling file needs, as JSON for config.json.

        The shipped files load without compressor, so the methods write this next to their own config keys
        (``slicing.layout``, ``finercut_layout``) instead of the files keeping a table per family.
        """
        return {
            "layers": self.layers, "final_norm": self.final_norm, "positions": list(self.embeddings[1:]),
            "attention": _json(asdict(self.attention)), "mlp": _json(asdict(self.mlp)),
        }

    def adapt(self, model: nn.Module) -> ModelAdapter:
        """The adapter for ``model``, a model of this family."""
        return self.adapter(model, self)


def _json(value: dict[str, Any]) -> dict[str, Any]:
    return {key: list(v) if isinstance(v, tuple) else v for key, v in value.items()}
