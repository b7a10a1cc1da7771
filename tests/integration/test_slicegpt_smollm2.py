"""SliceGPT on the real SmolLM2-135M: fewer parameters than dense, bounded perplexity, an export that reloads."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from compressor.pipeline import compress, evaluate, load
from compressor.recipe import load_recipe

pytestmark = pytest.mark.slow

EVAL_TOKENS, EVAL_SEQ_LEN = 4096, 512  # as the baseline_ppl fixture


def test_shared_slicing_25pct(smollm2_dir: Path, baseline_ppl: float, tmp_path: Path) -> None:
    recipe = load_recipe("slicegpt-25pct", ["calibration.samples=16"])
    out = tmp_path / "sliced"
    report = compress(smollm2_dir, recipe, out, device="cpu")
    summary = report.structure["slicegpt"]
    assert summary["width"] == 432 and summary["shortcut_params"] == 0
    assert report.params["after"] < 0.85 * report.params["before"]  # tied embeddings stay tied: a real saving
    loaded = load(out)
    assert type(loaded.model).__name__ == "SlicedLlamaForCausalLM"
    tokens = torch.arange(100, 164).reshape(2, 32)
    with torch.no_grad():
        assert torch.isfinite(loaded.model(tokens).logits).all()
    ppl = evaluate(loaded, "demo:wiki", seq_len=EVAL_SEQ_LEN, max_tokens=EVAL_TOKENS, device="cpu").ppl
    # 25% of the stream of a 135M model costs a lot (the reference implementation: 22.7 -> 188 per_layer);
    # this guards against a broken rotation (thousands), not a quality target.
    assert baseline_ppl < ppl < 15 * baseline_ppl


def test_rotation_only_keeps_perplexity(smollm2_dir: Path, baseline_ppl: float, tmp_path: Path) -> None:
    recipe = load_recipe("slicegpt-25pct", ["calibration.samples=4", "stages.0.slicing=null", "stages.0.dim=576"])
    out = tmp_path / "rotated"
    compress(smollm2_dir, recipe, out, device="cpu")
    ppl = evaluate(out, "demo:wiki", seq_len=EVAL_SEQ_LEN, max_tokens=EVAL_TOKENS, device="cpu").ppl
    assert ppl == pytest.approx(baseline_ppl, rel=1e-3)
