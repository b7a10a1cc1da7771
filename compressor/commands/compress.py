"""``compressor compress MODEL --recipe R --out DIR``: run a recipe and write the compressed model."""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from types import FrameType
from typing import Annotated, Any

import typer

from compressor.commands._handler import configure_logging, run_guarded
from compressor.commands._options import (
    ActivationMemoryOpt,
    AllowPickleOpt,
    CheckpointOpt,
    DebugOpt,
    DeviceOpt,
    DtypeOpt,
    JsonOpt,
    MemoryBudgetOpt,
    ModelArg,
    OutDirOpt,
    OverwriteOpt,
    QuietOpt,
    RecipeOpt,
    ResumeOpt,
    SeedOpt,
    SeqLenOpt,
    SetOpt,
    TextFieldOpt,
    TrustRemoteCodeOpt,
)
from compressor.commands._render import layer_progress, log_warnings, print_json, print_table


def parse_percent(value: str | None) -> float | None:
    """'5%' or '5' -> 5.0; the quality gate's limit on perplexity increase."""
    if value is None:
        return None
    from compressor.errors import UsageError

    try:
        return float(value.strip().removesuffix("%"))
    except ValueError:
        raise UsageError(f"--max-ppl-increase '{value}': expected a percentage such as 5%") from None


def compress(
    model: ModelArg,
    recipe: RecipeOpt,
    out: OutDirOpt,
    *,
    calib: Annotated[
        str | None, typer.Option("--calib", help="Calibration SOURCE (file, dir, hf:..., demo:lee).")
    ] = None,
    calib_samples: Annotated[int | None, typer.Option("--calib-samples", help="Calibration sequences.")] = None,
    seq_len: SeqLenOpt = None,
    seed: SeedOpt = None,
    text_field: TextFieldOpt = None,
    overrides: SetOpt = None,
    dtype: DtypeOpt = "auto",
    device: DeviceOpt = "auto",
    eval_data: Annotated[str | None, typer.Option("--eval", help="Measure perplexity before/after on SOURCE.")] = None,
    eval_tokens: Annotated[int, typer.Option("--eval-tokens", help="Tokens of --eval data to score.")] = 16384,
    max_ppl_increase: Annotated[
        str | None, typer.Option("--max-ppl-increase", help="Quality gate: exit 3 if ppl rises more (e.g. 5%).")
    ] = None,
    overwrite: OverwriteOpt = False,
    checkpoint: CheckpointOpt = True,
    resume: ResumeOpt = False,
    memory_budget: MemoryBudgetOpt = "auto",
    activation_memory: ActivationMemoryOpt = None,
    allow_pickle: AllowPickleOpt = False,
    trust_remote_code: TrustRemoteCodeOpt = False,
    json_output: JsonOpt = False,
    quiet: QuietOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Compress MODEL with a recipe; writes weights, config, tokenizer, recipe.yaml and a report to --out."""
    from compressor.distributed import is_writer

    writer = is_writer()  # under torchrun only rank 0 logs, shows progress and prints the result
    configure_logging(quiet or json_output or not writer)
    sets = _recipe_sets(overrides, {"calibration.dataset": calib, "calibration.samples": calib_samples,
                                    "calibration.seq_len": seq_len, "calibration.text_field": text_field, "seed": seed})

    def action() -> None:
        from compressor.errors import QualityGateError
        from compressor.pipeline import compress as run_compress
        from compressor.recipe import load_recipe

        resolved = load_recipe(recipe, sets)
        limit = parse_percent(max_ppl_increase)
        with _interrupts(), layer_progress(writer and not (quiet or json_output)) as progress:
            try:
                report = run_compress(model, resolved, out, dtype=dtype, device=device, eval_data=eval_data,
                                      eval_max_tokens=eval_tokens, max_ppl_increase=limit, overwrite=overwrite,
                                      progress=progress, allow_pickle=allow_pickle,
                                      trust_remote_code=trust_remote_code, checkpoint=checkpoint, resume=resume,
                                      memory_budget=memory_budget, activation_memory=activation_memory)
            except QualityGateError:
                written = _read_report(out)
                log_warnings(written["warnings"])
                if json_output:
                    print_json(written)
                raise
        if not writer:
            return
        log_warnings(report.warnings)
        if json_output:
            print_json(report.to_dict())
        elif not quiet:
            print_table(f"compressed -> {out}", report.summary())

    _run_interruptible(action, debug, model, recipe, out)


def _recipe_sets(overrides: list[str] | None, options: dict[str, object]) -> list[str]:
    """``--set`` values, then the recipe fields the shortcut options give (None: not given)."""
    return [*(overrides or []), *(f"{key}={value}" for key, value in options.items() if value is not None)]


class _Interrupted(BaseException):
    """SIGINT or SIGTERM during a run (a BaseException, so the error handler leaves it to :func:`compress`)."""

    def __init__(self, name: str, exit_code: int) -> None:
        super().__init__(name)
        self.name, self.exit_code = name, exit_code


@contextmanager
def _interrupts() -> Iterator[None]:
    """Turn SIGTERM (exit 143) and Ctrl-C (exit 130) into :class:`_Interrupted` for the duration of a run.

    The exception unwinds like any other: the atomic writer removes its staging directory, and the layer
    checkpoints, each written whole before the next starts, stay for ``--resume``.
    """

    def terminate(signum: int, frame: FrameType | None) -> None:
        raise _Interrupted("SIGTERM", 143)

    main = threading.current_thread() is threading.main_thread()  # handlers can only be set there
    previous = signal.signal(signal.SIGTERM, terminate) if main else None
    try:
        yield
    except KeyboardInterrupt:
        raise _Interrupted("SIGINT", 130) from None
    finally:
        if main:
            signal.signal(signal.SIGTERM, previous)


def _run_interruptible(action: Callable[[], None], debug: bool, model: str, recipe: str, out: Path) -> None:
    """The error handler, plus the one line an interrupted run prints (how to resume) and its exit code."""
    try:
        run_guarded(action, debug=debug)
    except _Interrupted as stop:
        typer.echo(_resume_hint(stop, model, recipe, out), err=True)
        raise typer.Exit(stop.exit_code) from None


def _resume_hint(stop: _Interrupted, model: str, recipe: str, out: Path) -> str:
    """One line: what was kept, and the command that continues (the other options as they were)."""
    from compressor.checkpoint import MANIFEST
    from compressor.export.atomic import partial_dir

    kept = partial_dir(out)
    if not (kept / MANIFEST).is_file():
        return f"interrupted ({stop.name}): no output was written"
    return (f"interrupted ({stop.name}): the finished work is checkpointed in {kept}; to continue, run the same "
            f"command plus --resume: compressor compress {model} --recipe {recipe} --out {out} ... --resume")


def _read_report(out: Path) -> dict[str, Any]:
    import json

    return json.loads((out / "compression_report.json").read_text())
