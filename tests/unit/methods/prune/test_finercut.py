"""FinerCut: divergences, the greedy search, exact in-memory removal, remote-code exports, validation."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from isolation import run_without_compressor
from test_layer_drop import TOKENS, deep_model, logits
from tiny import FAMILIES, tiny_model
from transformers import AutoModelForCausalLM

from compressor.engine import ModelContext, run_stages
from compressor.errors import RecipeError
from compressor.export import write_model
from compressor.methods.prune.finercut import FinerCut, FinerCutConfig
from compressor.methods.prune.finercut.ops import divergence, greedy_removal, reference, scored_positions
from compressor.methods.prune.finercut.search import SublayerSearch
from compressor.models import get_adapter
from compressor.pipeline import compress, load
from compressor.recipe import ExportConfig, recipe_from_dict


def run_cut(model: Any, **settings: Any) -> tuple[ModelContext, list[Any]]:
    run = ModelContext(model, get_adapter(model), TOKENS, torch.device("cpu"), batch_size=3)
    records = run_stages(run, [FinerCut(FinerCutConfig(method="finercut", **settings))])
    return run, records


def silence_sublayer(model: Any, index: int, sublayer: str) -> None:
    """Zero what one sublayer writes into the residual stream: the same function as removing it."""
    adapter = get_adapter(model)
    layer = adapter.layers()[index]
    linears = [adapter.attention_output(layer)] if sublayer == "attention" else adapter.mlp_outputs(layer)
    with torch.no_grad():
        for linear in linears:  # a MoE's MLP writes through every expert's down projection
            linear.weight.zero_()
            if linear.bias is not None:
                linear.bias.zero_()


# ---- pure math ------------------------------------------------------------------------------------------


def test_scored_positions_end_at_the_last_token() -> None:
    assert scored_positions(8, 4).tolist() == [1, 3, 5, 7]
    assert scored_positions(8, None).tolist() == list(range(8))
    assert scored_positions(8, 20).tolist() == list(range(8))


def test_divergences_known_answers() -> None:
    p = torch.tensor([[0.5, 0.5]]).log()
    q = torch.tensor([[0.9, 0.1]]).log()
    ref = reference(p, "kl")
    assert divergence(ref, p, "kl") == pytest.approx((0.0, 1), abs=1e-7)
    expected_kl = 0.5 * math.log(0.5 / 0.9) + 0.5 * math.log(0.5 / 0.1)
    assert divergence(ref, q, "kl")[0] == pytest.approx(expected_kl, rel=1e-5)
    js_pq = divergence(reference(p, "js"), q, "js")[0]
    assert js_pq == pytest.approx(divergence(reference(q, "js"), p, "js")[0], rel=1e-5)
    assert 0 < js_pq < math.log(2)
    x = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])
    assert divergence(reference(x, "cosine"), 2 * x, "cosine") == pytest.approx((0.0, 2), abs=1e-6)
    assert divergence(reference(x, "cosine"), x.flip(-1), "cosine") == pytest.approx((2.0, 2))


def _oracle(base: dict[str, float], interaction: float) -> tuple[Callable[[str], float], Callable[[str], None]]:
    removed: list[str] = []

    def evaluate(key: str) -> float:
        return base[key] + interaction * len(removed) * (1 + base[key])

    return evaluate, removed.append


def test_lazy_search_matches_exact_when_harm_only_grows() -> None:
    base = dict(zip("abcdefgh", [0.5, 0.1, 0.9, 0.3, 0.2, 0.8, 0.05, 0.4], strict=True))
    cost = dict.fromkeys(base, 1)
    exact = greedy_removal(list(base), cost, *_oracle(base, 0.3), count=5, lazy=False)
    lazy = greedy_removal(list(base), cost, *_oracle(base, 0.3), count=5, lazy=True)
    assert [s.key for s in lazy.steps] == [s.key for s in exact.steps] == ["g", "b", "e", "d", "h"]
    assert lazy.evaluations < exact.evaluations
    assert lazy.first_scores == exact.first_scores == base


def test_budget_is_never_exceeded() -> None:
    base = {"attn0": 0.1, "mlp0": 0.05, "attn1": 0.2, "mlp1": 0.3}
    cost = {"attn0": 1, "mlp0": 3, "attn1": 1, "mlp1": 3}
    result = greedy_removal(list(base), cost, *_oracle(base, 0.0), budget=5)
    assert [s.key for s in result.steps] == ["mlp0", "attn0", "attn1"]  # mlp1 no longer fits
    assert greedy_removal(list(base), cost, *_oracle(base, 0.0), budget=0).steps == []


# ---- behaviour on models -------------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_removing_nothing_is_the_identity(family: str) -> None:
    model = deep_model(family, 3)
    get_adapter(model)  # a MoE's experts become per-expert linears here (tested equal in test_moe.py), not in the run
    before = logits(model)
    run, records = run_cut(model, remove=0)
    assert torch.equal(logits(model), before)
    assert run.structure["finercut"]["removed"] == [] and "remote_code" not in run.structure
    assert not hasattr(model.config, "finercut_removed") and len(records) == 6


@pytest.mark.parametrize("family", FAMILIES)
def test_a_silent_sublayer_goes_first_and_removal_is_exact(family: str) -> None:
    model = deep_model(family)
    silence_sublayer(model, 3, "mlp")
    reference_model = deep_model(family)
    silence_sublayer(reference_model, 3, "mlp")
    run, records = run_cut(model, remove=2)
    first, second = run.structure["finercut"]["removed"]
    assert first[:2] == [3, "mlp"] and first[2] == pytest.approx(0.0, abs=1e-6)
    assert second[2] > 1e-6
    silence_sublayer(reference_model, second[0], second[1])
    torch.testing.assert_close(logits(model), logits(reference_model), rtol=0, atol=1e-5)
    gone = sorted((r for r in records if r.extra["removed"]), key=lambda r: r.extra["order"])
    assert [(r.extra["layer"], r.extra["sublayer"]) for r in gone] == [tuple(first[:2]), tuple(second[:2])]
    assert gone[0].note.startswith("removed #1") and gone[0].extra["score"] == pytest.approx(0.0, abs=1e-6)
    # the lazy search completes a first-step score only where it must; the others carry the bound that ruled them out
    assert all((r.extra["score"] is None) != (r.extra["score_at_least"] is None) for r in records)


_LOAD_WITHOUT_COMPRESSOR = """
import sys
import torch
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], trust_remote_code=True)
tokens, expected = torch.load(sys.argv[1] + "/tokens.pt"), torch.load(sys.argv[1] + "/logits.pt")
with torch.no_grad():
    print(type(model).__name__, float((model(tokens).logits - expected).abs().max()))
"""


@pytest.mark.parametrize("family", FAMILIES)
def test_export_loads_with_remote_code_and_gives_the_same_logits(
    family: str, tmp_path: Path, tiny_tokenizer: Any
) -> None:
    model = deep_model(family)
    silence_sublayer(model, 0, "attention")  # an attention sublayer goes: the KV cache must still line up
    run, _ = run_cut(model, remove=3)
    assert [0, "attention"] == run.structure["finercut"]["removed"][0][:2]
    write_model(ExportConfig(format="dense"), run, tiny_tokenizer, tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["auto_map"]["AutoModelForCausalLM"].startswith("modeling_finercut.FinerCut")
    assert config["finercut_removed"][0] == ["attention"]
    assert (tmp_path / "modeling_finercut.py").is_file()
    expected = logits(model)
    torch.save(TOKENS, tmp_path / "tokens.pt")
    torch.save(expected, tmp_path / "logits.pt")
    child = run_without_compressor(_LOAD_WITHOUT_COMPRESSOR, str(tmp_path), cwd=tmp_path)  # a user's Python
    assert child.returncode == 0, child.stderr[-2000:]
    name, diff = child.stdout.split()
    assert name.startswith("FinerCut") and float(diff) <= 1e-5
    remote = AutoModelForCausalLM.from_pretrained(tmp_path, trust_remote_code=True)
    torch.testing.assert_close(logits(remote), expected, rtol=0, atol=1e-5)
    ours = load(tmp_path).model  # byte-identical shipped code: no --trust-remote-code needed
    torch.testing.assert_close(logits(ours), expected, rtol=0, atol=1e-5)
    prompt = TOKENS[:1, :6]
    cached = remote.generate(prompt, max_new_tokens=6, do_sample=False)
    assert torch.equal(cached, model.generate(prompt, max_new_tokens=6, do_sample=False, use_cache=False))


def test_a_layer_that_loses_both_sublayers_is_removed_whole(tmp_path: Path, tiny_tokenizer: Any) -> None:
    model = deep_model("qwen2")
    silence_sublayer(model, 2, "attention")
    silence_sublayer(model, 2, "mlp")
    run, _ = run_cut(model, remove=2)
    assert run.structure["finercut"]["folded_layers"] == [2]
    assert "remote_code" not in run.structure and get_adapter(model).num_layers == 4
    write_model(ExportConfig(format="dense"), run, tiny_tokenizer, tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert "auto_map" not in config and len(config["layer_types"]) == 4
    torch.testing.assert_close(logits(AutoModelForCausalLM.from_pretrained(tmp_path)), logits(model), rtol=0,
                               atol=1e-5)


def test_ratio_is_a_parameter_budget_and_exact_search_agrees_on_the_first_step() -> None:
    lazy_run, records = run_cut(deep_model("llama"), ratio=0.3, measure="js", positions=8)
    exact_run, _ = run_cut(deep_model("llama"), ratio=0.3, measure="js", positions=8, search="exact")
    lazy, exact = lazy_run.structure["finercut"], exact_run.structure["finercut"]
    assert 0 < lazy["params_removed"] <= lazy["params_budget"] == round(0.3 * lazy["decoder_params"])
    assert lazy["removed"][0] == exact["removed"][0]
    assert lazy["evaluations"] <= exact["evaluations"]
    assert sum(r.params_before - r.params_after for r in records) == lazy["params_removed"]


def test_cosine_measure_and_attention_only_candidates() -> None:
    run, records = run_cut(deep_model("opt"), remove=2, measure="cosine", sublayers="attention", positions=None)
    assert {r.extra["sublayer"] for r in records} == {"attention"} and len(records) == 5
    assert all(kind == "attention" for _, kind, _ in run.structure["finercut"]["removed"])


class _KeptSearch(SublayerSearch):
    """The search FinerCut builds, kept for the test to read its cached states."""

    made: list[SublayerSearch] = []

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.made.append(self)


def test_cached_states_follow_each_layers_own_attention_mask(monkeypatch: pytest.MonkeyPatch) -> None:
    """A sliding-window layer among full-attention ones: the states the search scores with are the model's."""
    model = tiny_model("qwen2", use_sliding_window=True, sliding_window=4,
                       layer_types=["full_attention", "sliding_attention", "full_attention"])
    silence_sublayer(model, 0, "mlp")  # removed first, so the commit recomputes through the sliding layer
    tokens = TOKENS[:, :16]
    with torch.no_grad():
        original = model(tokens, output_hidden_states=True).hidden_states
    monkeypatch.setattr("compressor.methods.prune.finercut.SublayerSearch", _KeptSearch)
    _KeptSearch.made = []
    run = ModelContext(model, get_adapter(model), tokens, torch.device("cpu"), batch_size=3)
    run_stages(run, [FinerCut(FinerCutConfig(method="finercut", remove=1, sublayers="mlp", search="exact"))])
    (search,) = _KeptSearch.made
    assert [key for key, kind in enumerate(model.config.finercut_removed) if kind] == [0]
    norm = run.adapter.final_norm()
    with torch.no_grad():
        pruned = model(tokens, output_hidden_states=True).hidden_states
        final = [norm(h) for h in search.states[-1]]
    for index, states in enumerate([*search.states[:-1], final]):  # committed: recomputed after layer 0
        torch.testing.assert_close(torch.cat(states), pruned[index], rtol=1e-5, atol=1e-5, msg=f"states[{index}]")
    with torch.no_grad():  # what a candidate in layer 0 is scored with
        scored = [norm(search._run(0, h, b)) for b, h in enumerate(original[0].split(3))]
    torch.testing.assert_close(torch.cat(scored), pruned[-1], rtol=1e-5, atol=1e-5)


# ---- validation ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"remove": -2}, r"stages\.0\.remove: remove must be 0 or more"),
        ({"ratio": 0.0}, r"stages\.0\.ratio: ratio must be between 0 and 1"),
        ({"ratio": 1.2}, r"stages\.0\.ratio"),
        ({"remove": 2, "ratio": 0.1}, r"set only one of remove and ratio"),
        ({"positions": 0}, r"stages\.0\.positions: positions must be at least 1"),
        ({"measure": "l2"}, r"stages\.0\.measure"),
        ({"search": "beam"}, r"stages\.0\.search"),
        ({"screen_samples": 0}, r"stages\.0\.screen_samples"),
        ({"rescore_top": 0}, r"stages\.0\.rescore_top"),
        ({"search": "lazy", "screen_samples": 4}, r"screen_samples apply only to search: screened \(search is lazy\)"),
        ({"search": "exact", "rescore_top": 4, "screen_samples": 1},
         r"screen_samples and rescore_top apply only to search: screened"),
        ({"chunk_samples": 0}, r"stages\.0\.chunk_samples"),
        ({"search": "exact", "chunk_samples": 2}, r"chunk_samples applies only to search: lazy \(search is exact\)"),
    ],
)
def test_bad_values_are_rejected_naming_the_field(fields: dict[str, Any], message: str) -> None:
    with pytest.raises(RecipeError, match=message):
        recipe_from_dict({"name": "t", "stages": [{"method": "finercut", **fields}]})


def test_impossible_combinations_are_rejected() -> None:
    later_prune = {"name": "t", "stages": [{"method": "finercut"}, {"method": "layer_drop", "remove": 1}]}
    with pytest.raises(RecipeError, match="finercut must be the last pruning stage"):
        recipe_from_dict(later_prune)
    regex = {"name": "t", "stages": [{"method": "finercut"}, {"method": "rtn", "targets": ["re:.*proj"]}]}
    with pytest.raises(RecipeError, match="by class name"):
        recipe_from_dict(regex)
    gguf = {"name": "t", "stages": [{"method": "finercut"}, {"method": "rtn", "bits": 4, "group_size": 32}],
            "export": {"format": "gguf"}}
    with pytest.raises(RecipeError, match="GGUF cannot store"):
        recipe_from_dict(gguf)


def test_too_many_sublayers_fail_before_any_work() -> None:
    model = deep_model("llama", 3)
    with pytest.raises(RecipeError, match="cannot remove 6 of the model's 6 candidate sublayers"):
        run_cut(model, remove=6)
    with pytest.raises(RecipeError, match="cannot remove 3 of the model's 3"):
        run_cut(model, remove=3, sublayers="mlp")


def test_post_norm_opt_is_refused() -> None:
    model = deep_model("opt", 3)
    model.config.do_layer_norm_before = False
    with pytest.raises(RecipeError, match="do_layer_norm_before"):
        run_cut(model, remove=1)


# ---- composition ---------------------------------------------------------------------------------------


def test_finercut_then_rtn_through_compress(
    model_dir_factory: Callable[[str], Path], text_file: Path, tmp_path: Path
) -> None:
    recipe = recipe_from_dict({
        "name": "cut-then-rtn",
        "calibration": {"dataset": str(text_file), "samples": 4, "seq_len": 32, "batch_size": 2},
        "stages": [{"method": "finercut", "remove": 2, "sublayers": "attention"},
                   {"method": "rtn", "bits": 8, "group_size": -1}],
    })
    loaded = load(model_dir_factory("llama"))
    out = tmp_path / "out"
    report = compress(loaded, recipe, out, device="cpu")
    removed = {(i, kind) for i, kind, _ in report.structure["finercut"]["removed"]}
    rtn_modules = {r["module"] for r in report.layers if r["method"] == "rtn"}
    for index, _ in removed:
        assert not any(m.startswith(f"model.layers.{index}.self_attn") for m in rtn_modules)
    assert len(rtn_modules) == 3 * 7 - 2 * 4
    reloaded = load(out).model
    torch.testing.assert_close(logits(reloaded), logits(loaded.model), rtol=0, atol=1e-5)


def test_bfloat16_search_runs_under_autocast_and_leaves_float32_weights(monkeypatch: pytest.MonkeyPatch) -> None:
    """search_dtype: bfloat16: every scoring forward computes in bfloat16, the silent sublayer still goes first,
    and the model keeps its float32 weights (only the search's arithmetic changes)."""
    model = deep_model("llama")
    silence_sublayer(model, 3, "mlp")
    dtypes: set[torch.dtype] = set()
    probe = get_adapter(model).layers()[-1].mlp.down_proj
    probe.register_forward_hook(lambda _m, _i, out: dtypes.add(out.dtype))
    recomputed: list[int] = []
    real = SublayerSearch.recompute
    monkeypatch.setattr(SublayerSearch, "recompute", lambda self: (recomputed.append(1), real(self))[1])
    run, _ = run_cut(model, remove=2, search_dtype="bfloat16")
    assert run.structure["finercut"]["removed"][0][:2] == [3, "mlp"]
    assert run.structure["finercut"]["search_dtype"] == "bfloat16" and recomputed == [1]
    assert torch.bfloat16 in dtypes and all(p.dtype == torch.float32 for p in model.parameters())
    dtypes.clear()
    plain = deep_model("llama")
    get_adapter(plain).layers()[-1].mlp.down_proj.register_forward_hook(lambda _m, _i, out: dtypes.add(out.dtype))
    run_cut(plain, remove=1)
    assert dtypes == {torch.float32}  # the default searches in float32 and recomputes nothing
    assert recomputed == [1]


@pytest.mark.parametrize("fast", [True, False])
def test_auto_search_dtype_is_bfloat16_only_where_that_is_fast(monkeypatch: pytest.MonkeyPatch, fast: bool) -> None:
    """search_dtype: auto asks the device (fast_bfloat16) and the report says which precision ran."""
    import compressor.methods.prune.finercut as finercut

    asked: list[str] = []
    monkeypatch.setattr(finercut, "fast_bfloat16", lambda device: (asked.append(device.type), fast)[1])
    model = deep_model("llama")
    dtypes: set[torch.dtype] = set()
    get_adapter(model).layers()[-1].mlp.down_proj.register_forward_hook(lambda _m, _i, out: dtypes.add(out.dtype))
    run, _ = run_cut(model, remove=1, search_dtype="auto")
    assert asked and set(asked) == {"cpu"}
    assert run.structure["finercut"]["search_dtype"] == ("bfloat16" if fast else "float32")
    assert (torch.bfloat16 in dtypes) == fast


def test_recompute_in_float32_gives_the_cached_states_back() -> None:
    """recompute() runs the layers again from layer 0's states: in float32 it reproduces what the capture cached."""
    model = deep_model("llama")
    stage = FinerCut(FinerCutConfig(method="finercut", remove=1))
    captured: dict[str, Any] = {}
    real = SublayerSearch.__init__

    def keep(self: SublayerSearch, *args: Any, **kwargs: Any) -> None:
        real(self, *args, **kwargs)
        captured["states"] = [[h.clone() for h in layer] for layer in self.states]
        captured["references"] = [r.clone() for r in self.references]
        self.recompute()
        captured["after"] = [[h.clone() for h in layer] for layer in self.states]
        captured["references_after"] = [r.clone() for r in self.references]

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(SublayerSearch, "__init__", keep)
        run_stages(ModelContext(model, get_adapter(model), TOKENS, torch.device("cpu"), batch_size=3), [stage])
    for before, after in zip(captured["states"], captured["after"], strict=True):
        for a, b in zip(before, after, strict=True):
            torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)
    for a, b in zip(captured["references"], captured["references_after"], strict=True):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)
