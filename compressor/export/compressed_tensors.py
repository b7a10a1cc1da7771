"""compressed-tensors ``pack-quantized`` export: our integers, packed by the library, for transformers/vLLM.

We pack the engine's own integer codes with the library's ``pack_to_int32`` instead of letting the library
re-quantize the fake-quantized weights: its model-level path re-rounds weight and scale in the model dtype and
flips integers in bf16 (FORMATS.md). The library's convention differs from ours by an offset: it stores
signed codes ``q - 2**(b-1)`` and a signed zero point ``zero - 2**(b-1)`` (``calculate_qparams`` puts zero
points in ``[-2**(b-1), 2**(b-1) - 1]``; ``pack_to_int32`` adds the offset back before packing), and
dequantizes ``scale * (q_signed - zp_signed)``, which equals our ``scale * (q - zero)``. Asymmetric zero
points are packed along rows (``packed_dim=0``), exactly as the library's compressor writes them.

Known upstream limit: transformers 5.23 + compressed-tensors 0.20 cannot load ANY asymmetric pack-quantized
file through the default path (the library's meta-device compress step leaves ``weight_zero_point``
unpacked, so the packed tensor is refused as a size mismatch; files the library writes itself fail the same
way). Such files load with ``CompressedTensorsConfig(dequantize=True)`` when they have one config group.

Linears that quantize their inputs (dgq's :class:`Int8Linear`: W4A8, W8A8) get ``input_activations`` INT8
per-token dynamic symmetric in their config group. W4A8 is written ``pack-quantized`` explicitly (the library
infers ``int-quantized`` for any int scheme with activations, which vLLM routes to a CPU-only W4A8 kernel);
INT8 per-channel weights with activations are ``int-quantized``: an int8 ``weight`` plus ``weight_scale``.

Each distinct (bits, group_size, symmetric) becomes one config group whose ``targets`` are anchored regexes of
the exact module paths, so per-module mixed precision loads with the default transformers path. Do not
recommend ``CompressedTensorsConfig(dequantize=True)`` for such files: in transformers 5.23 it applies the
first group's settings to every layer (FORMATS.md).

Mixture-of-experts models (Mixtral, Qwen3-MoE) are written with one linear per expert projection, under the
checkpoint's names (``mlp.experts.{e}.w1``). transformers 5.23 loads them only with
``CompressedTensorsConfig(dequantize=True)`` (its default path builds the 3-D experts, which hold no linear to
receive packed weights): each expert is dequantized, then merged into the 3-D layout. That loader takes the
experts' scheme from the first config group whose ``re:`` targets name experts and the dense layers' from the
first group whose targets do not, so experts and dense linears go in separate config groups even when their
schemes agree; the file then loads exactly when all experts share one symmetric scheme and all dense linears
another (the loader's expert path carries no zero point). Such files carry ``"dequantize": true`` in their
``quantization_config``, which transformers reads as that loader, so a plain ``from_pretrained`` loads them.
"""

from __future__ import annotations

import json
import re
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from compressed_tensors.compressors import ModelCompressor
from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32
from compressed_tensors.quantization import QuantizationArgs, QuantizationConfig, QuantizationScheme
from huggingface_hub import split_torch_state_dict_into_shards
from safetensors.torch import save_file
from transformers.modeling_utils import remove_tied_weights_from_state_dict

from compressor.errors import ExportError
from compressor.methods.quant.int8_linear import Int8Linear
from compressor.methods.quant.ops import QuantizedWeight
from compressor.models.moe import ExpertMLP

FORMAT = "pack-quantized"
#: INT8 per-channel weights with INT8 activations (W8A8): int8 ``weight`` + ``weight_scale``, the library's form.
INT_FORMAT = "int-quantized"
#: What an :class:`Int8Linear` does to its input: INT8, one scale per token computed at run time, symmetric.
INT8_TOKEN_ACTIVATIONS = QuantizationArgs(num_bits=8, type="int", symmetric=True, strategy="token", dynamic=True)
#: ``pack_to_int32`` packs 1..8 bits; below 2 bits the symmetric grid has no zero-centred level worth storing.
SUPPORTED_BITS = range(2, 9)

Scheme = tuple[int, int, bool]  # (bits, group_size, symmetric); group_size -1 is per channel


def validate_compressed_tensors(
    bits: int, group_size: int, symmetric: bool, columns: int | None = None
) -> str | None:
    """Why (bits, group_size, symmetric) cannot be stored as pack-quantized, or None when it can.

    Callable before any model is loaded (``columns`` unknown) and again per module once widths are known.
    ``symmetric`` is accepted both ways: asymmetric group/channel weights carry a packed zero point.
    """
    del symmetric  # both are storable; kept in the signature so every format's check reads the same
    if bits not in SUPPORTED_BITS:
        return f"compressed-tensors pack-quantized stores 2..8-bit integers; got bits={bits}"
    if group_size == 0 or group_size < -1:
        return f"group_size must be -1 (per channel) or a positive group width; got {group_size}"
    if columns is not None and group_size > 0 and columns % group_size:
        return f"group_size {group_size} does not divide {columns} columns (groups must be whole)"
    return None


def round_scales(qweight: QuantizedWeight, dtype: torch.dtype) -> QuantizedWeight:
    """The same weight with its scales rounded to ``dtype`` (kept as float32).

    The file stores scales in the model dtype and the loader dequantizes ``(q - zp) * scale`` in that dtype.
    That equals the in-memory ``dequantize(dtype)`` bit for bit only when the float32 scale is already
    representable in ``dtype`` (the product of a small integer and such a scale is exact in float32, so both
    round once). Apply before writing the fake-quantized weight for bf16/fp16 models; a no-op for float32.
    """
    return replace(qweight, scale=qweight.scale.to(dtype).float())


def scheme_of(qweight: QuantizedWeight) -> Scheme:
    """The config-group key of one weight; per-channel is normalised to group_size -1."""
    columns = qweight.shape[1]
    per_channel = qweight.group_size <= 0 or qweight.group_size == columns
    return (qweight.bits, -1 if per_channel else qweight.group_size, qweight.symmetric)


def pack_weight(qweight: QuantizedWeight, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """``weight_packed / weight_scale / weight_shape (/ weight_zero_point)`` for one module.

    ``weight_packed: [out, ceil(in * bits / 32)]`` int32; ``weight_scale: [out, n_groups]`` in ``dtype``;
    ``weight_shape: [2]`` int64; asymmetric adds ``weight_zero_point: [ceil(out * bits / 32), n_groups]``
    int32 (packed along rows, as the library's compressor does). Symmetric codes are stored as ``q - zero``
    per group, so a group with narrower codes (its own midpoint as zero) inside a ``bits``-wide weight is
    still stored exactly.
    """
    _check_storable(qweight)
    bits = qweight.bits
    low, high = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    q = qweight.q.to(torch.int16)
    if qweight.symmetric:
        signed = q - qweight.zero[:, qweight.column_groups()].to(torch.int16)
    else:
        signed = q - (high + 1)
    zero = qweight.zero.to(torch.int16) - (high + 1)
    if not (low <= int(signed.min()) and int(signed.max()) <= high and low <= int(zero.min())
            and int(zero.max()) <= high):
        raise ExportError(f"codes or zero points outside the {bits}-bit range; the weight is not {bits}-bit")
    tensors = {
        "weight_packed": pack_to_int32(signed.to(torch.int8), bits),
        "weight_scale": qweight.scale.to(dtype).contiguous(),
        "weight_shape": torch.tensor(qweight.shape, dtype=torch.int64),
    }
    if not qweight.symmetric:
        tensors["weight_zero_point"] = pack_to_int32(zero.to(torch.int8), bits, packed_dim=0)
    return tensors


def int_weight(qweight: QuantizedWeight, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """``weight: [out, in]`` int8 signed codes and ``weight_scale: [out, 1]`` in ``dtype`` (int-quantized W8A8)."""
    if scheme_of(qweight) != (8, -1, True):
        raise ExportError(f"int-quantized stores 8-bit symmetric per-channel weights, got {scheme_of(qweight)}")
    signed = qweight.q.to(torch.int16) - qweight.zero[:, qweight.column_groups()].to(torch.int16)
    if int(signed.min()) < -128 or int(signed.max()) > 127:
        raise ExportError("codes outside the 8-bit range; the weight is not 8-bit")
    return {"weight": signed.to(torch.int8).contiguous(), "weight_scale": qweight.scale.to(dtype).contiguous()}


def activation_bits(module: torch.nn.Module | None) -> int | None:
    """8 for a linear whose forward quantizes its input per token (Int8Linear), None for weight-only linears.

    A clip below the per-token maximum (``act_percentile`` < 100) is refused: loaders quantize with the maximum.
    """
    if not isinstance(module, Int8Linear):
        return None
    if module.act_percentile != 100:
        raise ExportError(f"activations clipped at percentile {module.act_percentile:g} cannot be stored in "
                          "compressed-tensors (loaders scale each token by its maximum); use act_percentile: 100")
    return 8


def module_format(scheme: Scheme, act_bits: int | None) -> str:
    """``int-quantized`` for W8A8 per channel, ``pack-quantized`` for everything else (W4A8 included)."""
    return INT_FORMAT if act_bits and scheme == (8, -1, True) else FORMAT


def _check_storable(qweight: QuantizedWeight) -> None:
    bits, group_size, symmetric = scheme_of(qweight)
    problem = validate_compressed_tensors(bits, group_size, symmetric, qweight.shape[1])
    if problem:
        raise ExportError(problem)
    if qweight.g_idx is not None and not torch.equal(qweight.g_idx.long().cpu(), _contiguous_groups(qweight)):
        raise ExportError("compressed-tensors 0.20 cannot store a column order (g_idx); use static groups")


def _contiguous_groups(qweight: QuantizedWeight) -> torch.Tensor:
    """The group of each column without reordering; a ``g_idx`` equal to this carries no permutation."""
    columns = qweight.shape[1]
    return torch.arange(columns) // (columns if qweight.group_size <= 0 else qweight.group_size)


def target_regex(path: str) -> str:
    """An anchored regex matching exactly one module path (``re:^model\\.layers\\.0\\.mlp\\.up_proj$``)."""
    return f"re:^{re.escape(path)}$"


def build_quantization_config(
    model: Any, quantized: dict[str, QuantizedWeight]
) -> QuantizationConfig:
    """One config group per distinct scheme, targets naming exact paths; unquantized linears go to ``ignore``.

    Exact anchored paths (not ``Linear``) keep mixed precision unambiguous and never match the attention
    module itself, which compressed-tensors would read as KV-cache quantization.
    """
    modules = dict(model.named_modules())
    groups: dict[tuple[Scheme, bool, int], list[str]] = {}
    for path, qweight in quantized.items():
        expert = _is_expert(modules, path)  # apart from the dense linears: see the module docstring
        groups.setdefault((scheme_of(qweight), expert, activation_bits(modules.get(path)) or 0), []).append(path)
    _check_experts(sorted(scheme for scheme, expert, _ in groups if expert))
    config_groups = {}
    for index, ((scheme, _, act_bits), paths) in enumerate(sorted(groups.items())):
        bits, group_size, symmetric = scheme
        weights = QuantizationArgs(
            num_bits=bits, type="int", symmetric=symmetric,
            strategy="channel" if group_size == -1 else "group",
            group_size=None if group_size == -1 else group_size,
        )
        config_groups[f"group_{index}"] = QuantizationScheme(
            targets=[target_regex(p) for p in sorted(paths)], weights=weights,
            input_activations=INT8_TOKEN_ACTIVATIONS if act_bits else None,
            format=module_format(scheme, act_bits) if act_bits else None)  # weight-only groups: as before
    ignore = [name for name, module in model.named_modules()
              if isinstance(module, torch.nn.Linear) and name not in quantized]
    formats = {str(getattr(s.format, "value", s.format or FORMAT)) for s in config_groups.values()}
    return QuantizationConfig(config_groups=config_groups, format=formats.pop() if len(formats) == 1 else
                              "mixed-precision", quantization_status="compressed", ignore=ignore)


def _is_expert(modules: dict[str, torch.nn.Module], path: str) -> bool:
    """True for a projection of one expert of a mixture of experts (``mlp.experts.3.w1``)."""
    return isinstance(modules.get(path.rpartition(".")[0]), ExpertMLP)


def _check_experts(schemes: list[Scheme]) -> None:
    """Refuse experts that transformers' loader would misread: it dequantizes all of them with one scheme and no
    zero point (vLLM's fused MoE layer also takes one scheme for every expert of a layer)."""
    if len(schemes) > 1:
        raise ExportError(
            f"the experts are quantized with {len(schemes)} schemes (bits, group_size, symmetric) {schemes}; "
            "loaders apply one to every expert: give the experts one bits and a group_size dividing both the hidden "
            "and the expert width"
        )
    if schemes and not schemes[0][2]:
        raise ExportError("asymmetric experts: transformers 5.23 and vLLM load compressed-tensors experts without "
                          "zero points; quantize the experts with symmetric: true")


def compressed_state_dict(
    model: Any, quantized: dict[str, QuantizedWeight]
) -> dict[str, torch.Tensor]:
    """Every tensor the file holds: packed quantized linears, everything else dense under its usual name.

    Tied weights are dropped the way ``save_pretrained`` drops them (transformers re-ties on load), so a tied
    lm_head is written once, as the embedding. A quantized tied lm_head cannot be expressed and is refused.
    """
    modules = dict(model.named_modules())
    missing = [path for path in quantized if not isinstance(modules.get(path), torch.nn.Linear)]
    if missing:
        raise ExportError(f"quantized paths are not linear modules of the model: {', '.join(missing[:5])}")
    dtype = _model_dtype(model)
    state = remove_tied_weights_from_state_dict(dict(model.state_dict()), model)
    tied = [path for path in quantized if f"{path}.weight" not in state]
    if tied:
        raise ExportError(f"{tied[0]} is quantized but its weight is tied to another tensor; "
                          "leave tied lm_head/embeddings out of the quantized targets")
    tensors: dict[str, torch.Tensor] = {}
    for name, tensor in state.items():
        module_path = name.rsplit(".", 1)[0]
        if module_path in quantized and name.endswith(".weight"):
            continue
        tensors[name] = tensor.detach().cpu().contiguous().clone()
    for path, qweight in quantized.items():
        as_int = module_format(scheme_of(qweight), activation_bits(modules[path])) == INT_FORMAT
        for suffix, tensor in (int_weight if as_int else pack_weight)(qweight, dtype).items():
            tensors[f"{path}.{suffix}"] = tensor.cpu()
    return tensors


def _model_dtype(model: Any) -> torch.dtype:
    """The dtype config.json records: scales are stored in it (transformers casts float scales to it)."""
    dtype = getattr(model, "dtype", None)
    return dtype if isinstance(dtype, torch.dtype) and dtype.is_floating_point else torch.float32


def write_shards(tensors: dict[str, torch.Tensor], out_dir: Path, max_shard_bytes: int) -> list[str]:
    """``model.safetensors``, or ``model-0000k-of-0000n.safetensors`` + index above ``max_shard_bytes``."""
    split = split_torch_state_dict_into_shards(tensors, max_shard_size=max_shard_bytes)
    for filename, names in split.filename_to_tensors.items():
        save_file({name: tensors[name] for name in names}, str(out_dir / filename), metadata={"format": "pt"})
    if split.is_sharded:
        index = {"metadata": {**split.metadata, "total_size": sum(t.nbytes for t in tensors.values())},
                 "weight_map": dict(sorted(split.tensor_to_filename.items()))}
        (out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    return sorted(split.filename_to_tensors)


def write_compressed_tensors(
    model: Any, quantized: dict[str, QuantizedWeight], out_dir: Path, max_shard_bytes: int = 2 * 1024**3
) -> dict[str, Any]:
    """Write safetensors + config.json with a pack-quantized ``quantization_config``; returns that dict.

    ``model`` holds fake-quantized float weights (only its dense tensors and config are read); ``quantized``
    maps module paths to the integers that are stored. ``out_dir`` must exist; tokenizer and generation
    config are the caller's.
    """
    if not quantized:
        raise ExportError("compressed-tensors export needs at least one quantized module (use format: dense)")
    out_dir = Path(out_dir)
    qconfig = build_quantization_config(model, quantized)
    write_shards(compressed_state_dict(model, quantized), out_dir, max_shard_bytes)
    model.config.save_pretrained(out_dir)
    ModelCompressor(quantization_config=qconfig).update_config(str(out_dir))
    config = json.loads((out_dir / "config.json").read_text())
    modules = dict(model.named_modules())
    if any(_is_expert(modules, path) for path in quantized):
        # transformers reads this key as CompressedTensorsConfig(dequantize=True): its only loader for experts
        config["quantization_config"]["dequantize"] = True
        (out_dir / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    written: dict[str, Any] = config["quantization_config"]
    return written
