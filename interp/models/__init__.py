"""Models: ``load(id_or_path)`` returns the adapter of the checkpoint's family (``registry.FAMILIES``)."""

from __future__ import annotations

from interp.models.adapter import Adapter, Batch, Cache, Hook, Positions
from interp.models.registry import FAMILIES, load

__all__ = ["Adapter", "Batch", "Cache", "FAMILIES", "Hook", "Positions", "load"]
