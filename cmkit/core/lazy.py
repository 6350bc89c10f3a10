"""Names a package re-exports, loaded from their submodule on first use (PEP 562), so importing the package (and
``cmkit --help``) does not import torch: the one implementation behind ``cmkit``, ``cmkit.core`` and
``cmkit.training``. Imports nothing but the standard library."""

from __future__ import annotations

import importlib
from collections.abc import Callable


def lazy_exports(package: str, namespace: dict, exports: dict[str, str], subpackages=()) -> tuple[Callable, Callable]:
    """``(__getattr__, __dir__)`` for ``package``: ``exports`` maps a public name to the submodule that defines it
    (relative to ``package``); ``subpackages`` are returned as modules. A loaded name is stored in ``namespace`` (the
    package's globals), so later look-ups skip the hook."""
    def __getattr__(name: str):
        if name in subpackages:
            return importlib.import_module(f".{name}", package)
        if name not in exports:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(f".{exports[name]}", package), name)
        namespace[name] = value
        return value

    def __dir__() -> list[str]:
        return sorted({*namespace, *exports})

    return __getattr__, __dir__
