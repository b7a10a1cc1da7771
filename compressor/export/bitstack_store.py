"""The BitStack directory: every block on disk once, any budget loaded from it later.

Layout (``out_dir``):
- ``bitstack.json``: the manifest, format version, per linear its shape, dtype and bytes per block, the
  global loading order, the bytes of everything else (``fixed_bytes``) and tied-weight aliases;
- ``bitstack-fixed.safetensors``: every tensor of the model except the decomposed linears' weights;
- ``bitstack-block-NNN.safetensors``: block ``NNN`` of every linear (``<path>.signs`` packed uint8,
  ``<path>.u``, ``<path>.v``; block 000 also ``<path>.scale``), one shard per depth, so a small budget
  reads the first shards whole and later ones in part;
- ``config.json`` and the tokenizer files.

The order and sizes are written, not recomputed, so a budget picks the same blocks in every loader.
The skeleton is built from ``config.json`` (``AutoModelForCausalLM.from_config``); a model whose
in-memory modules are not that skeleton's (MoE experts this package linearizes) is refused when written.
"""

from __future__ import annotations

import json
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from compressor.errors import ExportError, ModelLoadError
from compressor.methods.quant.bitstack import BitStack, BitStackConfig, _fixed_bytes
from compressor.methods.quant.bitstack.ops import Block, Decomposition
from compressor.methods.quant.bitstack.order import Chain, blocks_for_budget, global_order, parse_budget

MANIFEST = "bitstack.json"
FIXED = "bitstack-fixed.safetensors"
FORMAT_VERSION = 1


def block_file(index: int) -> str:
    return f"bitstack-block-{index:03d}.safetensors"


def write_bitstack(out_dir: Path, model: Any, stage: BitStack, tokenizer: Any = None) -> list[str]:
    """Write ``stage``'s decompositions and the rest of ``model`` as a BitStack directory; returns the files."""
    config = stage.config
    assert isinstance(config, BitStackConfig)
    if not stage.decomposed:
        raise ExportError("bitstack: nothing was decomposed; run the stage before writing its directory")
    check_skeleton(model)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = list(stage.decomposed)
    fixed, tied = _fixed_tensors(model, {f"{path}.weight" for path in paths})
    save_file(fixed, str(out_dir / FIXED), metadata={"format": "pt"})
    depth = max(len(item.decomposition.blocks) for item in stage.decomposed.values())
    for index in range(depth):
        tensors: dict[str, torch.Tensor] = {}
        for path, item in stage.decomposed.items():
            blocks = item.decomposition.blocks
            if index < len(blocks):
                block = blocks[index]
                tensors.update({f"{path}.signs": block.signs, f"{path}.u": block.u, f"{path}.v": block.v})
            if index == 0:
                tensors[f"{path}.scale"] = item.decomposition.scale
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(out_dir / block_file(index)),
                  metadata={"format": "pt"})
    chains = [item.chain(path, config.order == "relative") for path, item in stage.decomposed.items()]
    manifest = {
        "format": "bitstack", "version": FORMAT_VERSION, "iterations": config.iterations, "rank": config.rank,
        "order_by": config.order, "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
        "fixed_bytes": _fixed_bytes(model, paths), "tied": tied,
        "linears": {path: {"shape": list(item.decomposition.shape), "block_bytes": item.decomposition.block_bytes()}
                    for path, item in stage.decomposed.items()},
        "order": [[path, index] for path, index in global_order(chains)],
    }
    (out_dir / MANIFEST).write_text(json.dumps(manifest, indent=1))
    model.config.save_pretrained(out_dir)
    if tokenizer is not None:
        tokenizer.save_pretrained(out_dir)
    return sorted(p.name for p in out_dir.iterdir())


def write_bitstack_stage(out_dir: Path, model: Any, stages: list[Any]) -> list[str]:
    """Export format ``bitstack``: the directory of the run's bitstack stage (the recipe makes it the last)."""
    found = [stage for stage in stages if isinstance(stage, BitStack)]
    if len(found) != 1:
        raise ExportError(f"export format bitstack needs exactly one bitstack stage, the run has {len(found)}")
    return write_bitstack(out_dir, model, found[0])


def check_skeleton(model: Any) -> None:
    """The model's tensors are exactly those of the model ``config.json`` builds, or an ExportError."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(model.config)
    ours, theirs = set(model.state_dict()), set(skeleton.state_dict())
    if ours != theirs:
        odd = sorted(ours ^ theirs)
        raise ExportError(f"bitstack directory: {type(model).__name__} in memory differs from the model its config "
                          f"builds ({odd[0]} and {len(odd) - 1} more); not supported for this family yet")


def _fixed_tensors(model: nn.Module, skip: set[str]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Every state-dict tensor not in ``skip``, each shared tensor once, and ``{alias: stored name}``."""
    stored: dict[str, torch.Tensor] = {}
    seen: dict[tuple[int, tuple[int, ...]], str] = {}
    tied: dict[str, str] = {}
    for name, tensor in model.state_dict().items():
        if name in skip:
            continue
        key = (tensor.data_ptr(), tuple(tensor.shape))
        if key in seen:
            tied[name] = seen[key]
            continue
        seen[key] = name
        stored[name] = tensor.detach().cpu().contiguous()
    return stored, tied


def read_manifest(directory: Path) -> dict[str, Any]:
    path = Path(directory) / MANIFEST
    if not path.is_file():
        raise ModelLoadError(f"{directory}: no {MANIFEST}, not a BitStack directory")
    manifest = json.loads(path.read_text())
    if manifest.get("format") != "bitstack" or manifest.get("version") != FORMAT_VERSION:
        raise ModelLoadError(f"{path}: not a version {FORMAT_VERSION} BitStack manifest")
    return manifest


def blocks_at(manifest: dict[str, Any], budget: str | int | None) -> dict[str, int]:
    """Blocks per linear at ``budget`` (all of them when None), from the manifest's order and sizes."""
    linears = manifest["linears"]
    if budget is None:
        return {path: len(item["block_bytes"]) for path, item in linears.items()}
    chains = [Chain(path, (), tuple(item["block_bytes"]), item["shape"][0] * item["shape"][1])
              for path, item in linears.items()]
    order = [(path, int(index)) for path, index in manifest["order"]]
    return blocks_for_budget(chains, order, parse_budget(budget), int(manifest["fixed_bytes"]))


def bitstack_state_dict(directory: Path, budget: str | int | None = None) -> tuple[dict[str, torch.Tensor], dict]:
    """The full state dict at ``budget``: stored tensors plus each linear rebuilt from its first blocks."""
    directory = Path(directory)
    manifest = read_manifest(directory)
    counts = blocks_at(manifest, budget)
    dtype = getattr(torch, manifest["dtype"])
    with safe_open(str(directory / FIXED), "pt") as handle:
        state = {name: handle.get_tensor(name) for name in handle.keys()}  # noqa: SIM118 (not a dict)
    for alias, name in manifest["tied"].items():
        state[alias] = state[name]
    with ExitStack() as stack:
        shards = [stack.enter_context(safe_open(str(directory / block_file(i)), "pt"))
                  for i in range(max(counts.values(), default=0))]
        for path, item in manifest["linears"].items():
            decomposition = Decomposition((int(item["shape"][0]), int(item["shape"][1])), torch.empty(0))
            for index in range(counts[path]):
                get = shards[index].get_tensor
                if index == 0:
                    decomposition.scale = get(f"{path}.scale")
                decomposition.blocks.append(Block(get(f"{path}.signs"), get(f"{path}.u"), get(f"{path}.v")))
            state[f"{path}.weight"] = decomposition.reconstruct().to(dtype)
    return state, counts


def load_bitstack(directory: Path, budget: str | int | None = None) -> tuple[nn.Module, dict[str, int]]:
    """The model at ``budget`` (bytes, MB/GB/MiB/GiB or bpw; every block when None) and its blocks per linear."""
    from transformers import AutoConfig, AutoModelForCausalLM

    state, counts = bitstack_state_dict(Path(directory), budget)
    config = AutoConfig.from_pretrained(directory)
    model = AutoModelForCausalLM.from_config(config).to(getattr(torch, read_manifest(directory)["dtype"]))
    model.load_state_dict(state, strict=True)  # every stored tensor and every linear, nothing else
    return model.eval(), counts
