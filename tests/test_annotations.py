"""Annotation loaders on the real files of the torchxrayvision wheel (skipped when it cannot be
fetched), against facts read off the raw files; synthetic files for the formats it lacks."""

from __future__ import annotations

import csv
import gzip
import math
import zipfile

import numpy as np
import pytest

from interp.errors import InterpError
from interp.evaluate.annotations import (
    CHEXPERT_LABELS,
    Box,
    Fixations,
    fixation_map,
    load_chexpert_labels,
    load_egd_fixations,
    load_nih_boxes,
    load_reflacx_fixations,
    load_rsna_boxes,
    load_siim_masks,
    load_vindr_boxes,
)


def _write_csv(path, header, rows):
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "wt", newline="") as f:
        csv.writer(f).writerows([header, *rows])
    return path


# ---------------------------------------------------------------------------------------
# boxes


def test_vindr_boxes(txv_data):
    boxes = load_vindr_boxes(txv_data / "vinbigdata-train.csv.gz")
    # 67914 rows, 31818 of them "No finding", over 15000 images
    assert len(boxes) == 15000 and sum(map(len, boxes.values())) == 67914 - 31818
    assert boxes["50a418190bc3fb1ef1633bf9678929b3"] == []
    b = boxes["9a5094b2563a1ef3ff50dc5c7ff71345"]
    # raw: 9a5094b2563a1ef3ff50dc5c7ff71345,Cardiomegaly,3,R10,691.0,1375.0,1653.0,1831.0 (+5 more rows)
    assert len(b) == 6 and b[0] == Box("Cardiomegaly", 1375.0, 691.0, 1831.0, 1653.0, "R10")
    assert b[0].yxyx == (1375.0, 691.0, 1831.0, 1653.0)
    assert [x.label for x in b].count("Cardiomegaly") == 3 and {x.rater for x in b} == {"R8", "R9", "R10"}


def test_nih_boxes(txv_data):
    boxes = load_nih_boxes(txv_data / "BBox_List_2017.csv.gz")
    assert len(boxes) == 880 and sum(map(len, boxes.values())) == 984
    assert len(boxes["00010277_000.png"]) == 4
    # raw: 00013118_008.png,Atelectasis,225.084745762712,547.019216763771,86.7796610169491,79.1864406779661
    (b,) = boxes["00013118_008.png"]
    assert b.label == "Atelectasis"
    assert b.yxyx == pytest.approx((547.019216763771, 225.084745762712, 547.019216763771 + 79.1864406779661,
                                    225.084745762712 + 86.7796610169491))


def test_rsna_boxes_read_from_the_zip(txv_data):
    boxes = load_rsna_boxes(txv_data / "kaggle_stage_2_train_labels.csv.zip")
    assert len(boxes) == 26684 and sum(map(len, boxes.values())) == 9555  # rows with Target 1
    assert boxes["0004cfab-14fd-4e49-80ba-63a80b6bddd6"] == []
    # raw: ...,264.0,152.0,213.0,379.0,1 and ...,562.0,152.0,256.0,453.0,1
    assert boxes["00436515-870c-4b36-a041-de91049b9ab4"] == [
        Box("Lung Opacity", 152.0, 264.0, 531.0, 477.0), Box("Lung Opacity", 152.0, 562.0, 605.0, 818.0)]


def test_box_loaders_name_bad_input(tmp_path):
    with pytest.raises(InterpError, match="no such file"):
        load_vindr_boxes(tmp_path / "missing.csv.gz")
    path = _write_csv(tmp_path / "vindr.csv.gz", ["image_id", "class_name", "x_min", "y_min", "x_max", "y_max"], [])
    with pytest.raises(InterpError, match=r"vindr\.csv\.gz: no column 'rad_id'"):
        load_vindr_boxes(path)
    header = ["image_id", "class_name", "class_id", "rad_id", "x_min", "y_min", "x_max", "y_max"]
    path = _write_csv(tmp_path / "v.csv.gz", header, [["a", "Nodule/Mass", "8", "R1", "1", "2", "5", "9"],
                                                      ["b", "No finding", "14", "R2", "", "", "", ""]])
    assert load_vindr_boxes(path) == {"a": [Box("Nodule/Mass", 2.0, 1.0, 9.0, 5.0, "R1")], "b": []}
    path = _write_csv(tmp_path / "v.csv", header, [["a", "Nodule/Mass", "8", "R1", "1", "", "5", "9"]])
    with pytest.raises(InterpError, match=r"v\.csv, line 2: column 'y_min' is ''"):
        load_vindr_boxes(path)
    path = _write_csv(tmp_path / "r.csv", ["patientId", "x", "y", "width", "height", "Target"],
                      [["p", "", "", "", "", "2"]])
    with pytest.raises(InterpError, match="'Target' is '2'"):
        load_rsna_boxes(path)
    with zipfile.ZipFile(tmp_path / "two.zip", "w") as z:
        z.writestr("a.csv", "x\n")
        z.writestr("b.csv", "x\n")
    with pytest.raises(InterpError, match="one file in the zip"):
        load_rsna_boxes(tmp_path / "two.zip")


# ---------------------------------------------------------------------------------------
# SIIM run-length masks


def _rle2mask(rle: str, width: int, height: int) -> np.ndarray:
    """The SIIM starter code's ``rle2mask`` (mask_functions.py) transcribed, read transposed as its users do."""
    mask = np.zeros(width * height, dtype=bool)
    array = [int(x) for x in rle.split()]
    current = 0
    for start, length in zip(array[0::2], array[1::2]):
        current += start
        mask[current:current + length] = True
        current += length
    return mask.reshape(width, height).T


def test_siim_rle_on_a_hand_made_file(tmp_path):
    # 4 rows x 3 columns, column-major: offsets count from the end of the previous run
    path = _write_csv(tmp_path / "rle.csv", ["ImageId", " EncodedPixels"],
                      [["a", "1 2 3 1"], ["a", "6 2"], ["b", "-1"], ["c", " 0 12"]])
    masks = load_siim_masks(path, shape=(4, 3))
    # pixels 1, 2 and 6 OR 6, 7; pixel p is (row p % 4, column p // 4)
    want = np.array([[0, 0, 0], [1, 0, 0], [1, 1, 0], [0, 1, 0]], dtype=bool)
    assert np.array_equal(masks["a"], want)
    assert np.array_equal(masks["a"], _rle2mask("1 2 3 1", 3, 4) | _rle2mask("6 2", 3, 4))
    assert not masks["b"].any() and masks["c"].all() and len(masks) == 3 and list(masks) == ["a", "b", "c"]
    for rle, match in (("1 2 3", "pairs"), ("1 x", "pairs"), ("0 13", "past the 12-pixel image")):
        _write_csv(path, ["ImageId", "EncodedPixels"], [["a", rle]])
        with pytest.raises(InterpError, match=match):
            load_siim_masks(path, shape=(4, 3))


def test_siim_masks_match_the_raw_run_lengths(txv_data):
    path = txv_data / "siim-pneumothorax-train-rle.csv.gz"
    masks = load_siim_masks(path)
    assert len(masks) == 12047 and sum(1 for r in masks.runs.values() if r) == 2669
    with gzip.open(path, "rt") as f:
        raw: dict[str, list[str]] = {}
        for image, rle in list(csv.reader(f))[1:]:
            raw.setdefault(image, []).append(rle.strip())
    one = "1.2.276.0.7230010.3.1.4.8323329.13666.1517875247.117800"  # one row, its runs disjoint
    (rle,) = raw[one]
    mask = masks[one]
    assert mask.shape == (1024, 1024) and mask.dtype == bool
    assert mask.sum() == sum(int(v) for v in rle.split()[1::2])
    ten = "1.2.276.0.7230010.3.1.4.8323329.1851.1517875169.919023"  # ten rows, OR-ed
    assert len(raw[ten]) == 10
    want = np.logical_or.reduce([_rle2mask(r, 1024, 1024) for r in raw[ten]])
    assert np.array_equal(masks[ten], want) and want.sum() <= sum(int(v) for r in raw[ten] for v in r.split()[1::2])
    assert not masks["1.2.276.0.7230010.3.1.4.8323329.6904.1517875201.850819"].any()  # "-1"


# ---------------------------------------------------------------------------------------
# CheXpert labels


def test_chexpert_labels(txv_data):
    labels = load_chexpert_labels(txv_data / "chexpert_train.csv.gz")
    assert len(labels) == 223414
    first = labels["CheXpert-v1.0-small/train/patient00001/study1/view1_frontal.jpg"]
    assert list(first) == list(CHEXPERT_LABELS)
    assert {k: v for k, v in first.items() if v is not None} == {
        "No Finding": 1, "Pneumothorax": 0, "Support Devices": 1}
    # raw: ...patient00002/study2/view1_frontal.jpg,Female,87,Frontal,AP,,,-1.0,1.0,,-1.0,-1.0,,-1.0,,-1.0,,1.0,
    second = labels["CheXpert-v1.0-small/train/patient00002/study2/view1_frontal.jpg"]
    assert {k: v for k, v in second.items() if v is not None} == {
        "Cardiomegaly": -1, "Lung Opacity": 1, "Edema": -1, "Consolidation": -1, "Atelectasis": -1,
        "Pleural Effusion": -1, "Fracture": 1}
    assert sum(v["No Finding"] == 1 for v in labels.values()) == 22381
    assert sum(v["Pneumothorax"] == -1 for v in labels.values()) == 3145


def test_chexpert_bad_value_names_the_column(tmp_path):
    row = ["p.jpg", "Male", "50", "Frontal", "PA", *([""] * 14)]
    row[5 + CHEXPERT_LABELS.index("Edema")] = "yes"
    header = ["Path", "Sex", "Age", "Frontal/Lateral", "AP/PA", *CHEXPERT_LABELS]
    path = _write_csv(tmp_path / "train.csv", header, [row])
    with pytest.raises(InterpError, match=r"train\.csv, line 2: column 'Edema' is 'yes'"):
        load_chexpert_labels(path)


# ---------------------------------------------------------------------------------------
# fixations


REFLACX_HEADER = ["timestamp_start_fixation", "timestamp_end_fixation", "average_x_position", "x_position",
                  "y_position", "pupil_area_normalized", "angular_resolution_x_pixels_per_degree",
                  "angular_resolution_y_pixels_per_degree", "window_width", "window_level"]


def test_reflacx_fixations(tmp_path):
    rows = [[0.5, 0.8, 0, 120.0, 340.5, 1, 45, 45, 1, 1], [0.9, 1.4, 0, -5.0, 10.0, 1, 45, 45, 1, 1]]
    fix = load_reflacx_fixations(_write_csv(tmp_path / "fixations.csv", REFLACX_HEADER, rows))
    assert fix.points.tolist() == [[340.5, 120.0], [10.0, -5.0]]  # (y, x), as recorded
    assert fix.durations == pytest.approx([0.3, 0.5])
    empty = load_reflacx_fixations(_write_csv(tmp_path / "none.csv", REFLACX_HEADER, []))
    assert empty.points.shape == (0, 2) and empty.durations.shape == (0,)
    with pytest.raises(InterpError, match=r"no column 'y_position'"):
        load_reflacx_fixations(_write_csv(tmp_path / "bad.csv", REFLACX_HEADER[:4], []))


def test_egd_fixations(tmp_path):
    header = ["SESSION_ID", "MEDIA_ID", "DICOM_ID", "CNT", "TIME (in secs)", "TIMETICK(f=10000000)", "FPOGX",
              "FPOGY", "FPOGS", "FPOGD", "FPOGID", "FPOGV", "X_ORIGINAL", "Y_ORIGINAL"]
    rows = [[1, 0, "d1", 1, 0.1, 1, 0.5, 0.5, 0.0, 0.25, 1, 1, 1200, 800],
            [1, 0, "d1", 2, 0.4, 2, 0.6, 0.4, 0.3, 0.5, 2, 1, -1, -1],
            [1, 1, "d2", 3, 0.9, 3, 0.2, 0.3, 0.8, 0.125, 3, 1, 100, 1900]]
    fix = load_egd_fixations(_write_csv(tmp_path / "fixations.csv.gz", header, rows))
    assert list(fix) == ["d1", "d2"]
    assert fix["d1"].points.tolist() == [[800.0, 1200.0], [-1.0, -1.0]] and fix["d1"].durations.tolist() == [0.25, 0.5]
    assert fix["d2"].points.tolist() == [[1900.0, 100.0]] and fix["d2"].durations.tolist() == [0.125]
    heat = fixation_map(fix["d1"], (1000, 1500), sigma=0)  # the off-image fixation is dropped
    assert heat[800, 1200] == 1.0 and heat.sum() == 1.0
    with pytest.raises(InterpError, match="no column 'FPOGD'"):
        load_egd_fixations(_write_csv(tmp_path / "f.csv", [h for h in header if h != "FPOGD"], []))


def test_fixation_map_weights_by_duration_and_blurs():
    fix = Fixations(np.array([[2.5, 3.5], [6.2, 8.9]]), np.array([1.0, 3.0]))
    sharp = fixation_map(fix, (9, 11), sigma=0)
    assert sharp[2, 3] == 0.25 and sharp[6, 8] == 0.75 and sharp.sum() == 1.0
    heat = fixation_map(fix, (9, 11), sigma=1.0)
    assert heat.sum() == pytest.approx(1.0) and np.unravel_index(heat.argmax(), heat.shape) == (6, 8)
    # each pixel lies within one point's kernel (radius 4), so the peaks keep the durations' ratio
    assert heat[6, 8] / heat[2, 3] == pytest.approx(3.0)
    assert heat[6, 9] / heat[6, 8] == pytest.approx(math.exp(-0.5))  # the sampled Gaussian one pixel away
    with pytest.raises(InterpError, match="none of the 2 fixation points"):
        fixation_map(fix, (2, 2), sigma=1.0)
    with pytest.raises(InterpError, match="no positive total duration"):
        fixation_map(Fixations(fix.points, np.zeros(2)), (9, 11), sigma=1.0)
