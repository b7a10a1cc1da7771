"""Terminal rendering shared by commands: Rich progress (quiet off a TTY), tables, warnings and JSON output."""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn


def stderr_console() -> Console:
    return Console(stderr=True)


@contextmanager
def layer_progress(enabled: bool) -> Iterator[Callable[[str, int, int], None] | None]:
    """A ``progress(phase, done, total)`` callback drawing one bar per phase, or None when quiet."""
    if not enabled or not sys.stderr.isatty():
        yield None
        return
    tasks: dict[str, Any] = {}
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=stderr_console(), transient=False) as bar:

        def update(phase: str, done: int, total: int) -> None:
            if phase not in tasks:
                tasks[phase] = bar.add_task(f"{phase}: layers", total=total)
            bar.update(tasks[phase], completed=done)

        yield update


def log_warnings(groups: list[dict[str, Any]]) -> None:
    """The run's warnings, one log line per distinct message, once the progress bars are gone.

    The library only records notes (per module, in the report); logging them as they happen would print
    one line per module through the bars. Silent with --quiet and --json (logging is at ERROR there).
    """
    from compressor.report import warning_lines

    for line in warning_lines(groups):
        logging.getLogger("compressor").warning("%s", line)


def print_json(data: Any) -> None:
    typer.echo(json.dumps(data, indent=2, default=str))


def print_table(title: str, rows: dict[str, Any]) -> None:
    """A two-column key/value table on stdout."""
    from rich.table import Table

    table = Table(title=title, show_header=False)
    for key, value in rows.items():
        table.add_row(key, f"{value:.4f}" if isinstance(value, float) else str(value))
    Console().print(table)
