"""Every command answers --help and teaches its options."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from compressor.cli import app


@pytest.mark.parametrize(
    ("args", "expect"),
    [
        ([], "compress"),
        (["compress"], "--recipe"),
        (["eval"], "--data"),
        (["inspect"], "PATH"),
        (["export"], "--format"),
        (["recipes"], "validate"),
        (["recipes", "list"], "--json"),
        (["recipes", "show"], "NAME"),
        (["recipes", "validate"], "--set"),
    ],
)
def test_help(runner: CliRunner, args: list[str], expect: str) -> None:
    result = runner.invoke(app, [*args, "--help"])
    assert result.exit_code == 0, result.output
    assert expect.lower() in result.output.lower()
