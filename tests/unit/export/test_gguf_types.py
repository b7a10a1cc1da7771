"""GGUF Q4_1 / Q5_0 / Q5_1 beside Q4_0 / Q8_0: our codes through gguf-py's dequantize (the oracle) and
transformers' GGUF loader, groups of whole 32-blocks, a type per tensor, requantization only when asked."""

from __future__ import annotations

import json

import gguf
import numpy as np
import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from compressor.errors import ExportError, RecipeError
from compressor.export.gguf import pack_blocks, round_scales_fp16, unpermute_rows, write_gguf
from compressor.methods.quant.ops import QuantizedWeight, quantize_rtn
from compressor.recipe import recipe_from_dict

VOCAB = 320
#: type -> (bits, symmetric) of the codes it stores at their own width
TYPES = {"Q4_0": (4, True), "Q4_1": (4, False), "Q5_0": (5, True), "Q5_1": (5, False), "Q8_0": (8, True)}
#: bytes per 32-weight block (ggml-common.h): fp16 d [+ fp16 m] [+ 4 bytes of fifth bits] + codes
BLOCK_BYTES = {"Q4_0": 18, "Q4_1": 20, "Q5_0": 22, "Q5_1": 24, "Q8_0": 34}


def _oracle(rows: np.ndarray, type_name: str) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(gguf.quants.dequantize(rows, gguf.GGMLQuantizationType[type_name])))


def _m_rounding_bound(qweight: QuantizedWeight) -> torch.Tensor:
    """Per weight: half an fp16 ulp of ``m = -d * zero`` (``<= 2^-11 |m|``; ``2^-25`` where m is subnormal)."""
    m = (qweight.scale * qweight.zero.float())[:, qweight.column_groups()]  # exact in float32
    return torch.clamp(m.abs() * 2**-11, min=2**-25)


@pytest.mark.parametrize("group", [32, 64, 128, -1])
@pytest.mark.parametrize("type_name", list(TYPES))
def test_each_type_round_trips_against_gguf_py(type_name, group) -> None:
    """Random weights, our codes packed, gguf-py's dequantize: symmetric types exact, asymmetric within m's bound."""
    bits, symmetric = TYPES[type_name]
    w = torch.randn(24, 256, generator=torch.Generator().manual_seed(bits + group)) * 0.05
    qweight = round_scales_fp16(quantize_rtn(w, bits, group, symmetric))
    rows = pack_blocks(qweight)
    assert rows.shape == (24, 256 // 32 * BLOCK_BYTES[type_name])
    ours, file = qweight.dequantize(), _oracle(rows, type_name)
    if symmetric:
        assert torch.equal(file, ours)
        return
    diff = (file - ours).abs()
    assert bool((diff <= _m_rounding_bound(qweight)).all())
    # blocks whose m = -d * zero is an fp16 number are exact; the others are off by m's rounding only
    m = qweight.scale * qweight.zero.float()
    exact_m = (m.half().float() == m)[:, qweight.column_groups()]
    assert torch.equal(file[exact_m], ours[exact_m]) and bool((diff[~exact_m] > 0).any())


def test_asymmetric_codes_fit_the_next_symmetric_type_exactly() -> None:
    """q - zero of asymmetric 4-bit codes lies in [-15, 15], inside Q5_0's [-16, 15]: exact at 0.5 bpw more."""
    w = torch.randn(16, 128, generator=torch.Generator().manual_seed(3)) + 0.4
    qweight = round_scales_fp16(quantize_rtn(w, 4, 32, False))
    rows = pack_blocks(qweight, gguf_type("Q5_0"))
    assert torch.equal(_oracle(rows, "Q5_0"), qweight.dequantize())
    with pytest.raises(ExportError, match="range of Q4_0"):
        pack_blocks(qweight, gguf_type("Q4_0"))


def gguf_type(name: str):
    from compressor.export.gguf_blocks import TYPES as BLOCK_TYPES

    return BLOCK_TYPES[name]


@pytest.mark.parametrize(("type_name", "d", "zero", "expected"), [
    # Q5_0, d = 0.5 (fp16 0x3800), codes 0..31: fifth bits of codes 16..31 set, low nibbles j | j << 4
    ("Q5_0", 0.5, 16, [0x00, 0x38, 0x00, 0x00, 0xFF, 0xFF, *[j | j << 4 for j in range(16)]]),
    # Q5_1, d = 0.5, zero 4 -> m = -2.0 (fp16 0xC000)
    ("Q5_1", 0.5, 4, [0x00, 0x38, 0x00, 0xC0, 0x00, 0x00, 0xFF, 0xFF, *[j | j << 4 for j in range(16)]]),
])
def test_five_bit_block_layout_known_answer(type_name, d, zero, expected) -> None:
    """One block written by hand from ggml-common.h: fp16 d, (fp16 m,) uint32 fifth bits, nibbles c[j] | c[j+16]<<4."""
    qweight = QuantizedWeight(q=torch.arange(32, dtype=torch.uint8)[None], scale=torch.tensor([[d]]),
                              zero=torch.tensor([[zero]], dtype=torch.int32), bits=5, group_size=32,
                              symmetric=type_name == "Q5_0")
    assert pack_blocks(qweight).reshape(-1).tolist() == expected


@pytest.mark.parametrize(("type_name", "group"), [("Q4_1", 32), ("Q5_0", 64), ("Q5_1", 64), ("Q4_0", -1)])
def test_tiny_llama_loads_in_transformers(tmp_path, make_llama, fake_quantize, all_but_head, tiny_tokenizer, logits,
                                          input_ids, type_name, group) -> None:
    """transformers' GGUF loader (dequantizes to float): our logits; exact for symmetric types."""
    bits, symmetric = TYPES[type_name]
    model = make_llama(vocab_size=VOCAB)
    quantized = fake_quantize(model, all_but_head(bits, group, symmetric), prepare=round_scales_fp16)
    write_gguf(model, quantized, tmp_path / "m.gguf", tiny_tokenizer)
    reader = gguf.GGUFReader(tmp_path / "m.gguf")
    blocks = {t.tensor_type.name for t in reader.tensors if t.name.startswith("blk.") and len(t.shape) == 2}
    assert blocks == {type_name}
    assert reader.fields["general.file_type"].contents() == gguf.LlamaFileType[f"MOSTLY_{type_name}"]
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="m.gguf").eval()
    ours, theirs = logits(model, input_ids), logits(loaded, input_ids)
    if symmetric:
        assert torch.equal(theirs, ours)
        return
    # asymmetric: weights within the fp16 rounding of m (<= 1.5 % of a step); logits measured within 4.4e-4, the
    # repo's tolerance for fp16 rounding is 2e-3 ...
    torch.testing.assert_close(theirs, ours, rtol=0, atol=2e-3)
    # ... and exactly the model whose weights are d * q + fp16(-d * zero), the block formula written here
    with torch.no_grad():
        for path, qweight in quantized.items():
            groups = qweight.column_groups()
            m = (-(qweight.scale * qweight.zero.float())).half().float()
            model.get_submodule(path).weight.copy_(qweight.scale[:, groups] * qweight.q.float() + m[:, groups])
    assert torch.equal(theirs, logits(model, input_ids))


def test_a_module_plan_gets_a_type_per_tensor(tmp_path, make_llama, fake_quantize, tiny_tokenizer, logits,
                                              input_ids) -> None:
    """A BAQ-style plan (4/5/8 bits, either symmetry per module) is one file, each tensor in its own type."""
    model = make_llama(vocab_size=VOCAB)
    plan = {"q_proj": (4, 32, True), "k_proj": (5, 64, True), "v_proj": (8, 32, True), "o_proj": (4, 64, True),
            "gate_proj": (5, 32, True), "up_proj": (8, -1, True), "down_proj": (4, 128, True)}

    def scheme(name: str) -> tuple[int, int, bool] | None:
        return None if name == "lm_head" else plan[name.rsplit(".", 1)[-1]]

    quantized = fake_quantize(model, scheme, prepare=round_scales_fp16)
    write_gguf(model, quantized, tmp_path / "m.gguf", tiny_tokenizer)
    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(tmp_path / "m.gguf").tensors}
    assert [types[f"blk.1.{n}.weight"] for n in ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up",
                                                 "ffn_down")] == ["Q4_0", "Q5_0", "Q8_0", "Q4_0", "Q5_0", "Q8_0",
                                                                  "Q4_0"]
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="m.gguf").eval()
    assert torch.equal(logits(loaded, input_ids), logits(model, input_ids))


def _stored(path, key: str) -> torch.Tensor:
    """One tensor read back with gguf-py, q/k rows un-permuted (llama, 4 query / 2 key heads)."""
    entry = next(t for t in gguf.GGUFReader(path).tensors if t.name == key)
    values = gguf.quants.dequantize(entry.data, entry.tensor_type)
    heads = {"attn_q": 4, "attn_k": 2}.get(key.split(".")[-2])
    return torch.from_numpy(np.ascontiguousarray(unpermute_rows(values, heads) if heads else values))


def test_requantization_only_when_asked_and_reported(tmp_path, make_llama, fake_quantize, all_but_head,
                                                     tiny_tokenizer) -> None:
    """Groups of 16 span no whole block: refused, or with requantize llama.cpp's RTN of our weights, error reported."""
    model = make_llama(vocab_size=VOCAB)
    quantized = fake_quantize(model, all_but_head(5, 16, True), prepare=round_scales_fp16)
    with pytest.raises(ExportError, match="group_size=32 or a multiple"):
        write_gguf(model, quantized, tmp_path / "x.gguf", tiny_tokenizer)
    out = tmp_path / "m.gguf"
    summary = write_gguf(model, quantized, out, tiny_tokenizer, requantize="Q4_0")
    assert summary == json.loads((tmp_path / "m.gguf.requantization.json").read_text())
    assert len(summary["tensors"]) == len(quantized) == 14
    errors, norms = [], []
    for path, qweight in quantized.items():
        layer, role = path.split(".")[2], path.rsplit(".", 1)[-1]
        name = {"q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v", "o_proj": "attn_output",
                "gate_proj": "ffn_gate", "up_proj": "ffn_up", "down_proj": "ffn_down"}[role]
        ours, file = qweight.dequantize().double(), _stored(out, f"blk.{layer}.{name}.weight").double()
        errors.append(float((file - ours).norm() ** 2))
        norms.append(float(ours.norm() ** 2))
        assert summary["tensors"][f"blk.{layer}.{name}.weight"] == pytest.approx((errors[-1] / norms[-1]) ** 0.5)
    assert summary["total"] == pytest.approx((sum(errors) / sum(norms)) ** 0.5)
    assert 0.01 < summary["total"] < 0.2  # 5-bit levels moved onto a 4-bit grid: a real, bounded error


def test_requested_type_that_holds_our_codes_stores_them_exactly(tmp_path, make_llama, fake_quantize, all_but_head,
                                                                 tiny_tokenizer) -> None:
    """Codes a wider type holds are stored, not requantized: asymmetric 4-bit in Q5_0, 3-bit in Q4_0 (4.5 bpw)."""
    model = make_llama(vocab_size=VOCAB)
    scheme = all_but_head(4, 32, False)

    def mixed(name: str) -> tuple[int, int, bool] | None:  # 3-bit attention (v symmetric), asym. 4-bit MLP
        return scheme(name) if ".mlp." in name or name == "lm_head" else (3, 32, name.endswith("v_proj"))

    quantized = fake_quantize(model, mixed, prepare=round_scales_fp16)
    with pytest.raises(ExportError, match="bits=3"):
        write_gguf(model, quantized, tmp_path / "x.gguf", tiny_tokenizer)
    assert write_gguf(model, quantized, tmp_path / "m.gguf", tiny_tokenizer, requantize="Q5_0") is None
    assert not (tmp_path / "m.gguf.requantization.json").exists()
    for key, path in [("blk.0.attn_q.weight", "model.layers.0.self_attn.q_proj"),
                      ("blk.0.attn_v.weight", "model.layers.0.self_attn.v_proj"),
                      ("blk.1.ffn_down.weight", "model.layers.1.mlp.down_proj")]:
        assert torch.equal(_stored(tmp_path / "m.gguf", key), quantized[path].dequantize())
    # Q4_0 holds the 3-bit codes (q - zero within [-7, 7]) but not asymmetric 4-bit ones: only the MLP is requantized
    summary = write_gguf(model, quantized, tmp_path / "m4.gguf", tiny_tokenizer, requantize="Q4_0")
    mlp = [f"blk.{i}.ffn_{n}.weight" for i in (0, 1) for n in ("gate", "up", "down")]
    assert sorted(summary["tensors"]) == sorted(mlp)
    assert torch.equal(_stored(tmp_path / "m4.gguf", "blk.0.attn_q.weight"),
                       quantized["model.layers.0.self_attn.q_proj"].dequantize())


def _rtn_recipe(quant: dict[str, object], export: dict[str, object], baq: dict[str, object] | None = None) -> dict:
    stages = ([{"method": "baq", **baq}] if baq is not None else []) + [{"method": "rtn", **quant}]
    return {"name": "t", "stages": stages, "export": {"format": "gguf", **export}}


@pytest.mark.parametrize(("quant", "export", "message"), [
    ({"bits": 3, "group_size": 32}, {}, "bits=3: set export.gguf_type Q4_0 to store these codes exactly"),
    ({"bits": 2, "group_size": 32, "symmetric": False}, {}, "bits=2"),
    ({"bits": 4, "group_size": 48}, {}, "need group_size=32 or a multiple of it"),
    ({"bits": 8, "group_size": 32, "symmetric": False}, {}, "no asymmetric 8-bit"),
])
def test_recipe_validation_refuses_what_no_type_stores(quant, export, message) -> None:
    with pytest.raises(RecipeError, match=f"export.format: stage 'rtn': .*{message}"):
        recipe_from_dict(_rtn_recipe(quant, export))


@pytest.mark.parametrize(("quant", "export"), [
    ({"bits": 4, "group_size": 32, "symmetric": False}, {}),
    ({"bits": 5, "group_size": 128}, {}),
    ({"bits": 8, "group_size": -1}, {}),
    ({"bits": 3, "group_size": 32}, {"gguf_type": "Q4_0"}),
    ({"bits": 4, "group_size": 48}, {"gguf_type": "Q5_1"}),
])
def test_recipe_validation_accepts_exact_schemes_and_explicit_requantization(quant, export) -> None:
    assert recipe_from_dict(_rtn_recipe(quant, export)).export.format == "gguf"


def test_baq_module_plans_export_to_gguf_when_every_candidate_has_a_type() -> None:
    quant = {"bits": 4, "group_size": 32}
    recipe = recipe_from_dict(_rtn_recipe(quant, {}, {"candidates": [4, 5, 8], "avg_bits": 5.0}))
    assert recipe.stages[0].method == "baq"
    with pytest.raises(RecipeError, match="stages.0: baq candidate 3 bits cannot be stored in gguf: .*bits=3"):
        recipe_from_dict(_rtn_recipe(quant, {}, {"candidates": [3, 4, 8], "avg_bits": 4.0}))


@pytest.mark.parametrize("name", ["mistral", "tiny-7b"])
def test_tiny_mistral_loads_in_transformers(tmp_path, tiny_tokenizer, fake_quantize, all_but_head, logits,
                                            input_ids, name) -> None:
    """Mistral is llama.cpp's llama architecture (gguf-py 0.19 has only mistral3/mistral4, other graphs).

    transformers' reader takes a llama file named exactly 'mistral' for a gguf-py 'mistral' architecture and
    fails, so that name is not written; it builds Llama, which computes Mistral without a sliding window."""
    torch.manual_seed(0)
    config = AutoConfig.for_model("mistral", vocab_size=VOCAB, hidden_size=64, intermediate_size=128,
                                  num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                  max_position_embeddings=256, sliding_window=None)
    config._name_or_path = name
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    with torch.no_grad():
        for pname, param in model.named_parameters():
            if "norm" in pname:
                param.add_(0.1 * torch.randn_like(param))
    quantized = fake_quantize(model, all_but_head(4, 32, True), prepare=round_scales_fp16)
    write_gguf(model, quantized, tmp_path / "m.gguf", tiny_tokenizer)
    fields = gguf.GGUFReader(tmp_path / "m.gguf").fields
    assert fields["general.architecture"].contents() == "llama" and fields["general.name"].contents() != "mistral"
    assert "mistral" in fields["general.name"].contents().lower()
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="m.gguf").eval()
    assert type(loaded).__name__ == "LlamaForCausalLM"
    assert torch.equal(logits(loaded, input_ids), logits(model, input_ids))
