"""Models: ``load(id_or_path)`` returns the adapter of the checkpoint's family (``registry.FAMILIES``).

Names are imported on first use, so a CLI under ``interp.models`` answers ``--help`` before torch loads.
"""

from __future__ import annotations

import importlib

_FROM = {"Adapter": "adapter", "Batch": "adapter", "Cache": "adapter", "Hook": "adapter", "Positions": "adapter",
         "FAMILIES": "registry", "load": "registry"}
__all__ = sorted(_FROM)


def __getattr__(name: str):
    if name not in _FROM:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_FROM[name]}"), name)
