"""SliceGPT (Ashkboos et al., 2024): rotate the residual stream onto its principal directions and slice it.

``prepare`` makes the model rotation-invariant (``invariance.py``), picks the first basis and rotates the
embeddings; ``apply`` rotates and slices one decoder layer; ``finalize`` rotates the head and records the
structure the shipped modeling file rebuilds (``compressor/models/shipped/modeling_sliced.py``). The math is
in ``ops.py``, the measured covariances and their bases in ``covariance.py``.

Two rotation schemes:

- ``per_layer`` (the paper's): a basis per point of the stream, from the PCA of the signal entering each block's
  MLP and leaving it, with every earlier block already sliced (raw covariance, as the reference); shortcut
  matrices ``Q_l^T Q_{l+1}`` carry the residual between bases (two ``[d, d]`` matrices per layer).
- ``shared`` (the default): one basis for the whole stream, from the covariance pooled over every block input and
  the final norm's input of the unsliced model, each token scaled to unit RMS (what the norms pass on), measured
  layer by layer (``pooled.py``; a streamed run reads every layer once more for it). No shortcut matrices. On
  SmolLM2-135M at 25% it is both smaller and better (benchmarks/slicegpt.py); pooling raw covariances instead lets
  the late layers' large activations pick the basis, and is much worse.

Tied embeddings stay tied in both (see ``invariance.py``): two small projections instead of an untied
``[vocab, d]`` head. The head reads the stream at full width (the last layer's MLP writes all of it).

Under torchrun each process measures its share of the calibration batches; every covariance is a raw float64 sum
``X^T X`` (no mean, so no count to weigh), summed over the processes before its eigendecomposition, which one
process computes and broadcasts (``covariance.principal_basis``): every process rotates with the same bits.
"""

from __future__ import annotations

import logging
import math
import time
from typing import TYPE_CHECKING, Any, Literal

import torch
from pydantic import Field, field_validator, model_validator
from torch import nn

from compressor.errors import RecipeError
from compressor.methods.base import LayerRecord, Method, MethodConfig
from compressor.methods.prune.slicegpt import ops
from compressor.methods.prune.slicegpt.covariance import input_covariance, principal_basis, stream_covariance
from compressor.methods.prune.slicegpt.invariance import (
    Ready,
    convert_layer,
    make_rotation_ready,
    set_linear,
    shortcut,
)
from compressor.methods.prune.slicegpt.streamed import StreamedEnds
from compressor.methods.registry import register_method
from compressor.models.shipped import auto_class_name
from compressor.models.shipped.modeling_sliced import PREFIX

if TYPE_CHECKING:
    from compressor.engine import LayerContext, ModelContext

log = logging.getLogger(__name__)

REMOTE_CODE_FILE = "modeling_sliced.py"


class SliceGPTConfig(MethodConfig):
    """Rotate the residual stream onto its principal directions and keep the first ``d`` of them.

    ```yaml
    - method: slicegpt
      slicing: 0.25        # remove 25% of the hidden dimension (or give dim: 432)
      round_to: 8          # the kept width is rounded down to a multiple of this
      rotation: shared     # one basis for the whole stream; per_layer = the paper's, with shortcut matrices
    ```
    The result is stored with a small modeling file (``auto_map``): ``from_pretrained(DIR,
    trust_remote_code=True)`` or ``compressor.load(DIR)``. Put quantizing stages after this one.
    """

    slicing: float | None = Field(
        None, description="Fraction of the hidden dimension to remove, in (0, 1); 0.25 when neither it nor dim is set."
    )
    dim: int | None = Field(
        None, ge=1, description="Kept stream width instead of slicing (the hidden size itself = rotate only)."
    )
    round_to: int = Field(8, ge=1, description="Round the kept width down to a multiple of this (with slicing).")
    rotation: Literal["per_layer", "shared"] = Field(
        "shared", description="per_layer: a basis per block with shortcut matrices; shared: one basis, none."
    )

    @field_validator("slicing")
    @classmethod
    def _fraction(cls, value: float | None) -> float | None:
        if value is not None and not 0.0 < value < 1.0:
            raise ValueError(f"slicing must be a fraction strictly between 0 and 1, got {value}")
        return value

    @model_validator(mode="after")
    def _one_width(self) -> SliceGPTConfig:
        if self.dim is not None and self.slicing is not None:
            raise ValueError("set either slicing or dim, not both")
        if self.dim is not None and self.dim % self.round_to:
            raise ValueError(
                f"dim {self.dim} is not a multiple of round_to {self.round_to} (set round_to: 1 to allow it)"
            )
        return self


@register_method("slicegpt")
class SliceGPT(Method):
    config_class = SliceGPTConfig
    kind = "prune"
    supports_distributed = True  # every covariance is summed over the processes (principal_basis)

    def __init__(self, config: MethodConfig) -> None:
        super().__init__(config)
        self._ready: Ready | None = None
        self._basis: torch.Tensor | None = None  # [D, d] float64: the stream's current basis
        self._shared: torch.Tensor | None = None  # [D, D]: the shared rotation
        self._shared_lost = 0.0
        self._width = 0
        #: The first basis and its eigenvalues (prepare's PCA over a forward of the whole model), for a resume.
        self._first: dict[str, torch.Tensor] = {}
        self._resumed: dict[str, torch.Tensor] = {}  # the same, saved by an interrupted run (restore_state)
        self._streamed: StreamedEnds | None = None  # the run streams its layers (streamed.py)

    @classmethod
    def check_recipe(cls, config: MethodConfig, later: list[MethodConfig], export_format: str) -> str | None:
        if export_format == "compressor-int8":  # its directory rebuilds from config.json alone (bitstack's ships ours)
            return (f"slicegpt's model needs its own modeling file, which a {export_format} directory cannot use; "
                    "use dense or compressed-tensors")
        if export_format == "gguf":
            return ("slicegpt changes the model's structure, which GGUF cannot store; "
                    "use format: dense or compressed-tensors")
        return None

    @property
    def _config(self) -> SliceGPTConfig:
        assert isinstance(self.config, SliceGPTConfig)
        return self.config

    # ---- model level -----------------------------------------------------------------------
    def prepare(self, run: ModelContext) -> list[LayerRecord]:
        start = time.perf_counter()
        self._width = self._check(run)
        params_before = _embedding_params(run)
        self._streamed = None if run.stream is None else StreamedEnds(run)
        self._ready = make_rotation_ready(run.model, run.adapter, self._config.rotation, layers=run.stream is None)
        self._first = self._resumed or dict(zip(("values", "Q"), self._first_basis(run), strict=True))
        values, Q = self._first["values"], self._first["Q"]
        if self._config.rotation == "shared":
            self._shared, self._shared_lost = Q, ops.lost_fraction(values, self._width)
        self._basis = Q[:, : self._width]
        lost = ops.lost_fraction(values, self._width)
        for linear in self._ready.embedding_writers:
            set_linear(linear, ops.rotate_output(linear.weight.data, None, self._basis.to(linear.weight.device))[0])
        for embedding in self._ready.embedding_rows:
            embedding.weight.data = ops.rotate_input(embedding.weight.data, self._basis.to(embedding.weight.device))
            embedding.embedding_dim = self._width
        if self._streamed:
            self._streamed.rows(run, self._ready, self._basis)
        run.model.config.slicing["embedding_width"] = self._width
        note = "tied embedding kept tied: lookup then [hidden -> d] projection" if self._ready.tied else ""
        return [LayerRecord(
            module="embeddings", method=self.name, kept_fraction=self._width / run.adapter.hidden_size,
            params_before=params_before, params_after=_embedding_params(run), rel_error=math.sqrt(lost),
            seconds=time.perf_counter() - start, note=note, extra={"width": self._width, "lost_energy": lost},
        )]

    def _first_basis(self, run: ModelContext) -> tuple[torch.Tensor, torch.Tensor]:
        """(eigenvalues, basis) of the stream: pooled over every block (shared) or entering layer 0 (per_layer)."""
        return principal_basis(stream_covariance(run, self._config.rotation))

    def checkpoint_state(self) -> dict[str, torch.Tensor]:
        """The first basis: for ``shared``, the PCA of a sweep over the whole model (the per-layer ones are cheap)."""
        return dict(self._first)

    def restore_state(self, state: dict[str, torch.Tensor]) -> bool:
        """``prepare`` takes the saved basis instead of measuring; the layers must still be rotated (False)."""
        if {"values", "Q"} <= state.keys():
            self._resumed = {"values": state["values"], "Q": state["Q"]}
        return False

    def _check(self, run: ModelContext) -> int:
        """The kept width, after every model-dependent check (before any calibration data is run)."""
        adapter, config = run.adapter, self._config
        problem = adapter.rotation_blocker()
        if problem:
            raise RecipeError(f"slicegpt cannot fold this model's norms: {problem}")
        if getattr(run.model.config, "slicing", None):
            raise RecipeError(
                "slicegpt: the model is already sliced (config.json has 'slicing'); start from the dense model"
            )
        try:
            auto_class_name(PREFIX, run.model)
        except LookupError as exc:
            raise RecipeError(f"slicegpt: no sliced modeling class: {exc}") from None
        try:
            return ops.sliced_width(adapter.hidden_size, config.slicing, config.dim, config.round_to)
        except ValueError as exc:
            raise RecipeError(f"slicegpt: {exc}; change slicing, dim or round_to") from None

    def finalize(self, run: ModelContext) -> list[LayerRecord]:
        assert self._ready is not None and self._basis is not None
        start = time.perf_counter()
        head = self._ready.head_reader
        before = head.weight.numel()
        set_linear(head, ops.rotate_input(head.weight.data, self._basis.to(head.weight.device)))
        if self._streamed:
            self._streamed.head(run, self._ready, self._basis)
        spec = run.model.config.slicing
        class_name = auto_class_name(PREFIX, run.model)
        run.structure["remote_code"] = {
            "file": REMOTE_CODE_FILE,
            "auto_map": {"AutoModelForCausalLM": f"{REMOTE_CODE_FILE.removesuffix('.py')}.{class_name}"},
            "config": {"slicing": spec},
        }
        run.structure[self.name] = _summary(run, spec, self._ready)
        return [LayerRecord(module="head", method=self.name, params_before=before, params_after=head.weight.numel(),
                            seconds=time.perf_counter() - start, note="reads the full-width stream")]

    # ---- per layer --------------------------------------------------------------------------
    def apply(self, ctx: LayerContext) -> list[LayerRecord]:
        start = time.perf_counter()
        if self._streamed:  # loaded as the checkpoint has it: fold and rebuild it now, as prepare does in RAM
            ctx.layer = ctx.adapter.layers()[ctx.index] = convert_layer(ctx.adapter, ctx.layer, ctx.index,
                                                                        ctx.run.model.config)
        before = _params(ctx.layer)
        last = ctx.index == ctx.adapter.num_layers - 1
        if self._config.rotation == "shared":
            losses = self._apply_shared(ctx, last)
        else:
            losses = self._apply_per_layer(ctx, last)
        layer: Any = ctx.layer
        adapter = ctx.adapter
        spec = ctx.run.model.config.slicing["layers"][ctx.index]
        spec.update(
            {"in": adapter.attention_inputs(layer)[0].in_features, "mid": adapter.mlp_inputs(layer)[0].in_features,
             "out": adapter.mlp_output(layer).out_features,
             "attn_shortcut": layer.attn_shortcut is not None, "mlp_shortcut": layer.mlp_shortcut is not None}
        )
        after = _params(ctx.layer)
        return [LayerRecord(
            module=ctx.prefix, method=self.name, kept_fraction=after / before, params_before=before,
            params_after=after, bytes_before=before * _itemsize(ctx.layer), bytes_after=after * _itemsize(ctx.layer),
            rel_error=math.sqrt(max(losses.values())), seconds=time.perf_counter() - start,
            extra={"widths": [spec["in"], spec["mid"], spec["out"]], "lost_energy": losses},
        )]

    def _apply_shared(self, ctx: LayerContext, last: bool) -> dict[str, float]:
        assert self._basis is not None and self._shared is not None
        adapter, layer = ctx.adapter, ctx.layer
        Q = self._basis
        _rotate_readers(adapter.attention_inputs(layer), Q)
        _rotate_writer(adapter.attention_output(layer), Q)
        _rotate_readers(adapter.mlp_inputs(layer), Q)
        _rotate_writer(adapter.mlp_output(layer), self._shared if last else Q)
        if last:
            self._basis = self._shared
        return {"pooled": self._shared_lost}

    def _apply_per_layer(self, ctx: LayerContext, last: bool) -> dict[str, float]:
        """Rotate the readers into the incoming basis, then choose and apply the bases after attention and MLP."""
        assert self._basis is not None
        adapter, layer = ctx.adapter, ctx.layer
        layer_any: Any = layer
        Q_in, width = self._basis, self._width
        weight = adapter.attention_output(layer).weight
        _rotate_readers(adapter.attention_inputs(layer), Q_in)
        layer_any.attn_shortcut = shortcut(Q_in.T, weight)  # back to original coordinates, full width
        values, Q_mid = principal_basis(input_covariance(ctx, adapter.mlp_norm(layer)))
        Q_mid = Q_mid[:, :width]
        layer_any.attn_shortcut = shortcut(ops.basis_change(Q_in, Q_mid), weight)
        _rotate_writer(adapter.attention_output(layer), Q_mid)
        _rotate_readers(adapter.mlp_inputs(layer), Q_mid)
        layer_any.mlp_shortcut = shortcut(Q_mid.T, weight)
        losses = {"mlp_input": ops.lost_fraction(values, width)}
        cov = None
        for out in ctx.forward():
            cov = ops.accumulate_covariance(cov, out)
        assert cov is not None
        values, Q_out = principal_basis(cov)
        Q_out = Q_out if last else Q_out[:, :width]
        layer_any.mlp_shortcut = shortcut(ops.basis_change(Q_mid, Q_out), weight)
        _rotate_writer(adapter.mlp_output(layer), Q_out)
        losses["output"] = ops.lost_fraction(values, Q_out.shape[1])
        self._basis = Q_out
        return losses


def _rotate_readers(linears: list[nn.Linear], Q: torch.Tensor) -> None:
    for linear in linears:
        set_linear(linear, ops.rotate_input(linear.weight.data, Q.to(linear.weight.device)))


def _rotate_writer(linear: nn.Linear, Q: torch.Tensor) -> None:
    bias = None if linear.bias is None else linear.bias.data
    set_linear(linear, *ops.rotate_output(linear.weight.data, bias, Q.to(linear.weight.device)))


def _params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _itemsize(module: nn.Module) -> int:
    return next(module.parameters()).element_size()


def _embedding_params(run: ModelContext) -> int:
    """Parameters of the embeddings, the final norm and the head, a tied matrix counted once."""
    adapter = run.adapter
    modules = [*adapter.embeddings(), adapter.final_norm(), adapter.lm_head()]
    unique = {id(p): p for m in modules for p in m.parameters()}
    return sum(p.numel() for p in unique.values())


def _summary(run: ModelContext, spec: dict[str, Any], ready: Ready) -> dict[str, Any]:
    """What the report says about the structure: widths, shortcut and projection parameters, embeddings."""
    layers = run.adapter.layers()
    shortcut_params = sum(p.numel() for layer in layers for name in ("attn_shortcut", "mlp_shortcut")
                          if getattr(layer, name) is not None for p in getattr(layer, name).parameters())
    hidden = run.adapter.hidden_size
    width = spec["embedding_width"]
    tied = ready.tied
    projections = [*ready.embedding_writers, ready.head_reader] if tied else []
    projection_params = sum(p.numel() for m in projections for p in m.parameters())
    return {
        "rotation": spec["rotation"],
        "hidden_size": hidden,
        "width": width,
        "shortcut_params": shortcut_params,
        "embeddings": (
            f"tied, kept tied through two projections ({projection_params} parameters); untying them instead "
            f"would add a [vocab, {width}] head" if tied else "untied: embedding and head sliced separately"
        ),
        "head_width": spec["layers"][-1]["out"],
    }
