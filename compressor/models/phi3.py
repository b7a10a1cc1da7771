"""The Phi-3 family: Llama's layer with q/k/v fused into ``qkv_proj`` and gate/up into ``gate_up_proj`` already.

A fused weight is one linear here: quantizers give it per-row scales over its input groups like any linear, and
nothing is left for a serving stack to fuse.
"""

from __future__ import annotations

from dataclasses import replace

from compressor.models.base import Sublayer
from compressor.models.llama import LLAMA

PHI3 = replace(
    LLAMA,
    name="phi3",
    model_types=("phi3",),
    attention=Sublayer(
        norm="input_layernorm", modules=("self_attn",), inputs=("self_attn.qkv_proj",), output="self_attn.o_proj",
    ),
    mlp=Sublayer(norm="post_attention_layernorm", modules=("mlp",), inputs=("mlp.gate_up_proj",),
                 output="mlp.down_proj"),
    fused=(),
    gguf_architectures={"phi3": "phi3"},
)
