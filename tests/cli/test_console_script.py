"""The installed `compressor` console script, run as a real subprocess."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path


def test_console_script_compress_and_inspect(model_dir_factory, text_file: Path, tmp_path: Path) -> None:
    # The script sits beside the interpreter running the tests (a virtualenv's bin/), which need not be on PATH.
    exe = shutil.which("compressor", path=sysconfig.get_path("scripts"))
    assert exe, f"the console script is installed by `pip install -e .` into {sysconfig.get_path('scripts')}"
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        f'name: sub\ncalibration: {{dataset: "{text_file}", samples: 2, seq_len: 32}}\n'
        "stages:\n  - method: rtn\n    bits: 8\n    group_size: -1\n"
    )
    out = tmp_path / "out"
    done = subprocess.run([exe, "compress", str(model_dir_factory("llama")), "-r", str(recipe), "-o", str(out),
                           "--json"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["avg_bits_per_weight"] == 8.0
    shown = subprocess.run([exe, "inspect", str(out), "--json"], capture_output=True, text=True, timeout=300)
    assert shown.returncode == 0, shown.stderr
    assert json.loads(shown.stdout)["compression_report"]["recipe"] == "sub"
    failed = subprocess.run([exe, "compress", str(tmp_path / "nope"), "-r", str(recipe), "-o", str(out)],
                            capture_output=True, text=True, timeout=300)
    assert failed.returncode == 2 and failed.stderr.startswith("error: ") and "Traceback" not in failed.stderr


def test_python_dash_m_runs_the_same_cli() -> None:
    """Launchers that start a module (``torchrun -m compressor``) need ``compressor/__main__.py``."""
    done = subprocess.run([sys.executable, "-m", "compressor", "recipes", "list"], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    assert "w4a16-gptq" in done.stdout
