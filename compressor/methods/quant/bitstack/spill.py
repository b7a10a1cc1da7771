"""Where a streamed run keeps BitStack's blocks: a file per decoder layer, out of RAM until the export reads it.

The stage keeps its decompositions with meta tensors (shapes and dtypes: what the order and the byte counts
need) and each linear's ``file``; the export (``compressor.export.bitstack_store``) and the streamer's rewrite of a
layer for a dense output read the tensors back from here.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from compressor.errors import ExportError
from compressor.methods.quant.bitstack.ops import Block, Decomposition

if TYPE_CHECKING:
    from compressor.methods.quant.bitstack import _Decomposed


def spill_layer(stage: Any, layer: str, directory: Path) -> None:
    """Move the blocks of a BitStack ``stage``'s linears in ``layer`` (``model.layers.3``) into a file in ``directory``.

    The streamer calls it as each layer of a scoring pass finishes, with the pass's model-level stage (its
    last; anything but BitStack is left alone); the stage keeps its decompositions with meta tensors (shapes,
    dtypes, so bytes per block and the order still come from it) and each linear's ``file``. The file is named
    by the layer's first decomposed linear: two bitstack stages never decompose the same linear.
    """
    from compressor.methods.quant.bitstack import BitStack

    if not isinstance(stage, BitStack):
        return
    items = {path: item for path, item in stage.decomposed.items()
             if path.startswith(f"{layer}.") and item.file is None}
    if not items:
        return
    file = directory / f"{next(iter(items))}.safetensors"
    tensors: dict[str, torch.Tensor] = {}
    for path, item in items.items():
        tensors[spilled_name(path, 0, "scale")] = item.decomposition.scale
        for index, block in enumerate(item.decomposition.blocks):
            for part in ("signs", "u", "v"):
                tensors[spilled_name(path, index, part)] = getattr(block, part)
    directory.mkdir(parents=True, exist_ok=True)
    save_file({name: t.detach().cpu().contiguous().clone() for name, t in tensors.items()}, str(file))
    for item in items.values():
        item.file = file
        decomposition = item.decomposition
        decomposition.scale = decomposition.scale.to("meta")
        decomposition.blocks = [Block(b.signs.to("meta"), b.u.to("meta"), b.v.to("meta"))
                                for b in decomposition.blocks]


def load_decomposition(path: str, item: _Decomposed) -> Decomposition:
    """The decomposition of the linear at ``path`` with its tensors read back from its :func:`spill_layer` file."""
    count = len(item.decomposition.blocks)
    blocks = [Block(*(read_spilled(item, spilled_name(path, index, part)) for part in ("signs", "u", "v")))
              for index in range(count)]
    return Decomposition(item.decomposition.shape, read_spilled(item, spilled_name(path, 0, "scale")), blocks)


def spilled_name(path: str, index: int, part: str) -> str:
    return f"{path}.scale" if part == "scale" else f"{path}.{index}.{part}"


def read_spilled(item: _Decomposed, name: str) -> torch.Tensor:
    if item.file is None:
        raise ExportError(f"bitstack: {name} was never written to a layer file (its layer did not finish)")
    with safe_open(str(item.file), framework="pt") as handle:
        return handle.get_tensor(name)
