"""Reading a compressed-tensors ``pack-quantized`` output one tensor at a time, its linears dequantized.

Streamed evaluation (:mod:`compressor.streaming.perplexity`) scores a compress run's output from the written
directory. A dense output is an ordinary checkpoint; a compressed-tensors one stores each quantized linear as
``weight_packed`` (signed codes packed into int32), ``weight_scale`` (``[out, n_groups]`` in the model dtype),
``weight_shape`` and, when asymmetric, ``weight_zero_point`` (packed along rows). :class:`PackedCheckpoint` answers
a read of ``<path>.weight`` with ``scale * (code - zero)`` computed by :meth:`QuantizedWeight.dequantize`, the
very function the in-RAM run uses to put the rounded scales back into its model, so the streamed model holds the
same weights bit for bit. The codes are unpacked by the compressed-tensors library's own helper.

Files whose linears run INT8 activations (dgq's W4A8 / W8A8) are refused: their weights alone are not the model.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from compressor.errors import ModelLoadError, UsageError
from compressor.methods.quant.ops import QuantizedWeight
from compressor.streaming.layers import Checkpoint

PACKED_SUFFIXES = ("weight_packed", "weight_scale", "weight_shape", "weight_zero_point")


def quantization_config(directory: Path) -> dict[str, Any] | None:
    """config.json's ``quantization_config``, or None."""
    try:
        config = json.loads((directory / "config.json").read_text())
    except (OSError, ValueError):
        return None
    found = config.get("quantization_config") if isinstance(config, dict) else None
    return found if isinstance(found, dict) else None


class PackedCheckpoint(Checkpoint):
    """A compressed-tensors ``pack-quantized`` directory seen as a dense checkpoint (see the module doc)."""

    def __init__(self, directory: Path, quant: dict[str, Any]) -> None:
        super().__init__(directory)
        if quant.get("format") != "pack-quantized":
            raise ModelLoadError(f"{directory}: quantization format {quant.get('format')!r} does not stream; "
                                 "streamed evaluation reads dense and compressed-tensors pack-quantized files")
        self.schemes: list[tuple[re.Pattern[str], dict[str, Any]]] = []
        for group in (quant.get("config_groups") or {}).values():
            if (group or {}).get("input_activations"):
                raise UsageError(f"{directory}: its linears quantize their input activations to INT8 (dgq "
                                 "W4A8/W8A8); streamed perplexity reads weights only and would score another "
                                 "model: evaluate it with --memory-budget none")
            for target in group.get("targets") or []:
                pattern = target[3:] if target.startswith("re:") else re.escape(target)
                self.schemes.append((re.compile(pattern), group.get("weights") or {}))
        self.packed = {name.removesuffix(".weight_packed") for name in self.files if name.endswith(".weight_packed")}

    def has(self, name: str) -> bool:
        return name in self.files or (name.endswith(".weight") and name.removesuffix(".weight") in self.packed)

    def read(self, name: str, dtype: torch.dtype) -> torch.Tensor:
        path = name.removesuffix(".weight")
        if name.endswith(".weight") and path in self.packed:
            return self.quantized(path).dequantize(dtype)
        return super().read(name, dtype)

    def quantized(self, path: str) -> QuantizedWeight:
        """The integer weight of one linear as the run held it: ``q`` codes, float32 scales and zero points."""
        from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32

        scheme = next((s for pattern, s in self.schemes if pattern.fullmatch(path) or pattern.search(path)), None)
        if scheme is None:
            raise ModelLoadError(f"{self.directory}: {path} is packed but matches no config group")
        tensors = {}
        for suffix in PACKED_SUFFIXES:  # each from its own file: the shard split may separate a linear's parts
            name = f"{path}.{suffix}"
            if name in self.files:
                with safe_open(str(self.files[name]), framework="pt") as handle:
                    tensors[suffix] = handle.get_tensor(name)
        bits = int(scheme["num_bits"])
        offset = 1 << (bits - 1)
        shape = torch.Size(tensors["weight_shape"].tolist())
        scale = tensors["weight_scale"].float()
        scale = scale[:, None] if scale.dim() == 1 else scale
        q = unpack_from_int32(tensors["weight_packed"], bits, shape).to(torch.int16) + offset
        if "weight_zero_point" in tensors:
            # packed along rows = packed along the columns of the transpose (the library's packed_dim=0 path
            # fails on one-group zero points: a [n, 1] int32 is not viewable as bytes); flatten() makes it dense
            rows = tensors["weight_zero_point"].t()
            zero = unpack_from_int32(rows.flatten().view(rows.shape), bits, scale.shape[::-1]).t()
            zero = zero.to(torch.int32) + offset
            symmetric = False
        else:
            zero, symmetric = torch.full(scale.shape, offset, dtype=torch.int32), True
        group_size = int(scheme.get("group_size") or -1) if scheme.get("strategy") == "group" else -1
        return QuantizedWeight(q=q.to(torch.uint8), scale=scale, zero=zero, bits=bits, group_size=group_size,
                               symmetric=symmetric)
