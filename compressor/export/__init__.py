"""Writers for each stored form, and the checks that say before a run whether a recipe can be stored."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from compressor.errors import ExportError

if TYPE_CHECKING:
    from compressor.engine import ModelContext
    from compressor.methods.base import MethodConfig
    from compressor.recipe import ExportConfig


def check_export_settings(
    export: ExportConfig, quant_stages: list[MethodConfig], stages: list[MethodConfig] | None = None
) -> str | None:
    """Why the quantizing stages' settings (``stages``: every stage) cannot be stored in ``export.format``, or None.

    Runs before any model is loaded, so widths are unknown here; the writers check per module again.
    """
    if export.format == "dense":
        return None
    if export.format == "bitsandbytes":
        from compressor.export.bnb import check_bitsandbytes_recipe

        return check_bitsandbytes_recipe(quant_stages if stages is None else stages)
    if export.format == "bitstack":
        has_stage = any(stage.method == "bitstack" for stage in quant_stages)
        return None if has_stage else "'bitstack' stores a bitstack stage's blocks, but the recipe has none"
    if export.format == "compressor-int8":
        others = [stage.method for stage in quant_stages if stage.method != "dgq"]
        if others or not quant_stages:
            return f"'compressor-int8' stores dgq's INT8 linears only, the recipe quantizes with {others or 'none'}"
        return None
    if not quant_stages:
        return f"'{export.format}' stores quantized weights, but no stage quantizes (use format: dense)"
    for stage in quant_stages:
        bits, group, symmetric = (getattr(stage, k) for k in ("bits", "group_size", "symmetric"))
        problem = format_problem(export, bits, group, symmetric)
        if problem:
            return f"stage '{stage.method}': {problem}"
    return None


def format_problem(export: ExportConfig, bits: int, group: int, symmetric: bool) -> str | None:
    """Why one weight scheme cannot be stored in ``export.format``, or None."""
    if export.format == "dense":
        return None
    if export.format == "compressor-int8":
        return "compressor-int8 stores dgq's INT8 linears (weights, activation settings); a weight-only model has none"
    if export.format == "bitsandbytes":
        return "bitsandbytes stores the codes of nf4/int8 stages; other integer codes would be rounded again"
    if export.format == "gguf":
        from compressor.export.gguf import validate_gguf

        return validate_gguf(bits, group, symmetric, export.gguf_type)
    from compressor.export.compressed_tensors import validate_compressed_tensors

    if not symmetric:
        return (
            "asymmetric pack-quantized files do not load in transformers 5.23 + compressed-tensors 0.20 "
            "(upstream bug); use symmetric: true, or format: dense"
        )
    return validate_compressed_tensors(bits, group, symmetric)


def storage_scale_dtype(export: ExportConfig, model_dtype: torch.dtype) -> torch.dtype:
    """The dtype the format stores scales in: fp16 in GGUF blocks, float32 in compressor-int8, else the model's."""
    return {"gguf": torch.float16, "compressor-int8": torch.float32}.get(export.format, model_dtype)


def write_model(
    export: ExportConfig, run: ModelContext, tokenizer: Any, out_dir: Path, stages: list[Any] | None = None
) -> list[str]:
    """Write the compressed model into ``out_dir`` in the recipe's format; returns the files written.

    ``stages``: the run's stages, which ``bitstack`` and ``bitsandbytes`` need (their stored forms live on the
    stage, not the model).
    """
    max_shard = f"{export.max_shard_mb}MB"
    remote_code = run.structure.get("remote_code") or loaded_remote_code(run.model)
    if run.stream is not None:  # layers were written as they finished; assemble the shards from those files
        from compressor.export.streamed import write_streamed_model

        write_streamed_model(export, run, out_dir, remote_code)
    elif export.format == "dense":
        _check_dense_loads(run)
        run.model.save_pretrained(out_dir, max_shard_size=max_shard)
    elif export.format == "compressed-tensors":
        from compressor.export.compressed_tensors import write_compressed_tensors

        write_compressed_tensors(run.model, run.quantized, out_dir, max_shard_bytes=export.max_shard_mb * 2**20)
        _save_generation_config(run.model, out_dir)
    elif export.format == "gguf":
        from compressor.export.gguf import default_file_type, write_gguf

        file_type = export.gguf_type or default_file_type(run.quantized)
        write_gguf(run.model, run.quantized, out_dir / f"model-{file_type}.gguf", tokenizer, file_type,
                   requantize=export.gguf_type)
    elif export.format == "compressor-int8":
        from compressor.export.int8_dir import write_int8_dir

        write_int8_dir(run.model, out_dir, run.structure, max_shard_bytes=export.max_shard_mb * 2**20)
        _save_generation_config(run.model, out_dir)
    elif export.format == "bitsandbytes":
        from compressor.export.bnb import write_bitsandbytes

        write_bitsandbytes(run, stages or [], out_dir, max_shard_bytes=export.max_shard_mb * 2**20)
        _save_generation_config(run.model, out_dir)
    elif export.format == "bitstack":
        from compressor.export.bitstack_store import write_bitstack_stage

        write_bitstack_stage(out_dir, run.model, stages or [], remote_code=remote_code)
    else:  # pragma: no cover - the recipe schema allows only the formats above
        raise ExportError(f"unknown export format {export.format}")
    if export.format != "gguf":
        tokenizer.save_pretrained(out_dir)
        _attach_remote_code(remote_code, out_dir)
    return sorted(p.name for p in out_dir.iterdir())


def loaded_remote_code(model: Any) -> dict[str, Any] | None:
    """The remote-code spec of a model loaded from one of our exports whose ``auto_map`` names a shipped file.

    Quantizing a slicegpt / finercut / flap export in a second run keeps its config keys and ``auto_map``
    (the compressed-tensors writer saves the config as it is), so the modeling file must be copied again.
    """
    from compressor.models.shipped import shipped_dir

    auto_map = getattr(model.config, "auto_map", None) or {}
    modules = {str(ref).split(".")[0] for ref in auto_map.values()}
    if len(modules) != 1 or not (shipped_dir() / f"{next(iter(modules))}.py").is_file():
        return None
    return {"file": f"{modules.pop()}.py", "auto_map": dict(auto_map)}


def _check_dense_loads(run: ModelContext) -> None:
    """Refuse a dense file stock transformers would misread: per-layer shapes or new biases without a modeling file.

    Recipe validation refuses these first; this guards library callers that build stages themselves.
    """
    flap = run.structure.get("flap")
    if flap and not flap.get("standard", True) and not run.structure.get("remote_code"):
        raise ExportError("flap left per-layer head counts, widths or new biases, which a standard config cannot "
                          "describe; use structure: uniform and compensate: false for format dense")


def _attach_remote_code(spec: dict[str, Any] | None, out_dir: Path) -> None:
    """Copy a modeling file and point config.json's ``auto_map`` at it.

    A shape-changing method that stock transformers cannot express sets ``run.structure["remote_code"]``
    to ``{"file": "modeling_x.py", "auto_map": {"AutoModelForCausalLM": "modeling_x.Cls", ...},
    "config": {extra config.json keys}}``; the file must be one of ``compressor/models/shipped/``.
    """
    if not spec:
        return
    from compressor.export.bitstack_store import MANIFEST, attach_pruned_base

    if (out_dir / MANIFEST).is_file():  # a BitStack directory: auto_map names its loader, which builds this class
        attach_pruned_base(out_dir, spec)
    else:
        write_remote_code(out_dir, spec, auto_map=spec["auto_map"])


def write_remote_code(out_dir: Path, spec: dict[str, Any], **keys: Any) -> None:
    """Copy ``spec``'s shipped modeling file into ``out_dir`` and write its config keys and ``keys`` to config.json."""
    import json
    import shutil

    from compressor.models.shipped import shipped_dir

    source = shipped_dir() / spec["file"]
    if not source.is_file():
        raise ExportError(f"remote code file {spec['file']} is not shipped with compressor")
    shutil.copyfile(source, out_dir / spec["file"])
    config_path = out_dir / "config.json"
    config = json.loads(config_path.read_text())
    config.update(spec.get("config", {}), **keys)
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def _bits(run: ModelContext) -> int:
    return max((q.bits for q in run.quantized.values()), default=8)


def _save_generation_config(model: Any, out_dir: Path) -> None:
    generation = getattr(model, "generation_config", None)
    if generation is not None:
        generation.save_pretrained(out_dir)
