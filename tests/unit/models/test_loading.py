"""Model loading: local directories, the hub code path (served from a local cache), GGUF, errors."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from compressor.errors import ModelLoadError, UnsupportedModelError
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


def test_device_resolution() -> None:
    assert resolve_device("cpu").type == "cpu"
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
