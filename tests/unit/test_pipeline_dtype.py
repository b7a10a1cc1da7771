"""compress() keeps a checkpoint's dtype by default (``auto``), exports in it and says so in the report."""

from __future__ import annotations

import json
from pathlib import Path

import torch
import yaml
from safetensors import safe_open

from compressor.pipeline import compress
from compressor.recipe import Recipe, recipe_from_dict


def _recipe(text_file: Path, export_format: str) -> Recipe:
    data = {
        "name": "t",
        "calibration": {"dataset": str(text_file), "samples": 2, "seq_len": 16, "batch_size": 2},
        "stages": [{"method": "rtn", "bits": 4, "group_size": 32, "symmetric": True}],
        "export": {"format": export_format},
    }
    return recipe_from_dict(yaml.safe_load(yaml.safe_dump(data)))


def _stored(out: Path) -> dict[str, torch.dtype]:
    """Every tensor name in the output's safetensors files -> its stored dtype."""
    dtypes = {}
    for file in out.glob("*.safetensors"):
        with safe_open(str(file), "pt") as handle:
            dtypes |= {name: handle.get_slice(name).get_dtype() for name in handle.keys()}  # noqa: SIM118
    return dtypes


def _report(out: Path) -> dict:
    return json.loads((out / "compression_report.json").read_text())


def test_bf16_checkpoint_stays_bf16_dense(bf16_dir: Path, text_file: Path, tmp_path: Path) -> None:
    report = compress(bf16_dir, _recipe(text_file, "dense"), tmp_path / "out", device="cpu")
    assert report.dtype == "bfloat16" and _report(tmp_path / "out")["dtype"] == "bfloat16"
    # 2 bytes per parameter before compression: the model was not widened to float32 on load
    assert report.size_bytes["before"] == 2 * report.params["before"]
    stored = _stored(tmp_path / "out")
    assert stored and set(stored.values()) == {"BF16"}, stored
    assert json.loads((tmp_path / "out" / "config.json").read_text())["dtype"] == "bfloat16"


def test_bf16_checkpoint_stays_bf16_compressed_tensors(bf16_dir: Path, text_file: Path, tmp_path: Path) -> None:
    report = compress(bf16_dir, _recipe(text_file, "compressed-tensors"), tmp_path / "out", device="cpu")
    assert report.dtype == "bfloat16"
    stored = _stored(tmp_path / "out")
    scales = {name: dtype for name, dtype in stored.items() if name.endswith("weight_scale")}
    assert len(scales) == 3 * 7 and set(scales.values()) == {"BF16"}
    dense = {name: dtype for name, dtype in stored.items() if not name.endswith(("_packed", "_shape", "_scale"))}
    assert dense and set(dense.values()) == {"BF16"}, dense


def test_float32_checkpoint_stays_float32(model_dir_factory, text_file: Path, tmp_path: Path) -> None:
    report = compress(model_dir_factory("llama"), _recipe(text_file, "dense"), tmp_path / "out", device="cpu")
    assert report.dtype == "float32" and report.size_bytes["before"] == 4 * report.params["before"]
    assert set(_stored(tmp_path / "out").values()) == {"F32"}


def test_dtype_float32_forces_it(bf16_dir: Path, text_file: Path, tmp_path: Path) -> None:
    report = compress(bf16_dir, _recipe(text_file, "dense"), tmp_path / "out", dtype="float32", device="cpu")
    assert report.dtype == "float32" and _report(tmp_path / "out")["dtype"] == "float32"
    assert set(_stored(tmp_path / "out").values()) == {"F32"}
