"""`--dtype auto` is the default of `compress` and `eval`: a bf16 checkpoint stays bf16, and the output says so."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from compressor.cli import app

RECIPE = """\
name: tiny-rtn
calibration: {{dataset: "{calib}", samples: 2, seq_len: 16, batch_size: 2}}
stages:
  - method: rtn
    bits: 4
    group_size: 32
export: {{format: dense}}
"""


@pytest.mark.parametrize("command", ["compress", "eval"])
def test_help_teaches_auto(runner: CliRunner, command: str) -> None:
    result = runner.invoke(app, [command, "--help"])
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())
    assert "auto (keep the checkpoint's;" in text and "[default: auto]" in text.split("--dtype")[1].split("--")[0]


@pytest.mark.parametrize(("args", "expected"), [([], "bfloat16"), (["--dtype", "float32"], "float32")])
def test_eval_reports_the_dtype_it_ran_in(runner: CliRunner, bf16_dir: Path, text_file: Path, args: list[str],
                                          expected: str) -> None:
    result = runner.invoke(app, ["eval", str(bf16_dir), "--data", str(text_file), "--seq-len", "32",
                                 "--max-tokens", "64", "--json", *args])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["dtype"] == expected


def test_compress_keeps_bf16_by_default(runner: CliRunner, bf16_dir: Path, text_file: Path, tmp_path: Path) -> None:
    recipe = tmp_path / "r.yaml"
    recipe.write_text(RECIPE.format(calib=text_file))
    out = tmp_path / "out"
    result = runner.invoke(app, ["compress", str(bf16_dir), "-r", str(recipe), "-o", str(out), "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["dtype"] == "bfloat16"
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"


def test_unknown_dtype_is_exit_2(runner: CliRunner, bf16_dir: Path, text_file: Path) -> None:
    result = runner.invoke(app, ["eval", str(bf16_dir), "--data", str(text_file), "--dtype", "float64"])
    assert result.exit_code == 2
    assert "--dtype float64: expected one of auto, float32, bfloat16, float16" in result.output
