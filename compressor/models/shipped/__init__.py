"""Model definitions shipped next to exports that stock transformers cannot express (named by ``auto_map``).

Each file here is self-contained (torch and transformers only, and safetensors, which transformers needs)
because the export copies it into the output directory, where ``from_pretrained(..., trust_remote_code=True)``
imports it without compressor; the methods
import the same files, so the in-memory model and the reloaded one are built by the same classes. The files
keep no table of families: the layout they need (:meth:`compressor.models.base.Family.layout`) travels in
config.json, and their model classes are made for any transformers ``<X>ForCausalLM`` from the name
``auto_map`` gives (:func:`auto_class_name`).
"""

from __future__ import annotations

from pathlib import Path

from torch import nn


def shipped_dir() -> Path:
    """The directory of the shipped modeling files (package data), which exports copy from."""
    return Path(__file__).parent


def auto_class_name(prefix: str, model: nn.Module) -> str:
    """``auto_map``'s class name for ``model``: ``prefix`` + its transformers class (``SlicedLlamaForCausalLM``).

    The transformers class is the first one in the model's MRO that ``AutoModelForCausalLM`` builds and
    transformers exports at its top level, which the shipped file looks up by the same name; a model reloaded
    from a shipped file (``FinerCutLlamaForCausalLM``) gives its stock base's name.
    """
    import transformers
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    causal = set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values())
    for cls in type(model).__mro__:
        if cls.__name__ in causal and getattr(transformers, cls.__name__, None) is cls:
            return prefix + cls.__name__
    raise LookupError(f"{type(model).__name__} derives from no transformers causal LM class")
