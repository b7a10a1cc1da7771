"""BitStack's size-vs-perplexity curve on the demo model: decompose once, load at every budget, one PNG.

    python benchmarks/bitstack.py [--samples 64 --seq-len 512 --eval-tokens 16384] [--iterations 16 --rank 16]
        [--signs feedback|residual --dampening 0.3 --svd lowrank|full] [--bpw 1.5,1.75,2,2.25,2.5,2.75,3,3.5,4,4.5]
        [--orders relative,absolute,fisher]
        [--reference "GPTQ W3 g128=40.66@3.125" ...]
        [--keep DIR] [--out bench-bitstack]

The bitstack stage decomposes every decoder linear once (calibration demo:lee, ``samples`` x ``seq_len``,
seed 0, as benchmarks/quant.py and baq.py) and its BitStack directory is written (to ``--keep`` or a temporary
directory); then for each budget the model is loaded from that directory (``load_bitstack``, what
``compressor.load(DIR, budget=...)`` does) and scored on the same demo:wiki windows (512 tokens) as the other
benchmarks. A budget in bits per weight counts every stored byte of the decomposed linears (packed signs, fp16
SVD factors, per-channel scales) over their weights; each row states the bits actually loaded (at most the
budget: whole blocks only). A budget below one block per linear has no model: its row says the smallest.
Several ``--orders`` share one decomposition (with ``fisher`` among them the stage measures the loss gradients
too): the directory is written once and each other order is a copy of its manifest with that order's block
sequence, beside links to the same shards, so every order loads the same blocks and differs only in which.
Timed: the decomposition (the stage's pass), writing the directory, each load at a budget, and one
``compressor bitstack materialize`` (load + write a dense directory) at ``--materialize-at`` (default: the
largest budget that loads).

Outputs in ``--out``: ``bitstack.json`` (rewritten after every row), ``bitstack.md`` (the table) and
``bitstack.png`` (the curve, log perplexity; needs matplotlib, the 'plots' extra), with the dense model as a
line and each ``--reference "LABEL=PPL@BITS"`` as a labelled point (``@BITS`` may be left out when the label
holds ``W<bits>``, e.g. ``"GPTQ W3=40.66"`` is placed at 3 bits). A label ``SERIES|POINT`` (``"GPTQ|W2 g64=188@2.25"``)
joins the points of one series in a dashed line named in the legend, each point tagged with its ``POINT``.
"""

from __future__ import annotations

import argparse
import json
import re
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from compressor.calibration.tokens import calibration_batch
from compressor.engine import ModelContext, run_stages
from compressor.errors import UsageError
from compressor.export.bitstack_materialize import budget_report, materialize
from compressor.export.bitstack_store import load_bitstack, read_manifest, write_bitstack
from compressor.methods.quant.bitstack import BitStack, BitStackConfig
from compressor.methods.quant.bitstack.order import global_order
from compressor.models import get_adapter
from compressor.pipeline import LoadedModel, evaluate, load
from compressor.plots import _pyplot
from compressor.report import peak_rss_bytes

DEFAULT_BPW = "1.5,1.75,2,2.25,2.5,2.75,3,3.5,4,4.5"


def parse_reference(text: str) -> tuple[str, float, float]:
    """``"LABEL=PPL@BITS"`` (or ``"LABEL=PPL"`` with ``W<bits>`` in the label) as ``(label, bits, ppl)``."""
    label, _, value = text.rpartition("=")
    ppl_text, _, bits_text = value.partition("@")
    if not bits_text:
        found = re.search(r"\bW(\d+(?:\.\d+)?)", label, re.IGNORECASE)
        if found is None:
            raise SystemExit(f"--reference {text!r}: give the bits as LABEL=PPL@BITS (no W<bits> in the label)")
        bits_text = found.group(1)
    try:
        return label.strip(), float(bits_text), float(ppl_text)
    except ValueError:
        raise SystemExit(f"--reference {text!r}: expected LABEL=PPL@BITS, e.g. 'GPTQ W3 g128=40.66@3.125'") from None


def decompose(loaded: LoadedModel, tokens: torch.Tensor, iterations: int, rank: int, directory: Path,
              signs: str = "feedback", svd: str = "lowrank", dampening: float = 0.3,
              orders: tuple[str, ...] = ("relative",)) -> dict[str, Any]:
    """Run the stage once (every block) and write its directory, in ``orders[0]``, and one manifest copy per other
    order (:func:`reordered`); seconds and RSS of both steps and ``directories`` by order."""
    stage = BitStack(BitStackConfig.model_validate({"method": "bitstack", "iterations": iterations, "rank": rank,
                                                    "signs": signs, "svd": svd, "dampening": dampening,
                                                    "order": "fisher" if "fisher" in orders else orders[0]}))
    run = ModelContext(loaded.model, get_adapter(loaded.model), tokens, torch.device("cpu"), 8)
    start = time.perf_counter()
    run_stages(run, [stage])
    seconds = time.perf_counter() - start
    rss = peak_rss_bytes()
    start = time.perf_counter()
    stage.config = stage.config.model_copy(update={"order": orders[0]})
    write_bitstack(directory, loaded.model, stage, loaded.tokenizer)
    directories = {orders[0]: directory} | {order: reordered(directory, stage, order) for order in orders[1:]}
    manifest = read_manifest(directory)
    everything = budget_report(manifest, {path: len(item["block_bytes"]) for path, item in manifest["linears"].items()},
                               None)
    smallest = budget_report(manifest, dict.fromkeys(manifest["linears"], 1), None)
    return {"decompose_seconds": round(seconds, 1), "peak_rss_mb_after_decompose": round(rss / 2**20),
            "write_seconds": round(time.perf_counter() - start, 1),
            "directory_mb": round(sum(p.stat().st_size for p in directory.glob("*.safetensors")) / 1e6, 1),
            "linears": len(manifest["linears"]), "smallest_bpw": smallest["avg_bits_per_weight"],
            "largest_bpw": everything["avg_bits_per_weight"], "directories": directories}


def reordered(directory: Path, stage: BitStack, order: str) -> Path:
    """``directory`` loading its blocks in ``order``: links to its files and a manifest with that block sequence."""
    target = directory.with_name(f"{directory.name}-{order}")
    target.mkdir(parents=True, exist_ok=True)
    for path in directory.iterdir():
        if path.name != "bitstack.json" and not (target / path.name).exists():
            (target / path.name).symlink_to(path.resolve())
    manifest = json.loads((directory / "bitstack.json").read_text())
    chains = [item.chain(path, order) for path, item in stage.decomposed.items()]  # type: ignore[arg-type]
    manifest |= {"order_by": order, "order": [[path, index] for path, index in global_order(chains)]}
    (target / "bitstack.json").write_text(json.dumps(manifest, indent=1))
    return target


def measure_budget(directory: Path, budget: str, score: Any) -> dict[str, Any]:
    """Load the directory at ``budget`` and score it; a budget below the smallest model gives a row without ppl."""
    start = time.perf_counter()
    try:
        model, counts = load_bitstack(directory, budget)
    except UsageError as exc:
        return {"budget": budget, "ppl": None, "error": str(exc)}
    load_seconds = time.perf_counter() - start
    report = budget_report(read_manifest(directory), counts, budget)
    blocks = sorted(counts.values())
    return {"budget": budget, "bits_per_weight": report["avg_bits_per_weight"], "ppl": score(model),
            "load_seconds": round(load_seconds, 1), "bitstack_mb": round(report["bitstack_bytes"] / 1e6, 2),
            "blocks_min_median_max": [blocks[0], blocks[len(blocks) // 2], blocks[-1]]}


def time_materialize(directory: Path, budget: str) -> dict[str, Any]:
    """Seconds of ``compressor bitstack materialize DIR --budget B`` (load at the budget + write dense)."""
    with tempfile.TemporaryDirectory() as scratch:
        start = time.perf_counter()
        try:
            report = materialize(directory, budget, Path(scratch) / "out")
        except UsageError as exc:
            return {"materialize_budget": budget, "materialize_error": str(exc)}
        return {"materialize_budget": budget, "materialize_seconds": round(time.perf_counter() - start, 1),
                "materialized_file_mb": round(report["file_bytes"] / 1e6, 1)}


def _label(stack: dict[str, Any]) -> str:
    return f"{stack['rank']} {stack.get('order', 'relative')}"  # results from before --orders were relative


def markdown(result: dict[str, Any]) -> str:
    signs, svd = result.get("signs", "residual"), result.get("svd", "full")  # results from before these options
    lines = [f"BitStack on {result['model']}: {result['iterations']} iterations, signs {signs}, svd {svd}, "
             f"calibration {result['calibration']}, "
             f"eval {result['eval']}, dense ppl {result['dense_ppl']}, {result['threads']} threads, peak RSS "
             f"{result.get('peak_rss_mb')} MB.", "",
             "| rank, order | budget | bits/weight loaded | ppl | BitStack MB | load s |", "|---|---|---|---|---|---|"]
    for stack in result["stacks"]:
        for row in stack["rows"]:
            if row.get("ppl") is None:
                lines.append(f"| {_label(stack)} | {row['budget']} | - | below the smallest loadable model | - | - |")
            else:
                lines.append(f"| {_label(stack)} | {row['budget']} | {row['bits_per_weight']} | {row['ppl']} | "
                             f"{row['bitstack_mb']} | {row['load_seconds']} |")
    for label, bits, ppl in result["references"]:
        lines.append(f"| {label.replace('|', ' ')} (reference) | | {bits} | {ppl} | | |")
    lines += ["", "| rank, order | loadable bits/weight | decomposition s | peak RSS after it (MB) | directory MB | "
              "materialize s (budget) |", "|---|---|---|---|---|---|"]
    for stack in result["stacks"]:
        lines.append(f"| {_label(stack)} | {stack['smallest_bpw']} to {stack['largest_bpw']} | "
                     f"{stack['decompose_seconds']} | {stack['peak_rss_mb_after_decompose']} | "
                     f"{stack['directory_mb']} | "
                     f"{stack.get('materialize_seconds', '-')} ({stack.get('materialize_budget', '-')}) |")
    return "\n".join(lines) + "\n"


def plot_curve(result: dict[str, Any], path: Path) -> bool:
    """One curve per rank (bits per weight vs log perplexity), the dense line and the reference points; False
    without matplotlib."""
    plt = _pyplot()
    if plt is None:
        return False
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for stack in result["stacks"]:
        rows = [row for row in stack["rows"] if row.get("ppl") is not None]
        ax.plot([r["bits_per_weight"] for r in rows], [r["ppl"] for r in rows], "o-",
                label=f"BitStack rank {_label(stack)} ({result['iterations']} blocks)")
    if result.get("dense_ppl"):
        ax.axhline(result["dense_ppl"], color="gray", linestyle="--", label=f"dense ({result['dense_ppl']:.2f})")
    series: dict[str, list[tuple[float, float, str]]] = {}
    for label, bits, ppl in result["references"]:
        name, _, point = label.rpartition("|")
        if name:
            series.setdefault(name, []).append((bits, ppl, point))
            continue
        ax.scatter([bits], [ppl], marker="s", color="black")
        ax.annotate(label, (bits, ppl), textcoords="offset points", xytext=(4, 4), fontsize=8)
    for name, points in series.items():
        points.sort()
        ax.plot([p[0] for p in points], [p[1] for p in points], "s--", markersize=4, linewidth=1, label=name)
        for bits, ppl, point in points:
            ax.annotate(point, (bits, ppl), textcoords="offset points", xytext=(3, 3), fontsize=6)
    ax.set_yscale("log")
    ax.set_xlabel("bits per weight (decomposed linears, everything stored)")
    ax.set_ylabel(f"perplexity, {result['eval']}")
    ax.set_title(f"BitStack on {result['model']}")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def _arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="demo:smollm2")
    parser.add_argument("--calibration", default="demo:lee")
    parser.add_argument("--eval-data", default="demo:wiki")
    parser.add_argument("--samples", type=int, default=64)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--eval-tokens", type=int, default=16384)
    parser.add_argument("--eval-seq-len", type=int, default=512)
    parser.add_argument("--iterations", type=int, default=16, help="Blocks per linear.")
    parser.add_argument("--rank", default="16", help="Rank of each block's magnitude approximation; several "
                        "(16,8,4) decompose once per rank, one curve each.")
    parser.add_argument("--signs", choices=["feedback", "residual"], default="feedback",
                        help="The stage's signs: error feedback in the calibration metric, or sign(R).")
    parser.add_argument("--dampening", type=float, default=0.3, help="The stage's feedback dampening.")
    parser.add_argument("--svd", choices=["lowrank", "full"], default="lowrank",
                        help="The stage's magnitude factors: subspace iteration, or a full SVD per block.")
    parser.add_argument("--bpw", default=DEFAULT_BPW, help="Budgets in bits per decomposed weight, comma-separated.")
    parser.add_argument("--materialize-at", default=None,
                        help="The budget whose materialize is timed (default: the largest --bpw that loads).")
    parser.add_argument("--reference", action="append", default=[], help="LABEL=PPL@BITS, repeatable.")
    parser.add_argument("--skip-dense", action="store_true", help="Do not evaluate the dense model.")
    parser.add_argument("--orders", default="relative", help="Block orders to load in, comma-separated (relative, "
                        "absolute, fisher); one decomposition serves them all, one curve each.")
    parser.add_argument("--replot", type=Path, default=None, metavar="JSON", help="Redraw this bitstack.json into "
                        "--out with its references plus --reference ones; decomposes nothing.")
    parser.add_argument("--keep", type=Path, default=None, help="Write the BitStack directory here and keep it.")
    parser.add_argument("--out", type=Path, default=Path("bench-bitstack"), help="Directory for JSON, MD, PNG.")
    return parser.parse_args()


def run_rank(rank: int, loaded: LoadedModel, tokens: torch.Tensor, args: argparse.Namespace, score: Any,
             save: Any, stacks: list[dict[str, Any]]) -> None:
    """Decompose at ``rank``, then load and score every budget in every order, one stack each appended to
    ``stacks``; ``save()`` after each row."""
    orders = tuple(order.strip() for order in args.orders.split(","))
    with tempfile.TemporaryDirectory() as scratch:
        directory = args.keep / f"rank{rank}" if args.keep else Path(scratch) / "bitstack"
        shared = decompose(loaded, tokens, args.iterations, rank, directory, args.signs, args.svd, args.dampening,
                           orders)
        directories = shared.pop("directories")
        print(json.dumps(shared), flush=True)
        for order in orders:
            stacks.append({"rank": rank, "order": order, "rows": [], **shared})
            stack = stacks[-1]
            for bits in args.bpw.split(","):
                stack["rows"].append(measure_budget(directories[order], f"{bits.strip()}bpw", score))
                print(json.dumps({"order": order} | stack["rows"][-1]), flush=True)
                save()
            loadable = [row["budget"] for row in stack["rows"] if row.get("ppl") is not None]
            if args.materialize_at or loadable:
                stack |= time_materialize(directories[order], args.materialize_at or loadable[-1])


def main() -> None:
    args = _arguments()
    references = [parse_reference(text) for text in args.reference]  # bad text fails before any work
    if args.replot:
        replot(args.replot, references, args.out)
        return
    unknown = set(args.orders.split(",")) - {"relative", "absolute", "fisher"}
    if unknown:
        raise SystemExit(f"--orders: unknown order {sorted(unknown)[0]!r} (relative, absolute, fisher)")
    ranks = [int(rank) for rank in args.rank.split(",")]
    args.out.mkdir(parents=True, exist_ok=True)
    loaded = load(args.model)
    dense = {name: tensor.clone() for name, tensor in loaded.model.state_dict().items()}
    tokens = calibration_batch(loaded.tokenizer, args.calibration, args.samples, args.seq_len, seed=0)

    def score(model: torch.nn.Module) -> float:
        scored = LoadedModel(model, loaded.tokenizer, loaded.source, loaded.source_dir)
        return round(evaluate(scored, args.eval_data, seq_len=args.eval_seq_len, max_tokens=args.eval_tokens,
                              device="cpu").ppl, 4)

    result: dict[str, Any] = {
        "model": args.model, "iterations": args.iterations, "signs": args.signs, "svd": args.svd,
        "dampening": args.dampening,
        "calibration": f"{args.calibration} {args.samples}x{args.seq_len}",
        "eval": f"{args.eval_data} {args.eval_tokens} tokens, windows of {args.eval_seq_len}",
        "threads": torch.get_num_threads(), "references": references, "stacks": [],
        "dense_ppl": None if args.skip_dense else score(loaded.model),
    }

    def save() -> None:  # after every row, so an interrupted run keeps what it measured
        (args.out / "bitstack.json").write_text(json.dumps(result, indent=2) + "\n")

    for rank in ranks:
        loaded.model.load_state_dict(dense)  # the stage wrote its reconstruction into the model
        run_rank(rank, loaded, tokens, args, score, save, result["stacks"])
    result["peak_rss_mb"] = round(peak_rss_bytes() / 2**20)
    save()
    write_outputs(result, args.out)


def write_outputs(result: dict[str, Any], out: Path) -> None:
    (out / "bitstack.md").write_text(markdown(result))
    plotted = plot_curve(result, out / "bitstack.png")
    print(markdown(result))
    png = ", bitstack.png" if plotted else " (no matplotlib: no PNG)"
    print(f"wrote {out}/bitstack.json, bitstack.md{png}")


def replot(source: Path, references: list[tuple[str, float, float]], out: Path) -> None:
    """Redraw a finished run's table and curve with more ``--reference`` points (measured later), no new work."""
    result = json.loads(source.read_text())
    result["references"] = [tuple(ref) for ref in result.get("references", [])] + references
    out.mkdir(parents=True, exist_ok=True)
    (out / "bitstack.json").write_text(json.dumps(result, indent=2) + "\n")
    write_outputs(result, out)


if __name__ == "__main__":
    main()
