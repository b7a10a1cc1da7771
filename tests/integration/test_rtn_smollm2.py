"""RTN on the real SmolLM2-135M with real text: W8 is near-lossless, W4 per-channel visibly is not."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from compressor.pipeline import compress, evaluate, load
from compressor.recipe import load_recipe

pytestmark = pytest.mark.slow


def _run(smollm2_dir: Path, tmp_path: Path, overrides: list[str]) -> tuple[object, Path]:
    recipe = load_recipe("w8a16-rtn", ["calibration.samples=8", *overrides])
    loaded = load(smollm2_dir)
    out = tmp_path / "out"
    compress(loaded, recipe, out, device="cpu")
    return loaded, out


def test_w8_per_channel_is_near_lossless_and_reloads(smollm2_dir: Path, baseline_ppl: float, tmp_path: Path) -> None:
    loaded, out = _run(smollm2_dir, tmp_path, [])
    ppl = evaluate(loaded, "demo:wiki", seq_len=512, max_tokens=4096, device="cpu").ppl
    assert abs(ppl / baseline_ppl - 1) < 0.01, (baseline_ppl, ppl)
    reloaded = AutoModelForCausalLM.from_pretrained(out)
    tokens = torch.randint(0, 49152, (1, 64), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(reloaded(tokens).logits, loaded.model(tokens).logits, rtol=0, atol=1e-4)


def test_w4_per_channel_costs_measurable_quality(smollm2_dir: Path, baseline_ppl: float, tmp_path: Path) -> None:
    loaded, _ = _run(smollm2_dir, tmp_path, ["stages.0.bits=4"])
    ppl = evaluate(loaded, "demo:wiki", seq_len=512, max_tokens=4096, device="cpu").ppl
    assert ppl > baseline_ppl * 1.05, (baseline_ppl, ppl)
