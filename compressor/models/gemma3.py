"""The Gemma 3 text family: ``x*(1+w)`` RMSNorms, a ``sqrt(hidden)``-scaled embedding, a norm before and after
each branch, and alternating sliding-window / full attention (``config.layer_types``)."""

from __future__ import annotations

from compressor.models.base import Family, Sublayer

GEMMA3 = Family(
    name="gemma3",
    model_types=("gemma3_text",),
    layers="model.layers",
    embeddings=("model.embed_tokens",),
    final_norm="model.norm",
    rotary=("model.rotary_emb",),
    # Gemma's post_attention_layernorm normalizes the attention's output; the MLP's own norm comes before it.
    attention=Sublayer(
        norm="input_layernorm", modules=("self_attn",),
        inputs=("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), output="self_attn.o_proj",
        post_norm="post_attention_layernorm",
    ),
    mlp=Sublayer(
        norm="pre_feedforward_layernorm", modules=("mlp",), inputs=("mlp.gate_proj", "mlp.up_proj"),
        output="mlp.down_proj", post_norm="post_feedforward_layernorm",
    ),
    norm="rms_one_plus",
    embedding_scale="sqrt_hidden",
    fused=(("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), ("mlp.gate_proj", "mlp.up_proj")),
    gguf_architectures={"gemma3_text": "gemma3"},
)
