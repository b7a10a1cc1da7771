"""What two runs of one recipe must agree on, byte for byte (resume tests compare interrupted and whole runs)."""

from __future__ import annotations

import json
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
