"""Hostile and broken inputs through `compressor compress` (issue 20): each is refused with exit 2 and one line
naming the file, field or tensor, no traceback, and no output directory left behind."""

from __future__ import annotations

import json
import shutil
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from compressor.cli import app

RECIPE = """\
name: tiny-rtn
calibration: {{dataset: "{calib}", samples: 2, seq_len: 32, batch_size: 2}}
stages:
  - method: rtn
    bits: 4
    group_size: 32
export: {{format: dense}}
"""


@pytest.fixture
def recipe_file(tmp_path: Path, text_file: Path) -> Path:
    path = tmp_path / "tiny.yaml"
    path.write_text(RECIPE.format(calib=text_file))
    return path


@pytest.fixture
def model_copy(tmp_path: Path, model_dir_factory: Callable[[str], Path]) -> Path:
    """A private copy of the tiny Llama directory, free to break."""
    directory = tmp_path / "model"
    shutil.copytree(model_dir_factory("llama"), directory)
    return directory


def _compress(runner: CliRunner, model: Path, recipe: Path, out: Path, *args: str) -> Any:
    return runner.invoke(app, ["compress", str(model), "-r", str(recipe), "-o", str(out), "--quiet", *args])


def _refused(result: Any, out: Path, *fragments: str, code: int = 2) -> None:
    """Exit ``code``, one stderr line holding every fragment, no traceback, nothing written at ``out``."""
    assert result.exit_code == code, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    assert "Traceback" not in result.output
    assert not out.exists()
    assert not [p for p in out.parent.iterdir() if ".partial" in p.name]


def _header(path: Path) -> tuple[dict[str, Any], bytes]:
    raw = path.read_bytes()
    (length,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8 : 8 + length]), raw[8 + length :]


def _rewrite(path: Path, edit: Callable[[dict[str, Any]], None]) -> None:
    """Rewrite the safetensors header with ``edit`` applied; the data bytes stay as they were."""
    header, data = _header(path)
    edit(header)
    text = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(text)) + text + data)


# --- safetensors files ----------------------------------------------------------------------------------------

def test_truncated_safetensors_names_the_tensor_past_the_end(runner: CliRunner, model_copy: Path,
                                                            recipe_file: Path, tmp_path: Path) -> None:
    weights = model_copy / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    _refused(_compress(runner, model_copy, recipe_file, tmp_path / "out"), tmp_path / "out",
             "model.safetensors: tensor ", "truncated")


def test_safetensors_shorter_than_its_header(runner: CliRunner, model_copy: Path, recipe_file: Path,
                                             tmp_path: Path) -> None:
    (model_copy / "model.safetensors").write_bytes(b"\x00\x01\x02")
    _refused(_compress(runner, model_copy, recipe_file, tmp_path / "out"), tmp_path / "out",
             "model.safetensors: 3 bytes, too short")


def test_corrupt_header_bytes(runner: CliRunner, model_copy: Path, recipe_file: Path, tmp_path: Path) -> None:
    weights = model_copy / "model.safetensors"
    raw = bytearray(weights.read_bytes())
    raw[9:60] = b"\xff" * 51
    weights.write_bytes(bytes(raw))
    _refused(_compress(runner, model_copy, recipe_file, tmp_path / "out"), tmp_path / "out",
             "model.safetensors: the safetensors header is not valid JSON")


def _same_size_pair(header: dict[str, Any]) -> tuple[str, str]:
    names = [n for n in header if n != "__metadata__"]
    spans = {n: header[n]["data_offsets"][1] - header[n]["data_offsets"][0] for n in names}
    return next((a, b) for a in names for b in names if a < b and spans[a] == spans[b])


@pytest.mark.parametrize("lie", ["overlap", "past_eof", "shape", "negative"])
def test_header_that_lies(runner: CliRunner, model_copy: Path, recipe_file: Path, tmp_path: Path,
                          lie: str) -> None:
    """Offsets that overlap or run past the data, a shape whose byte count is not the span, a negative offset."""
    weights = model_copy / "model.safetensors"
    header, data = _header(weights)
    first, second = _same_size_pair(header)

    def edit(h: dict[str, Any]) -> None:
        if lie == "overlap":
            h[second]["data_offsets"] = list(h[first]["data_offsets"])
        elif lie == "past_eof":
            h[first]["data_offsets"] = [len(data), len(data) + h[first]["data_offsets"][1]
                                        - h[first]["data_offsets"][0]]
        elif lie == "shape":
            h[first]["shape"] = [h[first]["shape"][0] + 1, *h[first]["shape"][1:]]
        else:
            h[first]["data_offsets"] = [-4, h[first]["data_offsets"][1]]

    _rewrite(weights, edit)
    expected = {"overlap": "overlap in the file", "past_eof": f"tensor {first} ends at data byte",
                "shape": f"tensor {first}: F32", "negative": f"tensor {first}: data_offsets"}[lie]
    _refused(_compress(runner, model_copy, recipe_file, tmp_path / "out"), tmp_path / "out", expected)


def test_index_naming_a_missing_shard(runner: CliRunner, model_copy: Path, recipe_file: Path,
                                      tmp_path: Path) -> None:
    """A sharded checkpoint with its second shard missing."""
    header, _ = _header(model_copy / "model.safetensors")
    (model_copy / "model.safetensors").rename(model_copy / "model-00001-of-00002.safetensors")
    names = sorted(name for name in header if name != "__metadata__")
    weight_map = {name: f"model-0000{1 + (i % 2)}-of-00002.safetensors" for i, name in enumerate(names)}
    (model_copy / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    _refused(_compress(runner, model_copy, recipe_file, tmp_path / "out"), tmp_path / "out",
             "names shards that are missing: model-00002-of-00002.safetensors")


@pytest.mark.parametrize("value", [float("nan"), float("-inf")])
def test_non_finite_weight_names_the_tensor(runner: CliRunner, model_copy: Path, recipe_file: Path,
                                            tmp_path: Path, value: float) -> None:
    weights = model_copy / "model.safetensors"
    tensors = load_file(weights)
    tensors["model.layers.1.mlp.down_proj.weight"][3, 5] = value
    save_file(tensors, weights, metadata={"format": "pt"})
    _refused(_compress(runner, model_copy, recipe_file, tmp_path / "out"), tmp_path / "out",
             "weight model.layers.1.mlp.down_proj.weight has 1 NaN/inf values")


# --- config.json ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize(("field", "value"), [("hidden_size", 10**9), ("num_hidden_layers", 10**6),
                                              ("intermediate_size", 10**12)])
def test_absurd_config_sizes_refused_before_allocation(runner: CliRunner, model_copy: Path, recipe_file: Path,
                                                       tmp_path: Path, field: str, value: int) -> None:
    config = json.loads((model_copy / "config.json").read_text())
    config[field] = value
    (model_copy / "config.json").write_text(json.dumps(config))
    _refused(_compress(runner, model_copy, recipe_file, tmp_path / "out"), tmp_path / "out",
             "config.json: its sizes (", f"{field}={value}", "parameters")


@pytest.mark.parametrize("value", [-64, 0, "64", 6.4])
def test_config_size_of_the_wrong_type(runner: CliRunner, model_copy: Path, recipe_file: Path, tmp_path: Path,
                                       value: object) -> None:
    config = json.loads((model_copy / "config.json").read_text())
    config["num_hidden_layers"] = value
    (model_copy / "config.json").write_text(json.dumps(config))
    _refused(_compress(runner, model_copy, recipe_file, tmp_path / "out"), tmp_path / "out",
             "config.json", "num_hidden_layers")


# --- code in the input ----------------------------------------------------------------------------------------

class _WritesMarker:
    """Unpickling this runs ``open(marker, 'w')``: what a hostile ``pytorch_model.bin`` can do."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (open, (str(self.marker), "w"))


def test_pickle_weights_refused_without_allow_pickle(runner: CliRunner, model_copy: Path, recipe_file: Path,
                                                     tmp_path: Path) -> None:
    marker = tmp_path / "unpickled"
    state = load_file(model_copy / "model.safetensors")
    (model_copy / "model.safetensors").unlink()
    torch.save({**state, "hostile": _WritesMarker(marker)}, model_copy / "pytorch_model.bin")
    _refused(_compress(runner, model_copy, recipe_file, tmp_path / "out"), tmp_path / "out",
             "only pickle weights", "--allow-pickle")
    assert not marker.exists()


def test_allow_pickle_loads_plain_tensor_pickles(runner: CliRunner, model_copy: Path, recipe_file: Path,
                                                 tmp_path: Path) -> None:
    state = load_file(model_copy / "model.safetensors")
    (model_copy / "model.safetensors").unlink()
    torch.save(state, model_copy / "pytorch_model.bin")
    result = _compress(runner, model_copy, recipe_file, tmp_path / "out", "--allow-pickle")
    assert result.exit_code == 0, result.output
    assert (tmp_path / "out" / "model.safetensors").is_file()


def test_allow_pickle_help_says_what_it_risks(runner: CliRunner) -> None:
    result = runner.invoke(app, ["compress", "--help"])
    assert "--allow-pickle" in result.stdout and "runs code" in " ".join(result.stdout.split())


def _with_custom_code(directory: Path, marker: Path, config_name: str, key: str) -> None:
    config = json.loads((directory / config_name).read_text())
    config["auto_map"] = {key: "modeling_evil.EvilModel"}
    (directory / config_name).write_text(json.dumps(config))
    (directory / "modeling_evil.py").write_text(f"open({str(marker)!r}, 'w').close()\n")


@pytest.mark.parametrize(("config_name", "key"), [("config.json", "AutoModelForCausalLM"),
                                                  ("tokenizer_config.json", "AutoTokenizer")])
def test_custom_code_never_runs_without_trust_remote_code(runner: CliRunner, model_copy: Path, recipe_file: Path,
                                                          tmp_path: Path, config_name: str, key: str) -> None:
    marker = tmp_path / "ran"
    _with_custom_code(model_copy, marker, config_name, key)
    _refused(_compress(runner, model_copy, recipe_file, tmp_path / "out"), tmp_path / "out",
             f"{config_name} asks for custom", "--trust-remote-code")
    assert not marker.exists()


def test_the_custom_code_fixture_does_run_when_trusted(runner: CliRunner, model_copy: Path, recipe_file: Path,
                                                       tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Control for the test above: with --trust-remote-code transformers imports the file, so the marker could
    appear; the refusal, not a broken fixture, is what kept it away."""
    import transformers.dynamic_module_utils as dynamic

    monkeypatch.syspath_prepend(str(tmp_path))  # restores sys.path, which transformers appends its cache to
    monkeypatch.setattr(dynamic, "HF_MODULES_CACHE", str(tmp_path / "modules"))
    marker = tmp_path / "ran"
    _with_custom_code(model_copy, marker, "config.json", "AutoModelForCausalLM")
    result = _compress(runner, model_copy, recipe_file, tmp_path / "out", "--trust-remote-code")
    assert result.exit_code != 0 and "Traceback" not in result.output  # EvilModel does not exist after the import
    assert marker.exists()


# --- recipes --------------------------------------------------------------------------------------------------

def test_recipe_with_a_python_tag(runner: CliRunner, model_copy: Path, tmp_path: Path) -> None:
    marker = tmp_path / "executed"
    recipe = tmp_path / "tagged.yaml"
    recipe.write_text(f"name: !!python/object/apply:os.system ['touch {marker}']\nstages: [{{method: rtn}}]\n")
    _refused(_compress(runner, model_copy, recipe, tmp_path / "out"), tmp_path / "out", str(recipe),
             "YAML tag !!python/object/apply:os.system refused")
    assert not marker.exists()


def test_recipe_alias_bomb(runner: CliRunner, model_copy: Path, tmp_path: Path) -> None:
    """Nine levels of nine aliases: 9**9 target strings for pydantic to validate, a few hundred bytes on disk."""
    lines = ["a0: &a0 [Linear]"] + [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]" for i in range(1, 10)]
    recipe = tmp_path / "bomb.yaml"
    recipe.write_text("x-bomb:\n" + "\n".join(f"  {line}" for line in lines)
                      + "\nname: bomb\nstages: [{method: rtn, targets: *a9}]\n")
    _refused(_compress(runner, model_copy, recipe, tmp_path / "out"), tmp_path / "out",
             f"{recipe}:2: YAML anchor/alias 'a0' refused")


def test_recipe_over_one_megabyte(runner: CliRunner, model_copy: Path, tmp_path: Path) -> None:
    recipe = tmp_path / "huge.yaml"
    recipe.write_text("name: huge\nstages: [{method: rtn}]\n" + "# padding\n" * 110_000)
    _refused(_compress(runner, model_copy, recipe, tmp_path / "out"), tmp_path / "out", str(recipe), "1 MB")


def test_recipe_that_is_not_text(runner: CliRunner, model_copy: Path, tmp_path: Path) -> None:
    recipe = tmp_path / "binary.yaml"
    recipe.write_bytes(bytes(range(256)) * 4)
    _refused(_compress(runner, model_copy, recipe, tmp_path / "out"), tmp_path / "out", str(recipe))


def test_set_value_with_a_python_tag(runner: CliRunner, model_copy: Path, recipe_file: Path,
                                     tmp_path: Path) -> None:
    result = _compress(runner, model_copy, recipe_file, tmp_path / "out", "--set",
                       "name=!!python/object/apply:os.getcwd []")
    _refused(result, tmp_path / "out", "--set 'name=!!python/object/apply:os.getcwd []'", "YAML tag")


# --- calibration data -----------------------------------------------------------------------------------------

@pytest.mark.parametrize(("content", "expected"), [
    (b"", "contains no text"),
    (b"\n \n\t\n", "contains no text"),
    (bytes(range(256)) * 64, "not UTF-8"),
    (b"\x00" * 4096, "binary"),
    (b"the model reads text.", "tokens, fewer than seq_len=32 for one window (64 for 2 independent windows)"),
])
def test_calibration_files_that_cannot_calibrate(runner: CliRunner, model_copy: Path, recipe_file: Path,
                                                 tmp_path: Path, content: bytes, expected: str) -> None:
    calib = tmp_path / "calib.txt"
    calib.write_bytes(content)
    result = _compress(runner, model_copy, recipe_file, tmp_path / "out", "--calib", str(calib))
    _refused(result, tmp_path / "out", str(calib), expected)


# --- output location ------------------------------------------------------------------------------------------

@pytest.mark.parametrize(("where", "relation"), [(".", "is the model directory"), ("sub/out", "is inside the model"),
                                                 ("..", "contains the model directory")])
def test_out_that_is_inside_or_holds_the_model_is_refused(runner: CliRunner, model_copy: Path, recipe_file: Path,
                                                          where: str, relation: str) -> None:
    """With --overwrite the finished directory would be renamed onto the source (or its parent): refused before
    loading, exit 2, and the model directory keeps every byte."""
    before = {p.name: p.read_bytes() for p in model_copy.iterdir() if p.is_file()}
    out = model_copy / where
    result = _compress(runner, model_copy, recipe_file, out, "--overwrite")
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and relation in lines[0] and "Traceback" not in result.output, result.output
    assert {p.name: p.read_bytes() for p in model_copy.iterdir() if p.is_file()} == before
    assert not (model_copy / "sub").exists()
    assert not [p for p in model_copy.parent.iterdir() if ".partial" in p.name]
