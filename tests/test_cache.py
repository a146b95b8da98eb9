"""Activation cache: the ``acts`` layout (grid coordinates, validity) and the CLI against direct runs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import zarr

from interp.cache import acts_layout
from interp.errors import InterpError
from interp.store import dataset_of, open_store, span_mask

SHAPES = {"vision.blocks.0.resid_post": (5, 8), "projector.out": (4, 6), "lm.blocks.0.resid_post": (7, 6)}
GRIDS = {"vision.blocks.0.resid_post": (2, 2, True), "projector.out": (2, 2, False)}


def files(path: Path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def test_acts_layout_dims_and_grids() -> None:
    fields, statics = acts_layout(SHAPES, GRIDS, 7, "float16", ["image", "question"])
    assert fields["lm.blocks.0.resid_post"].dims == ("position", "lm_d")
    assert fields["vision.blocks.0.resid_post"].dims == ("vision_position", "vision_d")
    assert fields["projector.out"].attrs == {"grid": [2, 2], "has_cls": False}
    assert statics["vision_position_row"][1].tolist() == [-1, 0, 0, 1, 1]
    assert statics["projector_position_col"][1].tolist() == [0, 1, 0, 1]
    assert statics["vision_position_kind"][1].tolist() == [1, 2, 2, 2, 2]
    assert fields["position_span"].attrs == {"names": ["image", "question"]} and fields["valid"].coord
    with pytest.raises(InterpError, match="do not fit grid 3x2"):
        acts_layout(SHAPES, {**GRIDS, "projector.out": (3, 2, False)}, 7, "float32", [])
    with pytest.raises(InterpError, match="unsupported cache dtype"):
        acts_layout(SHAPES, GRIDS, 7, "int8", [])


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
    tree = open_store(str(out))
    ds = tree["acts"].to_dataset()
    adapter, data = load(str(organism)), load_dataset("phantom-test", 6)
    assert ds.attrs["weight_hash"] == adapter.weight_hash and tree.attrs["dataset"]["hash"] == data.hash
    assert dataset_of(tree).items == data.items  # the store names its data set so that it opens again
    assert tree["sample"].values.tolist() == [it.id for it in data.items]
    assert tree["prompt"].values.tolist() == [it.prompt for it in data.items]
    assert tree["labels"].sel(label="nodule").values.tolist() == [int(data.specs[it.image].has("nodule"))
                                                                  for it in data.items]
    for i, it in enumerate(data.items):  # one sample at a time: no padding in the reference
        batch = adapter.encode([data.image(it.image)], [it.prompt], [it.spans])
        _, ref = adapter.run(batch, read=E2E_SITES.split(","))
        width = batch.input_ids.shape[1]
        for site, value in ref.items():
            got = ds[site][i].values
            np.testing.assert_allclose(got[: value.shape[1]], value[0].numpy(), atol=1e-5, err_msg=site)
            assert np.isnan(got[value.shape[1]:]).all()  # past the sample's own length: NaN, not zeros
        assert ds["tokens"][i, :width].values.tolist() == batch.input_ids[0].tolist()
        assert (ds["tokens"][i, width:] == -1).all() and (ds["position_kind"][i, width:] == 0).all()
        assert ds["valid"][i].values.tolist() == [k < width for k in range(ds.sizes["position"])]
        assert np.flatnonzero(span_mask(ds, "finding")[i].values).tolist() == batch.positions[0].spans["finding"]


def test_cli_resume_and_errors(tmp_path: Path, organism: Path, capsys) -> None:
    out = tmp_path / "c.zarr"
    assert cli(organism, out) == 0
    before = files(out)
    (out / "acts" / "done" / "c" / "1").unlink()  # as if killed while writing chunk 1
    (out / "acts" / "projector.out" / "c" / "1" / "0" / "0").write_bytes(b"torn")
    group = zarr.open_group(str(out / "acts"), mode="r+")
    group.attrs["interp_group"] = {**group.attrs["interp_group"], "complete": False}
    assert cli(organism, out) == 0
    assert files(out) == before
    capsys.readouterr()
    assert cli(organism, out, "--chunk-samples", "5") == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"error: store {out} has other chunk_samples (chunk_samples=4, not 5); use a new --out or --overwrite")
    assert cli(organism, out, "--batch-size", "2") == 2  # batch shapes change float results: not the same run
    assert "has batch_size=3, not 2" in capsys.readouterr().err
    assert files(out) == before
    assert cli(organism, tmp_path / "bad.zarr", "--sites", "lm.blocks.9.resid_post") == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith("error: layer out of range")
    assert not (tmp_path / "bad.zarr").exists()


def test_join_sweep_cache_and_samples(tmp_path: Path, organism: Path) -> None:
    """One sample's sweep effects, cached activations and metadata, through the reader alone."""
    from interp.data.catalog import load_dataset
    from interp.models import load
    from interp.store import join_stores
    from interp.trace.__main__ import main as trace_main

    data = load_dataset("phantom-test").filter(kinds=["presence"], modes=["direct"])
    saved = str(data.save(tmp_path / "presence.json"))
    assert trace_main(["--layer-sweep", "--model", str(organism), "--data", saved, "--limit", "2", "--copies", "2",
                       "--min-gap", "0", "--sites", "lm.blocks.1.resid_post", "--out", str(tmp_path / "sweep")]) == 0
    assert cli(organism, tmp_path / "c.zarr", "--data", saved, "--limit", str(len(data.items))) == 0
    tree = join_stores(str(tmp_path / "sweep" / "sweep.zarr"), str(tmp_path / "c.zarr"))
    assert tree["sample"].size == 2 and set(tree.children) == {"sweep", "acts"}
    item = str(tree["sample"].values[1])
    one = tree.sel(sample=item)
    it = next(x for x in data.items if x.id == item)
    assert one["prompt"].values == it.prompt and one["finding"].values == it.finding
    adapter = load(str(organism))
    batch = adapter.encode([data.image(it.image)], [it.prompt], [it.spans])
    _, ref = adapter.run(batch, read="lm.blocks.1.resid_post")
    width = batch.input_ids.shape[1]
    np.testing.assert_allclose(one["acts"]["lm.blocks.1.resid_post"].values[:width], ref["lm.blocks.1.resid_post"][0],
                               atol=1e-5)
    assert one["acts"]["token_text"].values[:width].tolist() == batch.positions[0].tokens
    lm = one["sweep/lm"]
    assert lm["token"].values[:width].tolist() == batch.positions[0].tokens  # the same positions, labelled alike
    assert np.isfinite(lm["effect"].values[:, :width]).all() and np.isnan(lm["effect"].values[:, width:]).all()


def test_cli_absurd_chunk_size_is_capped_by_the_samples(tmp_path: Path, organism: Path) -> None:
    """--chunk-samples beyond the data set: one chunk of all samples (Zarr allocates a chunk whole when written)."""
    out = tmp_path / "c.zarr"
    assert cli(organism, out, "--chunk-samples", "100000000") == 0
    meta = json.loads((out / "acts" / "projector.out" / "zarr.json").read_text())
    assert meta["chunk_grid"]["configuration"]["chunk_shape"][0] == 6
    assert open_store(str(out)).attrs["chunk_samples"] == 6
