"""Loaders for real chest-X-ray annotation files, from local paths.

A ``.gz`` file is read through gzip and a ``.zip`` holding one file through zipfile (torchxrayvision
ships the RSNA labels zipped); a missing file or column is an InterpError naming it. Boxes are `Box`
records in the original image's pixels, end-exclusive like the boxes of `interp.evaluate.metrics`
(``box.yxyx`` feeds them there); an image listed with no box maps to an empty list.

- VinDr-CXR ``vinbigdata-train.csv``: image_id, class_name, rad_id, x_min, y_min, x_max, y_max;
  "No finding" rows have empty coordinates (no box); ``rad_id`` becomes ``Box.rater``;
- NIH ChestX-ray14 ``BBox_List_2017.csv``: Image Index, Finding Label, x, y, w, h; the unquoted
  header "Bbox [x,y,w,h]" splits into the four columns "Bbox [x", "y", "w", "h]";
- RSNA pneumonia ``stage_2_train_labels.csv``: patientId, x, y, width, height, Target; Target 0
  rows have no box; boxes are labelled "Lung Opacity", the challenge's positive class;
- SIIM-ACR pneumothorax ``train-rle.csv``: ImageId, EncodedPixels (a header with a space before
  EncodedPixels is accepted). The run-length code is SIIM's: pairs (offset, length), each offset
  counted from the end of the previous run, over the image's pixels in column-major order, as in
  the ``rle2mask`` of the challenge's ``mask_functions.py`` (``mask.reshape(width, height)``, read
  transposed); "-1" is no pneumothorax; several rows of one image are OR-ed;
- CheXpert ``train.csv``: Path, Sex, Age, Frontal/Lateral, AP/PA and the 14 `CHEXPERT_LABELS`
  columns holding 1.0 (positive), 0.0 (negative), -1.0 (uncertain) or nothing (not mentioned);
- REFLACX, one reading's ``main_data/<id>/fixations.csv``: x_position, y_position (image pixels),
  timestamp_start_fixation, timestamp_end_fixation (seconds). Column names checked against public
  code reading the dataset (anlutfi/reflacx_lib ``reflacx_sample.py``; a public copy of REFLACX's
  ``create_heatmaps``, which weights each fixation by end - start as `fixation_map` does);
- EGD-CXR ``fixations.csv``: DICOM_ID, X_ORIGINAL, Y_ORIGINAL (image pixels), FPOGD (duration in
  seconds), per Karargyris et al. 2021 (Sci. Data 8:92, Table 2) and cxr-eye-gaze/eye-gaze-dataset
  ``create_heatmap_images_and_or_videos.py``; gaze off the image has negative coordinates there.
Fixations are kept as recorded, off-image ones included; `fixation_map` and the metrics drop those.
"""

from __future__ import annotations

import csv
import gzip
import io
import math
import zipfile
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import numpy as np
from scipy import ndimage

from interp.errors import InterpError
from interp.evaluate.metrics import point_pixels

CHEXPERT_LABELS = ("No Finding", "Enlarged Cardiomediastinum", "Cardiomegaly", "Lung Opacity", "Lung Lesion",
                   "Edema", "Consolidation", "Pneumonia", "Atelectasis", "Pneumothorax", "Pleural Effusion",
                   "Pleural Other", "Fracture", "Support Devices")
_CHEXPERT_VALUES: dict[str, int | None] = {"1.0": 1, "0.0": 0, "-1.0": -1, "": None, "1": 1, "0": 0, "-1": -1}
RSNA_LABEL = "Lung Opacity"
SIIM_SHAPE = (1024, 1024)


@dataclass(frozen=True)
class Box:
    """An annotated box in image pixels, end-exclusive; ``rater`` names its reader where the file does."""

    label: str
    y0: float
    x0: float
    y1: float
    x1: float
    rater: str = ""

    @property
    def yxyx(self) -> tuple[float, float, float, float]:
        return self.y0, self.x0, self.y1, self.x1


@dataclass(frozen=True, eq=False)
class Fixations:
    """Fixations on one image: ``points`` [n, 2] (y, x) in image pixels, ``durations`` [n] in seconds."""

    points: np.ndarray
    durations: np.ndarray


# ---------------------------------------------------------------------------------------
# reading


def _open(path: Path) -> IO[str]:
    if not path.is_file():
        raise InterpError(f"{path}: no such file")
    if path.suffix == ".gz":
        return gzip.open(path, "rt", encoding="utf-8", newline="")
    if path.suffix == ".zip":
        with zipfile.ZipFile(path) as z:  # the member keeps the archive open after this block
            names = [n for n in z.namelist() if not n.endswith("/")]
            if len(names) != 1:
                raise InterpError(f"{path}: expected one file in the zip archive, found {len(names)}")
            return io.TextIOWrapper(z.open(names[0]), encoding="utf-8", newline="")
    return path.open(encoding="utf-8", newline="")


def _rows(path: str | Path, columns: Sequence[str]) -> Iterator[tuple[int, list[str]]]:
    """(line number, cells) of each CSV data row: the named columns' cells, in that order, stripped."""
    path = Path(path)
    try:
        with _open(path) as f:
            reader = csv.reader(f)
            header = [h.strip() for h in next(reader, [])]
            for c in columns:
                if c not in header:
                    raise InterpError(f"{path}: no column {c!r}")
            idx = [header.index(c) for c in columns]
            for cells in reader:
                if not cells:
                    continue
                if len(cells) <= max(idx):
                    raise InterpError(f"{path}, line {reader.line_num}: {len(cells)} cells, expected {max(idx) + 1}")
                yield reader.line_num, [cells[i].strip() for i in idx]
    except (OSError, EOFError, UnicodeDecodeError, csv.Error, zipfile.BadZipFile) as e:
        raise InterpError(f"{path}: unreadable ({e})") from e


def _floats(path: str | Path, line: int, columns: Sequence[str], cells: Sequence[str]) -> list[float]:
    out = []
    for column, cell in zip(columns, cells):
        try:
            value = float(cell)
        except ValueError:
            value = math.nan
        if not math.isfinite(value):
            raise InterpError(f"{path}, line {line}: column {column!r} is {cell!r}, not a finite number")
        out.append(value)
    return out


def _xywh_box(path: str | Path, line: int, label: str, cells: Sequence[str]) -> Box:
    x, y, w, h = _floats(path, line, ("x", "y", "width", "height"), cells)
    if w < 0 or h < 0:
        raise InterpError(f"{path}, line {line}: negative box size {w} x {h}")
    return Box(label, y, x, y + h, x + w)


# ---------------------------------------------------------------------------------------
# boxes


def load_vindr_boxes(path: str | Path) -> dict[str, list[Box]]:
    """VinDr-CXR: {image_id: [Box]}, one box per radiologist's finding ("No finding": none)."""
    columns = ("image_id", "class_name", "rad_id", "x_min", "y_min", "x_max", "y_max")
    out: dict[str, list[Box]] = {}
    for line, (image, label, rater, *coords) in _rows(path, columns):
        boxes = out.setdefault(image, [])
        if not any(coords):
            continue
        x0, y0, x1, y1 = _floats(path, line, columns[3:], coords)
        if x1 < x0 or y1 < y0:
            raise InterpError(f"{path}, line {line}: box ends before it starts")
        boxes.append(Box(label, y0, x0, y1, x1, rater))
    return out


def load_nih_boxes(path: str | Path) -> dict[str, list[Box]]:
    """NIH ChestX-ray14 ``BBox_List_2017.csv``: {Image Index: [Box]}."""
    out: dict[str, list[Box]] = {}
    for line, (image, label, *xywh) in _rows(path, ("Image Index", "Finding Label", "Bbox [x", "y", "w", "h]")):
        out.setdefault(image, []).append(_xywh_box(path, line, label, xywh))
    return out


def load_rsna_boxes(path: str | Path) -> dict[str, list[Box]]:
    """RSNA pneumonia: {patientId: [Box]}, empty for Target 0."""
    out: dict[str, list[Box]] = {}
    for line, (patient, target, *xywh) in _rows(path, ("patientId", "Target", "x", "y", "width", "height")):
        boxes = out.setdefault(patient, [])
        if target not in ("0", "1"):
            raise InterpError(f"{path}, line {line}: column 'Target' is {target!r}, not 0 or 1")
        if target == "1":
            boxes.append(_xywh_box(path, line, RSNA_LABEL, xywh))
    return out


# ---------------------------------------------------------------------------------------
# masks


class RleMasks(Mapping[str, np.ndarray]):
    """{image id: boolean mask [H, W]}, each decoded when read (10k SIIM masks would take 10 GiB).
    ``runs[image]``: one (starts, ends) pair of absolute column-major pixel indices per file row."""

    def __init__(self, runs: dict[str, list[tuple[np.ndarray, np.ndarray]]], shape: tuple[int, int]):
        self.runs, self.shape = runs, shape

    def __getitem__(self, image: str) -> np.ndarray:
        flat = np.zeros(self.shape[0] * self.shape[1], dtype=bool)
        for starts, ends in self.runs[image]:
            for start, end in zip(starts, ends):
                flat[start:end] = True
        return flat.reshape(self.shape, order="F")

    def __iter__(self) -> Iterator[str]:
        return iter(self.runs)

    def __len__(self) -> int:
        return len(self.runs)


def _siim_runs(path: str | Path, line: int, rle: str, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Absolute (starts, ends) of one SIIM relative run-length string over ``size`` pixels."""
    try:
        values = np.array(rle.split(), dtype=np.int64)
    except ValueError:
        values = np.array([-1])
    if values.size % 2 or (values < 0).any():
        raise InterpError(f"{path}, line {line}: EncodedPixels is not '-1' or pairs of non-negative integers")
    offsets, lengths = values[0::2], values[1::2]
    ends = np.cumsum(offsets + lengths)  # each offset counts from the end of the previous run
    if ends.size and ends[-1] > size:
        raise InterpError(f"{path}, line {line}: runs end at pixel {ends[-1]}, past the {size}-pixel image")
    return ends - lengths, ends


def load_siim_masks(path: str | Path, shape: tuple[int, int] = SIIM_SHAPE) -> RleMasks:
    """SIIM-ACR pneumothorax: {ImageId: mask [H, W]} ("-1": all False; several rows OR-ed)."""
    runs: dict[str, list[tuple[np.ndarray, np.ndarray]]] = {}
    for line, (image, rle) in _rows(path, ("ImageId", "EncodedPixels")):
        parts = runs.setdefault(image, [])
        if rle != "-1":
            parts.append(_siim_runs(path, line, rle, shape[0] * shape[1]))
    return RleMasks(runs, shape)


# ---------------------------------------------------------------------------------------
# labels


def load_chexpert_labels(path: str | Path) -> dict[str, dict[str, int | None]]:
    """CheXpert: {Path: {label: 1 | 0 | -1 | None}} over `CHEXPERT_LABELS` (None: not mentioned)."""
    out: dict[str, dict[str, int | None]] = {}
    for line, (image, *cells) in _rows(path, ("Path", *CHEXPERT_LABELS)):
        try:
            out[image] = {label: _CHEXPERT_VALUES[v] for label, v in zip(CHEXPERT_LABELS, cells)}
        except KeyError:
            label, v = next((label, v) for label, v in zip(CHEXPERT_LABELS, cells) if v not in _CHEXPERT_VALUES)
            raise InterpError(f"{path}, line {line}: column {label!r} is {v!r}, not 1.0, 0.0, -1.0 or empty") from None
    return out


# ---------------------------------------------------------------------------------------
# fixations


def _fixations(rows: list[list[float]]) -> Fixations:
    a = np.array(rows, dtype=np.float64).reshape(-1, 3)  # (y, x, duration)
    return Fixations(a[:, :2], a[:, 2])


def load_reflacx_fixations(path: str | Path) -> Fixations:
    """One REFLACX reading's fixations; duration = timestamp_end_fixation - timestamp_start_fixation."""
    columns = ("y_position", "x_position", "timestamp_start_fixation", "timestamp_end_fixation")
    rows = []
    for line, cells in _rows(path, columns):
        y, x, start, end = _floats(path, line, columns, cells)
        rows.append([y, x, end - start])
    return _fixations(rows)


def load_egd_fixations(path: str | Path) -> dict[str, Fixations]:
    """EGD-CXR fixations: {DICOM_ID: Fixations}, durations from FPOGD."""
    columns = ("DICOM_ID", "Y_ORIGINAL", "X_ORIGINAL", "FPOGD")
    rows: dict[str, list[list[float]]] = {}
    for line, (image, *cells) in _rows(path, columns):
        rows.setdefault(image, []).append(_floats(path, line, columns[1:], cells))
    return {image: _fixations(r) for image, r in rows.items()}


def fixation_map(fix: Fixations, shape: tuple[int, int], sigma: float) -> np.ndarray:
    """A human attention map [H, W] summing to 1: each fixation's duration at its pixel, blurred by a
    Gaussian of ``sigma`` pixels (zero beyond the image; REFLACX's own maps use one visual degree,
    its ``angular_resolution_*_pixels_per_degree``). Fixations off the image are dropped."""
    rows, cols, on = point_pixels(fix.points, shape)
    heat = np.zeros(shape, dtype=np.float64)
    np.add.at(heat, (rows, cols), fix.durations[on])
    heat = ndimage.gaussian_filter(heat, sigma, mode="constant")
    total = heat.sum()
    if not total > 0:
        raise InterpError("the fixations on the image have no positive total duration")
    return heat / total
