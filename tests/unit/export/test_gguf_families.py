"""GGUF export of Qwen2, Qwen3, Phi-3 and Gemma 3: transformers' GGUF loader gives our logits, blocks are exact.

The tiny models use the values transformers' loader assumes for fields it does not read from the file
(Qwen3 head_dim 128, Gemma 3 query_pre_attn_scalar 256 and every 6th layer full), so equal logits check what
the file holds. llama.cpp's conventions are written here as known answers: Gemma's norms stored as ``1 + w``
(its converter adds 1, llama.cpp's RMSNorm multiplies by the stored weight) and no q/k permutation outside
the llama architecture (NEOX rope).
"""

from __future__ import annotations

import logging
import re

import gguf
import pytest
import torch
from tiny import tiny_model
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast

from compressor.errors import ExportError
from compressor.export.gguf import round_scales_fp16, write_gguf
from compressor.pipeline import compress, load
from compressor.recipe import recipe_from_dict

BITS = {"Q4_0": 4, "Q8_0": 8}
#: family -> (llama.cpp architecture, transformers class the file loads as)
EXPECTED = {
    "qwen2": ("qwen2", "Qwen2ForCausalLM"),
    "qwen3": ("qwen3", "Qwen3ForCausalLM"),
    "phi3": ("phi3", "Phi3ForCausalLM"),
    "gemma3": ("gemma3", "Gemma3ForCausalLM"),
}
#: llama.cpp's Gemma 3 graph: layers 0-4 sliding, 5 full (``set_swa_pattern(6)``).
GEMMA3_LAYERS = ["sliding_attention"] * 5 + ["full_attention"]


def _qwen3(**overrides: object) -> torch.nn.Module:
    """A tiny Qwen3 (the qwen2 family's second model type), norms perturbed as tests/tiny.py does."""
    torch.manual_seed(0)
    sizes = dict(vocab_size=320, hidden_size=64, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
                 intermediate_size=128, max_position_embeddings=256, head_dim=128)
    config = AutoConfig.for_model("qwen3", **{**sizes, **overrides})
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.add_(0.1 * torch.randn_like(param))
    return model.eval()


def _model(family: str, **overrides: object) -> torch.nn.Module:
    if family == "qwen3":
        return _qwen3(**overrides)
    if family == "gemma3":
        gemma = dict(num_hidden_layers=6, layer_types=GEMMA3_LAYERS, head_dim=256, query_pre_attn_scalar=256,
                     final_logit_softcapping=None)
        return tiny_model("gemma3", **{**gemma, **overrides})
    return tiny_model(family, **overrides)


@pytest.fixture
def tokenizer(tiny_tokenizer) -> PreTrainedTokenizerFast:
    """The shared tiny tokenizer with a pad token: Phi-3's config class defaults pad_token_id to 32000."""
    special = "<|endoftext|>"
    return PreTrainedTokenizerFast(tokenizer_object=tiny_tokenizer.backend_tokenizer, eos_token=special,
                                   bos_token=special, unk_token=special, pad_token=special)


def _quantized(family: str, file_type: str, fake_quantize, all_but_head) -> tuple:
    model = _model(family)
    return model, fake_quantize(model, all_but_head(BITS[file_type], 32, True), prepare=round_scales_fp16)


@pytest.mark.parametrize("file_type", ["Q4_0", "Q8_0"])
@pytest.mark.parametrize("family", list(EXPECTED))
def test_transformers_gguf_loader_reproduces_logits(tmp_path, family, file_type, tokenizer, fake_quantize,
                                                    all_but_head, logits, input_ids) -> None:
    model, quantized = _quantized(family, file_type, fake_quantize, all_but_head)
    write_gguf(model, quantized, tmp_path / "m.gguf", tokenizer, file_type)
    reader = gguf.GGUFReader(tmp_path / "m.gguf")
    arch, cls = EXPECTED[family]
    assert reader.fields["general.architecture"].contents() == arch
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="m.gguf").eval()
    assert type(loaded).__name__ == cls
    assert torch.equal(logits(loaded, input_ids), logits(model, input_ids))


@pytest.mark.parametrize("family", list(EXPECTED))
def test_blocks_and_dense_tensors_are_exact(tmp_path, family, tokenizer, fake_quantize, all_but_head) -> None:
    """gguf-py's own dequantize gives our weights, in HF row order; norms +1 for Gemma; biases as they are."""
    model, quantized = _quantized(family, "Q4_0", fake_quantize, all_but_head)
    write_gguf(model, quantized, tmp_path / "m.gguf", tokenizer, "Q4_0")
    stored = {t.name: t for t in gguf.GGUFReader(tmp_path / "m.gguf").tensors}
    arch = next(key for key, name in gguf.MODEL_ARCH_NAMES.items() if name == EXPECTED[family][0])
    names = gguf.get_tensor_name_map(arch, model.config.num_hidden_layers)
    state = {k: v for k, v in model.state_dict().items() if not (k == "lm_head.weight" and
                                                                  model.config.tie_word_embeddings)}
    assert len(stored) == len(state)
    offset = 1.0 if family == "gemma3" else 0.0
    for key, tensor in state.items():
        entry = stored[names.get_name(key, try_suffixes=(".weight", ".bias"))]
        values = torch.from_numpy(gguf.quants.dequantize(entry.data, entry.tensor_type).copy())
        path, _, kind = key.rpartition(".")
        if kind == "weight" and path in quantized:
            assert entry.tensor_type == gguf.GGMLQuantizationType.Q4_0, key
            assert torch.equal(values, quantized[path].dequantize()), key
        else:
            assert entry.tensor_type == gguf.GGMLQuantizationType.F32, key
            expected = tensor.float() + offset if "norm" in key else tensor.float()
            assert torch.equal(values, expected), key
    if family == "qwen2":
        assert "blk.0.attn_q.bias" in stored and "blk.0.attn_output.bias" not in stored


def test_metadata_llama_cpp_reads(tmp_path, tokenizer) -> None:
    """Gemma 3's head size and window, Phi-3's window key, Qwen3's head_dim (key_length: 128 != 64 / 4)."""
    for family, expected in [("gemma3", {"gemma3.attention.key_length": 256, "gemma3.attention.sliding_window": 8,
                                         "gemma3.rope.freq_base": 1e6, "gemma3.rope.dimension_count": 256}),
                             ("qwen3", {"qwen3.attention.key_length": 128, "qwen3.attention.value_length": 128}),
                             ("phi3", {"phi3.attention.sliding_window": 0, "phi3.rope.dimension_count": 16})]:
        write_gguf(_model(family), {}, tmp_path / f"{family}.gguf", tokenizer, "Q8_0")
        fields = gguf.GGUFReader(tmp_path / f"{family}.gguf").fields
        assert {key: fields[key].contents() for key in expected} == expected, family


@pytest.mark.parametrize(("overrides", "match"), [
    (dict(num_hidden_layers=3, layer_types=["sliding_attention", "full_attention", "sliding_attention"]),
     "every 6th layer full attention"),
    (dict(final_logit_softcapping=5.0), "no final_logit_softcapping"),
    (dict(query_pre_attn_scalar=64), r"1/sqrt\(256\)"),
    (dict(rope_parameters={"full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1e6},
                           "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}}), "rope_type 'linear'"),
    (dict(rope_parameters={"full_attention": {"rope_type": "default", "rope_theta": 1e6},
                           "sliding_attention": {"rope_type": "default", "rope_theta": 5e4}}), "rope base 10000"),
])
def test_gemma3_configs_llama_cpp_computes_otherwise_are_refused(tmp_path, tokenizer, overrides, match) -> None:
    with pytest.raises(ExportError, match=match):
        write_gguf(_model("gemma3", **overrides), {}, tmp_path / "m.gguf", tokenizer, "Q8_0")


def test_tiny_gemma3_of_the_contract_suite_is_refused(tmp_path, tokenizer) -> None:
    """tests/tiny.py's Gemma 3 (3 layers, one full; capped logits) is not what llama.cpp's gemma3 runs."""
    with pytest.raises(ExportError, match="gemma3"):
        write_gguf(tiny_model("gemma3"), {}, tmp_path / "m.gguf", tokenizer, "Q8_0")


def test_loader_limits_are_warned(tmp_path, tokenizer, caplog) -> None:
    """Qwen3 with head_dim 16: right for llama.cpp (key_length), but transformers' loader assumes 128."""
    with caplog.at_level(logging.WARNING):
        write_gguf(_model("qwen3", head_dim=16), {}, tmp_path / "m.gguf", tokenizer, "Q8_0")
    assert "does not read head_dim for qwen3 and uses 128" in caplog.text
    assert gguf.GGUFReader(tmp_path / "m.gguf").fields["qwen3.attention.key_length"].contents() == 16


def test_opt_is_still_refused(tmp_path, tokenizer) -> None:
    with pytest.raises(ExportError, match="this model is 'opt' .no llama.cpp architecture") as refusal:
        write_gguf(tiny_model("opt"), {}, tmp_path / "m.gguf", tokenizer, "Q8_0")
    written = re.search(r"model types ([^)]*)\)", str(refusal.value)).group(1).split(", ")
    assert {"gemma3_text", "llama", "mistral", "phi3", "qwen2", "qwen3"} <= set(written)


#: Qwen2's split regex as its tokenizer.json spells it (single digits, unlike Llama 3's triples).
QWEN2_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
               r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2_TEXTS = ["In 2024 the council spent 1234567 dollars on 365 days.", "IT'S the model's (best) guess:  42%!!",
               "café naïve Zürich 3.14\n\n\tnews   from the city\r\n"]


def test_qwen2_tokenizer_round_trips_as_qwen2(tmp_path, caplog) -> None:
    """Qwen2's shape: NFC normalizer, Split(regex, isolated) + ByteLevel(no regex); merges cross digit runs."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    backend.train_from_iterator(QWEN2_TEXTS * 30, trainer)
    backend.normalizer = normalizers.NFC()
    backend.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_REGEX), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    backend.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|endoftext|>")
    with caplog.at_level(logging.WARNING):
        write_gguf(_model("qwen2"), {}, tmp_path / "m.gguf", tokenizer, "Q8_0")
    assert "does not NFC-normalize" in caplog.text
    assert gguf.GGUFReader(tmp_path / "m.gguf").fields["tokenizer.ggml.pre"].contents() == "qwen2"
    loaded = AutoTokenizer.from_pretrained(tmp_path, gguf_file="m.gguf")
    for text in QWEN2_TEXTS:
        ids = tokenizer.encode(text, add_special_tokens=False)
        assert loaded.encode(text, add_special_tokens=False) == ids, text
        assert loaded.decode(ids) == text
    digits = tokenizer.tokenize("1234567")
    assert len(digits) == 7  # digits split one by one: a file naming llama-bpe (threes) would tokenize otherwise


def _saved_gemma3(tmp_path, tiny_tokenizer):
    path = tmp_path / "gemma3"
    _model("gemma3").save_pretrained(path)
    tiny_tokenizer.save_pretrained(path)
    return path


@pytest.mark.parametrize("family", ["qwen2", "phi3", "gemma3"])
def test_compress_gptq_into_gguf_matches_in_memory(model_dir_factory, tiny_tokenizer, text_file, tmp_path,
                                                   family) -> None:
    """``compress`` (GPTQ W4 g32) writes a GGUF whose reload equals the in-memory model, for each family.

    The saved tokenizer has no pad token: Phi-3's file gets the config's pad id (else transformers' loader
    builds Phi-3 with pad 32000, outside this vocabulary, and fails).
    """
    source = _saved_gemma3(tmp_path, tiny_tokenizer) if family == "gemma3" else model_dir_factory(family)
    loaded = load(source)
    recipe = recipe_from_dict({
        "name": "t", "calibration": {"dataset": str(text_file), "samples": 4, "seq_len": 32, "batch_size": 2},
        "stages": [{"method": "gptq", "bits": 4, "group_size": 32}], "export": {"format": "gguf"}})
    compress(loaded, recipe, tmp_path / "out", device="cpu")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out", gguf_file="model-Q4_0.gguf").eval()
    tokens = torch.tensor([[5, 17, 42, 99, 3, 250, 7, 8, 11, 13, 200, 1]])
    with torch.no_grad():
        assert torch.equal(reloaded(tokens).logits, loaded.model(tokens).logits)


def test_sentencepiece_style_tokenizer_is_refused_by_name(tmp_path) -> None:
    """Gemma's and Phi-3's hub tokenizers are BPE with a Metaspace decoder: no gpt2 vocabulary to write."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    backend = Tokenizer(models.BPE(byte_fallback=True))
    backend.pre_tokenizer = pre_tokenizers.Metaspace()
    backend.decoder = decoders.Metaspace()
    backend.train_from_iterator(QWEN2_TEXTS * 10, trainers.BpeTrainer(vocab_size=100, special_tokens=["<eos>"]))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<eos>")
    with pytest.raises(ExportError, match="BPE with a Metaspace decoder .SentencePiece-style"):
        write_gguf(_model("gemma3"), {}, tmp_path / "m.gguf", tokenizer, "Q8_0")
