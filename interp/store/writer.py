"""One writer for every analysis: chunk-atomic, resumable byte-identically, safe to replace.

A writer owns one analysis group of a store (``acts``, ``sweep``, ``nast``...). Creating it lays out
the store (sample index + the group) or adds the group to an existing store of the same sample
index; an existing group made the same way (``identity``) is resumed. ``write`` takes one whole
sample chunk of every array and marks it done last, so a killed run rewrites at most that chunk and
a resumed store ends byte-identical to an uninterrupted one. Replacing a store (``mode="overwrite"``,
or ``"replace"`` on a mismatch) writes a fresh one beside it (``.name.new``) and swaps it in only
when complete: an interrupted replacement leaves the old store whole, and rerunning resumes it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import zarr
from zarr.core.sync import sync

from interp import __version__
from interp.errors import InterpError
from interp.store.layout import (COMPRESSOR, GROUP_KEY, INITIALIZING, LAYOUT, ROOT_KEY, THUMBNAIL, Field, as_json,
                                 check_layout, check_url, digest, layout_lock, occupied, remove, sibling, swap,
                                 target)
from interp.store.samples import SampleIndex, image_rows, sample_dict

MODES = ("resume", "replace", "overwrite")
MAX_CHUNK_BYTES = 2 * 2**30
IMAGE_FIELDS = {"thumbnail": Field((THUMBNAIL, THUMBNAIL), ("thumb_y", "thumb_x"), "uint8"),
                "image_height": Field((), (), "int32"), "image_width": Field((), (), "int32")}
Static = tuple[tuple[str, ...], np.ndarray, dict]  # (dims, values, attrs) of an array without a sample axis


class _Mismatch(InterpError):
    """An existing store or group made differently."""


class StoreWriter:
    """Write analysis ``analysis`` of the store at ``url`` one sample chunk at a time.

    ``fields`` maps array paths inside the group (``"lm.blocks.0.resid_post"``, ``"lm/effect"``:
    a ``/`` makes a subgroup) to their per-sample :class:`Field`; ``statics`` are arrays without a
    sample axis (e.g. per-layer labels); ``group_attrs`` are attributes of subgroups; ``meta`` is the
    run's metadata (model id, weight hash, adapter, sites, full config): with the fields it is the
    group's identity. ``mode``: ``resume`` (refuse a store made differently), ``replace`` (replace
    it) or ``overwrite`` (always start afresh). ``create=False`` (ranks > 0) only opens what rank 0 laid out.
    """

    def __init__(self, url: str, analysis: str, *, samples: SampleIndex, fields: Mapping[str, Field],
                 meta: Mapping[str, Any], statics: Mapping[str, Static] | None = None,
                 group_attrs: Mapping[str, Mapping[str, Any]] | None = None, chunk_samples: int = 32,
                 mode: str = "resume", create: bool = True, storage_options: dict | None = None) -> None:
        if mode not in MODES:
            raise InterpError(f"unknown store mode {mode!r}: choose {', '.join(MODES)}")
        if chunk_samples < 1:
            raise InterpError(f"chunk_samples must be >= 1, got {chunk_samples}")
        if not fields:
            raise InterpError(f"nothing to write in {analysis}")
        chunk_samples = min(chunk_samples, len(samples))  # a Zarr chunk is allocated whole when written
        per_sample = sum(int(np.prod(f.shape)) * (16 if f.dtype == "str" else np.dtype(f.dtype).itemsize)
                         for f in fields.values())
        if chunk_samples * per_sample > MAX_CHUNK_BYTES:  # a chunk is built in memory
            raise InterpError(f"a chunk of {chunk_samples} samples would hold "
                              f"{chunk_samples * per_sample / 2**30:.1f} GiB of {analysis} arrays "
                              f"(limit {MAX_CHUNK_BYTES / 2**30:.0f} GiB): use --chunk-samples "
                              f"{max(1, MAX_CHUNK_BYTES // per_sample)} or less")
        check_url(url, storage_options)
        taken, is_zarr = occupied(url, storage_options)
        if taken and not is_zarr:  # never replaced, whatever the mode
            raise InterpError(f"{url} exists and is not a Zarr store; choose another --out")
        self.url, self.analysis, self.samples, self.storage_options = url, analysis, samples, storage_options
        self.fields, self.statics = dict(fields), dict(statics or {})
        self.group_attrs = as_json(dict(group_attrs or {}), "group attributes")
        self.n_samples, self.chunk_samples = len(samples), chunk_samples
        self.root_info = as_json({"layout": LAYOUT, "n_samples": self.n_samples, "chunk_samples": chunk_samples,
                                  "sample_hash": samples.hash, "dataset": samples.dataset,
                                  "code_version": __version__}, "dataset reference")
        self.meta = as_json({**meta, "code_version": __version__}, "store meta")
        self.identity = digest({"meta": self.meta, "fields": {k: f.spec() for k, f in self.fields.items()},
                                "statics": {k: [list(d), np.asarray(v).tolist()] for k, (d, v, _) in self.statics.items()}})
        self.create, self.staged, self.laid_out = create, None, ""  # laid_out: "store" or "group" when new
        with layout_lock(url, storage_options):
            try:
                self._root = self._open(url, fresh=mode == "overwrite" and self._stage(url))
            except _Mismatch:
                if mode != "replace":
                    raise
                self._root = self._open(url, fresh=self._stage(url))
        group = self._root[analysis]
        self._done = group["done"]
        self._arrays = {name: group[name] for name in self.fields}
        self._index = {name: self._root[f"samples/{name}"] for name in IMAGE_FIELDS}

    # -- opening -----------------------------------------------------------------------------
    def _stage(self, url: str) -> bool:
        """Write to the staging sibling from now on; True (so the caller opens it)."""
        self.staged = sibling(url, ".new")
        return True

    def _open(self, url: str, fresh: bool) -> zarr.Group:
        """Open (or lay out) the store and the group at ``url``, or at the staging sibling when ``fresh``."""
        where = self.staged if fresh else url
        taken, is_zarr = occupied(where, self.storage_options)
        if taken and not is_zarr:
            raise InterpError(f"{where} exists and is not a Zarr store; choose another --out")
        zpath, opts = target(where, self.storage_options)
        root = zarr.open_group(zpath, mode="r+", **opts) if is_zarr else None
        if root is not None and root.attrs.asdict() == INITIALIZING:
            root = None  # interrupted while laid out: lay it out again
        if root is None:
            return self._lay_out(zpath, opts)
        try:
            info = check_layout(where, root.attrs.asdict()) if not fresh else self._fresh_info(where, root)
        except InterpError as e:
            raise _Mismatch(str(e)) from None
        if info is None:
            return self._lay_out(zpath, opts)
        for key in ("n_samples", "chunk_samples", "sample_hash"):
            if info.get(key) != self.root_info[key]:
                what = "samples" if key == "sample_hash" else key
                raise _Mismatch(f"store {url} has other {what}" + (
                    "" if key == "sample_hash" else f" ({key}={info.get(key)!r}, not {self.root_info[key]!r})")
                    + "; use a new --out or --overwrite")
        if self.analysis not in root or root[self.analysis].attrs.asdict().get(GROUP_KEY) == INITIALIZING[ROOT_KEY]:
            self._lay_out_group(root)
            return root
        old = root[self.analysis].attrs[GROUP_KEY]
        if old.get("identity") != self.identity:
            raise _Mismatch(f"store {url} {self._why(old['meta'])}; use a new --out or --overwrite")
        return root

    def _fresh_info(self, where: str, root: zarr.Group) -> dict | None:
        """A staging store is resumed only if it is this run's; anything else there is discarded."""
        try:
            info = check_layout(where, root.attrs.asdict())
            group = root[self.analysis].attrs.asdict().get(GROUP_KEY, {})
            if info.get("sample_hash") == self.root_info["sample_hash"] and group.get("identity") == self.identity:
                return info
        except (InterpError, KeyError):
            pass
        remove(where, self.storage_options)
        return None

    def _why(self, old: Mapping[str, Any]) -> str:
        if (old.get("model_id"), old.get("weight_hash")) != (self.meta.get("model_id"), self.meta.get("weight_hash")):
            return (f"was written by model {old.get('model_id')} (hash {str(old.get('weight_hash'))[:12]}), not "
                    f"{self.meta.get('model_id')} (hash {str(self.meta.get('weight_hash'))[:12]})")
        for key in sorted(set(old) | set(self.meta)):
            if old.get(key) != self.meta.get(key) and key != "code_version":
                return f"has {key}={old.get(key)!r}, not {self.meta.get(key)!r}"
        return "has other arrays"

    def _lay_out(self, zpath: str, opts: dict) -> zarr.Group:
        """A new store: the sample index, then the group; the root attrs go in last, marking it whole."""
        if not self.create:
            raise InterpError(f"store {zpath} is not laid out yet (rank 0 creates it)")
        root = zarr.open_group(zpath, mode="w", attributes=dict(INITIALIZING), **opts)
        self.laid_out = "store"
        n, cs = self.n_samples, self.chunk_samples
        samples = root.require_group("samples")
        for name, values in sample_dict(self.samples).items():
            samples.create_array(name, shape=(n,), chunks=(cs,), dtype=str if values.dtype == object else values.dtype,
                                 compressors=COMPRESSOR, dimension_names=("sample",))[:] = values
        for name, f in IMAGE_FIELDS.items():
            self._create(samples, name, f)
        if self.samples.labels:
            samples.create_array("labels", shape=(n, len(self.samples.labels)), chunks=(cs, len(self.samples.labels)),
                                 dtype="int8", fill_value=0, compressors=COMPRESSOR,
                                 dimension_names=("sample", "label"), attributes={"names": list(self.samples.labels)}
                                 )[:] = np.stack([np.asarray(v, np.int8) for v in self.samples.labels.values()], axis=1)
        self._lay_out_group(root)
        root.attrs.put({ROOT_KEY: self.root_info})
        return root

    def _create(self, group: zarr.Group, name: str, f: Field) -> zarr.Array:
        n, cs = self.n_samples, self.chunk_samples
        return group.create_array(name, shape=(n, *f.shape), chunks=(cs, *f.shape),
                                  dtype=str if f.dtype == "str" else f.dtype,
                                  fill_value=f.fill, compressors=COMPRESSOR, dimension_names=("sample", *f.dims),
                                  attributes=f.attrs or None, overwrite=True)

    def _lay_out_group(self, root: zarr.Group) -> None:
        if not self.create:
            raise InterpError(f"group {self.analysis} of {self.url} is not laid out yet (rank 0 creates it)")
        if self.analysis in root:
            del root[self.analysis]
        self.laid_out = self.laid_out or "group"
        group = root.create_group(self.analysis, attributes={GROUP_KEY: INITIALIZING[ROOT_KEY]})
        for name, f in self.fields.items():
            self._create(group, name, f)
        for name, (dims, values, attrs) in self.statics.items():
            values = np.asarray(values)
            group.create_array(name, shape=values.shape, dtype=str if values.dtype.kind in "OU" else values.dtype,
                               compressors=COMPRESSOR, dimension_names=dims, attributes=attrs or None)[...] = (
                values.astype(object) if values.dtype.kind == "U" else values)
        for sub, attrs in self.group_attrs.items():
            group.require_group(sub).attrs.update(attrs)
        group.create_array("done", shape=(-(-self.n_samples // self.chunk_samples),), chunks=(1,), dtype="bool",
                           fill_value=False, compressors=None, dimension_names=("chunk",))
        coords = [name for name, f in self.fields.items() if f.coord]
        group.attrs.put({GROUP_KEY: {"meta": self.meta, "coords": coords, "order": list(self.fields),
                                     "identity": self.identity,
                                     "complete": False, "summary": {}}})

    # -- writing -----------------------------------------------------------------------------
    def pending(self) -> list[range]:
        """Sample ranges (one per chunk, chunk-aligned) not yet written."""
        cs = self.chunk_samples
        return [range(i * cs, min((i + 1) * cs, self.n_samples)) for i in np.flatnonzero(~self._done[:])]

    def write(self, start: int, arrays: Mapping[str, np.ndarray], images: Sequence[np.ndarray] | None = None) -> None:
        """Write the whole chunk starting at ``start`` (the last one may be short), then mark it done.

        ``arrays`` holds every field; ``images`` (float [H, W] per sample) fill the index's thumbnails."""
        cs = self.chunk_samples
        if start % cs or not 0 <= start < self.n_samples:
            raise InterpError(f"chunk start {start} is not a multiple of {cs} within 0..{self.n_samples - 1}")
        stop = min(start + cs, self.n_samples)
        if set(arrays) != set(self.fields):
            raise InterpError(f"write got {sorted(arrays)}, {self.analysis} has {sorted(self.fields)}")
        values = {name: np.asarray(a) for name, a in arrays.items()}
        if images is not None:
            if len(images) != stop - start:
                raise InterpError(f"write got {len(images)} images for samples {start}..{stop - 1}")
            values |= {f"samples/{k}": v for k, v in image_rows(images).items()}
        for name, arr in values.items():
            f = IMAGE_FIELDS[name[8:]] if name.startswith("samples/") else self.fields[name]
            if arr.shape != (stop - start, *f.shape):
                raise InterpError(f"{name}: got shape {arr.shape} for samples {start}..{stop - 1}, "
                                  f"expected {(stop - start, *f.shape)}")
        dests = {name: self._index[name[8:]] if name.startswith("samples/") else self._arrays[name] for name in values}

        async def put() -> None:  # every array of the chunk at once: zarr compresses them on worker threads
            await asyncio.gather(*(d.async_array.setitem(slice(start, stop), values[n].astype(d.dtype, copy=False))
                                   for n, d in dests.items()))

        sync(put())
        self._done[start // cs] = True

    def close(self, summary: Mapping[str, Any] | None = None) -> bool:
        """Once every chunk is done: record ``summary`` (figures not part of the identity), mark the group
        complete and move a staged replacement into place. Returns whether the group is complete."""
        group = self._root[self.analysis]
        if not self._done[:].all():
            return False
        info = dict(group.attrs[GROUP_KEY])
        if not info["complete"]:
            info["summary"] = as_json(dict(summary or {}), "summary")
            info["complete"] = True
            group.attrs[GROUP_KEY] = info
        if self.staged:
            swap(self.staged, self.url, self.storage_options)
            self.staged = None
        return True

    def discard(self) -> None:
        """Remove what this writer laid out if no chunk was written (a failed start leaves nothing)."""
        if self._done[:].any() or not self.laid_out:
            return
        if self.laid_out == "store":
            remove(self.staged or self.url, self.storage_options)
        else:
            del self._root[self.analysis]

    def __enter__(self) -> StoreWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        if exc[0] is None:
            self.close()
