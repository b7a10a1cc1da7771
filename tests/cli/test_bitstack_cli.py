"""`compressor bitstack materialize`: a BitStack directory at one budget as a standard model directory."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM
from typer.testing import CliRunner

from compressor.cli import app
from compressor.export.bitstack_store import MANIFEST, load_bitstack
from compressor.pipeline import compress
from compressor.recipe import recipe_from_dict

TOKENS = torch.tensor([[5, 17, 42, 99, 3, 250, 7, 8]])


@pytest.fixture(scope="module")
def stack_dir(model_dir_factory, text_file: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    data = {"name": "t", "calibration": {"dataset": str(text_file), "samples": 4, "seq_len": 32, "batch_size": 2},
            "stages": [{"method": "bitstack", "iterations": 3, "rank": 2}], "export": {"format": "bitstack"}}
    out = tmp_path_factory.mktemp("stack") / "bs"
    compress(str(model_dir_factory("llama")), recipe_from_dict(yaml.safe_load(yaml.safe_dump(data))), out,
             device="cpu")
    return out


def _logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(TOKENS).logits


def test_materialize_writes_the_model_at_the_budget(runner: CliRunner, stack_dir: Path, tmp_path: Path) -> None:
    manifest = json.loads((stack_dir / MANIFEST).read_text())
    sizes = {path: item["block_bytes"] for path, item in manifest["linears"].items()}
    budget = manifest["fixed_bytes"] + sum(s[0] + s[1] for s in sizes.values())  # room for 2 blocks each
    out = tmp_path / "m"
    result = runner.invoke(app, ["bitstack", "materialize", str(stack_dir), "--budget", str(budget), "--out",
                                 str(out), "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["bitstack_bytes"] <= budget
    assert report == {**json.loads((out / "bitstack_materialize.json").read_text()), "out": str(out)}
    for path, row in report["linears"].items():  # bits per weight from the manifest's sizes, by hand
        rows, columns = manifest["linears"][path]["shape"]
        assert row["bits_per_weight"] == round(sum(sizes[path][: row["blocks"]]) * 8 / (rows * columns), 4)
    assert sum(row["bytes"] for row in report["linears"].values()) + manifest["fixed_bytes"] == report[
        "bitstack_bytes"]
    assert {"config.json", "tokenizer.json"} <= {p.name for p in out.iterdir()}
    assert not any(p.name.startswith("bitstack-") or p.name == MANIFEST for p in out.iterdir())
    reloaded = AutoModelForCausalLM.from_pretrained(out)
    expected, _ = load_bitstack(stack_dir, budget)
    torch.testing.assert_close(_logits(reloaded), _logits(expected), rtol=0, atol=0)


def test_a_budget_below_the_smallest_model_is_one_line_exit_2(runner: CliRunner, stack_dir: Path,
                                                              tmp_path: Path) -> None:
    result = runner.invoke(app, ["bitstack", "materialize", str(stack_dir), "--budget", "1kB", "--out",
                                 str(tmp_path / "x")])
    assert result.exit_code == 2, result.output
    assert result.stderr.count("\n") == 1 and "smallest is" in result.stderr and "largest" in result.stderr
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize(("args", "expect"), [(["--format", "compressed-tensors"], "materialize writes dense"),
                                              (["--budget", "3 parsecs"], "expected a size")])
def test_bad_options_are_one_line_exit_2(runner: CliRunner, stack_dir: Path, tmp_path: Path, args: list[str],
                                         expect: str) -> None:
    base = ["bitstack", "materialize", str(stack_dir), "--budget", "4bpw", "--out", str(tmp_path / "x")]
    result = runner.invoke(app, [*base, *args])
    assert result.exit_code == 2 and expect in result.stderr, result.output


def test_a_directory_without_a_manifest_is_refused(runner: CliRunner, model_dir_factory, tmp_path: Path) -> None:
    result = runner.invoke(app, ["bitstack", "materialize", str(model_dir_factory("llama")), "--budget", "1MB",
                                 "--out", str(tmp_path / "x")])
    assert result.exit_code == 2 and "not a BitStack directory" in result.stderr, result.output


@pytest.mark.parametrize(("args", "expect"), [(["bitstack"], "materialize"), (["bitstack", "materialize"], "--budget")])
def test_help(runner: CliRunner, args: list[str], expect: str) -> None:
    result = runner.invoke(app, [*args, "--help"])
    assert result.exit_code == 0 and expect in result.output, result.output
