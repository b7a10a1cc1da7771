"""A BitStack directory loads at a budget with transformers alone: its shipped modeling file and ``bitstack_budget``."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from isolation import run_without_compressor
from tiny import tiny_model

from compressor.engine import ModelContext, run_stages
from compressor.export.bitstack_materialize import materialize
from compressor.export.bitstack_store import MANIFEST, REMOTE_CODE_FILE, load_bitstack, write_bitstack
from compressor.methods.quant.bitstack import BitStack, BitStackConfig
from compressor.methods.quant.bitstack.order import Budget, BudgetError, parse_budget
from compressor.models import get_adapter
from compressor.models.shipped import modeling_bitstack, shipped_dir
from compressor.pipeline import compress, load
from compressor.recipe import recipe_from_dict

TOKENS = torch.tensor([[5, 17, 42, 99, 3, 250, 7, 8], [1, 2, 3, 4, 5, 6, 7, 8]])

#: Budget text and what it means, worked out by hand: (value, unit).
BUDGETS = [
    ("123456", (123456.0, "bytes")), ("123456B", (123456.0, "bytes")), (123456, (123456.0, "bytes")),
    (2.5e6, (2.5e6, "bytes")), ("300MB", (3e8, "bytes")), ("300mb", (3e8, "bytes")), ("1.5GB", (1.5e9, "bytes")),
    ("64kB", (64000.0, "bytes")), ("1.5GiB", (1610612736.0, "bytes")), ("2 MiB", (2097152.0, "bytes")),
    ("3KiB", (3072.0, "bytes")), (" 2.5bpw ", (2.5, "bpw")), ("1.76BPW", (1.76, "bpw")), ("1e3", (1000.0, "bytes")),
    (".5MB", (5e5, "bytes")),
]
BAD = ["", "300 apples", "-1MB", "0", "0bpw", "MB", "1.2.3MB", "3 bits", True]

#: Run in a Python that cannot import compressor: load each (directory, budget), compare with compressor's logits.
_LOAD_AT_BUDGETS = """
import json, sys
import torch
from transformers import AutoModelForCausalLM
scratch, loads = sys.argv[1], json.loads(sys.argv[2])
tokens = torch.load(scratch + "/tokens.pt")
seen = []
for i, (directory, budget) in enumerate(loads):
    model = AutoModelForCausalLM.from_pretrained(directory, trust_remote_code=True, bitstack_budget=budget)
    with torch.no_grad():
        logits = model(tokens).logits
    diff = float((logits - torch.load(f"{scratch}/logits-{i}.pt")).abs().max())
    seen.append({"class": type(model).__name__, "diff": diff, "blocks": model.bitstack_blocks})
try:
    AutoModelForCausalLM.from_pretrained(loads[0][0], trust_remote_code=True, bitstack_budget="1kB")
except ValueError as exc:
    seen.append(str(exc))
print(json.dumps(seen))
"""


@pytest.fixture(scope="module")
def stack_dir(model_dir_factory, text_file: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    # signs: residual, order: relative: the budgets below assume the global order takes every linear's second block
    # before any third, which sign(R)'s blocks in the relative order give on these tiny models (feedback's, or the
    # fisher order, do not always); the store tests cover feedback and the stage tests fisher.
    data = {"name": "t", "calibration": {"dataset": str(text_file), "samples": 4, "seq_len": 32, "batch_size": 2},
            "stages": [{"method": "bitstack", "iterations": 3, "rank": 2, "signs": "residual", "order": "relative"}],
            "export": {"format": "bitstack"}}
    out = tmp_path_factory.mktemp("stack") / "bs"
    compress(str(model_dir_factory("llama")), recipe_from_dict(yaml.safe_load(yaml.safe_dump(data))), out,
             device="cpu")
    return out


@pytest.mark.parametrize(("text", "expected"), BUDGETS)
def test_both_budget_parsers_read_every_form_alike(text: str | float, expected: tuple[float, str]) -> None:
    assert modeling_bitstack.parse_budget(text) == expected
    assert parse_budget(text) == Budget(*expected)


@pytest.mark.parametrize("text", BAD)
def test_both_budget_parsers_refuse_the_same_text(text: object) -> None:
    with pytest.raises(modeling_bitstack.BitStackBudgetError):
        modeling_bitstack.parse_budget(text)  # type: ignore[arg-type]
    with pytest.raises(BudgetError):
        parse_budget(text)  # type: ignore[arg-type]


def test_the_directory_names_its_shipped_loader(stack_dir: Path) -> None:
    config = json.loads((stack_dir / "config.json").read_text())
    assert config["auto_map"] == {"AutoModelForCausalLM": "modeling_bitstack.BitStackLlamaForCausalLM"}
    assert (stack_dir / REMOTE_CODE_FILE).read_bytes() == (shipped_dir() / REMOTE_CODE_FILE).read_bytes()


@pytest.fixture(scope="module")
def moe_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Mixtral's BitStack directory: its experts decomposed per expert projection."""
    model = tiny_model("mixtral")
    tokens = torch.randint(0, 300, (4, 32), generator=torch.Generator().manual_seed(0))
    run = ModelContext(model, get_adapter(model), tokens, torch.device("cpu"), batch_size=2)
    stage = BitStack(BitStackConfig.model_validate({"method": "bitstack", "iterations": 3, "rank": 2,
                                                    "signs": "residual", "order": "relative"}))  # as stack_dir's
    run_stages(run, [stage])
    out = tmp_path_factory.mktemp("moe")
    write_bitstack(out, model, stage)
    return out


def _budgets(directory: Path) -> tuple[str, str, str]:
    """Room for two blocks per linear (bytes), and one block each plus the next in the order (bpw, that path)."""
    manifest = json.loads((directory / MANIFEST).read_text())
    sizes = [item["block_bytes"] for item in manifest["linears"].values()]
    two_each = f"{manifest['fixed_bytes'] + sum(s[0] + s[1] for s in sizes)}B"
    params = sum(item["shape"][0] * item["shape"][1] for item in manifest["linears"].values())
    first, (after, index) = sum(s[0] for s in sizes), manifest["order"][len(sizes)]  # the block after the first ones
    assert index == 1
    bpw = f"{8 * (first + manifest['linears'][after]['block_bytes'][1] + 1) / params:.6f}bpw"  # it fits, no more
    return two_each, bpw, after


def test_transformers_alone_loads_the_model_compressor_loads_at_each_budget(
    stack_dir: Path, moe_dir: Path, tmp_path: Path
) -> None:
    """At two budgets on a tiny Llama and one on a tiny Mixtral (experts merged back into transformers' 3-D
    tensors by its loader), a Python without compressor builds the model compressor.load builds."""
    two_each, bpw, after = _budgets(stack_dir)
    loads = [(stack_dir, two_each), (stack_dir, bpw), (moe_dir, _budgets(moe_dir)[0])]
    torch.save(TOKENS, tmp_path / "tokens.pt")
    for i, (directory, budget) in enumerate(loads):
        model = load(directory, budget=budget).model if directory == stack_dir else load_bitstack(directory, budget)[0]
        with torch.no_grad():
            torch.save(model(TOKENS).logits, tmp_path / f"logits-{i}.pt")
    child = run_without_compressor(_LOAD_AT_BUDGETS, str(tmp_path), json.dumps([[str(d), b] for d, b in loads]),
                                   cwd=tmp_path)
    assert child.returncode == 0, child.stderr[-3000:]
    *seen, error = json.loads(child.stdout.strip().splitlines()[-1])
    assert [row["class"] for row in seen] == ["BitStackLlamaForCausalLM"] * 2 + ["BitStackMixtralForCausalLM"]
    assert all(row["diff"] <= 1e-5 for row in seen), [row["diff"] for row in seen]
    linears = json.loads((stack_dir / MANIFEST).read_text())["linears"]
    assert seen[0]["blocks"] == dict.fromkeys(linears, 2)
    assert seen[1]["blocks"] == {path: 2 if path == after else 1 for path in linears}
    assert set(seen[2]["blocks"].values()) == {2} and any(".experts.7.w2" in path for path in seen[2]["blocks"])
    assert "\n" not in error
    assert error.startswith("budget 0.001MB is below the smallest loadable model: the smallest is ")
    assert "(one block per linear), the largest" in error and error.endswith("(all blocks)")


def test_a_materialized_model_is_stock_and_names_no_modeling_file(stack_dir: Path, tmp_path: Path) -> None:
    materialize(stack_dir, "1GB", tmp_path / "m")
    assert "auto_map" not in json.loads((tmp_path / "m" / "config.json").read_text())
    assert not (tmp_path / "m" / REMOTE_CODE_FILE).exists()
