"""Dump the exact calibration and evaluation tokens our benchmarks use, for a peer tool run in another venv.

    python benchmarks/llmcompressor_data.py --out /tmp/llmc-bench [--samples 128 --seq-len 512 --eval-tokens 16384]

Writes ``calibration.pt`` (``[samples, seq_len]`` from demo:lee, seed 0, as benchmarks/quant.py),
``eval.pt`` (the demo:wiki windows of 512 that ``compressor eval`` scores) and ``model.txt`` (the dense demo
model directory), so that a peer tool (llm-compressor, auto-round) sees the same model and data as ours.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from compressor.calibration.tokens import calibration_batch, iter_eval_windows
from compressor.models.loading import ensure_demo_model
from compressor.pipeline import load


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--samples", type=int, default=128)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--eval-tokens", type=int, default=16384)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    loaded = load("demo:smollm2")
    calibration = calibration_batch(loaded.tokenizer, "demo:lee", args.samples, args.seq_len, seed=0)
    windows = torch.stack(list(iter_eval_windows(loaded.tokenizer, "demo:wiki", 512, args.eval_tokens)))
    torch.save(calibration, args.out / "calibration.pt")
    torch.save(windows, args.out / "eval.pt")
    model_dir = ensure_demo_model("smollm2")
    (args.out / "model.txt").write_text(f"{model_dir}\n")
    print(f"calibration {tuple(calibration.shape)}, eval {tuple(windows.shape)}, model {model_dir}")


if __name__ == "__main__":
    main()
