"""Models: ``load(id_or_path)`` returns the adapter of the checkpoint's family (``registry.FAMILIES``).

Names are imported on first use (``interp.lazy``), so a CLI under ``interp.models`` answers ``--help`` before
torch loads.
"""

from __future__ import annotations

from interp.lazy import exports

_FROM = {"Adapter": "adapter", "Batch": "adapter", "Cache": "adapter", "Hook": "adapter", "Positions": "adapter",
         "FAMILIES": "registry", "load": "registry"}
__all__ = sorted(_FROM)

__getattr__ = exports(__name__, _FROM)
