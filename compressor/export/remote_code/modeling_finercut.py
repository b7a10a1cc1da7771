"""FinerCut causal language models: stock decoder layers whose attention or MLP sublayer was removed.

Written next to models compressed by compressor's ``finercut`` method and named by config.json ``auto_map``, so
``AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True)`` loads them with torch and transformers
alone (this file imports nothing else). config.json ``finercut_removed`` holds one list per decoder layer naming
its removed sublayers, e.g. ``[[], ["attention"], ["mlp"], ...]``. The model is built as the stock family model,
then each removed sublayer (and the norm that only fed it) is swapped for a weightless module that adds exactly
zero to the residual stream, so the layer computes ``x + mlp(norm(x))`` or ``x + attn(norm(x))``. A removed
attention still records the sequence length in the KV cache (a ``[B, 1, L, 1]`` zero entry) so that positions
stay right during generation. Only pre-norm layers are supported (OPT-350m's post-norm layers are not).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from transformers.models.llama.modeling_llama import LlamaForCausalLM
from transformers.models.mistral.modeling_mistral import MistralForCausalLM
from transformers.models.opt.modeling_opt import OPTForCausalLM
from transformers.models.qwen2.modeling_qwen2 import Qwen2ForCausalLM
from transformers.models.qwen3.modeling_qwen3 import Qwen3ForCausalLM

SUBLAYERS = ("attention", "mlp")

# What removing a sublayer replaces in a decoder layer: module path -> kind of weightless stand-in.
_PRE_NORM = {
    "attention": {"self_attn": "attention", "input_layernorm": "norm"},
    "mlp": {"mlp": "mlp", "post_attention_layernorm": "norm"},
}
_OPT = {
    "attention": {"self_attn": "attention", "self_attn_layer_norm": "norm"},
    "mlp": {"fc1": "linear", "fc2": "linear", "final_layer_norm": "norm"},
}
ROLES: dict[str, dict[str, dict[str, str]]] = {
    "llama": _PRE_NORM, "mistral": _PRE_NORM, "qwen2": _PRE_NORM, "qwen3": _PRE_NORM, "opt": _OPT,
}


class RemovedLinear(nn.Module):
    """Where a removed sublayer's linear was: no weights; returns zeros ``[..., out_features]``."""

    def __init__(self, out_features: int) -> None:
        super().__init__()
        self.out_features = out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.new_zeros(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"out_features={self.out_features}"


def _linears(module: nn.Module) -> dict[str, int]:
    return {name: child.out_features for name, child in module.named_children() if isinstance(child, nn.Linear)}


class RemovedMLP(nn.Module):
    """A removed MLP: adds nothing to the residual stream. Its linears' names remain as weightless stand-ins."""

    def __init__(self, linears: dict[str, int]) -> None:
        super().__init__()
        for name, width in linears.items():
            self.add_module(name, RemovedLinear(width))

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return torch.zeros_like(hidden_states)


class RemovedAttention(RemovedMLP):
    """A removed self-attention: adds nothing; keeps the KV cache's sequence length for layer ``layer_idx``."""

    def __init__(self, linears: dict[str, int], layer_idx: int | None) -> None:
        super().__init__(linears)
        self.layer_idx = layer_idx

    def forward(  # type: ignore[override]
        self, hidden_states: torch.Tensor, *args: Any, past_key_values: Any = None, **kwargs: Any
    ) -> tuple[torch.Tensor, None]:
        if past_key_values is not None and self.layer_idx is not None:
            stub = hidden_states.new_zeros(hidden_states.shape[0], 1, hidden_states.shape[1], 1)
            past_key_values.update(stub, stub, self.layer_idx)
        return torch.zeros_like(hidden_states), None


def unsupported(config: Any) -> str | None:
    """Why sublayers of this model cannot be removed, or None."""
    if config.model_type not in ROLES:
        return f"model type '{config.model_type}' (supported: {', '.join(sorted(ROLES))})"
    if config.model_type == "opt" and not config.do_layer_norm_before:
        return "OPT with LayerNorm after each block (do_layer_norm_before=false)"
    return None


def _stand_in(kind: str, module: nn.Module) -> nn.Module:
    if kind == "attention":
        return RemovedAttention(_linears(module), getattr(module, "layer_idx", None))
    if kind == "mlp":
        return RemovedMLP(_linears(module))
    if kind == "linear":
        return RemovedLinear(module.out_features)  # type: ignore[arg-type]
    return nn.Identity()


def remove_sublayer(layer: nn.Module, model_type: str, sublayer: str) -> dict[str, nn.Module]:
    """Swap one sublayer of a decoder layer for weightless stand-ins, in place.

    Returns the replaced modules by path inside the layer; ``layer.set_submodule(path, module)`` for each
    puts the sublayer back.
    """
    replaced = {}
    for path, kind in ROLES[model_type][sublayer].items():
        module = layer.get_submodule(path)
        replaced[path] = module
        layer.set_submodule(path, _stand_in(kind, module))
    return replaced


def is_removed(layer: nn.Module, model_type: str, sublayer: str) -> bool:
    """True when the sublayer was already replaced by stand-ins."""
    first = next(iter(ROLES[model_type][sublayer]))
    return isinstance(layer.get_submodule(first), (RemovedMLP, RemovedLinear))


def decoder_layers(model: nn.Module, model_type: str) -> nn.ModuleList:
    base: Any = model.model.decoder if model_type == "opt" else model.model  # type: ignore[union-attr]
    return base.layers  # type: ignore[no-any-return]


def apply_removals(model: nn.Module, config: Any) -> None:
    """Remove the sublayers that ``config.finercut_removed`` lists from a freshly built stock model."""
    reason = unsupported(config)
    if reason:
        raise ValueError(f"FinerCut cannot remove sublayers of {reason}")
    removed = getattr(config, "finercut_removed", None) or []
    layers = decoder_layers(model, config.model_type)
    if len(removed) != len(layers):
        raise ValueError(f"finercut_removed has {len(removed)} entries for {len(layers)} decoder layers")
    for layer, sublayers in zip(layers, removed, strict=True):
        for sublayer in sublayers:
            if sublayer not in SUBLAYERS:
                raise ValueError(f"finercut_removed: unknown sublayer '{sublayer}' (expected one of {SUBLAYERS})")
            if not is_removed(layer, config.model_type, sublayer):
                remove_sublayer(layer, config.model_type, sublayer)


class FinerCutLlamaForCausalLM(LlamaForCausalLM):
    def __init__(self, config: Any) -> None:
        super().__init__(config)
        apply_removals(self, config)


class FinerCutMistralForCausalLM(MistralForCausalLM):
    def __init__(self, config: Any) -> None:
        super().__init__(config)
        apply_removals(self, config)


class FinerCutQwen2ForCausalLM(Qwen2ForCausalLM):
    def __init__(self, config: Any) -> None:
        super().__init__(config)
        apply_removals(self, config)


class FinerCutQwen3ForCausalLM(Qwen3ForCausalLM):
    def __init__(self, config: Any) -> None:
        super().__init__(config)
        apply_removals(self, config)


class FinerCutOPTForCausalLM(OPTForCausalLM):
    def __init__(self, config: Any) -> None:
        super().__init__(config)
        apply_removals(self, config)


#: model_type -> the class config.json ``auto_map`` names for a FinerCut model of that family.
MODEL_CLASSES: dict[str, type[nn.Module]] = {
    "llama": FinerCutLlamaForCausalLM,
    "mistral": FinerCutMistralForCausalLM,
    "qwen2": FinerCutQwen2ForCausalLM,
    "qwen3": FinerCutQwen3ForCausalLM,
    "opt": FinerCutOPTForCausalLM,
}
