"""The one error handler and logging set-up every command runs under (kept apart from ``cli.py`` so
command modules can import it without a cycle).

Exit codes: 0 success, 1 runtime failure, 2 bad input (usage, recipe, model, data), 3 quality gate
failed (the output is still written), 130 interrupted. Tracebacks only with ``--debug``.
"""

from __future__ import annotations

import logging
import sys
import traceback
from collections.abc import Callable
from typing import TypeVar

import typer

T = TypeVar("T")


def configure_logging(quiet: bool) -> None:
    """Library logs go to stderr; warnings by default, nothing but errors with --quiet."""
    logging.basicConfig(
        level=logging.ERROR if quiet else logging.WARNING, format="%(levelname)s: %(message)s", stream=sys.stderr,
        force=True,
    )
    for noisy in ("transformers", "accelerate", "compressed_tensors", "datasets"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    # transformers' own tqdm bars ("Loading weights") would break the one-line error contract on stderr.
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()


def run_guarded(action: Callable[[], T], *, debug: bool) -> T:
    """Run a command body; map errors to one stderr line and an exit code (the single handler)."""
    from compressor.errors import CompressorError

    try:
        return action()
    except CompressorError as exc:
        if debug:
            traceback.print_exc()
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(exc.exit_code) from None
    except KeyboardInterrupt:
        typer.echo("interrupted: no output was written", err=True)
        raise typer.Exit(130) from None
    except Exception as exc:  # an unexpected failure is still one line unless --debug
        if debug:
            traceback.print_exc()
        text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        typer.echo(f"error: {type(exc).__name__}: {text} (run with --debug for the traceback)", err=True)
        raise typer.Exit(1) from None
