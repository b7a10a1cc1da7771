"""Model loading: local directories, the hub code path (served from a local cache), GGUF, errors."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from compressor.errors import ModelLoadError, UnsupportedModelError, UsageError
from compressor.models import loading
from compressor.models.loading import load_model, resolve_device


def _logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([[1, 2, 3, 4]])).logits


def test_local_directory(model_dir_factory) -> None:
    loaded = load_model(str(model_dir_factory("opt")))
    assert loaded.model.config.model_type == "opt" and loaded.tokenizer is not None


def test_hub_id_through_the_transformers_loader(model_dir_factory, tmp_path: Path) -> None:
    """A hub id resolves through huggingface_hub's cache exactly as a download would leave it.

    Offline mode and the cache location are read when huggingface_hub is imported, so this runs in a
    fresh interpreter with them set; no network is touched.
    """
    repo = tmp_path / "hub" / "models--tiny-org--tiny-llama"
    shutil.copytree(model_dir_factory("llama"), repo / "snapshots" / ("0" * 40))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0" * 40)
    script = (
        "import torch\n"
        "from compressor.errors import ModelLoadError\n"
        "from compressor.models.loading import load_model\n"
        "hub = load_model('tiny-org/tiny-llama').model\n"
        f"local = load_model({str(model_dir_factory('llama'))!r}).model\n"
        "x = torch.tensor([[1, 2, 3, 4]])\n"
        "assert torch.equal(hub(x).logits, local(x).logits)\n"
        "try:\n    load_model('tiny-org/missing')\nexcept ModelLoadError as e:\n    print('missing:', e)\n"
    )
    env = {**os.environ, "HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "missing: cannot load 'tiny-org/missing'" in result.stdout


def test_pickle_weights_need_permission(model_dir_factory, tmp_path: Path) -> None:
    directory = tmp_path / "pickled"
    shutil.copytree(model_dir_factory("llama"), directory)
    (directory / "model.safetensors").unlink()
    (directory / "pytorch_model.bin").write_bytes(b"not really")
    with pytest.raises(ModelLoadError, match="--allow-pickle"):
        load_model(str(directory))


def test_remote_code_needs_trust(model_dir_factory, tmp_path: Path) -> None:
    import json

    directory = tmp_path / "custom"
    shutil.copytree(model_dir_factory("llama"), directory)
    config = json.loads((directory / "config.json").read_text())
    config["auto_map"] = {"AutoModelForCausalLM": "modeling_evil.Model"}
    (directory / "config.json").write_text(json.dumps(config))
    (directory / "modeling_evil.py").write_text("raise SystemExit('ran untrusted code')\n")
    with pytest.raises(ModelLoadError, match="--trust-remote-code"):
        load_model(str(directory))


def test_unsupported_from_config_before_weights(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text('{"model_type": "mamba"}')
    with pytest.raises(UnsupportedModelError, match="mamba"):
        load_model(str(tmp_path))


def test_unsupported_with_custom_code_fails_before_running_it(tmp_path: Path) -> None:
    """An ``auto_map`` does not bypass the family table, even trusted: refused naming the type and the supported."""
    (tmp_path / "config.json").write_text('{"model_type": "mamba", "auto_map": {"AutoModelForCausalLM": "m.M"}}')
    (tmp_path / "m.py").write_text("raise SystemExit('ran custom code')\n")
    with pytest.raises(UnsupportedModelError, match="'mamba': supported model types are .*llama"):
        load_model(str(tmp_path), trust_remote_code=True)


def test_device_resolution() -> None:
    assert resolve_device("cpu").type == "cpu"
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")


def _saved(directory: Path, tokenizer, dtype: torch.dtype, config_key: str | None = "dtype") -> Path:
    """The tiny llama saved in ``dtype``; config.json names it under ``config_key`` (None: not at all)."""
    import json

    from tiny import tiny_model

    tiny_model("llama").to(dtype).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    config = json.loads((directory / "config.json").read_text())
    config.pop("dtype", None)
    if config_key is not None:
        config[config_key] = str(dtype).removeprefix("torch.")
    (directory / "config.json").write_text(json.dumps(config))
    return directory


@pytest.mark.parametrize(
    ("dtype", "config_key"),
    [
        (torch.bfloat16, "dtype"),  # what transformers 5 writes
        (torch.float16, "torch_dtype"),  # what older checkpoints on the hub say
        (torch.bfloat16, None),  # no dtype in config.json: the safetensors tensors decide
    ],
)
def test_auto_keeps_the_checkpoint_dtype(tiny_tokenizer, tmp_path: Path, dtype: torch.dtype,
                                         config_key: str | None) -> None:
    directory = _saved(tmp_path, tiny_tokenizer, dtype, config_key)
    model = load_model(str(directory)).model  # the default is auto
    assert {p.dtype for p in model.parameters()} == {dtype}
    assert loading.dtype_name(model) == str(dtype).removeprefix("torch.")


def test_float32_checkpoint_stays_float32(model_dir_factory) -> None:
    model = load_model(str(model_dir_factory("llama"))).model
    assert {p.dtype for p in model.parameters()} == {torch.float32}


@pytest.mark.parametrize("forced", ["float32", "float16"])
def test_dtype_forces_one(tiny_tokenizer, tmp_path: Path, forced: str) -> None:
    directory = _saved(tmp_path, tiny_tokenizer, torch.bfloat16)
    model = load_model(str(directory), dtype=forced).model
    assert {p.dtype for p in model.parameters()} == {getattr(torch, forced)}


def test_unknown_dtype_is_a_usage_error(model_dir_factory) -> None:
    with pytest.raises(UsageError, match=r"^--dtype float64: expected one of auto, float32, bfloat16, float16$"):
        load_model(str(model_dir_factory("llama")), dtype="float64")


def test_gguf_and_the_demo_conversion_load_as_their_dequantized_float32(tiny_tokenizer, tmp_path: Path,
                                                                      monkeypatch) -> None:
    """GGUF blocks dequantize to float32; ``auto`` keeps that, also for a bf16 model written as GGUF."""
    from tiny import tiny_model

    from compressor.export.gguf import write_gguf

    gguf_file = tmp_path / "tiny.gguf"
    write_gguf(tiny_model("llama").to(torch.bfloat16), {}, gguf_file, tiny_tokenizer, "Q8_0")
    assert load_model(str(gguf_file)).model.dtype == torch.float32
    assert load_model(str(gguf_file), dtype="bfloat16").model.dtype == torch.bfloat16
    monkeypatch.setenv("COMPRESSOR_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(loading, "demo_gguf_path", lambda name: gguf_file)
    demo = load_model("demo:smollm2")
    assert demo.model.dtype == torch.float32
    assert '"dtype": "float32"' in (tmp_path / "cache" / "demo" / "smollm2" / "config.json").read_text()
