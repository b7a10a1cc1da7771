"""What two runs of one recipe must agree on, byte for byte, and a CLI run stopped at a known layer (resume tests)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sysconfig
import time
from pathlib import Path


def comparable_files(out: Path) -> dict[str, bytes]:
    """Every output file's bytes; the report without what differs between any two runs (times, memory)."""
    files = {p.name: p.read_bytes() for p in out.iterdir()}
    report = json.loads(files.pop("compression_report.json"))
    for key in ("timings", "peak_rss_bytes"):
        report.pop(key)
    for row in report["layers"]:
        row.pop("seconds")
    files["compression_report.json"] = json.dumps(report).encode()
    files.pop("compression_report.md")  # the same numbers, plus the timings
    return files


def start_blocked(model: Path, recipe: Path, out: Path, pass_number: int, after: int,
                  timeout: float = 120) -> subprocess.Popen:
    """Start the CLI; it blocks writing layer ``after``'s checkpoint, once layer ``after - 1``'s is complete."""
    partial = out.parent / f"{out.name}.partial"
    partial.mkdir()
    os.mkfifo(partial / f"pass{pass_number}-layer{after}.safetensors.tmp")
    exe = shutil.which("compressor", path=sysconfig.get_path("scripts"))
    assert exe
    # SIGINT at its default, as a terminal's foreground process has it: a job a non-interactive shell started with
    # `&` (a CI runner's, a nohup'd pytest) inherits SIGINT ignored, which Python keeps, so Ctrl-C would be lost.
    process = subprocess.Popen([exe, "compress", str(model), "-r", str(recipe), "-o", str(out), "--quiet"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env={**os.environ, "OMP_NUM_THREADS": "1"},
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    manifest = partial / "manifest.json"
    deadline = time.monotonic() + timeout
    while not (manifest.is_file() and json.loads(manifest.read_text())["layer"] == after - 1):
        assert process.poll() is None, (f"exited {process.returncode} before layer {after - 1}'s checkpoint",
                                        *process.communicate())
        assert time.monotonic() < deadline, "the run never reached the layer"
        time.sleep(0.05)
    return process
