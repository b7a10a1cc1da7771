"""Llama-family roles: Llama 2/3, Mistral, SmolLM (and Qwen2/Qwen3, which share the layout)."""

from __future__ import annotations

from typing import Any

from torch import nn

from compressor.models.base import LinearGroup, ModelAdapter


class LlamaAdapter(ModelAdapter):
    model_types = ("llama", "mistral")

    def decoder(self) -> nn.Module:
        return self.model.model

    def layers(self) -> nn.ModuleList:
        return self.model.model.layers

    def layers_path(self) -> str:
        return "model.layers"

    def embeddings(self) -> list[nn.Module]:
        return [self.model.model.embed_tokens]

    def final_norm(self) -> nn.Module:
        return self.model.model.norm

    def linear_groups(self) -> list[LinearGroup]:
        return [
            LinearGroup(("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
            LinearGroup(("self_attn.o_proj",)),
            LinearGroup(("mlp.gate_proj", "mlp.up_proj")),
            LinearGroup(("mlp.down_proj",)),
        ]

    def attention_norm(self, layer: Any) -> nn.Module:
        return layer.input_layernorm

    def mlp_norm(self, layer: Any) -> nn.Module:
        return layer.post_attention_layernorm

    def attention(self, layer: Any) -> nn.Module:
        return layer.self_attn

    def mlp(self, layer: Any) -> nn.Module:
        return layer.mlp

    def attention_inputs(self, layer: Any) -> list[nn.Linear]:
        return [layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj]

    def mlp_inputs(self, layer: Any) -> list[nn.Linear]:
        return [layer.mlp.gate_proj, layer.mlp.up_proj]

    def attention_output(self, layer: Any) -> nn.Linear:
        return layer.self_attn.o_proj

    def mlp_output(self, layer: Any) -> nn.Linear:
        return layer.mlp.down_proj

    def norm_eps(self, norm: Any) -> float:
        return float(norm.variance_epsilon)
