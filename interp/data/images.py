"""Load real radiographs as float32 [H, W] arrays in [0, 1] (bright = dense).

Images larger than PIL's ``Image.MAX_IMAGE_PIXELS`` are refused from their header, before decoding.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np

from interp.errors import InterpError


def _check_pixels(path: Path, width: int, height: int) -> None:
    from PIL import Image

    limit = Image.MAX_IMAGE_PIXELS
    if limit and width * height > limit:
        raise InterpError(f"image {path} is too large ({width} x {height} pixels, limit {limit}): downscale it")


def _read_dicom(path: Path, decode: bool) -> np.ndarray | None:
    import pydicom

    ds = pydicom.dcmread(path, stop_before_pixels=not decode)
    _check_pixels(path, int(ds.Columns), int(ds.Rows))
    if not decode:
        return None
    img = ds.pixel_array.astype(np.float64)
    if img.ndim == 3:  # multi-frame or colour: first frame / mean channel
        img = img[0] if ds.get("NumberOfFrames", 1) > 1 else img.mean(-1)
    img = img * float(ds.get("RescaleSlope", 1.0)) + float(ds.get("RescaleIntercept", 0.0))
    if ds.get("PhotometricInterpretation") == "MONOCHROME1":  # low values are bright
        img = img.max() - img
    return img


def _read_raster(path: Path, decode: bool) -> np.ndarray | None:
    from PIL import Image

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # the size is checked below
        try:
            im = Image.open(path)  # reads the header only
        except Image.DecompressionBombError:  # over twice the limit
            limit = Image.MAX_IMAGE_PIXELS
            raise InterpError(f"image {path} is too large (over {2 * limit} pixels, limit {limit}): downscale it") from None
    with im:
        _check_pixels(path, *im.size)
        if not decode:
            return None
        im = im.convert("I;16") if im.mode in ("I;16", "I;16B", "I") else im.convert("L")
        return np.asarray(im, dtype=np.float64)


def _read(path: Path, decode: bool) -> np.ndarray | None:
    try:
        with open(path, "rb") as fh:
            head = fh.read(132)
        is_dicom = path.suffix.lower() in (".dcm", ".dicom") or head[128:132] == b"DICM"
        return _read_dicom(path, decode) if is_dicom else _read_raster(path, decode)
    except InterpError:
        raise
    except Exception as e:  # PIL and pydicom raise many types; all mean "unreadable"
        raise InterpError(f"unreadable image {path}: {type(e).__name__}: {e}") from None


def check_image(path: str | Path) -> None:
    """From its header only: InterpError if ``path`` is not an image ``load_image`` reads, or too large."""
    _read(Path(path), decode=False)


def load_image(path: str | Path) -> np.ndarray:
    """A PNG/JPEG (PIL) or DICOM (pydicom) radiograph, min-max scaled to float32 [0, 1]."""
    path = Path(path)
    img = _read(path, decode=True)
    if img.ndim != 2 or img.size == 0:
        raise InterpError(f"unreadable image {path}: expected a 2-D grayscale image, got shape {img.shape}")
    lo, hi = float(img.min()), float(img.max())
    out = (img - lo) / (hi - lo) if hi > lo else np.zeros_like(img)
    return out.astype(np.float32)
