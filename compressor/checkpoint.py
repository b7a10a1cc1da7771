"""Per-layer checkpoints of a compression run, so ``compress ... --resume`` continues after a crash.

Where: ``DIR.partial/`` beside the output (the atomic writer's one partial location). What, after each finished
decoder layer of a layer-wise pass:

- ``pass{p}-layer{i}.safetensors``: the finished layer's state_dict (``state.*``), its integer codes
  (``codes.<module path>.<field>``) and the torch RNG state; its report rows in the metadata;
- ``pass{p}-hidden{i}.safetensors``: the next layer's inputs (only the newest is kept), one tensor per calibration batch
  (``samples x seq_len x hidden x itemsize`` bytes: 128 x 512 x 4096 x 4 = 1 GiB for a 7B model in float32);
- ``pass{p}-plan.safetensors``: after a planning pass (BAQ: it only fills ``run.plans``), the plan, its report
  rows and the RNG state; a resume restores it instead of measuring again;
- ``pass{p}-state.safetensors``: what stages computed over the whole model (``Method.checkpoint_state``), saved
  after ``prepare`` (SliceGPT's basis, from a forward of the whole model) and again after the pass (ShortGPT's
  scores, with the pass's rows and the RNG state). A resume hands it back (``Method.restore_state``); a pass whose
  every stage says that is its whole result runs only ``prepare`` and ``finalize``, without a sweep;
- ``manifest.json``: the resolved recipe, hashes of the recipe, the model's weights and config, and the
  calibration tokens, the last finished pass and layer, and the saved planning passes and states.

A write that fails (disk full, a file-size limit, a read-only location) is one :class:`ExportError` line that says
which checkpoints were kept.

Every file is written to a temporary name, flushed and renamed, and the manifest goes last: a kill at any
moment leaves the previous checkpoint whole. Only passes whose stages are all in :data:`LAYER_LOCAL` get
layer checkpoints: their ``apply`` keeps nothing between layers (but which entries of BAQ's plan it used) and
changes weight values only, so a finished layer is restored from its state_dict. Other passes (SliceGPT's
rotations, ShortGPT's layer removal, DGQ's INT8 modules) and every pass before the one that was interrupted are
re-run on resume, from their saved plans and states where they have them; a run is deterministic, so the result is
the same bytes.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import os
import re
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file
from torch import nn

from compressor.engine import ModelContext, ProgressFn, run_pass
from compressor.errors import ExportError, UsageError
from compressor.export.atomic import partial_dir
from compressor.export.streamed import spec_of, write_safetensors
from compressor.methods.base import LayerRecord, Method
from compressor.methods.quant.ops import QuantizedWeight

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
VERSION = 1
#: Methods whose finished layer is fully described by its state_dict and its codes (see the module docstring).
LAYER_LOCAL = frozenset({"gptq", "rtn"})
_CODE_TENSORS = ("q", "scale", "zero", "g_idx", "group_bits")


#: Errors of a write that did not fit: disk full, a quota, a file-size limit (RLIMIT_FSIZE).
_NO_SPACE = frozenset({errno.ENOSPC, errno.EFBIG, errno.EDQUOT})


def _reason(exc: Exception) -> str:
    """Why a write failed, in words; safetensors wraps the OS error in its own text (``... (os error 27)``)."""
    code = exc.errno if isinstance(exc, OSError) else None
    if code is None:
        found = re.search(r"os error (\d+)", str(exc))
        code = int(found.group(1)) if found else None
    text = os.strerror(code) if code else (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    return text + (" (disk full, or over a quota or file-size limit)" if code in _NO_SPACE else "")


def write_error(exc: Exception, target: Path, partial: Path) -> ExportError:
    """One line for a failed write of ``target``: why, and whether ``partial`` keeps checkpoints to resume from."""
    kept = (f"the checkpoints that fit are kept in {partial}: make room, then rerun the same command with --resume"
            if (partial / MANIFEST).is_file() else "no checkpoint was kept")
    return ExportError(f"cannot write {target}: {_reason(exc)}; {kept}")


def _write_atomic(path: Path, write: Any) -> None:
    """``write(tmp)`` then fsync and rename over ``path``: readers see the old file or the new one, whole.

    A failed write (disk full...) leaves the previous file and manifest as they were, and is one line.
    """
    tmp = path.with_name(path.name + ".tmp")
    try:
        path.parent.mkdir(exist_ok=True)
        write(tmp)
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except (OSError, SafetensorError) as exc:
        raise write_error(exc, path, path.parent) from None
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)


def _save_tensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    """Written by our own safetensors writer into ``path``'s ``.tmp``, one tensor at a time.

    Not ``save_file``: since safetensors 0.8 it writes a temporary file of its own and renames it over the name it
    is given (a second temporary beside ours), and it refuses tensors sharing a storage, so every tensor had to be
    cloned first (a second copy of the layer and of the hidden states in RAM).
    """
    specs = [spec_of(name, tensor) for name, tensor in tensors.items()]
    _write_atomic(path, lambda tmp: write_safetensors(tmp, specs, tensors.__getitem__, metadata))


def _read(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """A checkpoint file's tensors and metadata; a missing or damaged one is a one-line error."""
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
        return load_file(str(path)), metadata
    except (OSError, SafetensorError) as exc:
        raise UsageError(f"--resume: unreadable checkpoint {path}: {exc}; start over with --overwrite") from None


def _hash_tensor(digest: Any, name: str, tensor: torch.Tensor) -> None:
    data = tensor.detach().to("cpu").contiguous()
    digest.update(f"{name}|{data.dtype}|{tuple(data.shape)}|".encode())
    digest.update(data.reshape(-1).view(torch.uint8).numpy().tobytes())


def fingerprint(recipe_digest: str, model: Any, tokens: torch.Tensor) -> dict[str, str]:
    """What a resume must match: the recipe, the model (every weight as loaded, and its config), the tokens."""
    weights = hashlib.sha256(model.config.to_json_string().encode())
    for name, tensor in model.state_dict().items():
        _hash_tensor(weights, name, tensor)
    calibration = hashlib.sha256()
    _hash_tensor(calibration, "tokens", tokens)
    return {"recipe": recipe_digest, "model": weights.hexdigest()[:16], "calibration": calibration.hexdigest()[:16]}


def check_resume(out: Path, *, resume: bool, checkpoint: bool, overwrite: bool) -> None:
    """Refuse contradictory options, and a fresh run over an unfinished run's checkpoints, before any loading."""
    manifest = partial_dir(out) / MANIFEST
    if resume and not checkpoint:
        raise UsageError("--resume needs checkpoints: drop --no-checkpoint")
    if resume and not manifest.is_file():
        raise UsageError(f"--resume: no checkpoint to resume in {manifest.parent} (no {MANIFEST})")
    if not resume and manifest.is_file() and not overwrite:
        raise UsageError(f"{manifest.parent} holds the checkpoints of an unfinished run: add --resume to continue "
                         "it, or --overwrite to start over")


class Checkpoints:
    """The checkpoints of one run: writes them, and on resume says where the interrupted pass stopped."""

    def __init__(self, out: Path, recipe: dict[str, Any], marks: dict[str, str], resume: bool) -> None:
        self.root = partial_dir(out)
        self.recipe, self.marks = recipe, marks
        self.resume_at: tuple[int, int] | None = None  # (pass, last finished layer) still to be restored
        self.plans: list[int] = []  # finished planning passes whose results are saved
        self.states: list[int] = []  # passes with a saved state file (Method.checkpoint_state)
        self.finished: list[int] = []  # of those, the passes that finished (their state file holds their rows)
        if resume:
            manifest = self._read_manifest()
            saved = manifest["fingerprint"]
            differ = [key for key in ("recipe", "model", "calibration") if saved.get(key) != marks[key]]
            if differ:
                names = {"recipe": "recipe", "model": "model weights/config", "calibration": "calibration tokens"}
                raise UsageError(f"--resume: the checkpoint in {self.root} was made with a different "
                                 f"{' and '.join(names[d] for d in differ)}; rerun without --resume (and --overwrite)")
            self.resume_at = (int(manifest["pass"]), int(manifest["layer"]))
            self.plans = [int(n) for n in manifest.get("plans", [])]
            self.states = [int(n) for n in manifest.get("states", [])]
            self.finished = [int(n) for n in manifest.get("finished", [])]
            for stale in self.root.glob("*.tmp"):  # a write that a kill cut short; the manifest never named it
                stale.unlink()
        else:
            self._clear()  # the directory itself appears with the first file written
            (self.root / MANIFEST).unlink(missing_ok=True)

    def _read_manifest(self) -> dict[str, Any]:
        try:
            manifest = json.loads((self.root / MANIFEST).read_text())
            if manifest.get("version") != VERSION:
                raise ValueError(f"version {manifest.get('version')} (this compressor writes {VERSION})")
            missing = [key for key in ("fingerprint", "pass", "layer") if key not in manifest]
            if missing:
                raise ValueError(f"no {missing[0]}")
            return dict(manifest)
        except (OSError, ValueError) as exc:
            raise UsageError(f"--resume: unreadable {self.root / MANIFEST}: {exc}") from None

    def _clear(self) -> None:
        """Drop the layer checkpoints (a new pass starts); the saved plans and states of earlier passes stay."""
        keep = {f"pass{n}-plan.safetensors" for n in self.plans} | {f"pass{n}-state.safetensors" for n in self.states}
        for path in self.root.glob("pass*.safetensors"):
            if path.name not in keep:
                path.unlink()

    def for_pass(self, number: int) -> PassCheckpoint:
        """The checkpoint of pass ``number``: restoring (the interrupted pass), replaying, or writing."""
        if self.resume_at is None:
            return PassCheckpoint(self, number, "write")
        stopped, layer = self.resume_at
        if number < stopped:
            return PassCheckpoint(self, number, "replay")
        self.resume_at = None
        if number == stopped:
            return PassCheckpoint(self, number, "restore", layer)
        return PassCheckpoint(self, number, "write")

    def run_pass(self, number: int, run: ModelContext, stages: list[Method],
                 progress: ProgressFn | None) -> list[LayerRecord]:
        """Pass ``number``: its saved plan if a planning pass finished before, else the pass, saving as it goes."""
        checkpoint = self.for_pass(number)
        records = checkpoint.restore_plans(run)
        if records is None:
            records = checkpoint.restore_states(run, stages)
        if records is None:
            records = run_pass(run, stages, progress, checkpoint)
            checkpoint.finish(run, stages, records)
        return records

    def write_manifest(self, number: int, layer: int) -> None:
        self.root.mkdir(exist_ok=True)
        manifest = {"version": VERSION, "fingerprint": self.marks, "pass": number, "layer": layer,
                    "plans": self.plans, "states": self.states, "finished": self.finished, "recipe": self.recipe}
        _write_atomic(self.root / MANIFEST, lambda tmp: tmp.write_text(json.dumps(manifest, indent=1)))


def _mark_planned_as_used(stages: list[Method], run: ModelContext) -> None:
    """A quantizer that took BAQ's plan checks at the end of its pass that it used every entry: restored layers did."""
    for stage in stages:
        plan = getattr(stage, "plan", None)  # WeightQuantizer's BitPlan, taken in prepare
        if plan is not None:
            plan.used.update(path for path in run.quantized if path in plan.bits or path in plan.group_bits)


class PassCheckpoint:
    """One pass's layer checkpoints; ``mode``: ``write`` them, ``restore`` finished layers first, or ``replay``."""

    def __init__(self, owner: Checkpoints, number: int, mode: str, stopped: int = -1) -> None:
        self.owner, self.number, self.mode, self.stopped = owner, number, mode, stopped
        self.enabled = False
        self._saved_rows = 0  # how many of the pass's rows are in saved checkpoints (or came before layer 0)

    def _plan_file(self) -> Path:
        return self.owner.root / f"pass{self.number}-plan.safetensors"

    def restore_plans(self, run: ModelContext) -> list[LayerRecord] | None:
        """A planning pass finished before the interruption: its plans, rows and RNG (None: run the pass)."""
        if self.mode != "replay" or self.number not in self.owner.plans:
            return None
        tensors, metadata = _read(self._plan_file())
        for key, value in json.loads(metadata["plans"]).items():
            run.plans[key] = value
        for name, tensor in tensors.items():
            if name.startswith("plans."):
                key, path = name[len("plans."):].split(".", 1)
                run.plans.setdefault(key, {})[path] = tensor
        torch.set_rng_state(tensors["rng"])
        log.info("resuming: pass %d's plan restored, not recomputed", self.number)
        return [LayerRecord(**row) for row in json.loads(metadata["records"])]

    def _state_file(self) -> Path:
        return self.owner.root / f"pass{self.number}-state.safetensors"

    def restore_states(self, run: ModelContext, stages: list[Method]) -> list[LayerRecord] | None:
        """Hand the stages their saved states; a finished pass they fully describe: prepare, finalize, its rows.

        None: the pass must still sweep the layers (its stages may use their states to skip work).
        """
        if self.mode == "write" or self.number not in self.owner.states:
            return None
        tensors, metadata = _read(self._state_file())
        complete = [stage.restore_state({name.split(".", 1)[1]: tensor for name, tensor in tensors.items()
                                         if name.startswith(f"{index}.")}) for index, stage in enumerate(stages)]
        if self.mode != "replay" or self.number not in self.owner.finished or not all(complete):
            return None
        for stage in stages:
            stage.prepare(run)
        for stage in stages:
            stage.finalize(run)
        torch.set_rng_state(tensors["rng"])
        log.info("resuming: pass %d restored from its saved state, not recomputed", self.number)
        return [LayerRecord(**row) for row in json.loads(metadata["records"])]

    def _save_states(self, stages: list[Method], records: list[LayerRecord] | None) -> bool:
        """Save what the stages computed over the whole model (``records``: the pass finished); False: nothing."""
        tensors = {f"{index}.{name}": tensor for index, stage in enumerate(stages)
                   for name, tensor in stage.checkpoint_state().items()}
        if not tensors:
            return False
        metadata = {}
        if records is not None:
            tensors["rng"] = torch.get_rng_state()
            metadata["records"] = json.dumps([r.to_dict() for r in records])
            if self.number not in self.owner.finished:
                self.owner.finished.append(self.number)
        _save_tensors(self._state_file(), tensors, metadata)
        if self.number not in self.owner.states:
            self.owner.states.append(self.number)
        return True

    def finish(self, run: ModelContext, stages: list[Method], records: list[LayerRecord]) -> None:
        """After a pass: a planning pass (it only fills ``run.plans``; BAQ) saves its plan, rows and RNG; a pass
        whose stages computed something over the whole model saves their states, rows and RNG."""
        if self.mode == "replay":
            return
        if not all(stage.kind == "allocate" for stage in stages):
            if self._save_states(stages, records):
                self.owner.write_manifest(self.number + 1, -1)
            return
        tensors = {"rng": torch.get_rng_state()}
        plain: dict[str, Any] = {}
        for key, value in run.plans.items():
            if isinstance(value, dict) and value and all(isinstance(v, torch.Tensor) for v in value.values()):
                tensors.update({f"plans.{key}.{path}": tensor for path, tensor in value.items()})
            else:
                plain[key] = value
        metadata = {"plans": json.dumps(plain), "records": json.dumps([r.to_dict() for r in records])}
        _save_tensors(self._plan_file(), tensors, metadata)
        self.owner.plans.append(self.number)
        self.owner.write_manifest(self.number + 1, -1)

    def _layer_file(self, index: int) -> Path:
        return self.owner.root / f"pass{self.number}-layer{index}.safetensors"

    def _hidden_file(self, index: int) -> Path:
        return self.owner.root / f"pass{self.number}-hidden{index}.safetensors"

    def begin(
        self, run: ModelContext, stages: list[Method], hidden: list[torch.Tensor], records: list[LayerRecord]
    ) -> tuple[int, list[torch.Tensor], list[LayerRecord]]:
        """After ``prepare``: the first layer to compute, its inputs and the rows so far (restored layers' added).

        ``hidden`` (layer 0's captured inputs) and ``records`` (``prepare``'s rows) are returned as they are when
        there is nothing to restore.
        """
        layer_local = all(s.name in LAYER_LOCAL for s in stages)
        self.enabled = layer_local and self.mode != "replay"
        self._saved_rows = len(records)
        if self.mode == "write" and self._save_states(stages, None):  # e.g. SliceGPT's basis, after prepare
            self.owner.write_manifest(self.number, -1)
        if self.mode == "replay" or not layer_local:
            return 0, hidden, records
        if self.mode == "write":
            self.owner._clear()
            self.owner.write_manifest(self.number, -1)
            return 0, hidden, records
        stopped = self.stopped
        records = list(records)
        for index in range(stopped + 1):
            records += self._restore_layer(run, index)
        _mark_planned_as_used(stages, run)
        self._saved_rows = len(records)
        if stopped < 0:
            return 0, hidden, records
        saved, _ = _read(self._hidden_file(stopped))
        hidden = [saved[str(b)].to(run.device) for b in range(len(saved))]
        log.info("resuming pass %d after layer %d", self.number, stopped)
        return stopped + 1, hidden, records

    def _restore_layer(self, run: ModelContext, index: int) -> list[LayerRecord]:
        tensors, metadata = _read(self._layer_file(index))
        layer = run.adapter.layers()[index]
        layer.load_state_dict({k[len("state."):]: v for k, v in tensors.items() if k.startswith("state.")})
        for module, fields in json.loads(metadata["codes"]).items():
            parts = {name: tensors.get(f"codes.{module}.{name}") for name in _CODE_TENSORS}
            qweight = QuantizedWeight(**parts, **fields)  # type: ignore[arg-type]
            run.quantized[module] = qweight.to(run.storage_device)
        torch.set_rng_state(tensors["rng"])
        return [LayerRecord(**row) for row in json.loads(metadata["records"])]

    def save(self, run: ModelContext, index: int, layer: nn.Module, records: list[LayerRecord],
             hidden: list[torch.Tensor]) -> None:
        """Layer ``index`` is finished: its weights, codes, rows and RNG, then the next inputs, then the manifest.

        ``records``: the pass's rows so far; this layer's are those after the last save.
        """
        if not self.enabled:
            return
        prefix = run.adapter.layer_prefix(index) + "."
        tensors = {f"state.{k}": v for k, v in layer.state_dict().items()}
        codes: dict[str, dict[str, Any]] = {}
        for module, qweight in run.quantized.items():
            if module.startswith(prefix):
                codes[module] = {"bits": qweight.bits, "group_size": qweight.group_size, "symmetric": qweight.symmetric}
                for name in _CODE_TENSORS:
                    if getattr(qweight, name) is not None:
                        tensors[f"codes.{module}.{name}"] = getattr(qweight, name)
        tensors["rng"] = torch.get_rng_state()
        rows = json.dumps([r.to_dict() for r in records[self._saved_rows:]])
        _save_tensors(self._layer_file(index), tensors, {"records": rows, "codes": json.dumps(codes)})
        _save_tensors(self._hidden_file(index), {str(b): h for b, h in enumerate(hidden)})
        self.owner.write_manifest(self.number, index)
        self._hidden_file(index - 1).unlink(missing_ok=True)
        self._saved_rows = len(records)
