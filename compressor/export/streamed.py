"""Writing an export whose tensors never sit in memory together (layer streaming, ``compressor.streaming``).

A streamed run writes each finished decoder layer's output tensors to a small file of its own under the
staging directory as soon as the layer is done (:class:`LayerFiles`). Once every layer is done, the final
shards are assembled tensor by tensor: the shard plan (which tensor goes in which file, in which order) is the
in-RAM writers' own (``split_torch_state_dict_into_shards`` over the same names, shapes and dtypes, in the
same order), and each shard is written header first, then one tensor at a time read from its layer file or
from the resident embeddings/head (:func:`write_safetensors`). The files are byte for byte what
``safetensors.torch.save_file`` writes for the same tensors: the header sorts tensors by dtype (the
safetensors ``Dtype`` enum, descending) then name, is compact JSON padded with spaces to 8 bytes.

The cost against the in-RAM export is one extra write of the (compressed) output; the memory is one tensor.
"""

from __future__ import annotations

import json
import shutil
import struct
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from huggingface_hub.serialization import split_state_dict_into_shards_factory
from safetensors import safe_open
from safetensors.torch import save_file

from compressor.errors import ExportError

#: safetensors' ``Dtype`` enum order; a file lists its tensors by this rank, highest first, then by name.
_DTYPE_RANK = {name: rank for rank, name in enumerate((
    "BOOL", "F4", "F6_E2M3", "F6_E3M2", "U8", "I8", "F8_E5M2", "F8_E4M3", "F8_E8M0", "I16", "U16", "F16", "BF16",
    "I32", "U32", "F32", "F64", "I64", "U64"))}
SAFETENSORS_DTYPE = {
    torch.bool: "BOOL", torch.uint8: "U8", torch.int8: "I8", torch.int16: "I16", torch.float16: "F16",
    torch.bfloat16: "BF16", torch.int32: "I32", torch.float32: "F32", torch.float64: "F64", torch.int64: "I64",
}


@dataclass(frozen=True)
class TensorSpec:
    """One tensor of the output: its name, dtype and shape (the data is read when its turn comes)."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    #: The in-RAM tensor's storage, when it may share one with others (views of one fused solve): its identity
    #: and size in bytes. The shard split counts a shared storage once, with its first tensor, as for real tensors.
    storage: Any = None
    storage_bytes: int = 0

    @property
    def nbytes(self) -> int:
        count = 1
        for size in self.shape:
            count *= size
        return count * torch.empty((), dtype=self.dtype).element_size()


def safetensors_header(specs: list[TensorSpec], metadata: dict[str, str] | None) -> tuple[bytes, list[TensorSpec]]:
    """The header bytes ``save_file`` writes for these tensors (length prefix included) and the data order."""
    ordered = sorted(specs, key=lambda s: (-_DTYPE_RANK[SAFETENSORS_DTYPE[s.dtype]], s.name))
    header: dict[str, Any] = {"__metadata__": metadata} if metadata else {}
    offset = 0
    for spec in ordered:
        header[spec.name] = {"dtype": SAFETENSORS_DTYPE[spec.dtype], "shape": list(spec.shape),
                             "data_offsets": [offset, offset + spec.nbytes]}
        offset += spec.nbytes
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text, ordered


def write_safetensors(path: Path, specs: list[TensorSpec], read: Callable[[str], torch.Tensor],
                      metadata: dict[str, str] | None = None) -> None:
    """Write one safetensors file holding ``specs``, asking ``read(name)`` for each tensor in file order.

    Only the tensor being written is in memory; a tensor whose dtype or shape differs from its spec is an
    :class:`ExportError` (the header was already written from the spec).
    """
    head, ordered = safetensors_header(specs, metadata)
    with open(path, "wb") as file:
        file.write(head)
        for spec in ordered:
            tensor = read(spec.name)
            if tensor.dtype != spec.dtype or tuple(tensor.shape) != spec.shape:
                raise ExportError(f"streamed export: {spec.name} is {tensor.dtype} {tuple(tensor.shape)}, "
                                  f"planned as {spec.dtype} {spec.shape}")
            flat = tensor.detach().cpu().contiguous().reshape(-1)
            file.write(flat.view(torch.uint8).numpy().data if flat.numel() else b"")


def write_shards_streamed(specs: list[TensorSpec], read: Callable[[str], torch.Tensor], out_dir: Path,
                          max_shard_bytes: int | str, index_metadata: dict[str, Any] | None = None,
                          index_indent_sorted: bool = False) -> list[str]:
    """Shard ``specs`` exactly as the in-RAM writers do and write each shard with :func:`write_safetensors`.

    ``index_metadata`` goes first in the index's ``metadata``; ``index_indent_sorted`` writes the index as
    ``save_pretrained`` does (sorted keys), else as ``compressed_tensors.write_shards`` does.
    """
    split = split_state_dict_into_shards_factory(
        {spec.name: spec for spec in specs}, get_storage_size=lambda s: s.storage_bytes or s.nbytes,
        get_storage_id=lambda s: s.storage, filename_pattern="model{suffix}.safetensors",
        max_shard_size=max_shard_bytes)
    by_name = {spec.name: spec for spec in specs}
    for filename, names in split.filename_to_tensors.items():
        write_safetensors(out_dir / filename, [by_name[n] for n in names], read, {"format": "pt"})
    if split.is_sharded:
        index: dict[str, Any] = {"metadata": {**(index_metadata or {}), **split.metadata}}
        if index_indent_sorted:
            index["weight_map"] = split.tensor_to_filename
            text = json.dumps(index, indent=2, sort_keys=True) + "\n"
        else:
            index["metadata"]["total_size"] = sum(s.nbytes for s in specs)
            index["weight_map"] = dict(sorted(split.tensor_to_filename.items()))
            text = json.dumps(index, indent=2) + "\n"
        (out_dir / "model.safetensors.index.json").write_text(text)
    return sorted(split.filename_to_tensors)


def spec_of(name: str, tensor: torch.Tensor, owner: Any = None) -> TensorSpec:
    """The spec of a real tensor; with ``owner``, its storage is recorded (keyed by owner and address)."""
    if owner is None or tensor.is_meta:  # a tensor left on meta is read from the checkpoint: its own storage
        return TensorSpec(name, tensor.dtype, tuple(tensor.shape))
    storage = tensor.untyped_storage()
    return TensorSpec(name, tensor.dtype, tuple(tensor.shape), (owner, storage.data_ptr()), storage.nbytes())


@dataclass
class LayerFiles:
    """Each finished layer's output tensors, one safetensors file per layer, until the shards are assembled."""

    root: Path
    #: output tensor name -> the layer file holding it
    where: dict[str, Path] = field(default_factory=dict)
    specs: dict[str, TensorSpec] = field(default_factory=dict)

    def save(self, index: int, tensors: dict[str, torch.Tensor], shared: bool | Collection[str] = False) -> None:
        """Write one layer's tensors now (they are freed by the caller once this returns).

        ``shared``: the tensors (True: all; else the names given) the in-RAM writer sees as they are, so record which
        share a storage: ``save_pretrained`` writes every tensor so, ``compressed_state_dict`` its packed tensors
        (a stacked solve's scales can be views of one tensor); the others it clones, and a clone shares nothing.
        """
        self.root.mkdir(parents=True, exist_ok=True)
        path = self.root / f"layer-{index:05d}.safetensors"
        save_file({name: t.detach().cpu().contiguous().clone() for name, t in tensors.items()}, str(path))
        for name, tensor in tensors.items():
            self.where[name] = path
            keep = shared is True or (not isinstance(shared, bool) and name in shared)
            self.specs[name] = spec_of(name, tensor, ("layer", index) if keep else None)

    def read(self, name: str) -> torch.Tensor:
        with safe_open(str(self.where[name]), framework="pt") as handle:
            return handle.get_tensor(name)

    def remove(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)


def write_streamed_model(export: Any, run: Any, out_dir: Path, remote_code: dict[str, Any] | None = None) -> None:
    """The dense, compressed-tensors or bitstack files of a streamed run, equal to what the in-RAM writers produce.

    ``run.stream`` holds the finished layers' files; the tensors outside the layers (unchanged by the streaming
    stages) come from ``run.stream.read_unchanged``, one at a time. Dense follows ``save_pretrained`` (config dtype
    and architectures, generation config, an index with ``total_parameters``), compressed-tensors follows
    ``write_compressed_tensors`` (dense tensors in state order, then each quantized linear's packed tensors in the
    order the run quantized them). ``remote_code``: a pruning stage's modeling file, which a bitstack directory
    carries (:func:`compressor.export.write_model` resolves it, in RAM and streamed alike).
    """
    from transformers.modeling_utils import remove_tied_weights_from_state_dict

    model, stream = run.model, run.stream
    if export.format == "bitstack":  # the stage's blocks, spilled per layer, and the checkpoint's other tensors
        from compressor.export.bitstack_store import write_bitstack_stage

        write_bitstack_stage(out_dir, model, stream.stages, read=stream.read_unchanged, remote_code=remote_code)
        return
    files: LayerFiles = stream.files
    resident = remove_tied_weights_from_state_dict(dict(model.state_dict()), model)
    quantized_weights = {f"{path}.weight" for path in run.quantized} if export.format != "dense" else set()
    specs: list[TensorSpec] = []
    for name, tensor in resident.items():
        if name in quantized_weights:
            continue
        shared = "resident" if export.format == "dense" else None
        specs.append(files.specs[name] if name in files.where else spec_of(name, tensor, shared))
    if export.format != "dense":
        specs += [files.specs[name] for path in run.quantized for name in stream.packed[path]]

    def read(name: str) -> torch.Tensor:
        return files.read(name) if name in files.where else stream.read_unchanged(name, resident[name])
    if export.format == "dense":
        specs = _save_pretrained_order(model, specs)
        _write_dense_config(model, out_dir)
        write_shards_streamed(specs, read, out_dir, f"{export.max_shard_mb}MB",
                              {"total_parameters": model.num_parameters()}, index_indent_sorted=True)
        return
    _write_compressed_config(model, run.quantized, out_dir)
    write_shards_streamed(specs, read, out_dir, export.max_shard_mb * 2**20)


def _save_pretrained_order(model: Any, specs: list[TensorSpec]) -> list[TensorSpec]:
    """The tensors in the order (and under the names) ``save_pretrained`` writes them.

    It reverts the model's load-time weight conversions, which sorts the state dict by its natural key order even
    when there is nothing to convert; the skeleton carries the same (empty) conversions as a loaded model.
    """
    from transformers.core_model_loading import revert_weight_conversion

    by_name = {spec.name: spec for spec in specs}
    meta = {spec.name: torch.empty(spec.shape, dtype=spec.dtype, device="meta") for spec in specs}
    order = list(revert_weight_conversion(model, meta))
    if set(order) != set(by_name):
        raise ExportError("streamed dense export: this model renames its weights on save, which does not stream yet")
    return [by_name[name] for name in order]


def _write_dense_config(model: Any, out_dir: Path) -> None:
    """config.json and generation_config.json as ``save_pretrained`` writes them."""
    model.config.dtype = str(model.dtype).split(".")[1]
    model.config.architectures = [type(model).__name__]
    model.config.save_pretrained(out_dir)
    if model.can_generate():
        model.generation_config.save_pretrained(out_dir)


def _write_compressed_config(model: Any, quantized: dict[str, Any], out_dir: Path) -> None:
    """config.json with its ``quantization_config`` and generation_config.json, as the in-RAM writer leaves them."""
    from compressed_tensors.compressors import ModelCompressor

    from compressor.export.compressed_tensors import build_quantization_config

    if not quantized:
        raise ExportError("compressed-tensors export needs at least one quantized module (use format: dense)")
    qconfig = build_quantization_config(model, quantized)
    model.config.save_pretrained(out_dir)
    ModelCompressor(quantization_config=qconfig).update_config(str(out_dir))
    generation = getattr(model, "generation_config", None)
    if generation is not None:
        generation.save_pretrained(out_dir)
