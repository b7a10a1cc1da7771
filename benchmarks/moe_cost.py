"""What calibrating every expert costs: GPTQ W4 on a tiny random 8-expert Mixtral, beside a dense Mistral whose
MLP holds as many weights as all eight experts together.

    OMP_NUM_THREADS=1 python benchmarks/moe_cost.py [--layers 4] [--hidden 128] [--expert-width 256]
        [--samples 32] [--seq-len 128] [--out result.json]

Each model runs in a fresh child process, so its peak RSS (``ru_maxrss``) is its own: building the random
model, linearizing the experts, and GPTQ (g32, act_order) through the engine on seeded random tokens.
"seconds" is ``run_stages`` alone. In the MoE every token runs through every expert while statistics are
gathered, and each expert's down projection needs its own Hessian pass, so it is expected to cost more than
the dense model of equal size; the routed counts say how unevenly the router spread the tokens.
Prints one JSON object and a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig, AutoModelForCausalLM

from compressor.engine import ModelContext, run_stages
from compressor.methods.quant.gptq import GPTQ, GPTQConfig
from compressor.models import get_adapter

MODELS = ("mixtral", "dense")


def _config(kind: str, args: argparse.Namespace) -> Any:
    shared = dict(vocab_size=1024, hidden_size=args.hidden, num_hidden_layers=args.layers, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=512)
    if kind == "mixtral":
        return AutoConfig.for_model("mixtral", intermediate_size=args.expert_width, num_local_experts=8,
                                    num_experts_per_tok=2, **shared)
    return AutoConfig.for_model("mistral", intermediate_size=8 * args.expert_width, **shared)


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def measure(kind: str, args: argparse.Namespace) -> dict[str, Any]:
    """Build ``kind``, quantize it with GPTQ W4 g32; seconds, peak RSS and what the records say."""
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(_config(kind, args), dtype=torch.float32).eval()
    adapter = get_adapter(model)
    tokens = torch.randint(0, 1024, (args.samples, args.seq_len), generator=torch.Generator().manual_seed(0))
    rss_before = _rss_mb()
    run = ModelContext(model, adapter, tokens, torch.device("cpu"), batch_size=args.batch_size)
    stage = GPTQ(GPTQConfig(method="gptq", bits=4, group_size=32))
    start = time.perf_counter()
    records = run_stages(run, [stage])
    seconds = time.perf_counter() - start
    routed = [r.extra["routed_tokens"] for r in records if r.module.endswith(".w1")]
    return {
        "model": kind, "params": sum(p.numel() for p in model.parameters()), "linears": len(records),
        "seconds": round(seconds, 2), "peak_rss_mb": round(_rss_mb(), 1), "rss_before_mb": round(rss_before, 1),
        "mean_rel_error": round(sum(float(r.rel_error or 0) for r in records) / len(records), 5),
        "routed_tokens_min_max": [min(routed), max(routed)] if routed else None,
        "tokens": int(tokens.numel()),
    }


def _row(result: dict[str, Any]) -> str:
    routed = result["routed_tokens_min_max"]
    return (f"| {result['model']} | {result['params'] / 1e6:.2f} M | {result['linears']} | {result['seconds']:.2f} | "
            f"{result['peak_rss_mb']:.0f} | {result['mean_rel_error']:.4f} | {routed or '-'} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--expert-width", type=int, default=256)
    parser.add_argument("--samples", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--one", choices=MODELS, help="measure one model in this process (used by the parent)")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure(args.one, args)))
        return
    passed = [f"--{key.replace('_', '-')}={value}" for key, value in vars(args).items() if key not in ("one", "out")]
    results = []
    for kind in MODELS:
        child = subprocess.run([sys.executable, __file__, *passed, "--one", kind], capture_output=True, text=True,
                               check=True)
        results.append(json.loads(child.stdout.strip().splitlines()[-1]))
    summary = {"settings": {k: v for k, v in vars(args).items() if k not in ("one", "out")}, "results": results}
    print(json.dumps(summary, indent=2))
    print("\n| model | params | linears | GPTQ s | peak RSS MB | mean rel. error | routed tokens min/max |")
    print("|---|---|---|---|---|---|---|")
    for result in results:
        print(_row(result))
    if args.out:
        args.out.write_text(json.dumps(summary, indent=2) + "\n")


if __name__ == "__main__":
    main()
