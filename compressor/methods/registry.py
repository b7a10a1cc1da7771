"""Method registry: recipe ``method:`` names to their config and implementation classes.

The table is filled by ``@register_method`` in each method module, which
``compressor/methods/__init__.py`` imports by name; nothing else dispatches on method names.
"""

from __future__ import annotations

from collections.abc import Callable

from compressor.errors import RecipeError
from compressor.methods.base import Method

_METHODS: dict[str, type[Method]] = {}


def register_method(name: str) -> Callable[[type[Method]], type[Method]]:
    def decorate(cls: type[Method]) -> type[Method]:
        if name in _METHODS:
            raise ValueError(f"method '{name}' registered twice")
        _METHODS[name] = cls
        return cls

    return decorate


def method_names() -> list[str]:
    return sorted(_METHODS)


def get_method(name: str) -> type[Method]:
    try:
        return _METHODS[name]
    except KeyError:
        raise RecipeError(f"unknown method '{name}': available methods are {', '.join(method_names())}") from None
