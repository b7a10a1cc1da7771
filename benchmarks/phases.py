"""Time each phase of a compression run on the demo model and print JSON plus a table.

    python benchmarks/phases.py --recipe w8a16-rtn --samples 32 --eval-tokens 16384

Phases: load, calibration tokens, capture of the layers' inputs, the layer-wise pass (per layer and total),
export, evaluation; and the floor: one plain forward pass of the calibration set through the model.
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import torch

from compressor.calibration.tokens import calibration_batch
from compressor.engine import ModelContext, run_stages
from compressor.export import write_model
from compressor.methods.registry import get_method
from compressor.models import get_adapter
from compressor.pipeline import evaluate, load
from compressor.recipe import load_recipe
from compressor.report import peak_rss_bytes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="demo:smollm2")
    parser.add_argument("--recipe", default="w8a16-rtn")
    parser.add_argument("--samples", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--eval-tokens", type=int, default=16384)
    args = parser.parse_args()
    recipe = load_recipe(args.recipe, [f"calibration.samples={args.samples}", f"calibration.seq_len={args.seq_len}"])
    times: dict[str, float] = {}

    def timed(name: str, fn):  # type: ignore[no-untyped-def]
        start = time.perf_counter()
        value = fn()
        times[name] = round(time.perf_counter() - start, 2)
        return value

    loaded = timed("load", lambda: load(args.model))
    tokens = timed("calibration_tokens", lambda: calibration_batch(
        loaded.tokenizer, recipe.calibration.dataset, args.samples, args.seq_len, recipe.seed))
    def floor() -> None:
        with torch.no_grad():
            for batch in tokens.split(recipe.calibration.batch_size):
                loaded.model.model(batch)  # decoder only: the engine never runs the lm_head

    timed("floor_forward", floor)
    before = evaluate(loaded, "demo:wiki", seq_len=512, max_tokens=args.eval_tokens, device="cpu")
    times["eval_before"] = round(before.seconds, 2)
    adapter = get_adapter(loaded.model)
    run = ModelContext(loaded.model, adapter, tokens, torch.device("cpu"), recipe.calibration.batch_size)
    timed("capture_inputs", run.capture_inputs)
    stages = [get_method(c.method)(c) for c in recipe.stages]
    layer_times: list[float] = []
    last = [time.perf_counter()]

    def progress(_: str, done: int, total: int) -> None:
        now = time.perf_counter()
        layer_times.append(round(now - last[0], 3))
        last[0] = now

    timed("layerwise_pass", lambda: run_stages(run, stages, progress))
    with tempfile.TemporaryDirectory() as tmp:
        timed("export", lambda: write_model(recipe.export, run, loaded.tokenizer, Path(tmp)))
    result = evaluate(loaded, "demo:wiki", seq_len=512, max_tokens=args.eval_tokens, device="cpu")
    times["eval_after"] = round(result.seconds, 2)
    output = {
        "recipe": args.recipe, "model": args.model, "calibration": f"demo:lee {args.samples}x{args.seq_len}",
        "seconds": times, "per_layer_seconds_mean": round(sum(layer_times) / len(layer_times), 3),
        "ppl_before": round(before.ppl, 4), "ppl_after": round(result.ppl, 4),
        "eval_tokens_per_second": round(result.tokens_per_second, 1),
        "peak_rss_mb": round(peak_rss_bytes() / 2**20), "torch_threads": torch.get_num_threads(),
        "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
    }
    print(json.dumps(output, indent=2))
    print("\n| phase | seconds |\n|---|---|")
    for name, value in times.items():
        print(f"| {name} | {value} |")


if __name__ == "__main__":
    main()
