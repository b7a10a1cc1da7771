"""Tests for compressor.calibration.tokens with a tiny word-level tokenizer built in memory (no download)."""

from __future__ import annotations

import itertools
import json
import logging
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

from compressor.calibration import tokens
from compressor.calibration.tokens import calibration_batch, iter_eval_windows
from compressor.errors import CalibrationError

WORDS = [f"w{i}" for i in range(200)]
EOS = 1


def _tokenizer(eos: bool = True) -> PreTrainedTokenizerFast:
    """Word-level: `w{i}` has id i + 3; `[UNK]`=0, `</s>`=1, `<s>`=2. A BOS post-processor is attached so the
    tests show it is not applied (documents are tokenized without special tokens)."""
    vocab = {"[UNK]": 0, "</s>": 1, "<s>": 2} | {word: i + 3 for i, word in enumerate(WORDS)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 2)])
    extra = {"eos_token": "</s>"} if eos else {}
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]", bos_token="<s>", **extra)


def _ids(words: str) -> list[int]:
    return [int(word[1:]) + 3 for word in words.split()]


def _write_docs(path: Path, documents: list[str]) -> str:
    path.write_text("".join(json.dumps({"text": document}) + "\n" for document in documents))
    return str(path)


@pytest.fixture()
def corpus(tmp_path: Path) -> tuple[str, list[int]]:
    """Ten documents of 3..12 distinct words, and the exact token stream expected from them."""
    documents, stream, word = [], [], iter(WORDS)
    for size in range(3, 13):
        document = " ".join(itertools.islice(word, size))
        documents.append(document)
        stream += ([EOS] if stream else []) + _ids(document)
    return _write_docs(tmp_path / "docs.jsonl", documents), stream


def _infinite_documents(*_args: object) -> Iterator[str]:
    for i in itertools.count():
        yield f"w{i % 200} w{(i + 1) % 200}"


# --- evaluation windows ---------------------------------------------------------------------------------------


def test_eval_windows_are_consecutive_slices_joined_by_eos(corpus: tuple[str, list[int]]) -> None:
    source, stream = corpus
    windows = list(iter_eval_windows(_tokenizer(), source, 8, None))
    assert len(windows) == len(stream) // 8  # the partial tail window is dropped
    assert torch.equal(torch.cat(windows), torch.tensor(stream[: len(windows) * 8]))
    assert all(window.shape == (8,) and window.dtype == torch.long for window in windows)
    assert 2 not in torch.cat(windows)  # no BOS inside the stream


def test_eval_windows_max_tokens_rounds_down(corpus: tuple[str, list[int]]) -> None:
    source, stream = corpus
    windows = list(iter_eval_windows(_tokenizer(), source, 8, max_tokens=30))
    assert len(windows) == 3
    assert torch.equal(torch.cat(windows), torch.tensor(stream[:24]))


def test_eval_windows_without_eos_concatenate(corpus: tuple[str, list[int]]) -> None:
    source, stream = corpus
    windows = list(iter_eval_windows(_tokenizer(eos=False), source, 5, None))
    plain = [token for token in stream if token != EOS]
    assert torch.equal(torch.cat(windows), torch.tensor(plain[: len(windows) * 5]))


def test_eval_windows_stop_reading_an_endless_source(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tokens, "iter_documents", _infinite_documents)
    windows = list(iter_eval_windows(_tokenizer(), "endless", 16, max_tokens=100))
    assert len(windows) == 6


def test_eval_windows_errors(corpus: tuple[str, list[int]], tmp_path: Path) -> None:
    source, _ = corpus
    with pytest.raises(CalibrationError, match="max_tokens=4 is smaller than seq_len=8"):
        iter_eval_windows(_tokenizer(), source, 8, max_tokens=4)
    with pytest.raises(CalibrationError, match="seq_len must be an integer >= 2"):
        iter_eval_windows(_tokenizer(), source, 1, None)
    short = _write_docs(tmp_path / "short.jsonl", ["w1 w2 w3"])
    with pytest.raises(CalibrationError, match=r"only 3 tokens, fewer than seq_len=8.*--seq-len"):
        list(iter_eval_windows(_tokenizer(), short, 8, None))


# --- calibration batch ----------------------------------------------------------------------------------------


def test_calibration_batch_picks_distinct_aligned_windows(corpus: tuple[str, list[int]]) -> None:
    source, stream = corpus
    batch = calibration_batch(_tokenizer(), source, samples=4, seq_len=10, seed=0)
    assert batch.shape == (4, 10) and batch.dtype == torch.long
    aligned = [stream[i : i + 10] for i in range(0, len(stream) - 9, 10)]
    rows = batch.tolist()
    assert all(row in aligned for row in rows)
    assert len({tuple(row) for row in rows}) == 4


def test_calibration_batch_is_deterministic_per_seed(corpus: tuple[str, list[int]]) -> None:
    source, _ = corpus
    first = calibration_batch(_tokenizer(), source, 4, 10, seed=123)
    assert torch.equal(first, calibration_batch(_tokenizer(), source, 4, 10, seed=123))
    assert not torch.equal(first, calibration_batch(_tokenizer(), source, 4, 10, seed=124))


def test_calibration_batch_overlaps_with_a_warning_when_short(
    corpus: tuple[str, list[int]], caplog: pytest.LogCaptureFixture
) -> None:
    source, stream = corpus
    with caplog.at_level(logging.WARNING, logger="compressor.calibration.tokens"):
        batch = calibration_batch(_tokenizer(), source, samples=20, seq_len=16, seed=0)
    assert batch.shape == (20, 16)
    assert "overlap" in caplog.text
    slices = {tuple(stream[i : i + 16]) for i in range(len(stream) - 15)}
    assert all(tuple(row) in slices for row in batch.tolist())
    again = calibration_batch(_tokenizer(), source, samples=20, seq_len=16, seed=0)
    assert torch.equal(batch, again)


def test_calibration_batch_stops_reading_an_endless_source(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tokens, "iter_documents", _infinite_documents)
    batch = calibration_batch(_tokenizer(), "endless", samples=8, seq_len=32, seed=0)
    assert batch.shape == (8, 32)


def test_calibration_batch_too_short(tmp_path: Path) -> None:
    source = _write_docs(tmp_path / "short.jsonl", ["w1 w2", "w3"])
    with pytest.raises(
        CalibrationError, match=r"has only 4 tokens, fewer than seq_len=64.*--seq-len"
    ) as info:
        calibration_batch(_tokenizer(), source, samples=2, seq_len=64, seed=0)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(("samples", "seq_len"), [(0, 8), (-1, 8), (2, 1), (2, 0), (True, 8), (2, 8.0)])
def test_calibration_batch_validates_sizes(corpus: tuple[str, list[int]], samples: int, seq_len: int) -> None:
    source, _ = corpus
    with pytest.raises(CalibrationError, match="must be an integer"):
        calibration_batch(_tokenizer(), source, samples=samples, seq_len=seq_len, seed=0)


def test_missing_source_fails_before_tokenizing(tmp_path: Path) -> None:
    with pytest.raises(CalibrationError, match="does not exist"):
        iter_eval_windows(_tokenizer(), str(tmp_path / "nope.txt"), 8, None)
