"""New families end to end: a tiny random checkpoint on disk, GPTQ W4 into compressed-tensors, reloaded exactly.

Gemma 3 text: the ``x*(1+w)`` norms, the scaled embedding, the post-branch norms and sliding-window layers next
to full ones (the tiny window is shorter than the input). Phi-3: the fused ``qkv_proj`` / ``gate_up_proj`` are
quantized as one linear each, per row over groups of their input columns, and stored as such.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM

from compressor.models import get_adapter
from compressor.pipeline import compress, load
from compressor.recipe import recipe_from_dict

TOKENS = torch.tensor([[5, 17, 42, 99, 3, 250, 7, 8, 11, 12, 13, 14, 200, 201, 2, 9]])


@pytest.mark.parametrize("family", ["gemma3", "phi3"])
def test_gptq_w4_compressed_tensors_reloads_with_equal_logits(family: str, model_dir_factory, text_file: Path,
                                                              tmp_path: Path) -> None:
    loaded = load(model_dir_factory(family))
    adapter = get_adapter(loaded.model)
    if family == "gemma3":
        assert set(adapter.attention_types()) == {"sliding_attention", "full_attention"}
        assert loaded.model.config.sliding_window < TOKENS.shape[1]
    recipe = recipe_from_dict(yaml.safe_load(yaml.safe_dump({
        "name": f"{family}-w4",
        "calibration": {"dataset": str(text_file), "samples": 4, "seq_len": 32, "batch_size": 2},
        "stages": [{"method": "gptq", "bits": 4, "group_size": 32}],
        "export": {"format": "compressed-tensors"},
    })))
    out = tmp_path / "ct"
    report = compress(loaded, recipe, out, device="cpu")
    assert report.size_bytes["after"] < report.size_bytes["before"]
    config = json.loads((out / "config.json").read_text())
    assert config["quantization_config"]["format"] == "pack-quantized"
    rows = [row for row in report.layers if row["method"] == "gptq"]
    quantized = {row["module"].rsplit(".", 1)[-1]: row["group_size"] for row in rows}
    assert set(quantized) == {name.rsplit(".", 1)[-1] for name in adapter.linear_names()}
    assert set(quantized.values()) == {32}
    reloaded = AutoModelForCausalLM.from_pretrained(out).eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(TOKENS).logits, loaded.model(TOKENS).logits, rtol=0, atol=0)
