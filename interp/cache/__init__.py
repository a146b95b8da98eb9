"""Activation caching into the results store's ``acts`` group; CLI ``python -m interp.cache``."""

from interp.cache.acts import KIND_CODES, acts_layout, sequence_rows

__all__ = ["KIND_CODES", "acts_layout", "sequence_rows"]
