"""Zarr v3 activation store: a resumable, chunk-aligned writer and a lazy xarray reader.

Layout of one store (a Zarr v3 group)::

    zarr.json          attrs: schema_version, model_id, weight_hash, adapter, dataset_id,
                       dataset_hash, prompt_template (+ any extra meta), sites, dtype, code_version,
                       chunk_samples, n_samples, seq_len, complete
    acts/<site>        dtype [sample, position, d]; chunks (chunk_samples, all, all); zstd.
                       Array names are the site names verbatim (Zarr v3 allows dots).
                       Grid sites (vision, projector) carry attrs ``grid: [rows, cols]``, ``has_cls``.
    tokens             int32 [sample, position], pad -1
    position_kind      int8  [sample, position]: 0 pad, 1 bos/special, 2 image, 3 text, 4 query (attrs "codes")
    position_row/_col  int16 [sample, position]: patch row/col of image tokens, else -1
    position_span      optional uint16 [sample, position] bitmask: bit i set = in span attrs "names"[i]
    samples/<field>    variable-length UTF-8 strings [sample] (id, question, answer, ...)
    samples/labels     optional int8 [sample, label], label names in attrs "names"
    done               bool [chunk], one Zarr chunk per element, set after that chunk's arrays

Every array is chunked along samples by ``chunk_samples`` (``done`` by one), so writing one
sample chunk touches only that chunk's objects: workers that take disjoint chunks (e.g.
``writer.pending()[rank::world]``) need no lock, once the store exists (construct the writer
on one rank first; the others then open it and resume). A killed run rewrites at most the chunk
it was writing, and nothing nondeterministic is stored, so a resumed store ends byte-identical
to an uninterrupted one. Each array's ``dimension_names`` are what xarray shows: ``sample``,
``position`` (the text sequence, shared with ``tokens``), ``<tower>_position`` for other
position sets (e.g. ``vision_position`` = cls + patches) and ``<tower>_d``; a site that would
clash in size gets ``<site>_position`` / ``<site>_d``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

import fsspec
import numpy as np
import xarray as xr
import zarr
from fsspec.implementations.local import LocalFileSystem
from zarr.codecs import ZstdCodec

from interp import __version__
from interp.errors import InterpError
from interp.sites import parse

SCHEMA_VERSION = 1
REQUIRED_META = ("model_id", "weight_hash", "adapter", "dataset_id", "dataset_hash", "prompt_template")
IDENTITY = ("model_id", "weight_hash", "dataset_hash", "sites", "dtype", "prompt_template",
            "chunk_samples", "n_samples", "seq_len")
KIND_CODES = {"pad": 0, "special": 1, "image": 2, "text": 3, "query": 4}
DTYPES = ("float32", "float16")
POSITION_ARRAYS = {"tokens": ("int32", -1), "position_kind": ("int8", 0),
                   "position_row": ("int16", -1), "position_col": ("int16", -1)}
_INITIALIZING = {"interp_cache": "initializing"}  # root attrs until the layout is fully created
_COMPRESSOR = ZstdCodec(level=3)


def _exists(url: str, storage_options: dict | None) -> tuple[bool, bool]:
    """(something is at the path: a file or a non-empty folder, it holds a zarr.json) for any fsspec URL."""
    fs, path = fsspec.core.url_to_fs(url, **(storage_options or {}))
    occupied = fs.exists(path) and (not fs.isdir(path) or bool(fs.ls(path)))
    return occupied, occupied and fs.exists(f"{path.rstrip('/')}/zarr.json")


def remove_store(url: str, storage_options: dict | None = None) -> None:
    """Delete a store (any fsspec URL) if it exists."""
    fs, path = fsspec.core.url_to_fs(url, **(storage_options or {}))
    if fs.exists(path):
        fs.rm(path, recursive=True)


def _dims(site_shapes: Mapping[str, tuple[int, int]], grids: Mapping[str, tuple[int, int, bool]],
          seq_len: int) -> dict[str, tuple[str, str]]:
    """Per site (position dim, d dim): shared by sites of a tower whose sizes agree."""
    taken: dict[str, Any] = {"position": ("sequence", seq_len)}

    def claim(name: str, key: Any, fallback: str) -> str:
        return name if taken.setdefault(name, key) == key else fallback

    out = {}
    for site, (n_pos, d) in site_shapes.items():
        tower, grid = parse(site).tower, grids.get(site)
        pos = ("position" if grid is None and n_pos == seq_len
               else claim(f"{tower}_position", (n_pos, grid), f"{site}_position"))
        out[site] = (pos, claim(f"{tower}_d", d, f"{site}_d"))
    return out


class CacheWriter:
    """Create or resume a cache store and write it one sample chunk at a time.

    ``site_shapes`` maps site -> (positions, d) in execution order; ``site_grids`` maps grid
    sites to (rows, cols, has_cls); ``sample_fields`` maps a field (id, question, answer) to
    one string per sample; ``labels`` maps a label name to one int per sample; ``span_names``
    (at most 16) name the bits of ``position_span``. ``created`` tells whether this writer laid
    the store out (so a caller may remove it if it fails before any chunk). An existing
    store with the same identity (``IDENTITY`` keys) is resumed; any other is an error unless
    ``overwrite``.
    """

    def __init__(self, url: str, *, meta: Mapping[str, Any], site_shapes: Mapping[str, tuple[int, int]],
                 n_samples: int, seq_len: int, chunk_samples: int = 32, dtype: str = "float32",
                 sample_fields: Mapping[str, Sequence[str]] | None = None,
                 labels: Mapping[str, Sequence[int]] | None = None,
                 site_grids: Mapping[str, tuple[int, int, bool]] | None = None,
                 span_names: Sequence[str] | None = None, overwrite: bool = False,
                 storage_options: dict | None = None) -> None:
        missing = [k for k in REQUIRED_META if k not in meta]
        if missing:
            raise InterpError(f"cache meta lacks {', '.join(missing)}")
        if dtype not in DTYPES:
            raise InterpError(f"unsupported cache dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
        if n_samples < 1 or seq_len < 1 or chunk_samples < 1:
            raise InterpError(f"n_samples, seq_len and chunk_samples must be >= 1, got "
                              f"{n_samples}, {seq_len}, {chunk_samples}")
        if not site_shapes:
            raise InterpError("no sites to cache")
        grids = dict(site_grids or {})
        for site, (rows, cols, has_cls) in grids.items():
            if site not in site_shapes or site_shapes[site][0] != rows * cols + has_cls:
                raise InterpError(f"site {site}: positions {site_shapes.get(site, ('none',))[0]} do not fit grid "
                                  f"{rows}x{cols}{' + cls' if has_cls else ''}")
        if len(span_names or ()) > 16:
            raise InterpError(f"at most 16 span names fit position_span, got {len(span_names)}")
        for field, values in {**(sample_fields or {}), **(labels or {})}.items():
            if len(values) != n_samples:
                raise InterpError(f"sample field {field!r} has {len(values)} values for {n_samples} samples")
        self.url, self.n_samples, self.seq_len, self.chunk_samples = url, n_samples, seq_len, chunk_samples
        self.site_shapes = {s: (int(p), int(d)) for s, (p, d) in site_shapes.items()}
        self.dtype = dtype
        attrs = {"schema_version": SCHEMA_VERSION, **meta, "sites": list(self.site_shapes), "dtype": dtype,
                 "code_version": __version__, "chunk_samples": chunk_samples, "n_samples": n_samples,
                 "seq_len": seq_len, "complete": False}
        try:  # as stored: JSON types, so a resumed store compares equal
            self.attrs = json.loads(json.dumps(attrs))
        except TypeError as e:
            raise InterpError(f"cache meta must be JSON-serialisable: {e}") from None
        path_exists, is_zarr = _exists(url, storage_options)
        if path_exists and not is_zarr:
            raise InterpError(f"{url} exists and is not a Zarr store; choose another --out")
        fs, path = fsspec.core.url_to_fs(url, **(storage_options or {}))
        # local paths go to zarr's LocalStore, which makes folders (fsspec's local store does not)
        target, opts = ((path, {}) if isinstance(fs, LocalFileSystem)
                        else (url, {"storage_options": storage_options} if storage_options else {}))
        group = zarr.open_group(target, mode="r+", **opts) if is_zarr and not overwrite else None
        self.created = group is None or group.attrs.asdict() == _INITIALIZING
        if self.created:
            group = self._create(target, opts, grids, sample_fields or {}, labels or {}, list(span_names or ()))
        else:
            self._check_identity(group.attrs.asdict())
        self._group, self._done = group, group["done"]
        names = [*(f"acts/{site}" for site in self.site_shapes), *POSITION_ARRAYS, "position_span"]
        self._arrays = {name: group[name] for name in names if name in group}

    def _create(self, url: str, opts: dict, grids: Mapping[str, tuple[int, int, bool]],
                sample_fields: Mapping[str, Sequence[str]], labels: Mapping[str, Sequence[int]],
                span_names: list[str]) -> zarr.Group:
        """Lay out every array; the identity attrs go in last, marking the layout whole."""
        group = zarr.open_group(url, mode="w", attributes=dict(_INITIALIZING), **opts)  # zarr keeps the dict
        n, cs = self.n_samples, self.chunk_samples
        for site, (pos_dim, d_dim) in _dims(self.site_shapes, grids, self.seq_len).items():
            n_pos, d = self.site_shapes[site]
            rows, cols, has_cls = grids.get(site, (0, 0, False))
            group.create_array(f"acts/{site}", shape=(n, n_pos, d), chunks=(cs, n_pos, d), dtype=self.dtype,
                               fill_value=0, compressors=_COMPRESSOR, dimension_names=("sample", pos_dim, d_dim),
                               attributes={"grid": [rows, cols], "has_cls": has_cls} if site in grids else None)
        position_attrs = {"position_kind": {"codes": KIND_CODES}, "position_span": {"names": span_names}}
        for name, (dt, fill) in (POSITION_ARRAYS | ({"position_span": ("uint16", 0)} if span_names else {})).items():
            group.create_array(name, shape=(n, self.seq_len), chunks=(cs, self.seq_len), dtype=dt,
                               fill_value=fill, compressors=_COMPRESSOR, dimension_names=("sample", "position"),
                               attributes=position_attrs.get(name))
        group.create_array("done", shape=(-(-n // cs),), chunks=(1,), dtype="bool", fill_value=False,
                           compressors=None, dimension_names=("chunk",))
        samples = group.require_group("samples")
        for field, values in sample_fields.items():
            samples.create_array(field, shape=(n,), chunks=(cs,), dtype=str, compressors=_COMPRESSOR,
                                 dimension_names=("sample",))[:] = np.asarray(values, dtype=object)
        if labels:
            samples.create_array("labels", shape=(n, len(labels)), chunks=(cs, len(labels)), dtype="int8",
                                 fill_value=0, compressors=_COMPRESSOR, dimension_names=("sample", "label"),
                                 attributes={"names": list(labels)})[:] = np.stack(
                                     [np.asarray(v, dtype=np.int8) for v in labels.values()], axis=1)
        group.attrs.put(dict(self.attrs))
        return group

    def _check_identity(self, old: Mapping[str, Any]) -> None:
        if old.get("schema_version") != SCHEMA_VERSION:
            raise InterpError(f"{self.url} is not an interp cache store (schema_version "
                              f"{old.get('schema_version')!r}); use a new --out or --overwrite")
        for key in IDENTITY:
            if old.get(key) == self.attrs[key]:
                continue
            if key in ("model_id", "weight_hash"):
                why = (f"was written by model {old.get('model_id')} (hash {str(old.get('weight_hash'))[:12]}), "
                       f"not {self.attrs['model_id']} (hash {str(self.attrs['weight_hash'])[:12]})")
            else:
                why = f"has {key}={old.get(key)!r}, not {self.attrs[key]!r}"
            raise InterpError(f"store {self.url} {why}; use a new --out or --overwrite")

    def pending(self) -> list[range]:
        """Sample ranges (one per chunk, chunk-aligned) not yet written."""
        cs = self.chunk_samples
        return [range(i * cs, min((i + 1) * cs, self.n_samples)) for i in np.flatnonzero(~self._done[:])]

    def write(self, start: int, acts: Mapping[str, np.ndarray], tokens: np.ndarray, position_kind: np.ndarray,
              position_row: np.ndarray, position_col: np.ndarray, position_span: np.ndarray | None = None) -> None:
        """Write the whole chunk starting at ``start`` (the last one may be short), then mark it done.

        ``position_span`` is required exactly when the store was created with ``span_names``.
        """
        cs = self.chunk_samples
        if start % cs or not 0 <= start < self.n_samples:
            raise InterpError(f"chunk start {start} is not a multiple of {cs} within 0..{self.n_samples - 1}")
        stop = min(start + cs, self.n_samples)
        if set(acts) != set(self.site_shapes):
            raise InterpError(f"write got sites {sorted(acts)}, store has {sorted(self.site_shapes)}")
        expected = {f"acts/{s}": (stop - start, *shape) for s, shape in self.site_shapes.items()}
        values = {f"acts/{s}": np.asarray(a) for s, a in acts.items()}
        positions = dict(zip(POSITION_ARRAYS, (tokens, position_kind, position_row, position_col)))
        if (position_span is None) == ("position_span" in self._arrays):
            raise InterpError(f"position_span {'missing' if position_span is None else 'given'}: the store "
                              f"{'has' if position_span is None else 'has no'} span names")
        if position_span is not None:
            positions["position_span"] = position_span
        for name, arr in positions.items():
            expected[name], values[name] = (stop - start, self.seq_len), np.asarray(arr)
        for name, arr in values.items():
            if arr.shape != expected[name]:
                raise InterpError(f"{name}: got shape {arr.shape} for samples {start}..{stop - 1}, "
                                  f"expected {expected[name]}")
        for name, arr in values.items():
            self._arrays[name][start:stop] = arr.astype(self._arrays[name].dtype, copy=False)
        self._done[start // cs] = True

    def close(self) -> None:
        """Mark the store complete once every chunk is done (a no-op otherwise)."""
        if not self._group.attrs["complete"] and self._done[:].all():
            self._group.attrs["complete"] = True

    def __enter__(self) -> CacheWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def open_cache(url: str, *, allow_incomplete: bool = False, storage_options: dict | None = None) -> xr.Dataset:
    """Open a store lazily as one xarray Dataset (dask arrays; nothing is read until computed).

    Data variables are the sites (``ds["lm.blocks.0.resid_post"]``: sample x position x lm_d).
    Coordinates: ``tokens``, ``position_kind/_row/_col/_span`` (sample x position), ``sample_<field>``
    per sample field (``sample_id``, ``sample_question``, ...), ``sample_labels`` (sample x label,
    with ``label`` names), and for each grid position dim P static ``P_kind/_row/_col`` (cls:
    kind 1, row/col -1). ``ds.attrs`` is the store's meta.
    """
    if not _exists(url, storage_options)[1]:
        raise InterpError(f"no cache store at {url}")
    opts = {"storage_options": storage_options} if storage_options else {}
    attrs = zarr.open_group(url, mode="r", **opts).attrs.asdict()
    if attrs.get("schema_version") != SCHEMA_VERSION:
        raise InterpError(f"{url} is not an interp cache store")
    if not attrs["complete"] and not allow_incomplete:
        raise InterpError(f"store {url} is incomplete; resume it (python -m interp.cache --out {url}) "
                          "or open it with allow_incomplete=True")

    def part(group: str | None, **kw: Any) -> xr.Dataset:
        return xr.open_zarr(url, group=group, chunks={}, consolidated=False, zarr_format=3, mask_and_scale=False,
                            use_zarr_fill_value_as_mask=False, create_default_indexes=False, **opts, **kw)

    samples = part("samples")
    samples = samples.rename({v: f"sample_{v}" for v in samples.data_vars})
    if "sample_labels" in samples:
        samples = samples.assign_coords(label=samples["sample_labels"].attrs["names"])
    ds = xr.merge([part(None, drop_variables=["done"]), part("acts"), samples], combine_attrs="override", join="exact")
    ds = ds.set_coords([*POSITION_ARRAYS, *(["position_span"] if "position_span" in ds else []), *samples.data_vars])
    for site in attrs["sites"]:
        var = ds[site]
        if "grid" in var.attrs:
            dim, (rows, cols), has_cls = var.dims[1], var.attrs["grid"], int(var.attrs["has_cls"])
            patch, cls = np.arange(rows * cols), np.full(has_cls, -1)
            ds = ds.assign_coords({
                f"{dim}_kind": (dim, np.r_[np.full(has_cls, KIND_CODES["special"]),
                                          np.full(rows * cols, KIND_CODES["image"])].astype(np.int8)),
                f"{dim}_row": (dim, np.r_[cls, patch // cols].astype(np.int16)),
                f"{dim}_col": (dim, np.r_[cls, patch % cols].astype(np.int16))})
    return xr.Dataset({site: ds[site].variable for site in attrs["sites"]}, coords=ds.coords, attrs=attrs)


def span_mask(ds: xr.Dataset, name: str) -> xr.DataArray:
    """Lazy bool [sample, position]: which positions lie in span ``name`` (from ``position_span``)."""
    names = ds["position_span"].attrs["names"] if "position_span" in ds.coords else []
    if name not in names:
        raise InterpError(f"span {name!r} not in this cache; spans: {', '.join(names) or 'none'}")
    return (ds["position_span"] & (1 << names.index(name))) != 0
