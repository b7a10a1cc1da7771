"""Sliced (SliceGPT) causal language models: a rotated residual stream narrower than the original hidden size.

Written next to models compressed by compressor's ``slicegpt`` method and named by config.json ``auto_map``, so
``AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True)`` loads them with torch and transformers
alone (this file imports nothing else). The structure comes from config.json ``slicing``::

    {"version": 1, "rotation": "per_layer" | "shared", "embedding_width": d0, "tied_projection": bool,
     "head_bias": bool, "eps": float,
     "layers": [{"in": d, "mid": d, "out": d, "attn_shortcut": bool, "mlp_shortcut": bool}, ...]}

Each decoder layer receives the stream ``in`` wide; attention reads it through a weightless RMS norm (the norm
scales were folded into the linears that read it) and writes ``mid`` wide; the MLP writes ``out`` wide. A
shortcut matrix carries the residual from one layer's basis into the next one's (SliceGPT's Q_l^T Q_{l+1});
without one the two bases agree and the residual is zero-padded or truncated to the new width. The RMS norm
divides by the original hidden size, so a rotation without slicing computes what the original model did.

With ``tied_projection`` the token embedding stays the original ``[vocab, hidden]`` matrix shared with the
head: a ``hidden -> embedding_width`` projection follows the lookup (rotation and slicing) and the final norm
ends with a ``width -> hidden`` projection (rotation back and the folded final-norm scale and bias). That costs
two small matrices instead of an untied ``[vocab, width]`` head.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaForCausalLM
from transformers.models.mistral.modeling_mistral import MistralDecoderLayer, MistralForCausalLM
from transformers.models.opt.modeling_opt import OPTDecoderLayer, OPTForCausalLM, OPTLearnedPositionalEmbedding
from transformers.models.qwen2.modeling_qwen2 import Qwen2DecoderLayer, Qwen2ForCausalLM
from transformers.models.qwen3.modeling_qwen3 import Qwen3DecoderLayer, Qwen3ForCausalLM

# Linears of one decoder layer by role: (norms, attention readers, attention writer, MLP readers, MLP writer).
_PRE_NORM = (
    ("input_layernorm", "post_attention_layernorm"),
    ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    "self_attn.o_proj",
    ("mlp.gate_proj", "mlp.up_proj"),
    "mlp.down_proj",
)
_OPT = (
    ("self_attn_layer_norm", "final_layer_norm"),
    ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    "self_attn.out_proj",
    ("fc1",),
    "fc2",
)


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


def _slice_layer(layer: Any, config: Any, layer_idx: int, roles: tuple[Any, ...]) -> None:
    """Give a freshly built decoder layer the widths, norms and shortcuts that ``config.slicing`` records."""
    spec = config.slicing["layers"][layer_idx]
    norms, attn_in, attn_out, mlp_in, mlp_out = roles
    widths = {**{n: (spec["in"], None) for n in attn_in}, attn_out: (None, spec["mid"]),
              **{n: (spec["mid"], None) for n in mlp_in}, mlp_out: (None, spec["out"])}
    for name, (width_in, width_out) in widths.items():
        linear: Any = layer.get_submodule(name)
        layer.set_submodule(name, _resized(linear, width_in or linear.in_features, width_out or linear.out_features))
    for name in norms:
        layer.set_submodule(name, SlicedRMSNorm(config.hidden_size, config.slicing["eps"]))
    dtype = layer.get_submodule(attn_out).weight.dtype
    layer.register_module(
        "attn_shortcut", nn.Linear(spec["in"], spec["mid"], bias=False, dtype=dtype) if spec["attn_shortcut"] else None
    )
    layer.register_module(
        "mlp_shortcut", nn.Linear(spec["mid"], spec["out"], bias=False, dtype=dtype) if spec["mlp_shortcut"] else None
    )


class _SlicedPreNormLayer(nn.Module):
    """Forward of a pre-norm Llama-style layer whose residual may change basis and width (mixin)."""

    attn_shortcut: nn.Module | None
    mlp_shortcut: nn.Module | None
    self_attn: Any
    mlp: Any
    input_layernorm: Any
    post_attention_layernorm: Any

    def __init__(self, config: Any, layer_idx: int) -> None:
        super().__init__(config, layer_idx)  # type: ignore[call-arg]
        _slice_layer(self, config, layer_idx, _PRE_NORM)

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Any = None,
        use_cache: bool | None = False,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
        **kwargs: Any,
    ) -> torch.Tensor:
        update, _ = self.self_attn(
            hidden_states=self.input_layernorm(hidden_states),
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past_key_values,
            use_cache=use_cache,
            position_embeddings=position_embeddings,
            **kwargs,
        )
        hidden_states = _add(self.attn_shortcut, hidden_states, update)
        return _add(self.mlp_shortcut, hidden_states, self.mlp(self.post_attention_layernorm(hidden_states)))


class SlicedLlamaDecoderLayer(_SlicedPreNormLayer, LlamaDecoderLayer):
    pass


class SlicedMistralDecoderLayer(_SlicedPreNormLayer, MistralDecoderLayer):
    pass


class SlicedQwen2DecoderLayer(_SlicedPreNormLayer, Qwen2DecoderLayer):
    pass


class SlicedQwen3DecoderLayer(_SlicedPreNormLayer, Qwen3DecoderLayer):
    pass


class SlicedOPTDecoderLayer(OPTDecoderLayer):
    """OPT's pre-norm layer (the LayerNorms became RMS norms once the stream was centred)."""

    attn_shortcut: nn.Module | None
    mlp_shortcut: nn.Module | None

    def __init__(self, config: Any, layer_idx: int) -> None:
        super().__init__(config, layer_idx)
        _slice_layer(self, config, layer_idx, _OPT)

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        past_key_values: Any = None,
        use_cache: bool | None = False,
        position_ids: torch.LongTensor | None = None,
        **kwargs: Any,
    ) -> torch.Tensor:
        update, _ = self.self_attn(
            hidden_states=self.self_attn_layer_norm(hidden_states),
            past_key_values=past_key_values,
            position_ids=position_ids,
            attention_mask=attention_mask,
            **kwargs,
        )
        update = nn.functional.dropout(update, p=self.dropout, training=self.training)
        hidden_states = _add(self.attn_shortcut, hidden_states, update)
        update = self.fc2(self.activation_fn(self.fc1(self.final_layer_norm(hidden_states))))
        update = nn.functional.dropout(update, p=self.dropout, training=self.training)
        return _add(self.mlp_shortcut, hidden_states, update)


#: model_type -> the decoder layer class a sliced model of that family is built from.
LAYER_CLASSES: dict[str, type[nn.Module]] = {
    "llama": SlicedLlamaDecoderLayer,
    "mistral": SlicedMistralDecoderLayer,
    "qwen2": SlicedQwen2DecoderLayer,
    "qwen3": SlicedQwen3DecoderLayer,
    "opt": SlicedOPTDecoderLayer,
}


def _slice_model(model: Any, config: Any) -> None:
    """Swap a freshly built family model's layers, embeddings and final norm for their sliced forms."""
    spec = config.slicing
    opt = config.model_type == "opt"
    decoder = model.model.decoder if opt else model.model
    layer_class = LAYER_CLASSES[config.model_type]
    decoder.layers = nn.ModuleList([layer_class(config, i) for i in range(config.num_hidden_layers)])
    width, last = spec["embedding_width"], spec["layers"][-1]["out"]
    tokens = decoder.embed_tokens
    if spec["tied_projection"]:
        decoder.embed_tokens = ProjectedEmbedding(tokens.num_embeddings, tokens.embedding_dim, width,
                                                  tokens.padding_idx)
    else:
        decoder.embed_tokens = nn.Embedding(tokens.num_embeddings, width, tokens.padding_idx)
        model.lm_head = nn.Linear(last, model.lm_head.out_features, bias=spec["head_bias"])
    if opt:
        decoder.embed_positions = OPTLearnedPositionalEmbedding(config.max_position_embeddings, width)
    final = SlicedFinalNorm(config.hidden_size, spec["eps"], last, spec["tied_projection"],
                            spec["head_bias"] and spec["tied_projection"])
    if opt:
        decoder.final_layer_norm = final
    else:
        decoder.norm = final
    model.tie_weights()


class SlicedLlamaForCausalLM(LlamaForCausalLM):
    def __init__(self, config: Any) -> None:
        super().__init__(config)
        _slice_model(self, config)


class SlicedMistralForCausalLM(MistralForCausalLM):
    def __init__(self, config: Any) -> None:
        super().__init__(config)
        _slice_model(self, config)


class SlicedQwen2ForCausalLM(Qwen2ForCausalLM):
    def __init__(self, config: Any) -> None:
        super().__init__(config)
        _slice_model(self, config)


class SlicedQwen3ForCausalLM(Qwen3ForCausalLM):
    def __init__(self, config: Any) -> None:
        super().__init__(config)
        _slice_model(self, config)


class SlicedOPTForCausalLM(OPTForCausalLM):
    def __init__(self, config: Any) -> None:
        super().__init__(config)
        _slice_model(self, config)


#: model_type -> the class config.json ``auto_map`` names for a sliced model of that family.
MODEL_CLASSES: dict[str, type[nn.Module]] = {
    "llama": SlicedLlamaForCausalLM,
    "mistral": SlicedMistralForCausalLM,
    "qwen2": SlicedQwen2ForCausalLM,
    "qwen3": SlicedQwen3ForCausalLM,
    "opt": SlicedOPTForCausalLM,
}
