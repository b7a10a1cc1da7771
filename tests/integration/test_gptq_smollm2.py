"""GPTQ on the real SmolLM2-135M: beats RTN at 4 bits per channel; compressed-tensors and GGUF exports load exactly."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from compressor.pipeline import compress, evaluate, load
from compressor.recipe import load_recipe

pytestmark = pytest.mark.slow
SMALL = ["calibration.samples=16", "calibration.seq_len=256"]
#: The export test checks only that the files reload to the in-memory model; quality is the other test's job.
TINY = ["calibration.samples=4", "calibration.seq_len=128"]


def _ppl(loaded: object) -> float:
    return evaluate(loaded, "demo:wiki", seq_len=512, max_tokens=4096, device="cpu").ppl


def test_gptq_beats_rtn_at_4_bits_per_channel(smollm2_dir: Path, tmp_path: Path) -> None:
    """Per channel, where rounding error is largest at 4 bits, GPTQ's error feedback wins by a wide margin.

    Measured on the 2-core CI machine (16 x 256 calibration, 4,096 eval tokens): RTN 52.8, GPTQ 36.7. At 3 bits
    with groups of 128 and so little calibration the two were within noise (GPTQ 186.0, RTN 180.8, on the
    code before and after issue 13 alike), so that setting could not tell a broken GPTQ from a working one.
    """
    results = {}
    for method in ("rtn", "gptq"):
        # plain GPTQ: this guards its error feedback (the recipe's asymmetric calibration has its own tests)
        settings = [*SMALL, "stages.0.bits=4", "stages.0.group_size=-1"]
        if method == "gptq":
            settings.append("stages.0.asymmetric=0")
        recipe = load_recipe("w3a16-gptq" if method == "gptq" else "w4a16-rtn", settings)
        loaded = load(smollm2_dir)
        compress(loaded, recipe, tmp_path / method, device="cpu")
        results[method] = _ppl(loaded)
    assert results["gptq"] < 0.85 * results["rtn"], results


def test_compressed_tensors_and_gguf_exports_load_exactly(smollm2_dir: Path, tmp_path: Path) -> None:
    tokens = torch.randint(0, 49152, (1, 48), generator=torch.Generator().manual_seed(0))
    for recipe_name, load_kwargs in (("w4a16-gptq", {}), ("w4a16-gptq-g32-gguf", {"gguf_file": "model-Q4_0.gguf"})):
        loaded = load(smollm2_dir)
        out = tmp_path / recipe_name
        compress(loaded, load_recipe(recipe_name, TINY), out, device="cpu")
        reloaded = AutoModelForCausalLM.from_pretrained(out, **load_kwargs)
        with torch.no_grad():
            torch.testing.assert_close(reloaded(tokens).logits, loaded.model(tokens).logits, rtol=0, atol=1e-4)
