"""Every registered method on every family: it changes what its records claim, forward works, the export reloads.

New methods are found through the registry: their config defaults must be valid on a tiny model. What a
method must change follows from its ``kind`` and its own records, never from its formulas:
- quant: every targeted linear's weight changed, and takes at most ``2**bits`` distinct values in each
  (row, group) of the record's ``group_size`` (per row when -1); without a group size (a decomposition, no
  grid) its ``bits`` must equal its stored ``bytes_after`` per weight;
- prune: the model loses at least the parameters the records say went, whole layers the records say went
  are gone, and an ``embeddings`` record's ``kept_fraction`` is the residual stream's new width;
- allocate: the records name a width per module, and the quantizer after it used exactly that width
  (at least one differing from the quantizer's own ``bits``, so the plan was consumed, not coincident).
The guard is tested too: no-op methods of every kind, registered for one test, are rejected.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from tiny import FAMILIES, tiny_model
from torch import nn

from compressor.engine import LayerContext, ModelContext, run_stages
from compressor.errors import RecipeError
from compressor.export import write_model
from compressor.methods import registry
from compressor.methods.base import LayerRecord, Method, MethodConfig, TargetedConfig
from compressor.methods.quant.common import WeightQuantConfig
from compressor.methods.quant.int8_linear import float_activations
from compressor.methods.registry import get_method, method_names
from compressor.models import get_adapter
from compressor.pipeline import load
from compressor.recipe import ExportConfig, build_stages


def _stages(name: str) -> list[Method]:
    method = get_method(name)
    configs = [method.config_class.model_validate({"method": name})]
    if method.kind == "allocate":  # a planner needs a quantizer after it
        configs.append(get_method("rtn").config_class.model_validate({"method": "rtn"}))
    return build_stages(configs, "dense")


@dataclass
class _Before:
    """What the model looked like before the stages ran, to compare the claims against."""

    weights: dict[str, torch.Tensor]
    #: Class name of every linear before the stages: what targets match (a stage may swap in its own class).
    classes: dict[str, str]
    params: int
    layer_prefixes: list[str]
    width: int

    @classmethod
    def of(cls, model: nn.Module, run: ModelContext) -> _Before:
        weights = {path: m.weight.detach().clone() for path, m in model.named_modules() if isinstance(m, nn.Linear)}
        classes = {path: type(m).__name__ for path, m in model.named_modules() if isinstance(m, nn.Linear)}
        prefixes = [run.adapter.layer_prefix(i) for i in range(run.adapter.num_layers)]
        return cls(weights, classes, _param_count(model), prefixes, _stream_width(run))


def _param_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())  # tied weights once


def _stream_width(run: ModelContext) -> int:
    """Width of the residual stream: of the hidden states entering layer 0 (hooked on a plain forward)."""
    widths: list[int] = []

    def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
        hidden = args[0] if args else kwargs["hidden_states"]
        widths.append(int(hidden.shape[-1]))

    handle = run.adapter.layers()[0].register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with torch.no_grad():
            run.model(run.tokens[:1, :4])
    finally:
        handle.remove()
    return widths[0]


def _distinct_per_group(W: torch.Tensor, group_size: int | None) -> torch.Tensor:
    """Number of distinct values in every (row, group) of ``W: [out, in]``: ``[out, n_groups]``."""
    out, columns = W.shape
    size = columns if group_size is None or group_size <= 0 else group_size
    assert columns % size == 0, f"group_size {size} does not divide {columns} columns"
    blocks = W.detach().float().reshape(out, columns // size, size).sort(dim=-1).values
    return (blocks.diff(dim=-1) != 0).sum(dim=-1) + 1


def _group_widths(record: LayerRecord, run: ModelContext, n_groups: int) -> torch.Tensor:
    """Each group's claimed width: the record's ``bits``, or the stored per-group widths when mixed."""
    assert record.bits is not None, f"{record.module}: a quantizer's record must say its bits"
    if float(record.bits).is_integer():
        return torch.full((n_groups,), int(record.bits))
    stored = run.quantized[record.module]
    assert stored.group_bits is not None, f"{record.module}: {record.bits} bits but no per-group widths stored"
    assert round(stored.average_bits(), 4) == record.bits, f"{record.module}: record and stored widths disagree"
    return stored.group_bits.long().cpu()


def _check_quantized(config: MethodConfig, run: ModelContext, own: list[LayerRecord], before: _Before) -> None:
    assert isinstance(config, TargetedConfig)
    modules = dict(run.model.named_modules())
    targeted = {p for p, m in modules.items()
                if isinstance(m, nn.Linear) and config.matches(p, before.classes.get(p, type(m).__name__))}
    assert targeted, f"{config.method}: targets nothing on this model"
    assert {r.module for r in own} == targeted, f"{config.method}: records do not cover exactly the targeted linears"
    for record in own:
        W = modules[record.module].weight
        assert not torch.equal(W, before.weights[record.module]), f"{record.module}: weight unchanged"
        if record.group_size is None:  # no grid (a decomposition, BitStack): its bits must be its stored bytes
            assert record.bits == pytest.approx(record.bytes_after * 8 / W.numel(), abs=1e-4) and record.bits > 0
            continue
        distinct = _distinct_per_group(W, record.group_size)
        limit = 2 ** _group_widths(record, run, distinct.shape[1])
        worst = int((distinct - limit[None, :]).max())
        assert worst <= 0, f"{record.module}: a (row, group) holds {worst} values more than 2**bits"


def _check_pruned(run: ModelContext, own: list[LayerRecord], before: _Before) -> None:
    stream = [r for r in own if r.module == "embeddings"]
    if stream:
        assert stream[0].kept_fraction is not None
        expected = round(stream[0].kept_fraction * before.width)
        assert expected < before.width, "an embeddings record must narrow the stream"
        assert _stream_width(run) == expected, f"stream is {_stream_width(run)} wide, records say {expected}"
    gone = [r for r in own if r.module in before.layer_prefixes and r.params_after == 0 < r.params_before]
    layers = run.adapter.num_layers
    assert layers == len(before.layer_prefixes) - len(gone), f"{layers} layers, records say {len(gone)} went"
    claimed = sum(r.params_before - r.params_after for r in own)
    assert claimed > 0, "a pruner's records must say what went"
    removed = before.params - _param_count(run.model)
    assert removed >= claimed, f"records claim {claimed} parameters removed, the model lost {removed}"


def _check_planned(stages: list[Method], own: list[LayerRecord], records: list[LayerRecord]) -> None:
    quant = next(s for s in stages if type(s).kind == "quant")
    used = {r.module: r.bits for r in records if r.method == quant.name}
    planned = {r.module: r.bits for r in own}
    assert planned and all(b is not None for b in planned.values()), "an allocator's records must give widths"
    assert used == planned, f"{quant.name} did not use the planned widths"
    assert any(b != getattr(quant.config, "bits", None) for b in used.values()), "the plan changed nothing"


def check_claims(stages: list[Method], run: ModelContext, records: list[LayerRecord], before: _Before) -> None:
    """Each stage changed the model as its kind and its records say (AssertionError naming what did not)."""
    assert records, "a method must say what it did"
    assert all(r.method for r in records)
    for stage in stages:
        own = [r for r in records if r.method == stage.name]
        assert own, f"{stage.name}: no records"
        if stage.kind == "quant":
            _check_quantized(stage.config, run, own, before)
        elif stage.kind == "prune":
            _check_pruned(run, own, before)
        else:
            _check_planned(stages, own, records)


def _run_contract(name: str, family: str) -> tuple[ModelContext, torch.Tensor]:
    model = tiny_model(family)
    tokens = torch.randint(0, 300, (4, 32), generator=torch.Generator().manual_seed(0))
    run = ModelContext(model, get_adapter(model), tokens, torch.device("cpu"), batch_size=2)
    before = _Before.of(model, run)
    stages = _stages(name)
    check_claims(stages, run, run_stages(run, stages), before)
    return run, tokens


#: (method, family) -> what the method's refusal must say; for such a pair the contract is that refusal.
REFUSED = {("slicegpt", "gemma3"): "post-norms", ("slicegpt", "mixtral"): "router and per-expert MLPs",
           ("slicegpt", "qwen3_moe"): "router and per-expert MLPs",
           ("flap", "opt"): "not a gate/up/down triple", ("flap", "gemma3"): "post-norms",
           ("flap", "phi3"): "fuses q/k/v", ("flap", "mixtral"): "mixture of experts",
           ("flap", "qwen3_moe"): "mixture of experts"}


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("name", method_names())
def test_method_contract(name: str, family: str, tmp_path: Path, tiny_tokenizer) -> None:
    if (name, family) in REFUSED:
        with pytest.raises(RecipeError, match=REFUSED[name, family]):
            _run_contract(name, family)
        return
    run, tokens = _run_contract(name, family)
    model = run.model
    with torch.no_grad():
        logits = model(tokens).logits
    assert logits.shape == (4, 32, model.config.vocab_size)
    assert torch.isfinite(logits).all()
    write_model(ExportConfig(format="dense"), run, tiny_tokenizer, tmp_path)
    reloaded = load(tmp_path).model
    with torch.no_grad(), float_activations(model):  # a dense file stores weights, not INT8 activations
        torch.testing.assert_close(reloaded(tokens).logits, model(tokens).logits, rtol=1e-4, atol=1e-4)


# ---- the guard rejects methods that do nothing ----------------------------------------------------------


def _targeted(ctx: LayerContext, config: TargetedConfig) -> list[tuple[str, nn.Linear]]:
    return [(ctx.path(n), m) for n, m in ctx.layer.named_modules()
            if isinstance(m, nn.Linear) and config.matches(ctx.path(n), type(m).__name__)]


class _QuantConfig(WeightQuantConfig):
    pass


class _ClaimsQuantized(Method):
    """Records every targeted linear as quantized and leaves the weights alone."""

    config_class = _QuantConfig
    kind = "quant"

    def apply(self, ctx: LayerContext) -> list[LayerRecord]:
        config = self.config
        assert isinstance(config, _QuantConfig)
        return [LayerRecord(module=p, method=self.name, bits=config.bits, group_size=-1)
                for p, _ in _targeted(ctx, config)]


class _Perturbs(_ClaimsQuantized):
    """Changes every targeted weight, but by noise: nothing lands on a grid."""

    def apply(self, ctx: LayerContext) -> list[LayerRecord]:
        for _, module in _targeted(ctx, self.config):  # type: ignore[arg-type]
            module.weight.data += 1e-3 * torch.randn_like(module.weight)
        return super().apply(ctx)


class _SaysNothing(Method):
    config_class = MethodConfig
    kind = "prune"

    def apply(self, ctx: LayerContext) -> list[LayerRecord]:
        return [LayerRecord(module=ctx.prefix, method=self.name)]


class _ClaimsLayerRemoved(_SaysNothing):
    """Reports layer 0 as removed, removes nothing."""

    def finalize(self, run: ModelContext) -> list[LayerRecord]:
        numel = sum(p.numel() for p in run.adapter.layers()[0].parameters())
        return [LayerRecord(module=run.adapter.layer_prefix(0), method=self.name, params_before=numel,
                            params_after=0, kept_fraction=0.0)]


class _ClaimsSublayerRemoved(_SaysNothing):
    """Reports layer 0's MLP as removed, removes nothing."""

    def finalize(self, run: ModelContext) -> list[LayerRecord]:
        numel = sum(p.numel() for p in run.adapter.mlp(run.adapter.layers()[0]).parameters())
        return [LayerRecord(module=f"{run.adapter.layer_prefix(0)}.mlp", method=self.name, params_before=numel,
                            params_after=0, kept_fraction=0.0)]


class _ClaimsNarrowerStream(_SaysNothing):
    """Reports the stream cut to 3/4 (and the parameters that would cost), cuts nothing."""

    def finalize(self, run: ModelContext) -> list[LayerRecord]:
        return [LayerRecord(module="embeddings", method=self.name, kept_fraction=0.75, params_before=1, params_after=0)]


class _ClaimsPlan(Method):
    """Records a 3-bit width for every targeted linear but writes no plan."""

    config_class = TargetedConfig
    kind = "allocate"

    def apply(self, ctx: LayerContext) -> list[LayerRecord]:
        return [LayerRecord(module=p, method=self.name, bits=3) for p, _ in _targeted(ctx, self.config)]  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("method", "message"),
    [
        (_ClaimsQuantized, "weight unchanged"),
        (_Perturbs, "values more than 2\\*\\*bits"),
        (_SaysNothing, "must say what went"),
        (_ClaimsLayerRemoved, "3 layers, records say 1 went"),
        (_ClaimsSublayerRemoved, "the model lost 0"),
        (_ClaimsNarrowerStream, "stream is 64 wide, records say 48"),
        (_ClaimsPlan, "did not use the planned widths"),
    ],
)
def test_contract_rejects_a_method_that_does_not_do_what_it_claims(
    method: type[Method], message: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(registry._METHODS, "noop", method)
    with pytest.raises(AssertionError, match=message):
        _run_contract("noop", "llama")
