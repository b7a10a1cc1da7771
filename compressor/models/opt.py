"""The OPT family: LayerNorm with bias, learned positions, fc1/fc2 on the layer itself (the papers' tables)."""

from __future__ import annotations

from compressor.models.base import Family, ModelAdapter, Sublayer


class OPTAdapter(ModelAdapter):
    def pre_norm_blocker(self) -> str | None:
        if not self.config.do_layer_norm_before:
            return "OPT with LayerNorm after each block (do_layer_norm_before=false)"
        return None

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


OPT = Family(
    name="opt",
    model_types=("opt",),
    layers="model.decoder.layers",
    embeddings=("model.decoder.embed_tokens", "model.decoder.embed_positions"),
    final_norm="model.decoder.final_layer_norm",
    after_final_norm=("model.decoder.project_out",),
    attention=Sublayer(
        norm="self_attn_layer_norm", modules=("self_attn",),
        inputs=("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), output="self_attn.out_proj",
    ),
    mlp=Sublayer(norm="final_layer_norm", modules=("fc1", "activation_fn", "fc2"), inputs=("fc1",), output="fc2"),
    norm="layernorm",
    # vLLM's OPT builds qkv_proj only; fc1 is a plain ColumnParallelLinear.
    fused=(("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),),
    adapter=OPTAdapter,
)
