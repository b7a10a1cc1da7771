"""Qwen2 / Qwen3 roles: the Llama layout (Qwen2 adds q/k/v biases, Qwen3 q/k norms inside attention)."""

from __future__ import annotations

from compressor.models.llama import LlamaAdapter


class Qwen2Adapter(LlamaAdapter):
    model_types = ("qwen2", "qwen3")

    def _layers_removed(self, kept: list[int]) -> None:
        # Layers from max_window_layers on use the sliding window: count the survivors below the threshold.
        threshold = getattr(self.config, "max_window_layers", None)
        if isinstance(threshold, int):
            self.config.max_window_layers = sum(1 for i in kept if i < threshold)
