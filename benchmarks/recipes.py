"""Every shipped recipe through the CLI on the demo model: held-out perplexity, size, time and peak memory.

    python benchmarks/recipes.py [--recipes w4a16-gptq,w8a16-rtn] [--eval-tokens 16384] [--threads 2] \
        [--out result.json]

Each recipe runs in its own ``compressor compress demo:smollm2 -r NAME --eval demo:wiki --json`` process (so its
peak RSS is its own), at the recipe's own calibration, and is scored on the same ``demo:wiki`` windows as the dense
model. One JSON object per recipe is printed as it finishes, then a Markdown table. A recipe that fails is
reported with its exit code and the last line of its error, and the others still run.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from compressor.recipe import shipped_recipe_names


def run_recipe(name: str, eval_tokens: int, threads: int, workdir: Path) -> dict[str, Any]:
    """One recipe through the CLI; the report's numbers that the table shows."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "HF_HUB_OFFLINE": "1"}
    command = [sys.executable, "-m", "compressor", "compress", "demo:smollm2", "-r", name, "--out",
               str(workdir / name), "--eval", "demo:wiki", "--eval-tokens", str(eval_tokens), "--json",
               "--no-checkpoint", "--overwrite"]
    start = time.perf_counter()
    done = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    wall = round(time.perf_counter() - start, 1)
    if done.returncode != 0:
        lines = (done.stderr or done.stdout).strip().splitlines() or [""]
        return {"recipe": name, "exit_code": done.returncode, "error": lines[-1], "wall_seconds": wall}
    report = json.loads(done.stdout)
    evaluation = report.get("eval") or {}
    return {
        "recipe": name,
        "format": report["export_format"],
        "ppl_before": round(evaluation["before"]["ppl"], 3),
        "ppl": round(evaluation["after"]["ppl"], 3),
        "increase_pct": round(evaluation["increase_pct"], 2),
        "params_after": report["params"]["after"],
        "size_mb_after": round(report["size_bytes"]["after"] / 1e6, 1),
        "bits_per_weight": report.get("avg_bits_per_weight"),
        "calibration": f"{report['calibration']['samples']} x {report['calibration']['seq_len']}",
        "compress_seconds": round(report["timings"]["compress"], 1),
        "peak_rss_gb": round(report["peak_rss_bytes"] / 2**30, 2),
        "wall_seconds": wall,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipes", default=None, help="Comma-separated recipe names (default: every shipped one).")
    parser.add_argument("--eval-tokens", type=int, default=16384)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=None, help="Also write the rows as JSON here.")
    args = parser.parse_args()
    names = args.recipes.split(",") if args.recipes else shipped_recipe_names()
    rows = []
    with tempfile.TemporaryDirectory(prefix="recipes-") as tmp:
        for name in names:
            rows.append(run_recipe(name, args.eval_tokens, args.threads, Path(tmp)))
            print(json.dumps(rows[-1]), flush=True)
    if args.out:
        args.out.write_text(json.dumps(rows, indent=2))
    print("\n| recipe | format | calibration | ppl (dense) | params | size MB | bits/weight | compress s | "
          "peak RSS GB |\n|---|---|---|---|---|---|---|---|---|")
    for row in rows:
        if "error" in row:
            print(f"| {row['recipe']} | failed (exit {row['exit_code']}): {row['error']} | | | | | | | |")
            continue
        print(f"| {row['recipe']} | {row['format']} | {row['calibration']} | {row['ppl']} ({row['ppl_before']}) | "
              f"{row['params_after'] / 1e6:.1f}M | {row['size_mb_after']} | {row['bits_per_weight']} | "
              f"{row['compress_seconds']} | {row['peak_rss_gb']} |")


if __name__ == "__main__":
    main()
