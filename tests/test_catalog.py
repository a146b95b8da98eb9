"""Data sets by name: the MedNega-style benchmark through ``load_dataset`` and into the activation cache."""

from __future__ import annotations

import csv
import re
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from interp.data.catalog import BUILTIN_IMAGES, dataset_ref, load_dataset
from interp.data.folder import FolderDataset
from interp.data.images import load_image
from interp.data.negation import CHEXPERT_COLUMNS, NegationBenchmark, mcq_prompt, mednega_from_dataset, mednega_from_labels
from interp.data.vqa import VQADataset, build_vqa
from interp.errors import InterpError


def test_builtin_mednega_split_matches_phantom_split() -> None:
    data, phantoms = load_dataset("mednega-phantom-test"), load_dataset("phantom-test")
    bench = mednega_from_dataset(build_vqa(BUILTIN_IMAGES, seed=0, split="test"))
    assert len(data.items) == 2 * len(bench) and len({it.id for it in data.items}) == len(data.items)
    assert data.specs == phantoms.specs and not getattr(data, "paths", None)
    for k, it in enumerate(data.items):
        mcq, variant = bench.items[k // 2], ("negation", "affirmative")[k % 2]
        assert it.prompt == mcq_prompt(mcq, variant) and it.kind == f"mcq-{variant}"
        assert it.answer == it.target == mcq.correct_answer.lower() and it.image == int(mcq.image)
        assert it.prompt[slice(*it.spans["option_a"])] == mcq.choices(variant)[0]
        assert it.prompt[slice(*it.spans["answer"])] == ":"
    for i in {it.image for it in data.items}:
        np.testing.assert_array_equal(data.image(i), phantoms.image(i))
    limited = load_dataset("mednega-phantom-test", 3)
    assert limited.items == data.items[:3] and limited.hash != data.hash
    assert load_dataset("mednega-phantom-test").hash == data.hash
    assert dataset_ref("mednega-phantom-test") == "mednega-phantom-test"


@pytest.fixture
def mimic(tmp_path: Path) -> NegationBenchmark:
    """A MIMIC-style benchmark of two studies with PNG images (phantoms) under ``tmp_path/img``."""
    qualify = {c: "" for c in CHEXPERT_COLUMNS} | {"Cardiomegaly": "1.0", "Edema": "1.0", "Pneumothorax": "0.0",
                                                    "Pleural Effusion": "0.0", "Fracture": "0.0"}
    rows = [{"subject_id": f"1000003{k}", "study_id": f"5041426{k}", **qualify} for k in (2, 3)]
    with (tmp_path / "labels.csv").open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=["subject_id", "study_id", *CHEXPERT_COLUMNS])
        w.writeheader()
        w.writerows(rows)
    phantoms = build_vqa(2, seed=0)
    for k, row in enumerate(rows):
        study = tmp_path / "img" / "files" / "p10" / f"p{row['subject_id']}" / f"s{row['study_id']}"
        study.mkdir(parents=True)
        Image.fromarray((phantoms.image(k) * 255).astype(np.uint8)).save(study / "view1.png")
    return mednega_from_labels(tmp_path / "labels.csv", image_root=tmp_path / "img")


def test_saved_benchmarks_round_trip(tmp_path: Path, mimic: NegationBenchmark) -> None:
    loaded = [load_dataset(str(mimic.save(tmp_path / name))) for name in ("b.json", "b.csv")]
    assert [asdict(it) for it in loaded[0].items] == [asdict(it) for it in loaded[1].items]
    assert loaded[0].hash == loaded[1].hash
    data = loaded[1]
    assert len(data.items) == 2 * len(mimic) and data.specs == [] and data.name == str((tmp_path / "b.csv").resolve())
    assert [it.id for it in data.items][:2] == ["10000032-50414262-negation", "10000032-50414262-affirmative"]
    for k, it in enumerate(data.items):
        assert it.prompt == mcq_prompt(mimic.items[k // 2], it.kind.removeprefix("mcq-"))
        assert data.paths[it.image] == mimic.image_path(k // 2).resolve()
        np.testing.assert_array_equal(data.image(it.image), load_image(mimic.image_path(k // 2)))
    assert load_dataset(str(tmp_path / "b.csv"), 1).items == data.items[:1]
    # other .json / .csv data sets are still what they were
    build_vqa(2, seed=0).save(tmp_path / "vqa.json")
    assert isinstance(load_dataset(str(tmp_path / "vqa.json")), VQADataset)
    (tmp_path / "prompts.csv").write_text("image,prompt\nimg/files/p10/p10000032/s50414262/view1.png,is there ?\n")
    assert isinstance(load_dataset(str(tmp_path / "prompts.csv")), FolderDataset)


def test_benchmark_with_missing_image(tmp_path: Path, mimic: NegationBenchmark) -> None:
    mimic.save(tmp_path / "b.json")
    gone = mimic.image_path(1)
    gone.unlink()
    with pytest.raises(InterpError, match=re.escape(str(gone.resolve()))):
        load_dataset(str(tmp_path / "b.json"))


def test_cache_cli_on_mednega(tmp_path: Path) -> None:
    from interp.cache.__main__ import main
    from interp.store import dataset_of, open_store

    out = tmp_path / "x.zarr"
    assert main(["--model", "organism", "--data", "mednega-phantom-test", "--limit", "4", "--out", str(out),
                 "--chunk-samples", "2"]) == 0
    tree = open_store(str(out))
    items = load_dataset("mednega-phantom-test", 4).items
    assert tree["prompt"].values.tolist() == [it.prompt for it in items]
    assert tree["sample"].values.tolist() == [it.id for it in items]
    assert dataset_of(tree).items == items


def test_benchmark_item_pointing_at_a_missing_phantom(tmp_path):
    import json

    from interp.data.negation import NegationBenchmark, mednega_from_phantoms
    from interp.errors import InterpError

    bench = mednega_from_phantoms(8, 0, "test")
    path = bench.save(tmp_path / "b.json")
    d = json.loads(path.read_text())
    d["items"][0]["image"] = "99"
    del d["hash"]
    path.write_text(json.dumps(d))
    with pytest.raises(InterpError, match="points at phantom 99, but the benchmark has 8"):
        NegationBenchmark.load(path)
