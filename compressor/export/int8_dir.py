"""compressor-int8: our own directory of a dgq model, which ``compressor.load`` rebuilds as the INT8 model exactly.

compressed-tensors stores a dual-grained weight as one float scale per group (integer scale x channel scale, rounded
to the model dtype) and cannot say "clip each token at a percentile", so a file of that format is a close
neighbour of the in-memory model, not the model. This form keeps what :class:`Int8Linear` multiplies:

- ``int8-model.safetensors`` (or ``int8-model-0000k-of-0000n.safetensors`` + index above the shard size): every
  dense tensor under its usual name (the smoothing scales are already folded
  into the norms), and per INT8 linear ``<path>.weight_codes`` (INT4 codes packed two per byte as ``code + 8``,
  low nibble first; INT8 codes as int8), ``<path>.weight_int_scale`` (``[out, n_groups]`` uint8 in ``[1, 16]``)
  and ``<path>.weight_channel_scale`` (``[out]`` float32);
- ``config.json``: the model's own config plus ``quantization_config`` with ``quant_method: compressor-int8``,
  the format version and per linear its bits, group size, shape and ``act_percentile``;
- the tokenizer and generation config, as other exports.

Plain ``transformers.AutoModelForCausalLM.from_pretrained(DIR)`` refuses it (tested): transformers warns
"Unknown quantization type, got compressor-int8" and then fails with "no file named model.safetensors", because
the weights file has another name on purpose, so no loader silently runs the linears at random initial weights.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from compressor.errors import ExportError, ModelLoadError
from compressor.methods.quant.dgq_ops import DualGrainedWeight
from compressor.methods.quant.int8_linear import Int8Linear

if TYPE_CHECKING:
    from compressor.models.loading import LoadedModel

FORMAT = "compressor-int8"
VERSION = 1
WEIGHTS_FILE = "int8-model.safetensors"
_SHARDS = "int8-model{suffix}.safetensors"
_SUFFIXES = ("weight_codes", "weight_int_scale", "weight_channel_scale")
NOTE = (f"{FORMAT}: dgq INT8 linears (integer group scales and channel scales kept apart, INT8 per-token "
        "activations); load with compressor.load(DIR), transformers alone cannot run it")


def pack_int4(codes: torch.Tensor) -> torch.Tensor:
    """``[out, in]`` int8 codes in ``[-8, 7]`` -> ``[out, ceil(in / 2)]`` uint8, ``code + 8`` low nibble first."""
    unsigned = (codes.to(torch.int16) + 8).to(torch.uint8)
    if unsigned.shape[1] % 2:
        unsigned = torch.cat([unsigned, torch.full_like(unsigned[:, :1], 8)], dim=1)
    return unsigned[:, 0::2] | (unsigned[:, 1::2] << 4)


def unpack_int4(packed: torch.Tensor, columns: int) -> torch.Tensor:
    """Inverse of :func:`pack_int4`: ``[out, columns]`` int8 codes."""
    low, high = packed & 0xF, packed >> 4
    unsigned = torch.stack([low, high], dim=2).reshape(packed.shape[0], -1)[:, :columns]
    return (unsigned.to(torch.int16) - 8).to(torch.int8)


def write_int8_dir(
    model: Any, out_dir: Path, structure: dict[str, Any] | None = None, max_shard_bytes: int = 2 * 1024**3
) -> dict[str, Any]:
    """Write ``model``'s INT8 linears and every other tensor into ``out_dir`` (which must exist).

    Returns the ``quantization_config`` written. ``structure`` is the run's (a modeling file named there, or an
    ``auto_map`` in the config, means a model this directory cannot rebuild from ``config.json``).
    """
    linears = {name: m for name, m in model.named_modules() if isinstance(m, Int8Linear)}
    if not linears:
        raise ExportError(f"{FORMAT} stores dgq's INT8 linears and the model has none (use format: dense)")
    if (structure or {}).get("remote_code") or getattr(model.config, "auto_map", None):
        raise ExportError(f"{FORMAT} rebuilds the model from a standard config.json, and this one needs its own "
                          "modeling file (a pruned model); use format: compressed-tensors")
    tensors = _dense_tensors(model, set(linears))
    specs = {}
    for path, module in linears.items():
        weight = module.dual_grained()
        codes = pack_int4(weight.codes) if weight.bits == 4 else weight.codes
        tensors[f"{path}.weight_codes"] = codes.cpu().contiguous()
        tensors[f"{path}.weight_int_scale"] = weight.int_scale.to(torch.uint8).cpu().contiguous()
        tensors[f"{path}.weight_channel_scale"] = weight.channel_scale.float().cpu().contiguous()
        specs[path] = {"weight_bits": weight.bits, "group_size": weight.group_size,
                       "shape": list(weight.codes.shape), "act_percentile": module.act_percentile}
    _save_shards(tensors, out_dir, max_shard_bytes)
    model.config.save_pretrained(out_dir)
    quant = {"quant_method": FORMAT, "version": VERSION, "note": NOTE,
             "activations": {"num_bits": 8, "strategy": "token", "dynamic": True, "symmetric": True},
             "linears": dict(sorted(specs.items()))}
    config = json.loads((out_dir / "config.json").read_text())
    config["quantization_config"] = quant
    config["dtype"] = str(next(model.parameters()).dtype).removeprefix("torch.")  # the weights', not the config's
    (out_dir / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return quant


def _save_shards(tensors: dict[str, torch.Tensor], out_dir: Path, max_shard_bytes: int) -> None:
    """One ``int8-model.safetensors``, or shards plus ``int8-model.safetensors.index.json`` (the usual layout)."""
    from huggingface_hub import split_torch_state_dict_into_shards

    split = split_torch_state_dict_into_shards(tensors, filename_pattern=_SHARDS, max_shard_size=max_shard_bytes)
    for filename, names in split.filename_to_tensors.items():
        save_file({name: tensors[name] for name in names}, str(out_dir / filename), metadata={"format": "pt"})
    if split.is_sharded:
        index = {"metadata": {"total_size": sum(t.nbytes for t in tensors.values())},
                 "weight_map": dict(sorted(split.tensor_to_filename.items()))}
        (out_dir / f"{WEIGHTS_FILE}.index.json").write_text(json.dumps(index, indent=2) + "\n")


def _load_shards(directory: Path) -> dict[str, torch.Tensor]:
    index = directory / f"{WEIGHTS_FILE}.index.json"
    try:
        files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.is_file() else [WEIGHTS_FILE]
    except (OSError, ValueError, KeyError) as exc:
        raise ModelLoadError(f"{index}: unreadable shard index ({exc})") from None
    missing = [name for name in files if not (directory / name).is_file()]
    if missing:
        raise ModelLoadError(f"{directory}: {FORMAT} directory without {missing[0]}")
    tensors: dict[str, torch.Tensor] = {}
    for name in files:
        tensors.update(load_file(str(directory / name)))
    return tensors


def _dense_tensors(model: Any, quantized: set[str]) -> dict[str, torch.Tensor]:
    """Every state-dict tensor except the INT8 linears' float weights; tied copies dropped as save_pretrained does."""
    from transformers.modeling_utils import remove_tied_weights_from_state_dict

    state = remove_tied_weights_from_state_dict(dict(model.state_dict()), model)
    tied = [path for path in quantized if f"{path}.weight" not in state]
    if tied:
        raise ExportError(f"{tied[0]} is an INT8 linear whose weight is tied to another tensor; "
                          "leave tied lm_head/embeddings out of the dgq targets")
    skip = {f"{path}.weight" for path in quantized}
    return {name: t.detach().cpu().contiguous().clone() for name, t in state.items() if name not in skip}


def int8_dir_config(path: str | Path) -> dict[str, Any] | None:
    """The ``quantization_config`` of a compressor-int8 directory, or None for anything else."""
    config_path = Path(path) / "config.json"
    if not config_path.is_file():
        return None
    try:
        quant = json.loads(config_path.read_text()).get("quantization_config") or {}
    except (OSError, ValueError):
        return None
    return quant if isinstance(quant, dict) and quant.get("quant_method") == FORMAT else None


def read_int8_dir(directory: Path, dtype: torch.dtype | str = "auto") -> nn.Module:
    """The model of a compressor-int8 directory with its :class:`Int8Linear` modules, in eval mode.

    ``dtype`` "auto" is the dtype the directory was written in (the INT8 model then equals the written one bit for
    bit); a forced dtype changes the float parts only.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    from compressor.models import get_adapter

    quant = int8_dir_config(directory)
    if quant is None or quant.get("version") != VERSION:
        raise ModelLoadError(f"{directory}: not a {FORMAT} version {VERSION} directory (config.json "
                             "quantization_config)")
    config = AutoConfig.from_pretrained(directory)
    del config.quantization_config
    if dtype == "auto":
        stored = getattr(config, "dtype", None) or torch.float32
        dtype = getattr(torch, stored) if isinstance(stored, str) else stored
    model: Any = AutoModelForCausalLM.from_config(config, dtype=dtype)
    get_adapter(model)  # the module layout the directory was written from (a MoE's experts as per-expert linears)
    tensors = _load_shards(directory)
    dense = {name: t for name, t in tensors.items() if not name.endswith(_SUFFIXES)}
    missing, unexpected = model.load_state_dict(dense, strict=False)
    allowed = {f"{path}.weight" for path in quant["linears"]} | _tied(model)
    if unexpected or set(missing) - allowed:
        raise ModelLoadError(f"{directory}: weights do not match the config (missing "
                             f"{sorted(set(missing) - allowed)[:3]}, extra {unexpected[:3]})")
    for path, spec in quant["linears"].items():
        linear = model.get_submodule(path)
        weight = _dual_grained(tensors, path, spec, directory)
        model.set_submodule(path, Int8Linear.from_linear(linear, weight, float(spec["act_percentile"])))
    model.tie_weights()
    return model.eval()


def load_int8_dir(directory: Path, dtype: str = "auto") -> LoadedModel:
    """``compressor.load`` of a compressor-int8 directory: the INT8 model and the tokenizer stored beside it."""
    from transformers import AutoTokenizer

    from compressor.models.loading import LoadedModel, resolve_dtype

    model = read_int8_dir(directory, resolve_dtype(dtype))
    try:
        tokenizer = AutoTokenizer.from_pretrained(directory)
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"cannot load the tokenizer from {directory}: {str(exc).splitlines()[0]}") from exc
    return LoadedModel(model, tokenizer, str(directory), directory)


def _dual_grained(tensors: dict[str, torch.Tensor], path: str, spec: dict[str, Any], where: Path) -> DualGrainedWeight:
    try:
        bits, (out, columns) = int(spec["weight_bits"]), spec["shape"]
        stored = tensors[f"{path}.weight_codes"]
        codes = unpack_int4(stored, columns) if bits == 4 else stored
        weight = DualGrainedWeight(codes, tensors[f"{path}.weight_int_scale"].to(torch.int16),
                                   tensors[f"{path}.weight_channel_scale"].float(), bits, int(spec["group_size"]))
    except (KeyError, ValueError, TypeError) as exc:
        raise ModelLoadError(f"{where}: {path}: incomplete {FORMAT} linear ({exc})") from None
    if tuple(codes.shape) != (out, columns):
        raise ModelLoadError(f"{where}: {path}: codes of shape {tuple(codes.shape)}, config says {(out, columns)}")
    return weight


def _tied(model: Any) -> set[str]:
    return {"lm_head.weight"} if getattr(model.config, "tie_word_embeddings", False) else set()
