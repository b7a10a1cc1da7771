"""Speed-up of data-parallel calibration: one process against torchrun's N, on the same cores; prints JSON.

    python benchmarks/distributed.py --model demo:smollm2 --recipe w4a16-gptq --samples 64 --seq-len 512

Both runs get ``--cores`` CPU threads in total: one process with ``OMP_NUM_THREADS=cores``, ``N`` processes with
``cores / N`` each (``torchrun --nproc-per-node N -m compressor compress``), so the speed-up measures splitting
the calibration batches, not extra cores. Per run: wall time of the whole command (imports, load and export
included) and the report's ``compress`` phase (the layer-wise pass). Each process holds its own copy of the model:
memory grows N times. The per-module solves a method hands to ``ctx.solve_each`` run in one process each and are
broadcast (``compressor.distributed.solve_partitioned``: largest first onto the least-loaded process); GPTQ and RTN
hand theirs over once ``quantize_layer_linears`` does (issue 21; until then every process solves every module).
A module is never split, so the largest linear of a layer (down_proj) still runs in one process: the solve phase
gains less than the forward.
``identical_outputs`` compares the two output directories (the report without times); thread counts change
the order of float32 sums inside matrix products, so it can be false even when both runs are correct.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _run(command: list[str], threads: int) -> float:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    start = time.perf_counter()
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"{' '.join(command)} failed ({done.returncode}):\n{done.stderr[-4000:]}")
    return round(time.perf_counter() - start, 2)


def _comparable(out: Path) -> dict[str, bytes]:
    """Every output file's bytes, the report without its times and memory (tests/run_outputs.py's rule)."""
    files = {p.name: p.read_bytes() for p in out.iterdir() if p.name != "compression_report.md"}
    report = json.loads(files.pop("compression_report.json"))
    report.pop("timings"), report.pop("peak_rss_bytes")
    for row in report["layers"]:
        row.pop("seconds")
    files["compression_report.json"] = json.dumps(report).encode()
    return files


def _summary(out: Path, wall: float) -> dict[str, Any]:
    report = json.loads((out / "compression_report.json").read_text())
    return {"wall_seconds": wall, "compress_seconds": report["timings"]["compress"],
            "peak_rss_mb_rank0": round(report["peak_rss_bytes"] / 2**20)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="demo:smollm2")
    parser.add_argument("--recipe", default="w4a16-gptq")
    parser.add_argument("--calib", default=None, help="Calibration SOURCE (default: the recipe's).")
    parser.add_argument("--samples", type=int, default=64)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--cores", type=int, default=2, help="CPU threads in total, for either run.")
    args = parser.parse_args()
    if args.cores % args.processes:
        sys.exit(f"--cores {args.cores} must split evenly over --processes {args.processes}")
    common = ["compress", args.model, "--recipe", args.recipe, "--calib-samples", str(args.samples),
              "--seq-len", str(args.seq_len), "--no-checkpoint", "--quiet"]
    common += ["--calib", args.calib] if args.calib else []
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(args.processes),
                "--monitor-interval", "0.2", "--master-port", str(_free_port()), "-m", "compressor"]
    with tempfile.TemporaryDirectory() as tmp:
        one, many = Path(tmp) / "one", Path(tmp) / "many"
        wall_one = _run([sys.executable, "-m", "compressor", *common, "--out", str(one)], args.cores)
        wall_many = _run([*torchrun, *common, "--out", str(many)], args.cores // args.processes)
        single, split = _summary(one, wall_one), _summary(many, wall_many)
        output = {
            "model": args.model, "recipe": args.recipe, "calibration": f"{args.samples}x{args.seq_len}",
            "cores": args.cores, "processes": args.processes, "one_process": single,
            f"{args.processes}_processes": split,
            "speedup_compress": round(single["compress_seconds"] / split["compress_seconds"], 3),
            "speedup_wall": round(wall_one / wall_many, 3),
            "identical_outputs": _comparable(one) == _comparable(many),
            "cpu": platform.processor() or platform.machine(),
        }
    print(json.dumps(output, indent=2))


if __name__ == "__main__":
    main()
