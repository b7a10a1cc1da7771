"""Options shared by several commands, declared once as ``Annotated`` aliases."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

ModelArg = Annotated[
    str,
    typer.Argument(
        help="Model: a local HF directory, a .gguf file, a hub id, or demo:smollm2 (offline SmolLM2-135M).",
        show_default=False,
    ),
]
RecipeOpt = Annotated[
    str, typer.Option("--recipe", "-r", help="Shipped recipe name (see `compressor recipes list`) or a YAML file.")
]
OutDirOpt = Annotated[Path, typer.Option("--out", "-o", help="Output directory (written atomically).")]
SetOpt = Annotated[
    list[str] | None,
    typer.Option("--set", help="Override a recipe field, e.g. --set stages.0.bits=3 (repeatable)."),
]
SeedOpt = Annotated[int | None, typer.Option("--seed", help="Seed for calibration sampling [default: recipe's, 0].")]
DeviceOpt = Annotated[str, typer.Option("--device", help="auto (CUDA when present), cpu, or cuda[:N].")]
DtypeOpt = Annotated[
    str,
    typer.Option(
        "--dtype",
        help="Load and compute dtype: auto (keep the checkpoint's; .gguf files and demo:smollm2 are float32), "
        "float32, bfloat16 or float16.",
    ),
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON object on stdout and nothing else.")]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars or warnings.")]
DebugOpt = Annotated[bool, typer.Option("--debug", help="Show the full traceback on errors.")]
AllowPickleOpt = Annotated[
    bool,
    typer.Option("--allow-pickle", help="Load pickle weights (*.bin, *.pt) when a model has no safetensors. "
                 "Unpickling runs code stored in the file: use only for files you trust."),
]
TrustRemoteCodeOpt = Annotated[
    bool,
    typer.Option("--trust-remote-code", help="Run the Python modeling/tokenizer code a model directory names "
                 "in its auto_map. That code runs with your permissions: use only for models you trust."),
]
OverwriteOpt = Annotated[bool, typer.Option("--overwrite", help="Replace the output directory if it exists.")]
CheckpointOpt = Annotated[
    bool,
    typer.Option("--checkpoint/--no-checkpoint", help="Save each finished layer in OUT.partial so --resume can "
                 "continue after a crash (costs disk: the next layer's inputs plus the finished layers)."),
]
ResumeOpt = Annotated[
    bool,
    typer.Option("--resume", help="Continue an interrupted run from its checkpoints in OUT.partial (the same "
                 "model, recipe and calibration data, else refused)."),
]
SeqLenOpt = Annotated[int | None, typer.Option("--seq-len", help="Tokens per sequence/window.")]
TextFieldOpt = Annotated[
    str | None, typer.Option("--text-field", help="Column holding the text in json/jsonl/csv/parquet/hf data.")
]
MemoryBudgetOpt = Annotated[
    str,
    typer.Option("--memory-budget", help="RAM the model's weights may take, e.g. 4GB or 1.5GiB: a local safetensors "
                 "checkpoint whose weights exceed it streams one decoder layer at a time from disk (rtn/gptq/dgq into "
                 "dense or compressed-tensors; --eval reads the written output back layer by layer). auto: the "
                 "available memory; none: never stream."),
]
ActivationMemoryOpt = Annotated[
    str | None,
    typer.Option("--activation-memory", help="Keep cached calibration hidden states in memory-mapped files in "
                 "OUT.partial above this size, e.g. 2GB (default: in RAM): under streaming when one layer boundary "
                 "exceeds it; FinerCut's cache of every layer boundary in any run when the whole cache does."),
]
EvalMemoryBudgetOpt = Annotated[
    str,
    typer.Option("--memory-budget", help="RAM the model's weights may take, e.g. 4GB: a local safetensors directory "
                 "(dense or compressed-tensors) whose weights exceed it is scored one decoder layer at a time, to the "
                 "same perplexity. auto: the available memory; none: always load it whole."),
]
