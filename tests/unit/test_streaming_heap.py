"""A streamed run gives freed memory back to the kernel (compressor.streaming.heap), so its peak RSS follows live
tensors instead of growing with the heap's holes from layer to layer."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import streaming_parity as parity

from compressor.pipeline import compress
from compressor.streaming import heap

_MEASURE = """
import re, sys
from pathlib import Path
import torch
from compressor.streaming import heap

def anon_mib():
    return int(re.search(r"RssAnon:\\s+(\\d+)", Path("/proc/self/status").read_text()).group(1)) / 1024

threshold = int(sys.argv[1]) or heap.STEADY_THRESHOLD
libc = heap._glibc()
libc.mallopt(heap._M_MMAP_THRESHOLD, heap.STEADY_THRESHOLD)  # where a run leaves it: 8 MiB come from the heap
libc.malloc_trim(0)
with heap.released_heap(threshold):
    big, pins = [], []
    for _ in range(8):
        big.append(torch.ones(2 << 20))  # 8 MiB, touched
        pins.append(torch.ones(64 << 10))  # 256 KiB kept between them
    before = anon_mib()
    del big
    print(anon_mib() - (before - 64))
"""


def _holes_left(threshold: int | None) -> float:
    """MiB still resident after freeing eight 8 MiB tensors pinned apart by small live ones (no trim).

    Measured in a fresh interpreter: glibc applies the mmap threshold only when the heap has no free chunk that
    fits, so in a process whose heap already holds large holes (this suite's, after other tests) the tensors
    reuse those and nothing is mapped. A streamed run enters :func:`heap.released_heap` before its large
    allocations begin, which the fresh process reproduces.
    """
    done = subprocess.run([sys.executable, "-c", _MEASURE, str(threshold or 0)], capture_output=True, text=True,
                          timeout=300, check=False)
    assert done.returncode == 0, done.stderr
    return float(done.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(heap._glibc() is None or not Path("/proc/self/status").exists(), reason="glibc on Linux only")
def test_freed_tensors_leave_the_process_inside_released_heap() -> None:
    assert _holes_left(heap.MMAP_THRESHOLD) < 8  # each 8 MiB tensor was its own mapping, unmapped when freed
    assert _holes_left(None) > 48  # with the steady threshold they stay resident as heap holes


@pytest.fixture(scope="module")
def sharded_dir(tmp_path_factory: pytest.TempPathFactory, tiny_tokenizer: Any) -> Any:
    """A tiny Llama (hidden 256) saved as several safetensors shards: a run that streams 3 layers."""
    return parity.sharded_checkpoints(tmp_path_factory, tiny_tokenizer, "sharded")


class _FakeLibc:
    def __init__(self) -> None:
        self.calls: list[tuple[Any, ...]] = []

    def mallopt(self, option: int, value: int) -> int:
        self.calls.append(("mallopt", option, value))
        return 1

    def malloc_trim(self, pad: int) -> int:
        self.calls.append(("trim",))
        return 1


def test_a_streamed_run_maps_large_tensors_trims_each_layer_and_restores(sharded_dir: Any, text_file: Path,
                                                                         tmp_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    fake = _FakeLibc()
    monkeypatch.setattr(heap, "_glibc", lambda: fake)
    recipe = parity.quantizer_recipe(text_file)
    compress(str(sharded_dir()), recipe, tmp_path / "ram", device="cpu", memory_budget="none")
    assert fake.calls == []  # the in-RAM run leaves malloc alone
    compress(str(sharded_dir()), recipe, tmp_path / "o", device="cpu", memory_budget="1KB")
    assert fake.calls[0] == ("mallopt", heap._M_MMAP_THRESHOLD, heap.MMAP_THRESHOLD)
    assert fake.calls[-2:] == [("mallopt", heap._M_MMAP_THRESHOLD, heap.STEADY_THRESHOLD), ("trim",)]
    assert fake.calls.count(("trim",)) == 3 + 1  # one per finished layer (3) and one at the end
