"""Cache store: exact round trip, layout, byte-identical resume, identity checks, lazy reads."""

from __future__ import annotations

import json
from pathlib import Path

import dask
import dask.array as da
import numpy as np
import pytest
import zarr

from interp.cache import CacheWriter, open_cache, span_mask
from interp.cache.store import _INITIALIZING
from interp.errors import InterpError

N, SEQ, CS = 10, 7, 4
SHAPES = {"vision.blocks.0.resid_post": (5, 8), "projector.out": (4, 6), "lm.blocks.0.resid_post": (SEQ, 6)}
GRIDS = {"vision.blocks.0.resid_post": (2, 2, True), "projector.out": (2, 2, False)}
META = {"model_id": "tiny", "weight_hash": "w0", "adapter": "llava", "dataset_id": "synthetic",
        "dataset_hash": "d0", "prompt_template": "{question}"}
IDS = [f"s{i}" for i in range(N)]
LABELS = {"effusion": [i % 2 for i in range(N)], "nodule": [i % 3 == 0 for i in range(N)]}


def writer(path: Path, **over) -> CacheWriter:
    kw = dict(meta=META, site_shapes=SHAPES, n_samples=N, seq_len=SEQ, chunk_samples=CS, site_grids=GRIDS,
              sample_fields={"id": IDS, "question": [f"q {i}?" for i in range(N)]}, labels=LABELS,
              span_names=["image", "question"])
    return CacheWriter(str(path), **{**kw, **over})


def chunk(r: range) -> dict:
    """Deterministic synthetic values for samples ``r`` (an independent reference for reads)."""
    rng = np.random.default_rng(r.start)
    b = len(r)
    return {"acts": {s: rng.standard_normal((b, *shape)).astype(np.float32) for s, shape in SHAPES.items()},
            "tokens": rng.integers(-1, 50, (b, SEQ)), "position_kind": rng.integers(0, 4, (b, SEQ)),
            "position_row": rng.integers(-1, 2, (b, SEQ)), "position_col": rng.integers(-1, 2, (b, SEQ)),
            "position_span": rng.integers(0, 4, (b, SEQ))}


def reference(name: str, site: str | None = None) -> np.ndarray:
    """All samples of one array (``acts`` with ``site``) as written by ``fill``."""
    parts = [chunk(range(s, min(s + CS, N))) for s in range(0, N, CS)]
    return np.concatenate([p[name][site] if site else p[name] for p in parts])


def fill(w: CacheWriter, ranges=None) -> None:
    for r in ranges if ranges is not None else w.pending():
        w.write(r.start, **chunk(r))


def files(path: Path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


@pytest.fixture
def full(tmp_path: Path) -> Path:
    with writer(tmp_path / "full.zarr") as w:
        fill(w)
    return tmp_path / "full.zarr"


def test_round_trip_exact(full: Path) -> None:
    ds = open_cache(str(full))
    for site in SHAPES:
        np.testing.assert_array_equal(ds[site].values, reference("acts", site))
    for name in ("tokens", "position_kind", "position_row", "position_col", "position_span"):
        np.testing.assert_array_equal(ds[name].values, reference(name))
    assert list(ds.data_vars) == list(SHAPES) and ds["lm.blocks.0.resid_post"].dims == ("sample", "position", "lm_d")
    assert ds["sample_id"].values.tolist() == IDS
    assert ds["sample_labels"].sel(label="effusion").values.tolist() == LABELS["effusion"]
    np.testing.assert_array_equal(span_mask(ds, "question").values, (ds["position_span"].values & 2) != 0)
    assert ds["vision_position_row"].values.tolist() == [-1, 0, 0, 1, 1]
    assert ds["projector_position_col"].values.tolist() == [0, 1, 0, 1]
    assert {k: ds.attrs[k] for k in META} == META and ds.attrs["complete"] and ds.attrs["sites"] == list(SHAPES)


def test_fsspec_url() -> None:
    url = "memory://interp-test/c.zarr"
    with writer(url, overwrite=True) as w:
        fill(w)
    ds = open_cache(url)
    assert isinstance(ds["projector.out"].data, da.Array)
    np.testing.assert_array_equal(ds["projector.out"].values, reference("acts", "projector.out"))


def test_chunk_layout_and_codec(full: Path) -> None:
    for site, (p, d) in SHAPES.items():
        meta = json.loads((full / "acts" / site / "zarr.json").read_text())
        assert meta["chunk_grid"]["configuration"]["chunk_shape"] == [CS, p, d]
        assert "zstd" in [c["name"] for c in meta["codecs"]]
    assert json.loads((full / "done" / "zarr.json").read_text())["chunk_grid"]["configuration"]["chunk_shape"] == [1]
    assert json.loads((full / "acts" / "vision.blocks.0.resid_post" / "zarr.json").read_text())["attributes"] == {
        "grid": [2, 2], "has_cls": True}


def test_resume_after_kill_is_byte_identical(tmp_path: Path, full: Path) -> None:
    path = tmp_path / "resumed.zarr"
    zarr.open_group(str(path), mode="w", attributes=dict(_INITIALIZING))  # killed while laying out: relaid
    w = writer(path)
    assert w.created
    fill(w, w.pending()[:1])
    zarr.open_array(str(path / "acts" / "projector.out"), mode="r+")[CS:2 * CS] = 7.0  # killed mid-chunk 1
    del w
    with pytest.raises(InterpError, match="incomplete"):
        open_cache(str(path))
    assert open_cache(str(path), allow_incomplete=True).attrs["complete"] is False
    w = writer(path)
    assert not w.created and w.pending() == [range(CS, 2 * CS), range(2 * CS, N)]
    fill(w)
    w.close()
    assert files(path) == files(full)


def test_parallel_disjoint_chunks(tmp_path: Path, full: Path) -> None:
    path = tmp_path / "par.zarr"
    first = writer(path)
    second = writer(path)  # a second rank opens the store the first created
    ranges = first.pending()
    fill(second, ranges[1::2])
    fill(first, ranges[0::2])
    first.close()
    assert files(path) == files(full)


@pytest.mark.parametrize("change, message", [
    ({"meta": {**META, "weight_hash": "w1"}}, "was written by model tiny \\(hash w0\\), not tiny \\(hash w1\\)"),
    ({"chunk_samples": 5}, "has chunk_samples=4, not 5"),
    ({"site_shapes": {**SHAPES, "lm.blocks.1.resid_post": (SEQ, 6)}}, "has sites="),
])
def test_identity_mismatch(full: Path, change: dict, message: str) -> None:
    with pytest.raises(InterpError, match=message):
        writer(full, **change)
    assert writer(full, **change, overwrite=True).created


def test_lazy_reader(full: Path) -> None:
    calls = []

    def counting_get(dsk, keys, **kw):
        calls.append(keys)
        return dask.get(dsk, keys, **kw)

    with dask.config.set(scheduler=counting_get):
        ds = open_cache(str(full))
        mean = ds["lm.blocks.0.resid_post"].mean("sample")
        assert all(isinstance(ds[v].data, da.Array) for v in [*ds.data_vars, "tokens", "sample_id"])
        assert not calls
        values = mean.values
    assert calls
    np.testing.assert_allclose(values, reference("acts", "lm.blocks.0.resid_post").astype(np.float64).mean(0),
                               atol=1e-6)


def test_bad_input(tmp_path: Path, full: Path) -> None:
    w = writer(full)
    good = chunk(range(0, CS))
    with pytest.raises(InterpError, match="not a multiple of 4"):
        w.write(1, **good)
    with pytest.raises(InterpError, match="expected \\(4, 4, 6\\)"):
        w.write(0, **{**good, "acts": {**good["acts"], "projector.out": np.zeros((CS, 3, 6))}})
    with pytest.raises(InterpError, match="position_span missing"):
        w.write(0, **{k: v for k, v in good.items() if k != "position_span"})
    (tmp_path / "plain").mkdir()
    (tmp_path / "plain" / "keep.txt").write_text("x")
    with pytest.raises(InterpError, match="not a Zarr store"):
        writer(tmp_path / "plain", overwrite=True)
    with pytest.raises(InterpError, match="no cache store"):
        open_cache(str(tmp_path / "missing.zarr"))
    with pytest.raises(InterpError, match="lacks adapter"):
        writer(tmp_path / "x.zarr", meta={k: v for k, v in META.items() if k != "adapter"})


# --- CLI end to end on a tiny untrained organism ----------------------------------------
E2E_SITES = "vision.blocks.0.resid_post,projector.out,lm.blocks.1.resid_post"


@pytest.fixture(scope="module")
def organism(tmp_path_factory) -> Path:
    from interp.models.organism import build_organism, save_organism

    path = tmp_path_factory.mktemp("organism")
    save_organism(*build_organism(seed=0), path)
    return path


def cli(organism: Path, out: Path, *extra: str) -> int:
    from interp.cache.__main__ import main

    return main(["--model", str(organism), "--out", str(out), "--limit", "6", "--chunk-samples", "4",
                 "--batch-size", "3", "--sites", E2E_SITES, *extra])


def test_cli_matches_direct_run(tmp_path: Path, organism: Path, capsys) -> None:
    from interp.data.catalog import load_dataset
    from interp.models import load

    out = tmp_path / "c.zarr"
    assert cli(organism, out) == 0
    ds = open_cache(str(out))
    adapter, data = load(str(organism)), load_dataset("phantom-test", 6)
    assert ds.attrs["weight_hash"] == adapter.weight_hash and ds.attrs["dataset_hash"] == data.hash
    assert ds["sample_id"].values.tolist() == [it.id for it in data.items]
    for i, it in enumerate(data.items):  # one sample at a time: no padding in the reference
        batch = adapter.encode([data.image(it.image)], [it.prompt], [it.spans])
        _, ref = adapter.run(batch, read=E2E_SITES.split(","))
        width = batch.input_ids.shape[1]
        for site, value in ref.items():
            got = ds[site][i].values
            np.testing.assert_allclose(got[: value.shape[1]], value[0].numpy(), atol=1e-5, err_msg=site)
            assert not got[value.shape[1]:].any()
        assert ds["tokens"][i, :width].values.tolist() == batch.input_ids[0].tolist()
        assert (ds["tokens"][i, width:] == -1).all() and (ds["position_kind"][i, width:] == 0).all()
        assert np.flatnonzero(span_mask(ds, "finding")[i].values).tolist() == batch.positions[0].spans["finding"]


def test_cli_resume_and_errors(tmp_path: Path, organism: Path, capsys) -> None:
    out = tmp_path / "c.zarr"
    assert cli(organism, out) == 0
    before = files(out)
    (out / "done" / "c" / "1").unlink()  # as if killed while writing chunk 1
    (out / "acts" / "projector.out" / "c" / "1" / "0" / "0").write_bytes(b"torn")
    zarr.open_group(str(out), mode="r+").attrs["complete"] = False
    assert cli(organism, out) == 0
    assert files(out) == before
    capsys.readouterr()
    assert cli(organism, out, "--chunk-samples", "5") == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"error: store {out} has chunk_samples=4, not 5; use a new --out or --overwrite")
    assert files(out) == before
    assert cli(organism, tmp_path / "bad.zarr", "--sites", "lm.blocks.9.resid_post") == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith("error: layer out of range")
    assert not (tmp_path / "bad.zarr").exists()
