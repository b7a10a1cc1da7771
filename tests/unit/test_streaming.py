"""Layer streaming (compressor.streaming): the same output bytes as the in-RAM run, one layer resident, refusals."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import streaming_parity as parity
import torch
import yaml
from safetensors.torch import save_file
from tiny import tiny_model

from compressor.errors import RecipeError, UsageError
from compressor.export.streamed import TensorSpec, write_safetensors
from compressor.pipeline import compress
from compressor.recipe import load_recipe, recipe_from_dict
from compressor.streaming import checkpoint_weight_bytes, plan_streaming
from compressor.streaming.layers import LayerStreamer


@pytest.fixture(scope="module")
def sharded_dir(tmp_path_factory: pytest.TempPathFactory, tiny_tokenizer: Any) -> Any:
    """A tiny Llama (hidden 256) saved as several safetensors shards, per (dtype, tied embeddings)."""
    return parity.sharded_checkpoints(tmp_path_factory, tiny_tokenizer, "sharded")


#: The shipped w4a16-gptq recipe's own stage (act-order, dampening, asymmetric calibration, lm_head ignored), beside
#: the plain one.
W4A16 = load_recipe("w4a16-gptq").stages[0].model_dump(exclude_unset=True, exclude={"method"})
#: A refinement with room to gain on the tiny checkpoint (GPTQ's 4-bit codes already fit its 128 calibration tokens).
REFINED = {"bits": 3, "refine_iters": 12, "refine_lr": 0.05}
#: Named cases: (method, stage options).
STAGES = {"w4a16": ("gptq", W4A16), "refined": ("rtn", REFINED)}


@pytest.mark.parametrize(("method", "export", "dtype", "tied"), [
    ("gptq", "compressed-tensors", "float32", False),
    ("w4a16", "compressed-tensors", "float32", False),
    ("refined", "compressed-tensors", "float32", False),
    ("gptq", "compressed-tensors", "bfloat16", True),
    ("rtn", "compressed-tensors", "bfloat16", False),
    ("gptq", "dense", "bfloat16", False),
    ("rtn", "dense", "float32", True),
])
def test_streamed_output_is_the_in_ram_output(sharded_dir: Any, text_file: Path, tmp_path: Path, method: str,
                                              export: str, dtype: str, tied: bool) -> None:
    source = sharded_dir(dtype, tied, generation_file=method != "w4a16")
    stage, options = STAGES.get(method, (method, {}))
    recipe = parity.quantizer_recipe(text_file, stage, export, **options)
    in_ram = compress(str(source), recipe, tmp_path / "ram", device="cpu", memory_budget="none")
    streamed = compress(str(source), recipe, tmp_path / "stream", device="cpu", memory_budget="1KB")
    parity.same_files(tmp_path / "ram", tmp_path / "stream")
    if export == "dense":
        assert (tmp_path / "stream" / "model.safetensors.index.json").is_file()  # sharded output, same split
    parity.same_totals(streamed, in_ram)
    assert parity.timeless_rows(in_ram) == parity.timeless_rows(streamed)
    assert "streamed from disk" in streamed.warnings[0]["message"]
    assert not (tmp_path / "stream.partial").exists()
    if method == "refined":  # the refinement ran and changed layers, streamed as in RAM
        refined = [row["extra"]["refine"] for row in streamed.layers if "refine" in row.get("extra", {})]
        assert refined and any(r["layer_mse_after"] < r["layer_mse_before"] for r in refined)


def _layer_drop_recipe(text_file: Path, drop: dict[str, Any], then: str | None, export: str) -> Any:
    """``layer_drop`` alone, or followed by a ``then`` stage (gptq, rtn, dgq), on the tiny checkpoint's 3 layers.

    ``drop["twice"]``: a first ``layer_drop`` stage with these keys runs before the one of ``drop``'s other keys.
    """
    first = [{"method": "layer_drop", **drop["twice"]}] if "twice" in drop else []
    stages: list[dict[str, Any]] = [*first, {"method": "layer_drop", **{k: v for k, v in drop.items() if k != "twice"}}]
    if then:
        stages.append(parity.quantizer_stage(then))
    return parity.streaming_recipe(text_file, stages, export)


@pytest.mark.parametrize(("drop", "then", "export", "dtype", "tied"), [
    ({"remove": 1}, None, "dense", "float32", False),  # ShortGPT alone: the survivors are copied from the source
    ({"layers": [0]}, None, "dense", "bfloat16", True),  # every survivor renumbered (scores pick the last layer here)
    ({"remove": 1}, "gptq", "compressed-tensors", "float32", False),  # survivors streamed again through GPTQ
    ({"metric": "angular", "layers": [0, 1]}, "gptq", "compressed-tensors", "bfloat16", True),
    ({"layers": [1]}, "rtn", "dense", "float32", False),
    ({"layers": [0]}, "dgq", "compressed-tensors", "float32", False),  # W4A8: smoothing folds into renumbered norms
    ({"twice": {"layers": [0]}, "layers": [0]}, "gptq", "dense", "float32", False),  # source 2 becomes layer 0
])
def test_layer_removal_streams_to_the_in_ram_bytes(sharded_dir: Any, text_file: Path, tmp_path: Path,
                                                   drop: dict[str, Any], then: str | None, export: str, dtype: str,
                                                   tied: bool) -> None:
    """A scoring pass (nothing written), the removal on the skeleton, the survivors by source index renumbered."""
    recipe = _layer_drop_recipe(text_file, drop, then, export)
    source = str(sharded_dir(dtype, tied))
    in_ram = compress(source, recipe, tmp_path / "ram", device="cpu", memory_budget="none")
    streamed = compress(source, recipe, tmp_path / "stream", device="cpu", memory_budget="1KB")
    parity.same_files(tmp_path / "ram", tmp_path / "stream")
    removed = in_ram.structure["layer_drop"]["removed"]
    assert streamed.structure == in_ram.structure and removed == drop.get("layers", removed) and removed
    left = in_ram.structure["layer_drop"]["layers_after"]
    parity.same_totals(streamed, in_ram)
    assert parity.timeless_rows(in_ram) == parity.timeless_rows(streamed)
    assert f"{left} decoder layers loaded one at a time" in streamed.warnings[0]["message"]
    assert ("copied from the checkpoint at export" in streamed.warnings[0]["message"]) == (then is None)
    assert not (tmp_path / "stream.partial").exists()


def test_streamed_eval_reads_a_linear_whose_packed_parts_span_shards(sharded_dir: Any, text_file: Path,
                                                                     tmp_path: Path) -> None:
    """With 1 MB shards the writer puts a linear's weight_shape or scale in the next file than its codes."""
    from compressor.streaming.packed import PackedCheckpoint, quantization_config

    out = tmp_path / "s"
    report = compress(str(sharded_dir()), parity.quantizer_recipe(text_file), out, device="cpu", memory_budget="1KB",
                      eval_data=str(text_file), eval_max_tokens=1024)
    reader = PackedCheckpoint(out, quantization_config(out) or {})
    split = [p for p in reader.packed if len({reader.files[n] for n in reader.files if n.startswith(p + ".")}) > 1]
    assert split and report.eval["after"]["ppl"] > 0


def test_eval_of_a_streamed_removal_scores_the_written_model(sharded_dir: Any, text_file: Path,
                                                            tmp_path: Path) -> None:
    """--eval reads the output back layer by layer: 2 layers, renumbered, GPTQ's codes; the in-RAM numbers."""
    recipe = _layer_drop_recipe(text_file, {"layers": [0]}, "gptq", "compressed-tensors")
    runs = [compress(str(sharded_dir()), recipe, tmp_path / out, device="cpu", memory_budget=budget,
                     eval_data=str(text_file), eval_max_tokens=1024) for out, budget in (("ram", "none"), ("s", "1KB"))]
    assert runs[0].eval["after"]["ppl"] == runs[1].eval["after"]["ppl"] != runs[1].eval["before"]["ppl"]
    assert runs[0].eval["before"]["ppl"] == runs[1].eval["before"]["ppl"]


#: Qwen2 with a sliding window from layer 1 on: the layers' masks differ by their type.
SLIDING = ["full_attention", "sliding_attention", "sliding_attention"]


@pytest.mark.parametrize(("drop", "then"), [({"layers": [1]}, None), ({"layers": [0]}, "gptq")])
def test_layer_removal_streams_a_family_with_per_layer_attention_types(tmp_path: Path, text_file: Path,
                                                                     tiny_tokenizer: Any, drop: dict[str, Any],
                                                                     then: str | None) -> None:
    """The skeleton's layer_types shrink with the removal and the second pass's capture gives each survivor the
    mask of its own type, as in RAM; hidden states memory-mapped as well (the scores keep earlier boundaries)."""
    model = tiny_model("qwen2", hidden_size=128, intermediate_size=256, use_sliding_window=True, sliding_window=8,
                       max_window_layers=1, layer_types=SLIDING)
    source = parity.save_sharded(model, tiny_tokenizer, tmp_path / "qwen2", "200KB", min_shards=3)
    recipe = _layer_drop_recipe(text_file, drop, then, "compressed-tensors" if then else "dense")
    compress(str(source), recipe, tmp_path / "ram", device="cpu", memory_budget="none")
    compress(str(source), recipe, tmp_path / "stream", device="cpu", memory_budget="1KB", activation_memory="1KB")
    parity.same_files(tmp_path / "ram", tmp_path / "stream")
    kept = [kind for index, kind in enumerate(SLIDING) if index not in drop["layers"]]
    assert json.loads((tmp_path / "stream" / "config.json").read_text())["layer_types"] == kept


@pytest.mark.parametrize("drop", [{"remove": 3}, {"ratio": 0.9}, {"layers": [3]}, {"metric": "angular", "remove": 3}])
def test_a_removal_refused_in_ram_is_refused_streamed_before_writing(sharded_dir: Any, text_file: Path,
                                                                    tmp_path: Path, drop: dict[str, Any]) -> None:
    recipe = _layer_drop_recipe(text_file, drop, "gptq", "compressed-tensors")
    messages = []
    for budget, out in (("none", tmp_path / "ram"), ("1KB", tmp_path / "stream")):
        with pytest.raises(RecipeError, match="^layer_drop: ") as error:
            compress(str(sharded_dir()), recipe, out, device="cpu", memory_budget=budget)
        messages.append(str(error.value))
    assert messages[0] == messages[1] and "\n" not in messages[1]
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_one_decoder_layer_is_materialised_at_a_time_in_both_passes_of_a_removal(
        sharded_dir: Any, text_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The scoring pass loads the 3 source layers, GPTQ's pass the 2 survivors; each alone, as the streamer counts."""
    def probe(self: LayerStreamer, index: int, layer: torch.nn.Module) -> tuple[int, int]:
        assert all(p.is_meta for m in self.adapter.embeddings() for p in m.parameters())
        return index, parity.resident_layers(self.adapter)

    seen, streamers = parity.watch_layer_loads(monkeypatch, probe)
    recipe = _layer_drop_recipe(text_file, {"layers": [0]}, "gptq", "compressed-tensors")
    report = compress(str(sharded_dir()), recipe, tmp_path / "o", device="cpu", memory_budget="1KB")
    assert seen == [(0, 1), (1, 1), (2, 1), (0, 1), (1, 1)]
    assert streamers[0].max_resident == 1 and streamers[0].loads == 5 and streamers[0].passes == 2
    assert "2 decoder layers loaded one at a time (5 layer loads over 2 passes), at most 1 in memory at once" \
        in report.warnings[0]["message"]


def test_one_decoder_layer_is_materialised_at_a_time(sharded_dir: Any, text_file: Path, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """Counted independently of the streamer's own counter: non-meta layers of the model at every load."""
    def probe(self: LayerStreamer, index: int, layer: torch.nn.Module) -> int:
        assert all(p.is_meta for m in self.adapter.embeddings() for p in m.parameters())  # released after capture
        assert all(p.is_meta for p in self.adapter.lm_head().parameters())  # never loaded: read again at export
        return parity.resident_layers(self.adapter)

    seen, _ = parity.watch_layer_loads(monkeypatch, probe)
    report = compress(str(sharded_dir()), parity.quantizer_recipe(text_file), tmp_path / "o", device="cpu",
                      memory_budget="1KB")
    assert seen == [1, 1, 1]
    assert "at most 1 in memory at once" in report.warnings[0]["message"]


def test_hidden_states_in_memory_mapped_files_give_the_same_output(sharded_dir: Any, text_file: Path,
                                                                     tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    mapped: list[str] = []
    from_file = torch.from_file

    def recording(path: str, *args: Any, **kwargs: Any) -> torch.Tensor:
        mapped.append(Path(path).name)
        return from_file(path, *args, **kwargs)

    monkeypatch.setattr(torch, "from_file", recording)
    recipe = parity.quantizer_recipe(text_file)
    compress(str(sharded_dir()), recipe, tmp_path / "ram", device="cpu", memory_budget="none")
    compress(str(sharded_dir()), recipe, tmp_path / "mm", device="cpu", memory_budget="1KB", activation_memory="1KB")
    assert mapped[:2] == ["hidden-1.bin", "hidden-0.bin"] and len(mapped) == 4  # layer 0's inputs, then 3 outputs
    parity.same_files(tmp_path / "ram", tmp_path / "mm")
    assert not (tmp_path / "mm.partial").exists()


@pytest.mark.parametrize(("change", "message"), [
    ({"before": [{"method": "finercut", "remove": 1}]}, "stages.0 (finercut) does not stream"),
    ({"export": "gguf"}, "export.format gguf does not stream"),
])
def test_whole_model_stages_and_formats_are_refused_before_loading(sharded_dir: Any, text_file: Path,
                                                                     tmp_path: Path, change: dict[str, Any],
                                                                     message: str) -> None:
    recipe = parity.quantizer_recipe(text_file, **({"export": change["export"]} if "export" in change else change))
    with pytest.raises(RecipeError, match="needs the whole model in RAM") as error:
        compress(str(sharded_dir()), recipe, tmp_path / "o", device="cpu", memory_budget="1KB")
    assert message in str(error.value) and "\n" not in str(error.value)
    assert not (tmp_path / "o").exists() and not (tmp_path / "o.partial").exists()


def test_unreadable_budgets_are_usage_errors(sharded_dir: Any, text_file: Path, tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="--memory-budget 'lots'"):
        compress(str(sharded_dir()), parity.quantizer_recipe(text_file), tmp_path / "o", device="cpu",
                 memory_budget="lots")
    with pytest.raises(UsageError, match="streaming reads a local directory"):
        plan_streaming("some/hub-id", "1KB", "auto")


def test_a_failed_streamed_run_leaves_nothing(sharded_dir: Any, text_file: Path, tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    finish = LayerStreamer.finish

    def failing(self: LayerStreamer, run: Any, index: int) -> None:
        if index == 2:
            raise OSError("disk full")
        finish(self, run, index)

    monkeypatch.setattr(LayerStreamer, "finish", failing)
    with pytest.raises(OSError, match="disk full"):
        compress(str(sharded_dir()), parity.quantizer_recipe(text_file), tmp_path / "o", device="cpu",
                 memory_budget="1KB")
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_the_default_budget_streams_only_what_does_not_fit(sharded_dir: Any) -> None:
    source = sharded_dir("bfloat16")
    weights = checkpoint_weight_bytes(source, "auto")
    assert weights == sum(p.stat().st_size for p in source.glob("*.safetensors")) - sum(
        8 + int.from_bytes(p.read_bytes()[:8], "little") for p in source.glob("*.safetensors"))
    assert checkpoint_weight_bytes(source, "float32") == 2 * weights
    assert not plan_streaming(str(source), "auto", "auto").stream
    assert plan_streaming(str(source), str(weights - 1), "auto").stream
    assert not plan_streaming(str(source), str(weights), "auto").stream
    assert not plan_streaming(str(source), "none", "auto").stream


def test_header_first_writer_matches_save_file(tmp_path: Path) -> None:
    """Every dtype the exports write, names out of order, a scalar: the same bytes as safetensors' own writer."""
    tensors = {"z.weight": torch.randn(3, 4), "a.scale": torch.randn(2, 5).bfloat16(), "m.h": torch.randn(3).half(),
               "packed": torch.randint(-9, 9, (5, 2), dtype=torch.int32), "shape": torch.tensor([3, 4]),
               "q": torch.randint(-9, 9, (7,), dtype=torch.int8), "u": torch.zeros(2, dtype=torch.uint8),
               "scalar": torch.tensor(2.0)}
    save_file(tensors, str(tmp_path / "a.safetensors"), metadata={"format": "pt"})
    specs = [TensorSpec(name, t.dtype, tuple(t.shape)) for name, t in tensors.items()]
    write_safetensors(tmp_path / "b.safetensors", specs, tensors.__getitem__, {"format": "pt"})
    assert (tmp_path / "a.safetensors").read_bytes() == (tmp_path / "b.safetensors").read_bytes()


def test_cli_refusal_is_one_line_with_exit_2(sharded_dir: Any, text_file: Path, tmp_path: Path, runner: Any) -> None:
    from compressor.cli import app

    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({"name": "t", "calibration": {"dataset": str(text_file), "samples": 2,
                                                                    "seq_len": 32},
                                      "stages": [{"method": "nf4"}],
                                      "export": {"format": "dense"}}))
    result = runner.invoke(app, ["compress", str(sharded_dir()), "--recipe", str(recipe), "--out",
                                 str(tmp_path / "o"), "--memory-budget", "10KB"])
    assert result.exit_code == 2, result.output
    assert "stages.0 (nf4) does not stream" in result.output
    assert len(result.output.strip().splitlines()) == 1 and not (tmp_path / "o").exists()


@pytest.mark.parametrize(("stage", "export", "dtype"), [
    ({"weight_bits": 4, "group_size": 32}, "compressed-tensors", "float32"),  # W4A8 pack-quantized, smoothing
    ({"weight_bits": 4, "group_size": 32, "solver": "rtn", "smoothing": None}, "compressed-tensors", "bfloat16"),
    ({"weight_bits": 8}, "compressed-tensors", "bfloat16"),  # W8A8 int-quantized
    ({"weight_bits": 4, "group_size": 32, "act_percentile": 99.0}, "dense", "float32"),
])
def test_dgq_streams_to_the_in_ram_bytes(sharded_dir: Any, text_file: Path, tmp_path: Path, stage: dict[str, Any],
                                         export: str, dtype: str) -> None:
    """dgq is layer-local (smoothing folds into the layer's own norms, Int8Linear swaps its own linears)."""
    recipe = parity.streaming_recipe(text_file, [{"method": "dgq", **stage}], export)
    source = str(sharded_dir(dtype))
    in_ram = compress(source, recipe, tmp_path / "ram", device="cpu", memory_budget="none")
    streamed = compress(source, recipe, tmp_path / "stream", device="cpu", memory_budget="1KB")
    parity.same_files(tmp_path / "ram", tmp_path / "stream")
    assert streamed.avg_bits_per_weight == in_ram.avg_bits_per_weight
    assert "streamed from disk" in streamed.warnings[0]["message"]


def test_dgq_refusals_under_streaming(sharded_dir: Any, text_file: Path, tmp_path: Path) -> None:
    """compressor-int8's writer reads every Int8Linear of the resident model; --eval would score float activations."""
    stage = {"method": "dgq", "weight_bits": 4, "group_size": 32}
    data = {"name": "t", "calibration": {"dataset": str(text_file), "samples": 2, "seq_len": 32},
            "stages": [stage], "export": {"format": "compressor-int8"}}
    with pytest.raises(RecipeError, match="export.format compressor-int8 does not stream"):
        compress(str(sharded_dir()), recipe_from_dict(data), tmp_path / "o", device="cpu", memory_budget="1KB")
    data["export"] = {"format": "compressed-tensors"}
    with pytest.raises(UsageError, match="--eval under streaming .*INT8 activations"):
        compress(str(sharded_dir()), recipe_from_dict(data), tmp_path / "o", device="cpu", memory_budget="1KB",
                 eval_data=str(text_file))
    assert not (tmp_path / "o").exists() and not (tmp_path / "o.partial").exists()
