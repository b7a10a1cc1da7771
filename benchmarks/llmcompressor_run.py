"""llm-compressor's GPTQ on the demo model, on the tokens benchmarks/llmcompressor_data.py dumped.

Runs inside a virtualenv with llmcompressor installed (benchmarks/llmcompressor_gptq.sh makes it); it
does not import compressor. Perplexity uses the same formula as compressor/evaluate/perplexity.py: exp of
the summed next-token NLL over every predicted token of every window. Prints one JSON object and a table.
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import time
from importlib.metadata import version
from pathlib import Path

import torch
import torch.nn.functional as F
from datasets import Dataset
from llmcompressor import oneshot
from llmcompressor.modifiers.quantization import GPTQModifier
from transformers import AutoModelForCausalLM


@torch.no_grad()
def perplexity(model: torch.nn.Module, windows: torch.Tensor) -> float:
    nll, count = 0.0, 0
    for window in windows:
        logits = model(window.unsqueeze(0)).logits
        nll += float(F.cross_entropy(logits[0, :-1].float(), window[1:], reduction="sum"))
        count += window.numel() - 1
    return math.exp(nll / count)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, required=True, help="Directory written by llmcompressor_data.py.")
    parser.add_argument("--group", type=int, default=64)
    parser.add_argument("--act-order", action="store_true")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice).")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    calibration = torch.load(args.data / "calibration.pt")
    windows = torch.load(args.data / "eval.pt")
    model_dir = (args.data / "model.txt").read_text().strip()
    model = AutoModelForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float32).eval()
    dense_ppl = perplexity(model, windows)
    dataset = Dataset.from_dict({"input_ids": calibration.tolist(),
                                 "attention_mask": torch.ones_like(calibration).tolist()})
    weights = {"num_bits": 4, "type": "int", "symmetric": True, "strategy": "group", "group_size": args.group}
    if args.act_order:
        weights["actorder"] = "static"
    modifier = GPTQModifier(ignore=["lm_head"], dampening_frac=0.01,
                            config_groups={"group_0": {"targets": ["Linear"], "weights": weights}})
    start = time.perf_counter()
    oneshot(model=model, dataset=dataset, recipe=modifier, max_seq_length=calibration.shape[1],
            num_calibration_samples=calibration.shape[0])
    seconds = time.perf_counter() - start
    result = {
        "llmcompressor": version("llmcompressor"), "compressed-tensors": version("compressed-tensors"),
        "transformers": version("transformers"), "torch": torch.__version__, "threads": torch.get_num_threads(),
        "group": args.group, "act_order": args.act_order, "samples": calibration.shape[0],
        "seq_len": calibration.shape[1], "eval_tokens": windows.numel(), "dense_ppl": round(dense_ppl, 4),
        "gptq_ppl": round(perplexity(model.eval(), windows), 4), "oneshot_seconds": round(seconds, 1),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
    }
    print(json.dumps(result))
    print("\n| tool | group | dense ppl | GPTQ ppl | seconds | peak RSS MB |\n|---|---|---|---|---|---|")
    print(f"| llm-compressor {result['llmcompressor']} | {args.group} | {result['dense_ppl']} | {result['gptq_ppl']} | "
          f"{result['oneshot_seconds']} | {result['peak_rss_mb']} |")


if __name__ == "__main__":
    main()
