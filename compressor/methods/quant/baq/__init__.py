"""BAQ: sensitivity-driven bit allocation under an average-bits budget (the allocation half of BAQ).

BAQ only plans. Its pass measures every targeted linear's column sensitivities from the calibration
Hessian (``ops.column_sensitivity``) without changing weights; after the last layer, ``finalize``
solves one global allocation (``ops.allocate_bits``) and hands it to the next quantizing stage through
``run.plans``: ``"bits"`` (``{module path: bits}``) for ``granularity: module``, ``"group_bits"``
(``{module path: int64 tensor [n_groups]}``) for ``group`` and ``column``. Being model-level, the
stages after it get a fresh pass.

One home per knob. The quantizer BAQ plans for (the first ``rtn``/``gptq`` stage after it) owns
``group_size``, ``act_order`` and ``dampening``; BAQ reads them from that stage (``bind``, called by
``compressor.recipe.build_stages``), so the modelled groups and sweep are always the quantizer's.
The plan is keyed by module path: the recipe allows no pruning stage between BAQ and its quantizer,
and the quantizer refuses a plan that does not name exactly the modules it targets.

Objective. The loss model (``ops``) predicts each module's output error ``tr(dW H dW^T)``. Summing it
raw across modules (``objective: absolute``) favours modules with large activations: on SmolLM2 it put
the first layers at 2 bits and the last ``down_proj`` at 8, and BAQ+RTN at 3.0 bits scored ppl 2560.
``relative`` divides each module's loss by its output energy ``tr(W H W^T)``, so every module is
weighed by its relative output error, as the reference implementation does by scaling its loss level
with that trace per module. Both are layer-local: across modules neither says how much the final loss
cares (at 3 bits with one width per linear, relative scored ppl 206 against 94 for uniform GPTQ).
The default, ``fisher``, weighs every output channel's error by its mean squared loss gradient
(``calibration/fisher.py``), a second-order estimate of the loss rise, at the price of one forward and backward pass
of the whole model (ppl 57.9 at the same 3 bits; README has the table). So only the layer-local objectives stream
(``compressor.streaming``: this pass then measures each layer as it is loaded, and finalize reads nothing else).
Under torchrun (``compressor.distributed``) every objective reads the whole calibration set: the Hessians are the
engine's float64 sums over every process's batches and fisher's squared gradients are summed with their token
counts (``calibration/fisher.py``), so every process measures, allocates and plans the same bits.

Granularity and the stored forms:
- ``module``: one width per linear. Stores as compressed-tensors with one config group per width. For
  that export the linears a serving engine fuses (``adapter.fused_groups()``: q/k/v, gate/up) are one
  unit with one width (their sensitivities and sizes summed): vLLM applies one scheme per fused layer.
- ``group``: one width per quantizer group of ``group_size`` columns. Dense (fake-quantized) export only.
- ``column``: the paper's per-column closed form (every column at the same loss level), pooled into
  the quantizer's groups: a group starts from the mean of its columns' widths, and rounding and the
  budget work on groups. No format here stores a width per column with group-shared scales, so the
  per-column widths cannot be kept as such; under the additive loss model ``group`` is the optimum for
  group-stored widths, and ``column`` is there to compare with the paper's rule. Dense export only.
"""

from __future__ import annotations

import logging
import math
import time
from typing import TYPE_CHECKING, ClassVar, Literal

import torch
from pydantic import Field, ValidationError, ValidationInfo, field_validator, model_validator
from torch import nn

from compressor.calibration.fisher import output_fisher
from compressor.errors import RecipeError
from compressor.methods.base import LayerRecord, Method, MethodConfig, TargetedConfig
from compressor.methods.quant.baq.ops import (
    allocate_bits,
    column_weight,
    predicted_loss,
    range_sensitivity,
    row_energy,
)
from compressor.methods.quant.baq.units import Measured, allocation_units
from compressor.methods.quant.common import WeightQuantConfig, targeted_groups, targeted_linears
from compressor.methods.quant.gguf_schemes import validate_gguf
from compressor.methods.quant.ops import effective_group_size
from compressor.methods.registry import get_method, register_method

if TYPE_CHECKING:
    from compressor.engine import LayerContext, ModelContext

log = logging.getLogger(__name__)

#: Knobs of the quantizer BAQ plans for; BAQ reads them there (``_QuantizerModel``).
_QUANTIZER_KNOBS = ("group_size", "act_order", "dampening")
#: Dampening modelled for a quantizer without one (rtn with error_feedback: true): GPTQ's default.
_DAMPENING = 0.01
#: Exports whose consumers fuse ``adapter.fused_groups()`` into one layer with one scheme (vLLM).
_FUSING_EXPORTS = ("compressed-tensors",)


class BAQConfig(TargetedConfig):
    """Bit allocation for the quantizing stage that follows (gptq or rtn).

    ```yaml
    - method: baq
      targets: [Linear]
      ignore: [lm_head]
      avg_bits: 3.0              # parameter-weighted average over the targeted linears
      candidates: [2, 3, 4, 8]   # widths a unit may get
      granularity: module        # module | group | column
      error_feedback: true       # false: model plain rounding (rtn) instead of GPTQ's sweep
      objective: fisher          # each output channel's error times its loss gradient^2; relative, channel, absolute
    - method: gptq               # the stage BAQ plans for: its widths come from the plan
      targets: [Linear]          # the same modules as baq's
      ignore: [lm_head]
      group_size: 128            # BAQ models these groups (the unit for granularity group/column),
      act_order: true            # this column order
      dampening: 0.01            # and this dampening
    ```
    ``group_size``, ``act_order`` and ``dampening`` are the quantizer's (one home): BAQ reads them from the
    stage it plans for and refuses them in its own stage.
    """

    #: 2: group_size, act_order and dampening moved to the quantizing stage.
    version: ClassVar[int] = 2

    candidates: list[int] = Field(default_factory=lambda: [2, 3, 4, 8], description="Allowed widths, each 2..8.")
    avg_bits: float = Field(3.0, description="Budget: average bits per targeted weight, within the candidates.")
    granularity: Literal["module", "group", "column"] = Field(
        "module", description="Unit that gets one width: a linear, a quantizer group, or a column (pooled)."
    )
    error_feedback: bool = Field(True, description="Sensitivity with GPTQ's error feedback (1/d^2) or without (H_jj).")
    objective: Literal["relative", "channel", "absolute", "fisher"] = Field(
        "fisher",
        description="What the allocation minimises: the sum over every module's output channels of each "
        "channel's relative error (channel), each module's relative error tr(dW H dW^T) / tr(W H W^T) "
        "(relative), the summed output error (absolute), or the predicted rise of the calibration loss, "
        "every output channel's error weighted by its mean squared loss gradient (fisher, the default: one "
        "extra forward and backward pass with the whole model in memory).",
    )

    budget: Literal["model", "module"] = Field(
        "model",
        description="Where avg_bits must hold: over all targeted weights together (model: modules compete for "
        "bits), or inside every module (module: bits move only between one module's groups or columns, the "
        "paper's layer-wise allocation; needs granularity group or column).",
    )

    @model_validator(mode="before")
    @classmethod
    def _quantizer_knobs_live_in_the_quantizer(cls, data: object) -> object:
        moved = [k for k in _QUANTIZER_KNOBS if isinstance(data, dict) and k in data]
        if moved:
            raise ValueError(f"{', '.join(moved)}: baq takes these from the quantizing stage it plans for (the "
                             "gptq/rtn stage after it); set them there and remove them here")
        return data

    @field_validator("candidates")
    @classmethod
    def _candidates_valid(cls, value: list[int]) -> list[int]:
        if not value:
            raise ValueError("candidates must list at least one bit width")
        bad = [b for b in value if not 2 <= b <= 8]
        if bad:
            raise ValueError(f"candidates must each be between 2 and 8, got {bad}")
        return sorted(set(value))

    @field_validator("avg_bits")
    @classmethod
    def _avg_in_range(cls, value: float, info: ValidationInfo) -> float:
        candidates = info.data.get("candidates")
        if candidates and not min(candidates) <= value <= max(candidates):
            raise ValueError(f"avg_bits must lie within the candidates [{min(candidates)}, {max(candidates)}], "
                             f"got {value}")
        return value

    @model_validator(mode="after")
    def _module_budget_needs_finer_units(self) -> BAQConfig:
        if self.budget == "module" and self.granularity == "module":
            raise ValueError("budget 'module' keeps every module at avg_bits, so granularity module would be "
                             "uniform: use granularity group or column, or budget model")
        return self


@register_method("baq")
class BAQ(Method):
    config_class = BAQConfig
    kind = "allocate"
    model_level = True
    supports_distributed = True  # Hessians and fisher's gradients are summed over the processes

    def __init__(self, config: MethodConfig) -> None:
        super().__init__(config)
        #: Filled layer by layer, reset by ``prepare``; kept after ``finalize`` so that other budgets can be
        #: allocated from one measuring pass (benchmarks/baq.py does).
        self.measured: list[Measured] = []
        self.fisher: dict[str, torch.Tensor] = {}
        #: The stage the plan is for and the export format, from ``bind``.
        self.quantizer: WeightQuantConfig | None = None
        self.export_format = "dense"

    @classmethod
    def check_recipe(cls, config: MethodConfig, later: list[MethodConfig], export_format: str) -> str | None:
        assert isinstance(config, BAQConfig)
        quant = next((s for s in later if get_method(s.method).kind == "quant"), None)
        if quant is None:
            return None  # recipe.py says that a quantizer must follow
        if not isinstance(quant, WeightQuantConfig):
            return f"baq plans for integer weight quantizers (rtn, gptq), not {quant.method}"
        if export_format == "gguf":  # a module plan stores each module in its width's GGUF type
            for bits in config.candidates:
                problem = validate_gguf(bits, quant.group_size, quant.symmetric)
                if problem:
                    return f"baq candidate {bits} bits cannot be stored in gguf: {problem}"
        if config.granularity != "module":
            if export_format != "dense":
                return (f"baq granularity '{config.granularity}' gives each group its own width, which only the "
                        f"dense export stores; use granularity module for {export_format}")
            if not get_method(quant.method).per_group_bits:
                return f"{quant.method} cannot quantize with per-group widths; use baq granularity module"
        for bits in config.candidates:
            try:
                type(quant).model_validate({**quant.model_dump(), "bits": bits})
            except ValidationError as exc:
                reason = exc.errors()[0]["msg"].removeprefix("Value error, ")
                return f"baq candidate {bits} bits cannot be used by {quant.method}: {reason}"
        return None

    def bind(self, later: list[MethodConfig], export_format: str) -> None:
        """Plan for the first quantizing stage in ``later``, to be stored as ``export_format``."""
        problem = self.check_recipe(self.config, later, export_format)
        quant = next((s for s in later if get_method(s.method).kind == "quant"), None)
        if problem or not isinstance(quant, WeightQuantConfig):
            raise RecipeError(f"baq: {problem or 'it plans bits for a later quantizing stage, but none follows'}")
        self.quantizer, self.export_format = quant, export_format

    def _quantizer(self) -> WeightQuantConfig:
        if self.quantizer is None:
            raise RecipeError("baq does not know the quantizing stage it plans for: build the stages with "
                              "compressor.recipe.build_stages (or call BAQ.bind) before running them")
        return self.quantizer

    def _steps_short(self) -> int:
        """0 when the quantizer's grid has ``2^b`` steps per range (symmetric ``grid: full``), else 1."""
        quant = self._quantizer()
        return 0 if quant.symmetric and quant.grid != "restricted" else 1

    def runs_whole_model_first(self) -> bool:
        return getattr(self.config, "objective", None) == "fisher"

    def prepare(self, run: ModelContext) -> list[LayerRecord]:
        self.measured, self.fisher = [], {}
        config, quant = self.config, self._quantizer()
        assert isinstance(config, BAQConfig)
        if run.adapter.num_experts and self.export_format in _FUSING_EXPORTS:
            raise RecipeError(f"baq cannot plan widths for {run.adapter.family.name}'s experts stored as "
                              f"{self.export_format}: its loaders take one scheme for every expert; use rtn or gptq "
                              "alone, or format dense")
        paths = targeted_linears(run.adapter, config)
        theirs = targeted_linears(run.adapter, quant)
        if paths != theirs:
            odd = next(p for p in [*paths, *theirs] if (p in paths) != (p in theirs))
            who = "baq" if odd in paths else quant.method
            raise RecipeError(f"{odd}: only {who} targets it; give baq the same targets and ignore as the "
                              f"{quant.method} it plans for (every module it quantizes needs a planned width)")
        if config.objective == "fisher":
            start = time.perf_counter()
            self.fisher = output_fisher(run.model, run.batches(), set(paths))
            log.info("baq: loss gradients of %d linears in %.1f s", len(paths), time.perf_counter() - start)
        return []

    def apply(self, ctx: LayerContext) -> list[LayerRecord]:
        """Measure the targeted linears' column sensitivities; the layer is left unchanged."""
        config, quant = self.config, self._quantizer()
        assert isinstance(config, BAQConfig)
        groups = targeted_groups(ctx, config)
        if not groups:
            return []
        fused = {}
        if config.granularity == "module" and self.export_format in _FUSING_EXPORTS:
            fused = {name: (ctx.index, i) for i, group in enumerate(ctx.adapter.fused_groups()) for name in group.names}
        hessians = ctx.hessians([group for group, _ in groups])
        for group, names in groups:
            H = hessians[group]
            weight = column_weight(H, getattr(quant, "dampening", _DAMPENING), getattr(quant, "act_order", False),
                                   config.error_feedback)
            for name in names:
                module = ctx.module(name)
                assert isinstance(module, nn.Linear)
                W = module.weight.data.float()
                size = effective_group_size(W.shape[1], quant.group_size)
                size = W.shape[1] if size <= 0 else size
                energy = row_energy(W, H)
                inverse = torch.where(energy > 0, 1 / energy.clamp(min=1e-300), torch.zeros_like(energy))
                s = range_sensitivity(W, weight, size)
                per_channel = range_sensitivity(W, weight, size, inverse)
                fisher = self.fisher.get(ctx.path(name))
                by_loss = None if fisher is None else range_sensitivity(W, weight, size, fisher.to(W.device)).cpu()
                self.measured.append(Measured(ctx.path(name), ctx.index, name, W.shape[0], size, s.cpu(),
                                              float(energy.sum()), per_channel.cpu(), by_loss, fused.get(name)))
        return []

    def finalize(self, run: ModelContext) -> list[LayerRecord]:
        """Allocate globally, write the plan for the next quantizer, and report one row per module."""
        config = self.config
        assert isinstance(config, BAQConfig)
        if not self.measured:
            return []
        if config.budget == "model":
            S, sizes, pool, spans = allocation_units(self.measured, config.granularity, config.objective)
            bits = allocate_bits(S, sizes, config.candidates, config.avg_bits, pool, self._steps_short())
        else:  # every module on its own budget (relative and absolute then agree; channel, fisher weigh rows)
            parts = []
            for m in self.measured:
                S, sizes, pool, _ = allocation_units([m], config.granularity, config.objective)
                parts.append(allocate_bits(S, sizes, config.candidates, config.avg_bits, pool, self._steps_short()))
            bits, spans, unit = torch.cat(parts), [], 0
            for part in parts:
                spans.append((unit, unit + len(part)))
                unit += len(part)
        records, total_bits, total_params = [], 0, 0
        for m, (start, stop) in zip(self.measured, spans, strict=True):
            b = bits[start:stop]
            s = m.sensitivity.reshape(len(b), -1).sum(dim=1)
            if config.granularity == "module":
                run.plans.setdefault("bits", {})[m.path] = int(b[0])
            else:
                run.plans.setdefault("group_bits", {})[m.path] = b.clone()
            records.append(self._record(m, b, float(predicted_loss(s, b, self._steps_short()).sum())))
            per_unit = m.rows * m.sensitivity.numel() // len(b)
            total_bits += int(b.sum()) * per_unit
            total_params += per_unit * len(b)
        log.info("baq: %d modules, average %.4f bits (budget %.4f)", len(records), total_bits / total_params,
                 config.avg_bits)
        return records

    def _record(self, m: Measured, bits: torch.Tensor, loss: float) -> LayerRecord:
        numel = m.rows * m.sensitivity.numel()
        mean = float(bits.double().mean())
        config = self.config
        assert isinstance(config, BAQConfig)
        extra: dict[str, object] = {
            "layer": m.layer,
            "name": m.name,
            "planned_bits": mean,
            "predicted_loss": loss,
            "predicted_rel_error": math.sqrt(loss / m.trace) if m.trace > 0 else None,
        }
        if config.granularity != "module":
            extra["bits_per_group"] = [int(b) for b in bits.tolist()]
        return LayerRecord(
            module=m.path,
            method="baq",
            bits=round(mean, 4),
            group_size=m.group if config.granularity != "module" else None,
            params_before=numel,
            params_after=numel,
            extra=extra,
        )
