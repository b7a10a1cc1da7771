"""format: bitsandbytes: the directory transformers writes for a bitsandbytes model, from the nf4/int8 stages.

Per quantized linear the tensors are bitsandbytes' own serialization (``Linear4bit`` / ``Linear8bitLt``
``_save_to_state_dict``): NF4 writes ``weight`` (packed uint8 codes) and the ``QuantState.as_dict(packed=True)``
entries under ``weight.`` (``absmax``, ``quant_map``, with double quantization ``nested_absmax`` /
``nested_quant_map``, and ``quant_state.bitsandbytes__nf4``, the packed JSON of the rest); LLM.int8() writes
``weight`` (int8 ``CB``), ``SCB`` and ``weight_format``. config.json gets ``BitsAndBytesConfig(...).to_dict()``
(``quant_method: bitsandbytes``) with every linear left dense in ``llm_int8_skip_modules``, so plain
``AutoModelForCausalLM.from_pretrained(DIR)`` rebuilds the model with ``Linear4bit`` / ``Linear8bitLt``.

The codes are the ones the stage computed (an NF4 stage with double quantization cannot be re-derived from the
dequantized weights: its absmax codes depend on their mean). A linear the stage quantized in a run resumed from a
checkpoint has no stored form on the stage; it is quantized again from its weight, which gives back the same codes
exactly for NF4 without double quantization and for int8 (checked, else an error).

We never run a forward through a bitsandbytes ``Linear4bit`` before saving: on CPUs with AVX512-BF16 the first
forward repacks the weight and a later save writes the scales in the wrong layout (FORMATS.md).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from compressor.errors import ExportError
from compressor.methods.quant.bnb import INT8Config, NF4Config, _BitsAndBytesQuantizer
from compressor.methods.quant.bnb_ops import Int8Weight, NF4Weight, quantize_int8, quantize_nf4
from compressor.methods.quant.common import targeted_linears
from compressor.models.moe import ExpertMLP

if TYPE_CHECKING:
    from compressor.engine import ModelContext
    from compressor.methods.base import Method, MethodConfig

log = logging.getLogger(__name__)

FORMAT = "bitsandbytes"
#: Pruning stages whose result is a standard transformers config (ShortGPT's layer removal); the others need
#: their own modeling file, which a bitsandbytes directory loaded by plain ``from_pretrained`` cannot use.
STANDARD_PRUNERS = ("layer_drop",)


def check_bitsandbytes_recipe(stages: list[MethodConfig]) -> str | None:
    """Why a recipe with these stages cannot be stored as ``bitsandbytes``, or None (before any model loads)."""
    from compressor.methods.registry import get_method

    kinds = {stage.method: get_method(stage.method).kind for stage in stages}
    pruners = [m for m, kind in kinds.items() if kind == "prune" and m not in STANDARD_PRUNERS]
    if pruners:
        return (f"'{FORMAT}' stores a standard transformers model, and {pruners[0]} leaves one that needs its own "
                "modeling file; use format: dense or compressed-tensors (layer_drop composes with bitsandbytes)")
    quantizers = [m for m, kind in kinds.items() if kind != "prune"]
    others = [m for m in quantizers if m not in ("nf4", "int8")]
    if others:
        return (f"'{FORMAT}' stores nf4 or int8 stages only, and the recipe has {others[0]} (its integer codes would "
                "be rounded again); use format: compressed-tensors or gguf for it")
    if not quantizers:
        return f"'{FORMAT}' stores quantized weights, but no stage quantizes (add an nf4 or int8 stage)"
    if len(set(quantizers)) > 1:
        return f"'{FORMAT}' stores one kind per model (4-bit or 8-bit), and the recipe has both nf4 and int8"
    return None


def write_bitsandbytes(run: ModelContext, stages: list[Method], out_dir: Path, max_shard_bytes: int) -> dict[str, Any]:
    """Write ``run.model`` with the nf4/int8 stages' linears in bitsandbytes' serialization; returns the
    ``quantization_config`` written. ``out_dir`` must exist; the tokenizer is the caller's."""
    model = run.model
    if run.structure.get("remote_code") or getattr(model.config, "auto_map", None):
        raise ExportError(f"'{FORMAT}' stores a standard transformers model, and this one needs its own modeling "
                          "file (a pruned model); use format: dense or compressed-tensors")
    if any(isinstance(module, ExpertMLP) for module in model.modules()):
        raise ExportError(f"'{FORMAT}': transformers 5.23 loads mixture-of-experts models with 3-D expert tensors, "
                          "which hold no bitsandbytes linear; use format: compressed-tensors or dense")
    bnb_stages = [stage for stage in stages if isinstance(stage, _BitsAndBytesQuantizer)]
    if not bnb_stages:
        raise ExportError(f"'{FORMAT}' stores the linears of an nf4 or int8 stage, and the run has none")
    weights = _stored_forms(run, bnb_stages)
    _warn_avx512_widths(weights)
    tensors = _dense_tensors(model, set(weights))
    for path, weight in weights.items():
        tensors.update(_serialized(path, weight))
    _save_shards(tensors, out_dir, max_shard_bytes)
    quant = _quantization_config(model, bnb_stages[0].config, set(weights))
    model.config.save_pretrained(out_dir)
    config = json.loads((out_dir / "config.json").read_text())
    config["quantization_config"] = quant
    config["dtype"] = str(next(model.parameters()).dtype).removeprefix("torch.")
    (out_dir / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return quant


def _warn_avx512_widths(weights: dict[str, NF4Weight | Int8Weight]) -> None:
    """Name the NF4 linears that bitsandbytes 0.50's AVX-512 CPU decoder reads wrongly (the file itself is right).

    That decoder (used when ``has_avx512bf16()``) restarts the blocks of 64 at every row, which is the format's
    blocking only when the width is a multiple of 64; it takes that path for widths that are multiples of 16, so
    a width such as 96 loads with wrong weights on such CPUs (up to 2.04 off, measured), and right on CUDA, on
    other CPUs and through ``dequantize_4bit``. Other widths take its generic path, which is right.
    """
    widths = {path: int(weight.state.shape[1]) for path, weight in weights.items() if isinstance(weight, NF4Weight)}
    odd = [path for path, width in widths.items() if width % 16 == 0 and width % 64 != 0]
    if odd:
        log.warning("bitsandbytes: %d NF4 linear(s) are %s wide (a multiple of 16, not of 64), e.g. %s: "
                    "bitsandbytes 0.50's AVX-512 CPU kernel decodes such widths wrongly (CUDA and other CPUs are "
                    "right); on such a CPU, check the loaded model's outputs", len(odd),
                    "/".join(sorted({str(widths[p]) for p in odd})), odd[0])


def _stored_forms(run: ModelContext, stages: list[_BitsAndBytesQuantizer]) -> dict[str, NF4Weight | Int8Weight]:
    """Every targeted linear's bitsandbytes form: the stage's, or (layers restored by --resume) quantized again."""
    weights: dict[str, NF4Weight | Int8Weight] = {}
    for stage in stages:
        for path in targeted_linears(run.adapter, stage.config):  # type: ignore[arg-type]
            weight = stage.states.get(path) or _requantized(run.model, path, stage.config)
            weights[path] = weight.to("cpu")
    return weights


def _requantized(model: nn.Module, path: str, config: MethodConfig) -> NF4Weight | Int8Weight:
    """Quantize a linear's (already dequantized) weight again; refuse unless it gives back that weight exactly."""
    module = model.get_submodule(path)
    assert isinstance(module, nn.Linear)
    W = module.weight.data
    if isinstance(config, NF4Config) and config.double_quant:
        raise ExportError(f"{path}: its nf4 codes with double_quant were not kept (a run resumed from a checkpoint) "
                          "and cannot be derived again from the weights; run again without --resume")
    weight = quantize_nf4(W, False) if isinstance(config, NF4Config) else quantize_int8(W)
    if not torch.equal(weight.dequantize(W.dtype), W):
        raise ExportError(f"{path}: its weight is not a {config.method} weight (quantizing it again changes it); "
                          "run the recipe again without --resume")
    return weight


def _serialized(path: str, weight: NF4Weight | Int8Weight) -> dict[str, torch.Tensor]:
    """The state-dict entries bitsandbytes' Linear4bit / Linear8bitLt save for one linear."""
    if isinstance(weight, NF4Weight):
        entries = {f"{path}.weight": weight.packed}
        entries.update({f"{path}.weight.{k}": v for k, v in weight.state.as_dict(packed=True).items()})
    else:
        entries = {f"{path}.weight": weight.codes, f"{path}.SCB": weight.scale,
                   f"{path}.weight_format": torch.tensor(0, dtype=torch.uint8)}
    return {name: t.detach().cpu().contiguous() for name, t in entries.items()}


def _quantization_config(model: nn.Module, config: MethodConfig, quantized: set[str]) -> dict[str, Any]:
    """``BitsAndBytesConfig(...).to_dict()`` for this model; every linear not quantized is named as skipped
    (transformers would otherwise skip only the output head and expect packed weights for the rest)."""
    from transformers import BitsAndBytesConfig

    dtype = next(model.parameters()).dtype
    skip = sorted(name for name, module in model.named_modules()
                  if isinstance(module, nn.Linear) and name not in quantized)
    if isinstance(config, INT8Config):
        bnb = BitsAndBytesConfig(load_in_8bit=True, llm_int8_threshold=config.threshold, llm_int8_skip_modules=skip)
    else:
        assert isinstance(config, NF4Config)
        bnb = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype,
                                 bnb_4bit_use_double_quant=config.double_quant, llm_int8_skip_modules=skip)
    return bnb.to_dict()


def _dense_tensors(model: Any, quantized: set[str]) -> dict[str, torch.Tensor]:
    """Every state-dict tensor except the quantized linears' float weights; tied copies dropped as save_pretrained."""
    from transformers.modeling_utils import remove_tied_weights_from_state_dict

    state = remove_tied_weights_from_state_dict(dict(model.state_dict()), model)
    tied = [path for path in quantized if f"{path}.weight" not in state]
    if tied:
        raise ExportError(f"{tied[0]}: its weight is tied to another tensor; leave tied heads out of the targets")
    skip = {f"{path}.weight" for path in quantized}
    return {name: t.detach().cpu().contiguous().clone() for name, t in state.items() if name not in skip}


def _save_shards(tensors: dict[str, torch.Tensor], out_dir: Path, max_shard_bytes: int) -> None:
    """``model.safetensors``, or shards plus ``model.safetensors.index.json`` (transformers' layout)."""
    from huggingface_hub import split_torch_state_dict_into_shards
    from safetensors.torch import save_file

    split = split_torch_state_dict_into_shards(tensors, filename_pattern="model{suffix}.safetensors",
                                               max_shard_size=max_shard_bytes)
    for filename, names in split.filename_to_tensors.items():
        save_file({name: tensors[name] for name in names}, str(out_dir / filename), metadata={"format": "pt"})
    if split.is_sharded:
        index = {"metadata": {"total_size": sum(t.nbytes for t in tensors.values())},
                 "weight_map": dict(sorted(split.tensor_to_filename.items()))}
        (out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
