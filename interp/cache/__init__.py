"""Zarr v3 activation cache: resumable chunk-aligned writer, lazy xarray reader, CLI (``python -m interp.cache``)."""

from interp.cache.store import KIND_CODES, SCHEMA_VERSION, CacheWriter, open_cache, remove_store, span_mask

__all__ = ["KIND_CODES", "SCHEMA_VERSION", "CacheWriter", "open_cache", "remove_store", "span_mask"]
