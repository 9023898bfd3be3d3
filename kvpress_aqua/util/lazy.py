"""Public names a package loads on first use (PEP 562), so that importing it imports nothing heavy."""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from typing import Any

__all__ = ["lazy_exports"]


def lazy_exports(package: str, exports: Mapping[str, str]) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """The ``__getattr__`` and ``__dir__`` of a package whose public names live in submodules.

    Parameters
    ----------
    package : str
        The package's ``__name__``.
    exports : mapping
        Public name -> the submodule (relative to the package) that defines it.

    Returns
    -------
    tuple
        ``(__getattr__, __dir__)``: the first imports the submodule defining a name on first access
        and caches the name in the package; the second lists the names, loaded or not.

    """
    namespace = importlib.import_module(package).__dict__

    def getattr_(name: str) -> Any:
        module = exports.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(f"{package}.{module}"), name)
        namespace[name] = value
        return value

    def dir_() -> list[str]:
        return sorted(set(namespace) | set(exports))

    return getattr_, dir_
