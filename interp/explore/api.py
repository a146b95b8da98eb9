"""Lazy exploration of cached activations (a store's ``acts`` node): select, pool, project, compare; and,
per sample, what other analyses of the same samples hold (attribution maps, ground-truth masks, SAE
features, layer sweeps), from this store or further stores looked up by sample id.

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
    """One store's cached activations, by site name (``lm.blocks.0.resid_post``, ``projector.out``...).

    ``more``: further stores (attributions, a sweep, an SAE's ``features.zarr``...) whose analyses are
    looked up by sample id; ``sae``: an SAE checkpoint (``interp.sae``) whose features are computed on demand
    from this store's activations at its site, for samples no ``sae`` group holds."""

    def __init__(self, store: str | xr.DataTree, *more: str | xr.DataTree, sae: str | None = None) -> None:
        self.tree = open_store(store) if isinstance(store, str) else store
        if "acts" not in self.tree.children:
            raise InterpError("store has no cached activations (acts); write them with python -m interp.cache")
        self.acts = self.tree["acts"].to_dataset()
        self.ids = np.asarray(self.tree["sample"].values, dtype=object)
        self._row = {s: i for i, s in enumerate(self.ids)}
        self.urls = [u if isinstance(u, str) else None for u in (store, *more)]  # None: given as a tree
        others = [open_store(m) if isinstance(m, str) else m for m in more]
        self._trees = [(self.tree, self._row)] + [(t, {s: i for i, s in enumerate(t["sample"].values)}) for t in others]
        self._sizes: np.ndarray | None = None
        self._grids: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}
        self.sae_path, self.sae, self.sae_centre = sae, None, None
        if sae is not None:  # loaded now (sae_lens imports slowly): the first click is then as fast as the next
            from interp.sae.analysis import load_centre, load_sae

            self.sae, self.sae_centre = load_sae(sae), load_centre(sae)
            self.sae_site = str(self.sae.cfg.metadata.hook_name)
            if self.sae_site not in self.sites():
                raise InterpError(f"the SAE at {sae} reads {self.sae_site}, which this store does not cache; "
                                  f"sites: {', '.join(self.sites())}")

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
        return self.per_position(site, sample, np.sqrt((x.astype("float64") ** 2).sum(x.dims[-1])).rename(f"{site} norm"))

    def per_position(self, site: str, sample: str | int, values: xr.DataArray) -> xr.DataArray:
        """One sample's values over ``site``'s positions as a [row, col] grid of its image patches (grid
        sites) or over its valid tokens (sequence sites)."""
        pos = self._pos(site)
        if pos == "position":
            return values.isel(position=np.asarray(self.acts["valid"].isel(sample=self._one(sample))))
        order, rows, cols = self._grid(site)
        return xr.DataArray(values.data[order].reshape(len(rows), len(cols)), dims=("row", "col"),
                            coords={"row": rows, "col": cols, "sample": values["sample"]}, name=values.name)

    def patch_grid(self, site: str, sample: str | int) -> np.ndarray:
        """float64 [row, col, d]: one sample's activations at the image patches of grid site ``site``."""
        if self._pos(site) == "position":
            raise InterpError(f"{site} is a sequence site: it has no patch grid")
        order, rows, cols = self._grid(site)
        x = np.asarray(self.get(site, sample=self._one(sample)).values, dtype=np.float64)
        return x[order].reshape(len(rows), len(cols), -1)

    def _grid(self, site: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(image patch positions in row-major order, the grid's rows, its cols) of a grid site (static: read once)."""
        pos = self._pos(site)
        if pos not in self._grids:
            self._grids[pos] = self._read_grid(site, pos)
        return self._grids[pos]

    def _read_grid(self, site: str, pos: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        img = np.flatnonzero(np.asarray(self.acts[f"{pos}_kind"]) == IMAGE)
        r, c = (np.asarray(self.acts[f"{pos}_{a}"])[img] for a in ("row", "col"))
        rows, cols = np.unique(r), np.unique(c)
        if len(img) != len(rows) * len(cols):
            raise InterpError(f"{site}: image patches do not form a full grid")
        return img[np.lexsort((c, r))], rows, cols

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

    # other analyses of the same samples

    def find(self, group: str, sample: str | int) -> tuple[xr.DataTree, int] | None:
        """(the first store holding analysis ``group`` for ``sample``, the sample's row in it)."""
        sid = self.ids[self._one(sample)]
        return next(((t, rows[sid]) for t, rows in self._trees if group in t.children and sid in rows), None)

    def methods(self) -> list[str]:
        """Attribution methods any store holds, in the order they were run."""
        found = [t["attribution"].attrs.get("methods", {}) for t, _ in self._trees if "attribution" in t.children]
        return list(dict.fromkeys(m for methods in found for m in methods))

    def image_size(self, sample: str | int) -> tuple[int, int]:
        """(height, width) of the sample's image."""
        if self._sizes is None:  # [sample, 2], read once: every per-sample view asks for it
            self._sizes = np.stack([self.tree["image_height"].values, self.tree["image_width"].values], axis=1)
        h, w = self._sizes[self._one(sample)]
        return int(h), int(w)

    def attribution(self, method: str, sample: str | int) -> np.ndarray | None:
        """float32 [H, W]: ``method``'s map of the sample in its image's pixels (None: not stored)."""
        found = self.find("attribution", sample)
        if found is None or method not in found[0]["attribution"].children:
            return None
        (tree, row), (h, w) = found, self.image_size(sample)
        return tree["attribution"][method]["map"][row, :h, :w].values

    def truth(self, sample: str | int) -> np.ndarray | None:
        """bool [H, W]: the ground-truth mask of the sample's asked finding, where a store holds it."""
        found = self.find("attribution", sample)
        if found is None or "mask" not in found[0]["attribution"]:
            return None
        (tree, row), (h, w) = found, self.image_size(sample)
        return tree["attribution"]["mask"][row, :h, :w].values

    def sweep(self, sample: str | int) -> dict[str, xr.Dataset]:
        """The sample's layer sweep per tower (datasets with a one-long ``sample`` dim), where a store holds one."""
        found = self.find("sweep", sample)
        if found is None:
            return {}
        tree, row = found
        return {name: node.to_dataset().isel(sample=[row]) for name, node in tree["sweep"].children.items()}

    def features(self, sample: str | int) -> np.ndarray | None:
        """float [row, col, feature]: the SAE's features at each image patch of the sample, from a store's
        ``sae`` group (``features.zarr``), else computed with the SAE checkpoint (None: neither)."""
        found = self.find("sae", sample)
        if found is not None:
            tree, row = found
            codes = np.asarray(tree["sae"]["patch_acts"][row].values)
            side = int(np.sqrt(codes.shape[0]))
            return codes.reshape(side, side, -1) if side * side == codes.shape[0] else None
        if self.sae is None:
            return None
        import torch

        from interp.sae.metrics import encode

        x = self.patch_grid(self.sae_site, sample)
        centre = None
        if self.sae_centre is not None:  # the mean of each grid patch's position, in the grid's order
            mean, positions = self.sae_centre
            centre = mean[np.searchsorted(positions, self._grid(self.sae_site)[0])]
        with torch.no_grad():
            codes = encode(self.sae, torch.from_numpy(x.reshape(-1, x.shape[-1])), centre)
        return codes.float().numpy().reshape(*x.shape[:2], -1)

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
