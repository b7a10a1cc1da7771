"""SliceGPT: the math on hand-built tensors, computational invariance on every family, the sliced structure,
the export that loads without compressor, composition with quantization, and bad input rejected early."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from isolation import run_without_compressor
from pydantic import ValidationError
from tiny import FAMILIES, tiny_model

from compressor.engine import ModelContext, run_stages
from compressor.errors import RecipeError
from compressor.export import write_model
from compressor.methods.prune.slicegpt import SliceGPT, SliceGPTConfig, ops
from compressor.methods.quant.rtn import RTN, RTNConfig
from compressor.models import get_adapter
from compressor.pipeline import load
from compressor.recipe import ExportConfig

ROTATIONS = ("per_layer", "shared")
#: Families whose norms fold (no rotation blocker on their tiny model); the others are refused (tested below).
FOLDABLE = tuple(f for f in FAMILIES if get_adapter(tiny_model(f)).rotation_blocker() is None)
REFUSED = tuple(f for f in FAMILIES if f not in FOLDABLE)


def _tokens(n: int = 4, length: int = 32) -> torch.Tensor:
    return torch.randint(0, 300, (n, length), generator=torch.Generator().manual_seed(0))


def _slice(model: torch.nn.Module, tokens: torch.Tensor, *extra: object, **config: object) -> ModelContext:
    run = ModelContext(model, get_adapter(model), tokens, torch.device("cpu"), batch_size=2)
    stage = SliceGPT(SliceGPTConfig(method="slicegpt", **config))  # type: ignore[arg-type]
    run.records = run_stages(run, [stage, *extra])  # type: ignore[attr-defined, list-item]
    return run


def _logits(model: torch.nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(tokens).logits


# ---- math -----------------------------------------------------------------------------------
@pytest.mark.parametrize(("slicing", "width"), [(0.1, 512), (0.2, 456), (0.25, 432), (0.3, 400)])
def test_sliced_width_rounds_down_like_the_reference(slicing: float, width: int) -> None:
    assert ops.sliced_width(576, slicing, None, 8) == width


def test_sliced_width_dim_and_limits() -> None:
    assert ops.sliced_width(576, None, None, 8) == 432  # default 25%
    assert ops.sliced_width(576, None, 576, 8) == 576  # rotation only
    with pytest.raises(ValueError, match="outside"):
        ops.sliced_width(576, None, 600, 8)
    with pytest.raises(ValueError, match=r"sliced width 0 \(0.75 x 64 rounded down to a multiple of round_to 128\)"):
        ops.sliced_width(64, 0.25, None, 128)


def test_covariance_is_xtx_and_normalized_tokens_weigh_the_same() -> None:
    x = torch.randn(2, 5, 3, generator=torch.Generator().manual_seed(1))
    X = x.reshape(-1, 3).double()
    cov = ops.accumulate_covariance(ops.accumulate_covariance(None, x[:1]), x[1:])
    torch.testing.assert_close(cov, X.T @ X)
    scaled = x.clone()
    scaled[0, 0] *= 1000.0  # a huge token changes nothing once tokens are scaled to unit RMS
    torch.testing.assert_close(ops.accumulate_covariance(None, scaled, normalize=True),
                               ops.accumulate_covariance(None, x, normalize=True))
    assert torch.allclose(torch.diagonal(ops.accumulate_covariance(None, x, normalize=True)).sum(),
                          torch.tensor(10.0 * 3, dtype=torch.float64))


def test_principal_basis_orders_and_reconstructs() -> None:
    Q0, _ = torch.linalg.qr(torch.randn(4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(2)))
    cov = Q0 @ torch.diag(torch.tensor([1.0, 9.0, 4.0, 0.0], dtype=torch.float64)) @ Q0.T
    values, Q = ops.principal_basis(cov)
    torch.testing.assert_close(values, torch.tensor([9.0, 4.0, 1.0, 0.0], dtype=torch.float64))
    torch.testing.assert_close(Q @ torch.diag(values) @ Q.T, cov)
    torch.testing.assert_close(Q.T @ Q, torch.eye(4, dtype=torch.float64))
    assert (Q[Q.abs().argmax(0), torch.arange(4)] > 0).all()  # deterministic signs
    assert ops.lost_fraction(values, 2) == pytest.approx(1 / 14)


def test_fold_norm_reads_the_unscaled_norm() -> None:
    g = torch.Generator().manual_seed(3)
    W, b, scale, shift, n = (torch.randn(*s, generator=g) for s in ((5, 4), (5,), (4,), (4,), (7, 4)))
    W2, b2 = ops.fold_norm(W, b, scale, shift)
    assert b2 is not None
    torch.testing.assert_close(n @ W2.T + b2, (n * scale + shift) @ W.T + b, rtol=1e-5, atol=1e-5)
    W3, b3 = ops.fold_norm(W, None, scale, None)
    assert b3 is None
    torch.testing.assert_close(n @ W3.T, (n * scale) @ W.T, rtol=1e-5, atol=1e-5)


def test_center_output_writes_zero_mean() -> None:
    g = torch.Generator().manual_seed(4)
    W, b, z = torch.randn(6, 3, generator=g), torch.randn(6, generator=g), torch.randn(5, 3, generator=g)
    W2, b2 = ops.center_output(W, b)
    assert b2 is not None
    out = z @ W2.T + b2
    torch.testing.assert_close(out.mean(-1), torch.zeros(5), atol=1e-6, rtol=0)
    expected = z @ W.T + b
    torch.testing.assert_close(out, expected - expected.mean(-1, keepdim=True), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ops.centering_matrix(3).sum(0), torch.zeros(3, dtype=torch.float64))


def test_rotations_and_shortcut_compose_to_the_original() -> None:
    g = torch.Generator().manual_seed(5)
    Q, _ = torch.linalg.qr(torch.randn(4, 4, dtype=torch.float64, generator=g))
    R, _ = torch.linalg.qr(torch.randn(4, 4, dtype=torch.float64, generator=g))
    x, W_in = torch.randn(3, 4, dtype=torch.float64, generator=g), torch.randn(2, 4, dtype=torch.float64, generator=g)
    W_out, b_out, z = (torch.randn(*s, dtype=torch.float64, generator=g) for s in ((4, 2), (4,), (3, 2)))
    torch.testing.assert_close((x @ Q) @ ops.rotate_input(W_in, Q).T, x @ W_in.T)  # reader of the rotated stream
    W_r, b_r = ops.rotate_output(W_out, b_out, Q)
    assert b_r is not None
    torch.testing.assert_close(z @ W_r.T + b_r, (z @ W_out.T + b_out) @ Q)  # writer into the rotated stream
    torch.testing.assert_close((x @ Q) @ ops.basis_change(Q, R), x @ R)  # shortcut between bases


# ---- config and bad input ----------------------------------------------------------------------
@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"slicing": 0.0}, "slicing must be a fraction strictly between 0 and 1"),
        ({"slicing": 1.0}, "slicing must be a fraction strictly between 0 and 1"),
        ({"slicing": -0.2}, "slicing must be a fraction strictly between 0 and 1"),
        ({"slicing": 0.2, "dim": 48}, "set either slicing or dim"),
        ({"dim": 50}, "dim 50 is not a multiple of round_to 8"),
        ({"dim": 0}, "greater than or equal to 1"),
        ({"rotation": "random"}, "per_layer"),
        ({"slice_head": True}, "Extra inputs"),
    ],
)
def test_config_rejects(fields: dict[str, object], message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        SliceGPTConfig(method="slicegpt", **fields)  # type: ignore[arg-type]


def test_recipe_error_names_the_field() -> None:
    from compressor.recipe import recipe_from_dict

    with pytest.raises(RecipeError, match=r"stages.0.slicing: slicing must be a fraction"):
        recipe_from_dict({"name": "x", "stages": [{"method": "slicegpt", "slicing": 1.5}]})


def test_gguf_export_is_refused() -> None:
    config = SliceGPTConfig(method="slicegpt")
    assert "GGUF cannot store" in (SliceGPT.check_recipe(config, [], "gguf") or "")
    assert SliceGPT.check_recipe(config, [], "compressed-tensors") is None


def test_model_dependent_errors_come_before_calibration() -> None:
    calls: list[int] = []
    model = tiny_model("llama")
    model.register_forward_pre_hook(lambda *_: calls.append(1))
    with pytest.raises(RecipeError, match=r"sliced width 72 \(dim\) is outside \[1, 64\]"):
        _slice(model, _tokens(), dim=72)
    opt = tiny_model("opt", do_layer_norm_before=False)
    with pytest.raises(RecipeError, match="cannot fold this model's norms.*do_layer_norm_before"):
        _slice(opt, _tokens())
    assert not calls  # nothing ran through the model
    sliced = tiny_model("qwen2")
    _slice(sliced, _tokens())
    with pytest.raises(RecipeError, match="already sliced"):
        _slice(sliced, _tokens())


# ---- invariance and structure -----------------------------------------------------------------
@pytest.mark.parametrize("rotation", ROTATIONS)
@pytest.mark.parametrize("family", FOLDABLE)
def test_rotation_without_slicing_keeps_the_logits(family: str, rotation: str) -> None:
    model, tokens = tiny_model(family), _tokens()
    expected = _logits(model, tokens)
    _slice(model, tokens, dim=64, rotation=rotation)
    torch.testing.assert_close(_logits(model, tokens), expected, rtol=1e-5, atol=2e-5)


@pytest.mark.parametrize("rotation", ROTATIONS)
@pytest.mark.parametrize("family", FOLDABLE)
def test_slicing_shrinks_the_stream(family: str, rotation: str) -> None:
    model, tokens = tiny_model(family), _tokens()
    before = sum(p.numel() for p in set(model.parameters()))
    tied = model.get_output_embeddings().weight is model.get_input_embeddings().weight  # stays as it was
    expected = _logits(model, tokens)
    run = _slice(model, tokens, slicing=0.25, rotation=rotation)
    spec = model.config.slicing
    adapter = run.adapter
    assert spec["embedding_width"] == 48 and spec["rotation"] == rotation
    assert [(s["in"], s["mid"], s["out"]) for s in spec["layers"]] == [(48, 48, 48), (48, 48, 48), (48, 48, 64)]
    layer = adapter.layers()[1]
    assert all(lin.in_features == 48 for lin in adapter.attention_inputs(layer) + adapter.mlp_inputs(layer))
    assert adapter.attention_output(layer).out_features == 48 and adapter.mlp_output(layer).out_features == 48
    shortcuts = [getattr(layer, name) for layer in adapter.layers() for name in ("attn_shortcut", "mlp_shortcut")]
    assert all(s is not None for s in shortcuts) if rotation == "per_layer" else all(s is None for s in shortcuts)
    assert (adapter.lm_head().weight is adapter.embeddings()[0].weight) == tied
    after = sum(p.numel() for p in set(model.parameters()))
    assert after < before
    logits = _logits(model, tokens)
    assert logits.shape == expected.shape and torch.isfinite(logits).all()
    records = run.records  # type: ignore[attr-defined]
    assert [r.module for r in records] == ["embeddings", *(adapter.layer_prefix(i) for i in range(3)), "head"]
    assert all(0 < r.kept_fraction < 1 for r in records[1:-1]) and all(r.rel_error is not None for r in records[:-1])
    assert run.structure["slicegpt"]["width"] == 48


def test_linear_group_names_still_resolve_after_slicing() -> None:
    model = tiny_model("llama")
    run = _slice(model, _tokens())
    for layer in run.adapter.layers():
        for name in run.adapter.linear_names():
            assert isinstance(layer.get_submodule(name), torch.nn.Linear)


# ---- export ----------------------------------------------------------------------------------
_ISOLATED = """
import sys
import torch
from transformers import AutoModelForCausalLM
for directory in sys.argv[1:]:
    model = AutoModelForCausalLM.from_pretrained(directory, trust_remote_code=True)
    tokens, expected = torch.load(directory + "/tokens.pt"), torch.load(directory + "/logits.pt")
    with torch.no_grad():
        logits = model(tokens).logits
    print(type(model).__name__, float((logits - expected).abs().max()))
"""


def test_export_loads_without_compressor(tmp_path: Path, tiny_tokenizer) -> None:
    directories = []
    for family, rotation in (("llama", "per_layer"), ("qwen2", "shared"), ("opt", "per_layer")):
        model, tokens = tiny_model(family), _tokens()
        run = _slice(model, tokens, rotation=rotation)
        expected = _logits(model, tokens)
        out = tmp_path / family
        out.mkdir()
        files = write_model(ExportConfig(format="dense"), run, tiny_tokenizer, out)
        assert "modeling_sliced.py" in files
        config = json.loads((out / "config.json").read_text())
        assert config["auto_map"]["AutoModelForCausalLM"].startswith("modeling_sliced.Sliced")
        assert config["slicing"]["layers"][0]["in"] == 48
        reloaded = load(out).model  # compressor.load trusts its own shipped file
        torch.testing.assert_close(_logits(reloaded, tokens), expected, rtol=0, atol=0)
        torch.save(tokens, out / "tokens.pt")
        torch.save(expected, out / "logits.pt")
        directories.append(str(out))
    result = run_without_compressor(_ISOLATED, *directories, cwd=tmp_path)  # a user's Python: no compressor
    assert result.returncode == 0, result.stderr[-2000:]
    lines = [line.split() for line in result.stdout.splitlines() if line.startswith("Sliced")]
    assert [name for name, _ in lines] == ["SlicedLlamaForCausalLM", "SlicedQwen2ForCausalLM", "SlicedOPTForCausalLM"]
    assert all(float(diff) == 0.0 for _, diff in lines)


def test_quantized_after_slicing_exports_as_compressed_tensors(tmp_path: Path, tiny_tokenizer) -> None:
    model, tokens = tiny_model("llama"), _tokens()
    rtn = RTN(RTNConfig(method="rtn", bits=4, group_size=16))
    run = _slice(model, tokens, rtn, rotation="per_layer")
    quantized = sorted(run.quantized)
    assert len(quantized) == 3 * 7 and "model.layers.0.self_attn.q_proj" in quantized
    assert run.quantized["model.layers.0.self_attn.q_proj"].shape == (64, 48)  # the sliced linear was quantized
    expected = _logits(model, tokens)
    out = tmp_path / "out"
    out.mkdir()
    write_model(ExportConfig(format="compressed-tensors"), run, tiny_tokenizer, out)
    config = json.loads((out / "config.json").read_text())
    assert config["quantization_config"]["format"] == "pack-quantized" and "auto_map" in config
    assert "model.layers.0.attn_shortcut" in config["quantization_config"]["ignore"]
    reloaded = load(out).model
    torch.testing.assert_close(_logits(reloaded, tokens), expected, rtol=1e-5, atol=1e-5)


def test_compress_and_eval_through_the_pipeline(model_dir_factory, text_file: Path, tmp_path: Path, runner) -> None:
    from compressor.cli import app
    from compressor.pipeline import compress
    from compressor.recipe import recipe_from_dict

    recipe = recipe_from_dict({
        "name": "slice", "calibration": {"dataset": str(text_file), "samples": 4, "seq_len": 32},
        "stages": [{"method": "slicegpt", "slicing": 0.25, "rotation": "per_layer"}],
    })
    out = tmp_path / "sliced"
    report = compress(model_dir_factory("opt"), recipe, out, device="cpu")
    assert report.params["after"] < report.params["before"]
    assert report.structure["slicegpt"]["shortcut_params"] == 3 * 2 * 48 * 48 - 48 * 48 + 48 * 64
    assert report.structure["slicegpt"]["embeddings"].startswith("tied")  # the tiny OPT ties them; still tied
    result = runner.invoke(app, ["eval", str(out), "--data", str(text_file), "--seq-len", "32", "--max-tokens", "128",
                                 "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["ppl"] > 1


@pytest.mark.parametrize("model_type", ["mistral", "qwen3"])
def test_other_llama_layout_families(model_type: str, tmp_path: Path, tiny_tokenizer) -> None:
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(model_type, vocab_size=320, hidden_size=64, intermediate_size=128,
                                  num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                  max_position_embeddings=256, tie_word_embeddings=False)
    torch.manual_seed(0)
    model, tokens = AutoModelForCausalLM.from_config(config).eval(), _tokens()
    expected = _logits(model, tokens)
    run = _slice(model, tokens, dim=64)
    torch.testing.assert_close(_logits(model, tokens), expected, rtol=1e-5, atol=2e-5)
    write_model(ExportConfig(format="dense"), run, tiny_tokenizer, tmp_path)
    torch.testing.assert_close(_logits(load(tmp_path).model, tokens), _logits(model, tokens), rtol=0, atol=0)


@pytest.mark.parametrize("family", REFUSED)
def test_families_with_post_norms_are_refused_with_the_reason(family: str) -> None:
    """A norm after a branch does not commute with a rotation: refused before any calibration, naming why."""
    model = tiny_model(family)
    with pytest.raises(RecipeError, match="slicegpt cannot fold this model's norms: .*(post-norms|per-expert)"):
        _slice(model, _tokens(), slicing=0.25)
