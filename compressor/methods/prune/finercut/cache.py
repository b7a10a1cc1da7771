"""Where FinerCut keeps the hidden states entering every layer: in RAM, or in memory-mapped files above a limit.

The search reads every layer boundary of the calibration hidden states until it ends, (layers + 1) x samples x
seq x hidden values: for SmolLM2 (30 layers, hidden 576) on 128 sequences of 2048 tokens, 31 x 128 x 2048 x 576
float32 = 18.7 GB, more than the model. When that total exceeds the run's ``--activation-memory``
(``ModelContext.activation_limit``), each boundary is copied, as the engine's pass makes it, into a file of its
own in the run's temporary directory (``OUT.partial``), mapped shared (``streaming.heap.file_backed``, the helper
the streamer's hidden states use): the kernel writes the pages back and drops them under memory pressure, so the
cache costs disk and page cache, not the process's memory. The states the search recomputes after a commit are
written into the same files (:meth:`StateCache.replace`).

The values are the same either way (copies, in the same dtype), so the search removes the same sublayers with the
same scores. Each batch's slot starts on a 64-byte boundary, as a RAM tensor does, so kernels whose path depends on
alignment take the same one. A file is unlinked once mapped: its blocks go when the tensors do, even if the run
dies before the search ends; the directory goes at :meth:`StateCache.close`.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)
#: Each batch's slot in a file starts at a multiple of this many bytes (torch's CPU allocator aligns to 64).
ALIGNMENT = 64


@dataclass(frozen=True)
class CacheSummary:
    """Where a search's cache was (files or RAM), its size in bytes and the limit it was judged against."""

    mapped: bool
    bytes: int
    limit: int | None

    def to_dict(self) -> dict[str, Any]:
        """The report's form."""
        return {"in": "memory-mapped files" if self.mapped else "RAM", "bytes": self.bytes,
                "activation_limit": self.limit}


class StateCache:
    """``states[l][b]``: calibration batch ``b``'s hidden states entering layer ``l`` (``states[L]``: leaving the last).

    ``boundaries``: how many boundaries the cache will hold (layers + 1), to judge its whole size from the first.
    ``limit``: bytes the cache may take in RAM (None: no limit). ``directory``: where the files go (made if
    missing; None: the system's temporary directory).
    """

    def __init__(self, boundaries: int, limit: int | None, directory: Path | None) -> None:
        self.states: list[list[torch.Tensor]] = []
        self.boundaries = boundaries
        self.limit = limit
        self.directory = directory
        #: Whether the boundaries go to files, and the whole cache's size; both judged from the first boundary.
        self.mapped: bool | None = None
        self.bytes = 0
        self._files: Path | None = None
        self._made_root = False  # whether the directory was made here (then it goes too, if nothing else is in it)

    def add(self, boundary: list[torch.Tensor]) -> None:
        """Keep the next boundary's batches: as they are, or copied into a file when the whole cache is too big."""
        if self.mapped is None:
            self.bytes = sum(t.numel() * t.element_size() for t in boundary) * self.boundaries
            self.mapped = self.limit is not None and self.bytes > self.limit
            if self.mapped:
                log.info("finercut: %d boundaries of hidden states (%.3g GB) exceed --activation-memory (%d bytes): "
                         "cached in memory-mapped files", self.boundaries, self.bytes / 1e9, self.limit)
        self.states.append(self._to_file(boundary) if self.mapped else boundary)

    def replace(self, cached: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
        """What takes ``cached``'s place when its states are recomputed as ``new``: ``new`` itself in RAM; in a file,
        ``cached`` overwritten with ``new`` (a state of another shape or dtype, never made by the search's layers,
        would be kept in RAM rather than rounded)."""
        if self.mapped and cached.shape == new.shape and cached.dtype == new.dtype:
            return cached.copy_(new)
        return new

    def summary(self) -> CacheSummary:
        return CacheSummary(bool(self.mapped), self.bytes, self.limit)

    def close(self) -> None:
        """Drop the states (a file's blocks go with its last tensor) and remove the files' directory."""
        self.states = []
        if self._files is not None:
            shutil.rmtree(self._files, ignore_errors=True)
            if self._made_root:
                try:
                    self._files.parent.rmdir()
                except OSError:  # something else went there meanwhile (a checkpoint)
                    pass
            self._files = None

    def _to_file(self, boundary: list[torch.Tensor]) -> list[torch.Tensor]:
        """The boundary's batches copied into one fresh file-backed tensor, one aligned slot per batch."""
        from compressor.streaming.heap import file_backed  # the package's __init__ reaches export/: import late

        if self._files is None:
            root = self.directory or Path(tempfile.gettempdir())
            self._made_root = not root.exists()
            root.mkdir(parents=True, exist_ok=True)
            self._files = Path(tempfile.mkdtemp(prefix="finercut-states-", dir=root))
        dtype = boundary[0].dtype
        step = max(ALIGNMENT // torch.empty((), dtype=dtype).element_size(), 1)
        starts = [0]
        for tensor in boundary:
            starts.append(starts[-1] + -(-tensor.numel() // step) * step)
        path = self._files / f"boundary-{len(self.states)}.bin"
        flat = file_backed(path, starts[-1], dtype)
        try:
            path.unlink()  # the mapping keeps the blocks (see the module doc)
        except OSError:  # a system that cannot unlink a mapped file: close() removes it
            pass
        slots = zip(starts[:-1], boundary, strict=True)
        return [flat[start : start + t.numel()].view(t.shape).copy_(t) for start, t in slots]
