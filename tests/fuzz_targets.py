"""Property-based fuzz targets of issue 20: what reads untrusted input fails only with its documented error.

Each target is a hypothesis strategy plus a check that feeds one drawn input to our code:
- ``recipe_text``: YAML-ish text or raw bytes through ``load_recipe`` (a file on disk): a Recipe or RecipeError;
- ``recipe_overrides``: random ``--set KEY=VALUE`` lists on a shipped recipe: a Recipe or RecipeError;
- ``recipe_dict``: random nested dicts shaped like recipes (real method names and fields, random values) through
  ``recipe_from_dict`` and, dumped as YAML, through ``load_recipe`` (which locates the YAML line of an error);
- ``safetensors``: random bytes, and headers whose dtypes, shapes and offsets lie, through ``check_safetensors``:
  None or ModelLoadError; and when our check accepts a file, the safetensors library opens it too;
- ``gguf``: a valid GGUF file written by gguf-py, truncated, with bytes flipped or counts overwritten, through
  ``describe`` (our only GGUF reading code; ``compress`` hands .gguf files to transformers): a dict or
  ModelLoadError.
``tests/unit/test_fuzz.py`` runs them for a few seconds; ``benchmarks/fuzz.py --examples N`` for longer.
"""

from __future__ import annotations

import io
import json
import math
import struct
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from hypothesis import strategies as st

from compressor.errors import ModelLoadError, RecipeError
from compressor.methods.registry import get_method, method_names
from compressor.models.checkpoint_checks import DTYPE_BITS, check_safetensors
from compressor.models.describe import describe
from compressor.recipe import load_recipe, recipe_from_dict

_SCALARS = (st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=True)
            | st.text(max_size=12) | st.sampled_from(["Linear", "lm_head", "re:.*", "re:(", "4", "-1", ""]))
_VALUES = st.recursive(_SCALARS, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(
    st.text(max_size=8), inner, max_size=4), max_leaves=12)
_YAML_LINES = [
    "name: fuzz", "stages:", "  - method: gptq", "  - method: rtn", "    bits: 3", "    group_size: 128",
    "    targets: [Linear]", "calibration: {samples: 4, seq_len: 16}", "export: {format: gguf}", "seed: 1",
    "&a [1, 2]", "*a", "!!python/object:os.system", "{", "[", "- ", ": :", "\t", "'", '"', "stages: 3",
    "    bits: !!binary aGk=", "version: 2", "%YAML 1.1", "---", "...", "? x", "x: |", "  \x00", "y: 1e999",
]


def _method_fields(name: str) -> list[str]:
    return sorted(get_method(name).config_class.model_fields)


@st.composite
def _stage(draw: st.DrawFn) -> Any:
    """A stage dict: a registered (or a wrong) method and some of its real fields with random values."""
    if draw(st.integers(0, 9)) == 0:
        return draw(_VALUES)
    method = draw(st.sampled_from([*method_names(), "nope", ""]))
    fields = _method_fields(method) if method in method_names() else ["bits"]
    stage: dict[str, Any] = {"method": method}
    for key in draw(st.lists(st.sampled_from([*fields, "unknown_key"]), max_size=4, unique=True)):
        stage[key] = draw(_VALUES)
    return stage


@st.composite
def _recipe_dict(draw: st.DrawFn) -> dict[str, Any]:
    data: dict[str, Any] = {"name": draw(st.text(max_size=8) | _VALUES), "stages": draw(st.lists(_stage(), max_size=3)
                                                                                        | _VALUES)}
    optional = {
        "calibration": st.fixed_dictionaries({}, optional={"samples": _VALUES, "seq_len": _VALUES,
                                                           "dataset": _VALUES, "batch_size": _VALUES}) | _VALUES,
        "export": st.fixed_dictionaries({}, optional={"format": st.sampled_from(["dense", "gguf", "x"]) | _VALUES}),
        "seed": _VALUES,
        "extra": _VALUES,
    }
    for key in draw(st.lists(st.sampled_from(sorted(optional)), max_size=4, unique=True)):
        data[key] = draw(optional[key])
    return data


_RECIPE_TEXT = (st.lists(st.sampled_from(_YAML_LINES) | st.text(max_size=20), max_size=12).map("\n".join)
                .map(str.encode) | st.binary(max_size=200))


def check_recipe_text(raw: bytes) -> None:
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "recipe.yaml"
        path.write_bytes(raw)
        try:
            load_recipe(path)
        except RecipeError:
            pass


def check_recipe_dict(data: dict[str, Any]) -> None:
    try:
        recipe_from_dict(data)
    except RecipeError:
        pass
    try:
        text = yaml.safe_dump(data, allow_unicode=True)
    except (yaml.YAMLError, ValueError):
        return  # not every random value is representable as YAML (nothing of ours is exercised then)
    check_recipe_text(text.encode())


_OVERRIDE_KEYS = ["name", "seed", "stages", "stages.0", "stages.0.bits", "stages.0.method", "stages.9.bits",
                  "calibration.samples", "export.format", "export", "stages.0.targets.0", "a.b.c", "", "stages.x"]
_OVERRIDE = st.builds(lambda key, sep, value: f"{key}{sep}{value}", st.sampled_from(_OVERRIDE_KEYS) | st.text(
    max_size=12), st.sampled_from(["=", "", "=="]), st.sampled_from(_YAML_LINES) | st.text(max_size=12))


def check_recipe_overrides(overrides: list[str]) -> None:
    """``--set KEY=VALUE`` overrides on a shipped recipe."""
    try:
        load_recipe("w4a16-gptq", overrides)
    except RecipeError:
        pass


@st.composite
def _safetensors_file(draw: st.DrawFn) -> bytes:
    """A header that may lie: real or wrong dtypes, shapes and offsets, a length prefix that may be wrong too."""
    choice = draw(st.integers(0, 4))
    if choice == 0:
        return draw(st.binary(max_size=64))
    if choice == 1:
        return draw(_near_valid_safetensors())
    header: dict[str, Any] = {}
    for name in draw(st.lists(st.text(min_size=1, max_size=6), max_size=4, unique=True)):
        entry = {"dtype": draw(st.sampled_from([*DTYPE_BITS, "F128", ""]) | _SCALARS),
                 "shape": draw(st.lists(st.integers(-2, 6) | st.just(2**62), max_size=3) | _VALUES),
                 "data_offsets": draw(st.lists(st.integers(-4, 80) | st.just(2**64), min_size=2, max_size=2)
                                      | _VALUES)}
        for key in draw(st.lists(st.sampled_from(sorted(entry)), max_size=1)):
            del entry[key]
        header[name] = entry
    if draw(st.booleans()):
        header["__metadata__"] = draw(st.dictionaries(st.text(max_size=4), st.text(max_size=4), max_size=2) | _VALUES)
    text = json.dumps(header).encode() + b" " * draw(st.integers(0, 7))
    length = draw(st.sampled_from([len(text), len(text) + 1, len(text) - 1, 2**63, 0]))
    return struct.pack("<Q", max(length, 0)) + text + draw(st.binary(max_size=96))


@st.composite
def _near_valid_safetensors(draw: st.DrawFn) -> bytes:
    """Tensors that tile the data exactly (a valid file), then at most one lie: a size, an offset, the data."""
    header: dict[str, Any] = {}
    offset = 0
    for name in draw(st.lists(st.text(min_size=1, max_size=4), max_size=4, unique=True)):
        dtype = draw(st.sampled_from(sorted(DTYPE_BITS)))
        shape = draw(st.lists(st.integers(0, 4), max_size=3))
        size = (math.prod(shape) * DTYPE_BITS[dtype] + 7) // 8
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + size]}
        offset += size
    data = bytes(offset)
    lie = draw(st.sampled_from(["none", "shape", "offset", "data"]))
    if lie == "data":
        data = data[: draw(st.integers(0, offset))] + bytes(draw(st.integers(0, 3)))
    elif header and lie != "none":
        entry = header[draw(st.sampled_from(sorted(header)))]
        key, at = ("shape", 0) if lie == "shape" and entry["shape"] else ("data_offsets", draw(st.integers(0, 1)))
        entry[key][at] = max(entry[key][at] + draw(st.integers(-3, 3)), 0)
    text = json.dumps(header).encode()
    return struct.pack("<Q", len(text)) + text + data


def check_safetensors_bytes(raw: bytes) -> None:
    """Our check refuses exactly the files the safetensors library cannot open, and only with ModelLoadError."""
    from safetensors import SafetensorError, safe_open

    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "model.safetensors"
        path.write_bytes(raw)
        try:
            with safe_open(str(path), "pt") as handle:
                for name in handle.keys():  # noqa: SIM118 (a safe_open handle is not a dict)
                    handle.get_slice(name).get_shape()
            library_error = None
        except SafetensorError as exc:
            library_error = exc
        try:
            check_safetensors(path)
        except ModelLoadError as exc:
            assert library_error is not None, f"refused a file the library reads: {exc}"
            return
        assert library_error is None, f"accepted a file the library refuses: {library_error}"


def _valid_gguf() -> bytes:
    import gguf
    import numpy as np

    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "m.gguf"
        writer = gguf.GGUFWriter(str(path), "llama")
        writer.add_block_count(1)
        writer.add_string("general.name", "fuzz")
        writer.add_array("tokenizer.ggml.tokens", ["a", "b"])
        writer.add_tensor("blk.0.attn_q.weight", np.arange(32, dtype=np.float32).reshape(4, 8))
        writer.add_tensor("token_embd.weight", np.ones((2, 8), dtype=np.float16))
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        return path.read_bytes()


@dataclass
class _Gguf:
    """A lazily built valid GGUF file (gguf-py is imported only when a GGUF target runs)."""

    data: bytes = b""

    def get(self) -> bytes:
        if not self.data:
            self.data = _valid_gguf()
        return self.data


_GGUF = _Gguf()


@st.composite
def _gguf_file(draw: st.DrawFn) -> bytes:
    """The valid file truncated, with bytes flipped, or with a 4/8-byte field overwritten by a random count."""
    data = bytearray(_GGUF.get())
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["flip", "count", "truncate"]))
        at = draw(st.integers(0, len(data) - 1))
        if kind == "flip":
            data[at] ^= draw(st.integers(1, 255))
        elif kind == "count":
            size = draw(st.sampled_from([4, 8]))
            value = draw(st.integers(0, 2 ** (8 * size) - 1) | st.sampled_from([0, 1, 2**31, 2 ** (8 * size) - 1]))
            data[at : at + size] = value.to_bytes(size, "little")
        else:
            del data[at:]
            if not data:
                break
    return bytes(data)


def check_gguf_bytes(raw: bytes) -> None:
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "model.gguf"
        path.write_bytes(raw)
        try:
            info = describe(path)
        except ModelLoadError:
            return
        json.dump(info, io.StringIO())  # what inspect prints: plain data


#: name -> (strategy, check): the targets both the unit test and the benchmark run.
TARGETS: dict[str, tuple[st.SearchStrategy[Any], Callable[[Any], None]]] = {
    "recipe_text": (_RECIPE_TEXT, check_recipe_text),
    "recipe_dict": (_recipe_dict(), check_recipe_dict),
    "recipe_overrides": (st.lists(_OVERRIDE, max_size=4), check_recipe_overrides),
    "safetensors": (_safetensors_file(), check_safetensors_bytes),
    "gguf": (_gguf_file(), check_gguf_bytes),
}
