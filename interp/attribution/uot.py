"""MedFocus concept localisation by entropic unbalanced optimal transport (parity mode).

Each image becomes a measure on a grid: its pixel intensities, area-resampled and normalised to
mass 1, at the pixel centres ``(row + 0.5, col + 0.5) / size`` in [0, 1]^2. The cost is the squared
Euclidean distance divided by its 90th percentile. POT's stabilised unbalanced Sinkhorn (KL
regularisation, eps ``reg`` = 0.05, marginal penalty ``reg_m`` = 0.1) gives the plan; pixels of
zero intensity carry no mass and are left out of the solve (their plan rows and columns are 0,
exactly as in the full problem).

:func:`localise` picks the atlas reference of lowest transport cost to the query on a 14x14 grid,
transports it onto the query on a 56x56 grid (rows: reference pixels, columns: query pixels),
pushes each concept mask of the reference (area-resampled to the grid: a cell carries the
fraction of it the mask covers) through the plan and keeps the query pixels holding 75% of the
pushed mass. Plans are cached (:class:`PlanCache`).
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import zipfile
from collections import OrderedDict
from functools import lru_cache
from pathlib import Path
from typing import Sequence

import numpy as np
import ot

from interp.attribution.medfocus_atlas import Atlas
from interp.errors import InterpError

REG, REG_M = 0.05, 0.1
METHOD = "sinkhorn_stabilized"
SELECT_GRID, PLAN_GRID, MASS = 14, 56, 0.75
DEFAULT_CACHE_DIR = Path("~/.cache/interp/uot")


def _grey(image: np.ndarray) -> np.ndarray:
    """A finite, non-negative [H, W] or [H, W, C] image as float64 grey [H, W] (channel mean)."""
    x = np.asarray(image, dtype=np.float64)
    if x.ndim == 3:
        x = x.mean(axis=2)
    if x.ndim != 2 or min(x.shape) < 1:
        raise InterpError(f"image must be [H, W] or [H, W, C], got shape {list(np.shape(image))}")
    if not np.isfinite(x).all() or x.min() < 0:
        raise InterpError("image must be finite and non-negative")
    return x


@lru_cache(maxsize=16)
def _area_matrix(n_in: int, n_out: int) -> np.ndarray:
    """[n_out, n_in]: the fraction of each output cell covered by each input cell (rows sum to 1)."""
    e_in, e_out = np.linspace(0, 1, n_in + 1), np.linspace(0, 1, n_out + 1)
    overlap = np.minimum(e_out[1:, None], e_in[None, 1:]) - np.maximum(e_out[:-1, None], e_in[None, :-1])
    r = np.maximum(overlap, 0.0)
    return r / r.sum(axis=1, keepdims=True)


def area_resample(x: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """``x`` [H, W] resampled to ``shape`` by area averaging."""
    return _area_matrix(x.shape[0], shape[0]) @ x @ _area_matrix(x.shape[1], shape[1]).T


def _check_size(size: int) -> None:
    if not isinstance(size, (int, np.integer)) or size < 2:
        raise InterpError(f"grid size must be an integer >= 2, got {size!r}")


def _check_mass(mass: float) -> None:
    if not 0 < mass <= 1:
        raise InterpError(f"mass must be in (0, 1], got {mass}")


def grid_measure(image: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    """(weights [size*size] summing to 1, coords [size*size, 2] as (row, col) in [0, 1]), row-major."""
    _check_size(size)
    g = area_resample(_grey(image), (size, size)).ravel()
    if g.sum() <= 0:
        raise InterpError("image has no intensity: an all-zero image is not a measure")
    c = (np.arange(size) + 0.5) / size
    coords = np.stack(np.meshgrid(c, c, indexing="ij"), axis=-1).reshape(-1, 2)
    return g / g.sum(), coords


def cost_matrix(coords_a: np.ndarray, coords_b: np.ndarray) -> np.ndarray:
    """Squared Euclidean distances [len(a), len(b)] divided by their 90th percentile."""
    m = ot.dist(coords_a, coords_b, metric="sqeuclidean")
    q = np.quantile(m, 0.9)
    if q <= 0:
        raise InterpError("cost matrix: the 90th percentile of the distances is 0 (too few distinct points)")
    return m / q


@lru_cache(maxsize=2)
def _grid_cost(size: int) -> np.ndarray:
    """The (read-only) cost matrix between the cells of a size x size grid."""
    _, coords = grid_measure(np.ones((size, size)), size)
    m = cost_matrix(coords, coords)
    m.flags.writeable = False
    return m


def _kl_plan(a: np.ndarray, b: np.ndarray, m: np.ndarray, reg: float, logu: np.ndarray, logv: np.ndarray) -> np.ndarray:
    """The plan of POT's KL-regularised solvers from their log scalings (the same expression POT evaluates)."""
    m0 = m - reg * np.log(a[:, None] * b[None, :])
    return np.exp(logu[:, None] + logv[None, :] - m0 / reg)


class _Problem:
    """One transport problem on a grid, reduced to the pixels that carry mass."""

    def __init__(self, a_img: np.ndarray, b_img: np.ndarray, size: int, reg: float, reg_m: float):
        if not (reg > 0 and reg_m > 0):
            raise InterpError(f"reg and reg_m must be > 0, got {reg}, {reg_m}")
        (a, _), (b, _) = grid_measure(a_img, size), grid_measure(b_img, size)
        self.n, self.reg, self.reg_m = size * size, reg, reg_m
        self.rows, self.cols = np.flatnonzero(a), np.flatnonzero(b)
        self.weights = a, b
        self.a, self.b = a[self.rows], b[self.cols]
        self.m = _grid_cost(size)[np.ix_(self.rows, self.cols)]

    def solve(self) -> tuple[np.ndarray, dict]:
        """POT's plan on the support and its log (``cost``, ``total_cost``, ``logu``, ``logv``)."""
        return ot.unbalanced.sinkhorn_unbalanced(self.a, self.b, self.m, self.reg, self.reg_m, method=METHOD, log=True)

    def full(self, plan: np.ndarray) -> np.ndarray:
        """The support plan scattered into [size*size, size*size]."""
        out = np.zeros((self.n, self.n))
        out[np.ix_(self.rows, self.cols)] = plan
        return out


def transport(
    a_img: np.ndarray, b_img: np.ndarray, size: int, reg: float = REG, reg_m: float = REG_M
) -> tuple[np.ndarray, float]:
    """(plan [size^2, size^2] from ``a_img``'s pixels to ``b_img``'s, cost) by POT's stabilised solver.

    The cost is <plan, M>, what ``sinkhorn_unbalanced2`` returns by default. Not POT's
    ``returnCost="total"``: at the solver's fixed point its marginal KL terms cancel the rest
    (reg_m log(plan 1 / a) = -reg log u), so it is ~0 for every pair; the objective with the
    mass terms of the generalised KL is then (reg + 2 reg_m)(1 - plan mass), which ranks by
    transported mass alone.
    """
    p = _Problem(a_img, b_img, size, reg, reg_m)
    plan, log = p.solve()
    return p.full(plan), float(log["cost"])


def choose_reference(image: np.ndarray, atlas: Atlas, size: int = SELECT_GRID) -> tuple[int, np.ndarray]:
    """(index of the atlas reference of lowest transport cost to ``image``, costs [n]) on a size x size grid."""
    costs = np.array([transport(ref, image, size)[1] for ref in atlas.images])
    return int(np.argmin(costs)), costs


def push_mask(mask: np.ndarray, plan: np.ndarray) -> np.ndarray:
    """Mass on the plan's columns when each row i sends ``mask[i]`` along plan[i] in proportion to its entries."""
    rows = plan.sum(axis=1)
    share = np.divide(mask, rows, out=np.zeros_like(rows), where=rows > 0)
    return share @ plan


def mass_region(pushed: np.ndarray, mass: float = MASS) -> np.ndarray:
    """Bool mask of the fewest points, highest first, that hold a fraction ``mass`` of ``pushed``."""
    _check_mass(mass)
    order = np.argsort(-pushed, kind="stable")
    cum = np.cumsum(pushed[order])
    region = np.zeros(pushed.shape, bool)
    if cum[-1] > 0:
        region[order[: np.searchsorted(cum, mass * cum[-1]) + 1]] = True
    return region


class PlanCache:
    """Transport plans on disk (``directory``/KEY.npz, loaded with ``allow_pickle=False``) behind an
    in-memory LRU of ``memory`` entries.

    A plan is stored exactly, as the solver's log scalings (``logu``, ``logv``: two vectors instead
    of a dense [size^2, size^2] matrix; the plan is rebuilt from them and the two measures). A file
    that does not load (the zip's CRC-32 catches flipped bytes), names another key or holds arrays
    of the wrong shape is ignored and overwritten.
    """

    def __init__(self, directory: str | Path | None = None, memory: int = 16):
        self.directory = Path(directory if directory is not None else DEFAULT_CACHE_DIR).expanduser()
        self.memory = memory
        self._lru: OrderedDict[str, tuple[np.ndarray, np.ndarray]] = OrderedDict()

    def _file(self, key: str) -> Path:
        return self.directory / f"{key}.npz"

    def get(self, key: str, shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray] | None:
        """(logu [shape[0]], logv [shape[1]]) for ``key``, or None when absent or not trusted."""
        if key in self._lru:
            self._lru.move_to_end(key)
            return self._lru[key]
        try:
            with np.load(self._file(key), allow_pickle=False) as f:
                stored, logu, logv = str(f["key"]), f["logu"], f["logv"]
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):
            return None
        arrays = ((logu, shape[0]), (logv, shape[1]))
        if stored != key or not all(x.dtype == np.float64 and x.shape == (n,) and np.isfinite(x).all() for x, n in arrays):
            return None
        self._remember(key, (logu, logv))
        return logu, logv

    def put(self, key: str, logu: np.ndarray, logv: np.ndarray) -> None:
        """Store atomically (write a temporary file, then rename)."""
        self.directory.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.directory, suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                np.savez(f, key=np.array(key), logu=logu, logv=logv)
            os.replace(tmp, self._file(key))
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        self._remember(key, (logu, logv))

    def _remember(self, key: str, value: tuple[np.ndarray, np.ndarray]) -> None:
        self._lru[key] = value
        self._lru.move_to_end(key)
        while len(self._lru) > self.memory:
            self._lru.popitem(last=False)


@lru_cache(maxsize=8)
def plan_cache(directory: str | Path | None = None) -> PlanCache:
    """The process-wide cache of ``directory`` (default ``~/.cache/interp/uot``), so its LRU lives across calls."""
    return PlanCache(directory)


def _key(p: _Problem, ref_id: str, size: int) -> str:
    """Hash of the query on the grid, the reference (id and grid measure) and the parameters."""
    h = hashlib.sha256(json.dumps({"v": 1, "ref": ref_id, "size": size, "reg": p.reg, "reg_m": p.reg_m,
                                   "method": METHOD, "pot": ot.__version__}).encode())
    for w in p.weights:
        h.update(w.tobytes())
    return h.hexdigest()


def cached_plan(ref_img: np.ndarray, ref_id: str, image: np.ndarray, size: int, cache: PlanCache,
                reg: float = REG, reg_m: float = REG_M) -> np.ndarray:
    """The plan [size^2, size^2] from the reference to ``image``, from ``cache`` or solved and stored."""
    p = _Problem(ref_img, image, size, reg, reg_m)
    key = _key(p, ref_id, size)
    hit = cache.get(key, (len(p.rows), len(p.cols)))
    if hit is None:
        plan, log = p.solve()
        cache.put(key, log["logu"], log["logv"])
    else:
        plan = _kl_plan(p.a, p.b, p.m, p.reg, *hit)
    return p.full(plan)


def localise(
    image: np.ndarray,
    atlas: Atlas,
    concepts: Sequence[str] | None = None,
    grid: int = PLAN_GRID,
    mass: float = MASS,
    cache: PlanCache | str | Path | None = None,
    reg: float = REG,
    reg_m: float = REG_M,
) -> dict[str, np.ndarray]:
    """Concept name -> bool mask [H, W] of ``image`` (default: every atlas concept); ``reg`` and ``reg_m``
    of the plan (the reference is chosen with the published ones).

    The region is found on the grid x grid plan and mapped to the image's own pixels by nearest
    neighbour (each pixel takes the grid cell under its centre). ``cache``: a :class:`PlanCache`,
    or its directory (default ``~/.cache/interp/uot``).
    """
    img = _grey(image)
    _check_size(grid)
    names = tuple(atlas.concepts if concepts is None else concepts)
    unknown = [c for c in names if c not in atlas.masks]
    if unknown or not names:
        raise InterpError(f"unknown concepts {unknown}; the atlas has: {', '.join(atlas.concepts)}")
    _check_mass(mass)
    if not isinstance(cache, PlanCache):
        cache = plan_cache(cache)
    i, _ = choose_reference(img, atlas)
    plan = cached_plan(atlas.images[i], atlas.ids[i], img, grid, cache, reg, reg_m)
    rows, cols = (((np.arange(n) + 0.5) * grid / n).astype(int) for n in img.shape)
    out = {}
    for c in names:
        on_grid = area_resample(atlas.masks[c][i].astype(np.float64), (grid, grid)).ravel()
        region = mass_region(push_mask(on_grid, plan), mass).reshape(grid, grid)
        out[c] = region[np.ix_(rows, cols)]
    return out
