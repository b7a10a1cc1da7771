"""BitStack: each weight as a stack of ~1-bit residual blocks, all blocks of the model in one global order.

The pass decomposes every targeted linear (``ops.decompose``: per-input-channel scales from the calibration
``diag(H)``, then ``iterations`` blocks of packed signs times a rank-``rank`` fit of ``|R|``; the signs by error
feedback in the ``H`` metric with the row factor refitted (``feedback.py``) or ``sign(R)``) and measures the
calibration output error of every prefix of its stack (``ops.output_errors``) without changing the weight, so every
layer's statistics come from the dense model, as in the reference, which decomposes each linear on its own.
``finalize`` orders all blocks of all linears by error drop per byte (``order.global_order``), picks the longest
prefix that fits ``budget`` (all blocks without one) and writes each linear's reconstruction from its chosen blocks
into the model. Being model-level, the stages after it get a fresh pass over the reconstructed model. It also
records the size-vs-error curve of the order in the report (``structure.bitstack``, drawn as ``bitstack.png``):
for a user choosing a budget later, what each size costs in the calibration error the order itself estimates.

The decompositions stay on the stage (``decomposed``) for the BitStack directory writer: export format
``bitstack`` writes every block once (``store.py``; load it at any budget later), format ``dense`` the
reconstruction at the stage's budget. The in-memory model, and so the report and ``--eval``, is the
reconstruction at the stage's budget (every block without one) in both cases.

Under layer streaming (``compressor.streaming``) the pass is a scoring pass: the streamer moves each finished
layer's blocks to a file of its own (``spill.spill_layer``) and leaves them here as meta tensors, so
what stays in RAM is what the order needs (shapes, bytes per block, errors per prefix). ``finalize`` then
writes no weight into the meta skeleton: export ``bitstack`` assembles the directory from those files, and for
``dense`` (or a later stage) each layer's reconstruction is made from its file whenever the streamer reads the
layer again (:meth:`BitStack._reconstruct_when_read`, the streamer's ``reshape``).

Under torchrun (``compressor.distributed``) the Hessians are the engine's float64 sums over every process's
batches and order fisher's squared loss gradients are summed with their token counts (``calibration/fisher.py``),
so every process decomposes the same linears from the same statistics and chooses the same blocks.

Cost per linear and block: the top-``rank`` factors of ``|R|`` by subspace iteration (``svd: lowrank``, the
default; ``O(out * in * (rank + 8) * 14)``; ``svd: full`` is one full SVD, ``O(out * in * min(out, in))``), and one
``[out, in] x [in, in]`` product for the errors; ``signs: feedback`` adds a column sweep (``in`` Python steps),
``O(out * in * in * (rank + 2))`` for the refit and candidates, and one ``[in, in]`` inverse per linear. Demo
model layer 15, rank 4, 16 blocks, 1 thread on a loaded machine: 2.4 s (residual), 31 s (feedback), 15 s with
the full SVD and residual signs.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch
from pydantic import Field, field_validator
from torch import nn

from compressor.calibration.fisher import output_fisher
from compressor.distributed import Job
from compressor.methods.base import LayerRecord, Method, MethodConfig, TargetedConfig
from compressor.methods.quant.bitstack.ops import (
    Decomposition,
    SignMode,
    SVDMode,
    channel_scale,
    decompose,
    output_errors,
)
from compressor.methods.quant.bitstack.order import (
    BudgetError,
    Chain,
    CurvePoint,
    blocks_for_budget,
    error_curve,
    global_order,
    parse_budget,
    thin_curve,
)
from compressor.methods.quant.bitstack.spill import load_decomposition
from compressor.methods.quant.common import claim_linear, targeted_groups, targeted_linears
from compressor.methods.registry import register_method

if TYPE_CHECKING:
    from compressor.engine import LayerContext, ModelContext

log = logging.getLogger(__name__)


class BitStackConfig(TargetedConfig):
    """Decompose every targeted linear into residual blocks and keep the globally best ones that fit a budget.

    ```yaml
    - method: bitstack
      iterations: 16      # blocks per linear (each ~1 bit per weight plus its factors)
      rank: 16            # rank of each block's magnitude approximation
      budget: 300MB       # or 1.5GiB, 123456 (bytes), 2.5bpw; omitted: every block
      order: fisher       # or relative, absolute
      svd: lowrank        # or full (exact SVD per block, ~8x slower)
      signs: feedback     # or residual (sign(R), the reference's)
      dampening: 0.3      # feedback's shrinkage of the input correlations
    ```
    """

    iterations: int = Field(16, ge=1, description="Residual blocks per linear.")
    rank: int = Field(16, ge=1, description="Rank of each block's SVD approximation of |R| (capped at the "
                      "weight's smaller side).")
    budget: str | int | None = Field(
        None, description="Memory the model's weights may take: bytes (123456), kB/MB/GB, KiB/MiB/GiB, or bits "
        "per targeted weight (2.5bpw, signs, factors and scales counted). Omitted: every block is kept."
    )
    order: OrderBy = Field(
        "fisher", description="What a block is worth, per stored byte: its drop of the calibration output error "
        "with each output channel's error weighted by its mean squared loss gradient (fisher, the default: the "
        "second-order estimate of the loss rise, so linears compare by what the loss minds; one forward and backward "
        "pass of the whole model over the calibration tokens, as BAQ's fisher; does not stream), that error "
        "tr(dW H dW^T) divided by the linear's output energy tr(W H W^T) (relative), or raw (absolute). Demo model, "
        "rank 4, 16 blocks, 8,192 wiki tokens, ppl at 2 / 2.25 / 2.5 / 3 / 4 bits per weight: fisher 813 / 610 / "
        "302 / 117 / 51.5, relative 23,281 / 7,017 / 640 / 233 / 78.5, absolute 33,268 / 21,216 at 2 / 2.25."
    )

    svd: SVDMode = Field(
        "lowrank", description="How each block's top-rank factors of |R| are found: subspace iteration from a "
        "fixed seed, warm-started from the previous block (lowrank), or a full SVD (full; exact, ~8x slower)."
    )

    signs: SignMode = Field(
        "feedback", description="Each block's signs: GPTQ-style error feedback in the calibration metric "
        "tr(dW H dW^T) (damped, see dampening), row factor refitted, never worse than sign(R) on the same "
        "magnitudes in that metric (feedback; demo model, rank 4, 3 blocks: ~1.6x less output error than "
        "residual on held-out text at 1.2-3.5 bits per weight; "
        "~10x the decomposition time), or sign(R) as the reference (residual). Same stored format either way."
    )
    dampening: float = Field(
        0.3, ge=0, description="signs: feedback only: the metric's input correlations are shrunk, H + dampening * "
        "diag(H) (up to a factor), so the signs do not fit the calibration tokens' noise. Demo model, 12 linears "
        "fitted on 32 x 512 demo:lee tokens, output error on held-out demo:wiki at 2 blocks of rank 4: 0.0271 "
        "(0.01), 0.0247 (0.1), 0.0236 (0.3 and 1), 0.0254 (3); sign(R) 0.0384."
    )

    @field_validator("budget")
    @classmethod
    def _readable_budget(cls, value: str | int | None) -> str | int | None:
        if value is not None:
            try:
                parse_budget(value)
            except BudgetError as exc:
                raise ValueError(str(exc)) from None
        return value


OrderBy = Literal["relative", "absolute", "fisher"]


@dataclass
class _Decomposed:
    """One linear's stack, the output error of each prefix (and its loss-weighted form), what it cost."""

    decomposition: Decomposition
    errors: list[float]
    seconds: float
    #: ``errors`` with each output channel weighted by its mean squared loss gradient (order ``fisher`` only).
    fisher_errors: list[float] | None = None
    #: Where the blocks went when the run streams (``spill.spill_layer``); the tensors here are then on meta.
    file: Path | None = None

    def order_errors(self, order: OrderBy) -> list[float]:
        """The errors ``order`` compares linears by: loss-weighted for fisher, plain otherwise."""
        if order == "fisher":
            if self.fisher_errors is None:
                raise ValueError("order fisher: this stack was measured without loss gradients")
            return self.fisher_errors
        return self.errors

    def chain(self, path: str, order: OrderBy) -> Chain:
        errors = self.order_errors(order)
        norm = errors[0] if order == "relative" and errors[0] > 0 else 1.0
        drops = tuple((errors[k] - errors[k + 1]) / norm for k in range(len(errors) - 1))
        out, columns = self.decomposition.shape
        return Chain(path, drops, tuple(self.decomposition.block_bytes()), out * columns)


@register_method("bitstack")
class BitStack(Method):
    config_class = BitStackConfig
    kind = "quant"
    model_level = True
    supports_distributed = True  # Hessians and fisher's gradients are summed over the processes

    def __init__(self, config: MethodConfig) -> None:
        super().__init__(config)
        #: Every targeted linear's decomposition by full path, filled by the pass (on CPU).
        self.decomposed: dict[str, _Decomposed] = {}
        #: Blocks per linear chosen by ``finalize``.
        self.blocks: dict[str, int] = {}
        #: Mean squared loss gradient of every targeted linear's outputs (order ``fisher``), by full path.
        self.fisher: dict[str, torch.Tensor] = {}
        #: The recipe's export format (``bind``): a streamed run with format bitstack needs no reconstruction.
        self.export_format = "dense"

    def bind(self, later: list[MethodConfig], export_format: str) -> None:
        self.export_format = export_format

    @classmethod
    def check_recipe(cls, config: MethodConfig, later: list[MethodConfig], export_format: str) -> str | None:
        if export_format not in ("dense", "bitstack"):
            return (f"bitstack stores sign x low-rank blocks, which '{export_format}' cannot hold; use export "
                    "format: bitstack (every block, any budget later) or dense (the reconstruction at the budget)")
        if export_format == "bitstack" and later:
            return (f"export format bitstack stores this stage's blocks, so '{later[0].method}' after it would "
                    "be lost; make bitstack the last stage")
        return None

    def runs_whole_model_first(self) -> bool:
        return getattr(self.config, "order", None) == "fisher"

    def prepare(self, run: ModelContext) -> list[LayerRecord]:
        self.decomposed, self.blocks, self.fisher = {}, {}, {}
        config = self.config
        assert isinstance(config, BitStackConfig)
        if config.order == "fisher":
            paths = targeted_linears(run.adapter, config)
            start = time.perf_counter()
            self.fisher = output_fisher(run.model, run.batches(), set(paths))
            log.info("bitstack: loss gradients of %d linears in %.1f s", len(paths), time.perf_counter() - start)
        return []

    def apply(self, ctx: LayerContext) -> list[LayerRecord]:
        """Decompose the layer's targeted linears and measure their prefixes; the weights stay as they are."""
        config = self.config
        assert isinstance(config, BitStackConfig)
        groups = targeted_groups(ctx, config)
        if not groups:
            return []
        hessians = ctx.hessians([group for group, _ in groups])
        linears = [(*claim_linear(ctx, name), hessians[group]) for group, names in groups for name in names]
        # under torchrun each linear is decomposed by one process and its stack sent to the others
        solved = ctx.solve_each([self._decompose_job(W, H, self.fisher.get(path)) for path, W, H in linears])
        for (path, _, _), item in zip(linears, solved, strict=True):
            item.decomposition = _to_cpu(item.decomposition)  # a stack received under NCCL arrives on the GPU
            self.decomposed[path] = item
        return []

    def _decompose_job(self, W: torch.Tensor, H: torch.Tensor, fisher: torch.Tensor | None) -> Job[_Decomposed]:
        """One linear's decomposition and prefix errors as a job: a function of ``W``, the summed ``H`` and the
        summed Fisher weights only (the subspace iteration starts from a fixed seed), so any process gives the same
        bits. Its cost: feedback signs sweep ``in`` columns over ``[out, in]``, residual signs a rank-sized basis."""
        config = self.config
        assert isinstance(config, BitStackConfig)

        def solve() -> _Decomposed:
            start = time.perf_counter()
            decomposition = decompose(W, config.iterations, config.rank, channel_scale(H), svd=config.svd,
                                      signs=config.signs, H=H, dampening=config.dampening)
            errors = output_errors(W, decomposition, H)
            weighted = None if fisher is None else output_errors(W, decomposition, H, row_weights=fisher)
            return _Decomposed(_to_cpu(decomposition), errors, time.perf_counter() - start, weighted)

        per_weight = W.shape[1] if config.signs == "feedback" else config.rank + 8
        return Job(float(W.numel() * per_weight * config.iterations), solve)

    def finalize(self, run: ModelContext) -> list[LayerRecord]:
        """Choose the blocks that fit the budget and write every linear's reconstruction from them."""
        config = self.config
        assert isinstance(config, BitStackConfig)
        chains = [item.chain(path, config.order) for path, item in self.decomposed.items()]
        order = global_order(chains)
        fixed = _fixed_bytes(run.model, list(self.decomposed))
        if config.budget is None:
            self.blocks = {chain.path: len(chain.sizes) for chain in chains}
        else:
            self.blocks = blocks_for_budget(chains, order, parse_budget(config.budget), fixed)
        if chains:
            errors = {path: item.order_errors(config.order) for path, item in self.decomposed.items()}
            run.structure[self.name] = _curve_section(chains, errors, order, sum(self.blocks.values()), fixed,
                                                      config)
        records = [self._record(run.model, path, self.blocks[path]) for path in self.decomposed]
        if run.stream is None:
            for path in self.decomposed:
                self._write(run.model, path, self.blocks[path])
        elif self.export_format != "bitstack":  # the directory is written from the blocks' files, not weights
            self._reconstruct_when_read(run)
        return records

    def _write(self, model: nn.Module, path: str, k: int) -> None:
        """Put the first ``k`` blocks' reconstruction into the linear at ``path``."""
        module = model.get_submodule(path)
        assert isinstance(module, nn.Linear)
        W = module.weight.data
        module.weight.data = self.decomposed[path].decomposition.reconstruct(k).to(device=W.device, dtype=W.dtype)

    def _reconstruct_when_read(self, run: ModelContext) -> None:
        """Streamed: each layer's decomposed weights become their reconstruction whenever the layer is read again.

        The skeleton is on meta and the blocks are in the streamer's files, so the reconstruction is handed to
        the streamer as a rewrite of the layer's checkpoint tensors (as FLAP hands its plan): the next pass loads
        the reconstructed layer, or the export copies it, one layer at a time, the in-RAM ``_write``'s tensors.
        """
        assert run.stream is not None
        for index, layer in enumerate(run.adapter.layers()):
            prefix = run.adapter.layer_prefix(index) + "."
            linears = {path.removeprefix(prefix): (path, self.decomposed[path], self.blocks[path])
                       for path in self.decomposed if path.startswith(prefix)}
            if linears:
                run.stream.reshape(layer, partial(_reconstructed, linears=linears))

    def _record(self, model: nn.Module, path: str, k: int) -> LayerRecord:
        """The report row of the linear at ``path`` with its first ``k`` blocks (its weight may be on meta)."""
        item = self.decomposed[path]
        module = model.get_submodule(path)
        assert isinstance(module, nn.Linear)
        W = module.weight
        stored = sum(item.decomposition.block_bytes()[:k])
        numel = W.numel()
        errors = item.errors
        return LayerRecord(
            module=path, method=self.name, bits=round(stored * 8 / numel, 4), group_size=None,
            params_before=numel, params_after=numel, bytes_before=numel * W.element_size(), bytes_after=stored,
            rel_error=float((errors[k] / errors[0]) ** 0.5) if errors[0] > 0 else None, seconds=item.seconds,
            note=f"{k} of {len(errors) - 1} blocks, rank {item.decomposition.rank}",
            extra={"blocks": k, "iterations": len(errors) - 1, "rank": item.decomposition.rank},
        )


def _reconstructed(state: dict[str, torch.Tensor],
                   linears: dict[str, tuple[str, _Decomposed, int]]) -> dict[str, torch.Tensor]:
    """A layer's checkpoint tensors (names relative to it) with each decomposed weight replaced by its first
    ``k`` blocks' reconstruction, read from the blocks' file, in the weight's dtype."""
    for name, (path, item, k) in linears.items():
        weight = state[f"{name}.weight"]
        state[f"{name}.weight"] = load_decomposition(path, item).reconstruct(k).to(dtype=weight.dtype)
    return state


#: Points of the size-vs-error curve kept in the report (evenly along the order, plus the loaded one).
CURVE_POINTS = 200


def _curve_section(chains: list[Chain], errors: dict[str, list[float]], order: list[tuple[str, int]],
                   loaded: int, fixed: int, config: BitStackConfig) -> dict[str, Any]:
    """The report's ``structure.bitstack``: what each size of this run's order costs, for choosing a budget later.

    Read from what the pass measured (no forward): every loadable prefix's bits per decomposed weight and the
    summed calibration output error of the decomposed linears over that with no block, thinned to about
    :data:`CURVE_POINTS` (the first, the last and the loaded prefix always kept). ``bytes`` is the whole
    model's weights at that prefix (the decomposed linears plus ``fixed_bytes``), what a byte budget counts.
    """
    curve = error_curve(chains, errors, order)

    def point(p: CurvePoint) -> dict[str, Any]:
        return {"blocks": p.blocks, "bytes": fixed + p.linear_bytes, "bits": float(f"{p.bits:.6g}"),
                "rel_error": float(f"{p.rel_error:.6g}")}

    chosen = next(p for p in curve if p.blocks == loaded)
    return {
        "measure": ("calibration output error tr(dW H dW^T)" + (", each output channel's weighted by its mean squared "
                    "loss gradient," if config.order == "fisher" else "") + " summed over the decomposed linears, "
                    "relative to the error with no block; an estimate of the order, not perplexity"),
        "order": config.order, "budget": config.budget, "linears": len(chains), "blocks": len(order),
        "params": sum(chain.params for chain in chains), "fixed_bytes": fixed, "loaded": point(chosen),
        "curve": [point(p) for p in thin_curve(curve, CURVE_POINTS, keep=(loaded,))],
    }


def _to_cpu(decomposition: Decomposition) -> Decomposition:
    for block in decomposition.blocks:
        block.signs, block.u, block.v = block.signs.cpu(), block.u.cpu(), block.v.cpu()
    decomposition.scale = decomposition.scale.cpu()
    return decomposition


def _fixed_bytes(model: nn.Module, paths: list[str]) -> int:
    """Bytes of every weight outside the decomposed linears' matrices (embeddings, norms, head, biases)."""
    total = sum(p.numel() * p.element_size() for p in model.parameters())  # tied weights once
    for path in paths:
        module = model.get_submodule(path)
        assert isinstance(module, nn.Linear)
        total -= module.weight.numel() * module.weight.element_size()
    return int(total)

