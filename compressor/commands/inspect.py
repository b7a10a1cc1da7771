"""``compressor inspect PATH``: architecture, size, storage per module group, report summary."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from compressor.commands._handler import run_guarded
from compressor.commands._options import DebugOpt, JsonOpt
from compressor.commands._render import print_json, print_table


def inspect(
    path: Annotated[Path, typer.Argument(help="A model directory (ours or any HF one) or a .gguf file.")],
    json_output: JsonOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Describe a model from its file headers, without loading weights."""

    def action() -> None:
        from compressor.models.describe import describe

        info = describe(path)
        if json_output:
            print_json(info)
            return
        groups = info.pop("module_groups")
        report = info.pop("compression_report", None)
        print_table(f"{path}", info)
        print_table("storage per module group", groups)
        if report:
            print_table("compression report", report)

    run_guarded(action, debug=debug)
