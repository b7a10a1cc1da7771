"""The BitStack directory: written once, loaded at any budget into the model the stage builds at that budget."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from tiny import tiny_model
from torch import nn

from compressor.engine import ModelContext, run_stages
from compressor.errors import ExportError
from compressor.export.bitstack_store import FIXED, MANIFEST, block_file, load_bitstack, write_bitstack
from compressor.methods.quant.bitstack import BitStack, BitStackConfig
from compressor.methods.quant.bitstack.order import BudgetError
from compressor.models import get_adapter

TOKENS = torch.randint(0, 300, (4, 32), generator=torch.Generator().manual_seed(0))


def _compress(family: str = "llama", **settings: object) -> tuple[nn.Module, BitStack]:
    model = tiny_model(family)
    run = ModelContext(model, get_adapter(model), TOKENS, torch.device("cpu"), batch_size=2)
    stage = BitStack(BitStackConfig.model_validate({"method": "bitstack", "iterations": 4, "rank": 2, **settings}))
    run_stages(run, [stage])
    return model, stage


def _logits(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(TOKENS).logits


def _file_bytes(path: Path) -> dict[str, int]:
    with safe_open(str(path), "pt") as handle:
        return {name: handle.get_tensor(name).numel() * handle.get_tensor(name).element_size()
                for name in handle.keys()}  # noqa: SIM118


@pytest.fixture(scope="module")
def written(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, BitStack]:
    model, stage = _compress()
    out = tmp_path_factory.mktemp("bitstack")
    write_bitstack(out, model, stage)
    return out, stage


def test_every_block_is_stored_once_and_the_manifest_counts_its_bytes(written: tuple[Path, BitStack]) -> None:
    out, stage = written
    manifest = json.loads((out / MANIFEST).read_text())
    assert sorted(p.name for p in out.glob("bitstack-block-*")) == [block_file(i) for i in range(4)]
    for index in range(4):
        stored = _file_bytes(out / block_file(index))
        for path, item in manifest["linears"].items():
            names = [f"{path}.{part}" for part in ("signs", "u", "v", "scale")]
            assert sum(stored.get(name, 0) for name in names) == item["block_bytes"][index]
    fixed = _file_bytes(out / FIXED)
    assert not any(f"{path}.weight" in fixed for path in stage.decomposed), "a decomposed weight stored dense"
    assert "lm_head.weight" in manifest["tied"] and "lm_head.weight" not in fixed  # tiny llama ties its head
    assert sum(fixed.values()) == manifest["fixed_bytes"]


@pytest.mark.parametrize("fraction", [None, 0.3, 0.7])
def test_loading_at_a_budget_gives_the_model_the_stage_builds_at_that_budget(
    written: tuple[Path, BitStack], fraction: float | None
) -> None:
    out, stage = written
    manifest = json.loads((out / MANIFEST).read_text())
    sizes = [item["block_bytes"] for item in manifest["linears"].values()]
    smallest, largest = sum(s[0] for s in sizes), sum(sum(s) for s in sizes)
    budget = None if fraction is None else manifest["fixed_bytes"] + int(smallest + fraction * (largest - smallest))
    loaded, counts = load_bitstack(out, budget)
    model, same = _compress(budget=budget)
    assert counts == same.blocks
    torch.testing.assert_close(_logits(loaded), _logits(model), rtol=0, atol=0)


def test_a_budget_below_the_smallest_model_names_the_range(written: tuple[Path, BitStack]) -> None:
    with pytest.raises(BudgetError, match=r"smallest is .* \(one block per linear\), the largest .* \(all blocks\)"):
        load_bitstack(written[0], "1kB")


@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe"])
def test_a_moe_directory_loads_into_the_model_the_stage_builds(tmp_path: Path, family: str) -> None:
    """Experts are decomposed per expert projection (linearized in memory); the loader merges them into
    transformers' 3-D expert tensors like any checkpoint's, so the stock class computes the stage's model."""
    # signs: residual, order: relative: "two blocks per linear" below needs the order to take every second block
    # before any third, as sign(R)'s blocks in that order do on this tiny model (feedback's and fisher's do not)
    model, stage = _compress(family, signs="residual", order="relative")
    write_bitstack(tmp_path, model, stage)
    manifest = json.loads((tmp_path / MANIFEST).read_text())
    assert any(".experts.3." in path for path in manifest["linears"])
    sizes = [item["block_bytes"] for item in manifest["linears"].values()]
    budget = manifest["fixed_bytes"] + sum(s[0] + s[1] for s in sizes)  # two blocks per linear
    loaded, counts = load_bitstack(tmp_path, budget)
    assert set(counts.values()) == {2}
    assert not any(".experts.3." in name for name in loaded.state_dict()), "experts not merged back"
    at_budget, same = _compress(family, budget=budget, signs="residual", order="relative")
    assert same.blocks == counts
    torch.testing.assert_close(_logits(loaded), _logits(at_budget), rtol=0, atol=1e-5)


@pytest.mark.parametrize(("key", "value", "first"), [("num_hidden_layers", 1, "model.layers.1."),
                                                     ("intermediate_size", 96, "model.layers.0.mlp.down_proj.weight")])
def test_a_model_whose_tensors_differ_from_its_config_is_refused(tmp_path: Path, key: str, value: int,
                                                                 first: str) -> None:
    """Names or shapes the config's model does not have (a layer fewer, a narrower MLP) are refused."""
    model, stage = _compress()
    setattr(model.config, key, value)
    with pytest.raises(ExportError, match=f"differs from the model its config builds \\({first}"):
        write_bitstack(tmp_path, model, stage)
    assert not (tmp_path / MANIFEST).exists()


def test_a_directory_missing_a_tensor_is_an_error_not_a_random_weight(written: tuple[Path, BitStack],
                                                                     tmp_path: Path) -> None:
    import shutil

    from safetensors.torch import load_file, save_file

    from compressor.errors import ModelLoadError

    copy = tmp_path / "copy"
    shutil.copytree(written[0], copy)
    fixed = load_file(str(copy / FIXED))
    del fixed["model.norm.weight"]
    save_file(fixed, str(copy / FIXED))
    with pytest.raises(ModelLoadError, match=r"does not fit its config.json: .*missing_keys.*model\.norm\.weight"):
        load_bitstack(copy)
