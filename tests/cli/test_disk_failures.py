"""Writes that fail: a full disk (RLIMIT_FSIZE in a real subprocess) and a read-only or impossible ``--out``.

Every case must end in one stderr line and an exit code, leave nothing that looks like a model at ``--out``, leave
the source model as it was, and keep the checkpoints that fit for ``--resume``.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import resource
import shutil
import signal
import subprocess
import sysconfig
from pathlib import Path

import pytest
from run_outputs import comparable_files
from tiny import tiny_model
from typer.testing import CliRunner

from compressor.cli import app
from compressor.pipeline import compress
from compressor.recipe import load_recipe

# Dense output: the model file (~1 MB: every layer, the embeddings) is far larger than any one checkpoint file
# (a layer's weights and codes ~205 kB, the next inputs ~33 kB), so one file-size limit lets every checkpoint be
# written and stops the export.
RECIPE = """\
name: tiny-disk
calibration: {{dataset: "{calib}", samples: 4, seq_len: 32, batch_size: 2}}
stages:
  - method: gptq
    bits: 4
    group_size: 32
export: {{format: dense}}
"""
CHECKPOINTS_FIT = 400_000  # bytes per file: above a layer checkpoint, below the exported model
NOTHING_FITS = 100_000  # below a layer checkpoint


@pytest.fixture(scope="module")
def six_layers(tmp_path_factory: pytest.TempPathFactory, tiny_tokenizer) -> Path:
    path = tmp_path_factory.mktemp("six-layers-disk")
    tiny_model("llama", num_hidden_layers=6).save_pretrained(path)
    tiny_tokenizer.save_pretrained(path)
    return path


@pytest.fixture
def recipe(tmp_path: Path, text_file: Path) -> Path:
    path = tmp_path / "recipe.yaml"
    path.write_text(RECIPE.format(calib=text_file))
    return path


def _digest(directory: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(directory.rglob("*")):
        digest.update(str(path.relative_to(directory)).encode())
        if path.is_file():
            digest.update(path.read_bytes())
    return digest.hexdigest()


def _limited(size: int) -> None:
    """In the child: files may not grow past ``size``; a write past it fails with EFBIG instead of SIGXFSZ."""
    resource.setrlimit(resource.RLIMIT_FSIZE, (size, size))
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _cli(args: list[str], size: int) -> subprocess.CompletedProcess:
    exe = shutil.which("compressor", path=sysconfig.get_path("scripts"))
    assert exe
    return subprocess.run([exe, *args], capture_output=True, text=True, timeout=300, preexec_fn=lambda: _limited(size),
                          env={**os.environ, "OMP_NUM_THREADS": "1"})


def _one_line(stderr: str) -> str:
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in stderr, stderr
    return lines[0]


def test_disk_full_at_export_keeps_the_checkpoints_and_resume_finishes(
    runner: CliRunner, six_layers: Path, recipe: Path, tmp_path: Path, text_file: Path
) -> None:
    out, partial = tmp_path / "out", tmp_path / "out.partial"
    before = _digest(six_layers)
    result = _cli(["compress", str(six_layers), "-r", str(recipe), "-o", str(out), "-q"], CHECKPOINTS_FIT)
    assert result.returncode == 1, result.stderr
    line = _one_line(result.stderr)
    assert line == (f"error: cannot write {out}: File too large (disk full, or over a quota or file-size limit); "
                    f"the checkpoints that fit are kept in {partial}: make room, then rerun the same command "
                    "with --resume")
    assert not out.exists()  # nothing that looks like a model, not even half of one
    assert not list(partial.glob("model-*"))
    assert json.loads((partial / "manifest.json").read_text())["layer"] == 5  # every layer was checkpointed
    assert _digest(six_layers) == before
    result = runner.invoke(app, ["compress", str(six_layers), "-r", str(recipe), "-o", str(out), "--resume", "-q"])
    assert result.exit_code == 0, result.output
    reference = tmp_path / "reference"
    compress(six_layers, load_recipe(recipe), reference, checkpoint=False)
    assert comparable_files(out) == comparable_files(reference)
    assert not partial.exists()


def test_disk_full_at_the_first_checkpoint_is_one_line(six_layers: Path, recipe: Path, tmp_path: Path) -> None:
    out, partial = tmp_path / "out", tmp_path / "out.partial"
    result = _cli(["compress", str(six_layers), "-r", str(recipe), "-o", str(out), "-q"], NOTHING_FITS)
    assert result.returncode == 1, result.stderr
    line = _one_line(result.stderr)
    assert line.startswith(f"error: cannot write {partial / 'pass0-layer0.safetensors'}: File too large"), line
    assert not out.exists() and not list(partial.glob("*.tmp"))


def test_no_space_left_names_the_cause(runner: CliRunner, six_layers: Path, recipe: Path, tmp_path: Path,
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """ENOSPC (a full file system, which a test cannot make): the same line as EFBIG, exit 1."""

    def full(*args: object, **kwargs: object) -> list[str]:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr("compressor.pipeline.write_model", full)
    out = tmp_path / "out"
    result = runner.invoke(app, ["compress", str(six_layers), "-r", str(recipe), "-o", str(out), "-q"])
    assert result.exit_code == 1, result.output
    assert _one_line(result.stderr) == (
        f"error: cannot write {out}: No space left on device (disk full, or over a quota or file-size limit); "
        f"the checkpoints that fit are kept in {tmp_path / 'out.partial'}: make room, then rerun the same command "
        "with --resume")
    assert not out.exists()


def test_disk_full_keeps_the_previous_output_and_says_when_nothing_is_kept(
    runner: CliRunner, six_layers: Path, recipe: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """--overwrite replaces OUT only once the new one is whole; without checkpoints the line says none were kept."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "config.json").write_text("{}")

    def full(*args: object, **kwargs: object) -> list[str]:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr("compressor.pipeline.write_model", full)
    result = runner.invoke(app, ["compress", str(six_layers), "-r", str(recipe), "-o", str(out), "-q", "--overwrite",
                                 "--no-checkpoint"])
    assert result.exit_code == 1, result.output
    assert _one_line(result.stderr) == (f"error: cannot write {out}: No space left on device (disk full, or over a "
                                        "quota or file-size limit); no checkpoint was kept")
    assert [p.name for p in out.iterdir()] == ["config.json"] and (out / "config.json").read_text() == "{}"
    assert not (tmp_path / "out.partial").exists()


def _can_write(directory: Path) -> bool:
    try:
        (directory / "probe").write_text("")
    except OSError:
        return False
    (directory / "probe").unlink()
    return True


def test_read_only_output_location_is_refused_before_loading(runner: CliRunner, six_layers: Path, recipe: Path,
                                                             tmp_path: Path) -> None:
    """A directory without write permission; as root (modes do not apply) the same directory bind-mounted read-only
    in a private mount namespace (``unshare -m``); skipped only where neither is possible."""
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    out = locked / "sub" / "out"
    args = ["compress", str(six_layers), "-r", str(recipe), "-o", str(out), "-q"]
    try:
        if not _can_write(locked):
            result = runner.invoke(app, args)
            code, stderr, why = result.exit_code, result.stderr, "is not writable (permission denied)"
        else:
            unshare, exe = shutil.which("unshare"), shutil.which("compressor", path=sysconfig.get_path("scripts"))
            mount = f"mount --bind -o ro {locked} {locked}"
            if not unshare or subprocess.run([unshare, "-m", "sh", "-c", mount], capture_output=True).returncode:
                pytest.skip("running as root without a private mount namespace: chmod cannot make a read-only dir")
            command = " ".join([mount, "&& exec", str(exe), *args])
            done = subprocess.run([unshare, "-m", "sh", "-c", command], capture_output=True, text=True, timeout=300)
            code, stderr, why = done.returncode, done.stderr, "is on a read-only file system"
    finally:
        locked.chmod(0o755)
    assert code == 2, stderr
    assert _one_line(stderr) == f"error: --out {out}: {locked} {why}; choose another --out"
    assert list(locked.iterdir()) == []


def test_a_file_where_the_output_directory_should_be(runner: CliRunner, six_layers: Path, recipe: Path,
                                                     tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    out = blocker / "out"
    result = runner.invoke(app, ["compress", str(six_layers), "-r", str(recipe), "-o", str(out), "-q"])
    assert result.exit_code == 2, result.output
    assert _one_line(result.stderr) == f"error: --out {out}: {blocker} is not a directory"
    assert blocker.read_text() == "not a directory"
