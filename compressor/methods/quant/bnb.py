"""nf4 and int8: bitsandbytes' data-free weight formats (QLoRA's NF4, LLM.int8()) as baselines beside RTN/GPTQ.

Each targeted linear is quantized by bitsandbytes' own functions (``bnb_ops.py``) and its weight replaced by the
dequantized values, so the in-memory model is what ``format: bitsandbytes`` stores:

- nf4: the in-memory forward is the forward of the loaded NF4 model on bitsandbytes' dequantizing CPU path (the
  same codes and absmaxes to the same float weights, multiplied in the model dtype). On a CPU with AVX512-BF16,
  bitsandbytes 0.50.2's default forward instead runs a fused kernel in bfloat16 (activations, levels, absmaxes and
  outputs rounded to bfloat16): its logits and perplexity then differ from the in-memory ones by that rounding
  (tests/unit/export/test_bnb_export.py bounds it).
- int8: the in-memory model multiplies float activations by ``CB * SCB / 127`` (weight-only int8). The
  bitsandbytes loader also rounds each token's activations to int8 steps (absmax / 127 of the token's float16
  inputs, leaving the columns that hold an entry of magnitude >= ``threshold`` unrounded), so its logits differ
  from the in-memory ones by that activation rounding;
  every int8 row of the report says so.

The quantized forms stay on the stage (``states``) for the exporter; calibration data only measures each
module's output error for the report.
"""

from __future__ import annotations

import math
import time
from typing import TYPE_CHECKING

import torch
from pydantic import Field
from torch import nn

from compressor.errors import RecipeError
from compressor.methods.base import LayerRecord, Method, MethodConfig, TargetedConfig
from compressor.methods.quant.bnb_ops import (
    NF4_BLOCKSIZE,
    Int8Weight,
    NF4Weight,
    bitsandbytes,
    quantize_int8,
    quantize_nf4,
)
from compressor.methods.quant.common import targeted_groups
from compressor.methods.quant.ops import relative_error
from compressor.methods.registry import register_method

if TYPE_CHECKING:
    from compressor.engine import LayerContext, ModelContext

#: Export formats that hold these methods' results: their own, or the dequantized weights.
STORABLE_FORMATS = ("bitsandbytes", "dense")
INT8_NOTE = ("int8: in memory the weights are CB * SCB / 127 with float activations; bitsandbytes' loader also "
             "rounds each token's activations to int8 (columns with an entry above the threshold unrounded)")


class NF4Config(TargetedConfig):
    """4-bit NormalFloat weights in blocks of 64 (QLoRA), as ``BitsAndBytesConfig(load_in_4bit=True)`` makes them.

    ```yaml
    - method: nf4
      targets: [Linear]
      ignore: [lm_head]
      double_quant: false   # true: absmaxes stored as 8-bit codes (QLoRA's double quantization)
    ```
    Export with ``format: bitsandbytes`` (loads with plain ``from_pretrained``) or ``dense`` (dequantized).
    """

    double_quant: bool = Field(
        False, description="Store each block's float32 absmax as an 8-bit code (blocks of 256): 4.127 instead of "
        "4.5 bits per weight, the absmaxes slightly rounded.")

    @property
    def bits(self) -> int:
        """The code width, under the name other checks read from every quantizing stage."""
        return 4


class INT8Config(TargetedConfig):
    """LLM.int8(): int8 weights with one absmax scale per output row, as ``BitsAndBytesConfig(load_in_8bit=True)``
    makes them; ``threshold`` is the loader's outlier threshold on activations (stored in the config).

    ```yaml
    - method: int8
      targets: [Linear]
      ignore: [lm_head]
      threshold: 6.0        # input columns with a larger activation are not rounded at inference; 0 = all
    ```
    Export with ``format: bitsandbytes`` or ``dense`` (the dequantized weights, float activations).
    """

    threshold: float = Field(
        6.0, ge=0, description="LLM.int8() outlier threshold: input columns with an activation of larger magnitude "
        "are multiplied in float16 by the loader (bitsandbytes' llm_int8_threshold).")

    @property
    def bits(self) -> int:
        return 8


class _BitsAndBytesQuantizer(Method):
    """Quantize each targeted linear with bitsandbytes and keep its stored form in ``states`` for the export."""

    kind = "quant"

    def __init__(self, config: MethodConfig) -> None:
        super().__init__(config)
        #: Each quantized linear's bitsandbytes form by full path, on the run's storage device.
        self.states: dict[str, NF4Weight | Int8Weight] = {}

    @classmethod
    def check_recipe(cls, config: MethodConfig, later: list[MethodConfig], export_format: str) -> str | None:
        if export_format not in STORABLE_FORMATS:
            return (f"{config.method} cannot be exported as {export_format} (its codes are not an integer grid that "
                    f"format stores); use export: {{format: bitsandbytes}} or dense")
        return None

    def prepare(self, run: ModelContext) -> list[LayerRecord]:
        bitsandbytes()  # a missing optional dependency is said before the first layer, not in the middle
        self.states = {}
        return []

    def quantize(self, W: torch.Tensor) -> NF4Weight | Int8Weight:
        raise NotImplementedError

    def apply(self, ctx: LayerContext) -> list[LayerRecord]:
        config = self.config
        assert isinstance(config, TargetedConfig)
        groups = targeted_groups(ctx, config)
        hessians = ctx.hessians([group for group, _ in groups]) if groups else {}
        return [self._quantize_module(ctx, name, hessians[group]) for group, names in groups for name in names]

    def _quantize_module(self, ctx: LayerContext, name: str, H: torch.Tensor) -> LayerRecord:
        module = ctx.module(name)
        assert isinstance(module, nn.Linear)
        path = ctx.path(name)
        if path in ctx.run.quantized or path in self.states:
            raise RecipeError(f"{path} is quantized by two stages; give the stages disjoint targets")
        start = time.perf_counter()
        W = module.weight.data
        weight = self.quantize(W)
        W_hat = weight.dequantize(W.dtype)
        module.weight.data = W_hat
        self.states[path] = weight.to(ctx.run.storage_device)
        numel, nf4 = W.numel(), isinstance(weight, NF4Weight)
        record = LayerRecord(
            module=path, method=self.name, bits=4.0 if nf4 else 8.0, group_size=_row_group(W.shape[1]) if nf4 else -1,
            params_before=numel, params_after=numel, bytes_before=numel * W.element_size(),
            bytes_after=weight.storage_bytes(), rel_error=output_error(W, W_hat, H),
            seconds=time.perf_counter() - start, note="" if nf4 else INT8_NOTE,
        )
        record.extra.update(ctx.adapter.module_facts(ctx.layer, name))
        return record


def _row_group(columns: int) -> int:
    """Columns of one row that share an NF4 absmax (-1: the whole row): blocks of 64 run over the flattened weight,
    so a row of 96 holds groups of 32 (``gcd(96, 64)``) and a row of 32 shares its block with the next row."""
    size = math.gcd(columns, NF4_BLOCKSIZE)
    return -1 if size == columns else size


def output_error(W: torch.Tensor, W_hat: torch.Tensor, H: torch.Tensor) -> float:
    """Relative output error on the calibration inputs, ``sqrt(tr(dW H dW^T) / tr(W H W^T))`` (``H: [in, in]``)."""
    dW = (W - W_hat).float()
    num = torch.einsum("oi,ij,oj->", dW, H, dW)
    den = torch.einsum("oi,ij,oj->", W.float(), H, W.float())
    return float(torch.sqrt(num / den)) if den > 0 else relative_error(W, W_hat)


@register_method("nf4")
class NF4(_BitsAndBytesQuantizer):
    config_class = NF4Config

    def quantize(self, W: torch.Tensor) -> NF4Weight | Int8Weight:
        config = self.config
        assert isinstance(config, NF4Config)
        return quantize_nf4(W, config.double_quant)


@register_method("int8")
class INT8(_BitsAndBytesQuantizer):
    config_class = INT8Config

    def quantize(self, W: torch.Tensor) -> NF4Weight | Int8Weight:
        return quantize_int8(W)
