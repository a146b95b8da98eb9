"""interp.explore against independent numpy computations on a small organism store; laziness; bad input."""

from __future__ import annotations

import dask.array as da
import numpy as np
import pytest

from interp.errors import InterpError
from interp.explore import Explorer

LM, VIS, PROJ = "lm.blocks.1.resid_post", "vision.blocks.0.resid_post", "projector.out"


@pytest.fixture(scope="module")
def ex(acts_store: str) -> Explorer:
    return Explorer(acts_store)


def arrays(ex: Explorer, site: str) -> tuple[np.ndarray, np.ndarray]:
    """(activations float64 [n, pos, d], bool mask [n, pos] of the positions that count), by plain numpy."""
    x = np.asarray(ex.acts[site].values, dtype=np.float64)
    if site.startswith("lm."):
        return x, np.asarray(ex.acts["valid"].values)
    kind = np.asarray(ex.acts[f"{ex.acts[site].dims[1]}_kind"].values)
    return x, np.broadcast_to(kind == 2, x.shape[:2])


def np_pool(ex: Explorer, site: str) -> np.ndarray:
    x, m = arrays(ex, site)
    return np.where(m[..., None], x, 0).sum(1) / m.sum(1, keepdims=True)


def test_sites_layer_get(ex):
    assert ex.sites("lm.*") == [f"lm.blocks.{i}.resid_post" for i in range(3)]
    assert ex.sites() == [*ex.sites("vision.*"), PROJ, *ex.sites("lm.*")]
    assert ex.layer("lm", "resid_post", 1) == LM
    full = ex.get(LM)
    assert isinstance(full.data, da.Array) and full.dims == ("sample", "position", "lm_d")
    sid = str(ex.ids[3])
    one = ex.get("lm", layer=1, sample=sid)
    np.testing.assert_array_equal(one.values, ex.acts[LM].values[3])
    np.testing.assert_array_equal(ex.get(LM, sample=[0, sid]).values, ex.acts[LM].values[[0, 3]])
    span = ex.get(LM, sample=sid, span="finding")
    want = (ex.acts["position_span"].values[3] & (1 << ex.acts["position_span"].attrs["names"].index("finding"))) != 0
    assert want.any() and isinstance(span.data, da.Array)
    np.testing.assert_array_equal(span.values, ex.acts[LM].values[3][want])
    assert set(span["token_text"].values) <= set(ex.acts["token_text"].values[3][want])
    many = ex.get(LM, span="finding").values
    assert np.isnan(many[3][~want]).all() and not np.isnan(many[3][want]).any()


def test_pool_is_lazy_and_exact(ex):
    for site in (LM, VIS, PROJ):
        p = ex.pool(site)
        assert isinstance(p.data, da.Array) and p.dims == ("sample", ex.acts[site].dims[-1])
        assert p.data.chunks[0] == (8, 8, 8)  # reduced chunk by chunk along samples
        np.testing.assert_allclose(p.values, np_pool(ex, site), rtol=1e-6)
    x, m = arrays(ex, LM)
    np.testing.assert_allclose(ex.pool(LM, "max").values, np.where(m[..., None], x, -np.inf).max(1), rtol=1e-6)


def test_patch_norms(ex):
    sid = str(ex.ids[5])
    grid = ex.patch_norms(VIS, sid)
    assert isinstance(grid.data, da.Array) and grid.dims == ("row", "col") and grid.shape == (8, 8)
    x = ex.acts[VIS].values[5].astype(np.float64)
    row, col = (ex.acts[f"vision_position_{a}"].values for a in ("row", "col"))
    want = np.zeros((8, 8))
    for p in np.flatnonzero(ex.acts["vision_position_kind"].values == 2):
        want[row[p], col[p]] = np.linalg.norm(x[p])
    np.testing.assert_allclose(grid.values, want, rtol=1e-6)
    seq = ex.patch_norms(LM, 5)
    valid = ex.acts["valid"].values[5]
    np.testing.assert_allclose(seq.values, np.linalg.norm(ex.acts[LM].values[5][valid].astype(np.float64), axis=1),
                               rtol=1e-6)
    np.testing.assert_array_equal(seq["token_text"].values, ex.acts["token_text"].values[5][valid])


@pytest.mark.parametrize("site", [LM, PROJ])
def test_mean_difference_and_project(ex, site):
    group = ex.tree["labels"].sel(label="pleural_effusion") == 1
    a = np.asarray(group.values)
    assert a.any() and (~a).any()
    md = ex.mean_difference(site, group, ~group)
    assert isinstance(md.data, da.Array)
    x, m = arrays(ex, site)
    want = x[a][m[a]].mean(0) - x[~a][m[~a]].mean(0)
    np.testing.assert_allclose(md.values, want, rtol=1e-6, atol=1e-9)
    proj = ex.project(site, md)
    assert isinstance(proj.data, da.Array) and proj.dims == ("sample", ex.acts[site].dims[1])
    ref = x @ (want / np.linalg.norm(want))
    if site == LM:
        ref = np.where(m, ref, np.nan)
    np.testing.assert_allclose(proj.values, ref, rtol=1e-5, atol=1e-6)


def test_mean_difference_span(ex):
    group = np.arange(24) % 2 == 0
    md = ex.mean_difference(LM, group, ~group, span="finding").values
    x, valid = arrays(ex, LM)
    bit = 1 << ex.acts["position_span"].attrs["names"].index("finding")
    m = valid & ((ex.acts["position_span"].values & bit) != 0)
    np.testing.assert_allclose(md, x[group][m[group]].mean(0) - x[~group][m[~group]].mean(0), rtol=1e-6, atol=1e-9)


def test_nearest_matches_brute_force(ex):
    p = np_pool(ex, PROJ)
    for q in (0, 7, 23):
        near = ex.nearest(PROJ, str(ex.ids[q]), k=5)
        sims = np.array([p[q] @ v / np.linalg.norm(p[q]) / np.linalg.norm(v) for v in p])
        order = [i for i in np.argsort(-sims, kind="stable") if i != q][:5]
        assert ex.ids[q] not in near["sample"].values
        assert list(near["sample"].values) == list(ex.ids[order])
        np.testing.assert_allclose(near.values, sims[order], rtol=1e-9)
    assert len(ex.nearest(LM, 0, k=100)) == 23


def test_pca_matches_numpy_svd(ex):
    res = ex.pca(LM, n_components=3)
    assert isinstance(res["scores"].data, da.Array)
    ev = res["explained_variance"].values
    assert (np.diff(ev) <= 0).all() and (res["explained_variance_ratio"].values <= 1).all()
    xc = np_pool(ex, LM)
    xc = xc - xc.mean(0)
    _, s, vt = np.linalg.svd(xc, full_matrices=False)
    np.testing.assert_allclose(ev, s[:3] ** 2 / (len(xc) - 1), rtol=1e-6)
    np.testing.assert_allclose(res["explained_variance_ratio"].values, s[:3] ** 2 / (s ** 2).sum(), rtol=1e-6)
    signs = np.sign((res["components"].values * vt[:3]).sum(1))
    np.testing.assert_allclose(res["components"].values, vt[:3] * signs[:, None], atol=1e-6)
    np.testing.assert_allclose(res["scores"].values, (xc @ vt[:3].T) * signs, atol=1e-6)


@pytest.mark.parametrize("call", [
    lambda e: e.get("lm.blocks.9.resid_post"),
    lambda e: e.sites() and e.pool("nope"),
    lambda e: e.get(LM, span="nope"),
    lambda e: e.get(VIS, span="finding"),
    lambda e: e.get(LM, sample="no-such-item"),
    lambda e: e.get(LM, sample=24),
    lambda e: e.nearest(LM, [0, 1]),
    lambda e: e.nearest(LM, 0, k=0),
    lambda e: e.pool(LM, "median"),
    lambda e: e.project(LM, np.ones(3)),
    lambda e: e.project(LM, np.zeros(64)),
    lambda e: e.mean_difference(LM, np.ones(24, bool), np.zeros(24, bool)),
    lambda e: e.mean_difference(LM, np.ones(5, bool), np.ones(5, bool)),
    lambda e: e.pca(LM, n_components=0),
    lambda e: e.patch_norms(LM, "no-such-item"),
])
def test_bad_input(ex, call):
    with pytest.raises(InterpError) as err:
        call(ex)
    assert "\n" not in str(err.value) and str(err.value)


def test_no_acts(tmp_path):
    import xarray as xr

    with pytest.raises(InterpError, match="no cached activations"):
        Explorer(xr.DataTree())
