"""A BitStack directory at one budget, written as a standard model directory any loader reads.

The budget counts what BitStack stores for that model: the chosen blocks (packed signs, fp16 factors,
scales) plus every other tensor (``fixed_bytes``). A ``dense`` directory stores each linear's
reconstruction in the model dtype, so its files are larger than the budget; the report
(``bitstack_materialize.json``) states both, and the bits per weight of every linear.
``compressed-tensors`` cannot hold a sign x low-rank reconstruction (it stores integer codes on a grid), so
dense is the only format for now. After a pruning stage (SliceGPT, FLAP, FinerCut) the model written is that
pruned export: its own modeling file, named by ``auto_map``, and its config.json keys.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

from compressor.errors import UsageError
from compressor.export.bitstack_store import MANIFEST, REMOTE_CODE_FILE, load_bitstack, read_manifest

if TYPE_CHECKING:
    from compressor.models.loading import LoadedModel

FORMATS = ("dense",)
REPORT = "bitstack_materialize.json"
#: Files of a BitStack directory that describe the whole stack or the run, not the materialised model (whose
#: config.json names no modeling file when it is a stock model, or the pruned model's own file after a pruning
#: stage: that file is copied, the BitStack loader is not).
_NOT_COPIED = ("compression_report.json", "compression_report.md", "recipe.yaml", MANIFEST, REMOTE_CODE_FILE)


def budget_report(manifest: dict[str, Any], counts: dict[str, int], budget: str | int | None) -> dict[str, Any]:
    """Exact bytes at ``counts`` (blocks per linear) and every linear's bits per weight, signs to scales."""
    linears = {}
    for path, item in manifest["linears"].items():
        stored = sum(item["block_bytes"][: counts[path]])
        params = int(item["shape"][0]) * int(item["shape"][1])
        linears[path] = {"blocks": counts[path], "of": len(item["block_bytes"]), "bytes": stored,
                         "bits_per_weight": round(stored * 8 / params, 4)}
    linear_bytes = sum(row["bytes"] for row in linears.values())
    params = sum(int(item["shape"][0]) * int(item["shape"][1]) for item in manifest["linears"].values())
    return {
        "budget": None if budget is None else str(budget),
        "bitstack_bytes": linear_bytes + int(manifest["fixed_bytes"]),
        "linear_bytes": linear_bytes, "fixed_bytes": int(manifest["fixed_bytes"]),
        "avg_bits_per_weight": round(linear_bytes * 8 / params, 4) if params else None,
        "linears": linears,
    }


def materialize(
    directory: str | Path, budget: str | int, out: Path, *, format_: str = "dense", overwrite: bool = False
) -> dict[str, Any]:
    """Write the model at ``budget`` from the BitStack ``directory`` to ``out``; returns the budget report."""
    from compressor.export.atomic import atomic_output_dir, check_output_dir

    if format_ not in FORMATS:
        raise UsageError(f"--format {format_}: materialize writes {', '.join(FORMATS)} (a sign x low-rank "
                         "reconstruction has no integer codes for compressed-tensors)")
    directory = Path(directory)
    manifest = read_manifest(directory)
    check_output_dir(out, overwrite)
    model: Any
    model, counts = load_bitstack(directory, budget)
    report = budget_report(manifest, counts, budget)
    with atomic_output_dir(out, overwrite) as staging:
        for source in directory.iterdir():
            skip = source.name.startswith("bitstack-") or source.suffix in (".safetensors", ".png")
            if source.is_file() and not skip and source.name not in _NOT_COPIED:
                shutil.copyfile(source, staging / source.name)  # tokenizer, generation config, remote code
        model.save_pretrained(staging)
        report["format"] = format_
        report["file_bytes"] = sum(p.stat().st_size for p in staging.glob("*.safetensors"))
        report["source"] = str(directory)
        (staging / REPORT).write_text(json.dumps(report, indent=1))
    return report


def is_bitstack_dir(path: str | Path) -> bool:
    return (Path(path) / MANIFEST).is_file()


def load_at_budget(directory: str | Path, budget: str | int | None, dtype: str = "auto") -> LoadedModel:
    """``compressor.load`` of a BitStack directory: the model at ``budget`` (every block when None)."""
    from transformers import AutoTokenizer

    from compressor.errors import ModelLoadError
    from compressor.models.loading import LoadedModel, resolve_dtype

    directory = Path(directory)
    model, _ = load_bitstack(directory, budget)
    torch_dtype = resolve_dtype(dtype)
    if not isinstance(torch_dtype, str):
        model = model.to(torch_dtype)
    try:
        tokenizer = AutoTokenizer.from_pretrained(directory)
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"cannot load the tokenizer from {directory}: {str(exc).splitlines()[0]}") from exc
    return LoadedModel(model, tokenizer, str(directory), directory)
