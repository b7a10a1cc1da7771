"""Sliced (SliceGPT) causal language models: a rotated residual stream narrower than the original hidden size.

Written next to models compressed by compressor's ``slicegpt`` method and named by config.json ``auto_map``, so
``AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True)`` loads them with torch and transformers
alone (this file imports nothing else). The structure comes from config.json ``slicing``::

    {"version": 2, "rotation": "per_layer" | "shared", "embedding_width": d0, "tied_projection": bool,
     "head_bias": bool, "eps": float, "layout": {...},
     "layers": [{"in": d, "mid": d, "out": d, "attn_shortcut": bool, "mlp_shortcut": bool}, ...]}

``layout`` says where the family keeps its modules (compressor writes it from its family description):
``layers`` and ``final_norm`` (paths from the top model), ``positions`` (learned position embeddings), and per
branch (``attention``, ``mlp``) the ``norm`` before it, the ``modules`` computing it in order, the ``inputs``
reading the norm, the ``output`` writing the stream (compressor slices only families without a ``post_norm``:
a norm after a branch does not commute with the rotation). With it one file serves every
family: ``auto_map`` names ``Sliced<X>ForCausalLM`` for transformers' ``<X>ForCausalLM``, a class this module
makes on first use (module ``__getattr__``), and each decoder layer becomes ``Sliced<its class>``.

Each decoder layer receives the stream ``in`` wide; attention reads it through a weightless RMS norm (the norm
scales were folded into the linears that read it) and writes ``mid`` wide; the MLP writes ``out`` wide. A
shortcut matrix carries the residual from one layer's basis into the next one's (SliceGPT's Q_l^T Q_{l+1});
without one the two bases agree and the residual is zero-padded or truncated to the new width. The RMS norm
divides by the original hidden size, so a rotation without slicing computes what the original model did.
Residual dropout (training only) is not applied.

With ``tied_projection`` the token embedding stays the original ``[vocab, hidden]`` matrix shared with the
head: a ``hidden -> embedding_width`` projection follows the lookup (rotation and slicing) and the final norm
ends with a ``width -> hidden`` projection (rotation back and the folded final-norm scale and bias). That costs
two small matrices instead of an untied ``[vocab, width]`` head.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
import transformers
from torch import nn

#: Class names this file makes: ``Sliced`` + the transformers class they extend.
PREFIX = "Sliced"


class SlicedRMSNorm(nn.Module):
    """``x / sqrt(sum(x^2) / hidden + eps)`` without a scale: the stream may be narrower than ``hidden``."""

    def __init__(self, hidden: int, eps: float) -> None:
        super().__init__()
        self.hidden = hidden
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        return (x32 * torch.rsqrt(x32.pow(2).sum(-1, keepdim=True) / self.hidden + self.eps)).to(x.dtype)

    def extra_repr(self) -> str:
        return f"hidden={self.hidden}, eps={self.eps}"


class SlicedFinalNorm(SlicedRMSNorm):
    """The norm before the head; with a tied head it also maps the stream back to ``hidden`` (``proj``)."""

    def __init__(self, hidden: int, eps: float, width: int, project: bool, bias: bool) -> None:
        super().__init__(hidden, eps)
        self.proj = nn.Linear(width, hidden, bias=bias) if project else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = super().forward(x)
        return x if self.proj is None else self.proj(x)


class ProjectedEmbedding(nn.Embedding):
    """A token embedding (its weight may be tied to the head) followed by a ``dim -> width`` projection."""

    def __init__(self, num_embeddings: int, embedding_dim: int, width: int, padding_idx: int | None = None) -> None:
        super().__init__(num_embeddings, embedding_dim, padding_idx)
        self.proj = nn.Linear(embedding_dim, width, bias=False)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.proj(super().forward(input_ids))


def _add(shortcut: nn.Module | None, residual: torch.Tensor, update: torch.Tensor) -> torch.Tensor:
    """``residual`` carried into ``update``'s basis, plus ``update``."""
    if shortcut is not None:
        residual = shortcut(residual)
    elif residual.shape[-1] > update.shape[-1]:
        residual = residual[..., : update.shape[-1]]
    elif residual.shape[-1] < update.shape[-1]:
        residual = nn.functional.pad(residual, (0, update.shape[-1] - residual.shape[-1]))
    return residual + update


def _resized(linear: nn.Linear, in_features: int, out_features: int) -> nn.Linear:
    if (linear.in_features, linear.out_features) == (in_features, out_features):
        return linear
    weight = linear.weight
    return nn.Linear(in_features, out_features, bias=linear.bias is not None, dtype=weight.dtype,
                     device=weight.device)


def _slice_layer(layer: Any, config: Any, layer_idx: int) -> None:
    """Give a freshly built decoder layer the widths, norms and shortcuts that ``config.slicing`` records."""
    spec = config.slicing["layers"][layer_idx]
    attention, mlp = config.slicing["layout"]["attention"], config.slicing["layout"]["mlp"]
    widths = {**{n: (spec["in"], None) for n in attention["inputs"]}, attention["output"]: (None, spec["mid"]),
              **{n: (spec["mid"], None) for n in mlp["inputs"]}, mlp["output"]: (None, spec["out"])}
    for name, (width_in, width_out) in widths.items():
        linear: Any = layer.get_submodule(name)
        layer.set_submodule(name, _resized(linear, width_in or linear.in_features, width_out or linear.out_features))
    for name in (attention["norm"], mlp["norm"]):
        layer.set_submodule(name, SlicedRMSNorm(config.hidden_size, config.slicing["eps"]))
    dtype = layer.get_submodule(attention["output"]).weight.dtype
    layer.register_module(
        "attn_shortcut", nn.Linear(spec["in"], spec["mid"], bias=False, dtype=dtype) if spec["attn_shortcut"] else None
    )
    layer.register_module(
        "mlp_shortcut", nn.Linear(spec["mid"], spec["out"], bias=False, dtype=dtype) if spec["mlp_shortcut"] else None
    )


class SlicedDecoderLayer(nn.Module):
    """Forward of a pre-norm decoder layer whose residual may change basis and width (mixed into its class)."""

    attn_shortcut: nn.Module | None
    mlp_shortcut: nn.Module | None

    def __init__(self, config: Any, layer_idx: int) -> None:
        super().__init__(config, layer_idx)  # type: ignore[call-arg]
        _slice_layer(self, config, layer_idx)
        self.branches = (config.slicing["layout"]["attention"], config.slicing["layout"]["mlp"])

    def forward(self, hidden_states: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        attention, mlp = self.branches
        normed = self.get_submodule(attention["norm"])(hidden_states)
        update, _ = self.get_submodule(attention["modules"][0])(hidden_states=normed, **kwargs)
        hidden_states = _add(self.attn_shortcut, hidden_states, update)
        update = self.get_submodule(mlp["norm"])(hidden_states)
        for name in mlp["modules"]:
            update = self.get_submodule(name)(update)
        return _add(self.mlp_shortcut, hidden_states, update)


@functools.cache
def _layer_class(stock: Any) -> type[nn.Module]:
    return type(PREFIX + stock.__name__, (SlicedDecoderLayer, stock), {"__module__": __name__})


def sliced_layer(stock: nn.Module, config: Any, layer_idx: int) -> nn.Module:
    """A new decoder layer of ``stock``'s class in its sliced form (built on the current default device)."""
    stock_class: Any = type(stock)
    return _layer_class(stock_class)(config, layer_idx)


def _narrow(embedding: Any, width: int) -> None:
    """Make an embedding (of any class: learned positions, a scaled lookup) ``width`` wide, uninitialized."""
    embedding.weight = nn.Parameter(embedding.weight.new_empty(embedding.num_embeddings, width))
    embedding.embedding_dim = width


def _slice_model(model: Any, config: Any) -> None:
    """Swap a freshly built family model's layers, embeddings and final norm for their sliced forms."""
    spec = config.slicing
    layout = spec["layout"]
    layers = model.get_submodule(layout["layers"])
    for index in range(len(layers)):
        layers[index] = sliced_layer(layers[index], config, index)
    width, last = spec["embedding_width"], spec["layers"][-1]["out"]
    tokens = model.get_input_embeddings()
    if spec["tied_projection"]:
        model.set_input_embeddings(
            ProjectedEmbedding(tokens.num_embeddings, tokens.embedding_dim, width, tokens.padding_idx)
        )
    else:
        _narrow(tokens, width)
        model.set_output_embeddings(nn.Linear(last, model.get_output_embeddings().out_features, bias=spec["head_bias"]))
    for path in layout["positions"]:
        _narrow(model.get_submodule(path), width)
    final = SlicedFinalNorm(config.hidden_size, spec["eps"], last, spec["tied_projection"],
                            spec["head_bias"] and spec["tied_projection"])
    model.set_submodule(layout["final_norm"], final)
    model.tie_weights()


@functools.cache
def _model_class(base_name: str) -> type:
    base: Any = getattr(transformers, base_name)

    def __init__(self: Any, config: Any) -> None:
        base.__init__(self, config)
        _slice_model(self, config)

    return type(PREFIX + base.__name__, (base,), {"__init__": __init__, "__module__": __name__})


def __getattr__(name: str) -> type:
    """``Sliced<X>ForCausalLM`` (the class config.json ``auto_map`` names) for transformers' ``<X>ForCausalLM``."""
    base = getattr(transformers, name.removeprefix(PREFIX), None) if name.startswith(PREFIX) else None
    if not (isinstance(base, type) and issubclass(base, transformers.PreTrainedModel)):
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return _model_class(base.__name__)
