"""compress() end to end into each packed format, loaded back by the consumer's own loader."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM

from compressor.pipeline import compress, evaluate, load
from compressor.recipe import recipe_from_dict

TOKENS = torch.tensor([[5, 17, 42, 99, 3, 250, 7, 8]])


def _recipe(text_file: Path, export: dict[str, object], **stage: object) -> object:
    data = {
        "name": "t",
        "calibration": {"dataset": str(text_file), "samples": 4, "seq_len": 32, "batch_size": 2},
        "stages": [{"method": "gptq", "bits": 4, "group_size": 32, **stage}],
        "export": export,
    }
    return recipe_from_dict(yaml.safe_load(yaml.safe_dump(data)))


def _logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(TOKENS).logits


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_compressed_tensors_matches_in_memory(model_dir_factory, text_file: Path, tmp_path: Path,
                                              dtype: str) -> None:
    loaded = load(model_dir_factory("qwen2"), dtype=dtype)
    out = tmp_path / "ct"
    report = compress(loaded, _recipe(text_file, {"format": "compressed-tensors"}), out, device="cpu")
    assert report.size_bytes["after"] < report.size_bytes["before"]
    reloaded = AutoModelForCausalLM.from_pretrained(out, dtype=getattr(torch, dtype))
    import json

    assert json.loads((out / "config.json").read_text())["quantization_config"]["format"] == "pack-quantized"
    torch.testing.assert_close(_logits(reloaded), _logits(loaded.model), rtol=0, atol=0)


def test_gguf_q4_0_matches_in_memory(model_dir_factory, text_file: Path, tmp_path: Path) -> None:
    loaded = load(model_dir_factory("llama"))
    out = tmp_path / "gguf"
    compress(loaded, _recipe(text_file, {"format": "gguf"}), out, device="cpu")
    files = [p.name for p in out.glob("*.gguf")]
    assert files == ["model-Q4_0.gguf"]
    reloaded = AutoModelForCausalLM.from_pretrained(out, gguf_file=files[0])
    torch.testing.assert_close(_logits(reloaded), _logits(loaded.model), rtol=0, atol=0)
    # `compressor eval` and `compressor.load` read the export directory as it is
    assert evaluate(out, str(text_file), seq_len=32, max_tokens=64, device="cpu").ppl > 1


def test_gguf_q8_0(model_dir_factory, text_file: Path, tmp_path: Path) -> None:
    loaded = load(model_dir_factory("llama"))
    out = tmp_path / "gguf8"
    compress(loaded, _recipe(text_file, {"format": "gguf", "gguf_type": "Q8_0"}, bits=8), out, device="cpu")
    reloaded = AutoModelForCausalLM.from_pretrained(out, gguf_file="model-Q8_0.gguf")
    torch.testing.assert_close(_logits(reloaded), _logits(loaded.model), rtol=0, atol=0)


def test_export_command_turns_compressed_tensors_into_gguf(model_dir_factory, text_file: Path, tmp_path: Path,
                                                           runner) -> None:
    from compressor.cli import app

    loaded = load(model_dir_factory("llama"))
    ct = tmp_path / "ct"
    compress(loaded, _recipe(text_file, {"format": "compressed-tensors"}), ct, device="cpu")
    in_memory = _logits(loaded.model)
    result = runner.invoke(app, ["export", str(ct), "--format", "gguf", "--out", str(tmp_path / "g"), "--json"])
    assert result.exit_code == 0, result.output
    gguf = AutoModelForCausalLM.from_pretrained(tmp_path / "g", gguf_file="model-Q4_0.gguf")
    # GGUF stores scales in fp16: within fp16 rounding of the scales, never a different integer
    torch.testing.assert_close(_logits(gguf), in_memory, rtol=0, atol=2e-3)
    dense = runner.invoke(app, ["export", str(ct), "--format", "dense", "--out", str(tmp_path / "d")])
    assert dense.exit_code == 0, dense.output
    torch.testing.assert_close(_logits(AutoModelForCausalLM.from_pretrained(tmp_path / "d")), in_memory,
                               rtol=0, atol=0)
    bad = runner.invoke(app, ["export", str(ct), "--format", "gguf", "--gguf-type", "Q6_K", "--out",
                              str(tmp_path / "x")])
    assert bad.exit_code == 2 and "--gguf-type" in bad.stderr
    assert not (tmp_path / "x").exists()
    for fmt in ("bitsandbytes", "bitstack", "compressor-int8"):  # written by their own methods, not re-stored
        refused = runner.invoke(app, ["export", str(ct), "--format", fmt, "--out", str(tmp_path / "x")])
        assert refused.exit_code == 2 and f"--format {fmt}: export re-stores" in refused.stderr, refused.output
        assert not (tmp_path / "x").exists()
    # a wider type holds the 4-bit codes exactly: Q8_0 gives the same weights as Q4_0, not a requantization
    wide = runner.invoke(app, ["export", str(ct), "--format", "gguf", "--gguf-type", "Q8_0", "--out",
                               str(tmp_path / "w")])
    assert wide.exit_code == 0, wide.output
    assert not list((tmp_path / "w").glob("*.requantization.json"))
    q8 = AutoModelForCausalLM.from_pretrained(tmp_path / "w", gguf_file="model-Q8_0.gguf")
    torch.testing.assert_close(_logits(q8), _logits(gguf), rtol=0, atol=0)


@pytest.mark.parametrize(("family", "export"), [("opt", "gguf"), ("mixtral", "gguf")])
def test_a_format_that_cannot_hold_the_model_fails_before_calibration(
    model_dir_factory, text_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, family: str, export: str
) -> None:
    """OPT has no llama.cpp architecture and no MoE layout is written to GGUF: a recipe error (exit 2) before any
    calibration text is read, not an export error after the run."""
    import compressor.pipeline as pipeline
    from compressor.errors import RecipeError

    def no_calibration(*args: object, **kwargs: object) -> None:
        raise AssertionError("calibration ran before the format was checked against the model")

    monkeypatch.setattr(pipeline, "calibration_batch", no_calibration)
    recipe = _recipe(text_file, {"format": export})
    with pytest.raises(RecipeError, match=f"export.format {export}: .*({family}|Mixtral)") as caught:
        compress(load(model_dir_factory(family)), recipe, tmp_path / "o", device="cpu")
    assert caught.value.exit_code == 2 and not (tmp_path / "o").exists()
