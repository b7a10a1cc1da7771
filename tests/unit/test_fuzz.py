"""Property-based fuzz (hypothesis) of what reads untrusted input: the recipe loader, our safetensors header
check and our GGUF reading. Each may fail only with its documented CompressorError; the targets are in
tests/fuzz_targets.py. Bounded to a few seconds here; ``benchmarks/fuzz.py --examples N`` runs them longer.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

import pytest
from fuzz_targets import _GGUF, TARGETS, check_safetensors_bytes
from hypothesis import HealthCheck, given, settings

from compressor.errors import ModelLoadError
from compressor.models.checkpoint_checks import check_safetensors
from compressor.models.describe import describe

#: Examples per target in the default suite: together a few seconds on one thread.
EXAMPLES = {"recipe_text": 40, "recipe_dict": 40, "recipe_overrides": 20, "safetensors": 100, "gguf": 60}


def _fuzz(name: str) -> None:
    strategy, check = TARGETS[name]

    @settings(max_examples=EXAMPLES[name], deadline=None, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(strategy)
    def run(value: Any) -> None:
        check(value)

    run()


@pytest.mark.parametrize("name", sorted(EXAMPLES))
def test_fuzz(name: str) -> None:
    _fuzz(name)


def _file(path: Path, header: dict[str, Any], data: bytes) -> Path:
    text = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(text)) + text + data)
    return path


def _f32(begin: int) -> dict[str, Any]:
    return {"dtype": "F32", "shape": [1], "data_offsets": [begin, begin + 4]}


@pytest.mark.parametrize(
    ("header", "data_bytes", "message"),
    [
        ({"a": _f32(4)}, 8, r"data bytes 0\.\.4 \(between the start of the data and tensor a\) belong to no tensor"),
        ({"a": _f32(0), "b": _f32(8)}, 12, r"data bytes 4\.\.8 \(between tensor a and tensor b\) belong to no tensor"),
        ({"a": _f32(0)}, 6, r"data bytes 4\.\.6 \(after tensor a\) belong to no tensor"),
    ],
)
def test_a_header_leaving_holes_is_refused(tmp_path: Path, header: dict[str, Any], data_bytes: int, message: str
                                           ) -> None:
    """What fuzzing found: the safetensors reader refuses a data section with bytes no tensor covers ("file not
    fully covered", naming nothing); the check said nothing and let it through. Now it names the gap."""
    path = _file(tmp_path / "holes.safetensors", header, b"\0" * data_bytes)
    with pytest.raises(ModelLoadError, match=message):
        check_safetensors(path)
    check_safetensors_bytes(path.read_bytes())  # and the fuzz property holds on it


def test_a_header_not_starting_with_a_brace_is_refused(tmp_path: Path) -> None:
    """The safetensors reader requires the JSON to start with '{'; json.loads also accepts leading spaces."""
    text = b" " + json.dumps({"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}).encode()
    path = tmp_path / "space.safetensors"
    path.write_bytes(struct.pack("<Q", len(text)) + text + b"\0" * 4)
    with pytest.raises(ModelLoadError, match="does not start with '{'"):
        check_safetensors(path)


@pytest.mark.parametrize("metadata", [[], {"format": 1}, "pt"])
def test_metadata_that_is_not_a_map_of_strings_is_refused(tmp_path: Path, metadata: Any) -> None:
    """Also found by fuzzing: the reader wants ``__metadata__`` as string -> string and fails unnamed otherwise."""
    path = _file(tmp_path / "meta.safetensors", {"__metadata__": metadata, "a": _f32(0)}, b"\0" * 4)
    with pytest.raises(ModelLoadError, match="__metadata__ is not a map of strings"):
        check_safetensors(path)


def test_a_gguf_architecture_that_is_not_utf8_is_described(tmp_path: Path) -> None:
    """Found by fuzzing: ``inspect`` of a GGUF whose general.architecture holds invalid UTF-8 raised
    UnicodeDecodeError; the name is now shown with replacement characters."""
    raw = _GGUF.get()
    at = raw.index(b"general.architecture") + len(b"general.architecture") + 12  # type (4) + length (8)
    assert raw[at : at + 5] == b"llama"
    path = tmp_path / "arch.gguf"
    path.write_bytes(raw[:at] + b"l\xecama" + raw[at + 5 :])
    assert describe(path)["architecture"] == "l\ufffdama"
