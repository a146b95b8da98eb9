"""The results store: one Zarr v3 layout for every analysis, keyed by one sample index.

``StoreWriter`` writes one analysis chunk by chunk (resumable, multi-process), ``open_store`` reads
any store as a lazy labelled ``xarray.DataTree``; see ``interp.store.layout`` for the layout.
"""

from interp.store.layout import LAYOUT, Field
from interp.store.reader import dataset_of, join_stores, open_store, span_mask
from interp.store.samples import SampleIndex
from interp.store.writer import StoreWriter

__all__ = ["LAYOUT", "Field", "SampleIndex", "StoreWriter", "dataset_of", "join_stores", "open_store", "span_mask"]
