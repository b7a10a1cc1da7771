"""compressor: post-training compression of causal language models.

``compress(model, recipe, out)`` runs a recipe through the layer-wise engine and writes the result;
``evaluate(model, data)`` measures perplexity; ``load(path)`` reads any model this package writes.
Importing the package changes no global state.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

if TYPE_CHECKING:
    from compressor.pipeline import compress, evaluate, load
    from compressor.recipe import Recipe, load_recipe

_LAZY = {
    "compress": "compressor.pipeline",
    "evaluate": "compressor.pipeline",
    "load": "compressor.pipeline",
    "Recipe": "compressor.recipe",
    "load_recipe": "compressor.recipe",
}


def __getattr__(name: str) -> Any:
    """Import torch-heavy modules only when used, so ``compressor --help`` starts fast."""
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'compressor' has no attribute {name!r}")


__all__ = ["Recipe", "__version__", "compress", "evaluate", "load", "load_recipe"]
