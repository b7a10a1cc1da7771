"""The library API: ``compress``, ``evaluate``, ``load``. The CLI is a thin layer over these."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import torch
from safetensors import SafetensorError

from compressor import distributed, streaming
from compressor.calibration.tokens import calibration_batch, iter_eval_windows
from compressor.checkpoint import Checkpoints, check_resume, fingerprint, write_error
from compressor.engine import ModelContext, ProgressFn, run_stages
from compressor.errors import CalibrationError, ExportError, QualityGateError, RecipeError, UsageError
from compressor.evaluate.perplexity import PerplexityResult, perplexity
from compressor.evaluate.run import RunEvaluation
from compressor.export import format_problem, storage_scale_dtype, write_model
from compressor.export.atomic import atomic_output_dir, check_output_dir, partial_dir
from compressor.methods.base import Method, TargetedConfig
from compressor.models import ModelAdapter, get_adapter
from compressor.models.loading import LoadedModel, dtype_name, load_model, resolve_device
from compressor.recipe import EXPORT_FORMATS, ExportConfig, Recipe, build_stages
from compressor.report import (
    Report,
    average_bits,
    model_size,
    peak_rss_bytes,
    versions,
    write_plots,
    write_report,
)
from compressor.timing import phase

log = logging.getLogger(__name__)


def load(
    path: str | Path, *, dtype: str = "auto", trust_remote_code: bool = False, budget: str | int | None = None,
    allow_pickle: bool = False,
) -> LoadedModel:
    """Load any model this package reads or writes (HF dir, our exports, .gguf, demo:, hub id).

    ``dtype="auto"`` keeps the checkpoint's own dtype; ``float32``, ``bfloat16`` or ``float16`` force one.
    A BitStack directory (export format bitstack) loads at ``budget`` (300MB, 1.5GiB, bytes or 2.5bpw;
    every block when None); other models take no budget.
    """
    from compressor.export.bitstack_materialize import is_bitstack_dir, load_at_budget

    if is_bitstack_dir(path):
        return load_at_budget(path, budget, dtype)
    if budget is not None:
        raise UsageError(f"budget: {path} is not a BitStack directory (no bitstack.json); only those load at a budget")
    from compressor.export.int8_dir import int8_dir_config, load_int8_dir

    if int8_dir_config(path) is not None:
        return load_int8_dir(Path(path), dtype)
    return load_model(str(path), dtype=dtype, trust_remote_code=trust_remote_code, allow_pickle=allow_pickle)


def evaluate(
    model: str | Path | LoadedModel,
    data: str,
    *,
    seq_len: int = 512,
    max_tokens: int | None = 16384,
    device: str = "auto",
    dtype: str = "auto",
    text_field: str | None = None,
    progress: Callable[[int], None] | None = None,
    memory_budget: str | int | None = None,
) -> PerplexityResult:
    """Perplexity of a model over non-overlapping ``seq_len`` windows of ``data``.

    A local safetensors directory whose weights exceed ``memory_budget`` (as for ``compress``; None: never) is
    scored streamed, one decoder layer at a time (:mod:`compressor.streaming.perplexity`), to the same numbers.
    """
    if streaming.streams_eval(model, memory_budget, dtype):
        return streaming.evaluate(Path(str(model)), data, seq_len=seq_len, max_tokens=max_tokens, device=device,
                                  dtype=dtype, text_field=text_field, progress=progress)
    loaded = model if isinstance(model, LoadedModel) else load(model, dtype=dtype)
    _check_seq_len(get_adapter(loaded.model), seq_len)
    target = resolve_device(device)
    loaded.model.to(target)
    try:
        windows = iter_eval_windows(loaded.tokenizer, data, seq_len, max_tokens, text_field=text_field)
        return perplexity(loaded.model, windows, target, progress=progress)
    finally:
        loaded.model.to("cpu")


#: Formats ``compressor export`` cannot produce from stored integer codes, and the methods that write them.
RESTORE_ONLY_BY_METHOD = {
    "bitsandbytes": "recipes nf4 and int8",
    "bitstack": "the bitstack method",
    "compressor-int8": "dgq, e.g. recipe w4a8-dgq",
}


def export(source: str | Path, export_config: ExportConfig, out: Path, *, overwrite: bool = False) -> list[str]:
    """Store a finished compressed-tensors run in another format without re-running calibration."""
    from compressor.export.reader import read_compressed_tensors

    if export_config.format not in EXPORT_FORMATS:
        raise UsageError(f"--format {export_config.format}: export re-stores integer codes as "
                         f"{', '.join(EXPORT_FORMATS)}; {export_config.format} is written by its own methods "
                         f"({RESTORE_ONLY_BY_METHOD.get(export_config.format, 'a recipe')}) from the original model")
    check_out_apart(source, out)
    check_writable(out)
    check_output_dir(out, overwrite)
    model, quantized, tokenizer = read_compressed_tensors(Path(source))
    for path, qweight in quantized.items():
        problem = format_problem(export_config, qweight.bits, qweight.group_size, qweight.symmetric)
        if problem:
            raise RecipeError(f"cannot store {path} as {export_config.format}: {problem}")
    run = ModelContext(model, get_adapter(model), torch.empty(0, dtype=torch.long), torch.device("cpu"), 1, quantized)
    _round_scales_for_storage(run, export_config)
    with atomic_output_dir(out, overwrite) as staging:
        files = write_model(export_config, run, tokenizer, staging)
        for name in ("recipe.yaml", "compression_report.json", "compression_report.md"):
            if (Path(source) / name).is_file():
                (staging / name).write_bytes((Path(source) / name).read_bytes())
    return files


def check_out_apart(source: object, out: Path) -> None:
    """Refuse an ``out`` that is the local source directory, inside it, or holds it.

    Writing the output renames a finished directory onto ``OUT`` (replacing it under ``--overwrite``), so any
    of the three would replace or mix with the weights being read; a hub id or an in-memory model has no
    directory to collide with.
    """
    if not isinstance(source, str | Path) or not Path(source).is_dir():
        return
    model_dir, target = Path(source).resolve(), Path(out).resolve()
    for where in (target, partial_dir(target)):
        if where == model_dir or where.is_relative_to(model_dir) or model_dir.is_relative_to(where):
            relation = ("is the model directory" if where == model_dir else
                        "is inside the model directory" if where.is_relative_to(model_dir) else
                        "contains the model directory")
            raise UsageError(f"--out {out}: {where} {relation} {source}; write the output somewhere else")


def check_writable(out: Path) -> None:
    """Refuse, before any loading, an ``out`` whose directory cannot take ``OUT.partial`` and ``OUT``.

    The nearest existing ancestor of ``out``'s parent (the rest is created) must be a writable directory, and so
    must an existing ``OUT.partial``: read-only file systems and permissions (``os.access``; root ignores modes)
    and a file where a directory should be are one line with exit 2 instead of a failure after the run.
    """
    partial = partial_dir(out)
    place = partial.parent
    while not place.exists() and place != place.parent:
        place = place.parent
    for where in (place, partial) if partial.exists() else (place,):
        if not where.is_dir():
            raise UsageError(f"--out {out}: {where} is not a directory")
        if not os.access(where, os.W_OK | os.X_OK):
            read_only = os.statvfs(where).f_flag & os.ST_RDONLY
            why = "is on a read-only file system" if read_only else "is not writable (permission denied)"
            raise UsageError(f"--out {out}: {where} {why}; choose another --out")


def _check_seq_len(adapter: ModelAdapter, seq_len: int) -> None:
    limit = adapter.max_positions
    if limit is not None and seq_len > limit:
        raise CalibrationError(f"seq_len {seq_len} is longer than the model allows ({limit} positions)")


def _check_format_fits_model(export: ExportConfig, model: torch.nn.Module) -> None:
    """A format that cannot hold this architecture is a recipe error now, not after the calibration and the run."""
    from compressor.export.bitstack_store import check_skeleton
    from compressor.export.gguf_arch import check_architecture

    checks = {"gguf": lambda: check_architecture(model, warn=False), "bitstack": lambda: check_skeleton(model)}
    if export.format not in checks:
        return
    try:
        checks[export.format]()
    except ExportError as exc:
        raise RecipeError(f"export.format {export.format}: {exc}") from exc


def _check_targets(stages: list[Method], adapter: ModelAdapter) -> None:
    """Resolve every stage's targets on this model's module paths, before any calibration runs.

    A stage whose targets match no module, or two quantizing stages that match one module, is a recipe
    error here rather than after minutes of calibration. The recipe validator compares target strings only;
    regexes (``re:.*mlp.*`` and ``re:.*down_proj``) overlap only on real paths. Pruning stages may renumber
    layers or replace sublayers later, but the surviving modules keep these name patterns, so an overlap
    found on the loaded model is an overlap when the quantizers run.
    """
    modules = [
        (adapter.layer_prefix(i) + "." + name, type(layer.get_submodule(name)).__name__)
        for i, layer in enumerate(adapter.layers())
        for name in adapter.linear_names()
    ]
    claimed: dict[str, int] = {}  # module path -> the first quantizing stage that targets it
    for index, stage in enumerate(stages):
        config = stage.config
        if not isinstance(config, TargetedConfig):
            continue
        matched = [path for path, class_name in modules if config.matches(path, class_name)]
        if not matched:
            raise RecipeError(f"stages.{index} ({stage.name}): targets {config.targets} match no module of this model")
        if stage.kind != "quant":
            continue
        for path in matched:
            first = claimed.setdefault(path, index)
            if first != index:
                raise RecipeError(
                    f"stages.{first} ({stages[first].name}) and stages.{index} ({stage.name}) both target {path}; "
                    "give the stages disjoint targets"
                )


def compress(
    model: str | Path | LoadedModel,
    recipe: Recipe,
    out: Path,
    *,
    dtype: str = "auto",
    device: str = "auto",
    eval_data: str | None = None,
    eval_max_tokens: int | None = 16384,
    eval_seq_len: int | None = None,
    max_ppl_increase: float | None = None,
    overwrite: bool = False,
    progress: ProgressFn | None = None,
    allow_pickle: bool = False,
    trust_remote_code: bool = False,
    checkpoint: bool = True,
    resume: bool = False,
    memory_budget: str | int | None = "auto",
    activation_memory: str | int | None = None,
) -> Report:
    """Run ``recipe`` on ``model`` and write the result to ``out`` (atomically); returns the report.

    A local safetensors checkpoint whose weights exceed ``memory_budget`` (``4GB``; ``auto``: the available memory;
    ``none``) streams its layers from disk, hidden states above ``activation_memory`` memory-mapped (:mod:`.streaming`).

    ``checkpoint`` saves each finished layer in ``OUT.partial``; ``resume`` continues from there
    (see :mod:`compressor.checkpoint`).

    With ``max_ppl_increase`` (percent) and ``eval_data``, a perplexity increase above the limit raises
    :class:`QualityGateError` after the output and report are written.

    Under ``torchrun`` (``WORLD_SIZE`` > 1) the processes split the calibration batches and sum their statistics
    (:mod:`compressor.distributed`); rank 0 alone evaluates, writes and returns the full report, the others
    return theirs unwritten once it is done. Checkpoints are off there.
    """
    if max_ppl_increase is not None and eval_data is None:
        raise CalibrationError("--max-ppl-increase needs --eval SOURCE to measure perplexity")
    with distributed.process_group(device) as device_of_rank:
        return _compress(model, recipe, out, dtype=dtype, device=device_of_rank, eval_data=eval_data,
                         eval_max_tokens=eval_max_tokens, eval_seq_len=eval_seq_len, max_ppl_increase=max_ppl_increase,
                         overwrite=overwrite, progress=progress, allow_pickle=allow_pickle,
                         trust_remote_code=trust_remote_code, checkpoint=checkpoint, resume=resume,
                         memory_budget=memory_budget, activation_memory=activation_memory)


def _compress(
    model: str | Path | LoadedModel, recipe: Recipe, out: Path, *, dtype: str, device: str, eval_data: str | None,
    eval_max_tokens: int | None, eval_seq_len: int | None, max_ppl_increase: float | None, overwrite: bool,
    progress: ProgressFn | None, allow_pickle: bool, trust_remote_code: bool, checkpoint: bool, resume: bool,
    memory_budget: str | int | None = "auto", activation_memory: str | int | None = None,
) -> Report:
    if distributed.is_writer():  # the output is rank 0's alone (other ranks may not even see its disk)
        check_out_apart(model, out)
        check_writable(out)
        check_output_dir(out, overwrite)
        check_resume(out, resume=resume, checkpoint=checkpoint, overwrite=overwrite)
    timings: dict[str, float] = {}
    stages = build_stages(recipe.stages, recipe.export.format)
    stream = streaming.prepare(model, memory_budget, activation_memory, dtype, stages, recipe, eval_data=eval_data,
                               resume=resume)
    if distributed.is_distributed():
        distributed.check_recipe(stages, recipe.calibration, resume)
        checkpoint, eval_data = False, eval_data if distributed.is_writer() else None
    checkpoint = checkpoint and stream is None  # a streamed layer is written out as soon as it is done
    evaluation = eval_data and RunEvaluation(eval_data, eval_seq_len or recipe.calibration.seq_len, eval_max_tokens,
                                             device, max_ppl_increase, timings)
    if evaluation and stream:  # the source checkpoint, one layer at a time, before the skeleton loads
        evaluation.measure("before", stream.directory, dtype)
    with phase(timings, "load"):
        loaded = stream.load() if stream else model if isinstance(model, LoadedModel) else load(
            model, dtype=dtype, allow_pickle=allow_pickle, trust_remote_code=trust_remote_code)
    adapter = get_adapter(loaded.model)
    calib = recipe.calibration
    _check_seq_len(adapter, calib.seq_len)
    _check_targets(stages, adapter)
    _check_format_fits_model(recipe.export, loaded.model)
    distributed.check_model(loaded.model, adapter)
    target = resolve_device(device)
    with phase(timings, "calibration_data"):
        calibration_notes: list[str] = []
        tokens = calibration_batch(loaded.tokenizer, calib.dataset, calib.samples, calib.seq_len, recipe.seed,
                                   text_field=calib.text_field, notes=calibration_notes)
    params_before, bytes_before = model_size(loaded.model)
    if evaluation and not stream:
        evaluation.measure("before", loaded)
    marks = fingerprint(recipe.digest(), loaded.model, tokens) if checkpoint else {}
    checkpoints = Checkpoints(out, recipe.to_dict(), marks, resume) if checkpoint else None
    torch.manual_seed(recipe.seed)
    run = ModelContext(loaded.model, adapter, distributed.shard_batches(tokens, calib.batch_size), target,
                       calib.batch_size, activation_limit=streaming.activation_limit(activation_memory),
                       temp_dir=partial_dir(out))
    with streaming.attach(run, stream, recipe.export, out):  # no-op unless streaming
        with phase(timings, "compress"):
            records = run_stages(run, stages, progress, checkpoints)
            if run.stream is None:  # a streamed run rounded each layer's scales before writing it
                _round_scales_for_storage(run, recipe.export)
        if evaluation and not stream:
            evaluation.measure("after", loaded)
        params_after, bytes_after = model_size(loaded.model, run.quantized)
        quantizers = {stage.name for stage in stages if stage.kind == "quant"}
        bits, bits_meta = average_bits(run.quantized, [r for r in records if r.method in quantizers])
        report = Report(
            model=loaded.source, recipe=recipe.to_dict(), recipe_hash=recipe.digest(), seed=recipe.seed,
            export_format=recipe.export.format,
            size_bytes={"before": bytes_before, "after": bytes_after, "packed_estimate": bytes_after},
            params={"before": params_before, "after": params_after},
            avg_bits_per_weight=bits, avg_bits_incl_metadata=bits_meta,
            compression_ratio=bytes_before / bytes_after if bytes_after else 0.0,
            layers=[r.to_dict() for r in records], timings=timings, peak_rss_bytes=0, versions=versions(),
            calibration={**calib.model_dump(), "tokens": int(tokens.numel()), "notes": calibration_notes},
            structure=run.structure,
            warnings=[*loaded.warnings, *streaming.notes(run), *Report.grouped_warnings(records)],
        )
        report.dtype = dtype_name(loaded.model)
        if evaluation and not stream:
            evaluation.judge(report)
        if distributed.is_writer():  # a streamed run scores its written output, read back layer by layer
            _write(report, run, loaded, recipe, out, overwrite, timings, stages,
                   evaluation.judge_output(report) if evaluation and stream else None)
        distributed.barrier()  # the other processes return once rank 0's output is complete
        if report.quality_gate and not report.quality_gate["passed"]:
            raise QualityGateError(report.quality_gate["message"])
        return report


def _round_scales_for_storage(run: ModelContext, export_config: ExportConfig) -> None:
    """Make the in-memory weights exactly what the file will hold.

    Formats store scales in fp16 (GGUF) or the model dtype; rounding a float32 scale moves each weight by
    at most ~1e-3 relative and never changes its integer code, so the codes stay and only the dequantized
    weight is refreshed. Evaluation after compression then measures the exported model, bit for bit.
    """
    for path, qweight in run.quantized.items():
        module = run.model.get_submodule(path)
        scale_dtype = storage_scale_dtype(export_config, module.weight.dtype)
        if scale_dtype == torch.float32:
            continue
        rounded = replace(qweight, scale=qweight.scale.to(scale_dtype).float())
        run.quantized[path] = rounded
        module.weight.data = rounded.dequantize(module.weight.dtype)


def _write(
    report: Report, run: ModelContext, loaded: LoadedModel, recipe: Recipe, out: Path, overwrite: bool,
    timings: dict[str, float], stages: list[Method] | None = None, judge: Callable[[Path], None] | None = None,
) -> None:
    """Write the model and its report atomically; a write that fails (disk full, read-only) is one line.

    ``judge(staging)`` runs once the model files are written and before the report is (a streamed run's
    evaluation of its own output).
    """
    try:
        _write_files(report, run, loaded, recipe, out, overwrite, timings, stages, judge)
    except (OSError, SafetensorError) as exc:
        raise write_error(exc, out, partial_dir(out)) from None


def _write_files(
    report: Report, run: ModelContext, loaded: LoadedModel, recipe: Recipe, out: Path, overwrite: bool,
    timings: dict[str, float], stages: list[Method] | None = None, judge: Callable[[Path], None] | None = None,
) -> None:
    with atomic_output_dir(out, overwrite) as staging:
        with phase(timings, "export"):
            report.files = write_model(recipe.export, run, loaded.tokenizer, staging, stages)
        if judge:
            judge(staging)
        (staging / "recipe.yaml").write_text(recipe.dump())
        # The honest size is what was written: a dense export of fake-quantized weights saves nothing.
        report.size_bytes["after"] = sum(
            p.stat().st_size for p in staging.iterdir() if p.suffix in (".safetensors", ".gguf")
        )
        report.compression_ratio = report.size_bytes["before"] / max(report.size_bytes["after"], 1)
        report.peak_rss_bytes = peak_rss_bytes()
        report.files += write_plots(report, staging)
        report.files += ["recipe.yaml", "compression_report.json", "compression_report.md"]
        write_report(report, staging)
