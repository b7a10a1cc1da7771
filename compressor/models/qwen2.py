"""The Qwen2 / Qwen3 family: Llama's layout (Qwen2 adds q/k/v biases, Qwen3 q/k norms inside attention)."""

from __future__ import annotations

from dataclasses import replace

from compressor.models.base import ModelAdapter
from compressor.models.llama import LLAMA


class Qwen2Adapter(ModelAdapter):
    def _layers_removed(self, kept: list[int]) -> None:
        # Layers from max_window_layers on use the sliding window: count the survivors below the threshold.
        threshold = getattr(self.config, "max_window_layers", None)
        if isinstance(threshold, int):
            self.config.max_window_layers = sum(1 for i in kept if i < threshold)


QWEN2 = replace(
    LLAMA,
    name="qwen2",
    model_types=("qwen2", "qwen3"),
    gguf_architectures={"qwen2": "qwen2", "qwen3": "qwen3"},
    adapter=Qwen2Adapter,
)
