"""Streamed perplexity: the evaluation windows go through the decoder one layer at a time, read from disk.

:func:`compressor.evaluate.perplexity.perplexity` runs each window through the whole resident model. Here the
model is a meta skeleton (:func:`compressor.streaming.layers.load_skeleton`) and the order is turned around:

1. the embeddings (and rotary modules) are loaded, the engine's capture
   (:func:`~compressor.calibration.capture.capture_inputs`) records what the model's own forward hands each decoder
   layer for every window (hidden input of layer 0, each layer's mask and position embeddings), and the embeddings
   go back to meta;
2. each decoder layer is read from the checkpoint, every window's hidden states go through it, and it goes back
   to meta: one layer resident at a time, the windows' hidden states (``windows x seq_len x hidden`` in the model
   dtype) the only thing that lives across layers;
3. the modules after the last layer (final norm, OPT's projection) and the head are read once, and each window's
   summed next-token NLL is computed from logits made ``chunk_rows`` positions at a time, so the logits never take
   more than ``chunk_rows x vocab`` floats.

Each window sees the very operations the in-RAM forward runs, in the same order, with the same kwargs, so the
NLL of a window scored in one chunk is bit for bit the in-RAM one (tested). With several chunks the window's sum
is accumulated chunk by chunk instead of in one reduction: a float-order difference of ~1e-7 relative.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from compressor.errors import CalibrationError
from compressor.evaluate.perplexity import PerplexityResult, window_nll
from compressor.streaming.layers import Checkpoint, load_layer, load_skeleton
from compressor.streaming.packed import PackedCheckpoint, quantization_config

#: Logit floats one chunk of positions may take (64 MiB in float32): a 128k vocabulary gets 128 positions a chunk.
LOGIT_CHUNK_FLOATS = 16 * 2**20


def open_checkpoint(directory: Path) -> Checkpoint:
    """A reader for a dense checkpoint, or for a compressed-tensors output (its linears dequantized on read)."""
    quant = quantization_config(directory)
    return Checkpoint(directory) if quant is None else PackedCheckpoint(directory, quant)


@torch.no_grad()
def streamed_perplexity(
    directory: Path,
    data: str,
    *,
    seq_len: int,
    max_tokens: int | None,
    device: torch.device,
    dtype: str = "auto",
    text_field: str | None = None,
    progress: Callable[[int], None] | None = None,
    chunk_rows: int | None = None,
) -> PerplexityResult:
    """exp(mean NLL) of the model in ``directory`` over the same windows as the in-RAM ``evaluate`` (module doc).

    ``progress(layers_done)`` is called after each decoder layer. ``chunk_rows`` (default: what fits
    :data:`LOGIT_CHUNK_FLOATS`) bounds the positions whose logits exist at once.
    """
    from compressor.calibration.capture import capture_inputs
    from compressor.calibration.tokens import iter_eval_windows
    from compressor.models import get_adapter

    start = time.perf_counter()
    loaded, checkpoint = load_skeleton(directory, dtype, open_checkpoint(directory))
    model, adapter = loaded.model, get_adapter(loaded.model)
    limit = adapter.max_positions
    if limit is not None and seq_len > limit:
        raise CalibrationError(f"seq_len {seq_len} is longer than the model allows ({limit} positions)")
    windows = list(iter_eval_windows(loaded.tokenizer, data, seq_len, max_tokens, text_field=text_field))
    if not windows:
        raise CalibrationError("evaluation data produced no full window of tokens")
    for module in adapter.before_layers():
        module.to(device)
    captured = capture_inputs(model, adapter, (w[None].to(device) for w in windows))
    for module in adapter.embeddings():  # released: only the layer being run and the hidden states stay
        module.to("meta")
    hidden = captured.hidden
    for index in range(len(adapter.layers())):
        layer = load_layer(adapter, checkpoint, index).to(device)
        for number, kwargs in enumerate(captured.kwargs[index]):
            out = layer(hidden[number], **kwargs)
            hidden[number] = out[0] if isinstance(out, tuple) else out
        layer.to("meta")
        if progress:
            progress(index + 1)
    total = 0.0
    with _head_loaded(model, adapter, checkpoint, device):
        vocab = adapter.lm_head().out_features
        rows = chunk_rows or max(1, LOGIT_CHUNK_FLOATS // vocab)
        for states, tokens in zip(hidden, windows, strict=True):
            total += _window_nll(adapter, states, tokens[None].to(device), rows)
    count = len(windows) * (seq_len - 1)
    nll = total / count
    return PerplexityResult(ppl=math.exp(nll), nll=nll, tokens=count + len(windows), windows=len(windows),
                            seq_len=seq_len, seconds=time.perf_counter() - start)


def _window_nll(adapter: Any, states: torch.Tensor, tokens: torch.Tensor, rows: int) -> float:
    """Summed NLL of one window ``tokens: [1, L]`` from the last layer's output ``states: [1, L, H]``.

    Position ``i``'s logits predict token ``i + 1``; a chunk of positions ``a..b`` takes one extra token so
    :func:`window_nll` (which drops the last position) scores exactly positions ``a..b-1`` of the window.
    """
    length = tokens.shape[1]
    if rows >= length:
        return float(window_nll(adapter.logits(states), tokens))
    total = 0.0
    for a in range(0, length - 1, rows):
        b = min(a + rows, length - 1)
        logits = adapter.logits(states[:, a : b + 1])
        total += float(window_nll(logits, tokens[:, a : b + 1]))
    return total


class _head_loaded:  # noqa: N801 - used as a context manager, named like one
    """The modules after the last layer and the head, read from the checkpoint for the scoring, then meta again."""

    def __init__(self, model: Any, adapter: Any, checkpoint: Checkpoint, device: torch.device) -> None:
        self.model, self.modules, self.device = model, [*adapter.after_layers(), adapter.lm_head()], device
        self.checkpoint = checkpoint
        names = {id(m): path for path, m in model.named_modules()}
        self.embedding = f"{names[id(model.get_input_embeddings())]}.weight"
        self.paths = [names[id(m)] for m in self.modules]

    def __enter__(self) -> None:
        for path, module in zip(self.paths, self.modules, strict=True):
            state = {name: self._read(f"{path}.{name}", t.dtype) for name, t in module.state_dict().items()}
            module.load_state_dict(state, strict=True, assign=True)
            module.to(self.device)

    def _read(self, name: str, dtype: torch.dtype) -> torch.Tensor:
        if not self.checkpoint.has(name):  # a tied head is stored as the input embeddings
            name = self.embedding
        return self.checkpoint.read(name, dtype)

    def __exit__(self, *exc: object) -> None:
        for module in self.modules:
            module.to("meta")

