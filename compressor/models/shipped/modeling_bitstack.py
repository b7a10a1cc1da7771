"""BitStack directories loaded at a memory budget by transformers alone: ``bitstack_budget="300MB"``.

Written into every BitStack directory (compressor's export format ``bitstack``) and named by config.json
``auto_map``, so ``AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True, bitstack_budget="300MB")``
builds the model at that budget with torch, transformers and safetensors only (this file imports nothing
else). compressor's own loader (``compressor.load(DIR, budget=...)``) and its stage import the selection and
the reconstruction from here, so both loaders pick the same blocks and compute the same weights.

The directory (written by compressor): ``bitstack.json`` (per linear its shape and bytes per block, the
global loading order, the bytes of every other tensor and tied aliases), ``bitstack-fixed.safetensors``
(every tensor but the decomposed weights) and ``bitstack-block-NNN.safetensors`` (block ``NNN`` of every
linear: packed signs, factors ``u``/``v``, and in block 000 the per-input-channel scales). A budget is the
longest prefix of the order whose bytes fit; a linear's weight is ``sum_j sign_j * (u_j @ v_j) / scale``
over its first blocks. Budgets: bytes (``123456``, ``123456B``), ``kB/MB/GB`` (10^3..), ``KiB/MiB/GiB``
(2^10..), or bits per decomposed weight (``2.5bpw``); without one every block loads.

After a pruning stage whose model stock transformers cannot build (SliceGPT, FLAP, FinerCut), the directory
also carries that stage's modeling file (``modeling_sliced.py``...) and its config.json keys, and config.json
``bitstack_base`` names its class as ``auto_map`` would (``modeling_sliced.SlicedLlamaForCausalLM``). The
blocks then load into ``BitStack`` + that class, loaded from the directory by transformers' own remote-code
loader (``get_class_from_dynamic_module``), so each file stays self-contained and the pruned architecture is
defined once, by the file that defines it for the pruned export.
"""

from __future__ import annotations

import functools
import json
import re
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import torch
import transformers
from safetensors import safe_open

#: Class names this file makes: ``BitStack`` + the transformers class they extend.
PREFIX = "BitStack"
MANIFEST = "bitstack.json"
FIXED = "bitstack-fixed.safetensors"
FORMAT_VERSION = 1
#: config.json key naming the pruned model class the blocks load into (``<file stem>.<class>``); absent: stock.
BASE_KEY = "bitstack_base"

_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "kib": 2**10, "mib": 2**20, "gib": 2**30}
_PATTERN = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:e[+-]?[0-9]+)?)\s*([a-z]*)\s*$")


class BitStackBudgetError(ValueError):
    """A budget that cannot be read, or that is below one block per linear."""


def block_file(index: int) -> str:
    return f"bitstack-block-{index:03d}.safetensors"


def parse_budget(text: str | int | float) -> tuple[float, str]:
    """``(value, unit)``: ``(bytes, "bytes")`` for ``300MB``/``1.5GiB``/``123456``, ``(bits, "bpw")`` for ``2.5bpw``.

    A copy of compressor's parser (this file cannot import it); a test holds both to one table of inputs.
    """
    if isinstance(text, int | float) and not isinstance(text, bool):
        number, unit = float(text), ""
    else:
        match = _PATTERN.match(str(text).lower())
        if match is None or match.group(2) not in (*_UNITS, "bpw"):
            raise BitStackBudgetError(
                f"budget '{text}': expected a size such as 300MB, 1.5GiB, 123456 (bytes) or 2.5bpw")
        number, unit = float(match.group(1)), match.group(2)
    if number <= 0:
        raise BitStackBudgetError(f"budget '{text}' must be above 0")
    if unit == "bpw":
        return number, "bpw"
    return number * _UNITS[unit], "bytes"


def select_blocks(
    sizes: dict[str, list[int]], params: int, order: list[tuple[str, int]], budget: tuple[float, str],
    fixed_bytes: int = 0,
) -> dict[str, int]:
    """Blocks per linear in the longest prefix of ``order`` whose bytes fit ``budget`` (from :func:`parse_budget`).

    ``sizes``: bytes of each linear's blocks; ``params``: the decomposed weights' count (a ``bpw`` budget is
    bits per one of them); ``fixed_bytes``: every other tensor, which a byte budget covers too. A budget
    below one block per linear raises, naming the smallest and largest budgets.
    """
    value, unit = budget
    available = value * params / 8 if unit == "bpw" else value - fixed_bytes
    counts = dict.fromkeys(sizes, 0)
    used = 0
    for path, index in order:
        if used + sizes[path][index] > available:
            break
        used += sizes[path][index]
        counts[path] += 1
    if any(count == 0 for count in counts.values()):
        smallest = sum(blocks[0] for blocks in sizes.values() if blocks)
        largest = sum(sum(blocks) for blocks in sizes.values())
        described = f"{value:g}bpw" if unit == "bpw" else f"{value / 1e6:.3f}MB"
        raise BitStackBudgetError(
            f"budget {described} is below the smallest loadable model: the smallest is "
            f"{_span(smallest, fixed_bytes, params)} (one block per linear), the largest "
            f"{_span(largest, fixed_bytes, params)} (all blocks)"
        )
    return counts


def _span(linear_bytes: int, fixed_bytes: int, params: int) -> str:
    bits = f" = {linear_bytes * 8 / params:.3f}bpw" if params else ""
    return f"{(linear_bytes + fixed_bytes) / 1e6:.3f}MB ({linear_bytes + fixed_bytes} bytes){bits}"


def blocks_at(manifest: dict[str, Any], budget: str | int | float | None) -> dict[str, int]:
    """Blocks per linear at ``budget`` (every block when None), from the manifest's order and sizes."""
    linears = manifest["linears"]
    sizes = {path: [int(size) for size in item["block_bytes"]] for path, item in linears.items()}
    if budget is None:
        return {path: len(blocks) for path, blocks in sizes.items()}
    params = sum(int(item["shape"][0]) * int(item["shape"][1]) for item in linears.values())
    order = [(path, int(index)) for path, index in manifest["order"]]
    return select_blocks(sizes, params, order, parse_budget(budget), int(manifest["fixed_bytes"]))


def unpack_signs(packed: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """The ±1 float32 tensor of ``shape`` packed 8 per byte (element ``8b + i`` in bit ``i``; bit 1 is +1)."""
    numel = 1
    for size in shape:
        numel *= size
    shifts = torch.arange(8, dtype=torch.int32, device=packed.device)
    bits = (packed.to(torch.int32)[:, None] >> shifts) & 1
    return (bits.reshape(-1)[:numel].float() * 2 - 1).reshape(shape)


def scaled_sum(shape: tuple[int, int], blocks: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
               device: torch.device | None = None) -> torch.Tensor:
    """``sum_j sign_j * (u_j @ v_j)`` over ``blocks`` of ``(signs, u, v)``: float32 ``[out, in]``."""
    total = torch.zeros(shape, dtype=torch.float32, device=device)
    for signs, u, v in blocks:
        total += unpack_signs(signs, shape) * (u.float() @ v.float())
    return total


def reconstruct(shape: tuple[int, int], scale: torch.Tensor,
                blocks: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """The weight ``blocks`` stand for: their scaled sum divided by the per-input-channel ``scale``, float32."""
    return scaled_sum(shape, blocks, scale.device) / scale.float()[None, :]


def read_manifest(directory: str | Path) -> dict[str, Any]:
    path = Path(directory) / MANIFEST
    if not path.is_file():
        raise OSError(f"{directory}: no {MANIFEST}, not a BitStack directory")
    manifest = json.loads(path.read_text())
    if manifest.get("format") != "bitstack" or manifest.get("version") != FORMAT_VERSION:
        raise ValueError(f"{path}: not a version {FORMAT_VERSION} BitStack manifest")
    return manifest


def state_dict_at(directory: str | Path, manifest: dict[str, Any], counts: dict[str, int]) -> dict[str, torch.Tensor]:
    """Every stored tensor plus each linear's weight rebuilt from its first ``counts[path]`` blocks (model dtype)."""
    directory = Path(directory)
    dtype = getattr(torch, manifest["dtype"])
    with safe_open(str(directory / FIXED), "pt") as handle:
        state = {name: handle.get_tensor(name) for name in handle.keys()}  # noqa: SIM118 (not a dict)
    for alias, name in manifest["tied"].items():
        state[alias] = state[name]
    with ExitStack() as stack:
        shards = [stack.enter_context(safe_open(str(directory / block_file(i)), "pt"))
                  for i in range(max(counts.values(), default=0))]
        for path, item in manifest["linears"].items():
            shape = (int(item["shape"][0]), int(item["shape"][1]))
            blocks = [(shards[i].get_tensor(f"{path}.signs"), shards[i].get_tensor(f"{path}.u"),
                       shards[i].get_tensor(f"{path}.v")) for i in range(counts[path])]
            state[f"{path}.weight"] = reconstruct(shape, shards[0].get_tensor(f"{path}.scale"), blocks).to(dtype)
    return state


#: ``from_pretrained`` options passed on to transformers' loader; the rest (hub and remote-code options) are spent.
PASSED_ON = ("device_map", "attn_implementation")


def build_model(from_pretrained: Any, config: Any, state: dict[str, torch.Tensor], dtype: Any, **options: Any) -> Any:
    """The model ``from_pretrained`` (a bound ``PreTrainedModel.from_pretrained``) makes from ``state``, strictly.

    Through transformers' loader rather than ``load_state_dict`` because the stored names are the
    checkpoint's: a MoE's experts are decomposed as one linear per expert projection
    (``experts.3.w1``), which the loader merges into the model's 3-D expert tensors as it does for any
    checkpoint. A tensor left out or left over is an error, not a randomly initialised weight.
    """
    model, info = from_pretrained(None, config=config, state_dict=state, dtype=dtype, output_loading_info=True,
                                  **options)
    odd = {kind: names for kind, names in info.items() if names and kind != "error_msgs"}
    if odd or info.get("error_msgs"):
        raise ValueError(f"BitStack directory does not fit its config.json: {odd or info['error_msgs']}")
    return model.eval()


def _from_pretrained(base: Any, cls: Any, path: Any, *args: Any, bitstack_budget: Any = None, config: Any = None,
                     **kwargs: Any) -> Any:
    """The model at ``bitstack_budget`` (every block without one), built by ``base``'s loader as class ``cls``.

    With config.json ``bitstack_base`` the model is the pruned class it names instead, whose file sits in the
    directory: transformers loads it as it loads any remote code (the caller already trusted this directory's).
    """
    manifest = read_manifest(path)
    counts = blocks_at(manifest, bitstack_budget)
    if config is None:
        config = transformers.AutoConfig.from_pretrained(path)
    reference = getattr(config, BASE_KEY, None)
    if reference:
        from transformers.dynamic_module_utils import get_class_from_dynamic_module

        base = get_class_from_dynamic_module(reference, str(path))
        cls = _model_class(base)
    dtype = kwargs.get("dtype") or kwargs.get("torch_dtype")
    dtype = getattr(torch, manifest["dtype"]) if dtype in (None, "auto") else dtype
    model = build_model(functools.partial(base.from_pretrained.__func__, cls), config,
                        state_dict_at(path, manifest, counts), dtype,
                        **{key: kwargs[key] for key in PASSED_ON if kwargs.get(key) is not None})
    model.bitstack_blocks = counts
    try:
        model.generation_config = transformers.GenerationConfig.from_pretrained(path)
    except OSError:  # no generation_config.json: keep the one built from config
        pass
    return model


@functools.cache
def _model_class(base: Any) -> type:
    """``BitStack<base>``: ``base`` (a transformers class, or a pruned one from ``bitstack_base``) loading blocks."""
    loader = classmethod(functools.partial(_from_pretrained, base))
    return type(PREFIX + base.__name__, (base,), {"from_pretrained": loader, "__module__": __name__})


def __getattr__(name: str) -> type:
    """``BitStack<X>ForCausalLM`` (the class config.json ``auto_map`` names) for transformers' ``<X>ForCausalLM``."""
    base: Any = getattr(transformers, name.removeprefix(PREFIX), None) if name.startswith(PREFIX) else None
    is_model = isinstance(base, type) and issubclass(base, transformers.PreTrainedModel)
    if not is_model:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return _model_class(base)
