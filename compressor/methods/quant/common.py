"""What the weight quantizers (RTN, GPTQ) share: the scheme config and the write-back of results."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import torch
from pydantic import Field, field_validator, model_validator
from torch import nn

from compressor.distributed import Job, world_size
from compressor.errors import RecipeError
from compressor.methods.base import GroupSize, LayerRecord, Method, TargetedConfig
from compressor.methods.quant.ops import Grid, QuantizedWeight, ScaleSearch, effective_group_size, relative_error

if TYPE_CHECKING:
    from compressor.calibration.capture import FloatReference
    from compressor.engine import LayerContext, ModelContext
    from compressor.models.base import LinearGroup, ModelAdapter

log = logging.getLogger(__name__)


class WeightQuantConfig(TargetedConfig):
    """Integer weight quantization scheme shared by RTN and GPTQ (version 2: ``mse`` became ``scale_search``)."""

    version: ClassVar[int] = 2

    bits: int = Field(4, description="Code width, 2..8.")
    group_size: GroupSize = Field(
        128,
        description="Columns sharing one scale; -1 = one scale per output channel. A width the size "
        "does not divide gets the largest power of two below it that divides the width (reported), unless "
        "strict_groups.",
    )
    symmetric: bool = Field(True, description="Zero point fixed at the middle of the range.")
    strict_groups: bool = Field(False, description="Fail instead of shrinking a group size that does not divide.")
    grid: Grid = Field(
        "restricted",
        description="Symmetric levels: restricted (max|w| at (2^b-1)/2 steps, the GPTQ reference's), full (the "
        "largest-magnitude weight on -2^(b-1), llama.cpp Q4_0's; scales may be negative) or full_positive (full "
        "levels, positive scales). Asymmetric ranges always use all 2^b levels.",
    )
    scale_search: ScaleSearch = Field(
        "none",
        description="Per-group scale: none (min/max of the grid), mse (searched to minimise the squared error) "
        "or weighted (the error weighted by each input's mean squared activation, diag(H)).",
    )
    refine_iters: int = Field(
        0,
        ge=0,
        description="Steps of block-wise refinement after each decoder layer is quantized (SignRound-style: "
        "learned rounding offsets and per-group scale factors, signed gradient descent on the layer's output "
        "error against its float output); 0 = off. Never ends above the quantizer's own calibration loss.",
    )
    refine_lr: float | None = Field(
        None, gt=0, description="Step size of the refinement, decayed linearly to 0; default 1 / refine_iters."
    )
    refine_batch: int = Field(
        2, ge=1, description="Calibration sequences per refinement step: a step costs their forward and backward "
        "(auto-round uses 8; 2 keeps a 512-token step of a 135M model near a second on CPU)."
    )
    refine_dtype: Literal["auto", "float32", "bfloat16"] = Field(
        "auto", description="Precision of the refinement's forwards and backwards: bfloat16 (autocast; the targets, "
        "codes, scales and learned parameters stay float32; on an AVX512-BF16 CPU it cut a demo-model layer's "
        "50-step refinement from 13.1 s to 9.8 s), float32, or auto = bfloat16 where it is fast (AVX512-BF16/AMX "
        "CPUs, CUDA; as auto-round does on CPU), else float32."
    )
    refine_target: Literal["float_input", "quantized_input"] = Field(
        "float_input", description="What the refined layer (fed the quantized layers' outputs) is trained to "
        "reproduce: float_input = the float layer's output on the float model's own hidden states, so each "
        "layer also corrects the error of the layers before it (auto-round's enable_quanted_input; one more "
        "samples x seq_len x hidden copy in memory), or quantized_input = the float layer's output on the same "
        "quantized-prefix inputs (demo model W4 g64, 50 steps, normalized loss: ppl 26.59 against 31.09)."
    )
    refine_loss: Literal["mse", "normalized"] = Field(
        "normalized", description="The refinement's loss: normalized (each token's squared error over its "
        "target's mean square, as the next RMSNorm sees it; the residual stream's massive activations otherwise "
        "dominate the loss: demo model W4 g64, 50 steps, ppl 26.59 against mse's 27.10, RTN alone 27.18) or mse "
        "(the layer output's squared error, SignRound's)."
    )

    @model_validator(mode="before")
    @classmethod
    def _mse_was_renamed(cls, data: object) -> object:
        if isinstance(data, dict) and "mse" in data:
            raise ValueError("mse was replaced by scale_search: write scale_search: mse (or weighted, or none) "
                             "and remove mse")
        return data

    @field_validator("bits")
    @classmethod
    def _bits_in_range(cls, value: int) -> int:
        if not 2 <= value <= 8:
            raise ValueError(f"bits must be between 2 and 8, got {value}")
        return value



def layer_group_size(config: WeightQuantConfig, path: str, columns: int) -> tuple[int, str]:
    """The group size used for one module (-1: per channel) and a report note when it differs."""
    if config.group_size <= 0:
        return -1, ""
    if config.group_size >= columns:
        return -1, f"group_size {config.group_size} covers all {columns} columns: per channel"
    size = effective_group_size(columns, config.group_size)
    if size == config.group_size:
        return size, ""
    if config.strict_groups:
        raise RecipeError(
            f"group_size {config.group_size} does not divide the {columns} input columns of {path} "
            "(strict_groups is set)"
        )
    note = f"group_size {config.group_size} does not divide {columns} columns; used {size}"
    log.debug("%s: %s", path, note)  # one grouped warning per message after the run (report.warning_lines)
    return size, note


Solve = Callable[[torch.Tensor, torch.Tensor, int, int], tuple[QuantizedWeight, str]]
#: ``solve_mixed(W, H, group_size, bits_per_group)``: the same with one width per group (``[n_groups]``).
SolveMixed = Callable[[torch.Tensor, torch.Tensor, int, torch.Tensor], tuple[QuantizedWeight, str]]
#: ``solve_joint([W, ...], H, bits, group_size)``: linears that read one input (q/k/v, gate/up) solved together, one
#: ``(qweight, note)`` each, for a method whose rows are independent given H (GPTQ: one factorisation, one sweep).
SolveJoint = Callable[[list[torch.Tensor], torch.Tensor, int, int], list[tuple[QuantizedWeight, str]]]
#: ``retarget(W, H, D)``: the weight a solve on ``H`` should be given so that it fits the float model's outputs
#: (``D``: :meth:`~compressor.engine.LayerContext.asymmetric_hessian`'s cross term).
Retarget = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass
class AsymmetricCalibration:
    """Solve each linear against the float model's inputs as well as its own (GPTAQ): :func:`quantize_layer_linears`
    collects each group's cross term with ``reference`` and solves ``retarget(W, H, D)`` instead of ``W``."""

    reference: FloatReference
    retarget: Retarget


@dataclass
class BitPlan:
    """Widths a planning stage (BAQ) left in ``run.plans`` for the quantizer after it, by module path.

    ``bits``: ``{path: int}`` (one width per linear); ``group_bits``: ``{path: int64 [n_groups]}``. The
    quantizer takes the plan off ``run.plans`` when its pass starts (a plan is for one quantizer), must
    find an entry for every module it targets, and must have used every entry when its pass ends:
    anything else means the paths changed between planning and quantizing, and the budget would be
    missed silently.
    """

    bits: dict[str, int]
    group_bits: dict[str, torch.Tensor]
    used: set[str] = field(default_factory=set)

    @classmethod
    def take(cls, plans: dict[str, Any]) -> BitPlan | None:
        """Remove the plan from ``plans`` (``run.plans``); None when no stage planned."""
        bits, group_bits = plans.pop("bits", None), plans.pop("group_bits", None)
        if bits is None and group_bits is None:
            return None
        return cls(dict(bits or {}), dict(group_bits or {}))

    def check_targets(self, targeted: list[str], method: str) -> None:
        """Before the quantizer's pass: the plan names exactly the modules ``method`` targets."""
        planned = self.bits.keys() | self.group_bits.keys()
        missing = [path for path in targeted if path not in planned]
        if missing:
            raise RecipeError(f"{missing[0]}{_more(missing)}: {method} targets it, but the plan from the stage "
                              f"before has no width for it; give the planning stage the same targets and ignore")
        unused = sorted(planned - set(targeted))
        if unused:
            raise RecipeError(f"{unused[0]}{_more(unused)}: planned for {method}, but {method} does not target "
                              "such a module; the module paths changed after planning, or the targets differ")

    def widths(self, path: str, method: str) -> tuple[int | None, torch.Tensor | None]:
        """The planned (width, per-group widths) of ``path``, one of them None; an unplanned module is an error."""
        if path not in self.bits and path not in self.group_bits:
            self.check_targets([path], method)
        self.used.add(path)
        return self.bits.get(path), self.group_bits.get(path)

    def check_all_used(self, method: str) -> None:
        """After the quantizer's pass: every planned module was quantized."""
        self.check_targets(sorted(self.used), method)


def _more(items: list[str]) -> str:
    return f" (and {len(items) - 1} more)" if len(items) > 1 else ""


def targeted_linears(adapter: ModelAdapter, config: TargetedConfig) -> list[str]:
    """Full paths of the grouped linears of every layer that ``config`` targets, in layer order."""
    paths = []
    for index, layer in enumerate(adapter.layers()):
        for name in adapter.linear_names():
            path = f"{adapter.layer_prefix(index)}.{name}"
            if config.matches(path, type(layer.get_submodule(name)).__name__):
                paths.append(path)
    return paths


class WeightQuantizer(Method):
    """A quantizer that honours a :class:`BitPlan`: takes and checks it in ``prepare``, again in ``finalize``."""

    kind = "quant"
    plan: BitPlan | None = None

    def prepare(self, run: ModelContext) -> list[LayerRecord]:
        config = self.config
        assert isinstance(config, TargetedConfig)
        self.plan = BitPlan.take(run.plans)
        if self.plan is not None:
            self.plan.check_targets(targeted_linears(run.adapter, config), self.name)
        return []

    def finalize(self, run: ModelContext) -> list[LayerRecord]:
        if self.plan is not None:
            self.plan.check_all_used(self.name)
        return []


def targeted_groups(ctx: LayerContext, config: TargetedConfig) -> list[tuple[LinearGroup, list[str]]]:
    """This layer's linear groups in data-flow order, each with the member names ``config`` targets (none: left out)."""
    groups = [
        (group, [n for n in group.names if config.matches(ctx.path(n), type(ctx.module(n)).__name__)])
        for group in ctx.adapter.linear_groups()
    ]
    return [(group, names) for group, names in groups if names]


def quantize_layer_linears(
    ctx: LayerContext,
    config: WeightQuantConfig,
    solve: Solve,
    sequential: bool = True,
    solve_mixed: SolveMixed | None = None,
    plan: BitPlan | None = None,
    solve_joint: SolveJoint | None = None,
    asymmetric: AsymmetricCalibration | None = None,
) -> list[LayerRecord]:
    """For each linear group in data-flow order: collect H once, solve each targeted linear, write back.

    ``solve(W, H, bits, group_size) -> (qweight, note)`` is the method's math. With ``sequential``,
    groups are processed in order so later groups' Hessians come from already-quantized predecessors
    (GPTQ); without it, one forward pass collects every Hessian (RTN, whose rounding ignores H).
    With a ``plan`` every targeted module gets its planned width (``config.bits`` is not used); one with
    per-group widths goes through ``solve_mixed``, which a method that cannot honour them leaves None
    (then such a plan is an error). ``solve_joint``, when given, takes a group's linears at once where they all
    get the same width. With ``asymmetric`` (sequential only) each solve is given ``retarget(W, H, D)`` in place of
    ``W``; the records still measure the result against ``W``.
    """
    records = []
    groups = targeted_groups(ctx, config)
    shared = {} if sequential or not groups else ctx.hessians([group for group, _ in groups])
    for group, names in groups:
        # Sequentially, nothing upstream of a group changes after its Hessian: its sublayer may replay.
        aim: Callable[[torch.Tensor], torch.Tensor] | None = None
        if asymmetric is not None and group not in shared:
            H, D = ctx.asymmetric_hessian(group, asymmetric.reference, replay=sequential)
            aim = partial(_aimed, asymmetric.retarget, H=H, D=D)
        else:
            H = shared[group] if group in shared else ctx.hessian(group, replay=sequential)
        planned = [(config.bits, None) if plan is None else plan.widths(ctx.path(n), config.method) for n in names]
        widths_of = [(config.bits if bits is None else bits, widths) for bits, widths in planned]
        # under torchrun the group's linears go to several processes instead of one joint solve
        if (solve_joint is not None and world_size() == 1 and len(names) > 1 and len(set(widths_of)) == 1
                and widths_of[0][1] is None):
            records += _quantize_joint(ctx, config, names, H, widths_of[0][0], solve_joint, aim)
        else:
            jobs = [_solve_job(ctx, config, name, H, bits, _mixed_solver(solve_mixed, widths, config.method,
                                                                          ctx.path(name)) or solve, aim)
                    for name, (bits, widths) in zip(names, widths_of, strict=True)]
            solved = ctx.solve_each([job for _, job in jobs])
            for name, (W, _), (qweight, note, seconds) in zip(names, jobs, solved, strict=True):
                records.append(_write_back(ctx, config, name, W, H, qweight, note, time.perf_counter() - seconds))
        if sequential:
            ctx.settle(group)
    return records


def _mixed_solver(
    solve_mixed: SolveMixed | None, widths: torch.Tensor | None, method: str, path: str
) -> Solve | None:
    """``solve`` bound to a module's planned group widths, or None without such a plan."""
    if widths is None:
        return None
    if solve_mixed is None:
        raise RecipeError(f"{path}: {method} cannot quantize with per-group widths (planned by an earlier stage)")

    def solve(W: torch.Tensor, H: torch.Tensor, bits: int, group_size: int) -> tuple[QuantizedWeight, str]:
        n_groups = 1 if group_size <= 0 else W.shape[1] // group_size
        if widths.numel() != n_groups:
            raise RecipeError(
                f"{path}: {widths.numel()} planned group widths, but {method} uses {n_groups} groups here; "
                "give the planning stage the quantizer's group_size"
            )
        return solve_mixed(W, H, group_size, widths)

    return solve


def _aimed(retarget: Retarget, W: torch.Tensor, H: torch.Tensor, D: torch.Tensor) -> torch.Tensor:
    return retarget(W, H, D)


def _quantize_joint(
    ctx: LayerContext, config: WeightQuantConfig, names: list[str], H: torch.Tensor, bits: int, solve: SolveJoint,
    aim: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> list[LayerRecord]:
    """:func:`_solve_job`'s work for linears sharing ``H``, solved by one call; each record gets the solve's time
    in proportion to its rows."""
    claimed = [claim_linear(ctx, name) for name in names]
    paths, weights = [path for path, _ in claimed], [W for _, W in claimed]
    start = time.perf_counter()
    sizes = [layer_group_size(config, path, W.shape[1]) for path, W in zip(paths, weights, strict=True)]
    solved = solve(weights if aim is None else [aim(W) for W in weights], H, bits, sizes[0][0])
    per_row = (time.perf_counter() - start) / sum(W.shape[0] for W in weights)
    records = []
    for name, W, (_, group_note), (qweight, note) in zip(names, weights, sizes, solved, strict=True):
        records.append(_write_back(ctx, config, name, W, H, qweight, "; ".join(n for n in (group_note, note) if n),
                                   time.perf_counter() - per_row * W.shape[0]))
    return records


def _solve_job(
    ctx: LayerContext, config: WeightQuantConfig, name: str, H: torch.Tensor, bits: int, solve: Solve,
    aim: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> tuple[torch.Tensor, Job[tuple[QuantizedWeight, str, float]]]:
    """One linear's weight and its solve as a job for ``ctx.solve_each`` (under torchrun one process solves it,
    the others receive the result).

    The job returns the integer form, the report note and the solve's seconds; :func:`_write_back` then runs on
    every process.
    """
    path, W = claim_linear(ctx, name)
    group_size, group_note = layer_group_size(config, path, W.shape[1])

    def run() -> tuple[QuantizedWeight, str, float]:
        start = time.perf_counter()
        qweight, note = solve(W if aim is None else aim(W), H, bits, group_size)
        return qweight, "; ".join(n for n in (group_note, note) if n), time.perf_counter() - start

    return W, Job(float(W.shape[0] * W.shape[1] ** 2), run)  # GPTQ's sweep: rows x cols^2


def claim_linear(ctx: LayerContext, name: str) -> tuple[str, torch.Tensor]:
    """The linear's full path and weight, refused when an earlier stage already quantized it."""
    module = ctx.module(name)
    assert isinstance(module, nn.Linear)
    path = ctx.path(name)
    if path in ctx.run.quantized:
        raise RecipeError(f"{path} is quantized by two stages; give the stages disjoint targets")
    return path, module.weight.data


def _write_back(
    ctx: LayerContext, config: WeightQuantConfig, name: str, W: torch.Tensor, H: torch.Tensor,
    qweight: QuantizedWeight, note: str, start: float,
) -> LayerRecord:
    """Put the fake-quantized weight into the module, keep the integer form for export, and make the record."""
    W_hat = qweight.dequantize(W.dtype)
    ctx.module(name).weight.data = W_hat
    path = ctx.path(name)
    ctx.run.quantized[path] = qweight
    record = _record(path, config.method, W, W_hat, H, qweight, start, note)
    record.extra.update(ctx.adapter.module_facts(ctx.layer, name))  # a MoE expert: the tokens routed to it
    return record


def _record(
    path: str, method: str, W: torch.Tensor, W_hat: torch.Tensor, H: torch.Tensor,
    qweight: QuantizedWeight, start: float, note: str,
) -> LayerRecord:
    """Relative output error on the calibration inputs: tr(dW H dW^T) / tr(W H W^T)."""
    dW, Wf = (W - W_hat).float(), W.float()
    num = torch.linalg.vecdot(dW @ H, dW).sum()  # half the time of einsum("oi,ij,oj->") on one core
    den = torch.linalg.vecdot(Wf @ H, Wf).sum()
    rel = float(torch.sqrt(num / den)) if den > 0 else relative_error(W, W_hat)
    numel = W.numel()
    return LayerRecord(
        module=path,
        method=method,
        bits=round(qweight.average_bits(), 4),
        group_size=qweight.group_size,
        params_before=numel,
        params_after=numel,
        bytes_before=numel * W.element_size(),
        bytes_after=(qweight.storage_bits() + 7) // 8,
        rel_error=rel,
        seconds=time.perf_counter() - start,
        note=note,
    )
