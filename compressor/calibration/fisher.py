"""How much the calibration loss cares about each output channel of each linear: ``E[(dL/dy_o)^2]``.

The layer-local proxy ``tr(dW H dW^T)`` says how far a module's output moves, not how much the final
loss minds: on SmolLM2 a global allocation by relative output error lost to uniform widths. A second-
order Taylor expansion of the loss in a module's output ``y`` with the empirical Fisher (the squared
gradient, as SqueezeLLM uses for weights) as its Hessian, kept diagonal over output channels and taken
independent of the inputs, gives ``dL ~ 1/2 sum_o F_o (dW_o H dW_o^T)`` with ``F_o = mean_t g_to^2``:
the channel-weighted sensitivity with weights ``F_o`` (BAQ's ``objective: fisher``, BitStack's ``order: fisher``).

It costs one forward and backward pass of the whole model over the calibration tokens, a sequence at a
time, with the whole model and one sequence's activations in memory (parameters get no gradients):
fine for models that fit where they are, which the layer-wise passes do not otherwise need.

Under torchrun each process runs its own share of the batches; the float64 sums of squared gradients and the
token count are all-reduced before dividing, so every process gets the whole set's mean (a sequence's gradients
do not depend on the others, and the sums are the same additions, grouped by process).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from compressor.distributed import all_reduce_sum_float64, failures_elsewhere, is_distributed
from compressor.errors import CompressorError


def output_fisher(model: Any, batches: Iterable[torch.Tensor], paths: set[str]) -> dict[str, torch.Tensor]:
    """``{path: [out] float64}``: the mean over calibration tokens of the squared gradient of the summed
    next-token loss with respect to every output channel of the linears named by ``paths``."""
    modules = {name: m for name, m in model.named_modules() if name in paths and isinstance(m, nn.Linear)}
    missing = paths - set(modules)
    if missing:
        raise ValueError(f"fisher: no linear named {sorted(missing)[0]!r} in the model")
    sums: dict[str, torch.Tensor] = {}
    count = 0

    def watch(name: str) -> Any:
        def hook(_module: nn.Module, _inputs: Any, output: torch.Tensor) -> None:
            if output.requires_grad:
                output.register_hook(lambda grad: _accumulate(name, grad))
        return hook

    def _accumulate(name: str, grad: torch.Tensor) -> None:
        squared = grad.detach().double().pow(2).reshape(-1, grad.shape[-1]).sum(dim=0).cpu()
        sums[name] = sums[name] + squared if name in sums else squared

    def start_graph(_module: nn.Module, _inputs: Any, output: torch.Tensor) -> torch.Tensor:
        return output.detach().requires_grad_(True)  # the graph starts here; no parameter needs a gradient

    flags = [(p, p.requires_grad) for p in model.parameters()]
    handles = [m.register_forward_hook(watch(name)) for name, m in modules.items()]
    handles.append(model.get_input_embeddings().register_forward_hook(start_graph))
    was_training = model.training
    device = model.get_input_embeddings().weight.device  # where the model is; the layer passes move layers
    failure: Exception | None = None
    try:
        for p, _ in flags:
            p.requires_grad_(False)
        model.eval()
        with torch.enable_grad():
            for batch in batches:
                # one sequence's activations and logits in memory at a time
                for sequence in batch.to(device).split(1):
                    out = model(input_ids=sequence, labels=sequence, use_cache=False)
                    (out.loss * (sequence.shape[1] - 1)).backward()  # the summed loss: each token counts once
                    count += sequence.numel()
    except Exception as exc:
        if not is_distributed():
            raise
        failure = exc  # raised once the others know: they would otherwise wait in the all-reduce for this one
    finally:
        for handle in handles:
            handle.remove()
        for p, flag in flags:
            p.requires_grad_(flag)
        model.train(was_training)
    totals = [sums.get(name, torch.zeros(m.out_features, dtype=torch.float64)) for name, m in modules.items()]
    if is_distributed():
        count = _over_all_processes(totals, count, failure)
    return {name: total / max(count, 1) for name, total in zip(modules, totals, strict=True)}


def _over_all_processes(totals: list[torch.Tensor], count: int, failure: Exception | None) -> int:
    """Sum ``totals`` (in place) and ``count`` over every process; raise on every process when one failed.

    The failures are counted first (:func:`failures_elsewhere`), so no process waits for sums another will not
    send; then one all-reduce of every linear's sums and the token count, flattened together.
    """
    others = failures_elsewhere(failure is not None)
    if failure is not None:
        raise failure
    if others:
        raise CompressorError(f"fisher: the loss gradients failed on {others} other process(es); see their error")
    flat = all_reduce_sum_float64(torch.cat([*totals, torch.tensor([float(count)], dtype=torch.float64)]))
    for total, part in zip(totals, flat[:-1].split([t.numel() for t in totals]), strict=True):  # sums on the CPU
        total.copy_(part)
    return int(flat[-1].item())
