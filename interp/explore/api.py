"""Lazy exploration of cached activations (a store's ``acts`` node): select, pool, project, compare.

Every result is an ``xarray`` object backed by dask until computed, so stores larger than RAM work:
reductions run chunk by chunk along ``sample``; the most ever held at once is ``[n_samples, d]``
pooled vectors (``nearest``) or a ``[d, d]`` covariance (``pca``).

Positions that count ("valid"): for sequence sites (dim ``position``) the non-pad tokens, optionally
only those in a named span; for grid sites (``vision_position``, ``projector_position``) the image
patches (the CLS token and other specials are left out).
"""

from __future__ import annotations

from collections.abc import Sequence
from fnmatch import fnmatch
from typing import Any

import dask.array as da
import numpy as np
import xarray as xr

from interp.errors import InterpError
from interp.store import open_store, span_mask

IMAGE = 2  # position_kind code of image patches (interp.cache.acts.KIND_CODES)
SampleSel = str | int | Sequence[str | int] | None


class Explorer:
    """One store's cached activations, by site name (``lm.blocks.0.resid_post``, ``projector.out``...)."""

    def __init__(self, store: str | xr.DataTree) -> None:
        self.tree = open_store(store) if isinstance(store, str) else store
        if "acts" not in self.tree.children:
            raise InterpError("store has no cached activations (acts); write them with python -m interp.cache")
        self.acts = self.tree["acts"].to_dataset()
        self.ids = np.asarray(self.tree["sample"].values, dtype=object)
        self._row = {s: i for i, s in enumerate(self.ids)}

    # selection

    def sites(self, glob: str = "*") -> list[str]:
        """Site names matching ``glob`` (fnmatch), in store order."""
        return [s for s in self.acts.data_vars if "sample" in self.acts[s].dims and fnmatch(s, glob)]

    @staticmethod
    def layer(tower: str, point: str, layer: int) -> str:
        """The site name of ``point`` in block ``layer`` of ``tower``: ``lm.blocks.3.resid_post``."""
        return f"{tower}.blocks.{layer}.{point}"

    def get(self, site: str, layer: int | None = None, sample: SampleSel = None,
            span: str | None = None) -> xr.DataArray:
        """Activations of ``site`` (with ``layer``: ``site`` is a tower, or ``tower.point``, default point
        resid_post). ``sample``: item id(s) or row(s); a single one drops the dim. ``span``: positions outside
        the span are NaN (dropped for a single sample)."""
        if layer is not None:
            tower, _, point = site.partition(".")
            site = self.layer(tower, point or "resid_post", layer)
        rows = self._rows(sample)
        x = self._site(site).isel(sample=rows)
        if span is None:
            return x
        m = self._span(site, span).isel(sample=rows)
        return x.where(m).isel(position=np.asarray(m)) if isinstance(rows, int) else x.where(m)

    def mask(self, site: str, span: str | None = None) -> xr.DataArray:
        """Lazy bool [sample, position] (sequence) or [position] (grid): the positions that count."""
        if span is not None:
            return self._span(site, span)
        pos = self._pos(site)
        return self.acts["valid"] if pos == "position" else self.acts[f"{pos}_kind"] == IMAGE

    def pool(self, site: str, how: str = "mean", span: str | None = None) -> xr.DataArray:
        """Lazy [sample, d] float64: mean or max of ``site`` over the positions that count."""
        x, m, pos = self._site(site).astype("float64"), self.mask(site, span), self._pos(site)
        if how == "mean":
            return x.where(m).sum(pos) / m.sum(pos)
        if how == "max":
            return x.where(m).max(pos)
        raise InterpError(f"unknown pool {how!r}; use mean or max")

    # per-sample views

    def patch_norms(self, site: str, sample: str | int) -> xr.DataArray:
        """L2 norm per position of one sample: [row, col] for grid sites, [position] (valid tokens, with
        ``token_text``) for sequence sites."""
        x = self.get(site, sample=self._one(sample))
        norms = np.sqrt((x.astype("float64") ** 2).sum(x.dims[-1]))
        pos = self._pos(site)
        if pos == "position":
            return norms.isel(position=np.asarray(self.acts["valid"].isel(sample=self._one(sample))))
        img = np.flatnonzero(np.asarray(self.acts[f"{pos}_kind"]) == IMAGE)
        r, c = (np.asarray(self.acts[f"{pos}_{a}"])[img] for a in ("row", "col"))
        rows, cols = np.unique(r), np.unique(c)
        if len(img) != len(rows) * len(cols):
            raise InterpError(f"{site}: image patches do not form a full grid")
        order = img[np.lexsort((c, r))]
        return xr.DataArray(norms.data[order].reshape(len(rows), len(cols)), dims=("row", "col"),
                            coords={"row": rows, "col": cols, "sample": norms["sample"]}, name=f"{site} norm")

    # directions

    def mean_difference(self, site: str, group_a: Any, group_b: Any, span: str | None = None) -> xr.DataArray:
        """Lazy [d]: mean activation over the (sample, position) pairs of group a minus that of group b.
        Groups are bool masks on the sample index (e.g. ``tree["labels"].sel(label=...) == 1``); positions
        are those that count (image patches for grid sites, valid tokens or ``span`` for sequence sites)."""
        x, m, pos = self._site(site).astype("float64"), self.mask(site, span), self._pos(site)
        d = x.dims[-1]

        def mean(group: Any, name: str) -> xr.DataArray:
            xs = x.isel(sample=np.flatnonzero(self._group(group, name)))
            return xs.where(m).sum(("sample", pos)) / (m * xr.ones_like(xs.isel({d: 0}))).sum()

        return (mean(group_a, "group_a") - mean(group_b, "group_b")).rename(f"{site} mean difference")

    def project(self, site: str, direction: Any) -> xr.DataArray:
        """Lazy [sample, position]: projections of ``site`` onto ``direction`` (any length-d vector: a probe
        weight, an SAE decoder row, a ``mean_difference``), scaled to unit norm. Pads are NaN."""
        x = self._site(site)
        d = x.dims[-1]
        u = np.asarray(direction, dtype="float64").ravel()
        if u.shape != (x.sizes[d],) or not np.isfinite(u).all() or not np.linalg.norm(u):
            raise InterpError(f"direction must be a finite non-zero vector of length {x.sizes[d]} for {site}; "
                              f"got shape {np.shape(direction)}")
        p = xr.dot(x.astype("float64"), xr.DataArray(u / np.linalg.norm(u), dims=d), dim=d)
        return (p.where(self.acts["valid"]) if self._pos(site) == "position" else p).rename(f"{site} projection")

    # across samples

    def nearest(self, site: str, sample: str | int, k: int = 5, pool: str = "mean",
                span: str | None = None) -> xr.DataArray:
        """The ``k`` other samples most cosine-similar to ``sample`` by pooled activation: similarity [sample]
        (item ids), best first. Pooling runs chunk-wise with dask; only [n_samples, d] is computed."""
        if k < 1:
            raise InterpError(f"k must be at least 1, got {k}")
        q = self._one(sample)
        p = self.pool(site, pool, span).values
        p = p / np.maximum(np.linalg.norm(p, axis=1, keepdims=True), 1e-12)
        sim = p @ p[q]
        sim[q] = -np.inf
        top = np.argsort(-sim, kind="stable")[:min(k, len(sim) - 1)]
        return xr.DataArray(sim[top], dims="sample", coords={"sample": self.ids[top]}, name=f"{site} cosine")

    def pca(self, site: str, n_components: int = 3, pool: str = "mean", span: str | None = None) -> xr.Dataset:
        """PCA of pooled activations by exact covariance: ``Xcᵀ Xc`` is summed chunk by chunk along samples
        with dask ([d, d] in memory), then ``numpy.linalg.eigh``. Returns ``components`` [component, d] (sign:
        largest loading positive), ``explained_variance(_ratio)`` [component], lazy ``scores`` [sample, component]."""
        p = self.pool(site, pool, span)
        n, d = p.shape
        if not 1 <= n_components <= min(n - 1, d):
            raise InterpError(f"n_components must be between 1 and {min(n - 1, d)}, got {n_components}")
        x = p.data - p.data.mean(axis=0)
        vals, vecs = np.linalg.eigh(da.compute(x.T @ x)[0] / (n - 1))
        vals, vecs = vals[::-1], vecs[:, ::-1].T[:n_components]
        vecs *= np.sign(vecs[np.arange(n_components), np.abs(vecs).argmax(1)])[:, None]
        comp = np.arange(n_components)
        return xr.Dataset(
            {"components": (("component", p.dims[1]), vecs), "explained_variance": ("component", vals[:n_components]),
             "explained_variance_ratio": ("component", vals[:n_components] / vals.sum()),
             "scores": (("sample", "component"), x @ vecs.T)},
            coords={"component": comp, "sample": p["sample"]}, attrs={"site": site, "pool": pool})

    # checks

    def _site(self, site: str) -> xr.DataArray:
        if site not in self.sites():
            raise InterpError(f"unknown site {site!r}; sites: {', '.join(self.sites())}")
        return self.acts[site]

    def _pos(self, site: str) -> str:
        return self._site(site).dims[1]

    def _span(self, site: str, span: str) -> xr.DataArray:
        if self._pos(site) != "position":
            raise InterpError(f"spans apply to sequence sites; {site} is a grid site")
        return span_mask(self.acts, span) & self.acts["valid"]

    def _rows(self, sample: SampleSel) -> int | list[int] | slice:
        if sample is None:
            return slice(None)
        if isinstance(sample, (str, int, np.integer)):
            if isinstance(sample, str):
                if sample not in self._row:
                    raise InterpError(f"unknown sample {sample!r} (not in the store's {len(self.ids)} samples)")
                return self._row[sample]
            if not -len(self.ids) <= sample < len(self.ids):
                raise InterpError(f"sample row {sample} out of range for {len(self.ids)} samples")
            return int(sample) % len(self.ids)
        return [self._rows(s) for s in sample]  # type: ignore[misc]

    def _one(self, sample: str | int) -> int:
        row = self._rows(sample)
        if not isinstance(row, int):
            raise InterpError(f"expected one sample (an item id or a row), got {sample!r}")
        return row

    def _group(self, group: Any, name: str) -> np.ndarray:
        g = np.asarray(group.values if isinstance(group, xr.DataArray) else group)
        if g.dtype != bool or g.shape != self.ids.shape:
            raise InterpError(f"{name} must be a bool mask over the {len(self.ids)} samples; got {g.dtype} {g.shape}")
        if not g.any():
            raise InterpError(f"{name} selects no sample")
        return g
