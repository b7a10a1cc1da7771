"""SliceGPT under layer streaming: both schemes stream (layers folded as they load, ``shared``'s basis measured by
one more read of every layer, embeddings and head rotated from the checkpoint at export), byte for byte the in-RAM
run's, tied embeddings too; a slicegpt after another stage and --eval are refused in one line, nothing written."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import streaming_parity as parity
import torch

from compressor.errors import CompressorError, RecipeError
from compressor.pipeline import compress, load
from compressor.streaming.layers import LayerStreamer

PER_LAYER = {"rotation": "per_layer", "slicing": 0.25}
SHARED = {"slicing": 0.25}  # the default scheme


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory, tiny_tokenizer: Any) -> Any:
    """A tiny model of ``family`` (its own tiny sizes) in several shards, per (dtype, tied embeddings, family)."""
    return parity.sharded_checkpoints(tmp_path_factory, tiny_tokenizer, "slicegpt", sizes={}, shard_size="200KB",
                                      min_shards=1)


def _recipe(text_file: Path, slicegpt: dict[str, Any], then: str | None = None, export: str = "dense",
            first: str | None = None) -> Any:
    stages: list[dict[str, Any]] = [{"method": first, "layers": [0]}] if first else []
    stages.append({"method": "slicegpt", **slicegpt})
    if then:
        stages.append(parity.quantizer_stage(then))
    return parity.streaming_recipe(text_file, stages, export)


@pytest.mark.parametrize(("family", "slicegpt", "then", "export", "dtype", "tied"), [
    ("llama", PER_LAYER, None, "dense", "float32", False),
    ("llama", {**PER_LAYER, "slicing": 0.5}, "gptq", "compressed-tensors", "float32", False),
    ("llama", PER_LAYER, "rtn", "dense", "bfloat16", False),
    ("qwen2", PER_LAYER, "gptq", "compressed-tensors", "bfloat16", False),  # attention biases
    ("llama", SHARED, None, "dense", "float32", False),
    ("llama", {**SHARED, "slicing": 0.5}, "gptq", "compressed-tensors", "bfloat16", False),
    ("qwen2", SHARED, "rtn", "dense", "float32", False),
    ("llama", SHARED, None, "dense", "float32", True),  # tied: the projections, not the embedding, rotate
    ("llama", PER_LAYER, "gptq", "compressed-tensors", "bfloat16", True),
    ("qwen2", SHARED, "gptq", "compressed-tensors", "float32", True),
    ("opt", SHARED, None, "dense", "float32", False),  # LayerNorm: centred stream, learned positions, head bias
    ("opt", PER_LAYER, "gptq", "compressed-tensors", "float32", True),
    ("phi3", SHARED, "rtn", "dense", "bfloat16", False),  # fused q/k/v and gate/up
])
def test_slicegpt_streams_to_the_in_ram_bytes(checkpoint: Any, text_file: Path, tmp_path: Path, family: str,
                                              slicegpt: dict[str, Any], then: str | None, export: str,
                                              dtype: str, tied: bool) -> None:
    recipe = _recipe(text_file, slicegpt, then, export)
    source = str(checkpoint(dtype, tied, family))
    in_ram = compress(source, recipe, tmp_path / "ram", device="cpu", memory_budget="none")
    streamed = compress(source, recipe, tmp_path / "stream", device="cpu", memory_budget="1KB")
    parity.same_files(tmp_path / "ram", tmp_path / "stream")
    assert (tmp_path / "stream" / "modeling_sliced.py").is_file()
    assert streamed.structure == in_ram.structure
    assert ("tied, kept tied" in in_ram.structure["slicegpt"]["embeddings"]) == tied
    parity.same_totals(streamed, in_ram, ("size_bytes", "params", "avg_bits_per_weight", "compression_ratio"))
    assert parity.timeless_rows(in_ram) == parity.timeless_rows(streamed)
    assert "streamed from disk" in streamed.warnings[0]["message"]
    assert not (tmp_path / "stream.partial").exists()


@pytest.mark.parametrize(("slicegpt", "tied"), [(PER_LAYER, False), (SHARED, False), (SHARED, True)])
def test_streamed_output_loads_with_transformers_and_gives_the_in_ram_logits(
        checkpoint: Any, text_file: Path, tmp_path: Path, slicegpt: dict[str, Any], tied: bool) -> None:
    """The in-RAM run's sliced model (still in memory) against the streamed directory, reloaded without us."""
    recipe = _recipe(text_file, slicegpt)
    loaded = load(checkpoint(tied=tied))
    compress(loaded, recipe, tmp_path / "ram", device="cpu")
    compress(str(checkpoint(tied=tied)), recipe, tmp_path / "stream", device="cpu", memory_budget="1KB")
    parity.same_files(tmp_path / "ram", tmp_path / "stream")
    tokens = torch.randint(0, 300, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = loaded.model(tokens).logits
    class_name, difference = parity.reload_without_compressor(tmp_path / "stream", tokens, expected, tmp_path)
    assert class_name.startswith("Sliced") and difference <= 1e-5
    with torch.no_grad():
        reloaded = load(str(tmp_path / "stream")).model(tokens).logits
    torch.testing.assert_close(reloaded, expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize(("slicegpt", "loads"), [(PER_LAYER, [0, 1, 2]), (SHARED, [0, 1, 2, 0, 1, 2])])
def test_one_decoder_layer_is_materialised_at_a_time(checkpoint: Any, text_file: Path, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch, slicegpt: dict[str, Any],
                                                     loads: list[int]) -> None:
    """shared reads every layer twice (its statistics, then the pass that rotates and writes), one at a time."""
    def probe(self: LayerStreamer, index: int, layer: torch.nn.Module) -> tuple[int, int]:
        assert all(p.is_meta for p in self.adapter.lm_head().parameters())
        return index, parity.resident_layers(self.adapter)

    seen, _ = parity.watch_layer_loads(monkeypatch, probe)
    compress(str(checkpoint()), _recipe(text_file, slicegpt, "gptq", "compressed-tensors"), tmp_path / "o",
             device="cpu", memory_budget="1KB")
    assert seen == [(index, 1) for index in loads]


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"slicegpt": PER_LAYER, "first": "layer_drop"}, r"^stages\.1 \(slicegpt\) after another stage does not stream"),
])
def test_refusals_are_one_line_and_write_nothing(checkpoint: Any, text_file: Path, tmp_path: Path,
                                                 kwargs: dict[str, Any], match: str) -> None:
    recipe = _recipe(text_file, kwargs["slicegpt"], first=kwargs.get("first"))
    with pytest.raises(RecipeError, match=match) as raised:
        compress(str(checkpoint()), recipe, tmp_path / "o", device="cpu",
                 memory_budget="1KB")
    assert "\n" not in str(raised.value) and list(tmp_path.iterdir()) == []


def test_eval_is_refused_and_the_cli_exits_2(checkpoint: Any, text_file: Path, tmp_path: Path) -> None:
    with pytest.raises(CompressorError, match=r"^--eval under streaming .*a sliced model"):
        compress(str(checkpoint()), _recipe(text_file, PER_LAYER), tmp_path / "o", device="cpu",
                 memory_budget="1KB", eval_data=str(text_file))
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"name: t\ncalibration: {{dataset: {text_file}, samples: 4, seq_len: 32}}\n"
                      "stages: [{method: layer_drop, layers: [0]}, {method: slicegpt}]\nexport: {format: dense}\n")
    cli = subprocess.run([sys.executable, "-m", "compressor", "compress", str(checkpoint()), "--recipe", str(recipe),
                          "-o", str(tmp_path / "cli"), "--memory-budget", "1KB"], capture_output=True, text=True)
    assert cli.returncode == 2, cli.stderr
    lines = [line for line in cli.stderr.splitlines() if "does not stream" in line]
    assert len(lines) == 1 and "stages.1 (slicegpt) after another stage" in lines[0] and "Traceback" not in cli.stderr
    assert not (tmp_path / "cli").exists() and not (tmp_path / "o").exists()


def test_hidden_states_in_memory_mapped_files_give_the_same_bytes(checkpoint: Any, text_file: Path,
                                                                  tmp_path: Path) -> None:
    """shared's statistics sweep and the pass both keep their hidden states in the memory-mapped files."""
    recipe = _recipe(text_file, SHARED, "gptq", "compressed-tensors")
    compress(str(checkpoint()), recipe, tmp_path / "ram", device="cpu", memory_budget="none")
    compress(str(checkpoint()), recipe, tmp_path / "stream", device="cpu", memory_budget="1KB",
             activation_memory="1KB")
    parity.same_files(tmp_path / "ram", tmp_path / "stream")
