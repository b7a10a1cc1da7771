"""Model loading and the table of architecture adapters, keyed by ``config.model_type``."""

from __future__ import annotations

from torch import nn

from compressor.errors import UnsupportedModelError
from compressor.models.base import LinearGroup, ModelAdapter
from compressor.models.llama import LlamaAdapter
from compressor.models.opt import OPTAdapter
from compressor.models.qwen2 import Qwen2Adapter

ADAPTERS: dict[str, type[ModelAdapter]] = {
    model_type: adapter
    for adapter in (LlamaAdapter, Qwen2Adapter, OPTAdapter)
    for model_type in adapter.model_types
}


def supported_model_types() -> list[str]:
    return sorted(ADAPTERS)


def check_supported(model_type: str | None) -> type[ModelAdapter]:
    """The adapter class for a config's ``model_type``, or a clear error listing the supported ones."""
    adapter = ADAPTERS.get(model_type or "")
    if adapter is None:
        raise UnsupportedModelError(
            f"unsupported architecture '{model_type}': supported model types are "
            f"{', '.join(supported_model_types())}"
        )
    return adapter


def get_adapter(model: nn.Module) -> ModelAdapter:
    return check_supported(getattr(model.config, "model_type", None))(model)


__all__ = ["ADAPTERS", "LinearGroup", "ModelAdapter", "check_supported", "get_adapter", "supported_model_types"]
