"""Distribution shifts of phantom images, for measuring (and training) an organism's robustness.

A shift changes how an image looks, never what it shows, so every item keeps its answer:
- ``contrast c``: pixel values scaled by ``c`` about the image's mean (a flatter or harsher exposure);
- ``rotation r``: the patient rotated by ``r`` degrees (alternating sign per image), rendered exactly
  (the anatomy, findings and masks turn together; training phantoms stay within +-4);
- ``chest tube``: a drain drawn into every image, beside no particular finding.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from interp.data.phantom import CONFOUNDERS, PhantomSpec
from interp.data.vqa import VQADataset
from interp.errors import InterpError


@dataclass(frozen=True)
class Shift:
    """One shift: ``contrast`` factor, patient ``rotation`` in degrees (None: the spec's own), ``tube`` added."""

    name: str
    contrast: float = 1.0
    rotation: float | None = None
    tube: bool = False

    def spec(self, spec: PhantomSpec, i: int) -> PhantomSpec:
        """Image ``i``'s spec under the shift (rotation sign alternates with ``i``)."""
        if self.rotation is not None:
            spec = rotated(spec, self.rotation * (1 if i % 2 == 0 else -1))
        if self.tube and CONFOUNDERS[0] not in spec.confounders:
            spec = replace(spec, confounders=(*spec.confounders, CONFOUNDERS[0]))
        return spec

    def dataset(self, ds: VQADataset) -> VQADataset:
        """``ds`` with every spec shifted (same items, answers and render seeds)."""
        return replace(ds, specs=[self.spec(s, i) for i, s in enumerate(ds.specs)])

    def pixels(self, images: np.ndarray) -> np.ndarray:
        """Images [..., H, W] in [0, 1] with contrast scaled about each image's mean."""
        return contrast(images, self.contrast)


def rotated(spec: PhantomSpec, degrees: float) -> PhantomSpec:
    """``spec`` with the patient rotated by ``degrees`` (instead of its own rotation)."""
    return replace(spec, anatomy=replace(spec.anatomy, rotation=float(degrees)))


def contrast(images: np.ndarray, factor: float | np.ndarray) -> np.ndarray:
    """``mean + factor * (image - mean)`` per image of [..., H, W] (factor: scalar, or one per image along the
    leading axes)."""
    images = np.asarray(images, np.float32)
    mean = images.mean((-2, -1), keepdims=True)
    factor = np.asarray(factor, np.float32)
    factor = factor.reshape(factor.shape + (1,) * (images.ndim - factor.ndim))
    return mean + factor * (images - mean)


SHIFTS = {s.name: s for s in (Shift("contrast 0.6", contrast=0.6), Shift("contrast 0.85", contrast=0.85),
                              Shift("rotation 10", rotation=10.0), Shift("chest tube", tube=True))}


def shift(name: str) -> Shift:
    """The shift called ``name`` (one of ``SHIFTS``)."""
    if name not in SHIFTS:
        raise InterpError(f"unknown shift {name!r}; valid: {', '.join(SHIFTS)}")
    return SHIFTS[name]
