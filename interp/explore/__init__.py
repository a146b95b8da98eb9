"""Lazy exploration of a store's cached activations: ``Explorer(url)``; see ``interp.explore.api``."""

from interp.explore.api import Explorer

__all__ = ["Explorer"]
