"""Perplexity over non-overlapping windows of held-out text, streamed window by window.

Every model compared is scored with the same tokenizer, windows and token budget, so numbers from one
``eval`` call are comparable with those from another.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from compressor.errors import CalibrationError


@dataclass
class PerplexityResult:
    ppl: float
    nll: float
    tokens: int
    windows: int
    seq_len: int
    seconds: float

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "tokens_per_second": self.tokens_per_second}


def window_nll(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """Summed next-token negative log-likelihood of ``tokens: [B, L]`` given ``logits: [B, L, V]``."""
    return F.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]).float(), tokens[:, 1:].reshape(-1), reduction="sum"
    )


@torch.no_grad()
def perplexity(
    model: nn.Module,
    windows: Iterable[torch.Tensor],
    device: torch.device,
    batch_size: int = 1,
    progress: Callable[[int], None] | None = None,
) -> PerplexityResult:
    """exp(mean NLL) over every predicted token of every window (``L - 1`` per window of ``L``)."""
    start = time.perf_counter()
    total_nll, total_tokens, count, seq_len = 0.0, 0, 0, 0
    batch: list[torch.Tensor] = []

    def flush() -> None:
        nonlocal total_nll, total_tokens, count
        tokens = torch.stack(batch).to(device)
        logits = model(input_ids=tokens, use_cache=False).logits
        total_nll += float(window_nll(logits, tokens))
        total_tokens += tokens.shape[0] * (tokens.shape[1] - 1)
        count += tokens.shape[0]
        batch.clear()
        if progress:
            progress(count)

    for window in windows:
        seq_len = int(window.shape[-1])
        batch.append(window)
        if len(batch) == batch_size:
            flush()
    if batch:
        flush()
    if total_tokens == 0:
        raise CalibrationError("evaluation data produced no full window of tokens")
    nll = total_nll / total_tokens
    return PerplexityResult(
        ppl=math.exp(nll), nll=nll, tokens=total_tokens + count, windows=count, seq_len=seq_len,
        seconds=time.perf_counter() - start,
    )
