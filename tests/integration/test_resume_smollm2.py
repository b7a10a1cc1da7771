"""Resume on the real model: `compressor compress` on SmolLM2-135M killed with SIGKILL after layer 11 of 30, then
`--resume`d, writes the same bytes as an uninterrupted run (tests/cli/test_resume.py does the same on tiny models
at several layers and signals)."""

from __future__ import annotations

import signal
from pathlib import Path

from run_outputs import comparable_files, start_blocked
from typer.testing import CliRunner

from compressor.cli import app
from compressor.pipeline import compress
from compressor.recipe import load_recipe

RECIPE = """\
name: smollm2-resume
calibration: {dataset: "demo:lee", samples: 2, seq_len: 128, batch_size: 2}
stages:
  - method: rtn
    bits: 4
    group_size: 64
    symmetric: true
    ignore: [lm_head]
export: {format: compressed-tensors}
"""


def test_kill_9_at_layer_12_then_resume_writes_the_same_bytes(smollm2_dir: Path, tmp_path: Path) -> None:
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(RECIPE)
    whole = tmp_path / "whole"
    compress(smollm2_dir, load_recipe(recipe), whole, device="cpu", checkpoint=False)

    out = tmp_path / "out"
    process = start_blocked(smollm2_dir, recipe, out, 0, 12, timeout=900)
    process.kill()
    assert process.wait(timeout=60) == -signal.SIGKILL
    assert not out.exists()
    (tmp_path / "out.partial" / "pass0-layer12.safetensors.tmp").unlink()  # the FIFO that held the run at layer 12
    result = CliRunner().invoke(app, ["compress", str(smollm2_dir), "-r", str(recipe), "-o", str(out), "--resume",
                                      "--device", "cpu", "-q"])
    assert result.exit_code == 0, result.output
    assert comparable_files(out) == comparable_files(whole)
    assert not (tmp_path / "out.partial").exists()
