"""The Gemma 3 text family: ``x*(1+w)`` RMSNorms, a ``sqrt(hidden)``-scaled embedding, a norm before and after
each branch, and alternating sliding-window / full attention (``config.layer_types``).

The multimodal ``gemma3`` checkpoint (Gemma3ForConditionalGeneration, a SigLIP vision tower and a projector in
front of this language model) is compressed as its language model: :data:`GEMMA3_MULTIMODAL` says how its
weights load alone into ``Gemma3ForCausalLM``; the vision weights are never read.
"""

from __future__ import annotations

from dataclasses import dataclass

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


@dataclass(frozen=True)
class LanguageModelOf:
    """A multimodal checkpoint whose language model loads alone as a supported text family.

    Its config.json nests the text model's config under ``text_config``; ``key_mapping`` renames the language
    model's checkpoint keys to the text model's (transformers' ``from_pretrained(key_mapping=...)``), so the
    other parts (``left_out``) stay unread on disk and the export is an ordinary text-only model.
    """

    model_type: str
    text_model_type: str
    key_mapping: tuple[tuple[str, str], ...]
    left_out: tuple[str, ...]
    #: Text config values the multimodal model's forward implies (set on the text model's config).
    text_overrides: tuple[tuple[str, object], ...] = ()


GEMMA3_MULTIMODAL = LanguageModelOf(
    model_type="gemma3",
    text_model_type="gemma3_text",
    # transformers 5 writes the legacy layout (language_model.model.*); its in-memory names are model.language_model.*
    key_mapping=((r"^language_model\.model\.", "model."), (r"^model\.language_model\.", "model."),
                 (r"^language_model\.lm_head\.", "lm_head.")),
    left_out=("model.vision_tower", "model.multi_modal_projector"),
    # Gemma3ForConditionalGeneration (transformers 5.23) never caps its logits (Google's configs leave the cap
    # null); Gemma3ForCausalLM applies text_config's cap, so the language model alone must not have one.
    text_overrides=(("final_logit_softcapping", None),),
)
