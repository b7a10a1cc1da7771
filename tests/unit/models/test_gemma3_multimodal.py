"""The multimodal ``gemma3`` checkpoint (Gemma3ForConditionalGeneration) is compressed as its language model.

A tiny random one (the tiny Gemma 3 text sizes, a one-layer vision tower) is saved to disk as transformers saves
it; loading builds ``Gemma3ForCausalLM`` from its language-model weights alone, with the same text logits as the
whole multimodal model; ``compressor compress`` exports a text-only ``gemma3_text`` model that a Python without
compressor reloads with logits equal to the model compressed in memory, and the report and config.json say so.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from isolation import reload_without_compressor
from safetensors import safe_open
from tiny import TINY, VOCAB
from transformers import AutoModelForCausalLM, Gemma3Config, Gemma3ForConditionalGeneration
from typer.testing import CliRunner

import compressor.pipeline
from compressor.cli import app
from compressor.errors import ModelLoadError, UnsupportedModelError
from compressor.models.loading import LoadedModel, load_model
from compressor.pipeline import compress
from compressor.recipe import recipe_from_dict

TOKENS = torch.tensor([[5, 17, 42, 99, 3, 250, 7, 8, 11, 12, 13, 14, 200, 201, 2, 9]])
LEFT_OUT = ["model.vision_tower", "model.multi_modal_projector"]
VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=32,
              patch_size=8)


def multimodal_gemma3(seed: int = 0, **text_overrides: object) -> Gemma3ForConditionalGeneration:
    """The tiny Gemma 3 text model (tests/tiny.py's row) behind a tiny vision tower, norms perturbed."""
    text = {key: value for key, value in TINY["gemma3"].items() if key != "model_type"}
    text.update(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=3, num_attention_heads=4,
                max_position_embeddings=256)
    text.update(text_overrides)
    config = Gemma3Config(text_config=text, vision_config=VISION, mm_tokens_per_image=4, image_token_index=300,
                          boi_token_index=301, eoi_token_index=302)
    torch.manual_seed(seed)
    model = Gemma3ForConditionalGeneration(config).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                param.add_(0.1 * torch.randn_like(param))
    return model


@pytest.fixture(scope="module")
def multimodal_dir(tmp_path_factory: pytest.TempPathFactory, tiny_tokenizer: Any) -> Path:
    path = tmp_path_factory.mktemp("tiny-gemma3-multimodal")
    multimodal_gemma3().save_pretrained(path)
    tiny_tokenizer.save_pretrained(path)
    return path


def _logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=TOKENS).logits


def test_checkpoint_is_what_transformers_writes_for_gemma3(multimodal_dir: Path) -> None:
    config = json.loads((multimodal_dir / "config.json").read_text())
    assert config["model_type"] == "gemma3" and config["architectures"] == ["Gemma3ForConditionalGeneration"]
    with safe_open(str(multimodal_dir / "model.safetensors"), "pt") as handle:
        roots = {key.split(".")[0] for key in handle.keys()}  # noqa: SIM118  (safe_open is not a mapping)
    assert roots == {"language_model", "vision_tower", "multi_modal_projector"}


def test_load_builds_the_language_model_alone_with_the_same_text_logits(multimodal_dir: Path) -> None:
    loaded = load_model(str(multimodal_dir))
    model = loaded.model
    assert type(model).__name__ == "Gemma3ForCausalLM" and model.config.model_type == "gemma3_text"
    assert not any("vision" in name or "multi_modal" in name for name, _ in model.named_parameters())
    assert model.lm_head.weight is model.model.embed_tokens.weight  # tied, as in the checkpoint
    whole = Gemma3ForConditionalGeneration.from_pretrained(multimodal_dir).eval()
    torch.testing.assert_close(_logits(model), _logits(whole), rtol=0, atol=0)
    assert model.config.language_model_of == {"model_type": "gemma3",
                                              "architectures": ["Gemma3ForConditionalGeneration"],
                                              "left_out": LEFT_OUT}
    [warning] = loaded.warnings
    assert warning["modules"] == LEFT_OUT and "text-only gemma3_text model" in warning["message"]


def test_load_keeps_the_checkpoint_dtype(tmp_path: Path, tiny_tokenizer: Any) -> None:
    multimodal_gemma3().to(torch.bfloat16).save_pretrained(tmp_path)
    tiny_tokenizer.save_pretrained(tmp_path)
    assert next(load_model(str(tmp_path)).model.parameters()).dtype == torch.bfloat16
    assert next(load_model(str(tmp_path), dtype="float32").model.parameters()).dtype == torch.float32


def test_an_unsupported_language_model_is_refused_before_loading(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gemma3",
                                                      "text_config": {"model_type": "gemma3n_text"}}))
    with pytest.raises(UnsupportedModelError, match="unsupported architecture 'gemma3n_text'"):
        load_model(str(tmp_path))  # no weights in the directory: the refusal comes first


def test_a_language_model_weight_the_mapping_misses_is_an_error_not_a_random_init(
    multimodal_dir: Path, tmp_path: Path
) -> None:
    from safetensors.torch import load_file, save_file

    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        (tmp_path / name).write_bytes((multimodal_dir / name).read_bytes())
    tensors = load_file(multimodal_dir / "model.safetensors")
    norm = "language_model.model.norm.weight"
    tensors["text." + norm] = tensors.pop(norm)  # a layout the key mapping does not know
    save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ModelLoadError, match=r"language model does not load alone \(missing \['model.norm.weight'\]"):
        load_model(str(tmp_path))




def test_compress_cli_exports_the_language_model_that_transformers_reloads(
    multimodal_dir: Path, text_file: Path, tmp_path: Path, runner: CliRunner, monkeypatch: pytest.MonkeyPatch
) -> None:
    kept: list[LoadedModel] = []
    real_load = compressor.pipeline.load_model
    monkeypatch.setattr(compressor.pipeline, "load_model", lambda *a, **k: kept.append(real_load(*a, **k)) or kept[0])
    recipe, out = tmp_path / "recipe.yaml", tmp_path / "out"
    recipe.write_text(json.dumps({
        "name": "gemma3-mm-w4", "stages": [{"method": "gptq", "bits": 4, "group_size": 32}],
        "calibration": {"dataset": str(text_file), "samples": 4, "seq_len": 32, "batch_size": 2},
        "export": {"format": "compressed-tensors"}}))
    result = runner.invoke(app, ["compress", str(multimodal_dir), "-r", str(recipe), "-o", str(out)])
    assert result.exit_code == 0, result.output
    assert "the vision tower and projector are not in the output" in result.stderr  # told, not only filed
    report = json.loads((out / "compression_report.json").read_text())
    assert report["warnings"][0]["modules"] == LEFT_OUT
    assert len([row for row in report["layers"] if row["method"] == "gptq"]) == 3 * 7
    config = json.loads((out / "config.json").read_text())
    assert (config["model_type"], config["architectures"]) == ("gemma3_text", ["Gemma3ForCausalLM"])
    assert config["language_model_of"]["model_type"] == "gemma3"
    assert config["quantization_config"]["format"] == "pack-quantized"
    seen = reload_without_compressor(out, TOKENS, _logits(kept[0].model))
    assert (seen["class"], seen["type"], seen["diff"]) == ("Gemma3ForCausalLM", "gemma3_text", 0.0)


def test_gguf_export_of_the_language_model_matches_in_memory(tmp_path: Path, tiny_tokenizer: Any,
                                                             text_file: Path) -> None:
    """A language model llama.cpp's gemma3 graph runs (5 sliding layers then a full one, 256-wide heads) in a
    multimodal checkpoint: GPTQ W4 into GGUF, reloaded by transformers' GGUF loader with equal logits."""
    source = tmp_path / "mm"
    multimodal_gemma3(num_hidden_layers=6, layer_types=["sliding_attention"] * 5 + ["full_attention"], head_dim=256,
                      query_pre_attn_scalar=256).save_pretrained(source)
    tiny_tokenizer.save_pretrained(source)
    loaded = load_model(str(source))
    recipe = recipe_from_dict({
        "name": "mm-gguf", "calibration": {"dataset": str(text_file), "samples": 4, "seq_len": 32, "batch_size": 2},
        "stages": [{"method": "gptq", "bits": 4, "group_size": 32}], "export": {"format": "gguf"}})
    report = compress(loaded, recipe, tmp_path / "out", device="cpu")
    assert report.warnings[0]["modules"] == LEFT_OUT
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out", gguf_file="model-Q4_0.gguf").eval()
    assert type(reloaded).__name__ == "Gemma3ForCausalLM"
    torch.testing.assert_close(_logits(reloaded), _logits(loaded.model), rtol=0, atol=0)
