"""``compressor compress MODEL --recipe R --out DIR``: run a recipe and write the compressed model."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from compressor.commands._handler import configure_logging, run_guarded
from compressor.commands._options import (
    AllowPickleOpt,
    DebugOpt,
    DeviceOpt,
    DtypeOpt,
    JsonOpt,
    ModelArg,
    OutDirOpt,
    OverwriteOpt,
    QuietOpt,
    RecipeOpt,
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
    allow_pickle: AllowPickleOpt = False,
    trust_remote_code: TrustRemoteCodeOpt = False,
    json_output: JsonOpt = False,
    quiet: QuietOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Compress MODEL with a recipe; writes weights, config, tokenizer, recipe.yaml and a report to --out."""
    configure_logging(quiet or json_output)
    sets = list(overrides or [])
    for key, value in (("dataset", calib), ("samples", calib_samples), ("seq_len", seq_len),
                       ("text_field", text_field)):
        if value is not None:
            sets.append(f"calibration.{key}={value}")
    if seed is not None:
        sets.append(f"seed={seed}")

    def action() -> None:
        from compressor.errors import QualityGateError
        from compressor.pipeline import compress as run_compress
        from compressor.recipe import load_recipe

        resolved = load_recipe(recipe, sets)
        limit = parse_percent(max_ppl_increase)
        with layer_progress(not (quiet or json_output)) as progress:
            try:
                report = run_compress(model, resolved, out, dtype=dtype, device=device, eval_data=eval_data,
                                      eval_max_tokens=eval_tokens, max_ppl_increase=limit, overwrite=overwrite,
                                      progress=progress, allow_pickle=allow_pickle,
                                      trust_remote_code=trust_remote_code)
            except QualityGateError:
                written = _read_report(out)
                log_warnings(written["warnings"])
                if json_output:
                    print_json(written)
                raise
        log_warnings(report.warnings)
        if json_output:
            print_json(report.to_dict())
        elif not quiet:
            print_table(f"compressed -> {out}", report.summary())

    run_guarded(action, debug=debug)


def _read_report(out: Path) -> dict[str, Any]:
    import json

    return json.loads((out / "compression_report.json").read_text())
