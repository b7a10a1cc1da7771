"""Read a compressed-tensors export back into a dense model plus its integer weights.

``compressor export`` uses this to store a finished run in another format (e.g. GGUF for llama.cpp)
without re-running calibration: the integers and scales are unpacked exactly as written.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import torch

from compressor.errors import ExportError, ModelLoadError
from compressor.methods.quant.ops import QuantizedWeight
from compressor.models import get_adapter


def _schemes(quant: dict[str, Any]) -> list[tuple[re.Pattern[str], dict[str, Any]]]:
    schemes = []
    for group in (quant.get("config_groups") or {}).values():
        weights = group.get("weights") or {}
        for target in group.get("targets") or []:
            if not target.startswith("re:"):
                raise ExportError(f"config group target '{target}' is not a path regex written by compressor")
            schemes.append((re.compile(target[3:]), weights))
    return schemes


def _unpack(tensors: dict[str, torch.Tensor], path: str, scheme: dict[str, Any]) -> QuantizedWeight:
    from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32

    bits = int(scheme["num_bits"])
    shape = torch.Size(tensors[f"{path}.weight_shape"].tolist())
    signed = unpack_from_int32(tensors[f"{path}.weight_packed"], bits, shape).to(torch.int16)
    offset = 1 << (bits - 1)
    scale = tensors[f"{path}.weight_scale"].float()
    if scale.dim() == 1:
        scale = scale[:, None]
    if not scheme.get("symmetric", True):
        raise ExportError(f"{path}: asymmetric weights are not read back (they cannot be loaded upstream either)")
    group_size = int(scheme.get("group_size") or -1) if scheme.get("strategy") == "group" else -1
    return QuantizedWeight(
        q=(signed + offset).to(torch.uint8),
        scale=scale,
        zero=torch.full(scale.shape, offset, dtype=torch.int32),
        bits=bits,
        group_size=group_size,
        symmetric=True,
    )


def read_compressed_tensors(directory: Path) -> tuple[Any, dict[str, QuantizedWeight], Any]:
    """``(dense model with dequantized weights, integer weights by module path, tokenizer)``."""
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    config_path = directory / "config.json"
    if not config_path.is_file():
        raise ModelLoadError(f"{directory}: no config.json")
    quant = json.loads(config_path.read_text()).get("quantization_config") or {}
    _refuse_int8_activations(directory, quant)
    if quant.get("format") != "pack-quantized":
        raise ModelLoadError(f"{directory}: not a compressed-tensors pack-quantized export (no quantization_config)")
    tensors: dict[str, torch.Tensor] = {}
    for file in sorted(directory.glob("*.safetensors")):
        tensors.update(load_file(str(file)))
    config = AutoConfig.from_pretrained(directory)
    del config.quantization_config
    model: Any = AutoModelForCausalLM.from_config(config, dtype=getattr(config, "dtype", None) or torch.float32)
    get_adapter(model)  # the module layout the export was written from (a MoE's experts as per-expert linears)
    schemes = _schemes(quant)
    quantized: dict[str, QuantizedWeight] = {}
    dense: dict[str, torch.Tensor] = {}
    for name, tensor in tensors.items():
        if name.endswith(".weight_packed"):
            path = name.removesuffix(".weight_packed")
            scheme = next((s for pattern, s in schemes if pattern.fullmatch(path) or pattern.search(path)), None)
            if scheme is None:
                raise ExportError(f"{path}: packed weight matches no config group")
            quantized[path] = _unpack(tensors, path, scheme)
            dense[f"{path}.weight"] = quantized[path].dequantize(model.dtype)
        elif not name.endswith(("weight_scale", "weight_shape", "weight_zero_point", "weight_g_idx")):
            dense[name] = tensor
    missing, unexpected = model.load_state_dict(dense, strict=False)
    if unexpected or [m for m in missing if m not in _tied(model)]:
        raise ExportError(
            f"{directory}: weights do not match the config (missing {missing[:3]}, extra {unexpected[:3]})"
        )
    model.tie_weights()
    return model.eval(), quantized, AutoTokenizer.from_pretrained(directory)


def _refuse_int8_activations(directory: Path, quant: dict[str, Any]) -> None:
    """dgq's files (W4A8 pack-quantized, W8A8 int-quantized, compressor-int8) run INT8 activations, which no
    other format stores: re-storing them would write a different model, so they are refused by name."""
    from compressor.errors import UsageError

    what = None
    if quant.get("quant_method") == "compressor-int8":
        what = "a compressor-int8 directory (dgq INT8 linears, INT8 per-token activations)"
    groups = [g for g in (quant.get("config_groups") or {}).values() if (g or {}).get("input_activations")]
    if groups:
        weights = sorted({int((g.get("weights") or {}).get("num_bits", 0)) for g in groups})
        scheme = "/".join(f"W{bits}A8" for bits in weights)
        what = f"a compressed-tensors {quant.get('format')} {scheme} file (INT8 per-token input activations)"
    if what:
        raise UsageError(f"{directory}: {what}: compressor export cannot re-store it, no other format keeps the INT8 "
                         "activations (the file would load as a different model); run compress again with the "
                         "export format you need")


def _tied(model: Any) -> set[str]:
    return {"lm_head.weight"} if getattr(model.config, "tie_word_embeddings", False) else set()
