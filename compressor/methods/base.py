"""What a method is: a strict config plus an object with ``prepare``/``apply``/``finalize``.

The engine calls ``apply`` once per decoder layer with a :class:`LayerContext` that gives the layer,
its calibration inputs and the statistics helpers; the method transforms the layer in place and
returns one :class:`LayerRecord` per module it touched. Model-level decisions (dropping layers) go in
``finalize``. Methods keep no state between layers beyond what they deliberately accumulate for
``finalize``.
"""

from __future__ import annotations

import re
from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Annotated, Any, ClassVar, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationInfo

if TYPE_CHECKING:
    import torch

    from compressor.engine import LayerContext, ModelContext


def _non_negative(value: int | None, info: ValidationInfo) -> int | None:
    if value is not None and value < 0:
        raise ValueError(f"{info.field_name} must be 0 or more, got {value}")
    return value


def _open_fraction(value: float | None, info: ValidationInfo) -> float | None:
    if value is not None and not 0 < value < 1:
        raise ValueError(f"{info.field_name} must be between 0 and 1 (exclusive), got {value}")
    return value


def _group_size(value: int) -> int:
    if value == 0 or value < -1:
        raise ValueError(f"group_size must be -1 (per channel) or a positive number, got {value}")
    return value


# Field types shared by method configs, so one rule has one message everywhere.
Count = Annotated[int | None, AfterValidator(_non_negative)]
Fraction = Annotated[float | None, AfterValidator(_open_fraction)]
GroupSize = Annotated[int, AfterValidator(_group_size)]


class MethodConfig(BaseModel):
    """Base of every stage config: strict (unknown keys rejected) and frozen."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    #: Bumped when a field's meaning changes; written into resolved recipes and reports.
    version: ClassVar[int] = 1

    method: str = Field(description="Registered method name.")


class TargetedConfig(MethodConfig):
    """A stage that acts on individual linears chosen by class name or ``re:`` regex on the path."""

    targets: list[str] = Field(
        default_factory=lambda: ["Linear"],
        description="Module class names, or 're:<regex>' matched against full module paths.",
    )
    ignore: list[str] = Field(
        default_factory=lambda: ["lm_head"],
        description="Module names (path suffixes) or 're:<regex>' to leave untouched.",
    )

    def matches(self, path: str, class_name: str) -> bool:
        """True when the module at ``path`` is targeted and not ignored."""
        return any(_match(rule, path, class_name) for rule in self.targets) and not any(
            _match(rule, path, class_name) for rule in self.ignore
        )


def _match(rule: str, path: str, class_name: str) -> bool:
    if rule.startswith("re:"):
        return re.search(rule[3:], path) is not None
    return rule == class_name or path == rule or path.endswith("." + rule)


@dataclass
class LayerRecord:
    """One row of the report: what a method did to one module (keyed by its full dotted path)."""

    module: str
    method: str
    bits: float | None = None
    group_size: int | None = None
    kept_fraction: float | None = None
    params_before: int = 0
    params_after: int = 0
    bytes_before: int = 0
    bytes_after: int = 0
    rel_error: float | None = None
    seconds: float = 0.0
    note: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class Method(ABC):
    """A registered compression method; one instance per recipe stage."""

    config_class: ClassVar[type[MethodConfig]]
    #: "quant" methods store weights in fewer bits; "prune" methods change shapes; "allocate" methods
    #: only plan (BAQ writes a bit map the next quantizer reads).
    kind: ClassVar[Literal["quant", "prune", "allocate"]] = "quant"
    #: True when the method decides from whole-model statistics in ``finalize`` (layer removal): the
    #: stages after it get a fresh pass over the changed model.
    model_level: ClassVar[bool] = False
    #: True for quantizers that honour a per-group bit plan (``run.plans["group_bits"]``, written by BAQ).
    per_group_bits: ClassVar[bool] = False
    #: True when every statistic the method reads is summed across torchrun's processes (compressor.distributed),
    #: so it may run on a share of the calibration data per process; the others are refused when WORLD_SIZE > 1.
    supports_distributed: ClassVar[bool] = False

    def __init__(self, config: MethodConfig) -> None:
        self.config = config

    def runs_whole_model_first(self) -> bool:
        """True when ``prepare`` runs the whole model (a loss backward pass: ``fisher``), which must then be the model
        the earlier stages finished, not one that a stage sharing its pass has changed half-way (SliceGPT rotates the
        embeddings in its ``prepare`` and each layer as the pass reaches it); the engine gives it a pass of its own."""
        return False

    @property
    def name(self) -> str:
        return self.config.method

    @classmethod
    def check_recipe(cls, config: MethodConfig, later: list[MethodConfig], export_format: str) -> str | None:
        """Why this stage cannot run before the ``later`` stages or be stored as ``export_format``, or None.

        Called by the recipe validator before any model is loaded; the default accepts everything.
        """
        return None

    def bind(self, later: list[MethodConfig], export_format: str) -> None:
        """Learn this stage's place in the recipe: the ``later`` stages and the export format.

        ``compressor.recipe.build_stages`` calls it once, before any pass, with what ``check_recipe``
        validated, so a stage that serves a later one (BAQ plans for the quantizer after it) reads that
        stage's settings instead of keeping copies. The default needs nothing.
        """
        return None

    def prepare(self, run: ModelContext) -> list[LayerRecord]:
        """Model-level work before layer 0's inputs are captured (e.g. rotating embeddings)."""
        return []

    @abstractmethod
    def apply(self, ctx: LayerContext) -> list[LayerRecord]:
        """Transform one decoder layer in place (or only measure it) and say what was done."""

    def finalize(self, run: ModelContext) -> list[LayerRecord]:
        """Model-level work after the last layer (e.g. removing the layers chosen while measuring)."""
        return []

    def checkpoint_state(self) -> dict[str, torch.Tensor]:
        """Results of whole-model work done so far (ShortGPT's scores, SliceGPT's basis) that a resumed run reuses.

        ``compressor.checkpoint`` saves them after ``prepare`` and after the pass; empty (the default): nothing.
        """
        return {}

    def restore_state(self, state: dict[str, torch.Tensor]) -> bool:
        """Take :meth:`checkpoint_state`'s tensors from an interrupted run, before ``prepare``, to skip recomputing.

        Returns True when they are the stage's complete result, so its pass needs no sweep over the layers.
        """
        return False
