"""Output directories that appear whole or not at all.

Everything is written into ``DIR.partial/model-XXXX`` beside the target, flushed to disk, then renamed into
place: an interrupted run never leaves something that looks like a model, and an existing directory
is replaced only with ``--overwrite`` (and only once the new one is complete). ``DIR.partial`` is the one
partial location: the per-layer checkpoints of ``--resume`` live there too, and it is removed once ``DIR`` is.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from compressor.errors import ExportError, OutputExistsError


def check_output_dir(out: Path, overwrite: bool) -> None:
    """Refuse early (before any model loads) when ``out`` exists and may not be replaced."""
    if out.exists() and not overwrite:
        raise OutputExistsError(f"output directory {out} already exists (pass --overwrite to replace it)")
    if out.exists() and not out.is_dir():
        raise OutputExistsError(f"output path {out} exists and is not a directory")
    parent = out.resolve().parent
    if not parent.exists():
        try:
            parent.mkdir(parents=True)
        except OSError as exc:
            raise ExportError(f"cannot create {parent}: {exc.strerror}") from exc


def _fsync_tree(root: Path) -> None:
    for path in root.rglob("*"):
        if path.is_file():
            with open(path, "rb") as handle:
                os.fsync(handle.fileno())


def partial_dir(out: Path) -> Path:
    """``DIR.partial`` beside ``out``: the staging area and the checkpoints of an unfinished run."""
    out = out.resolve()
    return out.parent / f"{out.name}.partial"


@contextmanager
def atomic_output_dir(out: Path, overwrite: bool) -> Iterator[Path]:
    """Yield a staging directory; on success it becomes ``out`` (and ``DIR.partial`` goes), on failure it is removed.

    Checkpoints beside the staging directory survive a failure, for ``--resume``.
    """
    check_output_dir(out, overwrite)
    out = out.resolve()
    partial = partial_dir(out)
    partial.mkdir(exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix="model-", dir=partial))
    try:
        yield staging
        _fsync_tree(staging)
        if out.exists():
            old = Path(tempfile.mkdtemp(prefix=f"{out.name}.old-", dir=out.parent))
            os.replace(out, old / out.name)
            os.replace(staging, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(staging, out)
        shutil.rmtree(partial, ignore_errors=True)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        with contextlib.suppress(OSError):
            partial.rmdir()  # only when no checkpoint is left in it
        raise
