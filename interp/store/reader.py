"""One lazy reader for every store the suite writes: a labelled ``xarray.DataTree`` (dask arrays)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import xarray as xr
import zarr

from interp.errors import InterpError
from interp.store.layout import GROUP_KEY, check_layout, check_url, occupied, root_attrs, target


def open_store(url: str, *, allow_incomplete: bool = False, storage_options: dict | None = None) -> xr.DataTree:
    """Open a store lazily (nothing but the sample ids is read until computed).

    The root node is the sample index: dimension ``sample`` indexed by item id, coordinates for the
    string fields (``prompt``, ``answer``, ``image_path``, ...) and ``image``, data variables
    ``thumbnail`` and ``labels`` (with ``label`` names); ``attrs`` hold the layout and the data-set
    reference (``attrs["dataset"]["ref"]`` opens again with ``load_dataset``). Each analysis is a child
    node (``acts``, ``sweep/lm``, ``nast``...) whose ``sample`` dimension shares that index, so
    ``tree.sel(sample=item_id)`` selects one sample in every analysis at once; a node's ``attrs`` are
    its run metadata (model id, weight hash, config, summary figures).
    """
    check_url(url, storage_options)
    if not occupied(url, storage_options)[1]:
        raise InterpError(f"no store at {url}")
    info = check_layout(url, root_attrs(url, storage_options))
    zpath, opts = target(url, storage_options)
    root = zarr.open_group(zpath, mode="r", **opts)

    def part(group: str, **kw: Any) -> xr.Dataset:
        ds = xr.open_zarr(zpath, group=group, chunks={}, consolidated=False, zarr_format=3, mask_and_scale=False,
                          use_zarr_fill_value_as_mask=False, create_default_indexes=False, **opts, **kw)
        # numpy's StringDType as object: ``.astype(str)`` and comparisons then work as on any text array
        return ds.assign({v: ds[v].astype(object) for v in ds.variables if ds[v].dtype.kind == "T"})

    samples = part("samples")
    ids = samples["id"].values.astype(object)
    samples = samples.drop_vars("id").assign_coords(sample=ids)
    samples = samples.set_coords([v for v, a in samples.data_vars.items() if a.dtype.kind in "OUT" or v == "image"])
    if "labels" in samples:
        samples = samples.assign_coords(label=list(samples["labels"].attrs["names"]))
    nodes: dict[str, xr.Dataset] = {"/": samples.assign_attrs(info)}
    for name, group in root.groups():
        if name == "samples":
            continue
        gattrs = group.attrs.asdict().get(GROUP_KEY)
        if not isinstance(gattrs, dict):
            raise InterpError(f"store {url}: analysis {name!r} was interrupted while being laid out; rerun its command")
        done = group["done"][:]
        if not done.all() and not allow_incomplete:
            raise InterpError(f"store {url}: {name} is incomplete ({int(done.sum())} of {done.size} chunks); rerun "
                              "the command that writes it to resume, or open_store(..., allow_incomplete=True)")
        meta = {**gattrs["meta"], **gattrs["summary"], "complete": gattrs["complete"]}
        for path, node in _walk(name, group):
            rel = path[len(name) + 1:]
            ds = part(path, drop_variables=["done"])
            coords = [c.rpartition("/")[2] for c in gattrs["coords"] if c.rpartition("/")[0] == rel]
            order = [f.rpartition("/")[2] for f in gattrs["order"] if f.rpartition("/")[0] == rel]
            ds = ds.set_coords(coords + [v for v in ds.data_vars if "sample" not in ds[v].dims])
            ds = xr.Dataset({v: ds.variables[v] for v in order if v in ds.data_vars}, coords=ds.coords)
            for dim in [d for d in ds.dims if d in ds.variables and ds[d].dims == (d,)]:  # static labels: .sel(layer=3)
                ds = ds.set_xindex(dim)
            own = {k: v for k, v in node.attrs.asdict().items() if k != GROUP_KEY}
            ds.attrs = {**meta, **own}
            nodes[f"/{path}"] = ds
    return xr.DataTree.from_dict(nodes)


def join_stores(*urls: str, storage_options: dict | None = None) -> xr.DataTree:
    """Several stores of the same data set as one tree: the samples they share (in the first store's
    order), every analysis of each (a node present in two stores is an error)."""
    trees = [open_store(u, storage_options=storage_options) for u in urls]
    first = trees[0]
    for url, tree in zip(urls[1:], trees[1:]):
        if tree.attrs["dataset"].get("hash") != first.attrs["dataset"].get("hash"):
            raise InterpError(f"{url} was written from another data set than {urls[0]}: nothing to join on")
    shared = set.intersection(*(set(t["sample"].values) for t in trees))
    ids = [i for i in first["sample"].values if i in shared]
    if not ids:
        raise InterpError(f"stores {', '.join(urls)} share no sample")
    nodes: dict[str, xr.Dataset] = {"/": first.to_dataset().sel(sample=ids)}
    for url, tree in zip(urls, trees):
        rows = {i: k for k, i in enumerate(tree["sample"].values)}
        take = [rows[i] for i in ids]
        for node in tree.subtree:
            if node.is_root:
                continue
            if node.path in nodes:
                raise InterpError(f"{node.path} is in more than one of the joined stores (again in {url})")
            ds = node.to_dataset(inherit=False)
            nodes[node.path] = ds.isel(sample=take) if "sample" in ds.dims else ds
    return xr.DataTree.from_dict(nodes)


def _walk(path: str, group: zarr.Group) -> list[tuple[str, zarr.Group]]:
    out = [(path, group)]
    for name, sub in group.groups():
        out += _walk(f"{path}/{name}", sub)
    return out


def span_mask(ds: xr.Dataset | xr.DataTree, name: str) -> xr.DataArray:
    """Lazy bool [sample, position]: which positions lie in span ``name`` (from ``position_span``)."""
    names = ds["position_span"].attrs["names"] if "position_span" in ds.coords else []
    if name not in names:
        raise InterpError(f"span {name!r} not in this store; spans: {', '.join(names) or 'none'}")
    return (ds["position_span"] & (1 << names.index(name))) != 0


def dataset_of(tree: xr.DataTree) -> Any:
    """The data set the store's samples came from, opened again through ``load_dataset``."""
    from interp.data.catalog import load_dataset

    ref: Mapping[str, Any] = tree.attrs["dataset"]
    data = load_dataset(ref["ref"], ref.get("limit"))
    if data.hash != ref["hash"]:
        raise InterpError(f"data set {ref['ref']} has changed since the store was written (hash differs)")
    return data
