"""Make a model rotation-invariant and give it the sliced structure, still at full width, before SliceGPT rotates it.

Every norm's scale (and, for LayerNorm, its bias) is folded into the linears that read the norm's output; for
LayerNorm families the stream is also centred (embeddings and the linears writing into the stream subtract their
mean), which turns each LayerNorm into an RMS norm. The norms become weightless :class:`SlicedRMSNorm` modules
that divide by the original hidden size, so any orthogonal ``Q`` applied to the stream and undone by the readers
leaves the outputs unchanged. Decoder layers are rebuilt as the shipped modeling file's classes (same child names,
so ``adapter.linear_groups()`` still resolve, plus ``attn_shortcut``/``mlp_shortcut`` slots): the in-memory model
has exactly the structure ``from_pretrained`` builds from config.json ``slicing``.

A tied token embedding stays tied: it is followed by a projection (where the rotation goes) and the final norm
ends with a projection back to the hidden size (where the final norm's scale and the inverse rotation go).
Modules are reached through the architecture adapter only.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from compressor.methods.prune.slicegpt.ops import center_output, centering_matrix, fold_norm
from compressor.models.base import ModelAdapter
from compressor.models.shipped import modeling_sliced


@dataclass
class Ready:
    """What the rotation steps need after :func:`make_rotation_ready`.

    ``embedding_writers``: linears that write embeddings into the stream (the tied embedding's projection);
    ``embedding_rows``: embeddings whose rows are stream vectors (untied tokens, learned positions);
    ``head_reader``: the linear that reads the final norm's output (its projection, or the untied lm_head).
    """

    tied: bool
    embedding_writers: list[nn.Linear]
    embedding_rows: list[nn.Embedding]
    head_reader: nn.Linear


def initial_spec(adapter: ModelAdapter, rotation: str, tied: bool) -> dict[str, Any]:
    """config.json ``slicing`` of the not-yet-rotated model: every width is the hidden size, no shortcuts.

    ``layout`` is the family description's, which the shipped modeling file reads to find the modules.
    """
    hidden = adapter.hidden_size
    final = adapter.final_norm()
    layer = {"in": hidden, "mid": hidden, "out": hidden, "attn_shortcut": False, "mlp_shortcut": False}
    return {
        "version": 2,
        "rotation": rotation,
        "embedding_width": hidden,
        "tied_projection": tied,
        "head_bias": False,
        "eps": adapter.norm_eps(final),
        "layout": adapter.family.layout(),
        "layers": [dict(layer) for _ in range(adapter.num_layers)],
    }


def make_rotation_ready(model: Any, adapter: ModelAdapter, rotation: str, layers: bool = True) -> Ready:
    """Fold norms, centre the stream (LayerNorm families), and swap in the sliced structure at full width.

    ``layers=False`` leaves the decoder layers as they are (a streamed run converts each one when it is loaded,
    :func:`convert_layer`; the rest of the model is converted here, on meta where it is not loaded).
    """
    head = adapter.lm_head()
    tied = any(module.weight is head.weight for module in adapter.embeddings())
    model.config.slicing = initial_spec(adapter, rotation, tied)
    decoder = adapter.layers()
    for index in range(len(decoder) if layers else 0):
        decoder[index] = convert_layer(adapter, decoder[index], index, model.config)
    writers, rows = _prepare_embeddings(model, adapter, head)
    reader = _prepare_head(model, adapter, head, tied)
    model.config.slicing["head_bias"] = reader.bias is not None
    return Ready(tied, writers, rows, reader)


def set_linear(linear: nn.Linear, W: torch.Tensor, b: torch.Tensor | None = None) -> None:
    """Give ``linear`` the weight ``W: [out, in]`` (and bias ``b: [out]`` when given), updating its widths."""
    linear.weight = nn.Parameter(W.contiguous(), requires_grad=linear.weight.requires_grad)
    if b is not None:
        linear.bias = nn.Parameter(b.contiguous(), requires_grad=linear.weight.requires_grad)
    linear.out_features, linear.in_features = W.shape


def shortcut(M: torch.Tensor, like: torch.Tensor) -> nn.Linear:
    """A bias-free linear computing ``x M`` (``M: [d_from, d_to]``) in ``like``'s dtype and device."""
    linear = nn.Linear(M.shape[0], M.shape[1], bias=False, dtype=like.dtype, device=like.device)
    set_linear(linear, M.T.to(like.device, like.dtype))
    return linear


def module_path(model: nn.Module, module: nn.Module) -> str:
    """Dotted path of ``module`` inside ``model`` (found by identity)."""
    for name, candidate in model.named_modules():
        if candidate is module:
            return name
    raise LookupError(f"{type(module).__name__} is not part of the model")


def _fold_readers(adapter: ModelAdapter, norm: nn.Module, readers: list[nn.Linear]) -> None:
    scale, shift = adapter.norm_affine(norm)
    for linear in readers:
        if shift is not None and linear.bias is None:
            raise ValueError("a norm bias cannot be folded into a linear without a bias")
        bias = None if linear.bias is None else linear.bias.data
        W, b = fold_norm(linear.weight.data, bias, scale, shift)
        set_linear(linear, W, b)


def convert_layer(adapter: ModelAdapter, layer: nn.Module, index: int, config: Any) -> nn.Module:
    """The layer folded and rebuilt as the sliced class (built on the meta device, then given these tensors)."""
    norms = (adapter.attention_norm(layer), adapter.mlp_norm(layer))
    _fold_readers(adapter, norms[0], adapter.attention_inputs(layer))
    _fold_readers(adapter, norms[1], adapter.mlp_inputs(layer))
    if adapter.uses_layernorm:
        for writer in (adapter.attention_output(layer), adapter.mlp_output(layer)):
            W, b = center_output(writer.weight.data, None if writer.bias is None else writer.bias.data)
            set_linear(writer, W, b)
    norm_names = {name for name, module in layer.named_modules() if any(module is n for n in norms)}
    state = {k: v for k, v in layer.state_dict().items() if k.rpartition(".")[0] not in norm_names}
    with torch.device("meta"):
        new = modeling_sliced.sliced_layer(layer, config, index)
    new.load_state_dict(state, strict=True, assign=True)
    new.train(layer.training)
    return new


def _prepare_embeddings(model: Any, adapter: ModelAdapter, head: nn.Linear) -> tuple[list[nn.Linear], list[Any]]:
    """Centre (LayerNorm families) the embeddings; a tied one gets a projection that carries the centring."""
    writers: list[nn.Linear] = []
    rows: list[Any] = []
    hidden = adapter.hidden_size
    embedding: Any
    for embedding in adapter.embeddings():
        weight = embedding.weight
        if weight is head.weight:
            with torch.device("meta"):
                projected = modeling_sliced.ProjectedEmbedding(
                    embedding.num_embeddings, embedding.embedding_dim, hidden, embedding.padding_idx
                )
            projected.weight = weight
            C = centering_matrix(hidden) if adapter.uses_layernorm else torch.eye(hidden, dtype=torch.float64)
            C = C * adapter.embedding_scale()  # the lookup's scale (Gemma) moves into the projection
            projected.proj.weight = nn.Parameter(C.to(weight.device, weight.dtype))
            model.set_submodule(module_path(model, embedding), projected)
            writers.append(projected.proj)
        else:
            if adapter.uses_layernorm:
                weight.data = center_output(weight.data.T, None)[0].T.contiguous()
            rows.append(embedding)
    return writers, rows


def _prepare_head(model: Any, adapter: ModelAdapter, head: nn.Linear, tied: bool) -> nn.Linear:
    """Replace the final norm by a weightless one; fold its scale and bias into the projection or the lm_head."""
    final = adapter.final_norm()
    scale, shift = adapter.norm_affine(final)
    hidden = adapter.hidden_size
    spec = model.config.slicing
    with torch.device("meta"):
        new = modeling_sliced.SlicedFinalNorm(hidden, spec["eps"], hidden, tied, tied and shift is not None)
    dtype, device = head.weight.dtype, head.weight.device
    if new.proj is not None:
        diag = torch.ones(hidden, dtype=dtype, device=device) if scale is None else scale
        set_linear(new.proj, torch.diag(diag).to(dtype), None if shift is None else shift.clone())
        reader = new.proj
    else:
        W, b = fold_norm(head.weight.data, None if head.bias is None else head.bias.data, scale, shift)
        if b is not None and head.bias is None:  # the final norm's bias lands in a new head bias
            with torch.device("meta"):
                biased = nn.Linear(head.in_features, head.out_features, bias=True)
            model.set_submodule(module_path(model, head), biased)
            head = biased
        set_linear(head, W, b)
        reader = head
    model.set_submodule(module_path(model, final), new)
    return reader
