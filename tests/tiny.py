"""Tiny seeded models of every supported family and deterministic text, built offline.

The families come from compressor's family table (``compressor.models.FAMILIES``), so a new family enters every
test parametrized over :data:`FAMILIES` at once; its tiny config is a row of :data:`TINY` keyed by the same
family name (test sizes are test data, so they live here, not in the shipped description), and
``tests/unit/test_adapter_contract.py`` fails while a family has no row.
"""

from __future__ import annotations

import random
from typing import Any

import torch
from transformers import AutoConfig, AutoModelForCausalLM

from compressor.models import FAMILIES as FAMILY_TABLE

VOCAB = 320
WORDS = (
    "the model reads text and predicts the next token while the engine quantizes each layer with care "
    "news from the city council meeting said the budget would rise next year as rain fell on the river "
    "scientists measured the weight of a small bird and found it lighter than expected in winter"
).split()

#: Family name -> the model type its tiny model is built as and that config's family-specific sizes.
TINY: dict[str, dict[str, Any]] = {
    "llama": dict(model_type="llama", intermediate_size=128, num_key_value_heads=2, tie_word_embeddings=True),
    "qwen2": dict(model_type="qwen2", intermediate_size=128, num_key_value_heads=2, tie_word_embeddings=False),
    "opt": dict(model_type="opt", ffn_dim=128, word_embed_proj_dim=64, do_layer_norm_before=True, enable_bias=True),
    # a window shorter than the test sequences, so sliding and full layers differ; capped logits
    "gemma3": dict(model_type="gemma3_text", intermediate_size=128, num_key_value_heads=2, head_dim=16,
                   query_pre_attn_scalar=16, sliding_window=8, final_logit_softcapping=5.0,
                   layer_types=["sliding_attention", "full_attention", "sliding_attention"]),
    # token ids inside the tiny vocabulary (Phi-3's defaults point at 32000)
    "phi3": dict(model_type="phi3", intermediate_size=128, num_key_value_heads=2, pad_token_id=0, bos_token_id=1,
                 eos_token_id=2),
    # 8 experts, top-2: a 3-layer model where some expert is rarely or never picked
    "mixtral": dict(model_type="mixtral", intermediate_size=32, num_key_value_heads=2, num_local_experts=8,
                    num_experts_per_tok=2),
    "qwen3_moe": dict(model_type="qwen3_moe", moe_intermediate_size=32, intermediate_size=128, num_key_value_heads=2,
                      head_dim=16, num_experts=8, num_experts_per_tok=2, norm_topk_prob=True),
}

#: Every family in compressor's table, in table order.
FAMILIES = tuple(family.name for family in FAMILY_TABLE)


def make_text(n_words: int, seed: int = 0) -> str:
    rng = random.Random(seed)
    sentences = []
    while sum(len(s.split()) for s in sentences) < n_words:
        sentences.append(" ".join(rng.choice(WORDS) for _ in range(rng.randint(6, 14))).capitalize() + ".")
    return " ".join(sentences)


def tiny_config(family: str, **overrides: object) -> Any:
    """A 3-layer, 64-wide config of ``family`` (a family name from the table), with ``overrides`` set on it."""
    if family not in TINY:
        raise KeyError(f"no tiny config for family '{family}': add a row to TINY in tests/tiny.py")
    sizes = dict(TINY[family])
    model_type = sizes.pop("model_type")
    config = AutoConfig.for_model(model_type, vocab_size=VOCAB, hidden_size=64, num_hidden_layers=3,
                                  num_attention_heads=4, max_position_embeddings=256, **sizes)
    for key, value in overrides.items():
        setattr(config, key, value)
    return config


def tiny_model(family: str = "llama", seed: int = 0, **overrides: object) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(family, **overrides), dtype=torch.float32)
    # Random init leaves norms at 1 and biases at 0; perturb them so folding/compensation bugs show.
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                param.add_(0.1 * torch.randn_like(param))
    return model.eval()
