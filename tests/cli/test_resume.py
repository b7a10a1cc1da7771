"""`compressor compress` killed for real (SIGKILL, SIGTERM, SIGINT) in a subprocess, then `--resume`d.

To stop the run at a known layer without a hook in the code, the test puts a FIFO where the checkpoint writer
will create layer ``k+1``'s temporary file: opening it for writing blocks (nobody reads) once layer ``k``'s
checkpoint is complete. SIGKILL then kills a blocked process; for SIGTERM/SIGINT the test also opens the
FIFO for reading, so the write finishes and Python runs the signal handler. The resume runs in-process.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
from run_outputs import comparable_files, start_blocked
from tiny import tiny_model
from typer.testing import CliRunner

from compressor.cli import app
from compressor.pipeline import compress
from compressor.recipe import load_recipe

RECIPE = """\
name: tiny-resume
calibration: {{dataset: "{calib}", samples: 4, seq_len: 32, batch_size: 2}}
stages:
{stages}
  - method: gptq
    bits: 4
    group_size: 32
export: {{format: {format}}}
"""
DROP = "  - method: layer_drop\n    remove: 2"  # model-level: GPTQ runs in a second pass (pass 1)


@pytest.fixture(scope="module")
def six_layers(tmp_path_factory: pytest.TempPathFactory, tiny_tokenizer) -> Path:
    path = tmp_path_factory.mktemp("six-layers-cli")
    tiny_model("llama", num_hidden_layers=6).save_pretrained(path)
    tiny_tokenizer.save_pretrained(path)
    return path


def _recipe(tmp_path: Path, calib: Path, two_passes: bool) -> Path:
    path = tmp_path / "recipe.yaml"
    path.write_text(RECIPE.format(calib=calib, stages=DROP if two_passes else "",
                                  format="dense" if two_passes else "compressed-tensors"))
    return path


def _drain(fifo: Path, process: subprocess.Popen) -> None:
    """Read the FIFO until the process ends: the blocked write finishes, and the signal handler runs after it.

    The FIFO may already be gone: a signal that lands while the run is still opening it interrupts the open, the
    run stops there and removes its temporary file (seen once in a full-suite run). The checks after the drain
    hold either way: the manifest says layer ``after - 1`` or ``after``.
    """
    try:
        fd = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
    except FileNotFoundError:
        return
    deadline = time.monotonic() + 60
    try:
        while process.poll() is None and time.monotonic() < deadline:
            try:
                if not os.read(fd, 1 << 16):
                    time.sleep(0.01)
            except BlockingIOError:
                time.sleep(0.01)
    finally:
        os.close(fd)


@pytest.fixture(scope="module")
def reference(six_layers: Path, text_file: Path, tmp_path_factory: pytest.TempPathFactory):
    """An uninterrupted run's files (without checkpoints), once per recipe."""
    made: dict[bool, dict[str, bytes]] = {}

    def files(two_passes: bool) -> dict[str, bytes]:
        if two_passes not in made:
            tmp = tmp_path_factory.mktemp("reference")
            compress(six_layers, load_recipe(_recipe(tmp, text_file, two_passes)), tmp / "out", checkpoint=False)
            made[two_passes] = comparable_files(tmp / "out")
        return made[two_passes]

    return files


# Few kills (each starts python and torch, ~5 s): tests/unit/test_checkpoint.py interrupts at more layers in-process.
@pytest.mark.parametrize(("two_passes", "after"), [(False, 4), (True, 2)])
def test_kill_9_then_resume_writes_the_same_bytes(runner: CliRunner, six_layers: Path, text_file: Path,
                                                  tmp_path: Path, reference, two_passes: bool, after: int) -> None:
    recipe, out = _recipe(tmp_path, text_file, two_passes), tmp_path / "out"
    process = start_blocked(six_layers, recipe, out, int(two_passes), after)
    process.kill()
    assert process.wait(timeout=60) == -signal.SIGKILL
    assert not out.exists()
    if two_passes:  # ShortGPT's pass finished: its scores are saved, so the resume does not measure them again
        assert json.loads((tmp_path / "out.partial" / "manifest.json").read_text())["finished"] == [0]
    (tmp_path / "out.partial" / f"pass{int(two_passes)}-layer{after}.safetensors.tmp").unlink()  # the test's FIFO
    result = runner.invoke(app, ["compress", str(six_layers), "-r", str(recipe), "-o", str(out), "--resume", "-q"])
    assert result.exit_code == 0, result.output
    assert comparable_files(out) == reference(two_passes)
    assert not (tmp_path / "out.partial").exists()


@pytest.mark.parametrize(("signum", "code", "after"), [(signal.SIGTERM, 143, 3), (signal.SIGINT, 130, 2)])
def test_sigterm_and_sigint_keep_the_checkpoint_and_say_how_to_resume(
    runner: CliRunner, six_layers: Path, text_file: Path, tmp_path: Path, reference, signum: int, code: int,
    after: int,
) -> None:
    recipe, out = _recipe(tmp_path, text_file, False), tmp_path / "out"
    process = start_blocked(six_layers, recipe, out, 0, after)
    process.send_signal(signum)
    _drain(tmp_path / "out.partial" / f"pass0-layer{after}.safetensors.tmp", process)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == code, stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and "--resume" in lines[0] and "Traceback" not in stderr, stderr
    assert f"interrupted ({signal.Signals(signum).name})" in lines[0]
    assert not out.exists()  # nothing that looks like a model
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith("out")] == ["out.partial"]
    assert not list((tmp_path / "out.partial").glob("model-*"))
    manifest = json.loads((tmp_path / "out.partial" / "manifest.json").read_text())
    assert manifest["layer"] in (after - 1, after)  # the handler may run after layer `after` is saved
    result = runner.invoke(app, ["compress", str(six_layers), "-r", str(recipe), "-o", str(out), "--resume", "-q"])
    assert result.exit_code == 0, result.output
    assert comparable_files(out) == reference(False)


def test_resume_mismatch_is_one_line_exit_2(runner: CliRunner, six_layers: Path, text_file: Path,
                                            tmp_path: Path) -> None:
    recipe, out = _recipe(tmp_path, text_file, False), tmp_path / "out"
    def stop_after_two(phase: str, done: int, total: int) -> None:
        if done == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        compress(six_layers, load_recipe(recipe), out, progress=stop_after_two)
    result = runner.invoke(app, ["compress", str(six_layers), "-r", str(recipe), "-o", str(out), "--resume",
                                 "--set", "stages.0.bits=3"])
    assert result.exit_code == 2, result.output
    assert result.stderr.strip().splitlines() == [
        f"error: --resume: the checkpoint in {tmp_path / 'out.partial'} was made with a different recipe; "
        "rerun without --resume (and --overwrite)"]
