"""`compressor compress` end to end on a tiny model, and each error class's exit code."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM
from typer.testing import CliRunner

from compressor.cli import app

RECIPE = """\
name: tiny-rtn
calibration: {{dataset: "{calib}", samples: 4, seq_len: 32, batch_size: 2}}
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


def _leftovers(parent: Path) -> list[str]:
    return [p.name for p in parent.iterdir() if ".partial" in p.name]


def test_compress_writes_model_and_report(runner: CliRunner, model_dir_factory, recipe_file: Path,
                                          tmp_path: Path, text_file: Path) -> None:
    out = tmp_path / "out"
    result = runner.invoke(app, ["compress", str(model_dir_factory("llama")), "--recipe", str(recipe_file),
                                 "--out", str(out), "--eval", str(text_file), "--eval-tokens", "256",
                                 "--seq-len", "32", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["avg_bits_per_weight"] == 4.0
    assert report["eval"]["after"]["ppl"] > 0
    assert {"config.json", "recipe.yaml", "compression_report.json", "compression_report.md"} <= {
        p.name for p in out.iterdir()}
    assert len(report["layers"]) == 3 * 7
    reloaded = AutoModelForCausalLM.from_pretrained(out)
    assert torch.isfinite(reloaded(torch.tensor([[1, 2, 3]])).logits).all()


def test_quality_gate_exit_3_keeps_output(runner: CliRunner, model_dir_factory, recipe_file: Path,
                                          tmp_path: Path, text_file: Path) -> None:
    out = tmp_path / "gated"
    result = runner.invoke(app, ["compress", str(model_dir_factory("llama")), "-r", str(recipe_file), "-o",
                                 str(out), "--eval", str(text_file), "--eval-tokens", "256", "--set",
                                 "stages.0.bits=2", "--max-ppl-increase", "-100%", "--quiet"])
    assert result.exit_code == 3, result.output
    assert "quality gate" not in result.stdout
    report = json.loads((out / "compression_report.json").read_text())
    assert report["quality_gate"]["passed"] is False


@pytest.mark.parametrize(
    ("args", "code", "message"),
    [
        (["--set", "stages.0.method=nope"], 2, "unknown method 'nope'"),
        (["--set", "stages.0.bits=9"], 2, "bits must be between 2 and 8"),
        (["--seq-len", "100000"], 2, "longer than the model allows"),
        (["--calib", "/no/such/file.txt"], 2, "/no/such/file.txt"),
        (["--calib", "EMPTY"], 2, "contains no text"),
    ],
)
def test_errors_are_one_line_and_leave_nothing(runner: CliRunner, model_dir_factory, recipe_file: Path,
                                               tmp_path: Path, args: list[str], code: int, message: str) -> None:
    out = tmp_path / "never"
    if "EMPTY" in args:
        empty = tmp_path / "empty.txt"
        empty.write_text("\n\n  \n")
        args = [str(empty) if a == "EMPTY" else a for a in args]
    result = runner.invoke(app, ["compress", str(model_dir_factory("llama")), "-r", str(recipe_file), "-o",
                                 str(out), *args])
    assert result.exit_code == code, result.output
    assert message in result.stderr
    assert "Traceback" not in result.output
    assert len(result.stderr.strip().splitlines()) == 1
    assert not out.exists() and not _leftovers(tmp_path)


def test_bad_model_paths(runner: CliRunner, recipe_file: Path, tmp_path: Path, model_dir_factory) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "config.json").write_text(json.dumps({"model_type": "llama"}))
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    source = model_dir_factory("llama")
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        (corrupt / name).write_bytes((source / name).read_bytes())
    (corrupt / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    unsupported = tmp_path / "unsupported"
    unsupported.mkdir()
    (unsupported / "config.json").write_text(json.dumps({"model_type": "gpt_bigcode"}))
    cases = [(tmp_path / "missing", "model path not found"), (empty, "no weights found"),
             (corrupt, "header length 16 does not fit"), (unsupported, "unsupported architecture 'gpt_bigcode'")]
    for model, message in cases:
        result = runner.invoke(app, ["compress", str(model), "-r", str(recipe_file), "-o", str(tmp_path / "o")])
        assert result.exit_code == 2, (model, result.output)
        assert message in result.stderr, result.stderr
        assert "Traceback" not in result.output


def test_existing_output_needs_overwrite(runner: CliRunner, model_dir_factory, recipe_file: Path,
                                         tmp_path: Path) -> None:
    out = tmp_path / "exists"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    args = ["compress", str(model_dir_factory("llama")), "-r", str(recipe_file), "-o", str(out), "--quiet"]
    result = runner.invoke(app, args)
    assert result.exit_code == 2 and "already exists" in result.stderr
    assert (out / "keep.txt").read_text() == "mine"
    result = runner.invoke(app, [*args, "--overwrite"])
    assert result.exit_code == 0, result.output
    assert not (out / "keep.txt").exists() and (out / "compression_report.json").exists()


def test_debug_shows_traceback(runner: CliRunner, model_dir_factory, recipe_file: Path, tmp_path: Path) -> None:
    result = runner.invoke(app, ["compress", str(tmp_path / "missing"), "-r", str(recipe_file), "-o",
                                 str(tmp_path / "o"), "--debug"])
    assert result.exit_code == 2
    assert "Traceback" in result.stderr


def test_repeated_warnings_are_one_line_each_and_the_summary_leads_with_bits_size_time(
        runner: CliRunner, model_dir_factory, recipe_file: Path, tmp_path: Path) -> None:
    """Groups of 48 divide none of the tiny Llama's widths (64 and 128): 21 modules, two distinct notes."""
    out = tmp_path / "out"
    result = runner.invoke(app, ["compress", str(model_dir_factory("llama")), "-r", str(recipe_file), "-o", str(out),
                                 "--set", "stages.0.group_size=48"])
    assert result.exit_code == 0, result.output
    narrow = ("group_size 48 does not divide 64 columns; used 32 (18 modules: "
              "model.layers.{0..2}.self_attn.{q,k,v,o}_proj, model.layers.{0..2}.mlp.{gate,up}_proj)")
    wide = "group_size 48 does not divide 128 columns; used 32 (3 modules: model.layers.{0..2}.mlp.down_proj)"
    assert [line for line in result.stderr.splitlines() if "does not divide" in line] == [
        f"WARNING: {narrow}", f"WARNING: {wide}"]
    rows = [line for line in result.stdout.splitlines() if "│" in line]
    assert rows[0].split("│")[1].strip() == "bits per weight" and "4.00" in rows[0]
    assert rows[1].split("│")[1].strip() == "size on disk" and " kB -> " in rows[1]
    assert rows[2].split("│")[1].strip() == "time"
    report = json.loads((out / "compression_report.json").read_text())
    assert [(w["count"], len(w["modules"])) for w in report["warnings"]] == [(18, 18), (3, 3)]
    assert report["warnings"][1]["modules"] == [f"model.layers.{i}.mlp.down_proj" for i in range(3)]
    assert f"- {narrow}" in (out / "compression_report.md").read_text()
