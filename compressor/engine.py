"""The layer-wise runner every method goes through (the GPTQ reference driver, written once).

Per pass: run the embeddings once and capture decoder layer 0's hidden states plus every layer's own
keyword arguments (its attention mask, which differs between sliding-window and full-attention layers,
position embeddings...: ``calibration/capture.py``); then for each layer move it to the device, let every
stage of the pass transform it, re-run the calibration set through the transformed layer to make the next
layer's inputs (so later layers see earlier layers' error), move it back, and move the integer codes it
produced to ``storage_device``. Only one layer and the calibration hidden states are on the device at a time. A
model-level stage (layer removal) ends a pass; the stages after it get a fresh capture of the changed model.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

import torch
from torch import nn

from compressor.calibration.capture import (
    CapturedBatch,
    CapturedInputs,
    FloatReference,
    StopForward,
    capture_inputs,
    patched_forwards,
)
from compressor.calibration.precision import fitting_precision
from compressor.distributed import Job, WeightedSum, raise_together, solve_partitioned
from compressor.errors import NumericalError
from compressor.methods.base import LayerRecord, Method
from compressor.methods.quant.gptq_ops import accumulate_hessian
from compressor.methods.quant.ops import QuantizedWeight
from compressor.models.base import LinearGroup, ModelAdapter

if TYPE_CHECKING:  # checkpoint.py imports this module
    from compressor.checkpoint import Checkpoints, PassCheckpoint
log = logging.getLogger(__name__)
T = TypeVar("T")

#: progress(phase, done, total): the CLI renders it; the library never prints.
ProgressFn = Callable[[str, int, int], None]


class LayerStream(Protocol):
    """Where decoder layers come from and go to when the model does not fit in RAM (``compressor.streaming``).

    Without one, every layer is resident and only moves between the CPU and ``--device``.
    """

    #: Tensors outside the layers a stage changed while they were on meta (SliceGPT's rotated embeddings and head):
    #: the export writes ``derived[name](read)``, ``read(name, dtype)`` giving a checkpoint tensor.
    derived: dict[str, Callable[[Callable[[str, torch.dtype], torch.Tensor]], torch.Tensor]]

    def load(self, index: int) -> nn.Module:
        """Materialise decoder layer ``index`` (its weights read from disk) and return it."""
        ...

    def keep(self, hidden: list[torch.Tensor]) -> list[torch.Tensor]:
        """Store one boundary of hidden states (in RAM, or in a memory-mapped file above a limit)."""
        ...

    def sink(self, like: list[torch.Tensor]) -> Callable[[int, torch.Tensor], torch.Tensor] | None:
        """Where the next boundary's batch outputs are written (None: kept as computed)."""
        ...

    def begin(self, stages: Sequence[Method]) -> None:
        """A pass of ``stages`` starts: load what runs before layer 0 again if a previous pass released it.

        A pass that ends in a model-level stage writes no layer: that stage changes the model after the last
        layer, so the layers are written by a later pass or, unchanged, by the export.
        """
        ...

    def release(self, index: int) -> None:
        """Layer ``index`` was only read (a stage's statistics before its pass): back to meta, nothing written."""
        ...

    def captured(self) -> None:
        """Layer 0's inputs are captured: what ran before it may be released."""
        ...

    def reshape(self, layer: nn.Module, rewrite: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]]) -> None:
        """A model-level stage changed this (meta) layer's shapes: ``rewrite`` turns its checkpoint tensors
        (names relative to the layer) into its own whenever they are read, by a later pass or the export (FLAP)."""
        ...

    def finish(self, run: ModelContext, index: int) -> None:
        """Layer ``index`` is done: write its output tensors and release it."""
        ...

    def note(self) -> dict[str, Any]:
        """What the report says about the streaming (a warning group)."""
        ...


@dataclass
class ModelContext:
    """What model-level steps see: the model, its adapter, the calibration tokens and the results."""

    model: Any  # a transformers PreTrainedModel (nn.Module with save_pretrained, config, ...)
    adapter: ModelAdapter
    tokens: torch.Tensor
    device: torch.device
    batch_size: int
    quantized: dict[str, QuantizedWeight] = field(default_factory=dict)
    #: Structural changes the export must record (removed layers, slicing widths...), by method name.
    structure: dict[str, Any] = field(default_factory=dict)
    #: Plans handed from one stage to the next (BAQ's bit map), by key.
    plans: dict[str, Any] = field(default_factory=dict)
    #: Where a finished layer's integer codes and scales go (on a GPU they would add ~1 byte per parameter).
    storage_device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    #: Set when the model streams from disk: layers are loaded, written and released one at a time.
    stream: LayerStream | None = None
    #: ``--activation-memory`` (bytes): hidden states a method caches (FinerCut's) go to files above it; None: RAM.
    activation_limit: int | None = None
    #: For those files: on the output's disk (``OUT.partial``, maybe not made yet; the writer removes them), or None.
    temp_dir: Path | None = None

    def batches(self) -> Iterator[torch.Tensor]:
        for start in range(0, self.tokens.shape[0], self.batch_size):
            yield self.tokens[start : start + self.batch_size].to(self.device)

    def capture_inputs(self) -> CapturedInputs:
        """Layer 0's hidden states and every layer's kwargs for each calibration batch."""
        return capture_inputs(self.model, self.adapter, self.batches())

    def store_codes(self) -> None:
        """Move every quantized weight not yet there to ``storage_device`` (exports read them from there)."""
        for path, qweight in self.quantized.items():
            if qweight.q.device != self.storage_device and not qweight.q.is_meta:  # meta: a streamed layer's, written
                self.quantized[path] = qweight.to(self.storage_device)


@dataclass
class _Replay:
    """A sublayer replayed as its output projection applied to recorded inputs (one per batch)."""

    projection: nn.Module
    inputs: list[torch.Tensor]
    returns_tuple: bool
    #: Set by :meth:`LayerContext.settle` once the projection is final: the outputs, computed once.
    outputs: list[torch.Tensor] | None = None


@dataclass
class LayerContext:
    """One decoder layer during a pass: the layer, its inputs and statistics helpers for methods."""

    index: int
    layer: nn.Module
    run: ModelContext
    #: Per batch: the hidden states entering this layer and the kwargs the model's forward gives this layer.
    inputs: list[CapturedBatch]
    #: Sublayers (attention, MLP) whose output is replayed instead of recomputed; see :meth:`hessian`.
    _replays: dict[nn.Module, _Replay] = field(default_factory=dict, repr=False)
    _batch: int = field(default=0, repr=False)

    @property
    def adapter(self) -> ModelAdapter:
        return self.run.adapter

    @property
    def prefix(self) -> str:
        return self.adapter.layer_prefix(self.index)

    def module(self, name: str) -> nn.Module:
        """A submodule of this layer by relative path (names come from the adapter)."""
        return self.layer.get_submodule(name)

    def path(self, name: str) -> str:
        return f"{self.prefix}.{name}"

    @torch.no_grad()
    def forward(self, sink: Callable[[int, torch.Tensor], torch.Tensor] | None = None) -> list[torch.Tensor]:
        """Run every calibration batch through the layer as it is now; returns the outputs.

        ``sink(batch, output)`` stores each output as it is made (a memory-mapped file) and returns what to keep.
        """
        outputs = []
        with self._sweep() as batches:
            for number, batch in enumerate(batches):
                out = self.layer(batch.hidden, **batch.kwargs)
                out = out[0] if isinstance(out, tuple) else out
                outputs.append(out if sink is None else sink(number, out))
        return outputs

    @contextmanager
    def _sweep(self) -> Iterator[Iterator[CapturedBatch]]:
        """One pass over the calibration batches, with replayed sublayers patched in for its duration.

        The yielded iterator records which batch is running, so a replayed sublayer returns that batch's.
        """
        patches = {module: partial(self._replayed_forward, module) for module in self._replays}

        def batches() -> Iterator[CapturedBatch]:
            for index, batch in enumerate(self.inputs):
                self._batch = index
                yield batch

        with patched_forwards(patches):
            yield batches()

    def _replayed_forward(self, module: nn.Module, *args: Any, **kwargs: Any) -> Any:
        replay = self._replays[module]
        if replay.outputs is not None:
            out = replay.outputs[self._batch]
        else:
            out = replay.projection(replay.inputs[self._batch])
        return (out, None) if replay.returns_tuple else out

    @torch.no_grad()
    def settle(self, group: LinearGroup) -> None:
        """The group's projection is final for this stage: replay its outputs instead of re-applying it.

        Computes them once and frees the recorded inputs (an MLP's are wider than its outputs).
        """
        target = self._replayable(group)
        replay = self._replays.get(target[0]) if target else None
        if replay is None or replay.outputs is not None:
            return
        replay.outputs = [replay.projection(x) for x in replay.inputs]
        replay.inputs = []

    def thaw(self) -> None:
        """Recompute every sublayer again (a stage that may change any weight starts from here)."""
        self._replays.clear()

    def _replayable(self, group: LinearGroup) -> tuple[nn.Module, bool] | None:
        """The sublayer a lone output projection closes (attention, or an MLP module), or None.

        transformers' attention modules return ``(output, weights)``; MLP modules return the output.
        A family whose MLP parts live on the layer itself (OPT's fc1/fc2) has only its attention replayable.
        """
        if len(group.names) != 1:
            return None
        first = self.module(group.names[0])
        if first is self.adapter.attention_output(self.layer):
            return self.adapter.attention(self.layer), True
        mlp, writers = self.adapter.mlp(self.layer), self.adapter.mlp_outputs(self.layer)
        if len(writers) == 1 and first is writers[0] and mlp is not self.layer:  # a MoE's sum is no one projection
            return mlp, False
        return None

    def solve_each(self, jobs: Sequence[Job[T]]) -> list[T]:
        """The results of per-module solves (``jobs`` of one group of linears, its statistics already summed).

        A method hands its solves here instead of calling them: under torchrun each job is solved by one process
        and its result broadcast to the others (``distributed.solve_partitioned``); in one process they run in
        order. The method then writes every result back itself, the same way on every process.
        """
        return solve_partitioned(jobs)

    def collect_inputs(self, module: nn.Module, fold: Callable[[torch.Tensor], None]) -> None:
        """Call ``fold(x)`` with the input of ``module`` for every batch, stopping each forward there."""
        self.collect_many([(module, fold)])

    @torch.no_grad()
    def collect_many(self, folds: list[tuple[nn.Module, Callable[[torch.Tensor], None]]]) -> None:
        """Like :meth:`collect_inputs` for several modules in one pass; it stops at the last one listed."""
        last = folds[-1][0]
        handles = []
        for module, fold in folds:

            def hook(mod: nn.Module, args: tuple[torch.Tensor, ...], fold: Callable = fold) -> None:
                fold(args[0])
                if mod is last:
                    raise StopForward

            handles.append(module.register_forward_pre_hook(hook))
        try:
            with self._sweep() as batches, self.adapter.statistics(self.layer):
                for batch in batches:
                    try:
                        self.layer(batch.hidden, **batch.kwargs)
                    except StopForward:
                        pass
        finally:
            for handle in handles:
                handle.remove()

    def hessian(self, group: LinearGroup, replay: bool = False) -> torch.Tensor:
        """``H = 2/n X^T X`` of the input shared by the group's linears (``[in, in]``, float32).

        The forward stops at the group's first linear, so statistics of a later group reflect every
        change already made to earlier groups (GPTQ's sequential order).

        With ``replay``, when the group is a sublayer's output projection (o_proj, down_proj), its inputs
        are kept and later forwards of this layer compute that sublayer as ``projection(kept input)``
        instead of re-running it: GPTQ's later groups and the layer's final output then skip the
        attention (and the MLP's first half). Only valid while nothing upstream of the projection
        inside that sublayer changes again: the caller promises it (GPTQ's data-flow order), and the
        engine thaws before every stage. The projection itself may change (it is applied live).
        """
        return self._hessian(group, replay)

    def asymmetric_hessian(
        self, group: LinearGroup, reference: FloatReference, replay: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(H, D)`` of the group's input ``X`` (this layer as it is now, on its own inputs) and ``X_f`` (the same
        linear's input in ``reference.layer`` on ``reference.hidden``): ``D = 2/n (X_f - X)^T X``, ``[in, in]``.

        Token by token, ``X_f`` is what the float model feeds the linear where the quantized prefix feeds it
        ``X``: ``D`` is the cross term of the objective ``||X_f W^T - X Q^T||^2`` that GPTQ's symmetric objective
        (``X_f = X``) leaves out (GPTAQ's asymmetric calibration). One pass computes both; ``replay`` as in
        :meth:`hessian`.
        """
        shift = WeightedSum()
        H = self._hessian(group, replay, (reference, shift))
        D = shift.mean()
        if D is None or not torch.isfinite(D).all():
            raise NumericalError(f"non-finite float-model inputs reach {self.path(group.names[0])}: cannot "
                                 "calibrate it asymmetrically")
        return H, D.float()

    def _hessian(
        self, group: LinearGroup, replay: bool, reference: tuple[FloatReference, WeightedSum] | None = None
    ) -> torch.Tensor:
        target = self._replayable(group) if replay else None
        kept: list[torch.Tensor] | None = [] if target is not None else None
        H = self.hessians([group], keep=kept, reference=reference)[group]
        if target is not None:
            assert kept is not None
            sublayer, returns_tuple = target
            self._replays[sublayer] = _Replay(self.module(group.names[0]), kept, returns_tuple)
        return H

    @torch.no_grad()
    def hessians(
        self, groups: list[LinearGroup], keep: list[torch.Tensor] | None = None,
        reference: tuple[FloatReference, WeightedSum] | None = None,
    ) -> dict[LinearGroup, torch.Tensor]:
        """Hessians of several groups from shared forward passes (one pass when all are requested).

        Each batch's ``2/n X^T X`` is summed in float64, weighted by its tokens, over every process's batches.

        ``keep`` (one group only) receives the inputs themselves, one tensor per batch. ``reference`` (one group
        only): :meth:`asymmetric_hessian`'s cross term is summed into its ``WeightedSum`` the same way.
        """
        if (keep is not None or reference is not None) and len(groups) != 1:
            raise ValueError("hessians(keep=..., reference=...) records the inputs of exactly one group")
        sums = {g: WeightedSum() for g in groups}

        def fold(group: LinearGroup, x: torch.Tensor) -> None:
            sums[group].add(*accumulate_hessian(None, x, 0))  # this batch's 2/n X^T X (float32) and its n tokens
            if keep is not None:
                keep.append(x)
            if reference is not None:
                rows = x.reshape(-1, x.shape[-1]).float()
                shift = self._reference_input(reference[0], group.names[0]).reshape(rows.shape).float() - rows
                reference[1].add(shift.T @ rows * (2 / max(rows.shape[0], 1)), rows.shape[0])

        self.collect_many([(self.module(g.names[0]), partial(fold, g)) for g in groups])
        result = {}
        for group, total in sums.items():
            H = total.mean()  # over every process's batches (distributed.py): float64, then float32
            if H is None or not torch.isfinite(H).all():
                raise NumericalError(f"non-finite inputs reach {self.path(group.names[0])}: cannot quantize it")
            result[group] = H.float()
        return result

    def _reference_input(self, reference: FloatReference, name: str) -> torch.Tensor:
        """The input of ``reference.layer``'s linear ``name`` on the running batch's float hidden states."""
        found: list[torch.Tensor] = []

        def hook(module: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
            found.append(args[0])
            raise StopForward

        handle = reference.layer.get_submodule(name).register_forward_pre_hook(hook)
        try:
            with self.adapter.statistics(reference.layer):
                reference.layer(reference.hidden[self._batch], **self.inputs[self._batch].kwargs)
        except StopForward:
            pass
        finally:
            handle.remove()
        if not found:
            raise NumericalError(f"{self.path(name)}: the float layer's forward never reached it")
        return found[0]



def split_passes(stages: list[Method]) -> list[list[Method]]:
    """Consecutive layer-wise stages share a pass; a model-level stage closes one, a whole-model-first one opens one."""
    passes: list[list[Method]] = [[]]
    for stage in stages:
        passes += [[]] if stage.runs_whole_model_first() else []  # a pass of its own (empty passes are dropped)
        passes[-1].append(stage)
        if stage.model_level:
            passes.append([])
    return [p for p in passes if p]


def _move_embeddings(adapter: ModelAdapter, device: torch.device) -> None:
    for module in adapter.before_layers():
        module.to(device)


def run_pass(run: ModelContext, stages: list[Method], progress: ProgressFn | None = None,
             checkpoint: PassCheckpoint | None = None) -> list[LayerRecord]:
    """One sweep over the decoder layers applying ``stages`` in each; ``checkpoint`` saves/restores finished layers."""
    records: list[LayerRecord] = []
    for stage in stages:
        records += stage.prepare(run)
    if run.stream:
        run.stream.begin(stages)
    _move_embeddings(run.adapter, run.device)
    captured = run.capture_inputs()
    _move_embeddings(run.adapter, torch.device("cpu"))
    layers, label = run.adapter.layers(), "+".join(stage.name for stage in stages)
    hidden = captured.hidden
    if run.stream:
        run.stream.captured()
        hidden = captured.hidden = run.stream.keep(hidden)
    start, hidden, records = checkpoint.begin(run, stages, hidden, records) if checkpoint else (0, hidden, records)
    for index in range(start, len(layers)):
        layer = run.stream.load(index) if run.stream else layers[index]
        ctx = LayerContext(index, layer.to(run.device), run, captured.layer(index, hidden))
        with fitting_precision(ctx, records):  # float32 for a float16 layer that would overflow
            for stage in stages:
                ctx.thaw()
                records += stage.apply(ctx)
            # replays what the last stage left replayable
            hidden = ctx.forward(run.stream.sink(hidden) if run.stream else None)
        finite = all(torch.isfinite(out).all() for out in hidden)  # every process checks: none waits for a failed one
        raise_together(not finite, f"layer {ctx.prefix} produced NaN/inf outputs after {label}")
        layers[index].to("cpu")
        run.store_codes()
        if run.stream:
            run.stream.finish(run, index)
        if checkpoint:
            checkpoint.save(run, index, layers[index], records, hidden)
        if progress:
            progress(label, index + 1, len(layers))
    for stage in stages:
        records += stage.finalize(run)
    return records


def run_stages(run: ModelContext, stages: list[Method], progress: ProgressFn | None = None,
               checkpoints: Checkpoints | None = None) -> list[LayerRecord]:
    """Every pass in order; returns the per-module records of all stages (``checkpoints``: see checkpoint.py)."""
    records: list[LayerRecord] = []
    for number, stages_of_pass in enumerate(split_passes(stages)):
        start = time.perf_counter()
        records += (checkpoints.run_pass(number, run, stages_of_pass, progress) if checkpoints
                    else run_pass(run, stages_of_pass, progress))
        log.info("pass %s took %.1f s", [s.name for s in stages_of_pass], time.perf_counter() - start)
    return records
