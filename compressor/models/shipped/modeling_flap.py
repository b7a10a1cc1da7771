"""FLAP causal language models: stock decoder layers whose attention heads and MLP channels differ per layer.

Written next to models compressed by compressor's ``flap`` method and named by config.json ``auto_map``, so
``AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True)`` loads them with torch and transformers
alone (this file imports nothing else). config.json ``flap`` holds the structure::

    {"version": 1, "head_dim": 64, "layout": {...},
     "layers": [{"heads": 6, "kv_heads": 2, "intermediate_size": 1200,
                 "attention_output_bias": true, "mlp_output_bias": false}, ...]}

``layout`` says where the family keeps its modules (compressor writes it from its family description):
``layers`` (path of the decoder layers) and per branch (``attention``, ``mlp``) the ``modules`` computing it,
the ``inputs`` reading the norm (q, k, v / gate, up) and the ``output`` writing the stream (o_proj / down_proj).
The model is built as the stock family model (``auto_map`` names ``FLAP<X>ForCausalLM`` for transformers'
``<X>ForCausalLM``, a class this module makes on first use), then each layer's linears are replaced by ones of
the recorded widths before the weights load: q and the output's columns ``heads * head_dim``, k and v
``kv_heads * head_dim``, gate/up and down's columns ``intermediate_size``; an output projection gets a bias
when the entry says so (FLAP's compensation adds one where the family has none). The attention code takes its
head counts from the tensors' shapes; the query-per-KV ratio (``num_key_value_groups``) is unchanged because
FLAP removes whole KV groups, and is set per layer anyway with any ``num_heads`` / ``num_key_value_heads``
attributes a family's attention keeps.
"""

from __future__ import annotations

import functools
from typing import Any

import transformers
from torch import nn

#: Class names this file makes: ``FLAP`` + the transformers class they extend.
PREFIX = "FLAP"


def _linear(old: nn.Module, in_features: int, out_features: int, bias: bool) -> nn.Linear:
    """``old`` when it already has these shapes, else a new (unfilled) linear of its dtype and device."""
    if not isinstance(old, nn.Linear):
        raise ValueError(f"flap: expected a Linear, found {type(old).__name__}")
    if (old.in_features, old.out_features, old.bias is not None) == (in_features, out_features, bias):
        return old
    return nn.Linear(in_features, out_features, bias=bias, dtype=old.weight.dtype, device=old.weight.device)


def set_head_counts(attention: nn.Module, heads: int, kv_heads: int) -> None:
    """Give one attention module the per-layer head counts its forward may read (only attributes it has)."""
    setattr(attention, "num_key_value_groups", heads // kv_heads)  # noqa: B010 - a plain attribute, not a module
    for name, value in (("num_heads", heads), ("num_key_value_heads", kv_heads)):
        if hasattr(attention, name):
            setattr(attention, name, value)


def narrow_layer(layer: nn.Module, layout: dict[str, Any], shape: dict[str, Any], head_dim: int) -> None:
    """Resize one freshly built decoder layer's linears to ``shape`` (an entry of ``flap.layers``), in place."""
    attention, mlp = layout["attention"], layout["mlp"]
    query, key, value = attention["inputs"]
    heads, kv_heads, width = int(shape["heads"]), int(shape["kv_heads"]), int(shape["intermediate_size"])
    if kv_heads < 1 or heads % kv_heads or width < 1:
        raise ValueError(f"flap: invalid layer shape {shape}")
    rows = {query: heads * head_dim, key: kv_heads * head_dim, value: kv_heads * head_dim}
    rows.update({name: width for name in mlp["inputs"]})
    for name, out_features in rows.items():
        old: Any = layer.get_submodule(name)
        layer.set_submodule(name, _linear(old, old.in_features, out_features, old.bias is not None))
    for branch, columns, flag in ((attention, heads * head_dim, "attention_output_bias"),
                                  (mlp, width, "mlp_output_bias")):
        old = layer.get_submodule(branch["output"])
        layer.set_submodule(branch["output"], _linear(old, columns, old.out_features, bool(shape[flag])))
    set_head_counts(layer.get_submodule(attention["modules"][0]), heads, kv_heads)


def apply_shapes(model: nn.Module, config: Any) -> None:
    """Narrow every decoder layer of a freshly built stock model to the shapes ``config.flap`` records."""
    spec = getattr(config, "flap", None)
    if not spec or "layout" not in spec:
        raise ValueError("config.json has no flap structure (flap.layout, flap.layers): the shapes are unknown")
    layers: Any = model.get_submodule(spec["layout"]["layers"])
    if len(spec["layers"]) != len(layers):
        raise ValueError(f"flap.layers has {len(spec['layers'])} entries for {len(layers)} decoder layers")
    for layer, shape in zip(layers, spec["layers"], strict=True):
        narrow_layer(layer, spec["layout"], shape, int(spec["head_dim"]))


@functools.cache
def _model_class(base_name: str) -> type:
    base: Any = getattr(transformers, base_name)

    def __init__(self: Any, config: Any) -> None:
        base.__init__(self, config)
        apply_shapes(self, config)

    return type(PREFIX + base.__name__, (base,), {"__init__": __init__, "__module__": __name__})


def __getattr__(name: str) -> type:
    """``FLAP<X>ForCausalLM`` (the class config.json ``auto_map`` names) for transformers' ``<X>ForCausalLM``."""
    base = getattr(transformers, name.removeprefix(PREFIX), None) if name.startswith(PREFIX) else None
    if not (isinstance(base, type) and issubclass(base, transformers.PreTrainedModel)):
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return _model_class(base.__name__)
