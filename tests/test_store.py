"""Results store: exact round trip, layout, byte-identical resume, staged replacement, identity, lazy reads."""

from __future__ import annotations

import json
from pathlib import Path

import dask
import dask.array as da
import numpy as np
import pytest
import zarr

from interp.errors import InterpError
from interp.store import Field, SampleIndex, StoreWriter, open_store
from interp.store.layout import INITIALIZING, sibling

N, CS = 10, 4
IDS = [f"s{i}" for i in range(N)]
INDEX = SampleIndex(IDS, {"prompt": [f"q {i} ?" for i in range(N)]}, labels={"effusion": [i % 2 for i in range(N)]},
                    dataset={"ref": "synthetic", "limit": None, "name": "synthetic", "hash": "d0"})
FIELDS = {"x": Field((3, 2), ("position", "d"), "float32"),
          "tokens": Field((3,), ("position",), "int32", -1, coord=True),
          "lm/effect": Field((2, 3), ("layer", "position"), "float32", float("nan")),
          "lm/token": Field((3,), ("position",), "str", "", coord=True)}
STATICS = {"lm/layer": (("layer",), np.array([0, 5]), {})}
META = {"model_id": "tiny", "weight_hash": "w0", "config": {"a": 1}}


def writer(path, **over) -> StoreWriter:
    kw = dict(samples=INDEX, fields=FIELDS, meta=META, statics=STATICS, group_attrs={"lm": {"tower": "lm"}},
              chunk_samples=CS)
    return StoreWriter(str(path), "run", **{**kw, **over})


def chunk(r: range) -> tuple[dict, list[np.ndarray]]:
    """Deterministic synthetic values (an independent reference for reads) and images for samples ``r``."""
    rng = np.random.default_rng(r.start)
    b = len(r)
    arrays = {"x": rng.standard_normal((b, 3, 2)).astype(np.float32), "tokens": rng.integers(-1, 50, (b, 3)),
              "lm/effect": rng.standard_normal((b, 2, 3)).astype(np.float32),
              "lm/token": np.array([[f"t{i}{j}" for j in range(3)] for i in r], dtype=object)}
    return arrays, [rng.random((20 + i, 30)) for i in r]


def reference(name: str) -> np.ndarray:
    return np.concatenate([chunk(range(s, min(s + CS, N)))[0][name] for s in range(0, N, CS)])


def fill(w: StoreWriter, ranges=None) -> None:
    for r in ranges if ranges is not None else w.pending():
        w.write(r.start, *chunk(r))


def files(path: Path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


@pytest.fixture
def full(tmp_path: Path) -> Path:
    with writer(tmp_path / "full.zarr") as w:
        fill(w)
    return tmp_path / "full.zarr"


def test_round_trip_exact(full: Path) -> None:
    tree = open_store(str(full))
    run, lm = tree["run"].to_dataset(), tree["run/lm"].to_dataset()
    np.testing.assert_array_equal(run["x"].values, reference("x"))
    np.testing.assert_array_equal(run["tokens"].values, reference("tokens"))
    np.testing.assert_array_equal(lm["effect"].values, reference("lm/effect"))
    assert lm["token"].values.tolist() == reference("lm/token").tolist() and "token" in lm.coords
    assert lm["layer"].values.tolist() == [0, 5] and lm.effect.sel(layer=5).shape == (N, 3)
    assert tree["sample"].values.tolist() == IDS and tree["prompt"].values[3] == "q 3 ?"
    assert tree["labels"].sel(label="effusion").values.tolist() == INDEX.labels["effusion"]
    assert tree.attrs["dataset"] == INDEX.dataset and tree.attrs["layout"] == 2
    assert {k: run.attrs[k] for k in META} == META and run.attrs["complete"] and lm.attrs["tower"] == "lm"
    image = chunk(range(4, 8))[1][1]  # sample 5: 25 x 30, small enough to keep as is, top-left
    assert tree["image_height"].values[5] == 25 and tree["image_width"].values[5] == 30
    thumb = tree["thumbnail"].values[5]
    np.testing.assert_array_equal(thumb[:25, :30], np.round(image * 255))
    assert not thumb[25:].any() and not thumb[:, 30:].any()


def test_thumbnail_shrinks_by_area() -> None:
    from interp.store.samples import thumbnail

    image = np.random.default_rng(0).random((256, 128))
    thumb = thumbnail(image)  # 256 x 128 -> 64 x 32: each pixel the mean of a 4 x 4 block
    blocks = image.reshape(64, 4, 32, 4).mean((1, 3))
    assert np.abs(thumb[:, :32] / 255 - blocks).max() < 2 / 255 and not thumb[:, 32:].any()


def test_one_sample_joins_every_analysis(full: Path) -> None:
    """A second analysis joins the store's sample index; one selection reaches both and the index."""
    other = {"score": Field((), (), "float32")}
    w = StoreWriter(str(full), "second", samples=INDEX, fields=other, meta={"model_id": "m2"}, chunk_samples=CS)
    for r in w.pending():
        w.write(r.start, {"score": np.arange(r.start, r.stop, dtype=np.float32)})
    w.close()
    one = open_store(str(full)).sel(sample="s6")
    assert float(one["second"]["score"]) == 6.0
    np.testing.assert_array_equal(one["run"]["x"].values, reference("x")[6])
    assert one["prompt"].values == "q 6 ?"
    with pytest.raises(InterpError, match="other samples"):
        StoreWriter(str(full), "third", samples=SampleIndex(IDS[:-1] + ["z"], dataset=INDEX.dataset),
                    fields=other, meta={}, chunk_samples=CS)


def test_fsspec_memory_url() -> None:
    url = "memory://interp-test/run.zarr"
    with writer(url, mode="overwrite") as w:
        fill(w)
    tree = open_store(url)
    assert isinstance(tree["run"]["x"].data, da.Array)
    np.testing.assert_array_equal(tree["run"]["x"].values, reference("x"))


def test_unknown_url_scheme(tmp_path: Path) -> None:
    with pytest.raises(InterpError, match="cannot open bogus://x"):
        writer("bogus://x")


def test_chunk_layout_and_codec(full: Path) -> None:
    meta = json.loads((full / "run" / "x" / "zarr.json").read_text())
    assert meta["chunk_grid"]["configuration"]["chunk_shape"] == [CS, 3, 2]
    assert meta["dimension_names"] == ["sample", "position", "d"]
    assert "zstd" in [c["name"] for c in meta["codecs"]]
    assert json.loads((full / "run" / "done" / "zarr.json").read_text())["chunk_grid"]["configuration"][
        "chunk_shape"] == [1]
    assert json.loads((full / "samples" / "prompt" / "zarr.json").read_text())["data_type"] == "string"


def test_resume_after_kill_is_byte_identical(tmp_path: Path, full: Path) -> None:
    path = tmp_path / "resumed.zarr"
    zarr.open_group(str(path), mode="w", attributes=dict(INITIALIZING))  # killed while laying out: laid out again
    w = writer(path)
    assert w.laid_out == "store"
    fill(w, w.pending()[:1])
    zarr.open_array(str(path / "run" / "x"), mode="r+")[CS:2 * CS] = 7.0  # killed mid-chunk 1
    del w
    with pytest.raises(InterpError, match="incomplete \\(1 of 3 chunks\\)"):
        open_store(str(path))
    assert open_store(str(path), allow_incomplete=True)["run"].attrs["complete"] is False
    w = writer(path)
    assert not w.laid_out and w.pending() == [range(CS, 2 * CS), range(2 * CS, N)]
    fill(w)
    w.close()
    assert files(path) == files(full)


def test_parallel_disjoint_chunks(tmp_path: Path, full: Path) -> None:
    path = tmp_path / "par.zarr"
    first = writer(path)
    second = writer(path, create=False)  # a second rank opens the store the first laid out
    ranges = first.pending()
    fill(second, ranges[1::2])
    fill(first, ranges[0::2])
    first.close()
    assert files(path) == files(full)


def test_other_ranks_never_lay_out(tmp_path: Path) -> None:
    with pytest.raises(InterpError, match="rank 0"):
        writer(tmp_path / "none.zarr", create=False)


@pytest.mark.parametrize("change, message", [
    ({"meta": {**META, "weight_hash": "w1"}}, "was written by model tiny \\(hash w0\\), not tiny \\(hash w1\\)"),
    ({"chunk_samples": 5}, "chunk_samples=4, not 5"),
    ({"meta": {**META, "config": {"a": 2}}}, "has config=\\{'a': 1\\}, not \\{'a': 2\\}"),
    ({"fields": {**FIELDS, "y": Field((), (), "float32")}}, "has other arrays"),
])
def test_identity_mismatch(full: Path, change: dict, message: str) -> None:
    before = files(full)
    with pytest.raises(InterpError, match=message):
        writer(full, **change)
    assert files(full) == before


def test_replacement_is_staged_until_complete(tmp_path: Path, full: Path) -> None:
    """An interrupted replacement leaves the old store whole; rerunning resumes the staged one."""
    before = files(full)
    new_meta = {**META, "weight_hash": "w1"}
    w = writer(full, meta=new_meta, mode="replace")
    fill(w, w.pending()[:1])
    del w  # interrupted
    assert files(full) == before and Path(sibling(str(full), ".new")).is_dir()
    w = writer(full, meta=new_meta, mode="replace")
    assert len(w.pending()) == 2  # the staged chunk is kept
    fill(w)
    assert files(full) == before  # swapped only on close
    w.close()
    assert open_store(str(full))["run"].attrs["weight_hash"] == "w1"
    assert not Path(sibling(str(full), ".new")).exists() and not Path(sibling(str(full), ".old")).exists()
    with writer(full, meta=new_meta, mode="overwrite") as w:  # overwrite starts afresh even if identical
        assert len(w.pending()) == 3
        fill(w)
    assert open_store(str(full))["run"].attrs["complete"]


def test_older_layout_is_named(tmp_path: Path) -> None:
    path = tmp_path / "old.zarr"
    zarr.open_group(str(path), mode="w", attributes={"schema_version": 1, "complete": True})
    with pytest.raises(InterpError, match="activation-cache layout version 1 .* reads layout 2"):
        open_store(str(path))
    with pytest.raises(InterpError, match="layout version 1"):
        writer(path)
    zarr.open_group(str(path), mode="w", attributes={"interp_store": {"layout": 3}})
    with pytest.raises(InterpError, match="has layout 3"):
        open_store(str(path))


def test_lazy_reader(full: Path) -> None:
    calls = []

    def counting_get(dsk, keys, **kw):
        calls.append(keys)
        return dask.get(dsk, keys, **kw)

    tree = open_store(str(full))  # reads the sample ids (the index), nothing else
    with dask.config.set(scheduler=counting_get):
        mean = tree["run"]["x"].mean("sample")
        assert all(isinstance(tree["run"][v].data, da.Array) for v in ("x", "tokens"))
        assert isinstance(tree["prompt"].data, da.Array) and not calls
        values = mean.values
    assert calls
    np.testing.assert_allclose(values, reference("x").astype(np.float64).mean(0), atol=1e-6)


def test_bad_input(tmp_path: Path, full: Path) -> None:
    w = writer(full)
    good, images = chunk(range(0, CS))
    with pytest.raises(InterpError, match="not a multiple of 4"):
        w.write(1, good)
    with pytest.raises(InterpError, match="expected \\(4, 3, 2\\)"):
        w.write(0, {**good, "x": np.zeros((CS, 2, 2))})
    with pytest.raises(InterpError, match="write got"):
        w.write(0, {k: v for k, v in good.items() if k != "x"})
    with pytest.raises(InterpError, match="3 images for samples 0..3"):
        w.write(0, good, images[:3])
    (tmp_path / "plain").mkdir()
    (tmp_path / "plain" / "keep.txt").write_text("x")
    with pytest.raises(InterpError, match="not a Zarr store"):
        writer(tmp_path / "plain", mode="overwrite")
    with pytest.raises(InterpError, match="no store at"):
        open_store(str(tmp_path / "missing.zarr"))
    with pytest.raises(InterpError, match="unique"):
        SampleIndex(["a", "a"])
    with pytest.raises(InterpError, match="JSON-serialisable"):
        writer(tmp_path / "x.zarr", meta={"f": object()})


def test_discard_leaves_nothing(tmp_path: Path, full: Path) -> None:
    w = writer(tmp_path / "new.zarr")
    w.discard()
    assert not (tmp_path / "new.zarr").exists()
    w = StoreWriter(str(full), "extra", samples=INDEX, fields={"s": Field((), (), "float32")}, meta={}, chunk_samples=CS)
    w.discard()  # a group added to an existing store: only the group goes
    assert "extra" not in zarr.open_group(str(full), mode="r") and open_store(str(full))["run"].attrs["complete"]


def test_join_stores_errors(tmp_path: Path, full: Path) -> None:
    from interp.store import join_stores

    with pytest.raises(InterpError, match="/run is in more than one"):
        join_stores(str(full), str(full))
    other = SampleIndex(["z"], dataset={**INDEX.dataset, "hash": "d1"})
    w = StoreWriter(str(tmp_path / "o.zarr"), "o", samples=other, fields={"s": Field((), (), "float32")}, meta={})
    w.write(0, {"s": np.zeros(1)})
    w.close()
    with pytest.raises(InterpError, match="another data set"):
        join_stores(str(full), str(tmp_path / "o.zarr"))
    w = StoreWriter(str(tmp_path / "p.zarr"), "p", samples=SampleIndex(["z"], dataset=INDEX.dataset),
                    fields={"s": Field((), (), "float32")}, meta={})
    w.write(0, {"s": np.zeros(1)})
    w.close()
    with pytest.raises(InterpError, match="share no sample"):
        join_stores(str(full), str(tmp_path / "p.zarr"))


def test_absurd_chunk_is_refused_before_anything_is_written(tmp_path: Path) -> None:
    big = {"x": Field((4096, 4096), ("position", "d"), "float32")}  # 64 MiB per sample
    index = SampleIndex([str(i) for i in range(1000)], dataset=INDEX.dataset)
    with pytest.raises(InterpError, match="chunk of 1000 samples would hold 62.5 GiB .* use --chunk-samples 32 or less"):
        StoreWriter(str(tmp_path / "big.zarr"), "run", samples=index, fields=big, meta={}, chunk_samples=10**6)
    assert not (tmp_path / "big.zarr").exists()


def test_two_writers_started_together_on_a_new_store(tmp_path: Path, full: Path) -> None:
    """Processes, not threads: each lays out or resumes under the layout lock; the store ends whole."""
    import subprocess
    import sys

    import time

    script = f"""
import sys, time
sys.path.insert(0, {str(Path(__file__).parent)!r})
from test_store import fill, writer
time.sleep(max(0.0, {time.time() + 8} - time.time()))  # both start laying out at the same instant
w = writer({str(tmp_path / "both.zarr")!r})
fill(w)
w.close()
"""
    procs = [subprocess.Popen([sys.executable, "-c", script], stderr=subprocess.PIPE, text=True) for _ in range(2)]
    errors = [p.communicate(timeout=120)[1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], errors
    assert files(tmp_path / "both.zarr") == files(full)
    assert not list(tmp_path.glob(".*.lock"))
