"""GGUF export (llama.cpp, Ollama): our own integer codes in GGUF blocks, plus the metadata llama.cpp needs.

We fill the blocks with the engine's codes instead of calling ``gguf.quants.quantize`` (llama.cpp's own RTN),
so what GPTQ or BAQ optimised is what the file holds. Each quantized linear gets the type of its own bits and
symmetry (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0; ``gguf_blocks.py`` has the layouts, what is exact and the fp16 bound of
the asymmetric types); requantizing into another type happens only when asked (``gguf_type``).

Tensor names come from gguf-py's own ``TensorNameMap`` (llama.cpp's table). For the llama architecture q/k
rows are stored permuted the way llama.cpp's converter permutes them (q with n_head, k with n_kv_head): files
without it load in both transformers and llama.cpp and silently give wrong output (FORMATS.md). The permutation
only moves rows, so blocks are built in HF row order and the packed rows are permuted. Qwen2/Qwen3/Phi-3/Gemma 3
rope HF's layout as stored; what each architecture needs besides (biases, Gemma's ``1 + w`` norms, keys, the
configs llama.cpp would compute otherwise) is in ``gguf_arch.py``.

Dense tensors: norms and biases are F32 (llama.cpp wants 1-D tensors in F32); embeddings, an untied output and
any linear left unquantized are F16 when the model is float16 and F32 otherwise (bf16 -> F32 is lossless, -> F16
is not).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import torch
from transformers.modeling_utils import remove_tied_weights_from_state_dict

from compressor.errors import ExportError
from compressor.export.gguf_arch import (
    ARCHITECTURES,
    architecture_name,
    check_architecture,
    head_dim,
    rope_theta,
    rotary_dims,
)
from compressor.export.gguf_blocks import (
    BLOCK,
    TYPES,
    exact_type,
    pack_blocks,
    round_scales_fp16,
    store,
    validate_gguf,
)
from compressor.methods.quant.ops import QuantizedWeight
from compressor.models import MODEL_TYPES

logger = logging.getLogger(__name__)

#: file type name -> block type (``gguf_blocks.TYPES``): Q4_0, Q4_1, Q5_0, Q5_1, Q8_0.
FILE_TYPES = TYPES
#: llama.cpp architectures whose keys and tensor layout this writer knows (``gguf_arch.ARCHITECTURES``).
WRITTEN_ARCHITECTURES = tuple(ARCHITECTURES)
#: llama.cpp's ``general.architecture`` for a model type (None: it has none).
architecture = architecture_name
__all__ = ["BLOCK", "FILE_TYPES", "default_file_type", "pack_blocks", "round_scales_fp16", "validate_gguf",
           "write_gguf"]


def permute_rows(rows: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's ``permute`` for q/k: per head, interleave the two rotary halves (rows only).

    HF stores each head's rows as ``[first half, second half]`` of the rotary pairs; llama.cpp's rope wants
    them as pairs ``(0, d/2), (1, d/2+1), ...``. Works on dense rows and on packed block rows alike.
    """
    shape = rows.shape
    return rows.reshape(n_head, 2, shape[0] // n_head // 2, *shape[1:]).swapaxes(1, 2).reshape(shape)


def unpermute_rows(rows: np.ndarray, n_head: int) -> np.ndarray:
    """Inverse of :func:`permute_rows` (what transformers' GGUF loader applies)."""
    shape = rows.shape
    return rows.reshape(n_head, shape[0] // n_head // 2, 2, *shape[1:]).swapaxes(1, 2).reshape(shape)


def _add_hparams(writer: gguf.GGUFWriter, model: Any, arch: str, file_type: gguf.LlamaFileType) -> None:
    """The architecture keys transformers' GGUF loader and llama.cpp read (``{arch}.*``)."""
    config = model.config
    dim = head_dim(config)
    name = Path(str(getattr(config, "_name_or_path", "") or config.model_type)).name
    if arch == "llama" != config.model_type and config.model_type not in name.lower():
        # a model type stored under another architecture (Mistral as llama) is told apart by general.name only
        # (transformers' loader switches to Mistral only when the name is exactly "mistral"; else it builds Llama,
        # which computes the same here since the sliding window is not written)
        name = f"{config.model_type} {name}"
    if name == "mistral":
        # transformers 5.23 maps a llama file named exactly "mistral" to a gguf-py "mistral" architecture that gguf
        # 0.19 lacks, and fails to load it; llama.cpp ignores the name
        name = "Mistral"
    writer.add_name(name)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_rope_dimension_count(rotary_dims(config))
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads or config.num_attention_heads)
    # always written: transformers' gemma3 reader takes head_dim from key_length only
    writer.add_key_length(dim)
    writer.add_value_length(dim)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_freq_base(rope_theta(config))
    writer.add_vocab_size(config.vocab_size)
    keys = ARCHITECTURES[arch].keys
    if keys is not None:
        keys(writer, model)
    writer.add_file_type(file_type)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)


#: Meta-Llama-3's ``Split`` regex (its tokenizer.json). llama.cpp's converter names that tokenizer ``llama-bpe``,
#: its llama-vocab.cpp splits with this expression (LLAMA_VOCAB_PRE_TYPE_LLAMA3), and transformers' GGUF loader
#: rebuilds ``Split(this, Isolated) + ByteLevel(use_regex=False)`` from the name.
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
#: Qwen2's and Qwen3's ``Split`` regex (Llama 3's with single digits); llama.cpp's converter names it ``qwen2``.
QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
               r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
#: ``tokenizer.ggml.pre`` for a ``Split(regex) + ByteLevel(use_regex=False)`` pre-tokenizer, by its regex.
SPLIT_PRE_TOKENIZERS = {LLAMA3_SPLIT: "llama-bpe", QWEN2_SPLIT: "qwen2"}


def _pre_tokenizer_name(spec: dict[str, Any] | None) -> str:
    """llama.cpp's ``tokenizer.ggml.pre`` for a byte-level pre-tokenizer, decided by its structure.

    Plain ``ByteLevel`` with the GPT-2 regex is ``gpt-2``; ``Digits(individual) + ByteLevel`` is ``smollm``
    (SmolLM's original tokenizer.json); ``Split(regex) + ByteLevel(use_regex=False)`` is named by its regex
    (Llama 3's is ``llama-bpe``). Anything else would be tokenized differently by llama.cpp, so refuse.
    """
    if spec and spec.get("type") == "ByteLevel" and spec.get("use_regex", True):
        return "gpt-2"
    parts = (spec or {}).get("pretokenizers", [])
    kinds = [p.get("type") for p in parts]
    digits_first = kinds == ["Digits", "ByteLevel"] and parts[0].get("individual_digits")
    if digits_first and parts[1].get("use_regex", True):
        return "smollm"
    if kinds == ["Split", "ByteLevel"]:
        return _split_name(parts[0], parts[1])
    raise ExportError(f"GGUF export knows the gpt-2, smollm and {', '.join(SPLIT_PRE_TOKENIZERS.values())} "
                      f"pre-tokenizers, not {kinds or spec}")


def _split_name(split: dict[str, Any], byte_level: dict[str, Any]) -> str:
    """The name of a ``Split + ByteLevel`` pre-tokenizer; only the shape llama.cpp runs, with a regex it knows."""
    regex = (split.get("pattern") or {}).get("Regex")
    shape_ok = split.get("behavior") == "Isolated" and not split.get("invert")
    if not shape_ok or byte_level.get("use_regex", True) or byte_level.get("add_prefix_space"):
        raise ExportError("GGUF export writes a Split + ByteLevel pre-tokenizer only as llama.cpp runs it (Split "
                          "behavior Isolated, not inverted; ByteLevel use_regex=false, add_prefix_space=false); "
                          f"got {split.get('behavior')}, invert={split.get('invert')}, ByteLevel {byte_level}")
    if regex not in SPLIT_PRE_TOKENIZERS:
        raise ExportError(f"GGUF export knows the Split regex of {', '.join(SPLIT_PRE_TOKENIZERS.values())}; "
                          f"this tokenizer splits with {regex!r}, which llama.cpp would tokenize differently")
    return SPLIT_PRE_TOKENIZERS[regex]


def _token_types(tokenizer: Any, vocab_size: int) -> tuple[list[str], list[int]]:
    """Every id below ``vocab_size`` with its llama.cpp type; ids the tokenizer lacks become ``[PADn]``."""
    by_id = {index: token for token, index in tokenizer.get_vocab().items()}
    if max(by_id) >= vocab_size:
        raise ExportError(f"the tokenizer has ids up to {max(by_id)}; the model's vocab_size is {vocab_size}")
    added = tokenizer.added_tokens_decoder
    tokens, types = [], []
    for index in range(vocab_size):
        if index not in by_id:
            tokens.append(f"[PAD{index}]")
            types.append(gguf.TokenType.USER_DEFINED)
        elif index in added:
            tokens.append(by_id[index])
            types.append(gguf.TokenType.CONTROL if added[index].special else gguf.TokenType.USER_DEFINED)
        else:
            tokens.append(by_id[index])
            types.append(gguf.TokenType.NORMAL)
    return tokens, [int(t) for t in types]


def _add_tokenizer(writer: gguf.GGUFWriter, tokenizer: Any, config: Any) -> None:
    """A gpt2-style byte-level BPE tokenizer, as llama.cpp's converter writes it (without it none loads).

    Without a pad token in the tokenizer the config's ``pad_token_id`` is written: transformers' loader
    otherwise takes the config class default (Phi-3's 32000), which may lie outside the vocabulary.
    """
    vocab_size = config.vocab_size
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise ExportError("GGUF export needs a fast (tokenizers-backed) tokenizer")
    spec = json.loads(backend.to_str())
    if spec["model"]["type"] != "BPE" or (spec.get("decoder") or {}).get("type") != "ByteLevel":
        decoder = (spec.get("decoder") or {}).get("type")
        raise ExportError(f"GGUF export writes byte-level BPE tokenizers (llama.cpp's gpt2 model); this one is "
                          f"{spec['model']['type']} with a {decoder} decoder (SentencePiece-style, as Gemma's and "
                          "Phi-3's, is not written yet)")
    if spec.get("normalizer") == {"type": "NFC"}:
        # Qwen2/Qwen3: llama.cpp's converter drops it too; text already in NFC (most text) tokenizes the same
        logger.warning("llama.cpp does not NFC-normalize: text not in NFC may tokenize differently")
    elif spec.get("normalizer"):
        raise ExportError(f"llama.cpp's gpt2 tokenizer has no normalizer; this one has {spec['normalizer']}")
    pre = spec.get("pre_tokenizer")
    tokens, types = _token_types(tokenizer, vocab_size)
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"]["merges"]]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(_pre_tokenizer_name(pre))
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    for key, add in (("bos", writer.add_bos_token_id), ("eos", writer.add_eos_token_id),
                     ("unk", writer.add_unk_token_id), ("pad", writer.add_pad_token_id)):
        token_id = getattr(tokenizer, f"{key}_token_id", None)
        config_pad = getattr(config, "pad_token_id", None)
        if key == "pad" and token_id is None and isinstance(config_pad, int) and 0 <= config_pad < vocab_size:
            token_id = config_pad
        if token_id is not None:
            add(int(token_id))
    plain = tokenizer.encode("a", add_special_tokens=False)
    full = tokenizer.encode("a", add_special_tokens=True)
    writer.add_add_bos_token(len(full) > len(plain) and full[0] == tokenizer.bos_token_id)
    writer.add_add_eos_token(len(full) > len(plain) and full[-1] == tokenizer.eos_token_id)
    parts = [pre or {}, *(pre or {}).get("pretokenizers", [])]
    byte_level = [p for p in parts if p.get("type") == "ByteLevel"]
    writer.add_add_space_prefix(bool(byte_level and byte_level[0].get("add_prefix_space")))
    if isinstance(getattr(tokenizer, "chat_template", None), str):
        writer.add_chat_template(tokenizer.chat_template)


def _tensors(model: Any, quantized: dict[str, QuantizedWeight], arch: str,
             requantize: str | None) -> tuple[list[tuple[str, np.ndarray, Any]], dict[str, tuple[float, float]]]:
    """``(gguf name, array, raw dtype or None)`` for every stored tensor of ``arch`` (a tied output is not stored),
    and ``(||error||^2, ||weight||^2)`` per tensor ``requantize`` had to requantize."""
    config = model.config
    spec = ARCHITECTURES[arch]
    arch_enum = next(key for key, name in gguf.MODEL_ARCH_NAMES.items() if name == arch)
    names = gguf.get_tensor_name_map(arch_enum, config.num_hidden_layers)
    heads = {"attn_q": config.num_attention_heads,
             "attn_k": config.num_key_value_heads or config.num_attention_heads} if spec.permute_qk else {}
    # llama.cpp's RMSNorm multiplies by the stored weight: a family normalizing with x*(1+w) stores 1+w
    norm_offset = 1.0 if MODEL_TYPES[config.model_type].norm == "rms_one_plus" else 0.0
    dense_dtype = np.float16 if model.dtype == torch.float16 else np.float32
    state = remove_tied_weights_from_state_dict(dict(model.state_dict()), model)
    unknown = [path for path in quantized if f"{path}.weight" not in state]
    if unknown:
        raise ExportError(f"quantized module {unknown[0]} has no own weight in the model (tied or missing)")
    out, errors = [], {}
    for key, tensor in state.items():
        name = names.get_name(key, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise ExportError(f"no {arch} GGUF tensor name for {key}")
        role = name.split(".")[-2]
        if name.endswith(".bias") and role not in spec.biases:
            raise ExportError(f"llama.cpp's {arch} reads no bias for {role}; this model has {key}")
        path, _, kind = key.rpartition(".")
        if kind == "weight" and path in quantized:  # a quantized linear's bias stays dense
            try:
                array, block, error = store(quantized[path], requantize)
            except ExportError as exc:
                raise ExportError(f"{path}: {exc}") from None
            raw = block.ggml
            if error is not None:
                errors[name] = error
        else:
            array = tensor.detach().float().cpu().numpy()
            if role.endswith("norm"):
                array = array + np.float32(norm_offset)
            array, raw = array.astype(np.float32 if array.ndim == 1 else dense_dtype), None
        if role in heads:
            array = permute_rows(array, heads[role])
        out.append((name, np.ascontiguousarray(array), raw))
    return out, errors


def default_file_type(quantized: dict[str, QuantizedWeight]) -> str:
    """``general.file_type`` of a file of our codes: the type holding most of the quantized weights (Q8_0 if none)."""
    counts: dict[str, int] = {}
    for qweight in quantized.values():
        block = exact_type(qweight.bits, qweight.symmetric)
        if block is not None:
            counts[block.name] = counts.get(block.name, 0) + qweight.q.numel()
    return max(counts, key=lambda name: counts[name]) if counts else "Q8_0"


def requantization_summary(errors: dict[str, tuple[float, float]]) -> dict[str, Any]:
    """Relative Frobenius error ``||W_file - W||/||W||`` per requantized tensor and over all of them together."""
    total_error, total_norm = (sum(e[i] for e in errors.values()) for i in (0, 1))
    return {"tensors": {name: (error / norm) ** 0.5 if norm else 0.0 for name, (error, norm) in errors.items()},
            "total": (total_error / total_norm) ** 0.5 if total_norm else 0.0}


def write_gguf(model: Any, quantized: dict[str, QuantizedWeight], out_path: Path, tokenizer: Any,
               file_type: str | None = None, requantize: str | None = None) -> dict[str, Any] | None:
    """Write one ``.gguf`` file: the architecture's hparams, the tokenizer, blocks for quantized linears, dense
    the rest. The parent directory must exist.

    Without ``requantize`` every quantized linear is stored in the type of its own bits and symmetry (4 ->
    Q4_0/Q4_1, 5 -> Q5_0/Q5_1, 8 -> Q8_0), so a BAQ module plan is one file with a type per tensor, as
    llama.cpp's own mixed files are. ``requantize`` (a type name, the recipe's ``gguf_type``) stores every
    quantized linear in that type: our codes where they fit it, llama.cpp's RTN of the weight where not.
    ``file_type`` is only the file's ``general.file_type`` label (default: ``requantize``, else the most
    used type). Returns :func:`requantization_summary` when any tensor was requantized (also logged and
    written beside the file as ``<file>.requantization.json``), else None.
    """
    file_type = file_type or requantize or default_file_type(quantized)
    for value in (file_type, requantize):
        if value is not None and value not in FILE_TYPES:
            raise ExportError(f"GGUF file type must be one of {', '.join(FILE_TYPES)}; got {value}")
    arch = check_architecture(model)
    tensors, errors = _tensors(model, quantized, arch, requantize)
    writer = gguf.GGUFWriter(str(out_path), arch)
    try:
        _add_hparams(writer, model, arch, FILE_TYPES[file_type].file_type)
        _add_tokenizer(writer, tokenizer, model.config)
        for name, array, raw in tensors:
            writer.add_tensor(name, array, raw_dtype=raw)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
    finally:
        writer.close()
    if not errors:
        return None
    summary = requantization_summary(errors)
    Path(f"{out_path}.requantization.json").write_text(json.dumps(summary, indent=2) + "\n")
    worst = max(summary["tensors"], key=summary["tensors"].get)
    logger.warning("GGUF %s: requantized %d tensors with llama.cpp's RTN (our codes do not fit it): relative weight "
                   "error %.4g in total, %.4g at worst (%s); the in-memory model keeps our codes", requantize,
                   len(errors), summary["total"], summary["tensors"][worst], worst)
    return summary
