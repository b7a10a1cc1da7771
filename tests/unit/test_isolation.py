"""The "without compressor" subprocess (tests/isolation.py): compressor is refused, everything else installed loads.

The export tests that load shipped modeling files in such a child are only as good as this block: if
``compressor`` leaked in, a modeling file that imports it would pass there and fail for users.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from isolation import REPO, run_without_compressor

_PROBE = """
import importlib, json, sys
outcome = {}
for name in ("compressor", "compressor.export.gguf", "compressor.models"):
    try:
        importlib.import_module(name)
        outcome[name] = "imported"
    except ImportError as error:
        outcome[name] = type(error).__name__
try:
    from compressor import load
    outcome["from compressor import load"] = "imported"
except ImportError as error:
    outcome["from compressor import load"] = type(error).__name__
import torch, transformers
outcome["prefix"] = sys.prefix
print(json.dumps(outcome))
"""


def test_compressor_is_importable_without_the_block(tmp_path: Path) -> None:
    """The control: the same interpreter, from outside the clone, finds the installed (here editable) package."""
    code = "import compressor, sys; print(compressor.__file__); print(sys.prefix)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    location, prefix = result.stdout.split()
    assert Path(location).parts[-2:] == ("compressor", "__init__.py")
    assert prefix == sys.prefix


@pytest.mark.parametrize("where", ["outside", "clone"])
def test_child_cannot_import_compressor_but_has_the_environment(tmp_path: Path, where: str) -> None:
    """From a temp dir and from the clone's root (where ``''`` on sys.path finds ``compressor/``)."""
    result = run_without_compressor(_PROBE, cwd=tmp_path if where == "outside" else REPO, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    outcome = json.loads(result.stdout.splitlines()[-1])
    assert outcome.pop("prefix") == sys.prefix  # the virtualenv's own site-packages, not the base interpreter's
    assert outcome == {"compressor": "ModuleNotFoundError", "compressor.export.gguf": "ModuleNotFoundError",
                       "compressor.models": "ModuleNotFoundError", "from compressor import load": "ModuleNotFoundError"}
