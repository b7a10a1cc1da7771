"""Checks on a checkpoint's files and sizes before a byte of its weights is loaded, and on the weights after.

A safetensors header is JSON we read ourselves: a file cut short, corrupt bytes, or a header whose offsets
overlap, run past the end of the file or disagree with a tensor's dtype and shape would otherwise reach the
safetensors/torch loaders, which fail with messages that name no tensor (or, for a header that lies, read
the wrong bytes). A config.json with absurd sizes would make transformers allocate the model before it
notices the weights do not match; the parameter count it implies is compared with the weight files and the
machine's memory first. NaN/inf weights are refused after loading, naming the tensor, since every method
downstream would spread them silently.
"""

from __future__ import annotations

import json
import math
import os
import struct
from pathlib import Path
from typing import Any

import torch
from torch import nn

from compressor.errors import ModelLoadError

#: The safetensors format's own limit on the JSON header (the Rust reader refuses larger ones).
MAX_HEADER_BYTES = 100_000_000
#: Bits per element of every dtype the safetensors format defines.
DTYPE_BITS = {
    "F64": 64, "I64": 64, "U64": 64, "F32": 32, "I32": 32, "U32": 32, "F16": 16, "BF16": 16, "I16": 16, "U16": 16,
    "F8_E4M3": 8, "F8_E5M2": 8, "F8_E8M0": 8, "I8": 8, "U8": 8, "BOOL": 8, "F6_E2M3": 6, "F6_E3M2": 6, "F4": 4,
}
#: The fewest bits per weight a loadable checkpoint stores (packed 2-bit codes plus scales exceed this), so a
#: config implying more bytes than the files hold at this rate describes a model the files cannot be.
MIN_BITS_PER_WEIGHT = 1
#: The fewest bytes per parameter the loaded (dense, 16-bit or wider) model takes in memory.
MIN_LOADED_BYTES = 2


def check_safetensors(path: Path) -> dict[str, Any]:
    """Validate one ``.safetensors`` file's header against its size and return it; raise ModelLoadError naming
    the problem. Callers that need the tensor list (sizes for streaming) read it here rather than parse it again.

    Layout: 8 bytes little-endian header length N, N bytes of JSON ``{name: {dtype, shape, data_offsets}}``,
    then the data; offsets are relative to the data's start.
    """
    size = path.stat().st_size
    with path.open("rb") as file:
        head = file.read(8)
        if len(head) < 8:
            raise ModelLoadError(f"{path}: {size} bytes, too short for a safetensors header (truncated)")
        (length,) = struct.unpack("<Q", head)
        if length > MAX_HEADER_BYTES or 8 + length > size:
            raise ModelLoadError(f"{path}: header length {length} does not fit the {size}-byte file "
                                 "(truncated or not a safetensors file)")
        raw = file.read(length)
    if not raw.startswith(b"{"):  # the safetensors reader's own rule; json.loads would skip leading spaces
        raise ModelLoadError(f"{path}: the safetensors header does not start with '{{' (corrupt file)")
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        raise ModelLoadError(f"{path}: the safetensors header is not valid JSON (corrupt file)") from None
    if not isinstance(header, dict):
        raise ModelLoadError(f"{path}: the safetensors header is not a JSON object (corrupt file)")
    metadata = header.get("__metadata__")  # null is allowed, as by the reader
    if metadata is not None and not (isinstance(metadata, dict) and all(isinstance(v, str) for v in metadata.values())):
        raise ModelLoadError(f"{path}: the safetensors __metadata__ is not a map of strings (corrupt header)")
    data_bytes = size - 8 - length
    spans = sorted((_tensor_span(path, name, entry, data_bytes), name)
                   for name, entry in header.items() if name != "__metadata__")
    _check_covered(path, spans, data_bytes)
    return header


def _check_covered(path: Path, spans: list[tuple[tuple[int, int], str]], data_bytes: int) -> None:
    """The tensors, in offset order, tile the data section exactly: no overlap, no hole, nothing after.

    The format forbids holes (no polyglot files) and the safetensors reader refuses them with "file not fully
    covered", naming nothing; here the bytes and the tensors around them are named.
    """
    for ((_, previous_end), previous_name), ((begin, _), name) in zip(spans, spans[1:], strict=False):
        if begin < previous_end:  # overlaps first: a moved tensor leaves a hole too, the overlap is the cause
            raise ModelLoadError(f"{path}: tensors {previous_name} and {name} overlap in the file (corrupt header)")
    reached, previous = 0, "the start of the data"
    for (begin, end), name in spans:
        if begin > reached:
            raise ModelLoadError(f"{path}: data bytes {reached}..{begin} (between {previous} and tensor {name}) "
                                 "belong to no tensor (corrupt header)")
        reached, previous = end, f"tensor {name}"
    if reached != data_bytes:
        raise ModelLoadError(f"{path}: data bytes {reached}..{data_bytes} (after {previous}) belong to no tensor "
                             "(truncated header or appended data)")


def _tensor_span(path: Path, name: str, entry: Any, data_bytes: int) -> tuple[int, int]:
    """``(begin, end)`` of one header entry after checking its dtype, shape and offsets agree."""
    where = f"{path}: tensor {name}"
    if not isinstance(entry, dict) or not {"dtype", "shape", "data_offsets"} <= entry.keys():
        raise ModelLoadError(f"{where}: header entry lacks dtype, shape or data_offsets (corrupt header)")
    dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    if dtype not in DTYPE_BITS:
        raise ModelLoadError(f"{where}: unknown dtype {dtype!r} (corrupt header)")
    if not (isinstance(shape, list) and all(_natural(d) for d in shape)):
        raise ModelLoadError(f"{where}: shape {shape!r} is not a list of non-negative integers (corrupt header)")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(_natural(o) for o in offsets)
            and offsets[0] <= offsets[1]):
        raise ModelLoadError(f"{where}: data_offsets {offsets!r} are not [begin, end] (corrupt header)")
    begin, end = offsets
    if end > data_bytes:
        raise ModelLoadError(f"{where} ends at data byte {end}, but the file holds only {data_bytes} "
                             "(truncated file or a header that lies)")
    bits = math.prod(shape) * DTYPE_BITS[dtype]  # integers: exact for any element count
    if bits % 8:  # the safetensors reader refuses a sub-byte tensor that ends inside a byte
        raise ModelLoadError(f"{where}: {dtype} {shape} is {bits} bits, not a whole number of bytes (corrupt header)")
    expected = bits // 8
    if end - begin != expected:
        raise ModelLoadError(f"{where}: {dtype} {shape} needs {expected} bytes, the header gives it {end - begin} "
                             "(corrupt header)")
    return begin, end


def _natural(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def check_weight_files(directory: Path) -> int:
    """Check every safetensors file of ``directory`` (and that an index names only present shards).

    Returns the total bytes of the weight files, for :func:`check_config_sizes`.
    """
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        try:
            shards = set(json.loads(index.read_text())["weight_map"].values())
        except (ValueError, KeyError, TypeError, AttributeError):
            raise ModelLoadError(f"{index}: not a valid index (no weight_map of tensor -> shard)") from None
        missing = sorted(s for s in shards if not (directory / str(s)).is_file())
        if missing:
            raise ModelLoadError(f"{index} names shards that are missing: {', '.join(missing[:3])}")
    files = sorted(directory.glob("*.safetensors"))
    for path in files:
        check_safetensors(path)
    weights = files or [*directory.glob("*.bin"), *directory.glob("*.pt")]
    return sum(p.stat().st_size for p in weights)


def _size(config: Any, where: str, *names: str, default: int = 0, minimum: int = 1) -> int:
    """The first of ``names`` set on ``config``, checked to be an integer >= ``minimum``."""
    for name in names:
        value = getattr(config, name, None)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise ModelLoadError(f"{where}: {name} is {value!r}, expected an integer >= {minimum}")
        return value
    return default


def estimate_parameters(config: Any, where: str) -> int:
    """A lower bound on the parameters ``config`` describes: embeddings plus two matrices per MLP (and expert).

    Attention and norms are left out, so an honest checkpoint is never above it; sizes that are not positive
    integers are refused, naming the field.
    """
    config = _text_config(config)
    hidden = _size(config, where, "hidden_size", "d_model", "n_embd")
    layers = _size(config, where, "num_hidden_layers", "num_layers", "n_layer")
    vocab = _size(config, where, "vocab_size")
    experts = max(_size(config, where, "num_local_experts", "num_experts", minimum=0), 1)
    width = _size(config, where, "moe_intermediate_size") or _size(config, where, "intermediate_size", "ffn_dim",
                                                                      "n_inner")
    return vocab * hidden + layers * 2 * hidden * experts * width


def _text_config(config: Any) -> Any:
    """The language model's config of a multimodal config (``text_config``), else the config itself."""
    getter = getattr(config, "get_text_config", None)
    return getter() if callable(getter) else config


def total_memory_bytes() -> int:
    """Physical memory of this machine (0 when the platform does not say)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 0


def check_config_sizes(config: Any, weight_bytes: int, where: str) -> None:
    """Refuse, before allocation, a config whose sizes the weight files or this machine's memory cannot hold."""
    params = estimate_parameters(config, where)
    text = _text_config(config)
    sizes = ", ".join(f"{k}={getattr(text, k)}" for k in ("hidden_size", "num_hidden_layers", "intermediate_size",
                                                           "vocab_size") if getattr(text, k, None) is not None)
    if weight_bytes and params * MIN_BITS_PER_WEIGHT / 8 > weight_bytes:
        raise ModelLoadError(f"{where}: its sizes ({sizes}) mean at least {params:,} parameters, more than the "
                             f"{weight_bytes:,} bytes of weight files can hold; config.json does not match the weights")
    memory = total_memory_bytes()
    if memory and params * MIN_LOADED_BYTES > memory:
        raise ModelLoadError(f"{where}: its sizes ({sizes}) mean at least {params:,} parameters, "
                             f"{params * MIN_LOADED_BYTES / 2**30:.1f} GiB loaded, more than this machine's "
                             f"{memory / 2**30:.1f} GiB of memory")


def check_finite(model: nn.Module, source: str) -> None:
    """Refuse a loaded model with NaN or inf in any weight, naming the first such tensor."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.is_floating_point() and not bool(torch.isfinite(param).all()):
                bad = int((~torch.isfinite(param)).sum())
                raise ModelLoadError(f"{source}: weight {name} has {bad} NaN/inf values of {param.numel()}; "
                                     "the checkpoint is corrupt")
