"""The ``compressor`` command: the Typer app and its commands (errors: commands/_handler.py).

Exit codes: 0 success, 1 runtime failure, 2 bad input (usage, recipe, model, data), 3 quality gate
failed (the output is still written). Tracebacks only with ``--debug``.
"""

from __future__ import annotations

import typer

from compressor.commands import bitstack as bitstack_command
from compressor.commands import compress as compress_command
from compressor.commands import eval as eval_command
from compressor.commands import export as export_command
from compressor.commands import inspect as inspect_command
from compressor.commands import recipes as recipes_command

app = typer.Typer(
    name="compressor",
    help="Post-training compression of LLMs: quantization (RTN, GPTQ, ...) and structured pruning, "
    "from one YAML recipe, with an honest report.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
app.command("compress", no_args_is_help=True)(compress_command.compress)
app.command("eval", no_args_is_help=True)(eval_command.eval_)
app.command("inspect", no_args_is_help=True)(inspect_command.inspect)
app.command("export", no_args_is_help=True)(export_command.export)
app.add_typer(recipes_command.app, name="recipes")
app.add_typer(bitstack_command.app, name="bitstack")


def main() -> None:
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
