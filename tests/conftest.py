"""Shared fixtures: an offline tokenizer, local text, saved tiny model directories, a CLI runner."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from tiny import VOCAB, make_text, tiny_model
from transformers import PreTrainedTokenizerFast
from typer.testing import CliRunner


@pytest.fixture
def runner() -> CliRunner:
    return CliRunner(env={"COLUMNS": "120", "NO_COLOR": "1"})


@pytest.fixture(scope="session")
def tiny_tokenizer() -> PreTrainedTokenizerFast:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB - 8, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([make_text(3000, seed) for seed in range(5)], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|endoftext|>",
                                   unk_token="<|endoftext|>")


@pytest.fixture(scope="session")
def text_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("text") / "calib.txt"
    path.write_text("\n\n".join(make_text(400, seed) for seed in range(20)))
    return path


@pytest.fixture(scope="session")
def bf16_dir(tmp_path_factory: pytest.TempPathFactory, tiny_tokenizer: PreTrainedTokenizerFast) -> Path:
    """A tiny Llama checkpoint stored in bfloat16 (with the tokenizer), for the dtype tests."""
    path = tmp_path_factory.mktemp("tiny-bf16")
    tiny_model("llama").to(torch.bfloat16).save_pretrained(path)
    tiny_tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def model_dir_factory(tmp_path_factory: pytest.TempPathFactory, tiny_tokenizer: PreTrainedTokenizerFast
                      ) -> Callable[[str], Path]:
    """Save a tiny model of a family (with the tokenizer) once per session; returns its directory."""
    made: dict[str, Path] = {}

    def make(family: str = "llama") -> Path:
        if family not in made:
            path = tmp_path_factory.mktemp(f"tiny-{family}")
            tiny_model(family).save_pretrained(path)
            tiny_tokenizer.save_pretrained(path)
            made[family] = path
        return made[family]

    return make
