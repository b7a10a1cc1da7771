"""A linear layer that runs INT8 x INT8 -> INT32: the in-memory form of DGQ (W4A8) and W8A8 models.

It holds the weight as INT8 (INT4 codes already multiplied by their integer group scales) with one float scale
per output channel, quantizes each input token to INT8 (``dgq_ops.quantize_activations``), multiplies INT8 x INT8
-> INT32 (``int8_matmul``: ``torch._int_mm`` where it is fast, exact float32 chunks elsewhere) and rescales by
``token_scale * channel_scale``. It is an ``nn.Linear`` whose ``weight``
parameter is the dequantized float weight: the state dict is a plain linear's (a dense save writes the
dual-grained weights exactly, without the activation quantization), and code that reads ``.weight`` sees what
the INT8 path multiplies. The INT8 tensors are non-persistent buffers rebuilt from the integer form; the integer
group scales are kept too (``dual_grained``), so the compressor-int8 directory stores the two levels apart.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from compressor.methods.quant.dgq_ops import DualGrainedWeight, quantize_activations

#: Inner-dimension chunk of the float path: a sum of 1024 products of INT8 values stays within 2**24 in magnitude,
#: where float32 still holds every integer, so each chunk's float32 matmul is exact.
FLOAT_EXACT_CHUNK = 1024


def int8_matmul(a: torch.Tensor, b: torch.Tensor, backend: str = "auto") -> torch.Tensor:
    """``a: [n, k]`` int8 times ``b: [k, m]`` int8 -> ``[n, m]`` int32, exactly, whichever ``backend`` runs it.

    ``int_mm``: ``torch._int_mm``; on CPU (torch 2.13) it takes any shape, transposed views included, but on a
    CPU without AVX-512 it is far slower than float32 (64x2048x2048 on this project's AVX2 machine, one thread:
    422 ms against 30 ms). On CUDA it needs ``n > 16`` and ``k``, ``m`` multiples of 8, else the float path runs.
    ``float``: float32 matmuls over chunks of 1024 inputs, each exact, summed in int32: bit-identical results.
    ``auto``: ``int_mm`` on CUDA when the shapes fit and on AVX-512 CPUs, ``float`` otherwise.
    """
    n, k = a.shape
    m = b.shape[1]
    if backend == "auto":
        if a.device.type == "cuda":
            backend = "int_mm" if n > 16 and k % 8 == 0 and m % 8 == 0 else "float"
        else:
            backend = "int_mm" if torch.backends.cpu.get_cpu_capability().startswith("AVX512") else "float"
    if backend == "int_mm":
        return torch._int_mm(a, b)
    if backend != "float":
        raise ValueError(f"backend must be auto, int_mm or float, got {backend!r}")
    out = torch.zeros(n, m, dtype=torch.int32, device=a.device)
    for start in range(0, k, FLOAT_EXACT_CHUNK):
        chunk = slice(start, start + FLOAT_EXACT_CHUNK)
        out += (a[:, chunk].float() @ b[chunk].float()).to(torch.int32)
    return out


class Int8Linear(nn.Linear):
    """``y = (Q(x) @ W8^T) * x_scale * channel_scale + bias`` with ``Q`` per-token INT8 (``act_percentile`` clip).

    Buffers: ``weight_int8: [out, in]`` int8, ``channel_scale: [out]`` float32, ``int_scale: [out, n_groups]``
    int16 (the integer group scales ``weight_int8`` already holds; ``bits`` and ``group_size`` say how to split
    them off again). ``quantize_inputs`` False makes it a plain linear on the dequantized weight (see
    :func:`float_activations`).
    """

    weight_int8: torch.Tensor
    channel_scale: torch.Tensor
    int_scale: torch.Tensor

    def __init__(self, weight: DualGrainedWeight, bias: torch.Tensor | None, act_percentile: float = 100.0,
                 dtype: torch.dtype = torch.float32) -> None:
        out_features, in_features = weight.codes.shape
        super().__init__(in_features, out_features, bias=bias is not None, device="meta")
        device = weight.codes.device
        self.weight = nn.Parameter(weight.dequantize(dtype), requires_grad=False)
        if bias is not None:
            self.bias = nn.Parameter(bias.detach().clone(), requires_grad=False)
        self.register_buffer("weight_int8", weight.int8_weight().to(device), persistent=False)
        self.register_buffer("channel_scale", weight.channel_scale.float().to(device), persistent=False)
        self.register_buffer("int_scale", weight.int_scale.to(torch.int16).to(device), persistent=False)
        self.bits, self.group_size = weight.bits, weight.group_size
        self.act_percentile = act_percentile
        self.quantize_inputs = True

    @classmethod
    def from_linear(cls, linear: nn.Linear, weight: DualGrainedWeight, act_percentile: float = 100.0) -> Int8Linear:
        """Replace ``linear``'s weight by ``weight`` (its bias and dtype kept)."""
        return cls(weight, None if linear.bias is None else linear.bias.data, act_percentile, linear.weight.dtype)

    def dual_grained(self) -> DualGrainedWeight:
        """The integer form this layer multiplies: codes ``weight_int8 / int_scale`` (exact), both scales."""
        weight = DualGrainedWeight(self.weight_int8, self.int_scale, self.channel_scale, self.bits, self.group_size)
        codes = self.weight_int8.to(torch.int16) // weight.column_int_scale()
        return DualGrainedWeight(codes.to(torch.int8), self.int_scale.clone(), self.channel_scale.clone(), self.bits,
                                 self.group_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.quantize_inputs:
            return nn.functional.linear(x, self.weight, self.bias)
        rows = x.reshape(-1, self.in_features)
        codes, token_scale = quantize_activations(rows, self.act_percentile)
        acc = int8_matmul(codes, self.weight_int8.t())
        out = acc.float() * token_scale * self.channel_scale
        if self.bias is not None:
            out = out + self.bias.float()
        return out.to(x.dtype).reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, int8 activations (percentile {self.act_percentile:g})"


@contextmanager
def float_activations(model: nn.Module) -> Iterator[None]:
    """Run every :class:`Int8Linear` of ``model`` in float on its dequantized weight for the block.

    What a dense export of the model computes once reloaded (it stores the weights, not the activation
    quantization); the previous setting of each module is restored afterwards.
    """
    modules = [m for m in model.modules() if isinstance(m, Int8Linear)]
    saved = [m.quantize_inputs for m in modules]
    for module in modules:
        module.quantize_inputs = False
    try:
        yield
    finally:
        for module, value in zip(modules, saved, strict=True):
            module.quantize_inputs = value
