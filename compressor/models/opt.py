"""OPT roles: LayerNorm with bias, learned positions, fc1/fc2 on the layer itself (the papers' tables)."""

from __future__ import annotations

from typing import Any

from torch import nn

from compressor.models.base import LinearGroup, ModelAdapter


class OPTAdapter(ModelAdapter):
    model_types = ("opt",)

    def decoder(self) -> nn.Module:
        return self.model.model.decoder

    def layers(self) -> nn.ModuleList:
        return self.model.model.decoder.layers

    def layers_path(self) -> str:
        return "model.decoder.layers"

    def embeddings(self) -> list[nn.Module]:
        decoder = self.model.model.decoder
        return [decoder.embed_tokens, decoder.embed_positions]

    def final_norm(self) -> nn.Module:
        return self.model.model.decoder.final_layer_norm

    def after_layers(self) -> list[nn.Module]:
        decoder = self.model.model.decoder
        return [m for m in (decoder.final_layer_norm, decoder.project_out) if m is not None]

    def linear_groups(self) -> list[LinearGroup]:
        return [
            LinearGroup(("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
            LinearGroup(("self_attn.out_proj",)),
            LinearGroup(("fc1",)),
            LinearGroup(("fc2",)),
        ]

    def attention_norm(self, layer: Any) -> nn.Module:
        return layer.self_attn_layer_norm

    def mlp_norm(self, layer: Any) -> nn.Module:
        return layer.final_layer_norm

    def attention(self, layer: Any) -> nn.Module:
        return layer.self_attn

    def mlp(self, layer: Any) -> nn.Module:
        return layer

    def attention_inputs(self, layer: Any) -> list[nn.Linear]:
        return [layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj]

    def mlp_inputs(self, layer: Any) -> list[nn.Linear]:
        return [layer.fc1]

    def attention_output(self, layer: Any) -> nn.Linear:
        return layer.self_attn.out_proj

    def mlp_output(self, layer: Any) -> nn.Linear:
        return layer.fc2

    def norm_eps(self, norm: Any) -> float:
        return float(norm.eps)

    def rotation_blocker(self) -> str | None:
        config = self.config
        if not config.do_layer_norm_before:
            return "OPT with LayerNorm after each block (do_layer_norm_before=false) is not rotation-invariant"
        if config.word_embed_proj_dim != config.hidden_size:
            return (f"OPT with project_in/project_out (word_embed_proj_dim {config.word_embed_proj_dim} != "
                    f"hidden_size {config.hidden_size}) is not supported")
        if getattr(config, "_remove_final_layer_norm", False):
            return "OPT without a final LayerNorm is not supported"
        if config.layer_norm_elementwise_affine and not config.enable_bias:
            return "OPT LayerNorm biases cannot be folded into linears without biases (enable_bias=false)"
        return None

    @property
    def uses_layernorm(self) -> bool:
        return True

    @property
    def max_positions(self) -> int | None:
        return int(self.config.max_position_embeddings)
