"""CPU speed and memory of the INT8 path: dense fp32, W4A16 (dequantized: what a CPU runs), W8A8 and DGQ W4A8
(``Int8Linear``: per-token INT8 inputs, INT8 x INT8 -> INT32 matmul, one float rescale), on the demo model and on
one large linear; prints JSON lines, a JSON summary and a Markdown table.

    python benchmarks/int8_speed.py [--model demo:smollm2] [--tokens 512] [--linear-tokens 64]
        [--backends auto,int_mm,float] [--repeats 5] [--threads 1]

Speed: tokens/s of one forward over ``--tokens`` tokens (best of ``--repeats`` after a warm-up). Memory: bytes of
the linear weights each form must hold to run (fp32: the float weight; Int8Linear: its int8 weight and channel
scales; the float copy it also keeps for ``.weight`` readers is reported apart as "float copy MB"). The weights are
rounded without calibration (speed does not depend on their values). ``--backends`` picks ``int8_matmul``'s
kernel: ``int_mm`` is ``torch._int_mm`` (fast only on AVX-512 CPUs), ``float`` exact float32 chunks, ``auto``
chooses by CPU.
"""

from __future__ import annotations

import argparse
import copy
import functools
import json
import time
from typing import Any

import torch
from torch import nn

from compressor.methods.quant import int8_linear
from compressor.methods.quant.dgq_ops import initial_scales, quantize_dual_grained
from compressor.methods.quant.int8_linear import Int8Linear
from compressor.methods.quant.ops import effective_group_size
from compressor.models import get_adapter
from compressor.pipeline import load
from compressor.report import peak_rss_bytes

FORMS = ("dense-fp32", "w4a16-dequantized", "w8a8", "dgq-w4a8")


def int8_form(linear: nn.Linear, bits: int, group_size: int) -> Int8Linear:
    """``linear`` as an Int8Linear with plain-fit dual-grained (or INT8 per-channel) weights."""
    W = linear.weight.data.float()
    size = -1 if bits == 8 else effective_group_size(W.shape[1], group_size)
    channel, ints = initial_scales(W, bits, size)
    return Int8Linear.from_linear(linear, quantize_dual_grained(W, channel, ints, bits, size))


def convert(model: nn.Module, form: str, group_size: int) -> nn.Module:
    """A copy of ``model`` whose decoder linears take ``form`` (W4A16 keeps float linears on 4-bit values)."""
    model = copy.deepcopy(model)
    if form == "dense-fp32":
        return model
    for layer in get_adapter(model).layers():
        for name, module in list(layer.named_modules()):
            if type(module) is not nn.Linear:
                continue
            int8 = int8_form(module, 4 if form != "w8a8" else 8, group_size)
            if form == "w4a16-dequantized":
                module.weight.data = int8.weight.data
            else:
                layer.set_submodule(name, int8)
    return model


def weight_bytes(model: nn.Module) -> tuple[int, int]:
    """(bytes the linears need to run, bytes of Int8Linears' float copies)."""
    needed = extra = 0
    for module in model.modules():
        if isinstance(module, Int8Linear):
            needed += module.weight_int8.nbytes + module.channel_scale.nbytes
            extra += module.weight.nbytes
        elif isinstance(module, nn.Linear):
            needed += module.weight.nbytes
    return needed, extra


def best_seconds(call: Any, repeats: int) -> float:
    with torch.no_grad():
        call()  # warm-up
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            call()
            times.append(time.perf_counter() - start)
    return min(times)


@functools.cache
def _original_matmul() -> Any:
    return int8_linear.int8_matmul


def set_backend(backend: str) -> None:
    """Make every Int8Linear multiply with ``backend`` (the module looks ``int8_matmul`` up at call time)."""
    int8_linear.int8_matmul = functools.partial(_original_matmul(), backend=backend)


def measure(target: str, form: str, backend: str, module: nn.Module, inputs: torch.Tensor, tokens: int,
            repeats: int) -> dict[str, Any]:
    set_backend(backend)
    seconds = best_seconds(lambda: module(inputs), repeats)
    needed, extra = weight_bytes(module)
    return {"target": target, "form": form, "backend": backend if form in ("w8a8", "dgq-w4a8") else "-",
            "tokens_per_s": round(tokens / seconds, 1), "ms": round(seconds * 1000, 2),
            "weight_mb": round(needed / 2**20, 2), "float_copy_mb": round(extra / 2**20, 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="demo:smollm2")
    parser.add_argument("--tokens", type=int, default=512, help="Sequence length of the model forward.")
    parser.add_argument("--linear-tokens", type=int, default=64, help="Tokens through the large linear.")
    parser.add_argument("--linear-shape", default="4096x11008", help="in x out of the large linear; 'none' skips.")
    parser.add_argument("--group-size", type=int, default=128)
    parser.add_argument("--backends", default="auto,int_mm,float")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    _original_matmul()
    backends = args.backends.split(",")
    rows = []
    loaded = load(args.model, dtype="float32")
    ids = torch.randint(0, loaded.model.config.vocab_size, (1, args.tokens), generator=torch.Generator().manual_seed(0))
    targets: list[tuple[str, nn.Module, torch.Tensor, int]] = [("model", loaded.model.eval(), ids, args.tokens)]
    if args.linear_shape != "none":
        columns, out = (int(v) for v in args.linear_shape.split("x"))
        big = nn.Linear(columns, out, bias=False)
        targets.append((f"linear {columns}x{out}", big, torch.randn(args.linear_tokens, columns), args.linear_tokens))
    for target, module, inputs, tokens in targets:
        for form in FORMS:
            converted = convert(module, form, args.group_size) if target == "model" else linear_form(module, form,
                                                                                                   args.group_size)
            for backend in backends if form in ("w8a8", "dgq-w4a8") else backends[:1]:
                rows.append(measure(target, form, backend, converted, inputs, tokens, args.repeats))
                print(json.dumps(rows[-1]), flush=True)
            del converted
    set_backend("auto")
    result = {"model": args.model, "tokens": args.tokens, "linear_tokens": args.linear_tokens,
              "cpu_capability": torch.backends.cpu.get_cpu_capability(), "threads": torch.get_num_threads(),
              "peak_rss_mb": round(peak_rss_bytes() / 2**20), "rows": rows}
    print(json.dumps(result, indent=2))
    print("\n| target | form | int8 backend | tokens/s | ms | weights MB (+ float copy) |\n|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['target']} | {r['form']} | {r['backend']} | {r['tokens_per_s']} | {r['ms']} | {r['weight_mb']}"
              f" (+{r['float_copy_mb']}) |")


def linear_form(linear: nn.Module, form: str, group_size: int) -> nn.Module:
    """The large linear in ``form``."""
    assert isinstance(linear, nn.Linear)
    if form == "dense-fp32":
        return linear
    int8 = int8_form(linear, 8 if form == "w8a8" else 4, group_size)
    if form == "w4a16-dequantized":
        dequantized = nn.Linear(linear.in_features, linear.out_features, bias=False)
        dequantized.weight.data = int8.weight.data
        return dequantized
    return int8


if __name__ == "__main__":
    main()
