"""The Qwen2 / Qwen3 family: Llama's layer (Qwen2 adds q/k/v biases, Qwen3 q/k norms inside attention)."""

from __future__ import annotations

from compressor.models.base import Family, ModelAdapter
from compressor.models.llama import ATTENTION, FUSED, MLP


class Qwen2Adapter(ModelAdapter):
    def _layers_removed(self, kept: list[int]) -> None:
        # Layers from max_window_layers on use the sliding window: count the survivors below the threshold.
        threshold = getattr(self.config, "max_window_layers", None)
        if isinstance(threshold, int):
            self.config.max_window_layers = sum(1 for i in kept if i < threshold)


QWEN2 = Family(
    name="qwen2",
    model_types=("qwen2", "qwen3"),
    layers="model.layers",
    embeddings=("model.embed_tokens",),
    final_norm="model.norm",
    rotary=("model.rotary_emb",),
    attention=ATTENTION,
    mlp=MLP,
    norm="rms",
    fused=FUSED,
    gguf_architectures={"qwen2": "qwen2", "qwen3": "qwen3"},
    adapter=Qwen2Adapter,
)
