"""DGQ: dual-grained W4A8 (and W8A8) quantization with INT8 activations (ilur98/DGQ; math in ``dgq_ops.py``).

Per decoder layer: optional SmoothQuant smoothing of the inputs of attention and MLP (scales folded into the norm
before them), then linear group by group in data-flow order: the group's Hessian, the scale search (channel
scales; the rtn solver's integer group scales too), GPTQ error feedback fitting each group's integer scale on the
fed-back weights (or plain rounding at the searched scales), and the linear replaced by an :class:`Int8Linear` at
once, so later groups and later layers are calibrated on the INT8 arithmetic they will see, and the model's
forward afterwards (evaluation included) runs INT8 activations.

Under torchrun (``compressor.distributed``) every calibration statistic it reads is the whole set's: the Hessians
are the engine's float64 sums over every process's batches, and the smoothing's per-channel ``max |x|`` is
all-reduced with MAX (exact, whatever the split). The activation clip (``act_percentile``) is per token over its
own channels, taken at run time, not a statistic of the calibration set. Each group's per-linear searches and
solves are split between the processes (``ctx.solve_each``) and every process writes the same results back.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Literal

import torch
import torch.distributed as dist
from pydantic import Field, field_validator, model_validator
from torch import nn

from compressor.distributed import Job, is_distributed
from compressor.errors import ExportError, NumericalError
from compressor.methods.base import GroupSize, LayerRecord, Method, MethodConfig, TargetedConfig
from compressor.methods.quant.common import claim_linear, targeted_groups
from compressor.methods.quant.dgq_ops import (
    SCALE_SIGNIFICAND_BITS,
    DualGrainedWeight,
    fold_into_norm,
    gptq_dual_grained,
    output_error,
    quantize_dual_grained,
    search_channel_scale,
    search_int_scales,
    smoothing_scales,
    stored_scale_bits,
)
from compressor.methods.quant.int8_linear import Int8Linear
from compressor.methods.quant.ops import effective_group_size
from compressor.methods.registry import register_method

if TYPE_CHECKING:
    from compressor.engine import LayerContext
    from compressor.models.base import LinearGroup

log = logging.getLogger(__name__)


class DGQConfig(TargetedConfig):
    """Dual-grained weights (INT4 groups with integer scales under one float scale per channel) or INT8
    per-channel weights, and per-token INT8 activations.

    ```yaml
    - method: dgq
      targets: [Linear]
      ignore: [lm_head]
      weight_bits: 4        # 8 = W8A8 (per-channel INT8 weights)
      group_size: 128       # INT4 groups; W8A8 is per channel
      solver: gptq          # or rtn: rounding at the two-phase searched scales, no error feedback
      act_order: true       # gptq solver: columns by descending diag(H), groups stay contiguous
      act_percentile: 100   # per-token clip at this percentile of |x| (100 = max, no clipping)
      smoothing: 0.5        # SmoothQuant alpha folded into the norms; null = off
    ```
    ``export: {format: compressed-tensors}`` stores W4A8 as ``pack-quantized`` (group scales = integer scale x
    channel scale, exact in the model dtype: in bf16/fp16 the channel scales keep fewer significant bits for that)
    and W8A8 as ``int-quantized``, both with INT8 per-token input activations (``act_percentile`` must be 100
    there); ``compressor-int8`` keeps both scale levels and the clip, and ``compressor.load`` rebuilds this INT8
    model exactly; ``dense`` stores the dequantized weights only (float activations).
    """

    weight_bits: Literal[4, 8] = Field(4, description="4: dual-grained W4A8 (DGQ); 8: INT8 per-channel W8A8.")
    group_size: GroupSize | None = Field(
        None,
        description="Columns per INT4 group (default 128; a width it does not divide gets the largest power-of-two "
        "divisor below it, reported). W8A8 weights are per channel: leave it unset or -1.",
    )
    solver: Literal["gptq", "rtn"] = Field(
        "gptq",
        description="gptq: GPTQ error feedback at the searched channel scales, each group's integer scale fitted "
        "on the fed-back weights; rtn: nearest codes at the two-phase searched scales.",
    )
    act_percentile: float = Field(
        100.0, description="Per-token activation clip: this percentile of |x| over the channels, in (0, 100]."
    )
    smoothing: float | None = Field(
        0.5, description="SmoothQuant alpha in [0, 1] (activation range moved into the weights); null = off."
    )
    act_order: bool = Field(
        True,
        description="GPTQ solver: columns by descending diag(H), groups kept contiguous (one decoder layer of the "
        "demo model alone: KL to dense 0.0064 against 0.0084 in layer 20, 0.0097 against 0.0107 in layer 11).",
    )
    dampening: float = Field(0.01, gt=0, lt=1, description="GPTQ solver: fraction of mean(diag H) added.")
    block_size: int = Field(128, ge=1, description="GPTQ solver: columns per lazy batch update.")

    @field_validator("act_percentile")
    @classmethod
    def _percentile(cls, value: float) -> float:
        if not 0 < value <= 100:
            raise ValueError(f"act_percentile must be in (0, 100], got {value}")
        return value

    @field_validator("smoothing")
    @classmethod
    def _alpha(cls, value: float | None) -> float | None:
        if value is not None and not 0 <= value <= 1:
            raise ValueError(f"smoothing must be an alpha in [0, 1] or null, got {value}")
        return value

    @model_validator(mode="before")
    @classmethod
    def _default_group_size(cls, data: object) -> object:
        """An unset group size is 128 for INT4 and per channel (-1) for INT8, so every reader sees the real one."""
        if isinstance(data, dict) and data.get("group_size") is None:
            return {**data, "group_size": -1 if data.get("weight_bits") == 8 else 128}
        return data

    @property
    def bits(self) -> int:
        """The weight bits, under the name the export checks read from every quantizing stage."""
        return self.weight_bits

    @property
    def symmetric(self) -> bool:
        """DGQ's weights are always symmetric (signed codes, no zero point)."""
        return True

    @model_validator(mode="after")
    def _per_channel_int8(self) -> DGQConfig:
        if self.weight_bits == 8 and self.group_size not in (None, -1):
            raise ValueError(f"group_size: weight_bits 8 (W8A8) is per channel; remove group_size {self.group_size}")
        return self

    def groups_for(self, columns: int) -> tuple[int, str]:
        """The group size for a linear with ``columns`` inputs (-1: per channel) and a note when not as asked."""
        asked = 128 if self.group_size is None else self.group_size
        if self.weight_bits == 8 or asked == -1:
            return -1, ""
        if asked >= columns:
            return -1, f"group_size {asked} covers all {columns} columns: per channel"
        size = effective_group_size(columns, asked)
        return size, "" if size == asked else f"group_size {asked} does not divide {columns} columns; used {size}"


@register_method("dgq")
class DGQ(Method):
    config_class = DGQConfig
    kind = "quant"
    #: The recipe's export format (``bind``): the per-module note says what a dense file loses.
    export_format = "dense"
    supports_distributed = True  # Hessians summed, smoothing maxima all-reduced, solves split (module docstring)

    @classmethod
    def check_recipe(cls, config: MethodConfig, later: list[MethodConfig], export_format: str) -> str | None:
        assert isinstance(config, DGQConfig)
        if export_format not in ("dense", "compressed-tensors", "compressor-int8"):
            return (f"dgq cannot be exported as {export_format} (it has no INT8-activation form, so the file would "
                    "load as a different model); use export: {format: compressed-tensors} (W4A8/W8A8), "
                    "compressor-int8 (compressor.load rebuilds the INT8 model exactly) or dense")
        if export_format == "compressed-tensors" and config.act_percentile != 100:
            return (f"act_percentile {config.act_percentile:g} cannot be stored in compressed-tensors (loaders scale "
                    "each token by its maximum); use act_percentile: 100, or export: {format: compressor-int8}")
        return None

    def bind(self, later: list[MethodConfig], export_format: str) -> None:
        self.export_format = export_format

    def apply(self, ctx: LayerContext) -> list[LayerRecord]:
        config = self.config
        assert isinstance(config, DGQConfig)
        groups = targeted_groups(ctx, config)
        targeted = {ctx.path(n) for _, names in groups for n in names}
        notes = _smooth(ctx, config, targeted) if config.smoothing is not None and targeted else {}
        records = []
        for group, names in groups:
            H = _hessian(ctx, group)
            weights = {name: claim_linear(ctx, name)[1] for name in names}
            # under torchrun each linear's search and solve runs on one process, its result sent to the others
            solved = ctx.solve_each([self._solve_job(ctx.path(name), config, W, H) for name, W in weights.items()])
            for (name, W), (weight, seconds, scale_note) in zip(weights.items(), solved, strict=True):
                records.append(self._write_back(ctx, config, name, W, H, weight, seconds,
                                                (scale_note, notes.get(ctx.path(name), ""))))
        return records

    def _solve_job(self, path: str, config: DGQConfig, W: torch.Tensor, H: torch.Tensor
                   ) -> Job[tuple[DualGrainedWeight, float, str]]:
        """The scale search and solve of one linear as a job: its integer form, seconds and scale note.

        A function of the weight and the summed Hessian only, so any process gives the same bits.
        """

        def solve() -> tuple[DualGrainedWeight, float, str]:
            start = time.perf_counter()
            bits, size = config.weight_bits, config.groups_for(W.shape[1])[0]
            scale_bits, scale_note = self._scale_bits(bits, W.dtype)
            channel, ints = search_channel_scale(W, H, bits, size, scale_bits=scale_bits)
            if config.solver == "gptq":  # fits each group's integer scale on its fed-back weights, so no phase 2
                try:
                    weight = gptq_dual_grained(W, H, channel, ints, bits, size, config.block_size,
                                               config.dampening, act_order=config.act_order)
                except ValueError as exc:
                    raise NumericalError(f"{path}: DGQ's GPTQ solver failed: {exc}") from exc
            else:
                ints = search_int_scales(W, H, channel, ints, bits, size)
                weight = quantize_dual_grained(W, channel, ints, bits, size)
            return weight, time.perf_counter() - start, scale_note

        return Job(float(W.shape[0] * W.shape[1] ** 2), solve)  # the search's and sweep's rows x cols^2

    def _write_back(self, ctx: LayerContext, config: DGQConfig, name: str, W: torch.Tensor, H: torch.Tensor,
                    weight: DualGrainedWeight, seconds: float, notes: tuple[str, str]) -> LayerRecord:
        """Swap the linear for its INT8 form, keep its codes and record it (on every process alike)."""
        path = ctx.path(name)
        start = time.perf_counter() - seconds
        _check_stored_scales(path, weight, W.dtype, self.export_format)
        module = ctx.module(name)
        assert isinstance(module, nn.Linear)
        ctx.layer.set_submodule(name, Int8Linear.from_linear(module, weight, config.act_percentile))
        ctx.run.quantized[path] = weight.to_quantized_weight()
        stored = ("INT8 activations are computed in memory (the report's perplexity) but not stored: the dense file "
                  "holds the dequantized weights and runs float activations"
                  if self.export_format == "dense" else "")
        scale_note, smooth_note = notes
        all_notes = (config.groups_for(W.shape[1])[1], smooth_note, scale_note, stored)
        record = _record(path, config, W, weight, H, start, "; ".join(n for n in all_notes if n))
        record.extra.update(ctx.adapter.module_facts(ctx.layer, name))
        return record

    def _scale_bits(self, bits: int, dtype: torch.dtype) -> tuple[int, str]:
        """Significant bits of the channel scales, and a note when fewer than usual.

        compressed-tensors stores each group scale ``u * s`` in the model dtype; in bf16/fp16 a 16-bit ``s`` would
        round there, and the file would no longer hold the INT8 model in memory. Coarser ``s`` (the search still
        picks among them) keeps every stored product exact: the file and the in-memory model are the same.
        """
        scale_bits = stored_scale_bits(bits, dtype)
        if self.export_format != "compressed-tensors" or scale_bits == SCALE_SIGNIFICAND_BITS:
            return SCALE_SIGNIFICAND_BITS, ""
        dtype_name = str(dtype).removeprefix("torch.")
        return scale_bits, (f"channel scales rounded to {scale_bits} significant bits so compressed-tensors stores the "
                            f"{dtype_name} group scales exactly")


def _check_stored_scales(path: str, weight: DualGrainedWeight, dtype: torch.dtype, export_format: str) -> None:
    """Refuse group scales the model dtype cannot hold exactly (float16's range) when compressed-tensors stores them."""
    if export_format != "compressed-tensors":
        return
    scale = weight.int_scale.float() * weight.channel_scale[:, None]
    if not torch.equal(scale.to(dtype).float(), scale):
        raise ExportError(f"{path}: a group scale ({float(scale.min()):.3g}..{float(scale.max()):.3g}) is not exact "
                          f"in {str(dtype).removeprefix('torch.')} (outside its normal range); use export format "
                          "compressor-int8, which stores float32 channel scales, or a bfloat16/float32 model")


def _hessian(ctx: LayerContext, group: LinearGroup) -> torch.Tensor:
    """The group's ``H = 2/n X^T X`` with the layer as it is now (earlier groups already INT8).

    No replay: the engine's replay keeps the projection module it saw, which this method replaces.
    """
    return ctx.hessian(group, replay=False)


def _smooth(ctx: LayerContext, config: DGQConfig, targeted: set[str]) -> dict[str, str]:
    """Fold SmoothQuant scales into the norm before attention and before the MLP; a note per smoothed linear.

    A branch is skipped (and said so) when something besides the adapter's input linears reads the norm's
    output (a MoE router), when the norm has no weight, or when a reader is already quantized.
    """
    assert config.smoothing is not None
    notes: dict[str, str] = {}
    layer, adapter = ctx.layer, ctx.adapter
    branches = [("attention", adapter.attention_norm(layer), adapter.attention_inputs(layer),
                 adapter.family.attention.inputs),
                ("mlp", adapter.mlp_norm(layer), adapter.mlp_inputs(layer), adapter.family.mlp.inputs)]
    for branch, norm, readers, declared in branches:
        paths = [ctx.path(_relative(layer, r)) for r in readers]
        if not targeted & set(paths):
            continue
        reason = _smoothing_blocker(ctx, norm, readers, declared, paths)
        if reason:
            log.warning("%s %s: no smoothing: %s", ctx.prefix, branch, reason)
            notes.update({p: f"not smoothed: {reason}" for p in paths})
            continue
        act = _input_absmax(ctx, readers[0])
        weight_max = torch.stack([r.weight.data.float().abs().amax(dim=0) for r in readers]).amax(dim=0)
        scales = smoothing_scales(act, weight_max, config.smoothing)
        _fold_norm(norm, scales, one_plus=adapter.family.norm == "rms_one_plus")
        for reader in readers:
            reader.weight.data = (reader.weight.data.float() * scales).to(reader.weight.dtype)
        notes.update({p: f"smoothed (alpha {config.smoothing:g}) into {branch} norm" for p in paths})
    return notes


def _fold_norm(norm: nn.Module, scales: torch.Tensor, one_plus: bool) -> None:
    """Divide the norm's output by ``scales`` through its weight (and LayerNorm's bias)."""
    norm_weight, norm_bias = norm.weight, getattr(norm, "bias", None)
    assert isinstance(norm_weight, torch.Tensor)
    weight, bias = fold_into_norm(norm_weight.data, None if norm_bias is None else norm_bias.data, scales, one_plus)
    norm_weight.data = weight
    if norm_bias is not None and bias is not None:
        norm_bias.data = bias


def _smoothing_blocker(
    ctx: LayerContext, norm: nn.Module, readers: list[nn.Linear], declared: tuple[str, ...], paths: list[str]
) -> str | None:
    """Why one branch's input cannot be smoothed, or None."""
    post_norm = ctx.adapter.pre_norm_blocker()
    if post_norm:
        return f"{post_norm}: the norm does not feed these linears"
    others = [n for n in declared if not any(ctx.module(n) is r for r in readers)]
    if others:
        return (f"{', '.join(others)} also reads the norm's output and is not one of its linears (a router): "
                "its input would change")
    if getattr(norm, "weight", None) is None:
        return "the norm has no weight to fold the scales into"
    done = [p for p in paths if p in ctx.run.quantized]
    if done:
        return f"{done[0]} was quantized by an earlier stage"
    return None


def _relative(layer: nn.Module, module: nn.Module) -> str:
    return next(name for name, m in layer.named_modules() if m is module)


def _input_absmax(ctx: LayerContext, module: nn.Module) -> torch.Tensor:
    """Per-channel ``max |x|`` of ``module``'s input over the calibration set: ``[in]`` float32.

    Under torchrun the maximum over every process's batches (an all-reduce with MAX: exact, whatever the split);
    every process calls it at the same point (each smooths the same branches).
    """
    state: dict[str, torch.Tensor] = {}

    def fold(x: torch.Tensor) -> None:
        batch = x.detach().float().abs().reshape(-1, x.shape[-1]).amax(dim=0)
        state["max"] = batch if "max" not in state else torch.maximum(state["max"], batch)

    ctx.collect_inputs(module, fold)
    if not is_distributed():
        return state["max"]
    assert isinstance(module, nn.Linear)
    # a process without batches adds nothing to the maximum (|x| >= 0)
    absmax = state.get("max", torch.zeros(module.in_features, device=module.weight.device))
    dist.all_reduce(absmax, op=dist.ReduceOp.MAX)
    return absmax


def _record(
    path: str, config: DGQConfig, W: torch.Tensor, weight: DualGrainedWeight, H: torch.Tensor, start: float,
    note: str,
) -> LayerRecord:
    """Relative output error ``sqrt(tr(dW H dW^T) / tr(W H W^T))``; bytes of codes, integer and channel scales."""
    dW = W.float() - weight.dequantize()
    den = float(output_error(W.float(), H).sum())
    rel = (float(output_error(dW, H).sum()) / den) ** 0.5 if den > 0 else 0.0
    out, columns = W.shape
    int_scale_bits = 0 if weight.bits == 8 else out * int(weight.int_scale.shape[1]) * 8
    return LayerRecord(
        module=path,
        method=config.method,
        bits=float(weight.bits),
        group_size=weight.group_size,
        params_before=W.numel(),
        params_after=W.numel(),
        bytes_before=W.numel() * W.element_size(),
        bytes_after=(out * columns * weight.bits + int_scale_bits + out * 16 + 7) // 8,
        rel_error=rel,
        seconds=time.perf_counter() - start,
        note=note,
        extra={"activation_bits": 8, "act_percentile": config.act_percentile, "solver": config.solver},
    )
