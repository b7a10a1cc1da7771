"""What the layer-streaming tests share: tiny checkpoints saved in several shards, recipes over a small calibration
set, and the checks that a streamed run wrote what the in-RAM run of the same recipe writes.

Kept in one place so that every streaming test file compares runs the same way (which files may differ, which
report fields carry timings) and a change of that rule is made once. Fixtures stay in the test files: each
builds its own checkpoints (some scale weights first) through :func:`sharded_checkpoints`.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping
from pathlib import Path
from typing import Any, TypeVar

import pytest
import torch
from isolation import run_without_compressor
from tiny import tiny_model

from compressor.recipe import Recipe, recipe_from_dict
from compressor.streaming.layers import LayerStreamer

#: Files whose bytes legitimately differ between two runs (timings, peak memory, the streaming note).
REPORTS = frozenset({"compression_report.json", "compression_report.md", "layers.png"})
#: A tiny model wide enough (hidden 256, MLP 512) that 400 KB shards split its layers over several files.
WIDE = {"hidden_size": 256, "intermediate_size": 512}
#: The report's totals that a streamed run must give exactly as the in-RAM run does.
TOTALS = ("size_bytes", "params", "avg_bits_per_weight", "avg_bits_incl_metadata", "compression_ratio")

Probe = TypeVar("Probe")


def save_sharded(model: Any, tokenizer: Any, path: Path, shard_size: str, min_shards: int) -> Path:
    """Save ``model`` and ``tokenizer`` to ``path`` in shards of ``shard_size``; at least ``min_shards`` files,
    so a test that needs a layer's tensors spread over several files fails when the model became too small."""
    model.save_pretrained(path, max_shard_size=shard_size)
    tokenizer.save_pretrained(path)
    assert len(list(path.glob("*.safetensors"))) >= min_shards
    return path


def sharded_checkpoints(tmp_path_factory: pytest.TempPathFactory, tokenizer: Any, prefix: str, *,
                        sizes: Mapping[str, int] = WIDE, shard_size: str = "400KB", min_shards: int = 3,
                        edit: Callable[[torch.nn.Module], None] | None = None) -> Callable[..., Path]:
    """A maker of saved tiny checkpoints, each built once: ``make(dtype, tied, family, generation_file)``.

    ``sizes`` overrides the tiny config (``{}`` keeps the family's own); ``edit`` changes the float32 model's
    weights in place, without gradients, before it is cast and saved. ``generation_file=False`` deletes
    generation_config.json, so transformers derives one from config.json (the streaming skeleton must too).
    """
    made: dict[tuple[str, str, bool, bool], Path] = {}

    def make(dtype: str = "float32", tied: bool = False, family: str = "llama", generation_file: bool = True) -> Path:
        key = (family, dtype, tied, generation_file)
        if key not in made:
            model = tiny_model(family, tie_word_embeddings=tied, **sizes)
            if edit is not None:
                with torch.no_grad():
                    edit(model)
            path = save_sharded(model.to(getattr(torch, dtype)), tokenizer,
                                tmp_path_factory.mktemp(f"{prefix}-{family}-{dtype}-{tied}"), shard_size, min_shards)
            if not generation_file:
                (path / "generation_config.json").unlink()
            made[key] = path
        return made[key]

    return make


def streaming_recipe(text_file: Path, stages: list[dict[str, Any]], export: str, **extra: Any) -> Recipe:
    """``stages`` calibrated on 4 samples of 32 tokens (batches of 2), exported in 1 MB shards so that a linear's
    packed parts may land in different files."""
    return recipe_from_dict({"name": "t", "calibration": {"dataset": str(text_file), "samples": 4, "seq_len": 32,
                                                          "batch_size": 2},
                             "stages": stages, "export": {"format": export, "max_shard_mb": 1}, **extra})


def quantizer_stage(method: str, **keys: Any) -> dict[str, Any]:
    """A 4-bit ``method`` stage at groups of 32 (``keys`` override); dgq names its width ``weight_bits``."""
    return {"method": method, "weight_bits" if method == "dgq" else "bits": 4, "group_size": 32, **keys}


def quantizer_recipe(text_file: Path, method: str = "gptq", export: str = "compressed-tensors",
                     before: list[dict[str, Any]] | None = None, **stage_keys: Any) -> Recipe:
    """One :func:`quantizer_stage` (``stage_keys`` override), after the ``before`` stages."""
    return streaming_recipe(text_file, [*(before or []), quantizer_stage(method, **stage_keys)], export)


def same_files(a: Path, b: Path, differing: Collection[str] = REPORTS) -> list[str]:
    """Assert both directories hold the same file names and, apart from ``differing``, the same bytes."""
    names = sorted(p.name for p in a.iterdir())
    assert names == sorted(p.name for p in b.iterdir())
    for name in names:
        if name not in differing:
            assert (a / name).read_bytes() == (b / name).read_bytes(), name
    return names


def timeless_rows(report: Any) -> list[dict[str, Any]]:
    """The report's per-module rows without their timings, the one part two runs may not agree on."""
    return [{k: v for k, v in row.items() if "seconds" not in k and "time" not in k} for row in report.layers]


def same_totals(streamed: Any, in_ram: Any, keys: Collection[str] = TOTALS) -> None:
    """Assert the two reports' ``keys`` are equal, naming the first that is not."""
    for key in keys:
        assert getattr(streamed, key) == getattr(in_ram, key), key


def resident_layers(adapter: Any) -> int:
    """How many of the model's decoder layers hold real (not meta) weights."""
    return sum(not next(layer.parameters()).is_meta for layer in adapter.layers())


def watch_layer_loads(monkeypatch: pytest.MonkeyPatch, probe: Callable[[LayerStreamer, int, torch.nn.Module], Probe]
                      ) -> tuple[list[Probe], list[LayerStreamer]]:
    """Record ``probe(streamer, index, layer)`` after every decoder-layer load, and every streamer that notes its run.

    Counted from outside the streamer, so a test does not trust the streamer's own counters alone.
    """
    seen: list[Probe] = []
    streamers: list[LayerStreamer] = []
    load = LayerStreamer.load
    note = LayerStreamer.note

    def counting(self: LayerStreamer, index: int) -> torch.nn.Module:
        layer = load(self, index)
        seen.append(probe(self, index, layer))
        return layer

    def noting(self: LayerStreamer) -> dict[str, Any]:
        streamers.append(self)
        return note(self)

    monkeypatch.setattr(LayerStreamer, "load", counting)
    monkeypatch.setattr(LayerStreamer, "note", noting)
    return seen, streamers


#: A user's Python: transformers alone, trusting the shipped file; prints the class and the largest logit difference.
_RELOAD = """
import sys
import torch
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], trust_remote_code=True).eval()
tokens, expected = torch.load(sys.argv[2]), torch.load(sys.argv[3])
with torch.no_grad():
    print("RESULT", type(model).__name__, float((model(tokens).logits - expected).abs().max()))
"""


def reload_without_compressor(out: Path, tokens: torch.Tensor, expected: torch.Tensor, work: Path
                              ) -> tuple[str, float]:
    """The class transformers alone builds from ``out`` (its shipped modeling file trusted) and the largest
    difference of its logits for ``tokens`` from ``expected``; ``work`` holds the tensors handed to the child."""
    torch.save(expected, work / "logits.pt")
    torch.save(tokens, work / "tokens.pt")
    child = run_without_compressor(_RELOAD, str(out), str(work / "tokens.pt"), str(work / "logits.pt"), cwd=work)
    assert child.returncode == 0, child.stderr[-3000:]
    result = [line.split() for line in child.stdout.splitlines() if line.startswith("RESULT")][0]
    return result[1], float(result[2])
