"""Per-layer checkpoints and ``compress(..., resume=True)``: an interrupted run, resumed, writes the same bytes.

The interruption is a ``KeyboardInterrupt`` raised from the progress callback, which the engine calls right after
a layer's checkpoint is written (the CLI tests kill a real process with SIGKILL).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from run_outputs import comparable_files
from tiny import tiny_model

from compressor import checkpoint
from compressor.errors import UsageError
from compressor.pipeline import compress
from compressor.recipe import load_recipe

GPTQ = """\
name: tiny-gptq
calibration: {{dataset: "{calib}", samples: 4, seq_len: 32, batch_size: 2}}
stages:
  - method: gptq
    bits: 4
    group_size: 32
    act_order: true
export: {{format: compressed-tensors}}
"""
# ShortGPT closes a pass (model-level); GPTQ runs in a second pass over the 4 layers left. Dense: the file holds
# the layers' weights (restored from the checkpoint), where compressed-tensors holds the codes.
TWO_PASSES = """\
name: tiny-drop-gptq
calibration: {{dataset: "{calib}", samples: 4, seq_len: 32, batch_size: 2}}
stages:
  - method: layer_drop
    metric: block_influence
    remove: 2
  - method: gptq
    bits: 4
    group_size: 32
export: {{format: dense}}
"""

# BAQ plans each linear's width in its own pass (model-level); the GPTQ pass after it must use every planned width.
BAQ = """\
name: tiny-baq-gptq
calibration: {{dataset: "{calib}", samples: 4, seq_len: 32, batch_size: 2}}
stages:
  - method: baq
    avg_bits: 3.0
    candidates: [2, 3, 4, 8]
    granularity: module
  - method: gptq
    group_size: 32
export: {{format: compressed-tensors}}
"""
# SliceGPT's shared basis comes from a forward of the whole model in prepare; GPTQ shares the pass (one sweep).
SLICE = """\
name: tiny-slice-gptq
calibration: {{dataset: "{calib}", samples: 4, seq_len: 32, batch_size: 2}}
stages:
  - method: slicegpt
    slicing: 0.25
  - method: gptq
    bits: 4
    group_size: 16
export: {{format: compressed-tensors}}
"""
RECIPES = {"gptq": GPTQ, "two": TWO_PASSES, "baq": BAQ, "slice": SLICE}


@pytest.fixture(scope="module")
def six_layers(tmp_path_factory: pytest.TempPathFactory, tiny_tokenizer) -> Path:
    path = tmp_path_factory.mktemp("six-layers")
    tiny_model("llama", num_hidden_layers=6).save_pretrained(path)
    tiny_tokenizer.save_pretrained(path)
    return path


def _recipe(tmp_path: Path, text: str, calib: Path, *sets: str):
    path = tmp_path / "recipe.yaml"
    path.write_text(text.format(calib=calib))
    return load_recipe(path, list(sets))


def _interrupt_after(layers: int, label: str = "gptq"):
    def progress(phase: str, done: int, total: int) -> None:
        if phase == label and done == layers:
            raise KeyboardInterrupt

    return progress


@pytest.fixture(scope="module")
def reference(six_layers: Path, text_file: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict]:
    """Uninterrupted runs, without checkpoints, of each recipe."""
    runs = {}
    for name, text in RECIPES.items():
        tmp = tmp_path_factory.mktemp(name)
        compress(six_layers, _recipe(tmp, text, text_file), tmp / "out", checkpoint=False)
        runs[name] = comparable_files(tmp / "out")
    return runs


@pytest.mark.parametrize(("recipe", "after"), [("gptq", 1), ("gptq", 4), ("two", 2), ("baq", 3)])
def test_resume_writes_the_same_bytes(six_layers: Path, text_file: Path, tmp_path: Path, reference: dict,
                                      recipe: str, after: int) -> None:
    text = RECIPES[recipe]
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        compress(six_layers, _recipe(tmp_path, text, text_file), out, progress=_interrupt_after(after))
    manifest = json.loads((tmp_path / "out.partial" / "manifest.json").read_text())
    assert (manifest["pass"], manifest["layer"]) == ((0 if recipe == "gptq" else 1), after - 1)
    assert not out.exists()
    compress(six_layers, _recipe(tmp_path, text, text_file), out, resume=True)
    assert comparable_files(out) == reference[recipe]
    assert {p.name for p in tmp_path.iterdir()} == {"recipe.yaml", "out"}  # the checkpoints went with success


def test_resume_skips_the_finished_layers(six_layers: Path, text_file: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        compress(six_layers, _recipe(tmp_path, GPTQ, text_file), out, progress=_interrupt_after(4))
    computed: list[int] = []
    compress(six_layers, _recipe(tmp_path, GPTQ, text_file), out, resume=True,
             progress=lambda phase, done, total: computed.append(done))
    assert computed == [5, 6]


def test_a_write_cut_short_leaves_the_previous_checkpoint(six_layers: Path, text_file: Path, tmp_path: Path,
                                                          reference: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    """A kill while layer 3's files are written: the manifest still names layer 2, and resume gets it right."""
    real_write, calls = checkpoint.write_safetensors, []

    def dying_write(path: Path, specs: list, read: Any, metadata: dict | None = None) -> None:
        calls.append(path.name)
        if "pass0-hidden3" in path.name:  # layer 3's weights are written, its outputs half-written
            path.write_bytes(b"half a file")
            raise KeyboardInterrupt
        real_write(path, specs, read, metadata)

    monkeypatch.setattr(checkpoint, "write_safetensors", dying_write)
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        compress(six_layers, _recipe(tmp_path, GPTQ, text_file), out)
    monkeypatch.undo()
    partial = tmp_path / "out.partial"
    assert json.loads((partial / "manifest.json").read_text())["layer"] == 2
    assert not list(partial.glob("*.tmp"))
    compress(six_layers, _recipe(tmp_path, GPTQ, text_file), out, resume=True)
    assert comparable_files(out) == reference["gptq"]


def _interrupted(six_layers: Path, text_file: Path, tmp_path: Path) -> Path:
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        compress(six_layers, _recipe(tmp_path, GPTQ, text_file), out, progress=_interrupt_after(2))
    return out


def test_resume_refuses_another_recipe(six_layers: Path, text_file: Path, tmp_path: Path) -> None:
    out = _interrupted(six_layers, text_file, tmp_path)
    with pytest.raises(UsageError, match=r"different recipe; rerun without --resume"):
        compress(six_layers, _recipe(tmp_path, GPTQ, text_file, "stages.0.bits=3"), out, resume=True)


def test_resume_refuses_other_weights(six_layers: Path, text_file: Path, tmp_path: Path, tiny_tokenizer) -> None:
    out = _interrupted(six_layers, text_file, tmp_path)
    other = tmp_path / "other-model"
    tiny_model("llama", seed=1, num_hidden_layers=6).save_pretrained(other)
    tiny_tokenizer.save_pretrained(other)
    with pytest.raises(UsageError, match=r"different model weights/config;"):
        compress(other, _recipe(tmp_path, GPTQ, text_file), out, resume=True)


def test_resume_refuses_other_calibration_text(six_layers: Path, text_file: Path, tmp_path: Path) -> None:
    """The same recipe naming the same file, whose text changed since: only the calibration tokens differ."""
    calib = tmp_path / "calib.txt"
    calib.write_text(text_file.read_text())
    out = _interrupted(six_layers, calib, tmp_path)
    calib.write_text(text_file.read_text()[::-1])
    with pytest.raises(UsageError, match=r"with a different calibration tokens;"):
        compress(six_layers, _recipe(tmp_path, GPTQ, calib), out, resume=True)


def test_fresh_run_over_a_checkpoint_is_refused(six_layers: Path, text_file: Path, tmp_path: Path) -> None:
    out = _interrupted(six_layers, text_file, tmp_path)
    with pytest.raises(UsageError, match=r"checkpoints of an unfinished run: add --resume"):
        compress(six_layers, _recipe(tmp_path, GPTQ, text_file), out)
    with pytest.raises(UsageError, match=r"no checkpoint to resume"):
        compress(six_layers, _recipe(tmp_path, GPTQ, text_file), tmp_path / "elsewhere", resume=True)


def test_no_checkpoint_writes_none(six_layers: Path, text_file: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        compress(six_layers, _recipe(tmp_path, GPTQ, text_file), out, checkpoint=False,
                 progress=_interrupt_after(3))
    assert not (tmp_path / "out.partial").exists() and not out.exists()


def test_a_damaged_checkpoint_is_a_one_line_error(six_layers: Path, text_file: Path, tmp_path: Path) -> None:
    out = _interrupted(six_layers, text_file, tmp_path)
    damaged = tmp_path / "out.partial" / "pass0-layer1.safetensors"
    damaged.write_bytes(damaged.read_bytes()[:100])
    with pytest.raises(UsageError, match=r"unreadable checkpoint .*pass0-layer1.safetensors: .*--overwrite"):
        compress(six_layers, _recipe(tmp_path, GPTQ, text_file), out, resume=True)


def test_a_pass_without_layer_checkpoints_leaves_no_partial_directory(six_layers: Path, text_file: Path,
                                                                      tmp_path: Path) -> None:
    """ShortGPT's scores live in the method until its pass ends: nothing to save, so nothing to resume."""
    drop_only = TWO_PASSES.split("  - method: gptq")[0] + "export: {{format: dense}}\n"
    with pytest.raises(KeyboardInterrupt):
        compress(six_layers, _recipe(tmp_path, drop_only, text_file), tmp_path / "out",
                 progress=_interrupt_after(3, "layer_drop"))
    assert not (tmp_path / "out.partial").exists()


def test_a_finished_planning_pass_is_not_redone(six_layers: Path, text_file: Path, tmp_path: Path,
                                                reference: dict) -> None:
    """Interrupted in GPTQ's pass, the resumed run takes BAQ's saved plan instead of measuring again."""
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        compress(six_layers, _recipe(tmp_path, BAQ, text_file), out, progress=_interrupt_after(1))
    phases: set[str] = set()
    compress(six_layers, _recipe(tmp_path, BAQ, text_file), out, resume=True,
             progress=lambda phase, done, total: phases.add(phase))
    assert phases == {"gptq"}
    assert comparable_files(out) == reference["baq"]


def test_a_manifest_without_its_fields_is_a_one_line_error(six_layers: Path, text_file: Path, tmp_path: Path) -> None:
    (tmp_path / "out.partial").mkdir()
    (tmp_path / "out.partial" / "manifest.json").write_text('{"version": 1}')
    with pytest.raises(UsageError, match=r"--resume: unreadable .*manifest.json: no fingerprint"):
        compress(six_layers, _recipe(tmp_path, GPTQ, text_file), tmp_path / "out", resume=True)


def _count_calls(monkeypatch: pytest.MonkeyPatch, module: object, name: str) -> list[int]:
    """Wrap ``module.name`` so each call appends a 1 to the returned list (how often a pass measured)."""
    real, calls = getattr(module, name), []

    def counted(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(module, name, counted)
    return calls


def test_shortgpt_scores_are_not_measured_again(six_layers: Path, text_file: Path, tmp_path: Path,
                                                reference: dict) -> None:
    """Interrupted in GPTQ's pass, the resumed run drops the same layers from the saved scores, without a sweep."""
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        compress(six_layers, _recipe(tmp_path, TWO_PASSES, text_file), out, progress=_interrupt_after(2))
    assert json.loads((tmp_path / "out.partial" / "manifest.json").read_text())["finished"] == [0]
    phases: set[str] = set()
    compress(six_layers, _recipe(tmp_path, TWO_PASSES, text_file), out, resume=True,
             progress=lambda phase, done, total: phases.add(phase))
    assert phases == {"gptq"}
    assert comparable_files(out) == reference["two"]


def test_slicegpt_basis_is_not_measured_again(six_layers: Path, text_file: Path, tmp_path: Path, reference: dict,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """Interrupted mid-pass, the resumed run rotates with the saved basis: no second forward of the whole model."""
    from compressor.methods.prune import slicegpt

    forwards = _count_calls(monkeypatch, slicegpt, "stream_covariance")
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        compress(six_layers, _recipe(tmp_path, SLICE, text_file), out, progress=_interrupt_after(3, "slicegpt+gptq"))
    assert forwards == [1]
    assert json.loads((tmp_path / "out.partial" / "manifest.json").read_text())["states"] == [0]
    compress(six_layers, _recipe(tmp_path, SLICE, text_file), out, resume=True)
    assert forwards == [1]
    assert comparable_files(out) == reference["slice"]


# FinerCut's search closes the first pass (model-level); GPTQ quantizes what is left in a second pass.
FINERCUT = """\
name: tiny-finercut-gptq
calibration: {{dataset: "{calib}", samples: 4, seq_len: 32, batch_size: 2}}
stages:
  - method: finercut
    remove: 4
    positions: 8
  - method: gptq
    bits: 4
    group_size: 32
export: {{format: compressed-tensors}}
"""


def _without_search_time(files: dict[str, bytes]) -> dict[str, bytes]:
    """The structure's "seconds" is the search's wall time, which differs between any two runs."""
    report = json.loads(files["compression_report.json"])
    report["structure"]["finercut"].pop("seconds")
    return {**files, "compression_report.json": json.dumps(report).encode()}


def test_finercut_search_is_not_run_again(six_layers: Path, text_file: Path, tmp_path: Path,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """Interrupted in GPTQ's pass, the resumed run re-applies the saved removals: no sweep, no search."""
    from compressor.methods.prune import finercut

    searches = _count_calls(monkeypatch, finercut, "SublayerSearch")
    compress(six_layers, _recipe(tmp_path, FINERCUT, text_file), tmp_path / "reference", checkpoint=False)
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        compress(six_layers, _recipe(tmp_path, FINERCUT, text_file), out, progress=_interrupt_after(2))
    assert searches == [1, 1]
    assert json.loads((tmp_path / "out.partial" / "manifest.json").read_text())["finished"] == [0]
    phases: set[str] = set()
    compress(six_layers, _recipe(tmp_path, FINERCUT, text_file), out, resume=True,
             progress=lambda phase, done, total: phases.add(phase))
    assert searches == [1, 1] and phases == {"gptq"}
    resumed, reference = comparable_files(out), comparable_files(tmp_path / "reference")
    assert len(json.loads(resumed["compression_report.json"])["structure"]["finercut"]["removed"]) == 4
    assert _without_search_time(resumed) == _without_search_time(reference)
