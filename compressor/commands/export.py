"""``compressor export DIR --format F --out OUT``: store a finished run in another format."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from compressor.commands._handler import configure_logging, run_guarded
from compressor.commands._options import DebugOpt, JsonOpt, OutDirOpt, OverwriteOpt, QuietOpt
from compressor.commands._render import print_json


def export(
    source: Annotated[Path, typer.Argument(help="A compressed-tensors directory written by `compressor compress`.")],
    out: OutDirOpt,
    *,
    format_: Annotated[
        str,
        typer.Option(
            "--format",
            "-f",
            help="dense, compressed-tensors or gguf. bitsandbytes, bitstack and compressor-int8 are not re-stored: "
            "their methods (recipes nf4/int8, bitstack, w4a8-dgq) write them from the original model.",
        ),
    ] = "gguf",
    gguf_type: Annotated[
        str | None,
        typer.Option(
            "--gguf-type",
            help="Q4_0, Q4_1, Q5_0, Q5_1 or Q8_0 for every quantized linear: our codes where they fit it, llama.cpp's "
            "rounding otherwise (the added error is reported). Default: each linear's own type from its bits.",
        ),
    ] = None,
    overwrite: OverwriteOpt = False,
    json_output: JsonOpt = False,
    quiet: QuietOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Re-store the integer weights of SOURCE (e.g. as GGUF for llama.cpp) without re-running calibration."""
    configure_logging(quiet or json_output)

    def action() -> None:
        from pydantic import ValidationError

        from compressor.errors import UsageError
        from compressor.pipeline import export as run_export
        from compressor.recipe import ExportConfig

        try:
            config = ExportConfig(format=format_, gguf_type=gguf_type)  # type: ignore[arg-type]
        except ValidationError as exc:
            raise UsageError(f"--format/--gguf-type: {exc.errors()[0]['msg']}") from None
        files = run_export(source, config, out, overwrite=overwrite)
        if json_output:
            print_json({"out": str(out), "format": format_, "files": files})
        elif not quiet:
            typer.echo(f"wrote {out} ({format_}): {', '.join(files)}")

    run_guarded(action, debug=debug)
