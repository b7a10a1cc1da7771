"""GPTQ: second-order, column-by-column weight quantization (Frantar et al., 2022).

The math is in ``gptq_ops.py``; this module is the config and the translation from a decoder layer
to tensors: linears are solved group by group in data-flow order (q/k/v, o, gate/up, down) so each
group's Hessian comes from inputs produced by already-quantized predecessors.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import replace
from typing import TYPE_CHECKING

import torch
from pydantic import Field, field_validator

from compressor.calibration.capture import FloatReference
from compressor.errors import NumericalError
from compressor.methods.base import LayerRecord
from compressor.methods.quant.common import (
    AsymmetricCalibration,
    WeightQuantConfig,
    WeightQuantizer,
    quantize_layer_linears,
)
from compressor.methods.quant.gptq_ops import FitOn, GPTQResult, asymmetric_target, gptq_quantize
from compressor.methods.quant.ops import Grid, QuantizedWeight, ScaleSearch
from compressor.methods.quant.refine import (
    float_states,
    float_targets,
    layer_weights,
    refine_layer,
    shared_across_processes,
)
from compressor.methods.registry import register_method

if TYPE_CHECKING:
    from compressor.engine import LayerContext

log = logging.getLogger(__name__)

#: Solve the linears that read one input (q/k/v, gate/up) as one stacked weight: the same codes (rows are independent
#: given H; tests/unit/methods/quant/test_speed_exact.py), one Cholesky factor and one sweep, q/k/v about twice as
#: fast. Under torchrun each linear is solved alone instead, by the process that owns it
#: (common.quantize_layer_linears).
STACK_SHARED_INPUTS = True


class GPTQConfig(WeightQuantConfig):
    """GPTQ weight quantization.

    ```yaml
    - method: gptq
      targets: [Linear]
      ignore: [lm_head]
      bits: 4
      group_size: 128
      symmetric: true
      act_order: true     # columns by descending Hessian diagonal; static groups keep scales contiguous
      dampening: 0.01     # fraction of mean(diag H) added to the diagonal
      block_size: 128     # lazy-update block width
      grid: full              # or restricted / full_positive (see rtn)
      scale_search: weighted  # or none / mse (weighted by diag(H))
      fit_on: auto        # or original / sweep: when group scales are fitted
      asymmetric: 0       # > 0: fit the float model's outputs, not only the quantized prefix's (GPTAQ)
      refine_iters: 0     # > 0: SignRound-style block-wise refinement of the codes per decoder layer
      refine_batch: 2     # sequences per refinement step
    ```
    With ``refine_iters``, each layer's GPTQ codes are then refined around the values GPTQ rounded (see
    ``refine.py``): learned rounding offsets and group scale factors minimising the layer's output error.
    """

    grid: Grid = Field(
        "full",
        description="As rtn's grid; GPTQ defaults to full (measured on the demo model, W4 g64: ppl 27.83 with "
        "full + weighted against 31.18 restricted + none; W3 g128: 39.69 against 77.40).",
    )
    scale_search: ScaleSearch = Field(
        "weighted", description="As rtn's scale_search; GPTQ defaults to weighted, its Hessian holds diag(H)."
    )
    act_order: bool = Field(True, description="Quantize columns by descending diag(H) (static groups).")
    dampening: float = Field(0.01, gt=0, lt=1, description="Fraction of mean(diag H) added to the diagonal.")
    block_size: int = Field(128, ge=1, description="Columns per lazy batch update.")
    fit_on: FitOn = Field(
        "auto",
        description="When group scales are fitted: original (before the sweep, on the original weights), sweep "
        "(when the sweep reaches the group, on the error-updated weights) or auto (original with act_order, "
        "sweep without: the GPTQ reference).",
    )

    asymmetric: float = Field(
        0.0,
        ge=0,
        le=1,
        description="Asymmetric calibration (GPTAQ): each linear, fed the quantized layers' outputs, is fitted to "
        "what its float weights make of the float model's own inputs, so it also corrects the error the layers "
        "before it left. The value scales that correction (0: plain GPTQ; 1: the full least-squares target). "
        "Costs a float copy of each layer, the float model's hidden states beside the quantized ones and one "
        "more partial forward per group.",
    )

    @field_validator("bits")
    @classmethod
    def _storable_bits(cls, value: int) -> int:
        if value not in (2, 3, 4, 8):
            raise ValueError(f"gptq supports bits 2, 3, 4 or 8, got {value}")
        return value


@register_method("gptq")
class GPTQ(WeightQuantizer):
    config_class = GPTQConfig
    per_group_bits = True
    supports_distributed = True  # its Hessians are all-reduced, and the refinement's gradients

    def apply(self, ctx: LayerContext) -> list[LayerRecord]:
        config = self.config
        assert isinstance(config, GPTQConfig)
        asymmetric = reference = None
        states = float_states(ctx, config) if config.asymmetric > 0 else None  # before anything changes the layer
        if states is not None:
            reference = FloatReference(copy.deepcopy(ctx.layer), states[0])
        targets = float_targets(ctx, config, states)  # takes the float states itself when only it needs them
        originals = layer_weights(ctx, config) if targets is not None else {}
        rounded: dict[int, torch.Tensor] = {}  # storage of an original weight -> what GPTQ rounded (solved here)
        aimed: dict[int, int] = {}  # storage of a retargeted weight -> storage of its original
        if reference is not None:

            def retarget(W: torch.Tensor, H: torch.Tensor, D: torch.Tensor) -> torch.Tensor:
                target = asymmetric_target(W, H, D, config.dampening, config.asymmetric)
                aimed[target.data_ptr()] = W.data_ptr()
                return target

            asymmetric = AsymmetricCalibration(reference, retarget)

        def run(
            W: torch.Tensor, H: torch.Tensor, bits: int, group_size: int, bits_per_group: torch.Tensor | None = None
        ) -> GPTQResult:
            try:
                return gptq_quantize(
                    W, H, bits, group_size, config.symmetric, config.act_order, config.block_size,
                    config.dampening, bits_per_group=bits_per_group, grid=config.grid,
                    scale_search=config.scale_search, fit_on=config.fit_on, keep_rounded=targets is not None,
                )
            except ValueError as exc:
                raise NumericalError(f"{ctx.prefix}: GPTQ failed: {exc}") from exc

        def solve(
            W: torch.Tensor, H: torch.Tensor, bits: int, group_size: int, bits_per_group: torch.Tensor | None = None
        ) -> tuple[QuantizedWeight, str]:
            result = run(W, H, bits, group_size, bits_per_group)
            notes = _numerics_notes(W, config.dampening, result)
            if result.cholesky_retries:
                log.warning("%s: %s", ctx.prefix, notes[0])
            if targets is not None:
                assert result.rounded is not None
                rounded[aimed.pop(W.data_ptr(), W.data_ptr())] = result.rounded
            return result.qweight, "; ".join(notes)

        def solve_mixed(
            W: torch.Tensor, H: torch.Tensor, group_size: int, bits_per_group: torch.Tensor
        ) -> tuple[QuantizedWeight, str]:
            return solve(W, H, int(bits_per_group.max()), group_size, bits_per_group)

        def solve_joint(
            weights: list[torch.Tensor], H: torch.Tensor, bits: int, group_size: int
        ) -> list[tuple[QuantizedWeight, str]]:
            # Rows are independent given H: one factorisation and one sweep for q/k/v (or gate/up), same bits.
            result = run(torch.cat(weights), H, bits, group_size)
            if result.cholesky_retries:
                log.warning("%s: %s", ctx.prefix, _numerics_notes(weights[0], config.dampening, result)[0])
            parts, start = [], 0
            for W in weights:
                rows = slice(start, start + W.shape[0])
                start = rows.stop
                if targets is not None:
                    assert result.rounded is not None
                    rounded[aimed.pop(W.data_ptr(), W.data_ptr())] = result.rounded[rows]
                parts.append((_rows(result.qweight, rows), "; ".join(_numerics_notes(W, config.dampening, result))))
            return parts

        records = quantize_layer_linears(ctx, config, solve, sequential=True, solve_mixed=solve_mixed, plan=self.plan,
                                         solve_joint=solve_joint if STACK_SHARED_INPUTS else None,
                                         asymmetric=asymmetric)
        if targets is not None:
            solved = {r.module: rounded.get(originals[r.module].data_ptr()) for r in records}
            refine_layer(ctx, config, targets, shared_across_processes(solved, originals), records)
        return records


def _rows(qweight: QuantizedWeight, rows: slice) -> QuantizedWeight:
    """The output rows ``rows`` of a weight solved with others stacked on it (uniform width, contiguous groups).

    Copies, not views: tensors that share storage change how writers split shards (and ``save_file`` refuses
    them), so each module owns its codes, scales and column order like a module solved alone.
    """
    g_idx = None if qweight.g_idx is None else qweight.g_idx.clone()
    return replace(qweight, q=qweight.q[rows].clone(), scale=qweight.scale[rows].clone(),
                   zero=qweight.zero[rows].clone(), g_idx=g_idx)


def _numerics_notes(W: torch.Tensor, asked: float, result: GPTQResult) -> list[str]:
    """The report row's account of what the solver had to recover from (issue 20's numerics cases).

    A Hessian that is not positive definite (too few tokens for the width, duplicated channels) gets its
    dampening raised tenfold per step; inputs that were always zero give no information, so their weights are
    zeroed as in the reference; an all-zero weight stays all zero. Each is said, so a user sees why a row differs.
    """
    notes = []
    if result.cholesky_retries:
        notes.append(f"Hessian not positive definite: dampening raised {asked:g} -> {result.dampening:g} "
                     f"in {result.cholesky_retries} steps")
    if result.dead_columns:
        notes.append(f"{result.dead_columns} dead input columns (always zero in calibration): their weights zeroed")
    if not bool(W.any()):
        notes.append("all-zero weight: quantized to zeros")
    return notes
