"""GGUF export: blocks bit-exact, q/k permuted; transformers' GGUF loader reproduces model and tokenizer."""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch
from tiny import make_text
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast
from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

from compressor.errors import ExportError
from compressor.export import gguf as gguf_export
from compressor.export.gguf import (
    pack_blocks,
    permute_rows,
    round_scales_fp16,
    unpermute_rows,
    validate_gguf,
    write_gguf,
)
from compressor.methods.quant.ops import QuantizedWeight, quantize_rtn

VOCAB = 320  # the shared tiny byte-level tokenizer has 312 tokens; the padding ids become [PADn]
SENTENCE = "The model reads text and predicts the next token.<|endoftext|> News from the city council!"
BITS = {"Q4_0": 4, "Q8_0": 8}
#: Llama 3's split regex as its tokenizer.json spells it (written here, not taken from the code under test).
LLAMA3_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
LLAMA3_VOCAB = 512
#: Where Llama 3's split differs from GPT-2's: digit runs cut in threes, a symbol glued to the next word,
#: contractions in any case, runs of spaces and newlines, non-ASCII letters.
LLAMA3_TEXTS = [
    "In 2024 the council spent 1234567 dollars on 365 days of rain.",
    "IT'S the model's (best) guess:  42%!! They'LL see...",
    "café naïve Zürich — 3.14\n\n\tnews   from the city\r\n",
    "the  river\n  fell   on 99 birds, 1000000 times; \"quoted\" [the] end",
]


@pytest.fixture
def quantized_llama(make_llama, fake_quantize, all_but_head):
    """``make(file_type, tied, dtype, kv_heads) -> (model, quantized)`` with fp16-rounded scales."""

    def make(file_type: str = "Q4_0", tied: bool = True, dtype: torch.dtype = torch.float32,
             kv_heads: int = 2) -> tuple:
        model = make_llama(tied=tied, dtype=dtype, vocab_size=VOCAB, num_key_value_heads=kv_heads)
        scheme = all_but_head(BITS[file_type], 32, True)
        return model, fake_quantize(model, scheme, prepare=round_scales_fp16)

    return make


def _metadata(path) -> dict:
    reader = gguf.GGUFReader(path)
    return {key: field.contents() for key, field in reader.fields.items() if not key.startswith("GGUF.")}


@pytest.mark.parametrize(("bits", "group", "sym", "gguf_type", "ok"), [
    (4, 32, True, None, True), (8, 32, True, None, True), (4, 32, False, None, True), (5, 32, True, None, True),
    (5, 32, False, None, True), (4, 64, True, None, True), (4, 128, False, None, True), (8, -1, True, None, True),
    (4, 48, True, None, False), (4, 16, True, None, False), (3, 32, True, None, False), (2, 32, False, None, False),
    (8, 32, False, None, False), (3, 32, True, "Q4_0", True), (4, 48, True, "Q5_1", True), (4, 32, True, "Q6_K", False),
])
def test_validate_gguf(bits, group, sym, gguf_type, ok) -> None:
    """Exact types: 4/5-bit either symmetry, symmetric 8-bit, whole 32-blocks per group; gguf_type takes anything."""
    message = validate_gguf(bits, group, sym, gguf_type)
    assert (message is None) == ok, message
    if not ok and gguf_type is None:
        assert "export.gguf_type" in message


def test_round_scales_fp16_is_what_a_block_stores() -> None:
    qweight = quantize_rtn(torch.randn(8, 64), 4, 32, True)
    rounded = round_scales_fp16(qweight)
    assert torch.equal(rounded.scale, rounded.scale.half().float())
    assert torch.equal(rounded.q, qweight.q)
    torch.testing.assert_close(rounded.scale, qweight.scale, rtol=2**-11, atol=0)


@pytest.mark.parametrize("file_type", ["Q4_0", "Q8_0"])
@pytest.mark.parametrize("tied", [True, False])
def test_transformers_gguf_loader_reproduces_logits(tmp_path, quantized_llama, tiny_tokenizer, logits,
                                                    input_ids, file_type, tied) -> None:
    model, quantized = quantized_llama(file_type, tied)
    write_gguf(model, quantized, tmp_path / "m.gguf", tiny_tokenizer, file_type)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="m.gguf").eval()
    assert loaded.config.tie_word_embeddings == tied
    assert torch.equal(logits(loaded, input_ids), logits(model, input_ids))
    meta = _metadata(tmp_path / "m.gguf")
    expected_type = gguf.LlamaFileType.MOSTLY_Q4_0 if file_type == "Q4_0" else gguf.LlamaFileType.MOSTLY_Q8_0
    assert meta["general.file_type"] == expected_type
    assert meta["llama.attention.head_count_kv"] == 2 and meta["llama.rope.dimension_count"] == 16
    assert meta["llama.vocab_size"] == VOCAB and meta["llama.context_length"] == 256


def test_tokenizer_round_trips_through_the_file(tmp_path, quantized_llama, tiny_tokenizer) -> None:
    model, quantized = quantized_llama()
    template = "{% for m in messages %}<|endoftext|>{{ m['content'] }}{% endfor %}"
    special = "<|endoftext|>"
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tiny_tokenizer.backend_tokenizer,
                                        chat_template=template, bos_token=special, eos_token=special,
                                        unk_token=special)
    write_gguf(model, quantized, tmp_path / "m.gguf", tokenizer, "Q4_0")
    loaded = AutoTokenizer.from_pretrained(tmp_path, gguf_file="m.gguf")
    ids = tokenizer.encode(SENTENCE, add_special_tokens=False)
    assert special in SENTENCE and tokenizer.eos_token_id in ids
    assert loaded.encode(SENTENCE, add_special_tokens=False) == ids
    assert loaded.decode(tokenizer.encode(SENTENCE)) == SENTENCE
    assert loaded.chat_template == template
    meta = _metadata(tmp_path / "m.gguf")
    assert meta["tokenizer.ggml.model"] == "gpt2" and meta["tokenizer.ggml.pre"] == "gpt-2"
    tokens = meta["tokenizer.ggml.tokens"]
    assert len(tokens) == VOCAB and tokens[-1] == f"[PAD{VOCAB - 1}]"
    eos = tokenizer.eos_token_id
    assert meta["tokenizer.ggml.eos_token_id"] == eos
    assert meta["tokenizer.ggml.token_type"][eos] == gguf.TokenType.CONTROL
    assert meta["tokenizer.ggml.add_bos_token"] is False


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("file_type", ["Q4_0", "Q8_0"])
def test_blocks_round_trip_bit_exact(tmp_path, quantized_llama, tiny_tokenizer, dtype, file_type) -> None:
    """Read the file with gguf-py, dequantize its blocks, undo the q/k permutation: our weights exactly."""
    model, quantized = quantized_llama(file_type, tied=False, dtype=dtype)
    write_gguf(model, quantized, tmp_path / "m.gguf", tiny_tokenizer, file_type)
    stored = {t.name: t for t in gguf.GGUFReader(tmp_path / "m.gguf").tensors}
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, 2)
    heads = {"attn_q": 4, "attn_k": 2}
    state = model.state_dict()
    assert len(stored) == len(state)
    for key, tensor in state.items():
        entry = stored[names.get_name(key, try_suffixes=(".weight",))]
        values = gguf.quants.dequantize(entry.data, entry.tensor_type)
        role = entry.name.split(".")[-2]
        values = unpermute_rows(values, heads[role]) if role in heads else values
        path = key.rsplit(".", 1)[0]
        if path in quantized:
            assert entry.tensor_type == gguf.GGMLQuantizationType[file_type]
            assert torch.equal(torch.from_numpy(values.copy()), quantized[path].dequantize()), key
        else:
            assert entry.tensor_type == gguf.GGMLQuantizationType.F32
            assert torch.equal(torch.from_numpy(values.copy()), tensor.float()), key


def test_qk_rows_must_be_permuted(tmp_path, make_llama, fake_quantize, all_but_head, tiny_tokenizer, logits,
                                  input_ids, monkeypatch) -> None:
    """The FORMATS.md trap: an unpermuted file loads without complaint and gives different logits.

    4 query heads share 2 key heads, so q and k are permuted with different head counts. q/k are scaled up
    so attention is far from uniform and a rotary mix-up moves the logits visibly.
    """
    model = make_llama(vocab_size=VOCAB)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.mul_(8)
            layer.self_attn.k_proj.weight.mul_(8)
    quantized = fake_quantize(model, all_but_head(8, 32, True), prepare=round_scales_fp16)
    reference = logits(model, input_ids)
    write_gguf(model, quantized, tmp_path / "ok.gguf", tiny_tokenizer, "Q8_0")
    monkeypatch.setattr(gguf_export, "permute_rows", lambda rows, n_head: rows)
    write_gguf(model, quantized, tmp_path / "plain.gguf", tiny_tokenizer, "Q8_0")
    ok = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="ok.gguf").eval()
    plain = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="plain.gguf").eval()
    assert torch.equal(logits(ok, input_ids), reference)
    assert (logits(plain, input_ids) - reference).abs().max() > 0.1 * reference.std()


@pytest.mark.parametrize("n_head", [1, 2, 3, 9])
def test_permutation_is_inverted_by_transformers(n_head) -> None:
    rows = np.arange(n_head * 8 * 5, dtype=np.float32).reshape(n_head * 8, 5)
    permuted = permute_rows(rows, n_head)
    assert not np.array_equal(permuted, rows)
    assert np.array_equal(unpermute_rows(permuted, n_head), rows)
    undo = LlamaTensorProcessor()._reverse_permute_weights(permuted, n_head, n_head)
    assert np.array_equal(undo, rows)


def test_mixed_q4_q8_file_loads_exactly(tmp_path, make_llama, fake_quantize, tiny_tokenizer, logits,
                                        input_ids) -> None:
    model = make_llama(vocab_size=VOCAB)

    def scheme(name: str) -> tuple[int, int, bool] | None:
        return None if name == "lm_head" else ((8 if ".mlp." in name else 4), 32, True)

    quantized = fake_quantize(model, scheme, prepare=round_scales_fp16)
    write_gguf(model, quantized, tmp_path / "m.gguf", tiny_tokenizer, "Q4_0")
    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(tmp_path / "m.gguf").tensors}
    assert types["blk.0.ffn_up.weight"] == "Q8_0" and types["blk.0.attn_q.weight"] == "Q4_0"
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="m.gguf").eval()
    assert torch.equal(logits(loaded, input_ids), logits(model, input_ids))


def test_pre_tokenizer_is_chosen_by_structure(tmp_path, quantized_llama, tiny_tokenizer) -> None:
    model, quantized = quantized_llama()
    backend = Tokenizer.from_str(tiny_tokenizer.backend_tokenizer.to_str())
    backend.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                     pre_tokenizers.ByteLevel(add_prefix_space=False)])
    smollm = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|endoftext|>")
    write_gguf(model, quantized, tmp_path / "s.gguf", smollm, "Q4_0")
    assert _metadata(tmp_path / "s.gguf")["tokenizer.ggml.pre"] == "smollm"
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    with pytest.raises(ExportError, match="pre-tokenizers"):
        write_gguf(model, quantized, tmp_path / "w.gguf",
                   PreTrainedTokenizerFast(tokenizer_object=backend), "Q4_0")


@pytest.fixture(scope="module")
def llama3_tokenizer() -> PreTrainedTokenizerFast:
    """A tokenizer in Meta-Llama-3's shape: Split(regex, isolated) + ByteLevel(no regex), BOS added in front.

    Its merges are learned on unsplit text, so they cross every boundary either regex could draw ("Ġ2",
    "'L", "ĉn"): a file naming the wrong split gives other ids, not the same ones by luck.
    """
    bos, eos = "<|begin_of_text|>", "<|end_of_text|>"
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    trainer = trainers.BpeTrainer(vocab_size=LLAMA3_VOCAB, special_tokens=[bos, eos],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    backend.train_from_iterator([make_text(200, 0), *LLAMA3_TEXTS * 20], trainer)
    backend.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(LLAMA3_REGEX), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    backend.decoder = decoders.ByteLevel()
    backend.post_processor = processors.TemplateProcessing(single=f"{bos} $A", special_tokens=[(bos, 0)])
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token=bos, eos_token=eos)


def test_llama3_tokenizer_round_trips_as_llama_bpe(tmp_path, make_llama, llama3_tokenizer) -> None:
    """Llama 3's pre-tokenizer is written as llama.cpp's ``llama-bpe``; transformers' loader splits the same."""
    tokenizer = llama3_tokenizer
    write_gguf(make_llama(vocab_size=LLAMA3_VOCAB), {}, tmp_path / "m.gguf", tokenizer, "Q8_0")
    meta = _metadata(tmp_path / "m.gguf")
    assert meta["tokenizer.ggml.model"] == "gpt2" and meta["tokenizer.ggml.pre"] == "llama-bpe"
    assert meta["tokenizer.ggml.add_bos_token"] is True and meta["tokenizer.ggml.add_space_prefix"] is False
    loaded = AutoTokenizer.from_pretrained(tmp_path, gguf_file="m.gguf")
    for text in [*LLAMA3_TEXTS, make_text(60, 7)]:
        ids = tokenizer.encode(text, add_special_tokens=False)
        assert loaded.encode(text, add_special_tokens=False) == ids, text
        assert loaded.encode(text) == tokenizer.encode(text) == [tokenizer.bos_token_id, *ids]
        assert loaded.decode(ids) == text
    gpt2 = Tokenizer.from_str(tokenizer.backend_tokenizer.to_str())
    gpt2.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    same = [t for t in LLAMA3_TEXTS if gpt2.encode(t, add_special_tokens=False).ids == tokenizer.encode(t)[1:]]
    assert same == []  # every text splits into other ids under GPT-2's regex: the check above can fail


@pytest.mark.parametrize(("split", "byte_level", "match"), [
    (pre_tokenizers.Split(Regex(r"\p{N}|[^\p{N}]+"), behavior="isolated"), {}, "Split regex of llama-bpe"),
    (pre_tokenizers.Split(Regex(LLAMA3_REGEX), behavior="removed"), {}, "Isolated"),
    (pre_tokenizers.Split(Regex(LLAMA3_REGEX), behavior="isolated"), {"use_regex": True}, "use_regex=false"),
    (pre_tokenizers.Split(Regex(LLAMA3_REGEX), behavior="isolated"), {"add_prefix_space": True}, "add_prefix"),
])
def test_unknown_split_pre_tokenizers_are_refused(tmp_path, make_llama, llama3_tokenizer, split, byte_level,
                                                  match) -> None:
    """Only Llama 3's exact shape is named; another regex or Split/ByteLevel setting would split otherwise."""
    backend = Tokenizer.from_str(llama3_tokenizer.backend_tokenizer.to_str())
    settings = {"add_prefix_space": False, "use_regex": False, **byte_level}
    backend.pre_tokenizer = pre_tokenizers.Sequence([split, pre_tokenizers.ByteLevel(**settings)])
    with pytest.raises(ExportError, match=match):
        write_gguf(make_llama(vocab_size=LLAMA3_VOCAB), {}, tmp_path / "m.gguf",
                   PreTrainedTokenizerFast(tokenizer_object=backend), "Q8_0")


def test_refuses_what_llama_gguf_cannot_hold(tmp_path, make_llama, quantized_llama, tiny_tokenizer) -> None:
    model, quantized = quantized_llama()
    out = tmp_path / "m.gguf"
    with pytest.raises(ExportError, match="one of Q4_0, Q4_1, Q5_0, Q5_1, Q8_0"):
        write_gguf(model, quantized, out, tiny_tokenizer, "Q5_K")
    path = "model.layers.0.self_attn.q_proj"
    for bits, group, sym, match in [(4, 16, True, "group_size=32 or a multiple"), (8, 32, False, "asymmetric 8-bit"),
                                    (3, 32, True, "4-bit")]:
        bad = dict(quantized, **{path: quantize_rtn(torch.randn(64, 64), bits, group, sym)})
        with pytest.raises(ExportError, match=f"{path}: .*{match}"):
            write_gguf(model, bad, out, tiny_tokenizer, "Q4_0")
    small = make_llama(vocab_size=256)
    with pytest.raises(ExportError, match="vocab_size is 256"):
        write_gguf(small, {}, out, tiny_tokenizer, "Q8_0")
    model.config.model_type = "opt"
    with pytest.raises(ExportError, match="'opt' .no llama.cpp architecture"):
        write_gguf(model, quantized, out, tiny_tokenizer, "Q4_0")


@pytest.mark.parametrize(("file_type", "narrow_bits"), [("Q4_0", 2), ("Q8_0", 4)])
def test_narrow_groups_fill_blocks_exactly(file_type, narrow_bits) -> None:
    """A group with narrower codes (its own zero) inside a 4/8-bit weight still decodes to our values."""
    bits = BITS[file_type]
    w = torch.randn(16, 64, generator=torch.Generator().manual_seed(4))
    wide, narrow = quantize_rtn(w[:, :32], bits, 32, True), quantize_rtn(w[:, 32:], narrow_bits, 32, True)
    qweight = round_scales_fp16(QuantizedWeight(
        q=torch.cat([wide.q, narrow.q], 1), scale=torch.cat([wide.scale, narrow.scale], 1),
        zero=torch.cat([wide.zero, narrow.zero], 1), bits=bits, group_size=32, symmetric=True))
    values = gguf.quants.dequantize(pack_blocks(qweight), gguf.GGMLQuantizationType[file_type])
    assert torch.equal(torch.from_numpy(values), qweight.dequantize())


def test_architecture_comes_from_the_family_description(tmp_path, make_llama, tiny_tokenizer, caplog) -> None:
    """llama.cpp writes Mistral as ``llama``; Qwen has its own architectures; OPT none. A Mistral file is llama's."""
    names = {t: gguf_export.architecture(t) for t in ("llama", "mistral", "qwen2", "qwen3", "opt", "gpt2")}
    assert names == {"llama": "llama", "mistral": "llama", "qwen2": "qwen2", "qwen3": "qwen3", "opt": None,
                     "gpt2": None}
    model = make_llama(vocab_size=VOCAB)
    model.config.model_type, model.config.sliding_window = "mistral", 64
    model.config._name_or_path = "/checkpoints/tiny-7b"  # a name that does not say mistral
    # the package logger: the warning comes from export/gguf_arch.py, and a --quiet CLI run earlier in the session
    # leaves the root logger at ERROR
    with caplog.at_level("WARNING", logger="compressor"):
        write_gguf(model, {}, tmp_path / "m.gguf", tiny_tokenizer, "Q8_0")
    assert "sliding_window=64 is dropped" in caplog.text
    meta = _metadata(tmp_path / "m.gguf")
    assert meta["general.architecture"] == "llama" and "mistral" in meta["general.name"]


@pytest.mark.parametrize("file_type", ["Q4_0", "Q8_0"])
def test_full_grid_blocks_with_negative_scales_dequantize_exactly(file_type) -> None:
    """Full-grid codes (down to -8 / -128) and negative fp16 d: gguf-py's own dequantize gives our weights."""
    bits = BITS[file_type]
    w = torch.randn(16, 128, generator=torch.Generator().manual_seed(bits))
    importance = torch.rand(128, generator=torch.Generator().manual_seed(1)) + 0.1
    qweight = round_scales_fp16(quantize_rtn(w, bits, 32, True, grid="full", scale_search="weighted",
                                             importance=importance))
    assert bool((qweight.scale < 0).any()) and int(qweight.signed().min()) == -(1 << (bits - 1))
    rows = pack_blocks(qweight)
    values = gguf.quants.dequantize(rows, gguf.GGMLQuantizationType[file_type])
    assert torch.equal(torch.from_numpy(np.ascontiguousarray(values)), qweight.dequantize())
