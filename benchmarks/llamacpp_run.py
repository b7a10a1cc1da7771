"""llama.cpp's side of benchmarks/llamacpp.sh; runs in the llama-cpp-python virtualenv (numpy only, no compressor).

    $VENV/bin/python benchmarks/llamacpp_run.py --data /tmp/llamacpp-bench [--threads 2]

For every setting directory benchmarks/llamacpp_ref.py wrote: load its GGUF with ``llama_cpp.Llama``, feed the
saved token ids (no BOS, no tokenization: the same windows our perplexity reads), take llama.cpp's logits for
every position, and compare them with the in-memory model's: the largest absolute logit difference over the kept
positions of window 0, how often the two agree on the most likely next token there, and the perplexity of each
over all windows. llama.cpp quantizes activations to 8 bits inside its quantized matmuls (Q8_0/Q8_1 dot products
on CPU), so the logits differ by that rounding even when the weights are bit-exact; the perplexity says how much
it costs. Prints a JSON line per setting, then the table for README.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
from llama_cpp import Llama


def log_softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def window_logits(llm: Llama, window: np.ndarray) -> np.ndarray:
    llm.reset()
    llm.eval([int(t) for t in window])
    return np.asarray(llm.scores[: len(window)], dtype=np.float64)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    windows = np.load(args.data / "windows.npy")
    rows = []
    for reference_file in sorted(args.data.glob("*/reference.json")):
        reference = json.loads(reference_file.read_text())
        ours = np.load(reference_file.parent / "logits.npy").astype(np.float64)
        start = time.perf_counter()
        llm = Llama(model_path=str(reference_file.parent / reference["gguf"]), n_ctx=windows.shape[1],
                    n_batch=windows.shape[1], logits_all=True, n_threads=args.threads, verbose=False)
        load_seconds = time.perf_counter() - start
        nll, count = 0.0, 0
        start = time.perf_counter()
        for index, window in enumerate(windows):
            logits = window_logits(llm, window)
            picked = log_softmax(logits[:-1])[np.arange(len(window) - 1), window[1:]]
            nll -= float(picked.sum())
            count += len(window) - 1
            if index == 0:
                theirs = logits[: len(ours)]
                diff = np.abs(theirs - ours)
                agree = float((theirs.argmax(-1) == ours.argmax(-1)).mean())
        row = {"setting": reference["setting"], "gguf": reference["gguf"], "mib": round(reference["bytes"] / 2**20, 1),
               "layers": reference["layers"], "ppl_ours": round(reference["ppl"], 3),
               "ppl_llamacpp": round(float(np.exp(nll / count)), 3), "max_abs_logit_diff": round(float(diff.max()), 4),
               "mean_abs_logit_diff": round(float(diff.mean()), 5), "top1_agreement": round(agree, 4),
               "logit_range": round(float(np.abs(ours).max()), 2), "load_seconds": round(load_seconds, 2),
               "eval_seconds": round(time.perf_counter() - start, 1), "tokens": int(windows.size)}
        rows.append(row)
        print(json.dumps(row), flush=True)
        del llm
    import llama_cpp

    print(json.dumps({"llama_cpp_python": llama_cpp.__version__, "threads": args.threads, "rows": rows}, indent=2))
    print("\n| GGUF (setting) | MiB | layers | ppl, our in-memory model | ppl, llama.cpp | max / mean abs logit diff "
          "| top-1 agreement |")
    print("|---|---|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['gguf']} ({row['setting']}) | {row['mib']} | {row['layers']} | {row['ppl_ours']} | "
              f"{row['ppl_llamacpp']} | {row['max_abs_logit_diff']} / {row['mean_abs_logit_diff']} | "
              f"{row['top1_agreement']:.1%} |")


if __name__ == "__main__":
    main()
