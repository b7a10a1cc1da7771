"""The Llama family: Llama 2/3, Mistral, SmolLM (RMSNorm ``x*w``, rotary positions, SiLU gate/up MLP)."""

from __future__ import annotations

from compressor.models.base import Family, Sublayer

ATTENTION = Sublayer(
    norm="input_layernorm", modules=("self_attn",),
    inputs=("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), output="self_attn.o_proj",
)
MLP = Sublayer(
    norm="post_attention_layernorm", modules=("mlp",), inputs=("mlp.gate_proj", "mlp.up_proj"),
    output="mlp.down_proj",
)
#: vLLM's ``packed_modules_mapping``: ``qkv_proj`` and ``gate_up_proj``.
FUSED = (ATTENTION.inputs, MLP.inputs)

#: Qwen2/Qwen3 share this layout (``models/qwen2.py``).
LLAMA = Family(
    name="llama",
    model_types=("llama", "mistral"),
    layers="model.layers",
    embeddings=("model.embed_tokens",),
    final_norm="model.norm",
    rotary=("model.rotary_emb",),
    attention=ATTENTION,
    mlp=MLP,
    norm="rms",
    fused=FUSED,
    # llama.cpp's converter writes Mistral (dense) as the llama architecture.
    gguf_architectures={"llama": "llama", "mistral": "llama"},
)
