"""Streamed perplexity (compressor.streaming.perplexity): the in-RAM ``evaluate``'s numbers, one layer resident."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import streaming_parity as parity
import torch

from compressor.pipeline import evaluate
from compressor.streaming.perplexity import streamed_perplexity

CPU = torch.device("cpu")


@pytest.mark.parametrize("family", ["llama", "opt", "qwen2", "phi3"])
def test_streamed_ppl_is_the_in_ram_ppl(model_dir_factory: Callable[[str], Path], text_file: Path,
                                         family: str) -> None:
    source = model_dir_factory(family)
    ram = evaluate(str(source), str(text_file), seq_len=32, max_tokens=320, device="cpu")
    streamed = streamed_perplexity(source, str(text_file), seq_len=32, max_tokens=320, device=CPU)
    assert (streamed.nll, streamed.ppl, streamed.tokens, streamed.windows) == (ram.nll, ram.ppl, ram.tokens,
                                                                               ram.windows)


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory, tiny_tokenizer: Any) -> Callable[..., Path]:
    """A tiny Llama (hidden 128) saved as several safetensors shards, per (dtype, tied embeddings)."""
    return parity.sharded_checkpoints(tmp_path_factory, tiny_tokenizer, "saved", shard_size="200KB", min_shards=1,
                                      sizes={"hidden_size": 128, "intermediate_size": 256})


@pytest.mark.parametrize(("dtype", "tied"), [("float32", False), ("bfloat16", True)])
def test_chunked_logits_and_tied_heads(saved: Callable[..., Path], text_file: Path, dtype: str, tied: bool) -> None:
    """Logits made 5 positions at a time: the window's sum is accumulated in pieces (float order only)."""
    source = saved(dtype, tied)
    ram = evaluate(str(source), str(text_file), seq_len=32, max_tokens=256, device="cpu")
    whole = streamed_perplexity(source, str(text_file), seq_len=32, max_tokens=256, device=CPU)
    chunked = streamed_perplexity(source, str(text_file), seq_len=32, max_tokens=256, device=CPU, chunk_rows=5)
    assert whole.nll == ram.nll
    assert chunked.nll == pytest.approx(ram.nll, rel=1e-6) and chunked.tokens == ram.tokens


def test_one_decoder_layer_is_resident_while_scoring(saved: Callable[..., Path], text_file: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    from compressor.streaming import layers, perplexity

    seen: list[int] = []
    load = layers.load_layer

    def counting(adapter: Any, checkpoint: Any, index: int) -> torch.nn.Module:
        layer = load(adapter, checkpoint, index)
        seen.append(parity.resident_layers(adapter))
        assert all(p.is_meta for m in adapter.embeddings() for p in m.parameters())  # released after the capture
        assert all(p.is_meta for p in adapter.lm_head().parameters())  # read only for the scoring
        return layer

    monkeypatch.setattr(perplexity, "load_layer", counting)
    streamed_perplexity(saved(), str(text_file), seq_len=32, max_tokens=128, device=CPU)
    assert seen == [1, 1, 1]


@pytest.mark.parametrize(("export", "stage"), [
    ("compressed-tensors", {}),
    ("compressed-tensors", {"method": "rtn", "group_size": -1}),
    ("dense", {}),
])
def test_streamed_compress_eval_scores_the_written_output(saved: Callable[..., Path], text_file: Path,
                                                          tmp_path: Path, export: str, stage: dict[str, Any]) -> None:
    """The streamed run reads its output back layer by layer: the in-RAM run's before/after numbers exactly."""
    from compressor.pipeline import compress

    recipe = parity.quantizer_recipe(text_file, export=export, **stage)
    kwargs: dict[str, Any] = {"device": "cpu", "eval_data": str(text_file), "eval_max_tokens": 256}
    ram = compress(str(saved("bfloat16")), recipe, tmp_path / "ram", memory_budget="none", **kwargs)
    streamed = compress(str(saved("bfloat16")), recipe, tmp_path / "s", memory_budget="1KB",
                        max_ppl_increase=1000.0, **kwargs)
    assert "streamed from disk" in streamed.warnings[0]["message"]
    for which in ("before", "after"):
        assert streamed.eval[which]["nll"] == ram.eval[which]["nll"], which
    assert ram.eval["after"]["nll"] != ram.eval["before"]["nll"]
    assert streamed.eval["increase_pct"] == ram.eval["increase_pct"] and streamed.quality_gate["passed"]
    assert {"eval_before", "eval_after"} <= set(streamed.timings)
    written = json.loads((tmp_path / "s" / "compression_report.json").read_text())
    assert written["eval"] == streamed.eval


def test_eval_command_streams_above_the_budget(saved: Callable[..., Path], text_file: Path, runner: Any) -> None:
    from compressor.cli import app

    args = ["eval", str(saved()), "--data", str(text_file), "--seq-len", "32", "--max-tokens", "256", "--json"]
    whole = runner.invoke(app, [*args, "--memory-budget", "none"])
    streamed = runner.invoke(app, [*args, "--memory-budget", "1KB"])
    assert whole.exit_code == 0 and streamed.exit_code == 0, streamed.output
    a, b = json.loads(whole.stdout), json.loads(streamed.stdout)
    assert (a["ppl"], a["tokens"]) == (b["ppl"], b["tokens"]) and b["streamed"] and not a["streamed"]


@pytest.mark.parametrize(("symmetric", "group_size"), [(True, 32), (False, 32), (False, -1), (True, -1)])
def test_packed_reader_dequantizes_as_the_run(tmp_path: Path, symmetric: bool, group_size: int) -> None:
    """Codes packed by the exporter's own pack_weight read back to the very weight ``dequantize`` gives."""
    from safetensors.torch import save_file

    from compressor.export.compressed_tensors import pack_weight
    from compressor.methods.quant.ops import QuantizedWeight
    from compressor.streaming.packed import PackedCheckpoint

    torch.manual_seed(0)
    groups = 64 // 32 if group_size > 0 else 1
    qweight = QuantizedWeight(q=torch.randint(0, 16, (8, 64), dtype=torch.uint8),
                              scale=torch.rand(8, groups) + 0.1,
                              zero=torch.randint(0, 16, (8, groups), dtype=torch.int32) if not symmetric
                              else torch.full((8, groups), 8, dtype=torch.int32),
                              bits=4, group_size=group_size, symmetric=symmetric)
    tensors = {f"m.{k}": v for k, v in pack_weight(qweight, torch.bfloat16).items()}
    save_file({**tensors, "n.weight": torch.ones(3)}, str(tmp_path / "model.safetensors"))
    scheme = {"num_bits": 4, "strategy": "group" if group_size > 0 else "channel", "group_size": group_size,
              "symmetric": symmetric}
    reader = PackedCheckpoint(tmp_path, {"format": "pack-quantized",
                                         "config_groups": {"g": {"targets": ["re:m$"], "weights": scheme}}})
    stored = replace(qweight, scale=qweight.scale.to(torch.bfloat16).float())
    assert reader.has("m.weight") and not reader.has("m.weight_packed.weight")
    assert torch.equal(reader.read("m.weight", torch.bfloat16), stored.dequantize(torch.bfloat16))
    assert torch.equal(reader.read("n.weight", torch.float32), torch.ones(3))


def test_int8_activation_files_are_refused(tmp_path: Path) -> None:
    from compressor.errors import UsageError
    from compressor.streaming.packed import PackedCheckpoint

    quant = {"format": "pack-quantized", "config_groups": {"g": {"targets": ["Linear"], "weights": {"num_bits": 4},
                                                               "input_activations": {"num_bits": 8}}}}
    with pytest.raises(UsageError, match="INT8 .*--memory-budget none"):
        PackedCheckpoint(tmp_path, quant)


def test_a_packed_output_is_budgeted_at_its_dequantized_size(saved: Callable[..., Path], text_file: Path,
                                                             tmp_path: Path) -> None:
    """``auto`` must stream a 4-bit file that fits on disk but not once dequantized: its size is the dense one."""
    from compressor.pipeline import compress
    from compressor.streaming import checkpoint_weight_bytes

    source = saved("bfloat16")
    recipe = parity.quantizer_recipe(text_file, export="compressed-tensors")
    compress(str(source), recipe, tmp_path / "ct", device="cpu", memory_budget="none")
    dense = checkpoint_weight_bytes(source, "auto")
    on_disk = sum(p.stat().st_size for p in (tmp_path / "ct").glob("*.safetensors"))
    assert on_disk < 0.6 * dense
    assert checkpoint_weight_bytes(tmp_path / "ct", "auto") == dense
    assert checkpoint_weight_bytes(tmp_path / "ct", "float32") == 2 * dense


def test_a_failed_gate_under_streaming_still_writes_the_output(saved: Callable[..., Path], text_file: Path,
                                                                tmp_path: Path) -> None:
    """The gate is judged on the written output before the report is written; the run then fails (exit 3)."""
    from compressor.errors import QualityGateError
    from compressor.pipeline import compress

    with pytest.raises(QualityGateError, match="exceeds the limit"):
        compress(str(saved()), parity.quantizer_recipe(text_file, "rtn", "dense", bits=2), tmp_path / "o", device="cpu",
                 memory_budget="1KB", eval_data=str(text_file), eval_max_tokens=128, max_ppl_increase=0.0)
    written = json.loads((tmp_path / "o" / "compression_report.json").read_text())
    assert written["quality_gate"]["passed"] is False and written["eval"]["after"]["ppl"] > 0
    assert not (tmp_path / "o.partial").exists()
