"""Tiny seeded models of every supported family and deterministic text, built offline."""

from __future__ import annotations

import random

import torch
from transformers import AutoModelForCausalLM, LlamaConfig, OPTConfig, Qwen2Config

VOCAB = 320
WORDS = (
    "the model reads text and predicts the next token while the engine quantizes each layer with care "
    "news from the city council meeting said the budget would rise next year as rain fell on the river "
    "scientists measured the weight of a small bird and found it lighter than expected in winter"
).split()


def make_text(n_words: int, seed: int = 0) -> str:
    rng = random.Random(seed)
    sentences = []
    while sum(len(s.split()) for s in sentences) < n_words:
        sentences.append(" ".join(rng.choice(WORDS) for _ in range(rng.randint(6, 14))).capitalize() + ".")
    return " ".join(sentences)


def tiny_config(family: str, **overrides: object) -> object:
    common = dict(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=3, num_attention_heads=4,
                  max_position_embeddings=256)
    if family == "llama":
        config = LlamaConfig(intermediate_size=128, num_key_value_heads=2, tie_word_embeddings=True, **common)
    elif family == "qwen2":
        config = Qwen2Config(intermediate_size=128, num_key_value_heads=2, tie_word_embeddings=False, **common)
    elif family == "opt":
        config = OPTConfig(ffn_dim=128, word_embed_proj_dim=64, do_layer_norm_before=True,
                           enable_bias=True, **common)
    else:
        raise ValueError(family)
    for key, value in overrides.items():
        setattr(config, key, value)
    return config


FAMILIES = ("llama", "qwen2", "opt")


def tiny_model(family: str = "llama", seed: int = 0, **overrides: object) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(family, **overrides), dtype=torch.float32)
    # Random init leaves norms at 1 and biases at 0; perturb them so folding/compensation bugs show.
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                param.add_(0.1 * torch.randn_like(param))
    return model.eval()


