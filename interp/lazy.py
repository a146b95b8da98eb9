"""Package names imported on first use, so a CLI in the package answers ``--help`` before torch loads."""

from __future__ import annotations

import importlib
from collections.abc import Callable


def exports(package: str, table: dict[str, str]) -> Callable[[str], object]:
    """A module ``__getattr__`` that imports ``name`` from ``<package>.<table[name]>`` when first asked for."""

    def getattr_(name: str) -> object:
        if name not in table:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        return getattr(importlib.import_module(f"{package}.{table[name]}"), name)

    return getattr_
