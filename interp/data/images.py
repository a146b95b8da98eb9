"""Load real radiographs as float32 [H, W] arrays in [0, 1] (bright = dense)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from interp.errors import InterpError


def _read_dicom(path: Path) -> np.ndarray:
    import pydicom

    ds = pydicom.dcmread(path)
    img = ds.pixel_array.astype(np.float64)
    if img.ndim == 3:  # multi-frame or colour: first frame / mean channel
        img = img[0] if ds.get("NumberOfFrames", 1) > 1 else img.mean(-1)
    img = img * float(ds.get("RescaleSlope", 1.0)) + float(ds.get("RescaleIntercept", 0.0))
    if ds.get("PhotometricInterpretation") == "MONOCHROME1":  # low values are bright
        img = img.max() - img
    return img


def _read_raster(path: Path) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as im:
        im = im.convert("I;16") if im.mode in ("I;16", "I;16B", "I") else im.convert("L")
        return np.asarray(im, dtype=np.float64)


def load_image(path: str | Path) -> np.ndarray:
    """A PNG/JPEG (PIL) or DICOM (pydicom) radiograph, min-max scaled to float32 [0, 1]."""
    path = Path(path)
    try:
        with open(path, "rb") as fh:
            head = fh.read(132)
        is_dicom = path.suffix.lower() in (".dcm", ".dicom") or head[128:132] == b"DICM"
        img = _read_dicom(path) if is_dicom else _read_raster(path)
    except Exception as e:  # PIL and pydicom raise many types; all mean "unreadable"
        raise InterpError(f"unreadable image {path}: {type(e).__name__}: {e}") from None
    if img.ndim != 2 or img.size == 0:
        raise InterpError(f"unreadable image {path}: expected a 2-D grayscale image, got shape {img.shape}")
    lo, hi = float(img.min()), float(img.max())
    out = (img - lo) / (hi - lo) if hi > lo else np.zeros_like(img)
    return out.astype(np.float32)
