"""``compressor eval MODEL --data SOURCE``: perplexity over non-overlapping windows, streamed."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from compressor.commands._handler import configure_logging, run_guarded
from compressor.commands._options import (
    AllowPickleOpt,
    DebugOpt,
    DeviceOpt,
    DtypeOpt,
    EvalMemoryBudgetOpt,
    JsonOpt,
    ModelArg,
    QuietOpt,
    TextFieldOpt,
    TrustRemoteCodeOpt,
)
from compressor.commands._render import print_json, print_table


def eval_(
    model: ModelArg,
    *,
    data: Annotated[str, typer.Option("--data", "-d", help="Text SOURCE: file, dir, hf:..., demo:wiki.")] = "demo:wiki",
    seq_len: Annotated[int, typer.Option("--seq-len", help="Window length in tokens.")] = 512,
    max_tokens: Annotated[
        int | None, typer.Option("--max-tokens", help="Score at most this many tokens (whole windows).")
    ] = 16384,
    text_field: TextFieldOpt = None,
    dtype: DtypeOpt = "auto",
    device: DeviceOpt = "auto",
    trust_remote_code: TrustRemoteCodeOpt = False,
    allow_pickle: AllowPickleOpt = False,
    memory_budget: EvalMemoryBudgetOpt = "auto",
    json_output: JsonOpt = False,
    quiet: QuietOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Perplexity of MODEL (any format compressor reads or writes) on held-out text."""
    configure_logging(quiet or json_output)

    def action() -> None:
        from compressor import streaming
        from compressor.models.loading import dtype_name
        from compressor.pipeline import evaluate, load

        streamed = streaming.streams_eval(model, memory_budget, dtype)
        if streamed:  # one decoder layer in memory at a time, the same numbers
            result = streaming.evaluate(Path(model), data, seq_len=seq_len, max_tokens=max_tokens, device=device,
                                        dtype=dtype, text_field=text_field)
            model_dtype = streaming.checkpoint_dtype(Path(model), dtype)
        else:
            loaded = load(model, dtype=dtype, trust_remote_code=trust_remote_code, allow_pickle=allow_pickle)
            result = evaluate(loaded, data, seq_len=seq_len, max_tokens=max_tokens, device=device,
                              text_field=text_field)
            model_dtype = dtype_name(loaded.model)
        summary = {"model": model, "data": data, "dtype": model_dtype, "streamed": streamed, **result.to_dict()}
        if json_output:
            print_json(summary)
        elif not quiet:
            print_table(f"perplexity of {model}", summary)
        else:
            typer.echo(f"{result.ppl:.4f}")

    run_guarded(action, debug=debug)
