"""Issue 20's numerics cases, each on a tiny Llama built to trigger it: the run completes, every output tensor is
finite, and the module's report row says what happened.

1. a Hessian that is not positive definite (fewer tokens than inputs, dampening asked near zero);
2. dead input columns (a hidden channel the norm zeroes, so it is zero for every calibration token);
3. an all-zero linear;
4. float16 overflow inside a layer (weights scaled so an activation passes 65504);
5. calibration documents shorter than ``seq_len``.
"""

from __future__ import annotations

import json
import math
import random
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tiny import WORDS, tiny_model
from transformers import PreTrainedTokenizerFast

from compressor.calibration.tokens import calibration_batch
from compressor.engine import ModelContext, run_stages
from compressor.methods.base import LayerRecord
from compressor.methods.quant import gptq as gptq_module
from compressor.methods.quant.gptq import GPTQ, GPTQConfig
from compressor.methods.quant.gptq_ops import GPTQResult, gptq_quantize
from compressor.models import get_adapter
from compressor.pipeline import compress
from compressor.recipe import recipe_from_dict


def _tokens(samples: int, seq_len: int) -> torch.Tensor:
    return torch.randint(0, 300, (samples, seq_len), generator=torch.Generator().manual_seed(1))


def _run(model: torch.nn.Module, tokens: torch.Tensor, **config: object) -> tuple[dict[str, LayerRecord], ModelContext]:
    run = ModelContext(model, get_adapter(model), tokens, torch.device("cpu"), batch_size=4)
    gptq = GPTQ(GPTQConfig(method="gptq", bits=4, group_size=32, **config))  # type: ignore[arg-type]
    records = run_stages(run, [gptq])
    return {record.module: record for record in records}, run


def _all_finite(model: torch.nn.Module, run: ModelContext) -> None:
    for name, param in model.named_parameters():
        assert torch.isfinite(param).all(), name
    assert run.quantized
    for path, qweight in run.quantized.items():
        assert torch.isfinite(qweight.scale).all() and torch.isfinite(qweight.dequantize()).all(), path


def test_non_positive_definite_hessian_raises_dampening_step_by_step(monkeypatch: pytest.MonkeyPatch) -> None:
    """8 tokens for 64 inputs give a rank-8 Hessian; with dampening 1e-9 float32 Cholesky fails and the solver
    raises it tenfold per step. Known answer, checked on the recorded Hessians with torch's own Cholesky: the
    dampening one step below the final one fails, the final one succeeds, and the row names both ends and the
    number of steps."""
    seen: list[tuple[torch.Tensor, GPTQResult]] = []

    def recording(W: torch.Tensor, H: torch.Tensor, *args: object, **kwargs: object) -> GPTQResult:
        result = gptq_quantize(W, H, *args, **kwargs)  # type: ignore[arg-type]
        seen.append((H.clone(), result))
        return result

    monkeypatch.setattr(gptq_module, "gptq_quantize", recording)
    model = tiny_model("llama")
    rows, run = _run(model, _tokens(1, 8), dampening=1e-9, act_order=False)
    _all_finite(model, run)
    assert len(rows) == 21 and len(seen) == 12  # 3 layers x 4 inputs: q/k/v and gate/up are solved stacked
    pattern = re.compile(r"Hessian not positive definite: dampening raised 1e-09 -> (\S+) in (\d+) steps")
    for row in rows.values():
        match = pattern.fullmatch(row.note)
        assert match, (row.module, row.note)
        final, steps = float(match.group(1)), int(match.group(2))
        assert steps >= 1 and math.isclose(final, 1e-9 * 10**steps, rel_tol=1e-6)
    for H, result in seen:
        dead = torch.diagonal(H) == 0
        H = H.clone()
        H[dead, dead] = 1
        mean = torch.diagonal(H).mean()
        before = H + (result.dampening / 10) * mean * torch.eye(H.shape[0])
        after = H + result.dampening * mean * torch.eye(H.shape[0])
        assert int(torch.linalg.cholesky_ex(after).info) == 0
        if result.cholesky_retries > 1:  # one step back the factorisation failed (or the inverse's did)
            inverse = torch.linalg.cholesky_ex(before)
            assert int(inverse.info) != 0 or int(torch.linalg.cholesky_ex(
                torch.cholesky_inverse(inverse.L), upper=True).info) != 0


def test_dead_input_columns_are_counted_and_their_weights_zeroed() -> None:
    """Layer 1's attention norm zeroes channel 5, so q/k/v see it zero for every token; with the MLP's norm all
    zero every input of gate/up is dead (H == 0). The rest of the layer is untouched by the case."""
    model = tiny_model("llama")
    with torch.no_grad():
        model.model.layers[1].input_layernorm.weight[5] = 0
        model.model.layers[2].post_attention_layernorm.weight.zero_()
    rows, run = _run(model, _tokens(8, 32))
    _all_finite(model, run)
    layer1, layer2 = model.model.layers[1], model.model.layers[2]
    for name in ("q_proj", "k_proj", "v_proj"):
        row = rows[f"model.layers.1.self_attn.{name}"]
        assert row.note == "1 dead input columns (always zero in calibration): their weights zeroed"
        weight = getattr(layer1.self_attn, name).weight
        assert torch.equal(weight[:, 5], torch.zeros_like(weight[:, 5])) and weight[:, :5].abs().sum() > 0
    for name in ("gate_proj", "up_proj"):
        row = rows[f"model.layers.2.mlp.{name}"]
        assert row.note.startswith("64 dead input columns (always zero in calibration)"), row.note
        assert not getattr(layer2.mlp, name).weight.any()
    assert rows["model.layers.1.self_attn.o_proj"].note == ""
    assert rows["model.layers.1.mlp.down_proj"].note == ""


@pytest.mark.parametrize("symmetric", [True, False])
def test_all_zero_linear_quantizes_to_zeros(symmetric: bool) -> None:
    model = tiny_model("llama")
    with torch.no_grad():
        model.model.layers[1].mlp.up_proj.weight.zero_()
    rows, run = _run(model, _tokens(8, 32), symmetric=symmetric)
    _all_finite(model, run)
    row = rows["model.layers.1.mlp.up_proj"]
    assert row.note == "all-zero weight: quantized to zeros"
    assert row.rel_error == 0.0
    assert not model.model.layers[1].mlp.up_proj.weight.any()
    assert not run.quantized["model.layers.1.mlp.up_proj"].dequantize().any()
    assert all("all-zero" not in r.note for path, r in rows.items() if path != "model.layers.1.mlp.up_proj")


def _overflowing_model(residual: bool) -> torch.nn.Module:
    """A float16 tiny Llama whose layer-1 up_proj output passes 65504 (largest weight 30000, inputs ~1).

    With ``residual`` its down_proj is scaled too, so layer 1's output itself passes float16's range.
    Scaled in float32 first: the weights are then exactly representable in float16.
    """
    model = tiny_model("llama")
    with torch.no_grad():
        up = model.model.layers[1].mlp.up_proj.weight
        up.mul_(30000 / up.abs().max())
        if residual:
            model.model.layers[1].mlp.down_proj.weight.mul_(100)
    return model.half()


@pytest.mark.parametrize("residual", [False, True])
def test_float16_overflow_runs_that_layer_in_float32(residual: bool) -> None:
    """The overflowing layer (and with ``residual`` the next, whose inputs do not fit float16) runs in float32;
    the others stay float16. Known answer: those layers get the codes of the same model run wholly in float32 up
    to the float16 rounding of layer 0's outputs, which GPTQ's error feedback spreads (>= 85% identical codes;
    unrelated codes would share about 1/16)."""
    model = _overflowing_model(residual)
    reference = _overflowing_model(residual).float()
    tokens = _tokens(8, 32)
    rows, run = _run(model, tokens)
    _all_finite(model, run)
    assert {p.dtype for p in model.parameters()} == {torch.float16}
    widened = {1, 2} if residual else {1}
    for path, row in rows.items():
        layer = int(path.split(".")[2])
        if layer not in widened:
            assert "float16" not in row.note, row.note
            continue
        assert row.note.endswith("this layer's statistics and solve ran in float32"), row.note
        assert row.rel_error is not None and row.rel_error < 0.2, (path, row.rel_error)
    assert "non-finite output of mlp.up_proj" in rows["model.layers.1.mlp.down_proj"].note
    if residual:
        assert re.search(r"inputs reach \S+, beyond float16's 65504", rows["model.layers.2.mlp.down_proj"].note)
    _, expected = _run(reference, tokens)
    for path, qweight in run.quantized.items():
        if int(path.split(".")[2]) in widened:
            same = (qweight.q == expected.quantized[path].q).float().mean()
            assert same >= 0.85, (path, float(same))


def test_float32_model_is_not_checked_or_noted() -> None:
    """The same scaling in float32 does not overflow: no row mentions float16."""
    model = _overflowing_model(residual=False).float()
    rows, run = _run(model, _tokens(8, 32))
    _all_finite(model, run)
    assert all("float16" not in row.note for row in rows.values())


def test_short_documents_are_packed_into_full_windows(
    tmp_path: Path, tiny_tokenizer: PreTrainedTokenizerFast
) -> None:
    """Documents of 2-4 words and seq_len 32: every window is a slice of the documents joined by EOS (no padding,
    no truncation to a document), the note says so, and GPTQ runs on them to finite weights."""
    rng = random.Random(0)
    documents = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 4))) for _ in range(400)]
    source = tmp_path / "short.jsonl"
    source.write_text("".join(json.dumps({"text": doc}) + "\n" for doc in documents))
    eos = tiny_tokenizer.eos_token_id
    stream: list[int] = []
    for doc in documents:
        stream += ([eos] if stream else []) + tiny_tokenizer(doc, add_special_tokens=False)["input_ids"]
    notes: list[str] = []
    tokens = calibration_batch(tiny_tokenizer, str(source), samples=8, seq_len=32, seed=0, notes=notes)
    assert tokens.shape == (8, 32)
    joined = torch.tensor(stream)
    for window in tokens:
        assert (window == eos).sum() >= 2  # several documents per window
        starts = [s for s in range(len(stream) - 31) if torch.equal(joined[s : s + 32], window)]
        assert any(start % 32 == 0 for start in starts), "not an aligned slice of the EOS-joined stream"
    assert len(notes) == 1
    assert re.fullmatch(r"(\d+) of \1 documents read are shorter than seq_len=32 \(median \d+ tokens\): packed end "
                        r"to end into full windows, with EOS between them, no padding", notes[0]), notes[0]
    model = tiny_model("llama")
    rows, run = _run(model, tokens)
    _all_finite(model, run)
    assert len(rows) == 21


def test_too_few_tokens_for_independent_windows_overlap_with_a_note(
    tmp_path: Path, tiny_tokenizer: PreTrainedTokenizerFast
) -> None:
    """20 short documents hold fewer than 16 x 32 tokens: the windows overlap (each still a slice of the joined
    stream), and the notes say both what was packed and that windows overlap."""
    source = tmp_path / "few.jsonl"
    source.write_text("".join(json.dumps({"text": f"the model reads text {i}"}) + "\n" for i in range(20)))
    notes: list[str] = []
    tokens = calibration_batch(tiny_tokenizer, str(source), samples=16, seq_len=32, seed=0, notes=notes)
    assert tokens.shape == (16, 32)
    stream: list[int] = []
    for i in range(20):
        ids = tiny_tokenizer(f"the model reads text {i}", add_special_tokens=False)["input_ids"]
        stream += ([tiny_tokenizer.eos_token_id] if stream else []) + ids
    joined = torch.tensor(stream)
    for window in tokens:
        assert any(torch.equal(joined[s : s + 32], window) for s in range(len(stream) - 31))
    assert len(notes) == 2 and notes[0].startswith("20 of 20 documents read are shorter than seq_len=32")
    assert re.fullmatch(r"\d+ tokens, fewer than samples\*seq_len=512: the 16 windows overlap; .*", notes[1])


def test_long_documents_get_no_packing_note(tmp_path: Path, tiny_tokenizer: PreTrainedTokenizerFast) -> None:
    source = tmp_path / "long.txt"
    source.write_text(" ".join(["the model reads text and predicts the next token"] * 40))
    notes: list[str] = []
    calibration_batch(tiny_tokenizer, str(source), samples=2, seq_len=32, seed=0, notes=notes)
    assert notes == []


def test_float16_overflow_through_compress_writes_finite_tensors_and_says_so(
    tmp_path: Path, tiny_tokenizer: PreTrainedTokenizerFast, text_file: Path
) -> None:
    """The whole command path: a float16 checkpoint that overflows in layer 1 compresses, every written tensor is
    finite and float16, and compression_report.json's rows for layer 1 (only) name the float32 retry."""
    model_dir = tmp_path / "fp16"
    _overflowing_model(residual=False).save_pretrained(model_dir)
    tiny_tokenizer.save_pretrained(model_dir)
    recipe = recipe_from_dict({
        "name": "t", "calibration": {"dataset": str(text_file), "samples": 4, "seq_len": 32, "batch_size": 2},
        "stages": [{"method": "gptq", "bits": 4, "group_size": 32}], "export": {"format": "dense"},
    })
    compress(model_dir, recipe, tmp_path / "out", device="cpu", checkpoint=False)
    rows = json.loads((tmp_path / "out" / "compression_report.json").read_text())["layers"]
    noted = {row["module"] for row in rows if "float16 overflow" in row["note"]}
    assert noted == {row["module"] for row in rows if row["module"].startswith("model.layers.1.")} and noted
    tensors = load_file(str(tmp_path / "out" / "model.safetensors"))
    assert tensors and all(t.dtype == torch.float16 and torch.isfinite(t).all() for t in tensors.values())


def test_calibration_notes_reach_the_report(tmp_path: Path, tiny_tokenizer: PreTrainedTokenizerFast) -> None:
    """The packing and overlap notes are in compression_report.json's calibration section, not only in the log."""
    model_dir = tmp_path / "model"
    tiny_model("llama").save_pretrained(model_dir)
    tiny_tokenizer.save_pretrained(model_dir)
    source = tmp_path / "few.jsonl"
    source.write_text("".join(json.dumps({"text": f"the model reads text {i}"}) + "\n" for i in range(20)))
    recipe = recipe_from_dict({
        "name": "t", "calibration": {"dataset": str(source), "samples": 16, "seq_len": 32, "batch_size": 4},
        "stages": [{"method": "rtn", "bits": 4, "group_size": 32}], "export": {"format": "dense"},
    })
    compress(model_dir, recipe, tmp_path / "out", device="cpu", checkpoint=False)
    notes = json.loads((tmp_path / "out" / "compression_report.json").read_text())["calibration"]["notes"]
    assert len(notes) == 2 and notes[0].startswith("20 of 20 documents read are shorter than seq_len=32")
    assert "the 16 windows overlap" in notes[1]
