"""Our side of benchmarks/llamacpp.sh: write GGUF files of the demo model and what the in-memory model says.

    python benchmarks/llamacpp_ref.py --out /tmp/llamacpp-bench [--settings q4_0,q8_0,...] [--eval-tokens 4096]

For each setting: one ``compressor.compress`` run with format gguf (the recipe below, calibration on demo:lee),
then, from the compressed model still in memory (its scales already rounded to the fp16 GGUF stores), the logits
of the first evaluation window and the perplexity over all windows. The windows' token ids are saved once, so
llama.cpp (benchmarks/llamacpp_run.py, in its own virtualenv) reads exactly these tokens and does not tokenize.
Written per setting: ``<name>/model-<TYPE>.gguf``, ``<name>/reference.json`` (ppl, recipe, seconds) and
``<name>/logits.npy`` (float32 ``[tokens, vocab]`` of window 0, ``--logit-tokens`` positions).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from compressor.calibration.tokens import iter_eval_windows
from compressor.evaluate.perplexity import window_nll
from compressor.pipeline import compress, load
from compressor.recipe import recipe_from_dict

RTN = {"method": "rtn", "targets": ["Linear"], "ignore": ["lm_head"]}
GPTQ = {"method": "gptq", "targets": ["Linear"], "ignore": ["lm_head"], "act_order": True, "dampening": 0.01}
#: name -> stages. gptq_g32 is the stage of the shipped w4a16-gptq-g32-gguf recipe.
SETTINGS: dict[str, list[dict[str, Any]]] = {
    "q4_0": [{**RTN, "bits": 4, "group_size": 32}],
    "q4_1": [{**RTN, "bits": 4, "group_size": 32, "symmetric": False}],
    "q5_0": [{**RTN, "bits": 5, "group_size": 32}],
    "q5_1": [{**RTN, "bits": 5, "group_size": 32, "symmetric": False}],
    "q8_0": [{**RTN, "bits": 8, "group_size": 32}],
    "gptq_g32": [{**GPTQ, "bits": 4, "group_size": 32, "symmetric": True}],
    "gptq_g128": [{**GPTQ, "bits": 4, "group_size": 128, "symmetric": True}],
    "shortgpt_q8_0": [{"method": "layer_drop", "metric": "block_influence", "ratio": 0.25},
                      {**RTN, "bits": 8, "group_size": 32}],
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--model", default="demo:smollm2")
    parser.add_argument("--settings", default=",".join(SETTINGS))
    parser.add_argument("--samples", type=int, default=16, help="Calibration sequences (GPTQ, ShortGPT scores).")
    parser.add_argument("--seq-len", type=int, default=512, help="Calibration and evaluation window length.")
    parser.add_argument("--eval-tokens", type=int, default=4096)
    parser.add_argument("--logit-tokens", type=int, default=128, help="Positions of window 0 whose logits are kept.")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    tokenizer = load(args.model, dtype="float32").tokenizer
    windows = torch.stack(list(iter_eval_windows(tokenizer, "demo:wiki", args.seq_len, args.eval_tokens)))
    np.save(args.out / "windows.npy", windows.numpy().astype(np.int32))
    for name in args.settings.split(","):
        stages = SETTINGS[name]
        recipe = recipe_from_dict({
            "name": f"llamacpp-{name}",
            "calibration": {"dataset": "demo:lee", "samples": args.samples, "seq_len": args.seq_len},
            "stages": stages, "export": {"format": "gguf"},
        })
        loaded = load(args.model, dtype="float32")
        target = args.out / name
        start = time.perf_counter()
        compress(loaded, recipe, target, device="cpu", overwrite=True, checkpoint=False)
        seconds = time.perf_counter() - start
        model = loaded.model.eval()
        total, count = 0.0, 0
        with torch.no_grad():
            for index, window in enumerate(windows):
                logits = model(input_ids=window[None], use_cache=False).logits
                total += float(window_nll(logits, window[None]))
                count += window.numel() - 1
                if index == 0:
                    np.save(target / "logits.npy", logits[0, : args.logit_tokens].float().numpy())
        (gguf_file,) = target.glob("*.gguf")
        reference = {"setting": name, "stages": stages, "gguf": gguf_file.name, "ppl": float(np.exp(total / count)),
                     "compress_seconds": round(seconds, 1), "bytes": gguf_file.stat().st_size,
                     "layers": int(model.config.num_hidden_layers)}
        (target / "reference.json").write_text(json.dumps(reference, indent=2))
        print(json.dumps(reference), flush=True)


if __name__ == "__main__":
    main()
