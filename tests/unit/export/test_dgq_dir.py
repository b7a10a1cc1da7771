"""The compressor-int8 directory: dgq's INT8 linears stored with their integer group scales and channel scales apart,
rebuilt by ``compressor.load`` as the same INT8 model (logits bit-equal), refused by plain transformers."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from tiny import tiny_model
from transformers import AutoModelForCausalLM

from compressor.engine import ModelContext, run_stages
from compressor.errors import ExportError, ModelLoadError, RecipeError
from compressor.export.int8_dir import WEIGHTS_FILE, pack_int4, read_int8_dir, unpack_int4, write_int8_dir
from compressor.methods.quant.dgq import DGQConfig
from compressor.methods.quant.int8_linear import Int8Linear
from compressor.models import get_adapter
from compressor.pipeline import compress, load
from compressor.recipe import build_stages, recipe_from_dict

IDS = torch.tensor([[5, 17, 42, 99, 3, 250, 7, 8], [1, 2, 3, 4, 300, 12, 13, 14]])
CASES = {
    "w4a8": ({"weight_bits": 4, "group_size": 32}, torch.float32),
    "w8a8": ({"weight_bits": 8}, torch.float32),
    "w4a8-p99": ({"weight_bits": 4, "group_size": 16, "act_percentile": 99.0, "solver": "rtn"}, torch.float32),
    "w8a8-bf16-p95": ({"weight_bits": 8, "act_percentile": 95.0}, torch.bfloat16),
}


def tiny_llama(dtype: torch.dtype) -> Any:
    """The tiny Llama in ``dtype`` as a loader builds it (``.to(dtype)`` would also cast the rotary buffers)."""
    model = tiny_model("llama")
    if dtype == torch.float32:
        return model
    half = AutoModelForCausalLM.from_config(model.config, dtype=dtype)
    half.load_state_dict(model.state_dict())
    return half.eval()


def _dgq_model(settings: dict[str, Any], dtype: torch.dtype) -> Any:
    model = tiny_llama(dtype)
    tokens = torch.randint(0, 300, (4, 32), generator=torch.Generator().manual_seed(0))
    run = ModelContext(model, get_adapter(model), tokens, torch.device("cpu"), batch_size=2)
    config = DGQConfig.model_validate({"method": "dgq", **settings})
    run_stages(run, build_stages([config], "compressor-int8"))
    return model


def _logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS).logits


def _int8_linears(model: torch.nn.Module) -> dict[str, Int8Linear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, Int8Linear)}


def test_int4_codes_pack_two_per_byte_low_nibble_first() -> None:
    codes = torch.tensor([[-8, 7, 0], [1, -1, 3]], dtype=torch.int8)
    packed = pack_int4(codes)
    # code + 8: [0, 15, 8] -> 0 | 15 << 4 = 240, then 8 | pad 8 << 4 = 136; [9, 7, 11] -> 9 | 7 << 4 = 121, 11 | 128
    assert torch.equal(packed, torch.tensor([[240, 136], [121, 139]], dtype=torch.uint8))
    assert torch.equal(unpack_int4(packed, 3), codes)


@pytest.mark.parametrize("case", list(CASES))
def test_directory_reloads_the_int8_model_bit_for_bit(case: str, tmp_path: Path) -> None:
    settings, dtype = CASES[case]
    model = _dgq_model(settings, dtype)
    quant = write_int8_dir(model, tmp_path)
    reloaded = read_int8_dir(tmp_path)
    ours, theirs = _int8_linears(model), _int8_linears(reloaded)
    assert sorted(theirs) == sorted(ours) == sorted(quant["linears"]) and "lm_head" not in theirs
    for path, module in ours.items():
        again = theirs[path]
        for name in ("weight_int8", "int_scale", "channel_scale", "weight"):
            assert torch.equal(getattr(again, name), getattr(module, name)), (path, name)
        assert again.act_percentile == module.act_percentile == settings.get("act_percentile", 100.0)
    assert next(reloaded.parameters()).dtype == dtype
    assert torch.equal(_logits(reloaded), _logits(model))
    if settings["weight_bits"] == 4:  # two codes a byte, one byte per integer group scale
        stored = json.loads((tmp_path / "config.json").read_text())["quantization_config"]["linears"]
        path = next(iter(stored))
        assert stored[path]["group_size"] == settings["group_size"]


@pytest.mark.parametrize("family", ["opt", "gemma3", "mixtral"])
def test_other_families_reload_bit_for_bit(family: str, tmp_path: Path) -> None:
    """LayerNorm with biases (OPT), x * (1 + w) norms (Gemma 3), per-expert linears merged into 3-D experts by the
    loader and split again (Mixtral)."""
    model = tiny_model(family)
    tokens = torch.randint(0, 300, (2, 16), generator=torch.Generator().manual_seed(0))
    run = ModelContext(model, get_adapter(model), tokens, torch.device("cpu"), batch_size=2)
    scheme = {"weight_bits": 8} if family == "mixtral" else {"group_size": 32}  # 72 expert linears: the fast search
    config = DGQConfig.model_validate({"method": "dgq", "solver": "rtn", **scheme})
    run_stages(run, build_stages([config], "compressor-int8"))
    write_int8_dir(model, tmp_path)
    reloaded = read_int8_dir(tmp_path)
    assert sorted(_int8_linears(reloaded)) == sorted(_int8_linears(model))
    assert torch.equal(_logits(reloaded), _logits(model))


def test_large_models_are_sharded(tmp_path: Path) -> None:
    model = _dgq_model(CASES["w4a8"][0], torch.float32)
    write_int8_dir(model, tmp_path, max_shard_bytes=16_000)
    shards = sorted(p.name for p in tmp_path.glob("int8-model-*.safetensors"))
    index = json.loads((tmp_path / f"{WEIGHTS_FILE}.index.json").read_text())
    assert len(shards) > 2 and sorted(set(index["weight_map"].values())) == shards
    assert not (tmp_path / WEIGHTS_FILE).exists()
    assert torch.equal(_logits(read_int8_dir(tmp_path)), _logits(model))
    (tmp_path / shards[-1]).unlink()
    with pytest.raises(ModelLoadError, match=f"compressor-int8 directory without {shards[-1]}"):
        read_int8_dir(tmp_path)


def test_plain_transformers_refuses_the_directory(tmp_path: Path) -> None:
    """transformers skips the unknown quant_method (a warning naming it) and finds no model.safetensors, so it
    fails instead of running the INT8 linears at random initial weights."""
    write_int8_dir(_dgq_model(CASES["w8a8"][0], torch.float32), tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "compressor-int8"
    assert "compressor.load" in config["quantization_config"]["note"]
    with pytest.raises(OSError, match="no file named model.safetensors"):
        AutoModelForCausalLM.from_pretrained(tmp_path)


def test_a_model_without_int8_linears_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ExportError, match="compressor-int8 stores dgq's INT8 linears and the model has none"):
        write_int8_dir(tiny_model("llama"), tmp_path)


def test_recipe_validation_takes_dgq_only() -> None:
    data = {"name": "x", "stages": [{"method": "dgq", "act_percentile": 99.0}], "export": {"format": "compressor-int8"}}
    assert recipe_from_dict(data).export.format == "compressor-int8"  # the clip this form can store
    gptq = {**data, "stages": [{"method": "gptq", "bits": 4}]}
    with pytest.raises(RecipeError, match="export.format: 'compressor-int8' stores dgq's INT8 linears only, "
                                          "the recipe quantizes with \\['gptq'\\]"):
        recipe_from_dict(gptq)


@pytest.mark.parametrize("prune", [{"method": "slicegpt", "slicing": 0.25}, {"method": "finercut", "ratio": 0.25}])
def test_a_pruning_stage_that_needs_its_own_modeling_file_is_refused_before_the_run(prune: dict[str, Any]) -> None:
    """The directory rebuilds the model from config.json alone: refused at validation, not after the run."""
    data = {"name": "x", "stages": [prune, {"method": "dgq"}], "export": {"format": "compressor-int8"}}
    with pytest.raises(RecipeError, match=f"stages.0: {prune['method']}'s model needs its own modeling file, "
                                          "which a compressor-int8 directory cannot use"):
        recipe_from_dict(data)


def test_compress_then_load_gives_the_in_memory_model(model_dir_factory: Any, text_file: Path, tmp_path: Path) -> None:
    """The whole pipeline: smoothing folded into the norms, percentile clip, atomic directory, ``compressor.load``."""
    data = {
        "name": "t",
        "calibration": {"dataset": str(text_file), "samples": 4, "seq_len": 32, "batch_size": 2},
        "stages": [{"method": "dgq", "group_size": 32, "act_percentile": 99.0, "smoothing": 0.5}],
        "export": {"format": "compressor-int8"},
    }
    loaded = load(model_dir_factory("llama"), dtype="float32")
    report = compress(loaded, recipe_from_dict(data), tmp_path / "out", device="cpu")
    assert not [w for w in report.warnings if "INT8 activations are computed in memory" in str(w)]
    files = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert {WEIGHTS_FILE, "config.json", "recipe.yaml", "tokenizer.json"} <= set(files)
    assert not [f for f in files if f.startswith("model") and f.endswith(".safetensors")]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no partial directory left
    again = load(tmp_path / "out")
    assert again.tokenizer is not None and len(_int8_linears(again.model)) == len(_int8_linears(loaded.model))
    assert torch.equal(_logits(again.model), _logits(loaded.model))


@pytest.mark.parametrize(("form", "named"), [
    ("w4a8", "a compressed-tensors pack-quantized W4A8 file (INT8 per-token input activations)"),
    ("w8a8", "a compressed-tensors int-quantized W8A8 file (INT8 per-token input activations)"),
    ("int8-dir", "a compressor-int8 directory (dgq INT8 linears, INT8 per-token activations)"),
], ids=["w4a8", "w8a8", "int8-dir"])
@pytest.mark.parametrize("target", ["gguf", "dense"])
def test_cli_export_refuses_int8_activation_sources(form: str, named: str, target: str, runner: Any,
                                                    tmp_path: Path) -> None:
    """``compressor export`` of a dgq result: exit 2, one line naming the source's format, nothing written."""
    from compressor.cli import app
    from compressor.export.compressed_tensors import write_compressed_tensors

    source = tmp_path / form
    source.mkdir()
    if form == "int8-dir":
        write_int8_dir(_dgq_model(CASES["w4a8"][0], torch.float32), source)
    else:
        model = _dgq_model(CASES[form][0], torch.float32)
        tokens = torch.randint(0, 300, (4, 32), generator=torch.Generator().manual_seed(0))
        run = ModelContext(model, get_adapter(model), tokens, torch.device("cpu"), batch_size=2)
        run.quantized.update({p: m.dual_grained().to_quantized_weight() for p, m in _int8_linears(model).items()})
        write_compressed_tensors(run.model, run.quantized, source)
    result = runner.invoke(app, ["export", str(source), "--format", target, "--out", str(tmp_path / "out")])
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and named in lines[0] and "compressor export cannot re-store it" in lines[0], lines
    assert not (tmp_path / "out").exists()


def test_cli_export_to_compressor_int8_is_refused_for_weight_only_files(runner: Any, tiny_tokenizer: Any,
                                                                         tmp_path: Path) -> None:
    """A weight-only compressed-tensors run has no INT8 linears to store as compressor-int8: exit 2 before writing."""
    from compressor.cli import app
    from compressor.export.compressed_tensors import write_compressed_tensors
    from compressor.methods.quant.ops import quantize_rtn

    model = tiny_model("llama")
    quantized = {}
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and name != "lm_head":
            quantized[name] = quantize_rtn(module.weight.data, 4, 32, True)
            module.weight.data = quantized[name].dequantize()
    source = tmp_path / "source"
    source.mkdir()
    write_compressed_tensors(model, quantized, source)
    tiny_tokenizer.save_pretrained(source)
    result = runner.invoke(app, ["export", str(source), "--format", "compressor-int8", "--out", str(tmp_path / "o")])
    assert result.exit_code == 2, result.output
    assert "compressor-int8 is written by its own methods (dgq" in result.output and not (tmp_path / "o").exists()
