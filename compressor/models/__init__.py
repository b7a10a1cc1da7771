"""The family table: every supported model family, each described once in ``models/<family>.py``.

Adding a family is its file and one row here; the adapter, the methods, the shipped modeling files, the GGUF
writer and the tests' tiny models all read the description.
"""

from __future__ import annotations

from torch import nn

from compressor.errors import UnsupportedModelError
from compressor.models.base import Family, LinearGroup, ModelAdapter, Sublayer
from compressor.models.gemma3 import GEMMA3
from compressor.models.llama import LLAMA
from compressor.models.mixtral import MIXTRAL
from compressor.models.opt import OPT
from compressor.models.phi3 import PHI3
from compressor.models.qwen2 import QWEN2
from compressor.models.qwen3_moe import QWEN3_MOE

#: The family table, one row per family.
FAMILIES: tuple[Family, ...] = (LLAMA, QWEN2, OPT, GEMMA3, PHI3, MIXTRAL, QWEN3_MOE)

#: ``config.model_type`` -> its family.
MODEL_TYPES: dict[str, Family] = {model_type: family for family in FAMILIES for model_type in family.model_types}


def supported_model_types() -> list[str]:
    return sorted(MODEL_TYPES)


def check_supported(model_type: str | None) -> Family:
    """The family of a config's ``model_type``, or a clear error listing the supported ones."""
    family = MODEL_TYPES.get(model_type or "")
    if family is None:
        raise UnsupportedModelError(
            f"unsupported architecture '{model_type}': supported model types are "
            f"{', '.join(supported_model_types())}"
        )
    return family


def get_adapter(model: nn.Module) -> ModelAdapter:
    return check_supported(getattr(model.config, "model_type", None)).adapt(model)


__all__ = [
    "FAMILIES", "MODEL_TYPES", "Family", "LinearGroup", "ModelAdapter", "Sublayer", "check_supported", "get_adapter",
    "supported_model_types",
]
