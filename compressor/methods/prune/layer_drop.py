"""Layer removal (ShortGPT): drop the decoder layers that change the residual stream least.

Block influence ``BI_l = 1 - E[cos(x_l, x_{l+1})]`` over every calibration token, with ``x_l`` the hidden
states entering layer ``l``; the ``n`` lowest-BI layers go. The ``angular`` variant scores every contiguous
block of ``n`` layers by ``E[arccos(cos(x_l, x_{l+n})) / pi]`` and removes the best block. The scores come from
the engine's pass (each layer's inputs are the previous layer's outputs, so only the last layer is run
twice); the removal happens in ``finalize`` through the adapter, which leaves a standard model of the same
family with fewer layers (renumbered weights and cache indices, trimmed per-layer config). The scores are the
pass's whole result: a resumed run that has them saved removes the same layers without the sweep. Under
torchrun each score's token sum and count are summed across processes as it is taken, so every process holds
the one-process scores and removes the same layers.

Nothing here needs more than the layer being run, so the stage streams (``compressor.streaming``): the scores
read hidden states only, and ``finalize`` changes only the layer list and the config, which a meta skeleton
holds. The window of hidden states it keeps (``n + 1`` boundaries for ``angular``, 2 for block influence) lives
where the engine puts the boundaries, memory-mapped above ``--activation-memory``.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Literal

import torch
from pydantic import Field, field_validator, model_validator

from compressor.distributed import all_reduce_sum_float64
from compressor.errors import RecipeError
from compressor.methods.base import Count, Fraction, LayerRecord, Method, MethodConfig
from compressor.methods.registry import register_method

if TYPE_CHECKING:
    from compressor.engine import LayerContext, ModelContext

DEFAULT_RATIO = 0.25


class LayerDropConfig(MethodConfig):
    """Remove whole decoder layers chosen by a similarity metric on calibration data.

    ```yaml
    - method: layer_drop
      metric: block_influence   # or angular: the best contiguous block
      ratio: 0.25               # or remove: 8, or layers: [20, 21, 22]
    ```
    Set at most one of ``remove``, ``ratio`` and ``layers``; with none, 25% of the layers are removed.
    """

    metric: Literal["block_influence", "angular"] = Field(
        "block_influence",
        description="block_influence: drop the n layers whose output is most like their input (ShortGPT); "
        "angular: drop the contiguous block of n layers whose input and output are closest in angle.",
    )
    remove: Count = Field(None, description="Number of layers to remove (0 keeps the model as it is).")
    ratio: Fraction = Field(None, description="Fraction of the layers to remove, in (0, 1); rounded.")
    layers: list[int] | None = Field(
        None, description="Remove exactly these layer indices (scores are still measured for the report)."
    )

    @field_validator("layers")
    @classmethod
    def _layers_valid(cls, value: list[int] | None) -> list[int] | None:
        if value is not None and (any(i < 0 for i in value) or len(set(value)) != len(value)):
            raise ValueError(f"layers must be distinct non-negative layer indices, got {value}")
        return value

    @model_validator(mode="after")
    def _one_amount(self) -> LayerDropConfig:
        given = [name for name in ("remove", "ratio", "layers") if getattr(self, name) is not None]
        if len(given) > 1:
            raise ValueError(f"set only one of remove, ratio and layers (got {' and '.join(given)})")
        if self.layers is not None and self.metric == "angular" and not _contiguous(self.layers):
            raise ValueError(f"layers: the angular metric removes one contiguous block, got {self.layers}")
        return self

    def count(self, num_layers: int) -> int:
        """How many of ``num_layers`` layers this stage removes."""
        if self.layers is not None:
            return len(self.layers)
        if self.remove is not None:
            return self.remove
        return int(math.floor((self.ratio or DEFAULT_RATIO) * num_layers + 0.5))


def _contiguous(indices: list[int]) -> bool:
    return not indices or sorted(indices) == list(range(min(indices), max(indices) + 1))


# ---- pure math ------------------------------------------------------------------------------------------


def token_cosine(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Cosine similarity per token of ``x, y: [..., H]`` (float32, shape ``[...]``)."""
    return torch.nn.functional.cosine_similarity(x.float(), y.float(), dim=-1, eps=1e-8)


def block_influence(x: torch.Tensor, y: torch.Tensor) -> tuple[float, int]:
    """(sum over tokens of ``1 - cos(x, y)``, token count) for a block's input ``x`` and output ``y``."""
    cos = token_cosine(x, y)
    return float((1 - cos).sum()), cos.numel()


def angular_distance(x: torch.Tensor, y: torch.Tensor) -> tuple[float, int]:
    """(sum over tokens of ``arccos(cos(x, y)) / pi``, token count)."""
    cos = token_cosine(x, y).clamp(-1.0, 1.0)
    return float((torch.arccos(cos) / math.pi).sum()), cos.numel()


def lowest(scores: list[float], n: int) -> list[int]:
    """Indices of the ``n`` smallest scores (ties: lower index first), ascending."""
    return sorted(sorted(range(len(scores)), key=lambda i: (scores[i], i))[:n])


def best_block(scores: list[float], n: int) -> list[int]:
    """The ``n`` consecutive layers starting where ``scores`` (one per block start) is smallest."""
    start = min(range(len(scores)), key=lambda i: (scores[i], i))
    return list(range(start, start + n))


# ---- the method -----------------------------------------------------------------------------------------


def _mean_over_batches(pairs: list[tuple[float, int]]) -> float:
    """The mean over every process's tokens of per-batch ``(sum, token count)`` pairs.

    This process's sums and counts are added in float64 (Python floats), then both are summed across processes
    (:func:`distributed.all_reduce_sum_float64`, a copy in one process) before the one division: a mean of
    per-process means would weigh uneven shares wrongly. Collective: every process calls it once per score.
    """
    local = torch.tensor([sum(total for total, _ in pairs), sum(count for _, count in pairs)], dtype=torch.float64)
    total, count = all_reduce_sum_float64(local).tolist()
    return total / max(count, 1)


@register_method("layer_drop")
class LayerDrop(Method):
    config_class = LayerDropConfig
    kind = "prune"
    model_level = True
    #: Each score's token sum and count are summed across processes (:func:`_mean_over_batches`), so every process
    #: holds the one-process scores and removes the same layers.
    supports_distributed = True

    def __init__(self, config: MethodConfig) -> None:
        super().__init__(config)
        self._n = 0
        self._scores: list[float] = []
        self._window: list[list[torch.Tensor]] = []
        self._restored: list[float] | None = None  # the scores of an interrupted run (restore_state)

    @property
    def cfg(self) -> LayerDropConfig:
        assert isinstance(self.config, LayerDropConfig)
        return self.config

    def prepare(self, run: ModelContext) -> list[LayerRecord]:
        count = run.adapter.num_layers
        self._n = self.cfg.count(count)
        if self._n >= count:
            raise RecipeError(f"layer_drop: cannot remove {self._n} of the model's {count} layers (remove/ratio "
                              "must leave at least one)")
        if self.cfg.layers is not None and max(self.cfg.layers, default=-1) >= count:
            raise RecipeError(f"layer_drop: layers {self.cfg.layers} name a layer past the model's last ({count - 1})")
        self._scores, self._window = list(self._restored or []), []
        return []

    def checkpoint_state(self) -> dict[str, torch.Tensor]:
        """The scores once the sweep measured them all (float64: the exact Python floats)."""
        return {"scores": torch.tensor(self._scores, dtype=torch.float64)} if self._scores else {}

    def restore_state(self, state: dict[str, torch.Tensor]) -> bool:
        if "scores" not in state:
            return False
        self._restored = state["scores"].tolist()
        return True

    def apply(self, ctx: LayerContext) -> list[LayerRecord]:
        """Score the previous layer (its output is this layer's input); the last layer is run once more."""
        if self._restored is not None:  # the scores are known; another stage of the pass needed the sweep
            return []
        states = [batch.hidden for batch in ctx.inputs]
        self._observe(states)
        if ctx.index == ctx.adapter.num_layers - 1:
            self._observe(ctx.forward())
        return []

    def _observe(self, states: list[torch.Tensor]) -> None:
        """``states``: per batch, the hidden states ``[B, L, H]`` after the layers seen so far."""
        span = 1 if self.cfg.metric == "block_influence" else max(self._n, 1)
        self._window.append(states)
        if len(self._window) <= span:
            return
        first = self._window.pop(0)
        score = block_influence if self.cfg.metric == "block_influence" else angular_distance
        self._scores.append(_mean_over_batches([score(x, y) for x, y in zip(first, states, strict=True)]))

    def finalize(self, run: ModelContext) -> list[LayerRecord]:
        self._window = []
        count = run.adapter.num_layers
        if self.cfg.layers is not None:
            chosen = sorted(self.cfg.layers)
        elif self._n == 0:
            chosen = []
        elif self.cfg.metric == "block_influence":
            chosen = lowest(self._scores, self._n)
        else:
            chosen = best_block(self._scores, self._n)
        records = self._records(run, chosen)
        run.adapter.remove_layers(chosen)
        run.structure["layer_drop"] = {
            "metric": self.cfg.metric, "removed": chosen, "layers_before": count, "layers_after": count - len(chosen),
            "scores": [round(s, 6) for s in self._scores],
        }
        return records

    def _records(self, run: ModelContext, chosen: list[int]) -> list[LayerRecord]:
        """One row per original layer: its score, whether it went and its parameters before and after."""
        metric = self.cfg.metric
        rank = {i: r + 1 for r, i in enumerate(sorted(range(len(self._scores)), key=lambda i: (self._scores[i], i)))}
        records = []
        for index, layer in enumerate(run.adapter.layers()):
            params = [p for p in layer.parameters()]
            numel = sum(p.numel() for p in params)
            size = sum(p.numel() * p.element_size() for p in params)
            gone = index in chosen
            score = self._scores[index] if index < len(self._scores) else None
            label = "block influence" if metric == "block_influence" else f"angular distance of layers {index}.." \
                f"{index + self._n - 1}"
            note = f"removed ({label} {score:.5f}, rank {rank[index]})" if gone and score is not None else \
                ("removed (chosen by layers)" if gone else "")
            records.append(LayerRecord(
                module=run.adapter.layer_prefix(index), method=self.name, kept_fraction=0.0 if gone else 1.0,
                params_before=numel, params_after=0 if gone else numel, bytes_before=size,
                bytes_after=0 if gone else size, note=note,
                extra={"layer": index, "score": score, "metric": metric, "removed": gone, "rank": rank.get(index)},
            ))
        return records
