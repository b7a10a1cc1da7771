"""The BitStack directory: every block on disk once, any budget loaded from it later.

Layout (``out_dir``):
- ``bitstack.json``: the manifest, format version, per linear its shape, dtype and bytes per block, the
  global loading order, the bytes of everything else (``fixed_bytes``) and tied-weight aliases;
- ``bitstack-fixed.safetensors``: every tensor of the model except the decomposed linears' weights;
- ``bitstack-block-NNN.safetensors``: block ``NNN`` of every linear (``<path>.signs`` packed uint8,
  ``<path>.u``, ``<path>.v``; block 000 also ``<path>.scale``), one shard per depth, so a small budget
  reads the first shards whole and later ones in part;
- ``config.json`` (whose ``auto_map`` names ``modeling_bitstack.py``, copied in, so that
  ``AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True, bitstack_budget="300MB")`` loads it
  without compressor) and the tokenizer files;
- after a pruning stage that ships its own modeling file (``run.structure["remote_code"]``: SliceGPT, FLAP,
  FinerCut, or a model loaded from such an export), that file too, its config.json keys, and ``bitstack_base``
  naming its class: both loaders build that class and load the blocks into it.

The order and sizes are written, not recomputed, so a budget picks the same blocks in every loader; the
selection and the reconstruction are the shipped file's (:mod:`compressor.models.shipped.modeling_bitstack`),
which this module wraps in compressor's errors.
The model is rebuilt from ``config.json`` by transformers' loader from the stored names, so a MoE's
per-expert linears (as this package linearizes them) merge back into its 3-D expert tensors; a model whose
other tensors are not those the config builds is refused when written (:func:`check_skeleton`).

Under layer streaming the model is a meta skeleton and the blocks are never all in RAM: each finished layer's
blocks go to a file of their own in the run's temporary directory (``bitstack.spill``), and the directory is
assembled from those files and the checkpoint one tensor at a time (:func:`write_bitstack` with ``read``), byte
for byte what the in-RAM writer stores for the same blocks.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from compressor.errors import ExportError, ModelLoadError
from compressor.export.streamed import TensorSpec, write_safetensors
from compressor.methods.quant.bitstack import BitStack, BitStackConfig, _fixed_bytes
from compressor.methods.quant.bitstack.order import BudgetError, global_order
from compressor.methods.quant.bitstack.spill import read_spilled, spilled_name
from compressor.models.shipped import auto_class_name, shipped_dir
from compressor.models.shipped import modeling_bitstack as shipped
from compressor.models.shipped.modeling_bitstack import FIXED, FORMAT_VERSION, MANIFEST, block_file

#: The modeling file every directory carries, so transformers alone loads it at a budget (``bitstack_budget``).
REMOTE_CODE_FILE = "modeling_bitstack.py"


#: Reads a tensor the streamed skeleton holds on meta (the streamer's ``read_unchanged``: name, meta tensor).
ReadUnchanged = Callable[[str, torch.Tensor], torch.Tensor]
#: A pruning stage's modeling file: ``{"file": "modeling_x.py", "auto_map": {...}, "config": {extra keys}}``.
RemoteCode = dict[str, Any]


def write_bitstack(out_dir: Path, model: Any, stage: BitStack, tokenizer: Any = None,
                   read: ReadUnchanged | None = None, remote_code: RemoteCode | None = None) -> list[str]:
    """Write ``stage``'s decompositions and the rest of ``model`` as a BitStack directory; returns the files.

    ``read``: the model streamed (a meta skeleton, the blocks in ``spill_layer``'s files); the tensors outside
    the decomposed weights are read through it, and every file is written one tensor at a time.
    ``remote_code``: the pruned model's modeling file (``run.structure["remote_code"]``), which the blocks load into.
    """
    config = stage.config
    assert isinstance(config, BitStackConfig)
    if not stage.decomposed:
        raise ExportError("bitstack: nothing was decomposed; run the stage before writing its directory")
    check_skeleton(model, remote_code)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = list(stage.decomposed)
    if read is None:
        fixed, tied = _fixed_tensors(model, {f"{path}.weight" for path in paths})
        save_file(fixed, str(out_dir / FIXED), metadata={"format": "pt"})
        for index, tensors in enumerate(_depths(stage)):
            save_file({k: v.contiguous() for k, v in tensors.items()}, str(out_dir / block_file(index)),
                      metadata={"format": "pt"})
    else:
        _write_streamed(out_dir, model, stage, read)
        tied = _tied_names(model, {f"{path}.weight" for path in paths})
    chains = [item.chain(path, config.order) for path, item in stage.decomposed.items()]
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
    _attach_loader(out_dir, model, remote_code)
    if tokenizer is not None:
        tokenizer.save_pretrained(out_dir)
    return sorted(p.name for p in out_dir.iterdir())


def _depths(stage: BitStack) -> list[dict[str, torch.Tensor]]:
    """Per block depth, the tensors its shard holds (``<path>.signs/.u/.v``; depth 0 also ``<path>.scale``).

    Real tensors in RAM; meta ones (their shapes and dtypes) for a streamed stage whose blocks are in files.
    """
    depth = max(len(item.decomposition.blocks) for item in stage.decomposed.values())
    shards: list[dict[str, torch.Tensor]] = []
    for index in range(depth):
        tensors: dict[str, torch.Tensor] = {}
        for path, item in stage.decomposed.items():
            blocks = item.decomposition.blocks
            if index < len(blocks):
                block = blocks[index]
                tensors.update({f"{path}.signs": block.signs, f"{path}.u": block.u, f"{path}.v": block.v})
            if index == 0:
                tensors[f"{path}.scale"] = item.decomposition.scale
        shards.append(tensors)
    return shards


def _write_streamed(out_dir: Path, model: Any, stage: BitStack, read: ReadUnchanged) -> None:
    """The fixed and block shards of a streamed stage, one tensor in memory at a time.

    The fixed tensors (embeddings, norms, head) come from the checkpoint through ``read``; each block shard's
    tensors from the layer files ``spill_layer`` wrote. The files equal ``save_file``'s for the same tensors
    (:func:`~compressor.export.streamed.write_safetensors`).
    """
    state = model.state_dict(keep_vars=True)
    skip = {f"{path}.weight" for path in stage.decomposed}
    stored = _unique_names(model, skip)
    write_safetensors(out_dir / FIXED, [TensorSpec(n, state[n].dtype, tuple(state[n].shape)) for n in stored],
                      lambda name: read(name, state[name]), {"format": "pt"})
    for index, tensors in enumerate(_depths(stage)):
        def block_tensor(name: str, index: int = index) -> torch.Tensor:
            path, part = name.rsplit(".", 1)
            return read_spilled(stage.decomposed[path], spilled_name(path, index, part))

        specs = [TensorSpec(name, t.dtype, tuple(t.shape)) for name, t in tensors.items()]
        write_safetensors(out_dir / block_file(index), specs, block_tensor, {"format": "pt"})


def write_bitstack_stage(out_dir: Path, model: Any, stages: list[Any], read: ReadUnchanged | None = None,
                         remote_code: RemoteCode | None = None) -> list[str]:
    """Export format ``bitstack``: the directory of the run's bitstack stage (the recipe makes it the last).

    ``read``: the run streamed; ``remote_code``: a pruning stage's modeling file (see :func:`write_bitstack`).
    """
    found = [stage for stage in stages if isinstance(stage, BitStack)]
    if len(found) != 1:
        raise ExportError(f"export format bitstack needs exactly one bitstack stage, the run has {len(found)}")
    return write_bitstack(out_dir, model, found[0], read=read, remote_code=remote_code)


def pruned_class(reference: str) -> Any:
    """The class ``<file stem>.<class>`` (an ``auto_map`` value) names in compressor's own shipped files."""
    import importlib

    stem, _, name = reference.partition(".")
    if not (shipped_dir() / f"{stem}.py").is_file():
        raise ExportError(f"bitstack: {stem}.py is not a modeling file compressor ships")
    return getattr(importlib.import_module(f"compressor.models.shipped.{stem}"), name)


def check_skeleton(model: Any, remote_code: RemoteCode | None = None) -> None:
    """The model's tensors (names and shapes) are those of the model ``config.json`` builds, or an ExportError.

    The model config.json builds is the stock class, or the pruned class ``remote_code`` names (with its config
    keys), or the one the config's own ``auto_map`` names when the model was loaded from a pruned export.
    A MoE's experts may differ: linearized in memory (``experts.3.w1``, :mod:`compressor.models.moe`), they
    carry the checkpoint's names, which transformers' loader merges into the 3-D expert tensors of the model
    it builds (:func:`~compressor.models.shipped.modeling_bitstack.build_model`); every other tensor must match.
    """
    import copy

    from transformers import AutoModelForCausalLM

    from compressor.export import loaded_remote_code
    from compressor.models.moe import LinearExperts

    remote_code = remote_code or loaded_remote_code(model)
    with torch.device("meta"):
        if remote_code is None:
            skeleton = AutoModelForCausalLM.from_config(model.config)
        else:
            config = copy.deepcopy(model.config)
            for key, value in remote_code.get("config", {}).items():
                setattr(config, key, value)
            skeleton = pruned_class(remote_code["auto_map"]["AutoModelForCausalLM"])(config)
    experts = tuple(f"{name}." for name, module in model.named_modules() if isinstance(module, LinearExperts))
    ours = {name: tuple(t.shape) for name, t in model.state_dict().items() if not name.startswith(experts)}
    theirs = {name: tuple(t.shape) for name, t in skeleton.state_dict().items() if not name.startswith(experts)}
    if ours != theirs:
        odd = sorted(name for name in ours.keys() | theirs.keys() if ours.get(name) != theirs.get(name))
        raise ExportError(f"bitstack directory: {type(model).__name__} in memory differs from the model its config "
                          f"builds ({odd[0]}: {ours.get(odd[0])} vs {theirs.get(odd[0])}, and {len(odd) - 1} more), "
                          "which is all its directory can rebuild")


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


def _unique_names(model: nn.Module, skip: set[str]) -> list[str]:
    """The state-dict names :func:`_fixed_tensors` stores, found on a meta skeleton (shared = the same tensor)."""
    return [name for name in _first_of_each(model, skip).values()]


def _tied_names(model: nn.Module, skip: set[str]) -> dict[str, str]:
    """:func:`_fixed_tensors`'s ``{alias: stored name}`` on a meta skeleton, whose tensors have no addresses."""
    first = _first_of_each(model, skip)
    return {name: first[id(tensor)] for name, tensor in model.state_dict(keep_vars=True).items()
            if name not in skip and first[id(tensor)] != name}


def _first_of_each(model: nn.Module, skip: set[str]) -> dict[int, str]:
    """Each distinct state tensor (a tied head is the embedding's parameter itself) -> its first name."""
    first: dict[int, str] = {}
    for name, tensor in model.state_dict(keep_vars=True).items():
        if name not in skip:
            first.setdefault(id(tensor), name)
    return first


def _attach_loader(out_dir: Path, model: Any, remote_code: RemoteCode | None) -> None:
    """Copy the shipped modeling file and name its class in config.json ``auto_map`` (``BitStackLlamaForCausalLM``).

    After a pruning stage its modeling file is copied too, its config keys written, and its class named by
    ``bitstack_base`` (not ``auto_map``, which must reach the BitStack loader first).
    """
    shutil.copyfile(shipped_dir() / REMOTE_CODE_FILE, out_dir / REMOTE_CODE_FILE)
    path = out_dir / "config.json"
    config = json.loads(path.read_text())
    name = auto_class_name(shipped.PREFIX, model)
    config["auto_map"] = {"AutoModelForCausalLM": f"{REMOTE_CODE_FILE.removesuffix('.py')}.{name}"}
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    if remote_code:
        attach_pruned_base(out_dir, remote_code)


def attach_pruned_base(out_dir: Path, remote_code: RemoteCode) -> None:
    """Make a written BitStack directory load its blocks into a pruned model: copy the pruning's modeling file,
    write its config keys and name its class in ``bitstack_base``; ``auto_map`` keeps naming the BitStack loader."""
    from compressor.export import write_remote_code

    write_remote_code(out_dir, remote_code, **{shipped.BASE_KEY: remote_code["auto_map"]["AutoModelForCausalLM"]})


def read_manifest(directory: Path) -> dict[str, Any]:
    try:
        return shipped.read_manifest(directory)
    except (OSError, ValueError) as exc:
        raise ModelLoadError(str(exc)) from None


def blocks_at(manifest: dict[str, Any], budget: str | int | None) -> dict[str, int]:
    """Blocks per linear at ``budget`` (all of them when None), from the manifest's order and sizes."""
    try:
        return shipped.blocks_at(manifest, budget)
    except shipped.BitStackBudgetError as exc:
        raise BudgetError(str(exc)) from None


def bitstack_state_dict(directory: Path, budget: str | int | None = None) -> tuple[dict[str, torch.Tensor], dict]:
    """The full state dict at ``budget``: stored tensors plus each linear rebuilt from its first blocks."""
    manifest = read_manifest(directory)
    counts = blocks_at(manifest, budget)
    return shipped.state_dict_at(directory, manifest, counts), counts


def load_bitstack(directory: Path, budget: str | int | None = None) -> tuple[nn.Module, dict[str, int]]:
    """The model at ``budget`` (bytes, MB/GB/MiB/GiB or bpw; every block when None) and its blocks per linear.

    The stock class, not the shipped one: its config drops ``auto_map``, so a model saved from it (materialize)
    is a standard directory. After a pruning stage (config.json ``bitstack_base``) the pruned class from
    compressor's own copy of its file, with ``auto_map`` naming that file, so a saved model is a pruned export.
    Built by the shipped file's :func:`build_model`, as transformers alone builds it.
    """
    import transformers
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    state, counts = bitstack_state_dict(Path(directory), budget)
    config = AutoConfig.from_pretrained(directory)
    if hasattr(config, "auto_map"):
        del config.auto_map
    base = getattr(config, shipped.BASE_KEY, None)
    if base:
        delattr(config, shipped.BASE_KEY)
        config.auto_map = {"AutoModelForCausalLM": base}
        try:
            model_class = pruned_class(base)
        except (ExportError, AttributeError) as exc:
            raise ModelLoadError(f"{directory}/config.json {shipped.BASE_KEY} '{base}': {exc}") from None
    else:
        model_class = getattr(transformers, MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[config.model_type])
    dtype = getattr(torch, read_manifest(directory)["dtype"])
    try:
        model = shipped.build_model(model_class.from_pretrained, config, state, dtype)
    except ValueError as exc:
        raise ModelLoadError(f"{directory}: {exc}") from None
    return model, counts
