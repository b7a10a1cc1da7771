"""Documents to token windows: the seeded calibration batch and the streaming evaluation windows.

Both views read the same token stream (documents tokenized without special tokens, joined by the
tokenizer's EOS id), so calibration and perplexity see text the same way a model saw its pre-training
data, and the stream is only read as far as it is needed.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from itertools import islice
from typing import TYPE_CHECKING

import torch

from compressor.calibration.sources import iter_documents
from compressor.errors import CalibrationError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

__all__ = ["calibration_batch", "iter_eval_windows"]

logger = logging.getLogger(__name__)

_DOCS_PER_CALL = 32  # documents per tokenizer call: batching lets the Rust tokenizer use its threads
_READ_AHEAD = 2  # calibration reads this many times samples * seq_len tokens before choosing windows


def calibration_batch(
    tokenizer: PreTrainedTokenizerBase,
    source: str,
    samples: int,
    seq_len: int,
    seed: int,
    text_field: str | None = None,
    notes: list[str] | None = None,
) -> torch.Tensor:
    """Draw `samples` windows of `seq_len` tokens from SOURCE, the same ones for the same seed.

    Returns a `torch.long` tensor `[samples, seq_len]`. When the stream holds enough tokens the windows are
    distinct, non-overlapping, aligned slices chosen by a seeded permutation; when it does not, starts are
    drawn at random and windows overlap (a warning says so), since a small calibration set still beats
    failing. Reading stops after `2 * samples * seq_len` tokens, so a huge source costs no more than that.
    Documents shorter than `seq_len` are packed: a window runs across them, EOS between them, never padded (so
    every token is real text and no attention mask is needed). Real corpora are mostly such documents, so this is
    normal, logged at info level, and said in `notes` (the report's calibration section) when given; so are
    overlapping windows.
    """
    _check_positive("samples", samples, 1)
    _check_positive("seq_len", seq_len, 2)
    needed = samples * seq_len
    lengths: list[int] = []
    stream = _read_tokens(tokenizer, source, text_field, limit=_READ_AHEAD * needed, lengths=lengths)
    total = stream.numel()
    note = packing_note(lengths, seq_len, tokenizer.eos_token_id is not None)
    if note:
        logger.info("calibration source %r: %s", source, note)
        if notes is not None:
            notes.append(note)
    if total < seq_len:
        raise CalibrationError(
            f"calibration source {source!r} has only {total} tokens, fewer than seq_len={seq_len} for one window "
            f"({needed} for {samples} independent windows); use a smaller --seq-len or more text"
        )
    generator = torch.Generator().manual_seed(seed)
    if total >= needed:
        windows = stream[: (total // seq_len) * seq_len].view(-1, seq_len)
        chosen = torch.randperm(windows.shape[0], generator=generator)[:samples]
        return windows[chosen]
    overlap = (f"{total} tokens, fewer than samples*seq_len={needed}: the {samples} windows overlap; use more text "
               "or fewer samples for independent windows")
    logger.warning("calibration source %r has %s", source, overlap)
    if notes is not None:
        notes.append(overlap)
    starts = torch.randint(0, total - seq_len + 1, (samples,), generator=generator)
    return stream[starts.unsqueeze(1) + torch.arange(seq_len)]


def iter_eval_windows(
    tokenizer: PreTrainedTokenizerBase,
    source: str,
    seq_len: int,
    max_tokens: int | None,
    text_field: str | None = None,
) -> Iterator[torch.Tensor]:
    """Yield consecutive, non-overlapping `torch.long` windows `[seq_len]` of SOURCE in document order.

    Perplexity must compare models on exactly the same tokens, so nothing here is random; the final partial
    window is dropped. `max_tokens` (rounded down to whole windows) caps the evaluation cost; None reads the
    whole source. The source and the arguments are checked now; tokens are read lazily as windows are used.
    """
    _check_positive("seq_len", seq_len, 2)
    if max_tokens is not None and max_tokens < seq_len:
        raise CalibrationError(
            f"max_tokens={max_tokens} is smaller than seq_len={seq_len}, so no window fits; "
            "raise the token limit or lower --seq-len"
        )
    limit = None if max_tokens is None else max_tokens // seq_len
    chunks = _token_chunks(tokenizer, iter_documents(source, text_field))
    return _windows(chunks, seq_len, limit, source)


def _windows(
    chunks: Iterator[list[int]], seq_len: int, limit: int | None, source: str
) -> Iterator[torch.Tensor]:
    """Cut a stream of token chunks into at most `limit` whole windows, holding one window plus one chunk."""
    buffer: list[int] = []
    emitted = 0
    for chunk in chunks:
        buffer.extend(chunk)
        start = 0
        while len(buffer) - start >= seq_len:
            yield torch.tensor(buffer[start : start + seq_len], dtype=torch.long)
            emitted += 1
            start += seq_len
            if emitted == limit:
                return
        del buffer[:start]
    if not emitted:
        raise CalibrationError(
            f"evaluation source {source!r} has only {len(buffer)} tokens, fewer than seq_len={seq_len}; "
            "use a smaller --seq-len or more text"
        )


def packing_note(lengths: list[int], seq_len: int, eos: bool) -> str:
    """What the report says when documents (token counts `lengths`) are shorter than a window; "" when none is."""
    short = sorted(length for length in lengths if length < seq_len)
    if not short:
        return ""
    joined = "with EOS between them" if eos else "joined directly (the tokenizer has no EOS token)"
    return (f"{len(short)} of {len(lengths)} documents read are shorter than seq_len={seq_len} (median "
            f"{short[len(short) // 2]} tokens): packed end to end into full windows, {joined}, no padding")


def _read_tokens(
    tokenizer: PreTrainedTokenizerBase, source: str, text_field: str | None, limit: int,
    lengths: list[int] | None = None,
) -> torch.Tensor:
    """At least `limit` tokens of SOURCE (all, if it is shorter) as a 1-D `torch.long` tensor.

    `lengths`, when given, receives each document's token count (without the separator) as it is read.
    """
    ids: list[int] = []
    for chunk in _token_chunks(tokenizer, iter_documents(source, text_field), lengths):
        ids.extend(chunk)
        if len(ids) >= limit:
            break  # the abandoned generators close their files when released
    logger.info("read %d tokens from %r", len(ids), source)
    return torch.tensor(ids, dtype=torch.long)


def _token_chunks(
    tokenizer: PreTrainedTokenizerBase, documents: Iterator[str], lengths: list[int] | None = None
) -> Iterator[list[int]]:
    """Tokenize documents a few at a time into one stream, with the EOS id between documents (if any).

    Special tokens are not added per document: a BOS in the middle of the stream is not what a model sees
    in running text. Without an EOS token documents are simply concatenated.
    """
    eos = tokenizer.eos_token_id
    separator = [] if eos is None else [int(eos)]
    first = True
    while batch := list(islice(documents, _DOCS_PER_CALL)):
        encoded = tokenizer(batch, add_special_tokens=False, verbose=False)["input_ids"]
        chunk: list[int] = []
        for ids in encoded:
            chunk.extend(ids if first else separator + ids)
            if lengths is not None:
                lengths.append(len(ids))
            first = False
        yield chunk


def _check_positive(name: str, value: int, minimum: int) -> None:
    """Reject impossible sizes up front, naming the argument, before any text is read."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise CalibrationError(f"{name} must be an integer >= {minimum}, got {value!r}")
