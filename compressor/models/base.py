"""The adapter contract: roles of a causal LM's modules, so methods never spell attribute names.

One small adapter per family maps roles (embeddings, decoder layers, attention projections, MLP
projections, norms, head) to that family's modules. Methods branch on capability properties, never on
the family's name. Everything a shape-changing method needs goes through here.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn


@dataclass(frozen=True)
class LinearGroup:
    """Linears of one decoder layer that read the same input (q/k/v; gate/up): one Hessian serves all.

    ``names`` are paths relative to the decoder layer. Groups are listed in data-flow order so a
    sequential method sees statistics produced by already-transformed predecessors.
    """

    names: tuple[str, ...]


class ModelAdapter(ABC):
    """Roles of one architecture family. Subclasses are mostly one-line getters."""

    #: ``config.model_type`` values this adapter accepts.
    model_types: tuple[str, ...] = ()

    def __init__(self, model: nn.Module) -> None:
        # Typed Any: transformers modules expose their children as dynamic attributes.
        self.model: Any = model
        self.config: Any = model.config

    # ---- model-level roles -------------------------------------------------------------
    @abstractmethod
    def decoder(self) -> nn.Module:
        """The base transformer that holds embeddings and layers (``model.model`` for Llama)."""

    @abstractmethod
    def layers(self) -> nn.ModuleList:
        """The decoder layers, in order (``model.layers`` / ``decoder.layers``)."""

    @abstractmethod
    def layers_path(self) -> str:
        """Dotted path of the layer list from the top model: ``model.layers``."""

    @abstractmethod
    def embeddings(self) -> list[nn.Module]:
        """Modules that write into the residual stream before layer 0 (token, and learned positions)."""

    @abstractmethod
    def final_norm(self) -> nn.Module:
        """The norm applied after the last layer, before the head."""

    def after_layers(self) -> list[nn.Module]:
        """Modules the decoder applies, in order, between its last layer and the head (the final norm)."""
        return [self.final_norm()]

    def lm_head(self) -> nn.Linear:
        """The output projection to the vocabulary."""
        head = self.model.get_output_embeddings()
        assert isinstance(head, nn.Linear)
        return head

    # ---- per-layer roles (paths relative to a decoder layer) -----------------------------
    @abstractmethod
    def linear_groups(self) -> list[LinearGroup]:
        """Linears grouped by shared input, in data-flow order: qkv, o, gate/up (fc1), down (fc2)."""

    def fused_groups(self) -> list[LinearGroup]:
        """Linears a serving engine fuses into one layer, which must therefore share one quantization scheme.

        vLLM loads q/k/v as one ``qkv_proj`` and gate/up as one ``gate_up_proj`` (its
        ``packed_modules_mapping`` for Llama, Mistral, Qwen2 and Qwen3; OPT fuses only q/k/v, fc1 stays
        alone) and quantizes the fused layer with the scheme of its first part. For these families that is
        exactly :meth:`linear_groups` (linears fused because they read the same input), the default; a
        family whose engine fuses differently overrides it. Groups of one linear constrain nothing.
        """
        return self.linear_groups()

    @abstractmethod
    def attention_norm(self, layer: nn.Module) -> nn.Module:
        """The norm before attention (``input_layernorm`` / ``self_attn_layer_norm``)."""

    @abstractmethod
    def mlp_norm(self, layer: nn.Module) -> nn.Module:
        """The norm before the MLP (``post_attention_layernorm`` / ``final_layer_norm``)."""

    @abstractmethod
    def attention(self, layer: nn.Module) -> nn.Module:
        """The self-attention sublayer."""

    @abstractmethod
    def mlp(self, layer: nn.Module) -> nn.Module:
        """The MLP sublayer (for OPT, the pair fc1/fc2 lives on the layer itself)."""

    @abstractmethod
    def attention_inputs(self, layer: nn.Module) -> list[nn.Linear]:
        """The linears that read the attention norm's output (q/k/v), in order."""

    @abstractmethod
    def mlp_inputs(self, layer: nn.Module) -> list[nn.Linear]:
        """The linears that read the MLP norm's output (gate/up; fc1), in order."""

    @abstractmethod
    def attention_output(self, layer: nn.Module) -> nn.Linear:
        """The projection that writes attention back into the residual stream (o_proj / out_proj)."""

    @abstractmethod
    def mlp_output(self, layer: nn.Module) -> nn.Linear:
        """The projection that writes the MLP back into the residual stream (down_proj / fc2)."""

    @abstractmethod
    def norm_eps(self, norm: nn.Module) -> float:
        """The epsilon a norm of this family adds to the variance (``variance_epsilon`` / ``eps``)."""

    # ---- capabilities --------------------------------------------------------------------
    @property
    def hidden_size(self) -> int:
        return int(self.config.hidden_size)

    @property
    def num_layers(self) -> int:
        return len(self.layers())

    @property
    def uses_layernorm(self) -> bool:
        """True when norms subtract the mean (LayerNorm); rotation methods must fold it first."""
        return False

    def rotation_blocker(self) -> str | None:
        """Why this model's norms cannot be folded to make it rotation-invariant (SliceGPT), or None."""
        return None

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
        """Next-token logits ``[..., V]`` from the last layer's output ``hidden: [..., H]``."""
        for module in self.after_layers():
            hidden = module(hidden)
        return self.lm_head()(hidden)

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
