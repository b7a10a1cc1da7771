"""BitStack after a pruning stage that ships its own modeling file (SliceGPT, FLAP, FinerCut): one directory that
compressor and transformers alone both load at any budget into the pruned model, as the run held it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from isolation import run_without_compressor

from compressor.export.bitstack_materialize import materialize
from compressor.export.bitstack_store import REMOTE_CODE_FILE, blocks_at, read_manifest
from compressor.models.shipped import shipped_dir
from compressor.models.shipped.modeling_bitstack import BASE_KEY
from compressor.pipeline import compress, load
from compressor.recipe import recipe_from_dict

TOKENS = torch.tensor([[5, 17, 42, 99, 3, 250, 7, 8], [1, 2, 3, 4, 5, 6, 7, 8]])

#: Each pruning stage, its modeling file, the class it builds and the config.json keys that file reads.
PRUNINGS = {
    "slicegpt": ({"method": "slicegpt", "slicing": 0.25}, "modeling_sliced", "SlicedLlamaForCausalLM", ["slicing"]),
    "flap": ({"method": "flap", "ratio": 0.3, "structure": "global", "compensate": True}, "modeling_flap",
             "FLAPLlamaForCausalLM", ["flap"]),
    "finercut": ({"method": "finercut", "ratio": 0.25}, "modeling_finercut", "FinerCutLlamaForCausalLM",
                 ["finercut_layout", "finercut_removed"]),
}

#: What makes each pruned model one that stock transformers cannot build, read from config.json.
PRUNED = {
    "slicegpt": lambda config: config["slicing"]["embedding_width"] < config["hidden_size"],
    "flap": lambda config: any(layer["attention_output_bias"] or layer["mlp_output_bias"]
                               for layer in config["flap"]["layers"]),
    "finercut": lambda config: any(len(removed) == 1 for removed in config["finercut_removed"]),
}

#: Run in a Python that cannot import compressor: load each (directory, budget or None for a materialized
#: directory), compare with the logits compressor computed for it.
_LOAD = """
import json, sys
import torch
from transformers import AutoModelForCausalLM
scratch, loads = sys.argv[1], json.loads(sys.argv[2])
tokens = torch.load(scratch + "/tokens.pt")
seen = []
for i, (directory, budget) in enumerate(loads):
    options = {} if budget is None else {"bitstack_budget": budget}
    model = AutoModelForCausalLM.from_pretrained(directory, trust_remote_code=True, **options)
    with torch.no_grad():
        logits = model(tokens).logits
    diff = float((logits - torch.load(f"{scratch}/logits-{i}.pt")).abs().max())
    seen.append({"class": type(model).__name__, "mro": [c.__name__ for c in type(model).__mro__], "diff": diff,
                 "blocks": getattr(model, "bitstack_blocks", None)})
print(json.dumps(seen))
"""


def _logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(TOKENS).logits


@pytest.fixture(scope="module", params=list(PRUNINGS))
def composed(request: pytest.FixtureRequest, model_dir_factory, text_file: Path,
             tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Path, torch.Tensor]:
    """``(method, directory, logits of the model the run held)``: prune, then bitstack into export format bitstack.

    BitStack's default ``order: fisher`` runs the whole model in its ``prepare``: after SliceGPT that model must be
    sliced through, not half-way (the engine gives such a stage a pass of its own)."""
    method = request.param
    data = {"name": "t", "calibration": {"dataset": str(text_file), "samples": 4, "seq_len": 32, "batch_size": 2},
            "stages": [PRUNINGS[method][0], {"method": "bitstack", "iterations": 3, "rank": 2, "signs": "residual"}],
            "export": {"format": "bitstack"}}
    loaded = load(model_dir_factory("llama"))
    out = tmp_path_factory.mktemp(method) / "bs"
    compress(loaded, recipe_from_dict(yaml.safe_load(yaml.safe_dump(data))), out, device="cpu")
    return method, out, _logits(loaded.model)


def _two_blocks_each(directory: Path) -> str:
    """A byte budget with room for two blocks per linear (the global order may spend them unevenly)."""
    manifest = read_manifest(directory)
    sizes = [item["block_bytes"] for item in manifest["linears"].values()]
    return f"{manifest['fixed_bytes'] + sum(s[0] + s[1] for s in sizes)}B"


def test_the_directory_carries_the_pruned_models_file_and_names_its_class(
    composed: tuple[str, Path, torch.Tensor],
) -> None:
    method, out, _ = composed
    _, stem, name, keys = PRUNINGS[method]
    config = json.loads((out / "config.json").read_text())
    assert config["auto_map"] == {"AutoModelForCausalLM": "modeling_bitstack.BitStackLlamaForCausalLM"}
    assert config[BASE_KEY] == f"{stem}.{name}"
    assert all(key in config for key in keys), [key for key in keys if key not in config]
    assert PRUNED[method](config), f"{method} left a model stock transformers builds: nothing composed"
    for file in (REMOTE_CODE_FILE, f"{stem}.py"):
        assert (out / file).read_bytes() == (shipped_dir() / file).read_bytes()


def test_compressor_and_transformers_alone_load_the_pruned_model_at_each_budget(
    composed: tuple[str, Path, torch.Tensor], tmp_path: Path,
) -> None:
    """Every block: the model the run held; two blocks per linear: the same model in both loaders; materialized
    at that budget: a pruned export (its own modeling file) that both load into that model again."""
    method, out, held = composed
    _, stem, name, _ = PRUNINGS[method]
    budget = _two_blocks_each(out)
    everything, small = load(out), load(out, budget=budget)
    assert type(everything.model).__name__ == name
    torch.testing.assert_close(_logits(everything.model), held, rtol=0, atol=0)
    materialize(out, budget, tmp_path / "m")
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    assert config["auto_map"] == {"AutoModelForCausalLM": f"{stem}.{name}"} and BASE_KEY not in config
    assert not (tmp_path / "m" / REMOTE_CODE_FILE).exists() and (tmp_path / "m" / f"{stem}.py").is_file()
    torch.testing.assert_close(_logits(load(tmp_path / "m").model), _logits(small.model), rtol=0, atol=0)
    loads = [(str(out), "1GB"), (str(out), budget), (str(tmp_path / "m"), None)]  # 1GB: every block
    expected = [held, _logits(small.model), _logits(small.model)]
    torch.save(TOKENS, tmp_path / "tokens.pt")
    for i, logits in enumerate(expected):
        torch.save(logits, tmp_path / f"logits-{i}.pt")
    child = run_without_compressor(_LOAD, str(tmp_path), json.dumps(loads), cwd=tmp_path)
    assert child.returncode == 0, child.stderr[-3000:]
    seen = json.loads(child.stdout.strip().splitlines()[-1])
    assert [row["class"] for row in seen] == [f"BitStack{name}", f"BitStack{name}", name]
    assert name in seen[0]["mro"] and "LlamaForCausalLM" in seen[0]["mro"]
    assert all(row["diff"] <= 1e-5 for row in seen), [row["diff"] for row in seen]
    manifest = read_manifest(out)
    assert seen[0]["blocks"] == dict.fromkeys(manifest["linears"], 3)
    assert seen[1]["blocks"] == blocks_at(manifest, budget) and set(seen[1]["blocks"].values()) != {3}


def test_a_pruned_export_compressed_again_gives_a_directory_that_loads_its_blocks_into_the_pruned_model(
    model_dir_factory, text_file: Path, tmp_path: Path,
) -> None:
    """A second run on a SliceGPT export: the model's config names modeling_sliced.py (no stage ships it this run),
    so the writer's check builds that class, and the directory names it in bitstack_base like the one-run case."""
    calibration = {"dataset": str(text_file), "samples": 4, "seq_len": 32, "batch_size": 2}
    first = {"name": "t", "calibration": calibration, "export": {"format": "dense"},
             "stages": [PRUNINGS["slicegpt"][0]]}
    compress(str(model_dir_factory("llama")), recipe_from_dict(first), tmp_path / "sliced", device="cpu")
    second = {"name": "t", "calibration": calibration, "export": {"format": "bitstack"},
              "stages": [{"method": "bitstack", "iterations": 2, "rank": 2}]}
    loaded = load(tmp_path / "sliced")
    compress(loaded, recipe_from_dict(second), tmp_path / "bs", device="cpu")
    config = json.loads((tmp_path / "bs" / "config.json").read_text())
    assert config[BASE_KEY] == "modeling_sliced.SlicedLlamaForCausalLM"
    assert config["auto_map"] == {"AutoModelForCausalLM": "modeling_bitstack.BitStackLlamaForCausalLM"}
    again = load(tmp_path / "bs")
    assert type(again.model).__name__ == "SlicedLlamaForCausalLM"
    torch.testing.assert_close(_logits(again.model), _logits(loaded.model), rtol=0, atol=0)
