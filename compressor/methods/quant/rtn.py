"""RTN: round-to-nearest weight quantization, the data-free baseline every other method must beat."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from compressor.methods.base import LayerRecord
from compressor.methods.quant.common import WeightQuantConfig, WeightQuantizer, quantize_layer_linears
from compressor.methods.quant.ops import QuantizedWeight, quantize_rtn
from compressor.methods.quant.refine import float_targets, layer_weights, refine_layer
from compressor.methods.registry import register_method

if TYPE_CHECKING:
    from compressor.engine import LayerContext


class RTNConfig(WeightQuantConfig):
    """Round each weight to the nearest level of its group's min/max grid.

    ```yaml
    - method: rtn
      bits: 8
      group_size: -1     # per output channel
      symmetric: true
      grid: restricted        # or full / full_positive
      scale_search: none      # or mse / weighted (weighted uses the calibration inputs' diag(H))
      refine_iters: 0         # > 0: SignRound (learned rounding and scales per decoder layer) on top
    ```
    The calibration data chooses weights only through ``scale_search: weighted`` or ``refine_iters``; otherwise
    it only reports each module's output error. Refinement starts from the weights themselves, as SignRound.
    """


@register_method("rtn")
class RTN(WeightQuantizer):
    config_class = RTNConfig
    per_group_bits = True
    supports_distributed = True  # its Hessians are all-reduced, and the refinement's gradients

    def apply(self, ctx: LayerContext) -> list[LayerRecord]:
        config = self.config
        assert isinstance(config, RTNConfig)
        targets = float_targets(ctx, config)
        originals = layer_weights(ctx, config) if targets is not None else {}  # what RTN rounds

        def solve(W: torch.Tensor, H: torch.Tensor, bits: int, group_size: int) -> tuple[QuantizedWeight, str]:
            return quantize_rtn(W, bits, group_size, config.symmetric, grid=config.grid,
                                scale_search=config.scale_search, importance=_importance(H)), ""

        def solve_mixed(
            W: torch.Tensor, H: torch.Tensor, group_size: int, bits_per_group: torch.Tensor
        ) -> tuple[QuantizedWeight, str]:
            widths = int(bits_per_group.max())
            return quantize_rtn(W, widths, group_size, config.symmetric, grid=config.grid,
                                scale_search=config.scale_search, importance=_importance(H),
                                bits_per_group=bits_per_group), ""

        records = quantize_layer_linears(ctx, config, solve, sequential=False, solve_mixed=solve_mixed, plan=self.plan)
        if targets is not None:
            refine_layer(ctx, config, targets, {r.module: originals[r.module] for r in records}, records)
        return records


def _importance(H: torch.Tensor) -> torch.Tensor:
    """Each input column's mean squared activation, ``diag(H): [in]`` (the weighted search's weights)."""
    return torch.diagonal(H).float()
