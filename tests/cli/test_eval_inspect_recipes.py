"""`eval`, `inspect` and `recipes` commands through the real library on tiny local files."""

from __future__ import annotations

import json
from pathlib import Path

from typer.testing import CliRunner

from compressor.cli import app


def test_eval_json(runner: CliRunner, model_dir_factory, text_file: Path) -> None:
    result = runner.invoke(app, ["eval", str(model_dir_factory("llama")), "--data", str(text_file),
                                 "--seq-len", "32", "--max-tokens", "128", "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["windows"] == 4 and data["tokens"] == 128 and data["ppl"] > 1


def test_eval_empty_data_is_exit_2(runner: CliRunner, model_dir_factory, tmp_path: Path) -> None:
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    result = runner.invoke(app, ["eval", str(model_dir_factory("llama")), "--data", str(empty), "--seq-len", "32"])
    assert result.exit_code == 2, result.output
    assert "no text" in result.stderr


def test_inspect(runner: CliRunner, model_dir_factory) -> None:
    result = runner.invoke(app, ["inspect", str(model_dir_factory("qwen2")), "--json"])
    assert result.exit_code == 0, result.output
    info = json.loads(result.stdout)
    assert info["model_type"] == "qwen2" and info["layers"] == 3
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir_factory("qwen2"))
    assert info["stored_values"] == sum(p.numel() for p in model.parameters())
    assert any(".*." in group for group in info["module_groups"])


def test_inspect_missing(runner: CliRunner, tmp_path: Path) -> None:
    result = runner.invoke(app, ["inspect", str(tmp_path / "nothing")])
    assert result.exit_code == 2 and "not a model directory" in result.stderr


def test_recipes_list_show_validate(runner: CliRunner, tmp_path: Path) -> None:
    listed = runner.invoke(app, ["recipes", "list", "--json"])
    assert listed.exit_code == 0 and "w8a16-rtn" in json.loads(listed.stdout)
    shown = runner.invoke(app, ["recipes", "show", "w4a16-rtn"])
    assert shown.exit_code == 0 and "# w4a16-rtn" in shown.stdout
    valid = runner.invoke(app, ["recipes", "validate", "w4a16-rtn", "--set", "stages.0.bits=3"])
    assert valid.exit_code == 0 and "bits: 3" in valid.stdout
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\nstages:\n  - method: rtn\n    bitz: 3\n")
    invalid = runner.invoke(app, ["recipes", "validate", str(bad)])
    assert invalid.exit_code == 2 and "bad.yaml:4: stages.0.bitz: unknown key" in invalid.stderr
