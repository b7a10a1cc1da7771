"""FLAP results on disk: per-layer shapes and new biases ship modeling_flap.py; a uniform unbiased one a stock config.

Every reload that must work for a user runs in a Python that cannot import compressor (``tests/isolation.py``).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from isolation import run_without_compressor
from safetensors import safe_open
from tiny import tiny_model
from transformers import AutoModelForCausalLM

from compressor.engine import ModelContext, run_stages
from compressor.errors import ExportError, RecipeError
from compressor.export import write_model
from compressor.methods.base import MethodConfig
from compressor.methods.prune.flap import FLAPConfig
from compressor.models import get_adapter
from compressor.pipeline import load
from compressor.recipe import ExportConfig, build_stages

TOKENS = torch.randint(0, 300, (4, 32), generator=torch.Generator().manual_seed(0))
PAPER = {"structure": "global", "ratio": 0.3, "compensate": True}

#: A user's Python: transformers alone, trusting the shipped file; prints class, down_proj class and logit diff.
_RELOAD = """
import sys
import torch
from transformers import AutoModelForCausalLM
for directory in sys.argv[1:]:
    model = AutoModelForCausalLM.from_pretrained(directory, trust_remote_code=True).eval()
    tokens, expected = torch.load(directory + "/tokens.pt"), torch.load(directory + "/logits.pt")
    with torch.no_grad():
        diff = float((model(tokens).logits - expected).abs().max())
    print("RESULT", type(model).__name__, diff)
"""


def _run(model: torch.nn.Module, fmt: str, *quant: MethodConfig, **flap: Any) -> tuple[ModelContext, list]:
    run = ModelContext(model, get_adapter(model), TOKENS, torch.device("cpu"), batch_size=2)
    stages = build_stages([FLAPConfig.model_validate({"method": "flap", **flap}), *quant], fmt)
    return run, run_stages(run, stages)


def _logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(TOKENS).logits


def _reload_all(directories: list[Path], cwd: Path) -> list[tuple[str, float]]:
    """Reload every directory (its tokens.pt / logits.pt saved) in one child without compressor."""
    child = run_without_compressor(_RELOAD, *map(str, directories), cwd=cwd)
    assert child.returncode == 0, child.stderr[-3000:]
    return [(line.split()[1], float(line.split()[2])) for line in child.stdout.splitlines()
            if line.startswith("RESULT")]


def _export(run: ModelContext, fmt: str, out: Path, tokenizer: Any) -> dict[str, Any]:
    out.mkdir()
    write_model(ExportConfig(format=fmt), run, tokenizer, out)
    torch.save(TOKENS, out / "tokens.pt")
    torch.save(_logits(run.model), out / "logits.pt")
    return json.loads((out / "config.json").read_text())


def _assert_shapes_recorded(run: ModelContext, config: dict[str, Any]) -> None:
    """config.json's flap.layers say each layer's head counts, width and output biases as the model has them."""
    adapter = run.adapter
    layers = config["flap"]["layers"]
    assert len(layers) == adapter.num_layers and config["flap"]["head_dim"] == 16
    for layer, shape in zip(adapter.layers(), layers, strict=True):
        q, k, _ = adapter.attention_inputs(layer)
        assert (q.out_features, k.out_features) == (16 * shape["heads"], 16 * shape["kv_heads"])
        assert adapter.mlp_output(layer).in_features == shape["intermediate_size"]
        assert shape["attention_output_bias"] == (adapter.attention_output(layer).bias is not None)
        assert shape["mlp_output_bias"] == (adapter.mlp_output(layer).bias is not None)


@dataclass
class _Export:
    run: ModelContext
    records: list
    out: Path
    config: dict[str, Any]
    reloaded: tuple[str, float] = ("", math.inf)  # (class, largest logit difference) in a Python without compressor


@pytest.fixture(scope="module")
def exports(tmp_path_factory: pytest.TempPathFactory, tiny_tokenizer: Any) -> dict[str, _Export]:
    """FLAP with the paper's settings on tiny llama and qwen2: dense, and compressed-tensors after GPTQ / RTN.

    All four directories reload in one child Python (importing transformers there is most of the cost).
    """
    from compressor.methods.quant.gptq import GPTQConfig
    from compressor.methods.quant.rtn import RTNConfig

    root = tmp_path_factory.mktemp("flap")
    cases: dict[str, tuple[str, str, tuple[MethodConfig, ...]]] = {
        "llama": ("llama", "dense", ()), "qwen2": ("qwen2", "dense", ()),
        "llama-gptq": ("llama", "compressed-tensors", (GPTQConfig(method="gptq", bits=4, group_size=32),)),
        "qwen2-rtn": ("qwen2", "compressed-tensors", (RTNConfig(method="rtn", bits=4, group_size=32),)),
    }
    built = {}
    for name, (family, fmt, quant) in cases.items():
        run, records = _run(tiny_model(family), fmt, *quant, **PAPER)
        built[name] = _Export(run, records, root / name, _export(run, fmt, root / name, tiny_tokenizer))
    for export, result in zip(built.values(), _reload_all([e.out for e in built.values()], root), strict=True):
        export.reloaded = result
    return built


@pytest.mark.parametrize("name", ["llama", "qwen2"])
def test_adaptive_compensated_dense_export_loads_without_compressor(name: str, exports: dict[str, _Export]) -> None:
    export = exports[name]
    model, out, config = export.run.model, export.out, export.config
    shapes = export.run.structure["flap"]["layers"]
    assert len({(s["kv_heads"], s["intermediate_size"]) for s in shapes}) > 1, "global gives per-layer shapes"
    # the tiny models have no o_proj / down_proj bias: compensation added them
    assert any(s["mlp_bias"] and s["mlp_output_bias"] for s in shapes)
    assert config["auto_map"]["AutoModelForCausalLM"] == f"modeling_flap.FLAP{type(model).__name__}"
    assert (out / "modeling_flap.py").is_file()
    assert config["intermediate_size"] == 128 and config["num_key_value_heads"] == 2  # the stock model's
    _assert_shapes_recorded(export.run, config)
    assert export.reloaded[0] == f"FLAP{type(model).__name__}" and export.reloaded[1] <= 1e-5
    ours = load(out).model  # compressor trusts its own byte-identical shipped file
    torch.testing.assert_close(_logits(ours), _logits(model), rtol=0, atol=1e-5)
    prompt = TOKENS[:1, :6]  # the KV cache holds a different number of heads per layer
    cached = ours.generate(prompt, max_new_tokens=6, do_sample=False)
    assert torch.equal(cached, model.generate(prompt, max_new_tokens=6, do_sample=False, use_cache=False))


def test_uniform_result_without_bias_writes_a_stock_config(tmp_path: Path, tiny_tokenizer: Any) -> None:
    model = tiny_model("qwen2")
    run, _ = _run(model, "dense", structure="uniform", ratio=0.5, compensate=False)
    assert "remote_code" not in run.structure
    config = _export(run, "dense", tmp_path / "out", tiny_tokenizer)
    assert "auto_map" not in config and "flap" not in config
    assert not (tmp_path / "out" / "modeling_flap.py").exists()
    assert (config["num_key_value_heads"], config["intermediate_size"]) == (1, 64)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32).eval()  # stock, no remote
    assert torch.equal(_logits(reloaded), _logits(model))


@pytest.mark.parametrize(("name", "method"), [("llama-gptq", "gptq"), ("qwen2-rtn", "rtn")])
def test_compressed_tensors_after_flap_and_quantization(name: str, method: str, exports: dict[str, _Export]) -> None:
    export = exports[name]
    widths = [s["intermediate_size"] for s in export.run.structure["flap"]["layers"]]
    fallbacks = [r.note for r in export.records if r.method == method and "does not divide" in r.note]
    assert len(fallbacks) == sum(w % 32 != 0 for w in widths) > 0, "narrower down_proj widths fall back, reported"
    config = export.config
    assert config["quantization_config"]["format"] == "pack-quantized"
    assert config["auto_map"]["AutoModelForCausalLM"].startswith("modeling_flap.FLAP")
    _assert_shapes_recorded(export.run, config)
    with safe_open(str(export.out / "model.safetensors"), "pt") as f:
        down = "model.layers.0.mlp.down_proj"
        assert f.get_tensor(f"{down}.weight_shape").tolist() == [64, widths[0]]
        assert f"{down}.bias" in f.keys()
    # transformers' compressed-tensors loader, through the shipped class, gives the in-memory quantized model
    assert export.reloaded[0].startswith("FLAP") and export.reloaded[1] <= 1e-5


def test_dense_writer_still_refuses_per_layer_shapes_without_the_modeling_file(tmp_path: Path) -> None:
    """A library caller that dropped the remote-code spec cannot write a file that loads as something else."""
    run, _ = _run(tiny_model("llama"), "dense", **PAPER)
    del run.structure["remote_code"]
    with pytest.raises(ExportError, match="flap left per-layer"):
        write_model(ExportConfig(format="dense"), run, None, tmp_path)
    assert not any(tmp_path.iterdir())


def test_a_model_already_shipping_a_modeling_file_is_refused() -> None:
    model = tiny_model("llama")
    run, _ = _run(model, "dense", **PAPER)
    with pytest.raises(RecipeError, match="FLAP already pruned"):
        _run(model, "dense", **PAPER)
    fresh = tiny_model("llama")
    other = ModelContext(fresh, get_adapter(fresh), TOKENS, torch.device("cpu"), batch_size=2)
    other.structure["remote_code"] = {"file": "modeling_sliced.py"}
    with pytest.raises(RecipeError, match="ships modeling_sliced.py"):
        run_stages(other, build_stages([FLAPConfig(method="flap")], "dense"))
    assert run.structure["remote_code"]["file"] == "modeling_flap.py"


@pytest.mark.parametrize("name", ["flap-20pct", "flap-20pct-w4a16-gptq"])
def test_shipped_recipe_runs_and_reloads(name: str, model_dir_factory: Any, text_file: Path, tmp_path: Path) -> None:
    """The shipped recipes through the pipeline on a tiny Llama (64 wide: round_to and groups of 32 stand in)."""
    from compressor.pipeline import compress
    from compressor.recipe import load_recipe

    overrides = [f"calibration.dataset={text_file}", "calibration.samples=4", "calibration.seq_len=32",
                 "calibration.batch_size=2"]
    if name.endswith("gptq"):
        overrides += ["stages.0.round_to=32", "stages.1.group_size=32"]
    loaded = load(model_dir_factory("llama"))
    out = tmp_path / name
    report = compress(loaded, load_recipe(name, overrides), out, device="cpu")
    assert report.params["after"] < report.params["before"]
    config = json.loads((out / "config.json").read_text())
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_flap.FLAPLlamaForCausalLM"
    assert ("quantization_config" in config) == name.endswith("gptq")
    if name.endswith("gptq"):
        assert all(layer["intermediate_size"] % 32 == 0 for layer in config["flap"]["layers"])
    torch.testing.assert_close(_logits(load(out).model), _logits(loaded.model), rtol=0, atol=1e-5)


def test_the_modeling_file_refuses_a_config_it_cannot_rebuild() -> None:
    from compressor.models.shipped.modeling_flap import apply_shapes

    model = tiny_model("llama")
    with pytest.raises(ValueError, match="no flap structure"):
        apply_shapes(model, model.config)
    run, _ = _run(model, "dense", **PAPER)
    spec = dict(model.config.flap)
    fresh = tiny_model("llama")
    fresh.config.flap = {**spec, "layers": spec["layers"][:2]}
    with pytest.raises(ValueError, match="2 entries for 3 decoder layers"):
        apply_shapes(fresh, fresh.config)
    fresh.config.flap = {**spec, "layers": [{**spec["layers"][0], "kv_heads": 0}, *spec["layers"][1:]]}
    with pytest.raises(ValueError, match="invalid layer shape"):
        apply_shapes(fresh, fresh.config)


def test_quantizing_a_flap_export_in_a_second_run_ships_the_modeling_file_again(
    model_dir_factory: Any, text_file: Path, tmp_path: Path
) -> None:
    """compress DIR (a FLAP export) with a GPTQ recipe: its config keeps auto_map, so the file must travel too."""
    from compressor.pipeline import compress
    from compressor.recipe import load_recipe

    calibration = [f"calibration.dataset={text_file}", "calibration.samples=4", "calibration.seq_len=32",
                   "calibration.batch_size=2"]
    compress(load(model_dir_factory("llama")), load_recipe("flap-20pct", calibration), tmp_path / "flap", device="cpu")
    pruned = load(tmp_path / "flap")
    out = tmp_path / "gptq"
    compress(pruned, load_recipe("w4a16-gptq", [*calibration, "stages.0.group_size=32"]), out, device="cpu")
    config = json.loads((out / "config.json").read_text())
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_flap.FLAPLlamaForCausalLM" and config["flap"]
    assert (out / "modeling_flap.py").read_bytes() == (tmp_path / "flap" / "modeling_flap.py").read_bytes()
    torch.testing.assert_close(_logits(load(out).model), _logits(pruned.model), rtol=0, atol=1e-5)
