"""Layer streaming: compress a local safetensors checkpoint larger than RAM, one decoder layer at a time.

The model is built on the meta device (no memory); the embeddings and rotary modules are loaded for layer 0's
inputs and released once those are captured (the final norm and head are read again at export), and each decoder
layer is loaded from the shards (``safe_open``, only that layer's tensors) when the engine reaches it,
transformed by the same engine code as an in-RAM run, written out as soon as it is done
(``compressor.export.streamed``) and put back on meta. At most one decoder layer is materialised at a time
(:attr:`LayerStreamer.max_resident` counts it). The calibration hidden states stay in RAM unless one
boundary of them exceeds ``activation_memory``; then they live in two memory-mapped files in the run's
temporary directory (``OUT.partial/stream-*``), which the kernel can page out.

This slice streams the quantizers that need per-layer statistics only, ShortGPT's layer removal, FLAP, BitStack,
BAQ's planning and SliceGPT (:data:`STREAMING_METHODS`) into the formats whose writers can take the output tensor
by tensor (:data:`STREAMING_FORMATS`); everything else needs the whole model in RAM and is refused before anything
loads (:func:`check_streamable`), as are ``--resume`` and ``torchrun``; checkpoints are off. Layer removal is the
in-RAM engine's model-level pass, streamed: its pass loads, runs, scores and drops every layer and writes
nothing; the removal then shrinks the skeleton (layer list, config), and the survivors are streamed again by
their index in the checkpoint through the later stages, written under their new numbers, or, when no stage
follows, copied from the checkpoint by the export (:class:`~compressor.streaming.layers.LayerStreamer`).
FLAP's pass is a scoring pass too: its finalize turns the per-layer statistics into a small plan per layer (kept
head groups and channels, the input means its compensation biases need), narrows the meta skeleton and its config,
and hands each plan to the streamer, which applies it (the same pure function as in RAM) to the layer's checkpoint
tensors whenever they are read again: loaded by the next pass, or copied by the export.
BitStack's pass is a scoring pass as well: each finished layer's blocks go to a file of their own in the run's
temporary directory and stay on the stage as meta tensors; its finalize orders every block from the numbers it
kept (errors per prefix, bytes per block). Export ``bitstack`` assembles the directory from those files and the
checkpoint's other tensors; for ``dense`` (or a stage after it) the streamer rebuilds each layer's weights from
its blocks' file whenever the layer is read again, as it applies FLAP's plan.
BAQ's pass scores too: it keeps each targeted linear's column sensitivities (small CPU tensors) and the layer is
dropped; its finalize allocates from those alone and hands the quantizer after it a plan of widths by module path
(data only), and the quantizer's pass streams the layers again and writes them. Its ``objective: fisher`` is
refused (loss gradients from a backward pass of the whole model); ``relative`` and ``channel`` are layer-local.
SliceGPT (first in the recipe) folds each layer as the pass loads it; ``shared`` first loads, folds, measures and
releases every layer for its pooled basis; the rotated embeddings and head, which the pass leaves on meta, are
computed from the checkpoint at export, one tensor at a time (:attr:`LayerStreamer.derived`).
``--eval`` scores the source checkpoint and the written output one layer at a time (:mod:`.perplexity`,
:func:`evaluate`), as ``compressor eval`` does for a directory above the budget.

When to stream (:func:`plan_streaming`): ``memory_budget="none"`` never does; a size (``4GB``, ``1.5GiB``)
streams when the checkpoint's weights, at the run's dtype (sum of the safetensors headers' tensors), exceed it;
``auto`` (the default) uses the memory the kernel says is available (``MemAvailable`` of ``/proc/meminfo``,
else the machine's total) as that budget. The weights are a lower bound of an in-RAM run's need (integer
codes, activations and the Python/torch baseline come on top), so ``auto`` streams only models that cannot
fit at all; give a budget to stream earlier.
"""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from compressor.distributed import is_distributed
from compressor.errors import RecipeError, UsageError
from compressor.evaluate.perplexity import PerplexityResult
from compressor.export import storage_scale_dtype
from compressor.export.atomic import partial_dir
from compressor.export.streamed import LayerFiles
from compressor.models.checkpoint_checks import DTYPE_BITS, check_safetensors, check_weight_files, total_memory_bytes
from compressor.models.loading import DTYPES, LoadedModel, read_config

if TYPE_CHECKING:
    from compressor.engine import ModelContext
    from compressor.methods.base import Method
    from compressor.recipe import ExportConfig, Recipe

log = logging.getLogger(__name__)

#: Stages that need one layer and its own statistics only, so they run on a streamed model. dgq qualifies: its
#: smoothing folds into the layer's own norms, its scale searches and GPTQ solve read the layer's Hessians, and its
#: Int8Linear replaces the layer's own linears; compressor-int8 (its own format) does not stream: that writer reads
#: every Int8Linear of the resident model at the end (a per-layer writer for it is not built).
#: layer_drop (ShortGPT) qualifies: its scores compare each layer's input and output states, and the removal after
#: the last layer touches only the skeleton's layer list and config. flap qualifies: its statistics are per layer,
#: its finalize turns them into a small plan per layer (kept heads and channels, input means), narrows the meta
#: skeleton and leaves the plan with the streamer, which applies it to the layer's checkpoint tensors whenever
#: they are read again (the next pass, or the export's copy; :meth:`LayerStreamer.reshape`).
#: bitstack qualifies: its decompositions and errors are per linear, and its order is decided at finalize from small
#: numbers (errors per prefix, bytes per block); each finished layer's blocks go to a file of their own
#: (``methods.quant.bitstack.spill.spill_layer``), from which the export assembles the directory, or, for dense and the
#: stages after it, the layer's reconstruction is made whenever the layer is read again. Not its ``order: fisher``
#: (loss gradients from a forward and backward pass of the whole model), nor ``--eval`` into a bitstack directory.
#: baq qualifies: it only plans; its measures read each layer's own weights and Hessians, its finalize allocates from
#: the kept sensitivities and leaves a plan keyed by module path for the quantizer's pass. Not its ``objective:
#: fisher`` (the same whole-model backward as bitstack's order fisher).
#: slicegpt qualifies: its layers are folded as they load, ``per_layer`` takes each basis from the layer being sliced,
#: ``shared`` pools its statistics in its prepare (every layer loaded, folded, measured and released: one more read
#: of the model), and the rotated embeddings and head are computed from the checkpoint at export
#: (``LayerStreamer.derived``; a tied embedding's projections instead). Not after another stage: its prepare runs
#: before the pass reloads the embeddings an earlier pass released, and layers loaded through a plan are untested.
STREAMING_METHODS = ("rtn", "gptq", "dgq", "layer_drop", "flap", "bitstack", "baq", "slicegpt")
#: Stages whose model runs INT8 activations, which a file's weights alone do not reproduce (no streamed --eval).
INT8_ACTIVATION_METHODS = ("dgq",)
#: Export formats whose writer takes the model tensor by tensor (``compressor.export.streamed``).
STREAMING_FORMATS = ("dense", "compressed-tensors", "bitstack")
_SAFETENSORS_TORCH = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16, "F64": torch.float64}


@dataclass(frozen=True)
class StreamPlan:
    """Whether a run streams, and the numbers behind the choice (for messages and the report)."""

    stream: bool
    weight_bytes: int  # the checkpoint's weights at the run's dtype; 0 when not a local safetensors directory
    budget_bytes: int | None
    reason: str


def parse_size(text: str | int, option: str) -> int:
    """``4GB`` (10^9), ``1.5GiB`` (2^30), ``500MB`` or a byte count -> bytes; anything else is a usage error."""
    from compressor.methods.quant.bitstack.order import BudgetError, parse_budget

    try:
        budget = parse_budget(text)
    except BudgetError:
        budget = None
    if budget is None or budget.unit != "bytes":
        raise UsageError(f"{option} '{text}': expected a size such as 4GB, 1.5GiB or 500MB, or 'none'")
    return int(budget.value)


def available_memory_bytes() -> int:
    """What the kernel says a new allocation can use now (``MemAvailable``), else the machine's total memory."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return total_memory_bytes()


def checkpoint_weight_bytes(directory: Path, dtype: str) -> int:
    """Bytes of every tensor in the directory's safetensors files at the run's dtype (``auto``: as stored).

    A compressed-tensors linear counts as the dense weight it is dequantized to (``weight_shape`` elements in its
    scale's dtype, or the forced one): that is what a loaded or streamed model holds, not the packed codes.
    """
    forced = DTYPES.get(dtype)
    total = 0
    for path in sorted(directory.glob("*.safetensors")):
        header = check_safetensors(path)
        for name, entry in header.items():
            if name == "__metadata__" or name.endswith(_PACKED_PARTS):
                continue
            stored = entry["dtype"]
            shape = entry["shape"]
            if name.endswith(".weight_packed"):  # the dense weight, in the dtype of its scales
                stem = name.removesuffix("_packed")
                shape, stored = _read_shape(path, f"{stem}_shape"), header[f"{stem}_scale"]["dtype"]
            count = 1
            for size in shape:
                count *= size
            bits = DTYPE_BITS[stored]
            if forced is not None and stored in _SAFETENSORS_TORCH:
                bits = torch.empty((), dtype=forced).element_size() * 8
            total += count * bits // 8
    return total


#: The parts of a compressed-tensors linear other than its codes (counted in the dense weight's size).
_PACKED_PARTS = (".weight_scale", ".weight_shape", ".weight_zero_point", ".weight_g_idx")


def _read_shape(path: Path, name: str) -> list[int]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        return [int(size) for size in handle.get_tensor(name).tolist()]


def plan_streaming(model: object, memory_budget: str | int | None, dtype: str) -> StreamPlan:
    """Decide before loading whether ``model`` streams (see the module doc for the rule)."""
    budget_text = "auto" if memory_budget is None else memory_budget
    if isinstance(budget_text, str) and budget_text.strip().lower() == "none":
        return StreamPlan(False, 0, None, "--memory-budget none")
    is_dir = isinstance(model, str | Path) and Path(model).is_dir() and any(Path(model).glob("*.safetensors"))
    auto = isinstance(budget_text, str) and budget_text.strip().lower() == "auto"
    budget = available_memory_bytes() if auto else parse_size(budget_text, "--memory-budget")
    if not is_dir:
        if auto:
            return StreamPlan(False, 0, budget, "not a local safetensors directory: loaded whole")
        raise UsageError(f"--memory-budget {budget_text}: streaming reads a local directory of safetensors "
                         f"shards; {model} is not one (use --memory-budget none to load it whole)")
    check_weight_files(Path(str(model)))
    weights = checkpoint_weight_bytes(Path(str(model)), dtype)
    where = "available memory" if auto else "--memory-budget"
    if weights <= budget:
        return StreamPlan(False, weights, budget, f"weights {_gb(weights)} fit the {where} {_gb(budget)}")
    return StreamPlan(True, weights, budget, f"weights {_gb(weights)} exceed the {where} {_gb(budget)}")


def check_streamable(plan: StreamPlan, stages: list[Any], export_format: str, *, eval_data: str | None,
                     resume: bool, distributed: bool) -> None:
    """Refuse (exit 2, one line) what this slice cannot stream, before any weight is read.

    Refused: a stage outside :data:`STREAMING_METHODS`, a model-level stage after a layer-wise one, a format
    outside :data:`STREAMING_FORMATS`, bitstack's ``order: fisher`` and baq's ``objective: fisher`` (their loss
    gradients need a backward pass of the whole model), a slicegpt after another stage, ``--eval`` of a dgq model
    (INT8 activations), of a bitstack directory or of a sliced model (neither read back layer by layer),
    ``--resume`` and torchrun.
    """
    need = f"it needs the whole model in RAM (at least {_gb(plan.weight_bytes)} of weights): run with " \
           f"--memory-budget none or a budget above that on a machine that has it"
    for index, stage in enumerate(stages):
        if stage.name == "finercut":  # the search would read the later layers again for every candidate it scores
            raise RecipeError(f"stages.{index} (finercut) does not stream ({plan.reason}): scoring a candidate runs "
                              "every layer after it, so each candidate would read those layers' weights from the "
                              f"checkpoint again; {need} (its hidden-state cache already goes to memory-mapped files "
                              "above --activation-memory)")
        if stage.name not in STREAMING_METHODS:
            raise RecipeError(f"stages.{index} ({stage.name}) does not stream ({plan.reason}); {need}. "
                              f"Streaming runs {', '.join(STREAMING_METHODS)}")
        if stage.model_level and not all(s.model_level for s in stages[:index]):
            # the layers are written by the pass of the stages after the last model-level one; earlier layer-wise
            # changes would be read again from the checkpoint and lost (the recipe rules refuse this order too)
            raise RecipeError(f"stages.{index} ({stage.name}) after a layer-wise stage does not stream "
                              f"({plan.reason}); put it first")
        if stage.name == "bitstack" and getattr(stage.config, "order", None) == "fisher":
            raise RecipeError(f"stages.{index} (bitstack) order: fisher does not stream ({plan.reason}): its loss "
                              "gradients need a forward and backward pass of the whole model; use order: relative")
        if stage.name == "slicegpt" and index:
            raise RecipeError(f"stages.{index} (slicegpt) after another stage does not stream ({plan.reason}); "
                              "put it first")
        if stage.name == "baq" and getattr(stage.config, "objective", None) == "fisher":
            raise RecipeError(f"stages.{index} (baq) objective: fisher does not stream ({plan.reason}): its loss "
                              "gradients need a forward and backward pass of the whole model; use objective: "
                              "relative (or channel)")
    if export_format not in STREAMING_FORMATS:
        raise RecipeError(f"export.format {export_format} does not stream ({plan.reason}); {need}. "
                          f"Streaming writes {', '.join(STREAMING_FORMATS)}")
    if eval_data and any(stage.name in INT8_ACTIVATION_METHODS for stage in stages):
        raise UsageError(f"--eval under streaming ({plan.reason}): the dgq model runs INT8 activations that its "
                         "written weights do not (streamed perplexity reads the output's weights); drop --eval or "
                         "run with --memory-budget none")
    if eval_data and any(stage.name == "slicegpt" for stage in stages):
        raise UsageError(f"--eval under streaming ({plan.reason}): a sliced model (its own modeling file) is not "
                         "read back layer by layer; drop --eval, or run with --memory-budget none")
    if eval_data and export_format == "bitstack":
        raise UsageError(f"--eval under streaming ({plan.reason}): a bitstack directory is not read back layer by "
                         "layer; drop --eval, then run compressor eval on a compressor bitstack materialize output")
    if resume or distributed:
        what = "--resume" if resume else "torchrun (data-parallel calibration)"
        raise UsageError(f"{what} does not combine with layer streaming yet ({plan.reason})")


def streams_eval(model: object, memory_budget: str | int | None, dtype: str) -> bool:
    """Whether ``compressor eval`` scores ``model`` streamed (same rule as compress; None: never)."""
    if memory_budget is None or isinstance(model, LoadedModel):
        return False
    plan = plan_streaming(model, memory_budget, dtype)
    log.info("memory: %s -> %s", plan.reason, "streamed evaluation" if plan.stream else "whole model in RAM")
    return plan.stream


def evaluate(directory: Path, data: str, *, seq_len: int, max_tokens: int | None, device: str, dtype: str = "auto",
             text_field: str | None = None, progress: Callable[[int], None] | None = None) -> PerplexityResult:
    """Perplexity of the model in ``directory``, one decoder layer in memory at a time (:mod:`.perplexity`)."""
    from compressor.models.loading import resolve_device
    from compressor.streaming.perplexity import streamed_perplexity

    return streamed_perplexity(directory, data, seq_len=seq_len, max_tokens=max_tokens, device=resolve_device(device),
                               dtype=dtype, text_field=text_field, progress=progress)


def checkpoint_dtype(directory: Path, dtype: str) -> str:
    """The dtype a streamed run of ``directory`` computes in (``auto``: config.json's, else the first tensor's)."""
    from compressor.streaming.layers import Checkpoint, run_dtype

    return str(run_dtype(read_config(directory), Checkpoint(directory), dtype)).removeprefix("torch.")


def _gb(size: int | None) -> str:
    return "unknown" if size is None else f"{size / 1e9:.2f} GB"


@dataclass
class StreamedRun:
    """The streaming side of one compress run: what it streams from, how, and the source's reader once loaded."""

    plan: StreamPlan
    directory: Path
    dtype: str
    activation_limit: int | None
    source: Any = None  # the checkpoint reader (:class:`compressor.streaming.layers.Checkpoint`), set by load()

    def load(self) -> LoadedModel:
        """The meta skeleton, what runs before layer 0 loaded (:func:`compressor.streaming.layers.load_skeleton`)."""
        from compressor.streaming.layers import load_skeleton

        loaded, self.source = load_skeleton(self.directory, self.dtype)
        return loaded


def prepare(model: str | Path | LoadedModel, memory_budget: str | int | None, activation_memory: str | int | None,
            dtype: str, stages: list[Method], recipe: Recipe, *, eval_data: str | None,
            resume: bool) -> StreamedRun | None:
    """How this compress run streams its layers from disk, or None when it loads whole (checked before any load)."""
    plan = plan_for_run(model, memory_budget, dtype, stages, recipe, eval_data=eval_data, resume=resume)
    limit = activation_limit(activation_memory)
    return None if plan is None else StreamedRun(plan, Path(str(model)), dtype, limit)


def plan_for_run(model: str | Path | LoadedModel, memory_budget: str | int | None, dtype: str, stages: list[Method],
                 recipe: Recipe, *, eval_data: str | None, resume: bool) -> StreamPlan | None:
    """The streaming plan when this run streams its layers from disk, else None (checked before any load)."""
    if isinstance(model, LoadedModel):
        if memory_budget not in (None, "auto", "none"):
            raise UsageError("--memory-budget: an already loaded model cannot stream; pass its directory instead")
        return None
    plan = plan_streaming(model, memory_budget, dtype)
    log.info("memory: %s -> %s", plan.reason, "streaming layers from disk" if plan.stream else "whole model in RAM")
    if not plan.stream:
        return None
    check_streamable(plan, stages, recipe.export.format, eval_data=eval_data, resume=resume,
                     distributed=is_distributed())
    return plan


def activation_limit(activation_memory: str | int | None) -> int | None:
    """``--activation-memory`` in bytes; None (or ``none``) keeps the hidden states in RAM."""
    if activation_memory is None or (isinstance(activation_memory, str) and activation_memory.lower() == "none"):
        return None
    return parse_size(activation_memory, "--activation-memory")


@contextmanager
def attach(run: ModelContext, stream: StreamedRun | None, export_config: ExportConfig, out: Path) -> Iterator[None]:
    """Attach a layer streamer to ``run`` when the model streams; its temporary files go whatever happens."""
    if stream is None:
        yield
        return
    from compressor.streaming.heap import released_heap
    from compressor.streaming.layers import LayerStreamer

    partial = partial_dir(out)
    workdir = stream_workdir(partial)
    try:
        run.stream = LayerStreamer(run.model, run.adapter, stream.source, LayerFiles(workdir / "layers"),
                                   export_config.format, lambda dtype: storage_scale_dtype(export_config, dtype),
                                   workdir, stream.plan.reason, stream.activation_limit)
        with released_heap():  # freed tensors go back to the kernel (compressor.streaming.heap)
            yield
    finally:
        remove_workdir(workdir, partial)


def notes(run: ModelContext) -> list[dict[str, Any]]:
    """The report's warning group about the streaming, when the run streamed."""
    return [run.stream.note()] if run.stream else []


def stream_workdir(partial: Path) -> Path:
    """A fresh directory for the layer files and the memory-mapped activations, inside ``OUT.partial``."""
    partial.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix="stream-", dir=partial))


def remove_workdir(workdir: Path, partial: Path) -> None:
    import shutil

    shutil.rmtree(workdir, ignore_errors=True)
    try:
        os.rmdir(partial)  # only when nothing else (checkpoints, staging) is left in it
    except OSError:
        pass
