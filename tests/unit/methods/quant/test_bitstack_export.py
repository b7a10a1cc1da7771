"""`compress` with export format bitstack writes the BitStack directory; the recipe checks that guard it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from compressor.errors import RecipeError, UsageError
from compressor.export.bitstack_store import FIXED, MANIFEST, block_file, load_bitstack
from compressor.pipeline import compress, evaluate, load
from compressor.recipe import load_recipe, recipe_from_dict

TOKENS = torch.tensor([[5, 17, 42, 99, 3, 250, 7, 8]])


def _recipe(text_file: Path, export: str, stages: list[dict[str, object]] | None = None) -> object:
    data = {
        "name": "t",
        "calibration": {"dataset": str(text_file), "samples": 4, "seq_len": 32, "batch_size": 2},
        "stages": stages or [{"method": "bitstack", "iterations": 3, "rank": 2}],
        "export": {"format": export},
    }
    return recipe_from_dict(yaml.safe_load(yaml.safe_dump(data)))


def _logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(TOKENS).logits


@pytest.fixture(scope="module")
def compressed(model_dir_factory, text_file: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, object]:
    loaded = load(model_dir_factory("llama"))
    out = tmp_path_factory.mktemp("bs") / "out"
    report = compress(loaded, _recipe(text_file, "bitstack"), out, device="cpu")
    return out, (loaded, report)


def test_compress_writes_the_bitstack_directory_and_its_report(compressed: tuple[Path, object]) -> None:
    out, (loaded, report) = compressed
    names = {p.name for p in out.iterdir()}
    assert {MANIFEST, FIXED, "config.json", "tokenizer.json", "recipe.yaml", "compression_report.json"} <= names
    assert {block_file(i) for i in range(3)} <= names and block_file(3) not in names
    assert not list(out.glob("model*.safetensors")), "a dense copy written next to the blocks"
    assert json.loads((out / "compression_report.json").read_text())["export_format"] == "bitstack"
    stored = sum(p.stat().st_size for p in out.glob("*.safetensors"))
    assert report.size_bytes["after"] == stored
    # bits per decomposed weight of the model the run holds (every block), from the manifest's sizes by hand
    linears = json.loads((out / MANIFEST).read_text())["linears"].values()
    params = sum(item["shape"][0] * item["shape"][1] for item in linears)
    expected = 8 * sum(sum(item["block_bytes"]) for item in linears) / params
    assert report.avg_bits_per_weight == report.avg_bits_incl_metadata == round(expected, 4)
    # every block loaded back is the in-memory model the run evaluated (no budget: every block)
    model, counts = load_bitstack(out)
    assert set(counts.values()) == {3}
    torch.testing.assert_close(_logits(model), _logits(loaded.model), rtol=0, atol=0)


def test_bitstack_format_needs_a_bitstack_stage(text_file: Path) -> None:
    with pytest.raises(RecipeError, match="export.format: 'bitstack'.*has none"):
        _recipe(text_file, "bitstack", [{"method": "rtn", "bits": 4, "group_size": 32}])


def test_bitstack_format_refuses_a_stage_after_bitstack(text_file: Path) -> None:
    stages = [{"method": "bitstack", "targets": ["re:.*mlp.*"]}, {"method": "rtn", "targets": ["re:.*self_attn.*"]}]
    with pytest.raises(RecipeError, match="stages.0: .*'rtn' after it would be lost"):
        _recipe(text_file, "bitstack", stages)


def test_packed_formats_other_than_bitstack_are_refused(text_file: Path) -> None:
    with pytest.raises(RecipeError, match="use export format: bitstack"):
        _recipe(text_file, "compressed-tensors")


def test_load_builds_the_model_at_a_budget(compressed: tuple[Path, object], text_file: Path) -> None:
    out, (loaded, _) = compressed
    manifest = json.loads((out / MANIFEST).read_text())
    first = sum(item["block_bytes"][0] for item in manifest["linears"].values())
    budget = f"{manifest['fixed_bytes'] + first + 1}B"  # one block per linear and nothing more fits
    small = load(out, budget=budget)
    expected, counts = load_bitstack(out, budget)
    assert set(counts.values()) == {1}
    torch.testing.assert_close(_logits(small.model), _logits(expected), rtol=0, atol=0)
    assert small.tokenizer is not None and small.source_dir == out
    everything = load(out)  # no budget: every block, the model the run evaluated
    torch.testing.assert_close(_logits(everything.model), _logits(loaded.model), rtol=0, atol=0)
    assert evaluate(out, str(text_file), seq_len=32, max_tokens=64, device="cpu").ppl > 1


def test_a_budget_for_a_model_that_is_not_a_bitstack_directory_is_refused(model_dir_factory) -> None:
    with pytest.raises(UsageError, match="not a BitStack directory"):
        load(model_dir_factory("llama"), budget="1MB")


def test_the_shipped_recipe_writes_a_bitstack_directory(model_dir_factory, text_file: Path, tmp_path: Path) -> None:
    recipe = load_recipe("bitstack")
    stage = recipe.stages[0]
    assert (stage.iterations, stage.rank, recipe.calibration.samples, recipe.calibration.seq_len) == (16, 16, 64, 512)
    assert recipe.export.format == "bitstack"
    tiny = [f"calibration.dataset={text_file}", "calibration.samples=4", "calibration.seq_len=32",
            "calibration.batch_size=2", "stages.0.iterations=2"]
    out = tmp_path / "r"
    compress(str(model_dir_factory("llama")), load_recipe("bitstack", tiny), out, device="cpu")
    manifest = json.loads((out / MANIFEST).read_text())
    assert (manifest["iterations"], manifest["rank"], len(manifest["linears"])) == (2, 16, 3 * 7)


def test_a_moe_model_compresses_to_a_bitstack_directory_and_evaluates(model_dir_factory, text_file: Path,
                                                                      tmp_path: Path) -> None:
    """The whole run on a tiny Mixtral: its per-expert linears are stored, and the directory loads back as the
    model the run evaluated (transformers merges the experts) and evaluates at a budget."""
    loaded = load(model_dir_factory("mixtral"))
    out = tmp_path / "moe"
    compress(loaded, _recipe(text_file, "bitstack", [{"method": "bitstack", "iterations": 2, "rank": 2}]), out,
             device="cpu")
    manifest = json.loads((out / MANIFEST).read_text())
    assert sum(".experts." in path for path in manifest["linears"]) == 3 * 8 * 3  # layers x experts x projections
    torch.testing.assert_close(_logits(load(out).model), _logits(loaded.model), rtol=0, atol=1e-5)
    first = sum(item["block_bytes"][0] for item in manifest["linears"].values())
    budget = f"{manifest['fixed_bytes'] + first}B"
    assert evaluate(load(out, budget=budget), str(text_file), seq_len=32, max_tokens=64, device="cpu").ppl > 1


@pytest.mark.parametrize("prune", [{"method": "slicegpt", "slicing": 0.25}, {"method": "finercut", "ratio": 0.25},
                                   {"method": "flap", "structure": "global", "compensate": True}])
def test_a_pruning_stage_that_ships_its_own_modeling_file_validates_before_bitstack(text_file: Path,
                                                                                   prune: dict[str, object]) -> None:
    """The directory carries the pruning's modeling file and loads its blocks into that model
    (test_bitstack_compose.py); compressor-int8 still refuses it (test_dgq_dir.py)."""
    stages = [prune, {"method": "bitstack", "iterations": 2, "rank": 2}]
    assert _recipe(text_file, "bitstack", stages) is not None
