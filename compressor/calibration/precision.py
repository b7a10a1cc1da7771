"""Float16 overflow in calibration activations: found before a layer changes, and that layer run in float32.

float16 saturates at 65504. A layer whose activations pass that (large weights, outlier channels) turns them
into inf, and every statistic downstream (Hessians, scores, the next layer's inputs) into inf or NaN. Before any
stage touches a float16 layer, the engine runs its calibration batches through it once with hooks that look for
a non-finite output; when one appears (and the layer's inputs were finite), the whole layer (its statistics, the
methods' solves and its outputs) runs in float32, and goes back to float16 afterwards. Outputs that still fit
float16 are narrowed again before the next layer; outputs that do not keep the next layer in float32 as well.
Every report row of a widened layer says so. bfloat16 has float32's exponent range, so it overflows only where
float32 would too: only float16 layers are checked (the check costs one forward of each such layer).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from compressor.methods.base import LayerRecord

if TYPE_CHECKING:
    from compressor.engine import CapturedBatch, LayerContext

log = logging.getLogger(__name__)

CHECKED = torch.float16
WIDE = torch.float32


@contextmanager
def fitting_precision(ctx: LayerContext, records: list[LayerRecord]) -> Iterator[None]:
    """Run the block with ``ctx``'s layer in float32 when float16 would overflow; note it on the rows it adds.

    On exit the layer is back in its own dtype (the quantized weights rounded to it, as the model stores them).
    """
    dtype = _dtype(ctx.layer)
    reason = None if dtype != CHECKED else _overflow_reason(ctx)
    first = len(records)
    if reason is not None:
        note = f"float16 overflow ({reason}): this layer's statistics and solve ran in float32"
        log.warning("%s: %s", ctx.prefix, note)
        ctx.layer.to(WIDE)
        ctx.inputs = [_widened(batch) for batch in ctx.inputs]
    try:
        yield
    finally:
        if reason is not None:
            ctx.layer.to(dtype)
            for record in records[first:]:
                record.note = "; ".join(part for part in (record.note, note) if part)


def _dtype(layer: nn.Module) -> torch.dtype:
    floating = [p.dtype for p in layer.parameters() if p.is_floating_point()]
    return floating[0] if floating else WIDE


def _overflow_reason(ctx: LayerContext) -> str | None:
    """Why the layer needs float32, or None: its float32 inputs exceed float16, or a submodule's output overflows.

    Inputs a widened layer before produced in float32 are narrowed to float16 here when they fit.
    """
    if any(batch.hidden.dtype != CHECKED for batch in ctx.inputs):
        widest = max(float(batch.hidden.detach().abs().amax()) for batch in ctx.inputs)
        if widest > torch.finfo(CHECKED).max:
            return f"inputs reach {widest:.3g}, beyond float16's {torch.finfo(CHECKED).max:g}"
        ctx.inputs = [_narrowed(batch) for batch in ctx.inputs]
    return _first_overflow(ctx)


@torch.no_grad()
def _first_overflow(ctx: LayerContext) -> str | None:
    """Name of the first submodule (in execution order) with a non-finite float16 output on finite inputs."""
    if not all(bool(torch.isfinite(batch.hidden).all()) for batch in ctx.inputs):
        return None  # not an overflow of this layer: the engine's own checks name the cause
    found: list[str] = []

    def hook(name: str, _module: nn.Module, _args: Any, output: Any) -> None:
        if not found and any(not bool(torch.isfinite(t).all()) for t in _tensors(output)):
            found.append(name)

    handles = [module.register_forward_hook(lambda m, a, o, name=name: hook(name, m, a, o))
               for name, module in ctx.layer.named_modules() if name]
    try:
        for batch in ctx.inputs:
            ctx.layer(batch.hidden, **batch.kwargs)
            if found:
                return f"non-finite output of {found[0]}"
    finally:
        for handle in handles:
            handle.remove()
    return None


def _tensors(value: Any) -> Iterator[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        if value.is_floating_point():
            yield value
    elif isinstance(value, (tuple, list)):
        for item in value:
            yield from _tensors(item)


def _cast(value: Any, dtype: torch.dtype) -> Any:
    """``value`` with every floating tensor in it (also inside tuples, lists, dicts) cast to ``dtype``; new objects.

    The captured kwargs are shared between layers (one mask object for all), so nothing is changed in place.
    """
    if isinstance(value, torch.Tensor):
        return value.to(dtype) if value.is_floating_point() else value
    if isinstance(value, (tuple, list)):
        return type(value)(_cast(item, dtype) for item in value)
    if isinstance(value, dict):
        return {key: _cast(item, dtype) for key, item in value.items()}
    return value


def _widened(batch: CapturedBatch) -> CapturedBatch:
    return type(batch)(batch.hidden.to(WIDE), _cast(batch.kwargs, WIDE))


def _narrowed(batch: CapturedBatch) -> CapturedBatch:
    return type(batch)(batch.hidden.to(CHECKED), batch.kwargs)
