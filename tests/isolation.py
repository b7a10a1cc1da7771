"""Run Python in a fresh interpreter that cannot import ``compressor``: what a user without this package has.

Exports that ship their own modeling file must load with ``trust_remote_code=True`` alone. The check runs the
child the ordinary way (``sys.executable``, site enabled), so it sees the same site-packages as the tests in a
virtualenv, a system install and CI alike; ``python -I -S`` does not: without ``site`` a virtualenv's
``pyvenv.cfg`` is never read, ``sys.prefix`` is the base interpreter's and the child finds no torch.

``compressor`` stays importable in such a child through the editable install's own meta-path finder, a path
entry to the clone or a regular install in site-packages, so the bootstrap blocks the name itself: a
meta-path finder placed first answers every ``compressor`` import with ``ModuleNotFoundError``, and any
copy already in ``sys.modules`` or a ``sys.path`` entry for the clone is dropped.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

#: The clone's root: a ``sys.path`` entry for it would find ``compressor/`` as plain source.
REPO = Path(__file__).resolve().parents[1]

BOOTSTRAP = """\
def _block_compressor(repo):
    import importlib.abc, os, sys

    class BlockCompressor(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name == "compressor" or name.startswith("compressor."):
                raise ModuleNotFoundError(f"No module named {name!r} (blocked: this check runs without compressor)",
                                          name=name)
            return None

    sys.meta_path.insert(0, BlockCompressor())
    for name in [m for m in sys.modules if m == "compressor" or m.startswith("compressor.")]:
        del sys.modules[name]
    sys.path[:] = [p for p in sys.path if os.path.realpath(p or os.getcwd()) != repo]


_block_compressor(@REPO@)
del _block_compressor
"""


def without_compressor(code: str) -> str:
    """``code`` (dedented) behind the bootstrap that blocks ``compressor``, as one ``python -c`` script."""
    return BOOTSTRAP.replace("@REPO@", repr(str(REPO))) + textwrap.dedent(code)


def run_without_compressor(code: str, *args: str, cwd: Path, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    """Run ``code`` with ``args`` in ``sys.executable`` with ``compressor`` blocked; stdout/stderr as text."""
    command = [sys.executable, "-c", without_compressor(code), *args]
    return subprocess.run(command, capture_output=True, text=True, cwd=cwd, timeout=timeout)


#: Load an export with transformers alone and compare its logits with those saved next to it.
RELOAD_AND_COMPARE = """
import json, sys
import torch
from transformers import AutoModelForCausalLM
out = sys.argv[1]
model = AutoModelForCausalLM.from_pretrained(out).eval()
tokens, expected = torch.load(out + "/tokens.pt"), torch.load(out + "/logits.pt")
with torch.no_grad():
    diff = float((model(tokens).logits - expected).abs().max())
experts = getattr(getattr(model.model.layers[0], "mlp", None), "experts", None)
print(json.dumps({"class": type(model).__name__, "type": model.config.model_type,
                  "layers": model.config.num_hidden_layers, "experts": type(experts).__name__ if experts else None,
                  "diff": diff}))
"""


def reload_without_compressor(out: Path, tokens: object, logits: object) -> dict[str, object]:
    """Save ``tokens`` and the in-memory ``logits`` next to the export ``out``; a Python that cannot import compressor
    loads ``out`` with ``AutoModelForCausalLM.from_pretrained`` and reports its class, model type, depth, experts
    class and the largest logit difference."""
    import json

    import torch

    torch.save(tokens, out / "tokens.pt")
    torch.save(logits, out / "logits.pt")
    child = run_without_compressor(RELOAD_AND_COMPARE, str(out), cwd=out, timeout=300)
    assert child.returncode == 0, child.stderr[-3000:]
    return json.loads(child.stdout.strip().splitlines()[-1])
