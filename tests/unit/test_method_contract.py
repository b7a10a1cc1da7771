"""Every registered method on every family: runs, forward works, records exist, the export reloads.

New methods are found through the registry: their config defaults must be valid on a tiny model.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from tiny import FAMILIES, tiny_model

from compressor.engine import ModelContext, run_stages
from compressor.export import write_model
from compressor.methods.registry import get_method, method_names
from compressor.models import get_adapter
from compressor.pipeline import load
from compressor.recipe import ExportConfig


def _stages(name: str) -> list[object]:
    method = get_method(name)
    stages = [method(method.config_class.model_validate({"method": name}))]
    if method.kind == "allocate":  # a planner needs a quantizer after it
        rtn = get_method("rtn")
        stages.append(rtn(rtn.config_class.model_validate({"method": "rtn"})))
    return stages


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("name", method_names())
def test_method_contract(name: str, family: str, tmp_path: Path, tiny_tokenizer) -> None:
    model = tiny_model(family)
    tokens = torch.randint(0, 300, (4, 32), generator=torch.Generator().manual_seed(0))
    run = ModelContext(model, get_adapter(model), tokens, torch.device("cpu"), batch_size=2)
    records = run_stages(run, _stages(name))
    assert records, "a method must say what it did"
    assert all(r.method for r in records)
    with torch.no_grad():
        logits = model(tokens).logits
    assert logits.shape == (4, 32, model.config.vocab_size)
    assert torch.isfinite(logits).all()
    write_model(ExportConfig(format="dense"), run, tiny_tokenizer, tmp_path)
    reloaded = load(tmp_path).model
    with torch.no_grad():
        torch.testing.assert_close(reloaded(tokens).logits, logits, rtol=1e-4, atol=1e-4)
