"""The input checks of issue 20 as functions: safetensors headers, config sizes, finite weights, plain YAML."""

from __future__ import annotations

import json
import random
import struct
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from compressor.errors import ModelLoadError, RecipeError
from compressor.models import checkpoint_checks
from compressor.models.checkpoint_checks import (
    check_config_sizes,
    check_finite,
    check_safetensors,
    estimate_parameters,
)
from compressor.recipe import check_plain_yaml


def _file(path: Path, header: dict[str, Any], data: bytes) -> Path:
    text = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(text)) + text + data)
    return path


def test_a_file_safetensors_wrote_passes(tmp_path: Path) -> None:
    path = tmp_path / "ok.safetensors"
    save_file({"a": torch.zeros(3, 5), "b": torch.ones(2, dtype=torch.bfloat16), "empty": torch.zeros(0, 4)}, path,
              metadata={"format": "pt"})
    check_safetensors(path)


def test_sub_byte_dtypes_fill_whole_bytes(tmp_path: Path) -> None:
    """F4 packs two values a byte: 6 values take 3 bytes; F6 4 values take 3 bytes. 5 F4 values (20 bits) end
    inside a byte, which the safetensors reader refuses (found by tests/unit/test_fuzz.py), so the check does."""
    header = {"f4": {"dtype": "F4", "shape": [6], "data_offsets": [0, 3]},
              "f6": {"dtype": "F6_E2M3", "shape": [4], "data_offsets": [3, 6]}}
    check_safetensors(_file(tmp_path / "f4.safetensors", header, b"\0" * 6))
    header["f4"]["data_offsets"] = [0, 2]
    with pytest.raises(ModelLoadError, match=r"tensor f4: F4 \[6\] needs 3 bytes, the header gives it 2"):
        check_safetensors(_file(tmp_path / "f4.safetensors", header, b"\0" * 6))
    header["f4"] = {"dtype": "F4", "shape": [5], "data_offsets": [0, 3]}
    with pytest.raises(ModelLoadError, match=r"tensor f4: F4 \[5\] is 20 bits, not a whole number of bytes"):
        check_safetensors(_file(tmp_path / "f4.safetensors", header, b"\0" * 6))


@pytest.mark.parametrize(("entry", "message"), [
    ({"dtype": "F33", "shape": [1], "data_offsets": [0, 4]}, "unknown dtype 'F33'"),
    ({"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}, "shape \\[-1\\]"),
    ({"dtype": "F32", "shape": [True], "data_offsets": [0, 4]}, "shape \\[True\\]"),
    ({"dtype": "F32", "shape": [1], "data_offsets": [4, 0]}, "data_offsets \\[4, 0\\]"),
    ({"dtype": "F32", "shape": [1]}, "lacks dtype, shape or data_offsets"),
    ({"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}, "ends at data byte 8, but the file holds only 4"),
    ({"dtype": "F32", "shape": [10**12, 10**12], "data_offsets": [0, 4]}, "needs 4000000000000000000000000 bytes"),
])
def test_header_entries_that_lie(tmp_path: Path, entry: dict[str, Any], message: str) -> None:
    with pytest.raises(ModelLoadError, match=message):
        check_safetensors(_file(tmp_path / "x.safetensors", {"w": entry}, b"\0" * 4))


def test_header_length_beyond_the_file(tmp_path: Path) -> None:
    path = tmp_path / "x.safetensors"
    path.write_bytes(struct.pack("<Q", 10**6) + b"{}")
    with pytest.raises(ModelLoadError, match="header length 1000000 does not fit the 10-byte file"):
        check_safetensors(path)


def test_random_corruption_is_a_model_load_error_or_what_safetensors_reads(tmp_path: Path) -> None:
    """200 seeded corruptions (byte flips, cuts) of a real file: the check either refuses it with a
    ModelLoadError or passes a file whose header safetensors itself then parses; nothing else escapes."""
    path = tmp_path / "x.safetensors"
    save_file({"a": torch.arange(12.0).view(3, 4), "b": torch.ones(7, dtype=torch.float16)}, path)
    good = path.read_bytes()
    rng = random.Random(0)
    for _ in range(200):
        raw = bytearray(good)
        if rng.random() < 0.3:
            raw = raw[: rng.randrange(len(raw))]
        else:
            for _ in range(rng.randint(1, 4)):
                raw[rng.randrange(min(len(raw), 200))] = rng.randrange(256)
        path.write_bytes(bytes(raw))
        try:
            check_safetensors(path)
        except ModelLoadError:
            continue
        try:
            load_file(path)  # the header passed our check: the reader may only object to bytes no tensor uses
        except SafetensorError as exc:
            assert "not fully covered" in str(exc), exc


def _config(**sizes: object) -> SimpleNamespace:
    return SimpleNamespace(**sizes)


def test_estimate_known_answers() -> None:
    """vocab * hidden + layers * 2 * hidden * (experts *) width, worked by hand."""
    dense = _config(hidden_size=64, num_hidden_layers=3, vocab_size=320, intermediate_size=128)
    assert estimate_parameters(dense, "c") == 320 * 64 + 3 * 2 * 64 * 128 == 69632
    mixtral = _config(hidden_size=64, num_hidden_layers=2, vocab_size=100, intermediate_size=32, num_local_experts=8)
    assert estimate_parameters(mixtral, "c") == 6400 + 2 * 2 * 64 * 8 * 32 == 71936
    qwen_moe = _config(hidden_size=64, num_hidden_layers=1, vocab_size=10, intermediate_size=128, num_experts=4,
                       moe_intermediate_size=16)
    assert estimate_parameters(qwen_moe, "c") == 640 + 2 * 64 * 4 * 16 == 8832
    opt = _config(hidden_size=64, num_hidden_layers=1, vocab_size=10, ffn_dim=256, num_experts=0)
    assert estimate_parameters(opt, "c") == 640 + 2 * 64 * 256 == 33408


def test_estimate_refuses_sizes_that_are_not_counts() -> None:
    with pytest.raises(ModelLoadError, match="c: hidden_size is 64.5, expected an integer >= 1"):
        estimate_parameters(_config(hidden_size=64.5, num_hidden_layers=1, vocab_size=1), "c")


def test_sizes_beyond_the_weight_files() -> None:
    """69632 parameters need at least 8704 bytes at one bit each: 8704 passes, 8703 does not."""
    config = _config(hidden_size=64, num_hidden_layers=3, vocab_size=320, intermediate_size=128)
    check_config_sizes(config, 8704, "c")
    with pytest.raises(ModelLoadError, match="c: its sizes .*hidden_size=64.* 69,632 parameters, more than the "
                                             "8,703 bytes"):
        check_config_sizes(config, 8703, "c")


def test_sizes_beyond_this_machines_memory(monkeypatch: pytest.MonkeyPatch) -> None:
    """69632 parameters take at least 139264 bytes loaded (2 each): refused on a machine with less."""
    config = _config(hidden_size=64, num_hidden_layers=3, vocab_size=320, intermediate_size=128)
    monkeypatch.setattr(checkpoint_checks, "total_memory_bytes", lambda: 139264)
    check_config_sizes(config, 10**9, "c")
    monkeypatch.setattr(checkpoint_checks, "total_memory_bytes", lambda: 139263)
    with pytest.raises(ModelLoadError, match="more than this machine's 0.0 GiB of memory"):
        check_config_sizes(config, 10**9, "c")


def test_finite_check_names_the_first_bad_tensor() -> None:
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 4))
    check_finite(model, "m")
    with torch.no_grad():
        model[1].bias[2] = float("inf")
        model[1].weight[0, :2] = float("nan")
    with pytest.raises(ModelLoadError, match="m: weight 1.weight has 2 NaN/inf values of 16"):
        check_finite(model, "m")


@pytest.mark.parametrize(("text", "message"), [
    ("a: !!python/name:os.system x", "r:1: YAML tag !!python/name:os.system refused"),
    ("a: !custom 1", "r:1: YAML tag !custom refused"),
    ("a: 1\nb: &x [1]\nc: *x", "r:2: YAML anchor/alias 'x' refused"),
])
def test_plain_yaml_refuses_tags_and_aliases(text: str, message: str) -> None:
    with pytest.raises(RecipeError, match=message):
        check_plain_yaml(text, "r")


def test_plain_yaml_keeps_ordinary_recipes() -> None:
    check_plain_yaml("name: x  # & and * and ! in a comment\nstages: [{method: rtn, targets: ['re:.*&*!']}]\n", "r")
