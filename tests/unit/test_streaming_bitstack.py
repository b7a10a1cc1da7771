"""BitStack under layer streaming: each finished layer's blocks go to a file of their own, the directory (or the dense
reconstruction) is assembled from those files and the checkpoint, byte for byte the in-RAM run's output."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import streaming_parity as parity
import torch

from compressor.errors import RecipeError, UsageError
from compressor.pipeline import compress, load
from compressor.streaming.layers import LayerStreamer

#: Files whose bytes legitimately differ between two runs: the reports and plots, BitStack's curve plot too.
DIFFERING = parity.REPORTS | {"bitstack.png"}
#: Small stacks: 3 blocks of rank 2 per linear.
STACK = {"iterations": 3, "rank": 2, "order": "relative"}  # the default, fisher, does not stream


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory, tiny_tokenizer: Any) -> Any:
    """A tiny model (hidden 256, MLP 512) saved in several shards, per (dtype, tied embeddings, family)."""
    return parity.sharded_checkpoints(tmp_path_factory, tiny_tokenizer, "bitstack")


def _recipe(text_file: Path, stage: dict[str, Any] | None = None, export: str = "bitstack",
            before: list[dict[str, Any]] | None = None, after: list[dict[str, Any]] | None = None) -> Any:
    stages = [*(before or []), {"method": "bitstack", **STACK, **(stage or {})}, *(after or [])]
    return parity.streaming_recipe(text_file, stages, export)


@pytest.mark.parametrize(("family", "dtype", "tied", "stage", "before"), [
    ("llama", "float32", False, {}, None),
    ("llama", "bfloat16", True, {"budget": "2.5bpw", "signs": "residual"}, None),  # tied head: stored once, aliased
    ("qwen2", "float32", False, {"order": "absolute", "signs": "residual"}, None),  # q/k/v biases in the fixed file
    ("llama", "float32", True, {"signs": "residual"}, [{"method": "layer_drop", "layers": [1]}]),  # renumbered
    ("llama", "float32", False, {"signs": "residual"},  # per-layer shapes and biases: modeling_flap.py rides along
     [{"method": "flap", "ratio": 0.3, "structure": "global", "compensate": True}]),
])
def test_bitstack_streams_to_the_in_ram_directory(checkpoint: Any, text_file: Path, tmp_path: Path, family: str,
                                                  dtype: str, tied: bool, stage: dict[str, Any],
                                                  before: list[dict[str, Any]] | None) -> None:
    recipe = _recipe(text_file, stage, before=before)
    source = str(checkpoint(dtype, tied, family))
    in_ram = compress(source, recipe, tmp_path / "ram", device="cpu", memory_budget="none")
    streamed = compress(source, recipe, tmp_path / "stream", device="cpu", memory_budget="1KB")
    names = parity.same_files(tmp_path / "ram", tmp_path / "stream", DIFFERING)
    assert {"bitstack.json", "bitstack-fixed.safetensors", "bitstack-block-002.safetensors",
            "modeling_bitstack.py", "config.json", "tokenizer.json"} <= set(names)
    assert ("modeling_flap.py" in names) == (before is not None and before[0]["method"] == "flap")
    manifest = json.loads((tmp_path / "stream" / "bitstack.json").read_text())
    assert bool(manifest["tied"]) == tied and manifest["dtype"] == dtype
    assert len(manifest["linears"]) == 7 * (2 if before and before[0]["method"] == "layer_drop" else 3)
    assert streamed.structure == in_ram.structure and parity.timeless_rows(streamed) == parity.timeless_rows(in_ram)
    parity.same_totals(streamed, in_ram, ("size_bytes", "params", "avg_bits_per_weight", "compression_ratio"))
    assert "streamed from disk" in streamed.warnings[0]["message"]
    assert not (tmp_path / "stream.partial").exists()


def test_the_streamed_directory_loads_as_the_in_ram_stage_at_its_budget(checkpoint: Any, text_file: Path,
                                                                        tmp_path: Path) -> None:
    """compressor.load(OUT, budget=B) of the streamed output is the in-RAM run's model, reconstructed at B."""
    recipe = _recipe(text_file, {"budget": "2.2bpw", "signs": "residual"})
    resident = load(checkpoint("float32", True))
    report = compress(resident, recipe, tmp_path / "ram", device="cpu")
    compress(str(checkpoint("float32", True)), recipe, tmp_path / "stream", device="cpu",
             memory_budget="1KB")
    chosen = [row["extra"]["blocks"] for row in report.layers]
    assert min(chosen) < STACK["iterations"], "the budget keeps every block: it tests nothing"
    reloaded = load(tmp_path / "stream", budget="2.2bpw").model.state_dict()
    expected = resident.model.state_dict()
    assert sorted(reloaded) == sorted(expected)
    different = [name for name in expected if not torch.equal(reloaded[name], expected[name])]
    assert different == []


def test_the_blocks_of_finished_layers_are_not_kept_in_memory(checkpoint: Any, text_file: Path, tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """When a layer loads, every earlier layer's blocks are on meta (in files) and one decoder layer is resident."""
    def probe(self: LayerStreamer, index: int, layer: torch.nn.Module) -> tuple[int, int, int]:
        real = sum(not item.decomposition.scale.is_meta for item in self.stages[-1].decomposed.values())
        return index, parity.resident_layers(self.adapter), real

    seen, _ = parity.watch_layer_loads(monkeypatch, probe)
    compress(str(checkpoint()), _recipe(text_file, {"signs": "residual"}), tmp_path / "o", device="cpu",
             memory_budget="1KB")
    assert seen == [(0, 1, 0), (1, 1, 0), (2, 1, 0)]


#: GPTQ on the attention after BitStack on the MLPs: its Hessians see the earlier layers' reconstructed MLPs.
GPTQ_AFTER = [{"method": "gptq", "targets": ["re:.*self_attn.*"], "bits": 4, "group_size": 32}]


@pytest.mark.parametrize("after", [None, GPTQ_AFTER])
def test_dense_after_bitstack_streams_to_the_in_ram_bytes(checkpoint: Any, text_file: Path, tmp_path: Path,
                                                          after: list[dict[str, Any]] | None) -> None:
    """Format dense (alone, or a quantizer after it): each layer is reconstructed from its blocks' file when read."""
    stage = {"budget": "2.2bpw", "signs": "residual", **({"targets": ["re:.*mlp.*"]} if after else {})}
    recipe = _recipe(text_file, stage, export="dense", after=after)
    source = str(checkpoint("bfloat16", True))
    in_ram = compress(source, recipe, tmp_path / "ram", device="cpu", memory_budget="none")
    streamed = compress(source, recipe, tmp_path / "stream", device="cpu", memory_budget="1KB")
    parity.same_files(tmp_path / "ram", tmp_path / "stream", DIFFERING)
    assert parity.timeless_rows(streamed) == parity.timeless_rows(in_ram)


def test_streamed_eval_of_a_dense_bitstack_output_is_the_in_ram_one(checkpoint: Any, text_file: Path,
                                                                     tmp_path: Path) -> None:
    recipe = _recipe(text_file, {"budget": "2.2bpw", "signs": "residual"}, export="dense")
    runs = [compress(str(checkpoint()), recipe, tmp_path / out, device="cpu", memory_budget=budget,
                     eval_data=str(text_file), eval_max_tokens=1024) for out, budget in (("ram", "none"), ("s", "1KB"))]
    assert runs[0].eval["after"]["ppl"] == runs[1].eval["after"]["ppl"] != runs[1].eval["before"]["ppl"]


@pytest.mark.parametrize(("recipe_keys", "eval_data", "error", "match"), [
    ({"stage": {"order": "fisher"}}, False, RecipeError,
     r"^stages\.0 \(bitstack\) order: fisher does not stream .*use order: relative$"),
    ({}, True, UsageError, r"^--eval under streaming .*a bitstack directory is not read back layer by layer"),
])
def test_what_does_not_stream_is_refused_before_anything_is_written(checkpoint: Any, text_file: Path, tmp_path: Path,
                                                                    recipe_keys: dict[str, Any], eval_data: bool,
                                                                    error: type[Exception], match: str) -> None:
    with pytest.raises(error, match=match) as raised:
        compress(str(checkpoint()), _recipe(text_file, **recipe_keys), tmp_path / "o", device="cpu",
                 memory_budget="1KB", eval_data=str(text_file) if eval_data else None)
    assert "\n" not in str(raised.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_the_shipped_recipe_is_refused_in_one_line_and_streams_with_order_relative(
        checkpoint: Any, text_file: Path, tmp_path: Path, runner: Any) -> None:
    """``compress DIR -r bitstack --memory-budget 10KB`` (its default order, fisher) is refused in one line with
    exit 2 and nothing written; with ``order: relative`` it writes the directory."""
    from compressor.cli import app

    small = ["--set", f"calibration.dataset={text_file}", "--set", "calibration.samples=2", "--set",
             "calibration.seq_len=32", "--set", "stages.0.iterations=2", "--set", "stages.0.rank=2", "--set",
             "stages.0.signs=residual"]
    args = ["compress", str(checkpoint()), "-r", "bitstack", "--memory-budget", "10KB", *small]
    refused = runner.invoke(app, [*args, "--out", str(tmp_path / "f")])
    assert refused.exit_code == 2, refused.output
    assert "order: fisher does not stream" in refused.output and len(refused.output.strip().splitlines()) == 1
    assert not (tmp_path / "f").exists()
    done = runner.invoke(app, [*args, "--out", str(tmp_path / "o"), "--set", "stages.0.order=relative"])
    assert done.exit_code == 0, done.output
    manifest = json.loads((tmp_path / "o" / "bitstack.json").read_text())
    assert len(manifest["order"]) == 2 * len(manifest["linears"]) == 2 * 21
    report = json.loads((tmp_path / "o" / "compression_report.json").read_text())
    assert "streamed from disk" in report["warnings"][0]["message"]
