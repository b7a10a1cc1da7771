"""FinerCut causal language models: stock decoder layers whose attention or MLP sublayer was removed.

Written next to models compressed by compressor's ``finercut`` method and named by config.json ``auto_map``, so
``AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True)`` loads them with torch and transformers
alone (this file imports nothing else). config.json ``finercut_removed`` holds one list per decoder layer naming
its removed sublayers, e.g. ``[[], ["attention"], ["mlp"], ...]``; ``finercut_layout`` says where the family
keeps them (compressor writes it from its family description): ``layers`` (path of the decoder layers) and per
sublayer (``attention``, ``mlp``) the ``norm`` before it, the ``modules`` computing it and an optional
``post_norm``. The model is built as the stock family model (``auto_map`` names ``FinerCut<X>ForCausalLM`` for
transformers' ``<X>ForCausalLM``, a class this module makes on first use), then each removed sublayer's modules
are swapped for weightless stand-ins that add exactly zero to the residual stream and its norms for identities,
so the layer computes ``x + mlp(norm(x))`` or ``x + attn(norm(x))``. A removed attention still records the
sequence length in the KV cache (a ``[B, 1, L, 1]`` zero entry) so that positions stay right during generation.
Only pre-norm layers are supported (compressor refuses post-norm ones).
"""

from __future__ import annotations

import functools
from typing import Any

import torch
import transformers
from torch import nn

#: Class names this file makes: ``FinerCut`` + the transformers class they extend.
PREFIX = "FinerCut"
SUBLAYERS = ("attention", "mlp")


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


def _stand_in(module: nn.Module, attention: bool) -> nn.Module:
    if isinstance(module, nn.Linear):
        return RemovedLinear(module.out_features)
    if attention:
        return RemovedAttention(_linears(module), getattr(module, "layer_idx", None))
    return RemovedMLP(_linears(module))


def remove_sublayer(layer: nn.Module, layout: dict[str, Any], sublayer: str) -> dict[str, nn.Module]:
    """Swap one sublayer of a decoder layer for weightless stand-ins (its norms for identities), in place.

    ``layout``: config.json ``finercut_layout``. Returns the replaced modules by path inside the layer;
    ``layer.set_submodule(path, module)`` for each puts the sublayer back.
    """
    branch = layout[sublayer]
    replaced = {}
    for path in branch["modules"]:
        replaced[path] = layer.get_submodule(path)
        layer.set_submodule(path, _stand_in(replaced[path], sublayer == "attention"))
    for path in (branch["norm"], branch.get("post_norm")):
        if path:
            replaced[path] = layer.get_submodule(path)
            layer.set_submodule(path, nn.Identity())
    return replaced


def is_removed(layer: nn.Module, layout: dict[str, Any], sublayer: str) -> bool:
    """True when the sublayer was already replaced by stand-ins."""
    return isinstance(layer.get_submodule(layout[sublayer]["modules"][0]), (RemovedMLP, RemovedLinear))


def apply_removals(model: nn.Module, config: Any) -> None:
    """Remove the sublayers that ``config.finercut_removed`` lists from a freshly built stock model."""
    layout = getattr(config, "finercut_layout", None)
    if not layout:
        raise ValueError("config.json has no finercut_layout: the removed sublayers cannot be located")
    removed = getattr(config, "finercut_removed", None) or []
    layers: Any = model.get_submodule(layout["layers"])
    if len(removed) != len(layers):
        raise ValueError(f"finercut_removed has {len(removed)} entries for {len(layers)} decoder layers")
    for layer, sublayers in zip(layers, removed, strict=True):
        for sublayer in sublayers:
            if sublayer not in SUBLAYERS:
                raise ValueError(f"finercut_removed: unknown sublayer '{sublayer}' (expected one of {SUBLAYERS})")
            if not is_removed(layer, layout, sublayer):
                remove_sublayer(layer, layout, sublayer)


@functools.cache
def _model_class(base_name: str) -> type:
    base: Any = getattr(transformers, base_name)

    def __init__(self: Any, config: Any) -> None:
        base.__init__(self, config)
        apply_removals(self, config)

    return type(PREFIX + base.__name__, (base,), {"__init__": __init__, "__module__": __name__})


def __getattr__(name: str) -> type:
    """``FinerCut<X>ForCausalLM`` (the class config.json ``auto_map`` names) for transformers' ``<X>ForCausalLM``."""
    base = getattr(transformers, name.removeprefix(PREFIX), None) if name.startswith(PREFIX) else None
    if not (isinstance(base, type) and issubclass(base, transformers.PreTrainedModel)):
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return _model_class(base.__name__)
