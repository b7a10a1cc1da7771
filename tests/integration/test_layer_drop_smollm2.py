"""Layer removal on the real SmolLM2-135M with real text: block influence picks better layers than spacing."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from compressor.models import get_adapter
from compressor.pipeline import compress, evaluate, load
from compressor.recipe import load_recipe

pytestmark = pytest.mark.slow

REMOVE = 4


def _ppl(loaded: object) -> float:
    return evaluate(loaded, "demo:wiki", seq_len=512, max_tokens=4096, device="cpu").ppl  # type: ignore[arg-type]


def test_block_influence_beats_evenly_spaced_layers(smollm2_dir: Path, baseline_ppl: float, tmp_path: Path) -> None:
    recipe = load_recipe("shortgpt-25pct", ["calibration.samples=8", "calibration.seq_len=256",
                                            "stages.0.ratio=null", f"stages.0.remove={REMOVE}"])
    loaded = load(smollm2_dir)
    out = tmp_path / "out"
    report = compress(loaded, recipe, out, device="cpu")
    removed = report.structure["layer_drop"]["removed"]
    assert len(removed) == REMOVE and loaded.model.config.num_hidden_layers == 30 - REMOVE
    chosen_ppl = _ppl(loaded)

    spaced = load(smollm2_dir)
    evenly = [int((k + 0.5) * 30 / REMOVE) for k in range(REMOVE)]
    get_adapter(spaced.model).remove_layers(evenly)
    spaced_ppl = _ppl(spaced)
    assert baseline_ppl < chosen_ppl < spaced_ppl, (baseline_ppl, removed, chosen_ppl, evenly, spaced_ppl)

    reloaded = AutoModelForCausalLM.from_pretrained(out)
    tokens = torch.randint(0, 49152, (1, 64), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(reloaded(tokens).logits, loaded.model(tokens).logits, rtol=0, atol=1e-4)
