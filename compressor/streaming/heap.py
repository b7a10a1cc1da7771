"""Freed memory goes back to the kernel during a streamed run (glibc malloc), so peak RSS follows live tensors.

Measured on a 2-layer Llama-shaped float32 checkpoint (hidden 2048, MLP 5632; benchmarks/streaming.py): after each
decoder layer the process held ~300 MB of freed heap (``malloc_trim(0)`` gave it back), and that resident free
memory grew from layer to layer (4 layers: 533 -> 825 MB anonymous after each one). glibc serves allocations
below its mmap threshold from the heap, and raises that threshold (up to 32 MiB) each time it frees a mapped
chunk; torch's 4-32 MB temporaries (q/k/v Hessians, hidden states, attention scores) then land in the heap and
leave holes a later, larger request cannot reuse. :func:`released_heap` fixes the threshold at
:data:`MMAP_THRESHOLD` for the run, so such tensors are mapped and unmapped whole, and :func:`trim` returns what
is left free (called after each finished layer). Outside glibc both do nothing. glibc consults the threshold
only when no free heap chunk fits, so holes made before the block (an earlier run in the same process) are
reused first; they are already resident and do not raise the peak.

Cost: a mapped allocation is page-faulted in on first touch; the GPTQ sweep reuses its buffers, so the rest is
the per-batch forward temporaries (measured: +10% CPU time on the 2-layer run, peak RSS 1.70 -> 1.55 GB).

Hidden states that must not take RAM at all (a streamed run's above ``--activation-memory``, FinerCut's cache of
every layer boundary) live in tensors backed by a file instead (:func:`file_backed`): the kernel writes their
pages back to the file and drops them under pressure, so they count as page cache, not as the process's memory.
"""

from __future__ import annotations

import ctypes
import ctypes.util
from collections.abc import Iterator
from contextlib import contextmanager
from functools import cache
from pathlib import Path
from typing import Any

import torch

#: Allocations from this size up are mapped (and unmapped when freed) during a streamed run.
MMAP_THRESHOLD = 4 << 20
#: What the threshold is set back to: glibc's dynamic threshold settles at its ceiling (32 MiB on 64-bit) in a
#: process that frees large tensors, and fixing a threshold (mallopt) turns the dynamic one off for good.
STEADY_THRESHOLD = 32 << 20
_M_MMAP_THRESHOLD = -3  # <malloc.h>


@cache
def _glibc() -> Any:
    """glibc's handle when this process runs on it (``mallopt`` and ``malloc_trim`` are glibc's), else None."""
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        libc.gnu_get_libc_version  # noqa: B018 - raises AttributeError outside glibc
        libc.mallopt.argtypes, libc.malloc_trim.argtypes = [ctypes.c_int, ctypes.c_int], [ctypes.c_size_t]
    except (OSError, AttributeError, TypeError):
        return None
    return libc


@contextmanager
def released_heap(threshold: int = MMAP_THRESHOLD) -> Iterator[None]:
    """Large allocations are mapped for the block (see the module doc); afterwards the threshold is the steady one."""
    libc = _glibc()
    if libc is None:
        yield
        return
    libc.mallopt(_M_MMAP_THRESHOLD, threshold)
    try:
        yield
    finally:
        libc.mallopt(_M_MMAP_THRESHOLD, STEADY_THRESHOLD)
        libc.malloc_trim(0)


def trim() -> None:
    """Give the heap's free pages back to the kernel (``malloc_trim(0)``; a few ms)."""
    libc = _glibc()
    if libc is not None:
        libc.malloc_trim(0)


def file_backed(path: Path, count: int, dtype: torch.dtype) -> torch.Tensor:
    """A fresh file at ``path`` holding ``count`` elements of ``dtype`` (zeros), mapped shared as a 1-D tensor.

    Writes to the tensor go to the file. Any file already at ``path`` is replaced. The mapping outlives the name:
    the caller may unlink the file at once (its blocks are freed when the tensor is) or remove it afterwards.
    """
    path.unlink(missing_ok=True)
    return torch.from_file(str(path), shared=True, size=count, dtype=dtype)
