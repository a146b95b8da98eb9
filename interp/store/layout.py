"""The results store's layout (version 2) and the fsspec plumbing shared by its writer and reader.

One store is a Zarr v3 group::

    zarr.json            attrs["interp_store"]: layout, n_samples, chunk_samples, sample_hash, dataset
                         ({ref, limit, name, hash}: ``load_dataset(ref, limit)`` opens it again), code_version
    samples/id           the sample index, vlen UTF-8 [sample] (item ids), plus prompt, answer, image_path,
                         spans (JSON) and any other field; image (int32 index into the data set's images);
                         image_height/_width; thumbnail uint8 [sample, 64, 64] (top-left, aspect kept);
                         labels int8 [sample, label] (attrs "names") where known
    <analysis>/...       one group per analysis (``acts`` for cached activations, ``sweep/<tower>`` for a
                         layer sweep, ``nast`` for CTE, ...): arrays [sample, ...] chunked like the index,
                         static arrays without a sample axis, attrs["interp_group"]: meta (model id, weight
                         hash, adapter, sites, code version, full config), coords (names the reader sets as
                         coordinates), identity, complete
    <analysis>/done      bool [chunk], set after that chunk's arrays (of every group of the analysis)

Everything is chunked along samples by ``chunk_samples``: writers that take disjoint chunks need no
lock. Strings are variable-length (no unstable-dtype warnings).
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import fsspec
import zarr
from fsspec.implementations.local import LocalFileSystem
from zarr.codecs import ZstdCodec

from interp.errors import InterpError

LAYOUT = 2
ROOT_KEY, GROUP_KEY = "interp_store", "interp_group"
INITIALIZING = {"interp_store": "initializing"}  # root / group attrs until the layout is whole
COMPRESSOR = ZstdCodec(level=3)
THUMBNAIL = 64


@dataclass(frozen=True)
class Field:
    """One per-sample array: the shape and dimension names after the sample axis."""

    shape: tuple[int, ...]
    dims: tuple[str, ...]
    dtype: str  # a numpy dtype name, or "str" for variable-length UTF-8
    fill: Any = 0
    attrs: dict = field(default_factory=dict)
    coord: bool = False  # the reader sets it as a coordinate, not a data variable

    def __post_init__(self) -> None:
        if len(self.shape) != len(self.dims):
            raise InterpError(f"field shape {self.shape} does not match dims {self.dims}")

    def spec(self) -> dict:
        return {"shape": list(self.shape), "dims": list(self.dims), "dtype": self.dtype, "fill": self.fill}


def as_json(value: Any, what: str) -> Any:
    """``value`` as stored in attributes (JSON types), so a resumed store compares equal."""
    try:
        return json.loads(json.dumps(value))
    except (TypeError, ValueError) as e:
        raise InterpError(f"{what} must be JSON-serialisable: {e}") from None


def digest(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()


def target(url: str, storage_options: dict | None) -> tuple[str, dict]:
    """(what zarr opens, its kwargs): local paths go to zarr's LocalStore (it makes folders), URLs to fsspec."""
    fs, path = fsspec.core.url_to_fs(url, **(storage_options or {}))
    if isinstance(fs, LocalFileSystem):
        return path, {}
    return url, ({"storage_options": storage_options} if storage_options else {})


def check_url(url: str, storage_options: dict | None = None) -> None:
    """A clear error for an fsspec protocol this environment cannot write or read."""
    try:
        fsspec.core.url_to_fs(url, **(storage_options or {}))
    except (ValueError, ImportError) as e:
        raise InterpError(f"cannot open {url}: {e}") from None


def occupied(url: str, storage_options: dict | None) -> tuple[bool, bool]:
    """(something is at the path: a file or a non-empty folder, it holds a zarr.json)."""
    fs, path = fsspec.core.url_to_fs(url, **(storage_options or {}))
    taken = fs.exists(path) and (not fs.isdir(path) or bool(fs.ls(path)))
    return taken, taken and fs.exists(f"{path.rstrip('/')}/zarr.json")


def remove(url: str, storage_options: dict | None = None) -> None:
    """Delete whatever is at ``url`` (any fsspec URL)."""
    fs, path = fsspec.core.url_to_fs(url, **(storage_options or {}))
    if fs.exists(path):
        fs.rm(path, recursive=True)


def sibling(url: str, suffix: str) -> str:
    """A hidden sibling of ``url`` (``dir/.name<suffix>``): where a replacement is staged."""
    head, _, name = url.rstrip("/").rpartition("/")
    return f"{head}/.{name}{suffix}" if head else f".{name}{suffix}"


def swap(staged: str, url: str, storage_options: dict | None) -> None:
    """Move a finished staged store into place, then drop what it replaces."""
    fs, src = fsspec.core.url_to_fs(staged, **(storage_options or {}))
    dst = fs._strip_protocol(url)
    old = fs._strip_protocol(sibling(url, ".old"))
    if fs.exists(old):
        fs.rm(old, recursive=True)
    if fs.exists(dst):
        fs.mv(dst, old, recursive=True)
    fs.mv(src, dst, recursive=True)
    if fs.exists(old):
        fs.rm(old, recursive=True)


def root_attrs(url: str, storage_options: dict | None) -> Mapping[str, Any]:
    where, opts = target(url, storage_options)
    return zarr.open_group(where, mode="r", **opts).attrs.asdict()


def check_layout(url: str, attrs: Mapping[str, Any]) -> dict:
    """The store's ``interp_store`` attrs; a clear error for other layouts."""
    info = attrs.get(ROOT_KEY)
    if isinstance(info, dict) and info.get("layout") == LAYOUT:
        return info
    if info == INITIALIZING[ROOT_KEY]:
        raise InterpError(f"store {url} was interrupted while being laid out; rerun the command that writes it")
    if "schema_version" in attrs:
        raise InterpError(f"store {url} has the activation-cache layout version {attrs['schema_version']} "
                          f"(before the results store); this interp reads layout {LAYOUT}: re-create it with "
                          "python -m interp.cache --overwrite")
    found = info.get("layout") if isinstance(info, dict) else None
    raise InterpError(f"{url} is not an interp results store of layout {LAYOUT}"
                      + (f" (it has layout {found})" if found is not None else ""))


@contextmanager
def layout_lock(url: str, storage_options: dict | None, wait_s: float = 600.0) -> Iterator[None]:
    """Hold ``.name.lock`` beside a local store while it is opened or laid out, so that two writers
    started together do not lay it out twice (the second then resumes what the first laid out).
    A lock left by a process that no longer runs is taken over. Other fsspec stores: no lock."""
    fs, path = fsspec.core.url_to_fs(url, **(storage_options or {}))
    if not isinstance(fs, LocalFileSystem):
        yield
        return
    lock = Path(sibling(path, ".lock"))
    lock.parent.mkdir(parents=True, exist_ok=True)
    deadline = time.monotonic() + wait_s
    while True:
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            break
        except FileExistsError:
            if not _alive(lock):
                lock.unlink(missing_ok=True)
                continue
            if time.monotonic() > deadline:
                raise InterpError(f"another writer has held {lock} for {wait_s:.0f} s; remove it if none runs") from None
            time.sleep(0.05)
    try:
        os.write(fd, str(os.getpid()).encode())
        os.close(fd)
        yield
    finally:
        lock.unlink(missing_ok=True)


def _alive(lock: Path) -> bool:
    """Whether the process named in a lock file still runs (an empty file: being written, so yes)."""
    try:
        text = lock.read_text().strip()
        if not text:
            return True
        os.kill(int(text), 0)
    except ProcessLookupError:
        return False
    except (FileNotFoundError, ValueError, PermissionError):
        return True
    return True
