"""Block-wise rounding refinement (SignRound, Cheng et al. 2023) as pure functions on tensors.

A quantized weight is re-expressed in *level units* around the values its codes rounded:
``base = (q0 - zero) + frac`` with ``q0`` the starting codes and ``frac`` how far the rounded value sat from
its level, kept strictly inside ``(-1/2, 1/2)``, so ``round(base) + zero == q0`` exactly. For RTN the rounded
value is the weight itself (exactly SignRound's ``W / s``); for GPTQ it is the weight as updated by the errors
of the columns before it (``GPTQResult.rounded``), i.e. what GPTQ's own ``round`` saw. Optimising around the
dequantized weight instead (``frac = 0``) also reproduces the codes, but puts every weight in the middle of its
rounding bin, where signed steps of SignRound's size (at most ~1/2 in total) never flip a code; keeping the
fraction lets the weights GPTQ rounded narrowly flip first, as SignRound's do.

The learned parameters are a rounding offset per weight ``V`` in ``[-1/2, 1/2]`` and a scale factor per
(row, group) ``f`` in :data:`FACTOR_RANGE` (SignRound's min/max clipping, expressed on the fitted scale so
full-grid negative scales keep their sign):

    codes = clamp(round(base / f + V) + zero, 0, maxq)        w = scale * f * (codes - zero)

``round`` passes gradients straight through; the clamp stops them outside the grid. Each step moves every
parameter by ``lr`` against the sign of its gradient (signed gradient descent), ``lr`` decayed linearly to 0.
At ``V = 0, f = 1`` the codes and weights are exactly the starting ones.
"""

from __future__ import annotations

import torch

#: Bound of the rounding offsets (SignRound's).
OFFSET_LIMIT = 0.5
#: Bounds of the per-group scale factors. SignRound clips the min/max range to [0.5, 1]; a factor above 1 is
#: allowed too because the starting scale may already be searched (or clipped) below the group's range.
FACTOR_RANGE = (0.5, 1.5)
#: How far inside its rounding bin a starting value is kept, so rounding it gives back the starting code
#: (round-half-to-even would otherwise decide a value at exactly 1/2).
_INSIDE = 0.5 - 1e-3


def rounding_base(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor,
                  rounded: torch.Tensor | None) -> torch.Tensor:
    """Starting values in level units, ``[out, in]`` float32: ``(codes - zero) + frac`` with ``|frac| < 1/2``.

    ``codes: [out, in]`` the starting codes; ``scale``, ``zero``: ``[out, in]`` (each column's group expanded);
    ``rounded: [out, in]`` the values the codes rounded (None: ``frac = 0``, the middle of every bin). A value
    the grid clamped (beyond the outermost level) gets the bin edge on its side.
    """
    level = codes.float() - zero.float()
    if rounded is None:
        return level
    frac = torch.nan_to_num(rounded.float() / scale.float() - level)
    return level + frac.clamp(-_INSIDE, _INSIDE)


def ste_round(x: torch.Tensor) -> torch.Tensor:
    """``round(x)`` whose gradient is the identity (the straight-through estimator)."""
    return x + (torch.round(x) - x).detach()


def refined_codes(base: torch.Tensor, zero: torch.Tensor, maxq: torch.Tensor, offset: torch.Tensor,
                  factor: torch.Tensor) -> torch.Tensor:
    """``clamp(round(base / factor + offset) + zero, 0, maxq)``, float ``[out, in]``, differentiable (STE).

    ``zero``, ``factor``: ``[out, in]`` (per group, expanded); ``maxq``: broadcastable (``2**bits - 1`` of each
    column's group). Gradients pass where ``0 <= codes <= maxq`` before clamping (as ``torch.clamp``'s do).
    """
    codes = ste_round(base / factor + offset) + zero
    codes = torch.where(codes < 0, torch.zeros_like(codes), codes)
    return torch.where(codes > maxq, maxq.to(codes.dtype).expand_as(codes), codes)


def refined_weight(base: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, maxq: torch.Tensor,
                   offset: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """The dequantized weight ``scale * factor * (codes - zero)``, ``[out, in]`` float32, differentiable in
    ``offset`` and ``factor`` (shapes as in :func:`refined_codes`; ``scale: [out, in]``).

    The gradients are :func:`refined_codes`' straight-through ones, written out by hand (:class:`_RefinedWeight`)
    instead of autograd through the composed form's dozen full-size elementwise tensors: the demo model's seven
    linears of one layer took 29-41 ms per step forward and backward against 50-76 ms composed (2 threads); a whole
    refined run did not show the difference beyond its ~10% run-to-run noise."""
    return _RefinedWeight.apply(base, scale, zero, maxq, offset, factor)


class _RefinedWeight(torch.autograd.Function):
    """``w = scale * f * (clamp(round(base / f + V) + zero, 0, maxq) - zero)`` with the straight-through gradients
    ``dw/dV = scale * f * inside`` and ``dw/df = scale * (levels - inside * base / f)`` (``inside``: the code was
    within the grid before clamping; ``levels = codes - zero``)."""

    @staticmethod
    def forward(ctx: torch.autograd.function.FunctionCtx, base: torch.Tensor, scale: torch.Tensor,
                zero: torch.Tensor, maxq: torch.Tensor, offset: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
        codes = torch.round(base / factor + offset) + zero
        inside = (codes >= 0) & (codes <= maxq)
        levels = torch.minimum(codes.clamp_min(0), maxq.to(codes.dtype)) - zero
        ctx.save_for_backward(base, scale, factor, levels, inside)
        return scale * factor * levels

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        base, scale, factor, levels, inside = ctx.saved_tensors  # type: ignore[attr-defined]
        scaled = grad * scale
        through = torch.where(inside, scaled, 0.0)
        return None, None, None, None, through * factor, scaled * levels - through * base / factor


def output_error(out: torch.Tensor, target: torch.Tensor, loss: str) -> torch.Tensor:
    """Each sequence's summed squared error of a layer output, ``[batch]`` float32 (differentiable in ``out``).

    ``out``, ``target``: ``[batch, seq, hidden]``. ``mse``: plain squared error (SignRound's). ``normalized``:
    each token's squared error divided by its target's mean square, i.e. the error as the RMSNorm of the next
    layer (and the final norm) sees it, to first order: the residual stream's massive activations (a few tokens
    with |x| in the thousands) otherwise outweigh every other token's error.
    """
    diff = (out.float() - target.float()).square()
    if loss == "normalized":
        diff = diff / target.float().square().mean(-1, keepdim=True).clamp_min(1e-12)
    return diff.flatten(1).sum(1)


def signed_step(param: torch.Tensor, grad: torch.Tensor, lr: float, low: float, high: float) -> torch.Tensor:
    """One signed-gradient step, ``clamp(param - lr * sign(grad), low, high)`` (a new tensor)."""
    return torch.clamp(param - lr * torch.sign(grad), low, high)


def decayed_lr(lr: float, step: int, steps: int) -> float:
    """``lr`` decayed linearly from its full value at step 0 towards 0 at ``steps`` (auto-round's schedule)."""
    return lr * (1.0 - step / steps)
