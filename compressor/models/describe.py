"""What a model directory or file holds, read from headers only (no weights are loaded)."""

from __future__ import annotations

import json
import re
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

from compressor.errors import ModelLoadError

_LAYER_INDEX = re.compile(r"\.(\d+)\.")


def _group_name(tensor_name: str) -> str:
    """``model.layers.3.mlp.up_proj.weight_packed`` -> ``model.layers.*.mlp.up_proj``."""
    module = tensor_name.rsplit(".", 1)[0]
    return _LAYER_INDEX.sub(".*.", module)


def describe(path: Path) -> dict[str, Any]:
    """Architecture, parameter count, bytes on disk, storage per module group, and the report summary."""
    if path.is_file() and path.suffix == ".gguf":
        return _describe_gguf(path)
    if not path.is_dir():
        raise ModelLoadError(f"{path}: not a model directory or .gguf file")
    ggufs = sorted(path.glob("*.gguf"))
    if ggufs and not (path / "config.json").exists():
        info = _describe_gguf(ggufs[0])
    else:
        info = _describe_safetensors(path)
    report = path / "compression_report.json"
    if report.is_file():
        data = json.loads(report.read_text())
        keys = ("recipe", "export_format", "size_bytes", "avg_bits_per_weight", "compression_ratio", "eval",
                "quality_gate")
        info["compression_report"] = {k: data.get(k) for k in keys}
        info["compression_report"]["recipe"] = (data.get("recipe") or {}).get("name")
    return info


def _describe_safetensors(path: Path) -> dict[str, Any]:
    from safetensors import safe_open

    config_file = path / "config.json"
    if not config_file.is_file():
        raise ModelLoadError(f"{path}: no config.json")
    config = json.loads(config_file.read_text())
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise ModelLoadError(f"{path}: no *.safetensors files")
    groups: dict[str, Counter[str]] = defaultdict(Counter)
    params = 0
    for file in files:
        try:
            with safe_open(str(file), framework="pt") as handle:
                for name in handle.keys():
                    tensor = handle.get_slice(name)
                    numel = 1
                    for dim in tensor.get_shape():
                        numel *= dim
                    if not name.endswith(("_scale", "_zero_point", "_shape", "g_idx")):
                        params += numel
                    groups[_group_name(name)][f"{name.rsplit('.', 1)[-1]}:{tensor.get_dtype()}"] += 1
        except Exception as exc:
            raise ModelLoadError(f"{file}: unreadable safetensors file ({exc})") from exc
    quant = config.get("quantization_config")
    return {
        "path": str(path),
        "architecture": (config.get("architectures") or [config.get("model_type")])[0],
        "model_type": config.get("model_type"),
        "layers": config.get("num_hidden_layers"),
        "hidden_size": config.get("hidden_size"),
        "stored_values": params,
        "bytes_on_disk": sum(f.stat().st_size for f in files),
        "quantization": _summarize_quant(quant) if quant else None,
        "custom_code": bool(config.get("auto_map")),
        "module_groups": {g: ", ".join(f"{k} x{v}" for k, v in sorted(c.items())) for g, c in sorted(groups.items())},
    }


def _summarize_quant(quant: dict[str, Any]) -> dict[str, Any]:
    groups = {}
    for name, group in (quant.get("config_groups") or {}).items():
        weights = group.get("weights") or {}
        groups[name] = {k: weights.get(k) for k in ("num_bits", "strategy", "group_size", "symmetric")}
        groups[name]["targets"] = len(group.get("targets") or [])
    return {"method": quant.get("quant_method"), "format": quant.get("format"), "groups": groups}


def _describe_gguf(path: Path) -> dict[str, Any]:
    from gguf import GGUFReader

    try:
        reader = GGUFReader(str(path))
    except Exception as exc:
        raise ModelLoadError(f"{path}: unreadable GGUF file ({exc})") from exc
    groups: dict[str, Counter[str]] = defaultdict(Counter)
    params = 0
    for tensor in reader.tensors:
        params += int(tensor.n_elements)
        groups[_LAYER_INDEX.sub(".*.", tensor.name)][tensor.tensor_type.name] += 1
    arch_field = reader.fields.get("general.architecture")
    arch = bytes(arch_field.parts[-1]).decode(errors="replace") if arch_field else "unknown"  # untrusted bytes
    return {
        "path": str(path),
        "architecture": arch,
        "stored_values": params,
        "bytes_on_disk": path.stat().st_size,
        "quantization": {"format": "gguf"},
        "module_groups": {g: ", ".join(f"{k} x{v}" for k, v in sorted(c.items())) for g, c in sorted(groups.items())},
    }
