"""What llama.cpp's graph for each GGUF architecture computes, and the keys the writer adds for it.

llama.cpp fixes much of a model in its C++ graph rather than in the file: Gemma 3's embedding scale, its
sliding-window pattern (every 6th layer full), the local rope base and the attention scale; Llama's rope
pairing (hence the q/k row permutation the converter applies, and Qwen2/Qwen3/Phi-3/Gemma 3 do not need);
which biases it reads. A model whose config says otherwise would load without error and compute something
else, so :func:`check_architecture` refuses it with the reason. Facts about the *model* (norm kind, embedding
scale) come from its family description in ``compressor/models/``; facts about *llama.cpp* live here.

transformers' GGUF loader (our test oracle) rebuilds the config from fewer keys than llama.cpp reads: it
takes Qwen3's ``head_dim`` and Gemma 3's ``query_pre_attn_scalar`` from the config class defaults (128, 256),
and ignores Phi-3's ``rope.dimension_count`` and sliding window. Files for such models are right for
llama.cpp; we log a warning that transformers' loader will rebuild them differently.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import gguf

from compressor.errors import ExportError
from compressor.models import MODEL_TYPES, get_adapter

logger = logging.getLogger(__name__)

#: llama.cpp's Gemma 3: layer ``i`` uses the sliding window unless ``(i + 1) % 6 == 0``; local rope base 10000.
GEMMA3_SWA_PERIOD = 6
GEMMA3_LOCAL_ROPE_BASE = 10000.0


@dataclass(frozen=True)
class Architecture:
    """One llama.cpp architecture as the writer needs it.

    ``permute_qk``: llama.cpp ropes adjacent pairs (``LLAMA_ROPE_TYPE_NORM``), so the converter permutes q/k
    rows; the NEOX architectures rope HF's halves as stored. ``activation``: the FFN activation the graph
    applies (transformers' name). ``embedding_scale``: what the graph multiplies the token lookup by, as a
    family states it. ``biases``: tensor roles whose bias the graph reads. ``check``: refuse configs the graph
    computes otherwise. ``keys``: architecture-specific metadata. ``transformers_defaults``: config fields
    transformers' GGUF loader does not read, with the value it uses instead.
    """

    permute_qk: bool
    activation: str = "silu"
    embedding_scale: str = "none"
    biases: tuple[str, ...] = ()
    check: Callable[[Any], None] | None = None
    keys: Callable[[gguf.GGUFWriter, Any], None] | None = None
    transformers_defaults: tuple[tuple[str, Any], ...] = ()
    sliding: bool = False


def _rope_by_layer_type(config: Any) -> dict[str, dict[str, Any]]:
    """``config.rope_parameters`` per attention type (Gemma 3 has one per type; others one for all)."""
    rope = getattr(config, "rope_parameters", None) or {}
    if rope and all(isinstance(value, dict) for value in rope.values()):
        return dict(rope)
    return {"full_attention": dict(rope)}


def rope_theta(config: Any) -> float:
    """The rope base of the full-attention layers (``{arch}.rope.freq_base``)."""
    rope = _rope_by_layer_type(config).get("full_attention", {})
    return float(rope.get("rope_theta", getattr(config, "rope_theta", 10000.0)))


def head_dim(config: Any) -> int:
    return int(getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads)


def rotary_dims(config: Any) -> int:
    """Rotated dimensions per head (``rope.dimension_count``): Phi-3's partial rotary factor applies."""
    rope = _rope_by_layer_type(config).get("full_attention", {})
    factor = rope.get("partial_rotary_factor", getattr(config, "partial_rotary_factor", None) or 1.0)
    return int(head_dim(config) * float(factor))


def _check_gemma3(config: Any) -> None:
    """Gemma 3 as llama.cpp's graph hard-codes it (llama-model.cpp, LLM_ARCH_GEMMA3)."""
    layers = config.num_hidden_layers
    pattern = ["full_attention" if (i + 1) % GEMMA3_SWA_PERIOD == 0 else "sliding_attention" for i in range(layers)]
    if list(config.layer_types) != pattern:
        raise ExportError(f"llama.cpp's gemma3 makes every {GEMMA3_SWA_PERIOD}th layer full attention and the rest "
                          f"sliding; this model's layer_types are {config.layer_types} (use compressed-tensors)")
    if not config.sliding_window:
        raise ExportError("llama.cpp's gemma3 needs sliding_window; this config has none")
    local = _rope_by_layer_type(config).get("sliding_attention", {}).get("rope_theta", GEMMA3_LOCAL_ROPE_BASE)
    if float(local) != GEMMA3_LOCAL_ROPE_BASE:
        raise ExportError(f"llama.cpp's gemma3 uses rope base {GEMMA3_LOCAL_ROPE_BASE:g} on sliding layers; "
                          f"this model uses {local}")
    # llama.cpp scales queries by 1/sqrt(head_dim), by 1/sqrt(hidden/heads) for the 62-layer (27B) model
    scale_dim = config.hidden_size // config.num_attention_heads if layers == 62 else head_dim(config)
    if config.query_pre_attn_scalar != scale_dim:
        raise ExportError(f"llama.cpp's gemma3 scales queries by 1/sqrt({scale_dim}) for this size; this model's "
                          f"query_pre_attn_scalar is {config.query_pre_attn_scalar}")
    for cap in ("final_logit_softcapping", "attn_logit_softcapping"):
        if getattr(config, cap, None):
            raise ExportError(f"llama.cpp's sliding-window gemma3 graph applies no {cap}; this model sets "
                              f"{getattr(config, cap)}")


def _sliding_window_key(writer: gguf.GGUFWriter, model: Any) -> None:
    writer.add_sliding_window(int(getattr(model.config, "sliding_window", None) or 0))


ARCHITECTURES: dict[str, Architecture] = {
    "llama": Architecture(permute_qk=True),
    "qwen2": Architecture(permute_qk=False, biases=("attn_q", "attn_k", "attn_v")),
    "qwen3": Architecture(permute_qk=False, transformers_defaults=(("head_dim", 128),)),
    # Phi-3: fused qkv and gate_up tensors as stored; recent llama.cpp disables Phi's sliding window
    "phi3": Architecture(permute_qk=False, keys=_sliding_window_key),
    "gemma3": Architecture(permute_qk=False, activation="gelu_pytorch_tanh", embedding_scale="sqrt_hidden",
                           check=_check_gemma3, keys=_sliding_window_key, sliding=True,
                           transformers_defaults=(("query_pre_attn_scalar", 256),)),
}


def architecture_name(model_type: str) -> str | None:
    """llama.cpp's ``general.architecture`` for a model type, from its family description (None: it has none)."""
    family = MODEL_TYPES.get(model_type)
    return None if family is None else family.gguf_architectures.get(model_type)


def check_architecture(model: Any, warn: bool = True) -> str:
    """The model's GGUF architecture; refuse what the tensors and keys we write cannot express.

    ``warn=False`` only checks (the pipeline asks before calibration; the writer asks again and warns).
    """
    config = model.config
    arch = architecture_name(config.model_type)
    if arch not in ARCHITECTURES:
        written = sorted(t for t in MODEL_TYPES if architecture_name(t) in ARCHITECTURES)
        found = f"llama.cpp architecture '{arch}', not written yet" if arch else "no llama.cpp architecture"
        raise ExportError(f"GGUF export writes the {', '.join(ARCHITECTURES)} architectures (model types "
                          f"{', '.join(written)}); this model is '{config.model_type}' ({found}; "
                          "use compressed-tensors)")
    spec = ARCHITECTURES[arch]
    family = MODEL_TYPES[config.model_type]
    if family.norm not in ("rms", "rms_one_plus"):
        raise ExportError(f"llama.cpp's {arch} uses RMSNorm; the {family.name} family's norms are {family.norm}")
    if family.embedding_scale != spec.embedding_scale:
        raise ExportError(f"llama.cpp's {arch} scales the embedding by '{spec.embedding_scale}'; the "
                          f"{family.name} family by '{family.embedding_scale}'")
    if getattr(config, "mlp_bias", False):
        raise ExportError(f"llama.cpp's {arch} reads no MLP bias; this model has mlp_bias")
    for layer_type, rope in _rope_by_layer_type(config).items():
        if rope.get("rope_type", "default") != "default":
            raise ExportError(f"GGUF export supports plain RoPE; this model's {layer_type} layers have rope_type "
                              f"'{rope['rope_type']}'")
    activation = getattr(config, "hidden_activation", None) or getattr(config, "hidden_act", "silu")
    if activation != spec.activation:
        raise ExportError(f"llama.cpp's {arch} applies {spec.activation}; this model uses {activation}")
    if spec.check is not None:
        spec.check(config)
    if warn:
        _warn_lossy(model, arch, spec)
    return arch


def _warn_lossy(model: Any, arch: str, spec: Architecture) -> None:
    """Warn where llama.cpp or transformers' loader will run the file differently from the model."""
    config = model.config
    if not spec.sliding and "sliding_attention" in get_adapter(model).attention_types():
        logger.warning("llama.cpp runs %s with full attention: sliding_window=%s is dropped", arch,
                       config.sliding_window)
    for name, default in spec.transformers_defaults:
        if getattr(config, name, default) != default:
            logger.warning("transformers' GGUF loader does not read %s for %s and uses %s; this model has %s "
                           "(llama.cpp reads the file correctly)", name, arch, default, getattr(config, name))
    if rotary_dims(config) != head_dim(config):
        logger.warning("transformers' GGUF loader ignores %s.rope.dimension_count (%d of %d dims rotated)", arch,
                       rotary_dims(config), head_dim(config))
