"""``compressor bitstack materialize DIR --budget 300MB --out OUT``: one budget of a BitStack directory."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from compressor.commands._handler import configure_logging, run_guarded
from compressor.commands._options import DebugOpt, JsonOpt, OutDirOpt, OverwriteOpt, QuietOpt
from compressor.commands._render import print_json

app = typer.Typer(help="Load a BitStack directory (export format bitstack) at a memory budget.",
                  no_args_is_help=True)


@app.command("materialize", no_args_is_help=True)
def materialize(
    source: Annotated[Path, typer.Argument(help="A BitStack directory written by `compressor compress`.")],
    out: OutDirOpt,
    *,
    budget: Annotated[
        str, typer.Option("--budget", "-b", help="Memory the weights may take: 300MB, 1.5GiB, 123456 (bytes) or "
                          "2.5bpw (bits per decomposed weight).", show_default=False)
    ],
    format_: Annotated[str, typer.Option("--format", "-f", help="Output format: dense.")] = "dense",
    overwrite: OverwriteOpt = False,
    json_output: JsonOpt = False,
    quiet: QuietOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Write the model that fits BUDGET as a standard model directory, with the bytes and bits of every linear."""
    configure_logging(quiet or json_output)

    def action() -> None:
        from compressor.export.bitstack_materialize import REPORT
        from compressor.export.bitstack_materialize import materialize as run_materialize

        report = run_materialize(source, budget, out, format_=format_, overwrite=overwrite)
        if json_output:
            print_json({"out": str(out), **report})
        elif not quiet:
            typer.echo(f"wrote {out} ({format_}): {report['bitstack_bytes']} bytes at budget {budget}, "
                       f"{report['avg_bits_per_weight']} bits per decomposed weight (details in {REPORT})")

    run_guarded(action, debug=debug)
