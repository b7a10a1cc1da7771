"""FinerCut's cache of every layer boundary's hidden states in memory-mapped files above --activation-memory."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import torch
from test_layer_drop import TOKENS, deep_model

from compressor.engine import ModelContext, run_stages
from compressor.errors import RecipeError
from compressor.methods.prune.finercut import FinerCut, FinerCutConfig
from compressor.methods.prune.finercut.cache import ALIGNMENT, CacheSummary, StateCache
from compressor.methods.prune.finercut.ops import SearchResult
from compressor.methods.prune.finercut.saved import Searched, from_state, to_state
from compressor.methods.prune.finercut.search import SublayerSearch
from compressor.models import get_adapter
from compressor.pipeline import compress
from compressor.recipe import recipe_from_dict

#: The report's parts that hold timings; every other file of the output must be the same bytes.
TIMED = ("compression_report.json", "compression_report.md")


def _files_of(states: list[list[torch.Tensor]]) -> list[str | None]:
    return [h.untyped_storage().filename for boundary in states for h in boundary]


def _watch_search(monkeypatch: pytest.MonkeyPatch) -> dict[str, list[list[str | None]]]:
    """Records which file backs every cached state when the search starts and after each commit."""
    seen: dict[str, list[list[str | None]]] = {"start": [], "commits": []}
    init, commit = SublayerSearch.__init__, SublayerSearch.commit

    def starting(self: SublayerSearch, *args: Any, **kwargs: Any) -> None:
        init(self, *args, **kwargs)
        seen["start"].append(_files_of(self.states))

    def committing(self: SublayerSearch, key: tuple[int, str]) -> None:
        commit(self, key)
        seen["commits"].append(_files_of(self.states))

    monkeypatch.setattr(SublayerSearch, "__init__", starting)
    monkeypatch.setattr(SublayerSearch, "commit", committing)
    return seen


@pytest.mark.parametrize("stage", [
    {"search": "lazy"},
    {"search": "exact", "measure": "js"},
    {"search": "screened", "search_dtype": "bfloat16"},  # recompute() rewrites every boundary's file
])
def test_states_in_files_give_the_same_removals_scores_and_bytes(
    tmp_path: Path, text_file: Path, tiny_tokenizer: Any, monkeypatch: pytest.MonkeyPatch, stage: dict[str, Any],
) -> None:
    """compress() with --activation-memory 1KB caches every boundary in files under OUT.partial, still file-backed
    after every commit, and removes the same sublayers with the same scores, writing the same bytes, as in RAM."""
    source = tmp_path / "model"
    deep_model("llama").save_pretrained(source)
    tiny_tokenizer.save_pretrained(source)
    recipe = recipe_from_dict({
        "name": "finercut-cache",
        "calibration": {"dataset": str(text_file), "samples": 6, "seq_len": 32, "batch_size": 4},
        "stages": [{"method": "finercut", "remove": 4, **stage}],
    })
    seen = _watch_search(monkeypatch)
    in_ram = compress(str(source), recipe, tmp_path / "ram", device="cpu", memory_budget="none")
    assert seen["start"] and all(name is None for name in seen["start"][0])  # the default: RAM
    seen["start"].clear()
    seen["commits"].clear()
    mapped = compress(str(source), recipe, tmp_path / "mapped", device="cpu", memory_budget="none",
                      activation_memory="1KB")

    files = seen["start"][0]
    assert len(files) == 6 * 2  # (5 layers + 1) boundaries x 2 batches, every one in a file
    folder = Path(str(files[0])).parent
    assert folder.parent == tmp_path / "mapped.partial" and folder.name.startswith("finercut-states-")
    assert sorted({Path(str(name)).name for name in files}) == [f"boundary-{n}.bin" for n in range(6)]
    assert len(seen["commits"]) == 4 and all(later == files for later in seen["commits"])
    assert not folder.exists()  # removed with the search, and OUT.partial with the finished run

    cache = {"in": "memory-mapped files", "bytes": 6 * 6 * 32 * 64 * 4, "activation_limit": 1000}
    assert mapped.structure["finercut"]["state_cache"] == cache
    assert in_ram.structure["finercut"]["state_cache"] == {**cache, "in": "RAM", "activation_limit": None}
    untimed = [{k: v for k, v in r.structure["finercut"].items() if k not in ("seconds", "state_cache")}
               for r in (mapped, in_ram)]
    assert untimed[0] == untimed[1]
    scores = ("score", "score_at_least", "score_when_removed", "order")
    assert [{k: r["extra"][k] for k in scores} for r in mapped.layers] == \
           [{k: r["extra"][k] for k in scores} for r in in_ram.layers]
    names = sorted(p.name for p in (tmp_path / "ram").iterdir())
    assert names == sorted(p.name for p in (tmp_path / "mapped").iterdir()) and "model.safetensors" in names
    for name in set(names) - set(TIMED):
        assert (tmp_path / "mapped" / name).read_bytes() == (tmp_path / "ram" / name).read_bytes(), name


def test_the_whole_cache_is_weighed_against_the_limit(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """One boundary under the limit stays in RAM only when all of them fit: the cache is (layers + 1) boundaries."""
    seen = _watch_search(monkeypatch)
    boundary = sum(t.numel() * t.element_size() for t in [torch.empty(3, 24, 64), torch.empty(1, 24, 64)])
    for limit, in_files in [(6 * boundary, False), (6 * boundary - 1, True)]:
        model = deep_model("llama")
        assert get_adapter(model).config.hidden_size == 64
        run = ModelContext(model, get_adapter(model), TOKENS, torch.device("cpu"), batch_size=3,
                           activation_limit=limit, temp_dir=tmp_path / "scratch")
        run_stages(run, [FinerCut(FinerCutConfig(method="finercut", remove=1))])
        assert all((name is not None) == in_files for name in seen["start"][-1])
    assert not (tmp_path / "scratch").exists()  # made for the files, it went with them after the search


def test_each_batch_starts_on_an_aligned_slot_and_the_file_is_unlinked(tmp_path: Path) -> None:
    cache = StateCache(2, limit=0, directory=tmp_path)
    batches = [torch.randn(3, 5, 7), torch.randn(1, 5, 7)]  # 105 floats: the next slot starts at 112
    cache.add(batches)
    kept = cache.states[0]
    assert [torch.equal(a, b) for a, b in zip(kept, batches, strict=True)] == [True, True]
    assert [h.data_ptr() % ALIGNMENT for h in kept] == [0, 0]
    assert kept[1].data_ptr() - kept[0].data_ptr() == 112 * 4
    name = kept[0].untyped_storage().filename
    assert name is not None and not os.path.exists(name) and Path(name).parent.exists()
    new = torch.randn(3, 5, 7)
    assert cache.replace(kept[0], new) is kept[0] and torch.equal(kept[0], new)
    assert cache.replace(kept[0], new.double()).dtype == torch.float64  # never rounded into the file
    cache.close()
    assert cache.states == [] and list(tmp_path.iterdir()) == []  # the directory was there before: it stays


def test_streaming_refuses_finercut_saying_why_and_what_to_do(tmp_path: Path, text_file: Path,
                                                               tiny_tokenizer: Any) -> None:
    """One line: the later layers' weights would be read again per candidate; run in RAM, the cache spills."""
    source = tmp_path / "model"
    deep_model("llama").save_pretrained(source)
    tiny_tokenizer.save_pretrained(source)
    recipe = recipe_from_dict({
        "name": "finercut-streamed",
        "calibration": {"dataset": str(text_file), "samples": 2, "seq_len": 16},
        "stages": [{"method": "finercut", "remove": 1}],
    })
    with pytest.raises(RecipeError) as error:
        compress(str(source), recipe, tmp_path / "out", device="cpu", memory_budget="1KB")
    message = str(error.value)
    assert message.startswith("stages.0 (finercut) does not stream") and "\n" not in message
    for part in ("every layer after it", "weights from the checkpoint again", "--memory-budget none",
                 "memory-mapped files above --activation-memory"):
        assert part in message
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()


@pytest.mark.parametrize("cache", [CacheSummary(True, 12345, 1000), CacheSummary(False, 99, None), None])
def test_a_resumed_run_reports_where_the_searchs_cache_was(cache: CacheSummary | None) -> None:
    """The checkpointed search keeps its cache summary, so a resumed run's report is the interrupted one's;
    a state saved before the summary existed reads as None."""
    searched = Searched([(0, "mlp")], SearchResult(steps=[]), {}, 1.0, forwards=2, cache=cache)
    state = to_state(searched)
    assert ("state_cache" in state) == (cache is not None)
    assert from_state(state).cache == cache
