"""Attributions in the results store (``python -m interp.attribution``): values as run directly, resume,
joining the cache's store of the same data, one-line errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from interp.attribution import method
from interp.attribution.__main__ import main
from interp.attribution.base import Sample
from interp.attribution.store import Attributor
from interp.data.catalog import load_dataset
from interp.store import open_store

DATA, METHODS = "phantom-test:3", "saliency,medfocus,prompting"


def cli(out: Path, *extra: str) -> int:
    return main(["--data", DATA, "--methods", METHODS, "--out", str(out), "--chunk-samples", "1", *extra])


def files(path: Path) -> dict[str, bytes]:
    """Every file of a store; the group's attrs without the run's timings."""
    out = {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}
    attrs = json.loads(out.pop("attribution/zarr.json"))
    attrs["attributes"]["interp_group"]["summary"].pop("elapsed_s")
    return out | {"attribution/zarr.json": json.dumps(attrs, sort_keys=True).encode()}


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("attr") / "a.zarr"
    assert cli(out) == 0
    return out


def test_values_match_direct_runs(store, organism):
    tree = open_store(str(store))
    node = tree["attribution"]
    data = load_dataset(DATA)
    assert tree["sample"].values.tolist() == [it.id for it in data.items]
    assert node.attrs["model_id"] == organism.model_id and node.attrs["weight_hash"] == organism.weight_hash
    assert set(node.attrs["methods"]) == set(METHODS.split(","))
    assert node.attrs["methods"]["medfocus"]["name"] == "medfocus"  # the method's own name, as evaluations call it
    assert node.attrs["methods"]["medfocus"]["settings"]["keep"] == 0.75
    assert set(node.children) == set(METHODS.split(","))
    assert set(node["saliency"].data_vars) == {"map"} and set(node["prompting"].data_vars) == {"map", "region"}
    for i, it in enumerate(data.items):
        ph = data.phantom(it.image)
        sample = Sample(ph.image, it.prompt, it.spans, it.id)
        np.testing.assert_array_equal(node["mask"][i].values, ph.finding_masks.get(it.finding, np.zeros((64, 64), bool)))
        for name in METHODS.split(","):
            a = method(name, organism).attribute(sample)  # the model's own response, as the store's
            got = node[name]
            assert node["response"][i].values == a.response
            assert node["token_text"][i].values.tolist() == a.token_text + [""] * (48 - len(a.token_text))
            np.testing.assert_array_equal(got["map"][i].values, a.map.astype(np.float32), err_msg=name)
            if a.region is not None:
                np.testing.assert_array_equal(got["region"][i].values, a.region)
            if a.tokens is not None:
                n = len(a.tokens)
                np.testing.assert_array_equal(got["tokens"][i, :n].values, a.tokens.astype(np.float32))
                assert np.isnan(got["tokens"][i, n:].values).all()
            for concept, score in a.concepts.items():
                assert got["concepts"][i].sel(concept=concept).values == np.float32(score)


def test_resume_after_interruption_is_identical(store, tmp_path, monkeypatch, capsys):
    out = tmp_path / "a.zarr"
    calls = []
    run = Attributor.__call__

    def interrupted(self, sample):
        calls.append(sample.id)
        if len(calls) == 3:  # the first sample (probe), the second, then killed on the third
            raise KeyboardInterrupt
        return run(self, sample)

    monkeypatch.setattr(Attributor, "__call__", interrupted)
    assert cli(out) == 130
    assert "rerun the same command to resume" in capsys.readouterr().err
    with pytest.raises(Exception, match="incomplete"):
        open_store(str(out))
    calls.clear()
    assert cli(out) == 0
    assert len(calls) == 1  # only the missing sample: no probe, nothing done twice
    assert files(out) == files(store)


def test_joins_the_cache_store_of_the_same_data(tmp_path):
    from interp.cache.__main__ import main as cache

    out = tmp_path / "c.zarr"
    assert cache(["--data", DATA, "--sites", "projector.out", "--out", str(out)]) == 0
    assert main(["--data", DATA, "--methods", "saliency", "--out", str(out)]) == 0  # takes the cache's chunking
    tree = open_store(str(out))
    assert set(tree.children) == {"acts", "attribution"}
    assert np.isfinite(tree["attribution/saliency"]["map"].values).all()


def test_other_settings_are_refused_before_any_work(store, capsys, monkeypatch):
    before = files(store)
    monkeypatch.setattr(Attributor, "__call__", lambda *_: pytest.fail("attributed before refusing"))
    assert main(["--data", DATA, "--methods", "saliency", "--out", str(store)]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: store {store} holds an attribution with config=")
    assert lines[0].endswith("use a new --out or --overwrite") and files(store) == before


@pytest.mark.parametrize("argv,message", [
    (["--methods", "saliency,magic"], "unknown attribution method 'magic'; choose from saliency, "),
    (["--methods", " , "], "--methods: give at least one"),
    (["--methods", "saliency", "--modes", "chatty"], "--modes: choose direct and/or cot"),
])
def test_bad_input_is_one_line(argv, message, tmp_path, capsys):
    out = tmp_path / "x.zarr"
    assert main(["--data", DATA, *argv, "--out", str(out)]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], lines
    assert not out.exists()
