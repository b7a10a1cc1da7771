"""Block-wise refinement of a quantized decoder layer (SignRound-style), after RTN or GPTQ solved its linears.

Before quantizing, :func:`float_targets` computes what the layer must reproduce: by default (``refine_target:
float_input``, SignRound's) the float layer's output on the *float* model's hidden states, carried from layer
to layer beside the engine's quantized-prefix stream, so each layer also corrects the error of the layers
before it; or the float layer on the quantized-prefix inputs themselves. Afterwards :func:`refine_layer` feeds
the quantized layer its quantized-prefix inputs and learns rounding offsets and per-group scale factors of every
linear the stage quantized in this layer (math in ``refine_ops.py``) by signed gradient descent on the error
between its output and those targets (``refine_loss``: plain squared error, or each token's over its target's
mean square, which the residual stream's massive activations do not dominate), a few sequences per step.
The best parameters seen are kept, judged by each step's loss relative to the starting loss of the same
sequences (so easy and hard batches compare), and are accepted only when they lower the loss on the whole
calibration set; otherwise the stage's own codes stay. Results replace ``run.quantized[path]`` (codes and
scales on the same grid) and the module weights, so every export holds exactly what was evaluated.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from torch.func import functional_call

from compressor.distributed import all_reduce_sum_float64, is_distributed, rank, world_size
from compressor.methods.base import LayerRecord
from compressor.methods.quant.common import claim_linear, targeted_groups
from compressor.methods.quant.ops import QuantizedWeight
from compressor.methods.quant.refine_ops import (
    FACTOR_RANGE,
    OFFSET_LIMIT,
    decayed_lr,
    output_error,
    refined_codes,
    refined_weight,
    rounding_base,
    signed_step,
)
from compressor.models.loading import fast_bfloat16

if TYPE_CHECKING:
    from compressor.engine import CapturedBatch, LayerContext
    from compressor.methods.quant.common import WeightQuantConfig

log = logging.getLogger(__name__)

#: A step's sequences: (index of the captured batch, rows of it).
Chunk = list[tuple[int, torch.Tensor]]
#: Key in ``run.plans`` of the float hidden-state streams (``{id(stage config): _FloatStream}``).
_STREAMS = "refine.float_streams"


@dataclass
class _Refined:
    """One linear under refinement: its fixed parts in level units (``[out, in]``) and learned parameters."""

    name: str
    qweight: QuantizedWeight
    groups: torch.Tensor
    base: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor
    maxq: torch.Tensor
    offset: torch.Tensor
    factor: torch.Tensor

    @classmethod
    def start(cls, name: str, qweight: QuantizedWeight, rounded: torch.Tensor | None) -> _Refined:
        """Parameters that reproduce ``qweight`` exactly (``offset = 0``, ``factor = 1``)."""
        groups = qweight.column_groups()
        scale, zero = qweight.scale[:, groups].float(), qweight.zero[:, groups].float()
        widths = torch.full_like(groups, qweight.bits) if qweight.group_bits is None else qweight.group_bits[groups]
        maxq = (torch.bitwise_left_shift(torch.ones_like(widths), widths.to(groups.device)) - 1).float()
        return cls(name, qweight, groups, rounding_base(qweight.q, scale, zero, rounded), scale, zero, maxq,
                   torch.zeros_like(scale, requires_grad=True),
                   torch.ones_like(qweight.scale, dtype=torch.float32, requires_grad=True))

    def columns(self, per_group: torch.Tensor) -> torch.Tensor:
        """``[out, n_groups] -> [out, in]``: each column gets its group's value (contiguous groups expand, whose
        backward is a sum; ``g_idx`` groups index, whose backward scatters)."""
        if self.qweight.g_idx is not None:
            return per_group[:, self.groups]
        out, n_groups = per_group.shape
        return per_group[:, :, None].expand(out, n_groups, self.base.shape[1] // n_groups).reshape(out, -1)

    def weight(self) -> torch.Tensor:
        return refined_weight(self.base, self.scale, self.zero, self.maxq, self.offset, self.columns(self.factor))

    @torch.no_grad()
    def result(self) -> QuantizedWeight:
        """The integer form of the current parameters (same grid, zero points and groups; scales times factor)."""
        codes = refined_codes(self.base, self.zero, self.maxq, self.offset, self.columns(self.factor))
        return replace(self.qweight, q=codes.to(torch.uint8), scale=(self.qweight.scale * self.factor).float())

    def snapshot(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.offset.detach().clone(), self.factor.detach().clone()

    @torch.no_grad()
    def restore(self, state: tuple[torch.Tensor, torch.Tensor]) -> None:
        self.offset.copy_(state[0])
        self.factor.copy_(state[1])


@dataclass
class _FloatStream:
    """The float model's hidden states entering layer ``index`` (one tensor per calibration batch)."""

    index: int
    hidden: list[torch.Tensor]


def float_targets(
    ctx: LayerContext, config: WeightQuantConfig, states: tuple[list[torch.Tensor], list[torch.Tensor]] | None = None
) -> list[torch.Tensor] | None:
    """What the refined layer must reproduce, one tensor per calibration batch, computed before quantizing;
    None when refinement is off.

    ``quantized_input``: the float layer on this layer's own (quantized-prefix) inputs. ``float_input``: the
    float layer on the float model's hidden states (:func:`float_states`; pass ``states`` when the stage took
    them already), so a layer's refinement also corrects the error the quantized layers before it left.
    """
    if config.refine_iters == 0:
        return None
    if config.refine_target == "quantized_input":
        return ctx.forward()
    return (states or float_states(ctx, config))[1]


def float_states(ctx: LayerContext, config: WeightQuantConfig) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """(the float model's hidden states entering this layer, the float layer's output on them), one tensor per
    calibration batch; call it before the stage changes the layer, once per layer.

    The stream is carried from layer to layer beside the engine's quantized-prefix one, in ``ctx.run.plans``
    (layer 0: the captured inputs; layer i + 1: layer i's outputs here). A stream that is missing past layer 0 (a
    run resumed from a checkpoint) starts again from this layer's inputs, with a warning.
    """
    streams = ctx.run.plans.setdefault(_STREAMS, {})
    stream = streams.pop(id(config), None)
    if stream is None or stream.index != ctx.index:
        if ctx.index > 0:
            log.warning("%s: the float model's hidden states are missing (resumed run?); they restart from this "
                        "layer's inputs", ctx.prefix)
        stream = _FloatStream(ctx.index, [batch.hidden for batch in ctx.inputs])
    with torch.no_grad():
        outputs = [_first(ctx.layer(hidden, **batch.kwargs))
                   for hidden, batch in zip(stream.hidden, ctx.inputs, strict=True)]
    if ctx.index + 1 < len(ctx.adapter.layers()):
        streams[id(config)] = _FloatStream(ctx.index + 1, outputs)
    elif not streams:
        del ctx.run.plans[_STREAMS]
    return stream.hidden, outputs


def layer_weights(ctx: LayerContext, config: WeightQuantConfig) -> dict[str, torch.Tensor]:
    """Full path -> weight tensor of every linear of this layer the stage targets, taken before it quantizes them
    (the write-back gives each module a new tensor, so these keep the original values)."""
    return dict(claim_linear(ctx, name) for _, names in targeted_groups(ctx, config) for name in names)


def shared_across_processes(values: dict[str, torch.Tensor | None],
                            like: dict[str, torch.Tensor]) -> dict[str, torch.Tensor | None]:
    """``values`` (path -> a tensor shaped as ``like[path]``) completed from every process: data-parallel, each
    linear is solved by one process, which alone holds what its solve rounded; the others hold None."""
    if not is_distributed():
        assert all(value is not None for value in values.values()), "a solved linear without its rounded values"
        return values
    parts = [torch.zeros(like[path].shape) if value is None else value.float() for path, value in values.items()]
    return dict(zip(values, _summed_over_processes(parts), strict=True))


def _summed_over_processes(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """Each of ``tensors`` summed over every process (in float64, one all-reduce), in its own shape and dtype."""
    total = all_reduce_sum_float64(torch.cat([tensor.reshape(-1) for tensor in tensors]))
    pieces = total.split([tensor.numel() for tensor in tensors])
    return [piece.view(tensor.shape).to(tensor.dtype) for tensor, piece in zip(tensors, pieces, strict=True)]


def _first(out: Any) -> torch.Tensor:
    """A decoder layer's hidden states (some families return a tuple)."""
    return out[0] if isinstance(out, tuple) else out


def refine_layer(
    ctx: LayerContext,
    config: WeightQuantConfig,
    targets: list[torch.Tensor],
    rounded: dict[str, torch.Tensor | None],
    records: list[LayerRecord],
) -> None:
    """Refine the linears in ``rounded`` (full path -> the values their codes rounded), update the results.

    ``targets``: :func:`float_targets`. Writes ``ctx.run.quantized`` and the module weights, and puts the
    layer's output MSE before and after into ``records``' ``extra["refine"]`` (a note would read as a warning;
    ``rel_error`` stays the stage's own, from its Hessian).
    """
    if not rounded:
        return
    start = time.perf_counter()
    ctx.thaw()  # replayed sublayers would hide the changes from the forward
    prefix = ctx.prefix + "."
    modules = [_Refined.start(path.removeprefix(prefix), ctx.run.quantized[path], value)
               for path, value in rounded.items()]
    starting = [module.snapshot() for module in modules]
    low = _low_precision(ctx, config)
    with torch.autocast(ctx.run.device.type, dtype=torch.bfloat16, enabled=low):
        initial = _sequence_losses(ctx, modules, targets, config.refine_loss)
        best = _signed_descent(ctx, config, modules, targets, initial)
        final = initial
        if best is not None:
            _restore(modules, best)
            final = _sequence_losses(ctx, modules, targets, config.refine_loss)
    before, after, count = _global_sums(initial.sum(), final.sum(), sum(t.numel() for t in targets))
    if best is None or after >= before:  # a running estimate can mislead: never end above the start
        _restore(modules, starting)
        after = before
    _write_back(ctx, modules)
    summary = {"steps": config.refine_iters, "loss": config.refine_loss, "dtype": "bfloat16" if low else "float32",
               "layer_mse_before": before / count, "layer_mse_after": after / count}
    share = (time.perf_counter() - start) / len(rounded)
    for record in records:
        if record.module in rounded:
            record.extra["refine"] = summary
            record.seconds += share


def _low_precision(ctx: LayerContext, config: WeightQuantConfig) -> bool:
    """Whether the refinement's forwards run under bfloat16 autocast (``refine_dtype``; ``auto``: where bfloat16 is
    fast). The whole-set losses that accept the result are measured the same way as the steps' (consistent
    ratios; the report says which); the codes, scales and learned parameters are float32 either way."""
    if config.refine_dtype == "auto":
        return fast_bfloat16(ctx.run.device)
    return config.refine_dtype == "bfloat16"


def _restore(modules: list[_Refined], states: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
    for module, state in zip(modules, states, strict=True):
        module.restore(state)


def _signed_descent(
    ctx: LayerContext, config: WeightQuantConfig, modules: list[_Refined], targets: list[torch.Tensor],
    initial: torch.Tensor,
) -> list[tuple[torch.Tensor, torch.Tensor]] | None:
    """Run the steps; the parameters of the step with the lowest loss relative to the start (None: no step beat
    the start). ``initial: [n_sequences]`` each sequence's starting squared error."""
    steps = config.refine_iters
    lr = config.refine_lr if config.refine_lr is not None else 1.0 / steps
    generator = torch.Generator().manual_seed(ctx.index)
    chunks = _chunks(ctx.inputs, config.refine_batch, generator)
    params = [p for module in modules for p in (module.offset, module.factor)]
    best, best_ratio = None, 1.0
    for step in range(steps):
        chunk = next(chunks)
        with torch.enable_grad():
            weights = _weights(ctx.layer, modules)  # once per step, shared by the step's batches
            loss = sum((_chunk_error(ctx, weights, targets, index, rows, config.refine_loss)
                        for index, rows in chunk), torch.zeros(()))
        rows_here = [_flat(ctx.inputs, index, rows) for index, rows in chunk]
        reference = float(initial[torch.cat(rows_here)].sum()) if rows_here else 0.0
        step_loss, reference = _global_sums(loss.detach(), reference)
        ratio = step_loss / reference if reference > 0 else 1.0
        if ratio < best_ratio:
            best, best_ratio = [module.snapshot() for module in modules], ratio
        grads = _summed_gradients(loss, params)
        step_lr = decayed_lr(lr, step, steps)
        with torch.no_grad():
            for module, g_offset, g_factor in zip(modules, grads[0::2], grads[1::2], strict=True):
                if g_offset is not None:
                    module.offset.copy_(signed_step(module.offset, g_offset, step_lr, -OFFSET_LIMIT, OFFSET_LIMIT))
                if g_factor is not None:
                    module.factor.copy_(signed_step(module.factor, g_factor, step_lr, *FACTOR_RANGE))
    return best


def _global_sums(*values: torch.Tensor | float) -> list[float]:
    """``values`` summed over every process (as given in one process, where nothing needs adding)."""
    if not is_distributed():
        return [float(value) for value in values]
    return all_reduce_sum_float64(torch.tensor([float(value) for value in values])).tolist()


def _summed_gradients(loss: torch.Tensor, params: list[torch.Tensor]) -> list[torch.Tensor | None]:
    """d ``loss`` / d ``params``, summed over every process's share of the step's sequences.

    Data-parallel, each process holds part of the step (possibly none of it); the sum, taken in float64, is the
    gradient one process would take on the whole step, and every process applies the same signed step to it.
    """
    grads: list[torch.Tensor | None] = (list(torch.autograd.grad(loss, params, allow_unused=True))
                                        if loss.requires_grad else [None] * len(params))
    if not is_distributed():
        return grads
    return list(_summed_over_processes([torch.zeros_like(p) if g is None else g for p, g in zip(params, grads,
                                                                                            strict=True)]))


def _chunks(inputs: list[CapturedBatch], size: int, generator: torch.Generator) -> Any:
    """Endless steps of ``size`` sequences each, a fresh shuffle of all sequences per epoch, grouped by batch.

    Data-parallel, the shuffle is of every process's sequences (each process holds a contiguous share of them,
    in rank order), and each process gets its own part of each step: together they take one process's steps.
    """
    counts = [batch.hidden.shape[0] for batch in inputs]
    owner = torch.repeat_interleave(torch.arange(len(counts)), torch.tensor(counts))
    row = torch.cat([torch.arange(c) for c in counts])
    first, total = _share_of_sequences(len(owner))
    while True:
        order = torch.randperm(total, generator=generator)
        for begin in range(0, total, size):
            picked = order[begin : begin + size]
            picked = picked[(picked >= first) & (picked < first + len(owner))] - first
            yield [(int(b), torch.sort(row[picked[owner[picked] == b]]).values)
                   for b in torch.unique(owner[picked])]


def _share_of_sequences(count: int) -> tuple[int, int]:
    """(index of this process's first sequence among all processes', all processes' sequence count)."""
    if not is_distributed():
        return 0, count
    counts = torch.zeros(world_size(), dtype=torch.float64)
    counts[rank()] = count
    counts = all_reduce_sum_float64(counts).long()
    return int(counts[: rank()].sum()), int(counts.sum())


def _flat(inputs: list[CapturedBatch], index: int, rows: torch.Tensor) -> torch.Tensor:
    """Positions of batch ``index``'s ``rows`` among all sequences."""
    return sum(batch.hidden.shape[0] for batch in inputs[:index]) + rows


def _chunk_error(ctx: LayerContext, weights: dict[str, torch.Tensor], targets: list[torch.Tensor], index: int,
                 rows: torch.Tensor, loss: str) -> torch.Tensor:
    """Summed squared error of the layer's output on ``rows`` of batch ``index`` (differentiable)."""
    batch = ctx.inputs[index]
    size = batch.hidden.shape[0]
    out = _forward(ctx.layer, weights, batch.hidden[rows], _take_rows(batch.kwargs, rows, size))
    return output_error(out, targets[index][rows], loss).sum()


@torch.no_grad()
def _sequence_losses(ctx: LayerContext, modules: list[_Refined], targets: list[torch.Tensor],
                     loss: str) -> torch.Tensor:
    """Each calibration sequence's summed squared error at the current parameters, ``[n_sequences]``."""
    losses = []
    weights = _weights(ctx.layer, modules)
    for batch, target in zip(ctx.inputs, targets, strict=True):
        out = _forward(ctx.layer, weights, batch.hidden, batch.kwargs)
        losses.append(output_error(out, target, loss))
    return torch.cat(losses)


def _weights(layer: nn.Module, modules: list[_Refined]) -> dict[str, torch.Tensor]:
    """Every refined linear's current (differentiable) weight, keyed for ``functional_call``."""
    weights = {}
    for module in modules:
        linear = layer.get_submodule(module.name)
        assert isinstance(linear, nn.Linear)
        weights[f"{module.name}.weight"] = module.weight().to(linear.weight.dtype)
    return weights


def _forward(layer: nn.Module, weights: dict[str, torch.Tensor], hidden: torch.Tensor,
             kwargs: dict[str, Any]) -> torch.Tensor:
    """The layer with the refined linears' weights replaced by ``weights`` (:func:`_weights`)."""
    out = functional_call(layer, weights, (hidden,), kwargs)
    return out[0] if isinstance(out, tuple) else out


def _take_rows(value: Any, rows: torch.Tensor, size: int) -> Any:
    """``value`` (a layer kwarg) restricted to batch ``rows``: tensors of 2+ dims whose first dim is the batch
    (attention masks, per-sequence positions); shared ones (first dim 1, 1-D cache positions) stay whole."""
    if isinstance(value, torch.Tensor):
        return value[rows] if size > 1 and value.dim() >= 2 and value.shape[0] == size else value
    if isinstance(value, dict):
        return {key: _take_rows(item, rows, size) for key, item in value.items()}
    if isinstance(value, (tuple, list)):
        return type(value)(_take_rows(item, rows, size) for item in value)
    return value


def _write_back(ctx: LayerContext, modules: list[_Refined]) -> None:
    """The refined codes and scales into ``run.quantized`` and the modules' weights (exactly the dequantized)."""
    for module in modules:
        qweight = module.result()
        linear = ctx.module(module.name)
        assert isinstance(linear, nn.Linear)
        linear.weight.data = qweight.dequantize(linear.weight.dtype)
        ctx.run.quantized[ctx.path(module.name)] = qweight
