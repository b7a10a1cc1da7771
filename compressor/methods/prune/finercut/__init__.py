"""FinerCut: remove attention and MLP sublayers one at a time, each time the one the output misses least.

Candidates are every decoder layer's attention and MLP sublayers. Each greedy step scores every remaining
candidate by how far the model's next-token distribution (KL or Jensen-Shannon divergence from the original
model's, at the scored positions) or final hidden states (cosine distance) move when that sublayer is removed
on top of those already gone, and removes the best one; it stops after ``remove`` sublayers or before the
removed parameters would pass ``ratio`` of the decoder layers' parameters.

What makes it fast: the engine's pass leaves the hidden states entering every layer cached (in RAM, or in
memory-mapped files above ``--activation-memory``: ``cache.StateCache``), so a candidate in layer ``i`` is scored by
running layers ``i..L-1`` only, and a committed removal recomputes only the states after it; the original outputs
are kept once, at a subset of positions. The lazy search rescores only candidates that could still be the best, one
chunk of sequences at a time, dropping one as soon as its partial sum shows it cannot be (``ops.bounded_removal``:
``ops.greedy_removal``'s removals when removals only add harm), every bound raised by the damage done so far
(``SublayerSearch.baseline``, read off the cached final states). The screened search ranks candidates on a few
sequences and scores only the best few on all (``ops.screened_removal``): about samples / screen_samples cheaper
per step, but it can choose worse removals.

A removed sublayer is swapped for weightless stand-ins that add exactly zero to the residual stream (the
classes of ``compressor/models/shipped/modeling_finercut.py``, the file the export ships, so the model in
memory and the reloaded one compute the same thing). Where a family keeps its sublayers is its description's
``layout()``, which the export writes into config.json as ``finercut_layout`` for that file. A layer that
lost both sublayers is the identity and is removed whole through the adapter; when nothing else was removed
the export is a standard config.

The search's result (removals in order, scores, counts, times) is the pass's whole output: a checkpointed run saves
it after the pass (``checkpoint_state``); a resumed one re-applies the removals in order without searching again.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any, Literal

import torch
from pydantic import Field, field_validator, model_validator

from compressor.errors import RecipeError, UsageError
from compressor.methods.base import Count, Fraction, LayerRecord, Method, MethodConfig
from compressor.methods.prune.finercut.cache import StateCache
from compressor.methods.prune.finercut.ops import (
    SearchResult,
    bounded_removal,
    greedy_removal,
    scored_positions,
    screened_removal,
)
from compressor.methods.prune.finercut.saved import Searched, from_state, to_state
from compressor.methods.prune.finercut.search import Key, SublayerSearch, sublayer_params
from compressor.methods.registry import register_method
from compressor.models.loading import fast_bfloat16
from compressor.models.shipped import auto_class_name
from compressor.models.shipped.modeling_finercut import PREFIX, SUBLAYERS, is_removed, remove_sublayer

if TYPE_CHECKING:
    from compressor.engine import LayerContext, ModelContext

log = logging.getLogger(__name__)

DEFAULT_RATIO = 0.25
DEFAULT_SCREEN_SAMPLES = 2
DEFAULT_RESCORE_TOP = 3
#: One sequence per chunk: the finest bound (a candidate whose score is far above the best one's is dropped after
#: one sequence). Smaller batches cost no more per sequence here: one Llama decoder layer at SmolLM2's widths
#: (576 / 1536, 9 / 3 heads), 256 tokens, 1 thread at load ~4.5, ran 66, 62 and 64 ms per sequence in batches of
#: 1, 2 and 8 sequences.
DEFAULT_CHUNK_SAMPLES = 1
#: ops.bounded_removal's ``margin``: a candidate is scored only until it is no longer the best bound (1), not banked
#: higher. In simulated greedy runs (60 candidates, 16 chunks) banking at 2x saved 10-25% of the layer forwards when
#: few candidates are rescored per step, and cost 5-15% when many are; FinerCut on the demo model rescored about 21
#: per step (README, layer removal: 492 evaluations for 21 removals), the second kind.
BOUND_MARGIN = 1.0
REMOTE_CODE_FILE = "modeling_finercut.py"


class FinerCutConfig(MethodConfig):
    """Greedy removal of attention / MLP sublayers by their effect on the model's output.

    ```yaml
    - method: finercut
      ratio: 0.25          # of the decoder layers' parameters (never exceeded); or remove: 16 sublayers
      measure: kl          # kl | js | cosine
      sublayers: both      # both | attention | mlp
      positions: 64        # scored positions per calibration sequence (null: all)
      search: lazy         # lazy | screened | exact
      screen_samples: 2    # screened: calibration sequences every candidate is ranked on
      rescore_top: 3       # screened: best-ranked candidates scored on every sequence each step
      chunk_samples: 1     # lazy: sequences scored at a time before a candidate's partial sum is checked
      search_dtype: float32  # float32 | bfloat16 (forwards under bfloat16 autocast) | auto (bfloat16 where fast)
    ```
    Set at most one of ``remove`` and ``ratio``; with neither, 25% of the layers' parameters are removed.
    ``screen_samples`` and ``rescore_top`` belong to ``search: screened``, ``chunk_samples`` to ``search: lazy``;
    each is refused with the other searches.
    """

    remove: Count = Field(None, description="Number of sublayers to remove (0 keeps the model as it is).")
    ratio: Fraction = Field(
        None, description="Fraction of the decoder layers' parameters to remove, in (0, 1); never exceeded."
    )
    measure: Literal["kl", "js", "cosine"] = Field(
        "kl", description="kl / js: divergence of next-token distributions from the original model's; "
        "cosine: cosine distance of the final hidden states."
    )
    sublayers: Literal["both", "attention", "mlp"] = Field("both", description="Which sublayers are candidates.")
    positions: int | None = Field(
        64, description="Evenly spaced positions per calibration sequence at which outputs are compared "
        "(the forward still sees every token); null compares all."
    )
    search: Literal["screened", "lazy", "exact"] = Field(
        "lazy", description="exact: rescore every candidate at every step (the paper); lazy: rescore only "
        "candidates whose last score says they could be the best, chunk by chunk, until their partial sum says "
        "they cannot (same result when removals only add harm); screened: rank candidates lazily on "
        "screen_samples sequences and score the rescore_top best on all."
    )
    screen_samples: int | None = Field(
        None, ge=1, description="search: screened: calibration sequences every candidate is ranked on (all of "
        f"them when there are fewer; null: {DEFAULT_SCREEN_SAMPLES})."
    )
    rescore_top: int | None = Field(
        None, ge=1, description="search: screened: candidates with the best screen scores that are scored on "
        f"every sequence each step (at least the number of candidates: the exact search; null: {DEFAULT_RESCORE_TOP})."
    )
    chunk_samples: int | None = Field(
        None, ge=1, description="search: lazy: calibration sequences a candidate is scored on at a time (within "
        f"one calibration batch) before its partial sum is compared with the others' (null: {DEFAULT_CHUNK_SAMPLES})."
    )

    search_dtype: Literal["float32", "bfloat16", "auto"] = Field(
        "float32", description="Precision of the search's forwards. bfloat16 runs them under bfloat16 autocast: "
        "several times faster on GPUs and on CPUs with AVX512-BF16 or AMX, slower on other CPUs; the removals may "
        "differ from float32's where candidates score within bfloat16's rounding of each other. auto: bfloat16 "
        "where it is fast, else float32 (the report says which ran). The exported weights are the model's own."
    )

    @field_validator("positions")
    @classmethod
    def _positions_positive(cls, value: int | None) -> int | None:
        if value is not None and value < 1:
            raise ValueError(f"positions must be at least 1 (or null for all), got {value}")
        return value

    @model_validator(mode="after")
    def _one_amount(self) -> FinerCutConfig:
        if self.remove is not None and self.ratio is not None:
            raise ValueError("set only one of remove and ratio")
        screening = [name for name in ("screen_samples", "rescore_top") if getattr(self, name) is not None]
        if screening and self.search != "screened":
            raise ValueError(f"{' and '.join(screening)} apply only to search: screened (search is {self.search})")
        if self.chunk_samples is not None and self.search != "lazy":
            raise ValueError(f"chunk_samples applies only to search: lazy (search is {self.search})")
        return self


@register_method("finercut")
class FinerCut(Method):
    config_class = FinerCutConfig
    kind = "prune"
    model_level = True

    def __init__(self, config: MethodConfig) -> None:
        super().__init__(config)
        self._cache: StateCache | None = None  # the hidden states entering every layer, from prepare to the search
        #: ``_kwargs[l][b]``: the keyword arguments layer ``l`` gets for batch ``b`` (its own attention mask).
        self._kwargs: list[list[dict[str, Any]]] = []
        self._searched: Searched | None = None  # this run's search, once finalize has run
        self._restored: Searched | None = None  # the search of an interrupted run (restore_state)

    @property
    def cfg(self) -> FinerCutConfig:
        assert isinstance(self.config, FinerCutConfig)
        return self.config

    @classmethod
    def check_recipe(cls, config: MethodConfig, later: list[MethodConfig], export_format: str) -> str | None:
        from compressor.methods.registry import get_method

        if export_format == "gguf":
            return "finercut: GGUF cannot store layers without an attention or MLP sublayer (use dense)"
        if export_format == "compressor-int8":  # its directory rebuilds from config.json alone (bitstack's ships ours)
            return (f"finercut's model needs its own modeling file, which a {export_format} directory cannot use; "
                    "use dense or compressed-tensors")
        for stage in later:
            if get_method(stage.method).kind == "prune":
                return (f"finercut must be the last pruning stage: {stage.method} after it would change the "
                        "layers whose sublayers it removed")
            if any(rule.startswith("re:") for rule in getattr(stage, "targets", [])):
                return (f"finercut: {stage.method} after it must target modules by class name (e.g. Linear), "
                        "not by regex: removed sublayers leave weightless stand-ins at their paths")
        return None

    def _candidates(self, run: ModelContext) -> list[Key]:
        kinds = SUBLAYERS if self.cfg.sublayers == "both" else (self.cfg.sublayers,)
        layout = run.adapter.family.layout()
        return [(i, kind) for i, layer in enumerate(run.adapter.layers()) for kind in kinds
                if not is_removed(layer, layout, kind)]

    def prepare(self, run: ModelContext) -> list[LayerRecord]:
        reason = run.adapter.pre_norm_blocker()
        if reason:
            raise RecipeError(f"finercut cannot remove sublayers of {reason}")
        available = len(self._candidates(run))
        if self.cfg.remove is not None and self.cfg.remove >= available:
            raise RecipeError(f"finercut: cannot remove {self.cfg.remove} of the model's {available} candidate "
                              "sublayers (remove must leave at least one)")
        self._cache = StateCache(run.adapter.num_layers + 1, run.activation_limit, run.temp_dir)
        self._kwargs, self._searched = [], None
        return []

    def checkpoint_state(self) -> dict[str, torch.Tensor]:
        """The search's result once ``finalize`` has run (nothing before: a search cut short is redone whole)."""
        return to_state(self._searched) if self._searched is not None else {}

    def restore_state(self, state: dict[str, torch.Tensor]) -> bool:
        if "removed" not in state:
            return False
        self._restored = from_state(state)
        return True

    def apply(self, ctx: LayerContext) -> list[LayerRecord]:
        """Keep the hidden states and kwargs entering every layer (and the states leaving the last)."""
        if self._restored is not None:  # the removals are known; another stage of the pass needed the sweep
            return []
        assert self._cache is not None, "prepare makes the cache"
        self._kwargs.append([batch.kwargs for batch in ctx.inputs])
        self._cache.add([batch.hidden for batch in ctx.inputs])
        if ctx.index == ctx.adapter.num_layers - 1:
            self._cache.add(ctx.forward())
        return []

    def finalize(self, run: ModelContext) -> list[LayerRecord]:
        start = time.perf_counter()
        adapter = run.adapter
        layout = adapter.family.layout()
        candidates = self._candidates(run)
        layers = adapter.layers()
        sizes = {key: sublayer_params(layers[key[0]], layout, key[1]) for key in candidates}
        total = sum(p.numel() for layer in layers for p in layer.parameters())
        count, budget = self._amount(total)
        if self._restored is not None:
            searched = self._restored
            if searched.candidates != candidates:
                raise UsageError("--resume: finercut's saved search names other candidate sublayers than the "
                                 "model has; rerun without --resume")
            for index, sublayer in (step.key for step in searched.result.steps):  # what search.commit did
                remove_sublayer(layers[index], layout, sublayer)
        else:
            searched = self._search(run, candidates, {k: v[0] for k, v in sizes.items()}, count, budget, start)
        self._searched, result = searched, searched.result
        records = self._records(run, candidates, sizes, result, searched.seconds)
        folded = _store_removals(run)
        removed_params = sum(sizes[s.key][0] for s in result.steps)
        run.structure["finercut"] = {
            "measure": self.cfg.measure, "search": self.cfg.search, "search_dtype": self._search_dtype(run),
            "positions": self.cfg.positions, "folded_layers": folded,
            "removed": [[s.key[0], s.key[1], round(s.score, 6)] for s in result.steps],
            "params_removed": removed_params, "params_budget": budget, "decoder_params": total,
            "evaluations": result.evaluations, "candidates": len(candidates), "seconds": round(searched.wall, 3),
            "layer_forwards": searched.forwards, **self._work(result),
            "state_cache": None if searched.cache is None else searched.cache.to_dict(),
        }
        log.info("finercut removed %d sublayers (%d params) with %d sequence-layer forwards in %.1f s",
                 len(result.steps), removed_params, searched.forwards, searched.wall)
        return records

    def _work(self, result: SearchResult[Key]) -> dict[str, Any]:
        """The search-specific counts of the structure's summary (screens; chunks in full-score equivalents)."""
        if self.cfg.search == "screened":
            return {"screen_samples": self._screen_samples(), "rescore_top": self._rescore_top(),
                    "screen_evaluations": result.screen_evaluations}
        if self.cfg.search == "lazy":
            return {"chunk_samples": self._chunk_samples(), "chunks": result.chunks,
                    "chunk_evaluations": result.chunk_evaluations, "touched": result.touched,
                    "evaluation_equivalents": round(result.chunk_evaluations / max(result.chunks, 1), 2)}
        return {}

    def _search(
        self, run: ModelContext, candidates: list[Key], params: dict[Key, int], count: int | None,
        budget: int | None, start: float,
    ) -> Searched:
        """The greedy search over the cached states, which it frees (``start``: when finalize began)."""
        _move(run, run.device)
        low = self._search_dtype(run) == "bfloat16"
        cache = self._cache
        assert cache is not None, "prepare makes the cache"
        try:
            with torch.autocast(run.device.type, dtype=torch.bfloat16, enabled=low):
                search = SublayerSearch(run.adapter, cache.states, self._kwargs,
                                        scored_positions(run.tokens.shape[1], self.cfg.positions), self.cfg.measure,
                                        screen_samples=self._screen_samples(), chunk_rows=self._chunk_samples(),
                                        store=cache.replace)
                if low:
                    search.recompute()
                if self.cfg.search == "screened":
                    result = screened_removal(candidates, params, search.screen, search.evaluate, search.commit,
                                              count=count, budget=budget, top=self._rescore_top())
                elif self.cfg.search == "lazy":
                    result = bounded_removal(candidates, params, search.score_chunk, len(search.chunks),
                                             search.tokens, search.commit, count=count, budget=budget,
                                             margin=BOUND_MARGIN, baseline=search.baseline)
                else:
                    result = greedy_removal(candidates, params, search.evaluate, search.commit, count=count,
                                            budget=budget, lazy=False)
        finally:
            _move(run, torch.device("cpu"))
            cache.close()
            self._cache, self._kwargs = None, []
        return Searched(candidates, result, search.seconds, time.perf_counter() - start, search.forwards,
                        cache.summary())

    def _search_dtype(self, run: ModelContext) -> str:
        """The search's precision on this run's device: ``auto`` is bfloat16 where that is fast."""
        if self.cfg.search_dtype == "auto":
            return "bfloat16" if fast_bfloat16(run.device) else "float32"
        return self.cfg.search_dtype

    def _chunk_samples(self) -> int | None:
        """Sequences per chunk of the lazy search's scores (None: whole batches, for the other searches)."""
        if self.cfg.search != "lazy":
            return None
        return self.cfg.chunk_samples or DEFAULT_CHUNK_SAMPLES

    def _screen_samples(self) -> int | None:
        """Sequences a screen runs (None: no screening, every score uses all of them)."""
        if self.cfg.search != "screened":
            return None
        return self.cfg.screen_samples or DEFAULT_SCREEN_SAMPLES

    def _rescore_top(self) -> int:
        return self.cfg.rescore_top or DEFAULT_RESCORE_TOP

    def _amount(self, total: int) -> tuple[int | None, int | None]:
        """(sublayer count, parameter budget): exactly one of them is set."""
        if self.cfg.remove is not None:
            return self.cfg.remove, None
        return None, int((self.cfg.ratio or DEFAULT_RATIO) * total + 0.5)

    def _records(
        self, run: ModelContext, candidates: list[Key], sizes: dict[Key, tuple[int, int]],
        result: SearchResult[Key], seconds: dict[Key, float],
    ) -> list[LayerRecord]:
        """One row per candidate, in layer order: first-step score, removal order and score, parameters.

        The lazy search completes a first-step score only where it had to: for the others ``score`` is None and
        ``score_at_least`` holds the lower bound that ruled them out.
        """
        order = {step.key: (n + 1, step.score) for n, step in enumerate(result.steps)}
        records = []
        for key in candidates:
            index, sublayer = key
            params, size = sizes[key]
            gone = key in order
            step, score = order.get(key, (None, None))
            note = f"removed #{step} ({self.cfg.measure} {score:.4g} when removed)" if gone else ""
            records.append(LayerRecord(
                module=f"{run.adapter.layer_prefix(index)}.{sublayer}", method=self.name,
                kept_fraction=0.0 if gone else 1.0, params_before=params, params_after=0 if gone else params,
                bytes_before=size, bytes_after=0 if gone else size, seconds=round(seconds.get(key, 0.0), 4),
                note=note, extra={"layer": index, "sublayer": sublayer, "score": result.first_scores.get(key),
                                  "measure": self.cfg.measure, "removed": gone, "order": step,
                                  "score_when_removed": score, "score_at_least": result.first_bounds.get(key)},
            ))
        return records


def _move(run: ModelContext, device: torch.device) -> None:
    for module in [*run.adapter.layers(), *run.adapter.after_layers(), run.adapter.lm_head()]:
        module.to(device)


def _store_removals(run: ModelContext) -> list[int]:
    """Record the removals in the config, drop layers that lost both sublayers, ship the modeling file.

    Returns the (pre-folding) indices of the layers removed whole.
    """
    adapter, config = run.adapter, run.adapter.config
    layout = adapter.family.layout()
    removed = [[s for s in SUBLAYERS if is_removed(layer, layout, s)] for layer in adapter.layers()]
    config.finercut_removed = removed
    folded = [i for i, subs in enumerate(removed) if len(subs) == len(SUBLAYERS)]
    adapter.remove_layers(folded)
    if not any(config.finercut_removed) and not _was_finercut(config):
        del config.finercut_removed
        return folded
    existing = run.structure.get("remote_code")
    if existing and existing.get("file") != REMOTE_CODE_FILE:
        raise RecipeError(f"finercut cannot be combined with a stage that ships {existing.get('file')}")
    run.structure["remote_code"] = {
        "file": REMOTE_CODE_FILE,
        "auto_map": {"AutoModelForCausalLM": f"modeling_finercut.{auto_class_name(PREFIX, run.model)}"},
        "config": {"finercut_removed": config.finercut_removed, "finercut_layout": layout},
    }
    return folded


def _was_finercut(config: object) -> bool:
    """True when the model was loaded from a FinerCut export (its config names our modeling file)."""
    auto_map = getattr(config, "auto_map", None) or {}
    return any(str(ref).startswith("modeling_finercut.") for ref in auto_map.values())
