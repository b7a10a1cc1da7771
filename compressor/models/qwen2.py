"""Qwen2 / Qwen3 roles: the Llama layout (Qwen2 adds q/k/v biases, Qwen3 q/k norms inside attention)."""

from __future__ import annotations

from compressor.models.llama import LlamaAdapter


class Qwen2Adapter(LlamaAdapter):
    model_types = ("qwen2", "qwen3")
