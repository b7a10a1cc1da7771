"""FLAP under layer streaming: its scoring pass plans every layer, the plan is applied to each layer when it is read
again (the next pass, or the export's copy), and the output is byte for byte the in-RAM run's."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import streaming_parity as parity
import torch
from tiny import tiny_model

from compressor.errors import RecipeError
from compressor.pipeline import compress, load
from compressor.streaming.layers import LayerStreamer

#: The paper's settings: per-layer shapes and compensation biases, so modeling_flap.py ships.
PAPER = {"structure": "global", "ratio": 0.6, "compensate": True}


def _quiet_first_kv_group(model: torch.nn.Module) -> None:
    model.model.layers[1].self_attn.v_proj.weight[:64].mul_(1e-2)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory, tiny_tokenizer: Any) -> Any:
    """A tiny Llama (4 heads in 2 KV groups of 64, MLP 512) in several shards, per (dtype, tied embeddings).

    Layer 1's first KV group has its value rows scaled by 1e-2 (its heads' outputs barely fluctuate), so the
    global structure removes a head group in some layers and not in others.
    """
    return parity.sharded_checkpoints(tmp_path_factory, tiny_tokenizer, "flap", edit=_quiet_first_kv_group)


def _recipe(text_file: Path, flap: dict[str, Any], then: str | None = None, export: str = "dense") -> Any:
    """``flap`` (its key ``drop``: a layer_drop stage before it), then a quantizer (``then``) or nothing."""
    drop = [{"method": "layer_drop", **flap["drop"]}] if "drop" in flap else []
    stages: list[dict[str, Any]] = [*drop, {"method": "flap", **{k: v for k, v in flap.items() if k != "drop"}}]
    if then:
        stages.append(parity.quantizer_stage(then))
    return parity.streaming_recipe(text_file, stages, export)


@pytest.mark.parametrize(("flap", "then", "export", "dtype", "tied"), [
    ({"ratio": 0.5}, None, "dense", "float32", False),  # uniform: a standard config, layers pruned at export
    (PAPER, None, "dense", "float32", False),  # per-layer shapes and biases: modeling_flap.py + config
    ({**PAPER, "round_to": 32}, "gptq", "compressed-tensors", "float32", False),  # the plan applied at GPTQ's loads
    ({"structure": "per_layer", "ratio": 0.6, "compensate": True}, "rtn", "dense", "bfloat16", True),
    ({"ratio": 0.5}, "gptq", "compressed-tensors", "bfloat16", False),
    ({**PAPER, "round_to": 32}, "dgq", "compressed-tensors", "float32", False),  # W4A8 smoothing of narrowed layers
    ({**PAPER, "drop": {"layers": [0]}}, None, "dense", "float32", False),  # survivors renumbered, then planned
    ({**PAPER, "drop": {"layers": [2]}, "round_to": 32}, "gptq", "compressed-tensors", "bfloat16", True),
])
def test_flap_streams_to_the_in_ram_bytes(checkpoint: Any, text_file: Path, tmp_path: Path, flap: dict[str, Any],
                                          then: str | None, export: str, dtype: str, tied: bool) -> None:
    recipe = _recipe(text_file, flap, then, export)
    source = str(checkpoint(dtype, tied))
    in_ram = compress(source, recipe, tmp_path / "ram", device="cpu", memory_budget="none")
    streamed = compress(source, recipe, tmp_path / "stream", device="cpu", memory_budget="1KB")
    parity.same_files(tmp_path / "ram", tmp_path / "stream")
    assert streamed.structure == in_ram.structure
    shapes = in_ram.structure["flap"]["layers"]
    assert any(s["kv_heads"] < 2 for s in shapes) and all(s["intermediate_size"] < 512 for s in shapes)
    compensated = flap.get("compensate", False)
    assert any(s["attention_bias"] for s in shapes) == compensated and in_ram.structure["flap"]["standard"] == (
        flap.get("structure", "uniform") == "uniform" and not compensated)
    config = json.loads((tmp_path / "stream" / "config.json").read_text())
    assert ("auto_map" in config) == (not in_ram.structure["flap"]["standard"])
    parity.same_totals(streamed, in_ram)
    assert parity.timeless_rows(in_ram) == parity.timeless_rows(streamed)
    message = streamed.warnings[0]["message"]
    assert ("reshaped by the last stage's plan" in message) == (then is None), message
    assert not (tmp_path / "stream.partial").exists()


def test_streamed_modeling_file_output_loads_with_transformers_and_gives_the_in_ram_logits(
        checkpoint: Any, text_file: Path, tmp_path: Path) -> None:
    """The in-RAM run's pruned model (compressed in memory) against the streamed directory reloaded without us."""
    recipe = _recipe(text_file, PAPER)
    loaded = load(checkpoint())
    compress(loaded, recipe, tmp_path / "ram", device="cpu")
    compress(str(checkpoint()), recipe, tmp_path / "stream", device="cpu", memory_budget="1KB")
    parity.same_files(tmp_path / "ram", tmp_path / "stream")
    tokens = torch.randint(0, 300, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = loaded.model(tokens).logits
    class_name, difference = parity.reload_without_compressor(tmp_path / "stream", tokens, expected, tmp_path)
    assert class_name == "FLAPLlamaForCausalLM" and difference <= 1e-5


def test_one_decoder_layer_is_materialised_at_a_time_in_both_passes(
        checkpoint: Any, text_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """FLAP's scoring pass loads the 3 source layers at full width, GPTQ's pass the same 3 narrowed by the plan."""
    def probe(self: LayerStreamer, index: int, layer: torch.nn.Module) -> tuple[int, int, int]:
        assert all(p.is_meta for m in self.adapter.embeddings() for p in m.parameters())
        return index, parity.resident_layers(self.adapter), self.adapter.mlp_output(layer).in_features

    seen, streamers = parity.watch_layer_loads(monkeypatch, probe)
    recipe = _recipe(text_file, {"ratio": 0.5}, "gptq", "compressed-tensors")
    report = compress(str(checkpoint()), recipe, tmp_path / "o", device="cpu", memory_budget="1KB")
    width = report.structure["flap"]["layers"][0]["intermediate_size"]
    assert seen == [(0, 1, 512), (1, 1, 512), (2, 1, 512), (0, 1, width), (1, 1, width), (2, 1, width)]
    assert streamers[0].max_resident == 1 and streamers[0].loads == 6 and streamers[0].passes == 2


def test_the_export_reads_one_layer_at_a_time_through_the_plan(checkpoint: Any, text_file: Path, tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """FLAP alone: no pass writes the layers; the export reads each layer once, through its plan, in turn."""
    from compressor.streaming import layers

    reads: list[int] = []
    read_layer = layers.read_layer

    def counting(adapter: Any, checkpoint: Any, index: int, *args: Any) -> dict[str, torch.Tensor]:
        reads.append(index)
        return read_layer(adapter, checkpoint, index, *args)

    monkeypatch.setattr(layers, "read_layer", counting)
    compress(str(checkpoint()), _recipe(text_file, PAPER), tmp_path / "o", device="cpu", memory_budget="1KB")
    assert reads == [0, 1, 2, 0, 1, 2]  # the scoring pass's loads, then the export's copies


@pytest.mark.parametrize(("family", "match"), [
    ("opt", "^flap cannot prune this model: opt's MLP is not a gate/up/down triple"),
    ("phi3", "^flap cannot prune this model: phi3 fuses q/k/v into"),
])
def test_refusals_are_the_in_ram_ones_before_anything_is_written(text_file: Path, tmp_path: Path, tiny_tokenizer: Any,
                                                                 family: str, match: str) -> None:
    source = tmp_path / family
    tiny_model(family).save_pretrained(source)
    tiny_tokenizer.save_pretrained(source)
    recipe = _recipe(text_file, PAPER)
    messages = []
    for budget, out in (("none", tmp_path / "ram"), ("1KB", tmp_path / "stream")):
        with pytest.raises(RecipeError, match=match) as raised:
            compress(str(source), recipe, out, device="cpu", memory_budget=budget)
        messages.append(str(raised.value))
    assert messages[0] == messages[1] and "\n" not in messages[1]
    assert sorted(p.name for p in tmp_path.iterdir()) == [family]


@pytest.mark.parametrize(("flap", "then", "export"), [
    (PAPER, None, "dense"), ({"ratio": 0.5}, None, "dense"), ({**PAPER, "round_to": 32}, "gptq", "compressed-tensors"),
])
def test_streamed_eval_scores_the_written_flap_model_as_in_ram(checkpoint: Any, text_file: Path, tmp_path: Path,
                                                               flap: dict[str, Any], then: str | None,
                                                               export: str) -> None:
    """--eval reads the output back layer by layer; a modeling_flap.py output is built with its per-layer shapes."""
    recipe = _recipe(text_file, flap, then, export)
    runs = [compress(str(checkpoint()), recipe, tmp_path / out, device="cpu", memory_budget=budget,
                     eval_data=str(text_file), eval_max_tokens=1024) for out, budget in (("ram", "none"), ("s", "1KB"))]
    assert runs[0].eval["after"]["ppl"] == runs[1].eval["after"]["ppl"] != runs[1].eval["before"]["ppl"]
    assert runs[0].eval["before"]["ppl"] == runs[1].eval["before"]["ppl"]


def test_a_flap_output_streams_through_rtn_to_the_in_ram_bytes(checkpoint: Any, text_file: Path,
                                                                tmp_path: Path) -> None:
    """A second run quantizes a modeling_flap.py output: the skeleton is its class, narrowed per layer on meta."""
    compress(str(checkpoint()), _recipe(text_file, PAPER), tmp_path / "flap", device="cpu", memory_budget="none")
    recipe = parity.quantizer_recipe(text_file, "rtn")
    compress(str(tmp_path / "flap"), recipe, tmp_path / "ram", device="cpu", memory_budget="none")
    streamed = compress(str(tmp_path / "flap"), recipe, tmp_path / "stream", device="cpu", memory_budget="1KB")
    parity.same_files(tmp_path / "ram", tmp_path / "stream")
    assert (tmp_path / "stream" / "modeling_flap.py").is_file() and "streamed from disk" in \
        streamed.warnings[0]["message"]
    messages = []
    for budget in ("none", "1KB"):  # pruning it again is refused alike
        with pytest.raises(RecipeError, match="^flap cannot prune a model") as raised:
            compress(str(tmp_path / "flap"), _recipe(text_file, PAPER), tmp_path / "again", device="cpu",
                     memory_budget=budget)
        messages.append(str(raised.value))
    assert messages[0] == messages[1] and not (tmp_path / "again").exists()
