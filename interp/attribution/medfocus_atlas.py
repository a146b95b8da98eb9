"""MedFocus reference atlas: normal chest images with anatomical concept masks, as safetensors.

The file holds ``images`` float32 [n, H, W] (intensities >= 0), ``masks`` uint8 [n, C, H, W]
(0/1) and metadata ``concepts`` (JSON list of the C mask names) and ``ids`` (JSON list of n
reference names). The shipped phantom atlas (``phantom_atlas.safetensors``, also listing its
``seeds``) is normal phantoms (no findings, anatomy from ``Anatomy.sample``) and is rebuilt with
``python -m interp.attribution.medfocus_atlas --out PATH``; a user atlas in the same format loads
from its path.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import numpy as np

from interp.data.phantom import Anatomy, PhantomSpec, render
from interp.errors import InterpError

#: MedFocus concept -> the phantom concept masks it is the union of
MEDFOCUS_CONCEPTS: dict[str, tuple[str, ...]] = {
    "cardiac_silhouette": ("heart",),
    "lung_left": ("lung_left",),
    "lung_right": ("lung_right",),
    "mediastinum": ("mediastinum",),
    "upper_mediastinum": ("upper_mediastinum",),
    "clavicle_left": ("clavicle_left",),
    "clavicle_right": ("clavicle_right",),
    "hilum_left": ("hilum_left",),
    "hilum_right": ("hilum_right",),
    "costophrenic_left": ("costophrenic_left",),
    "costophrenic_right": ("costophrenic_right",),
    "lungs": ("lung_left", "lung_right"),
    "clavicles": ("clavicle_left", "clavicle_right"),
    "hila": ("hilum_left", "hilum_right"),
    "costophrenic_angles": ("costophrenic_left", "costophrenic_right"),
}
#: render seeds of the shipped atlas (query phantoms elsewhere must avoid them)
ATLAS_SEEDS = tuple(range(9000, 9008))
DEFAULT_PATH = Path(__file__).parent / "atlas" / "phantom_atlas.safetensors"


@dataclass(frozen=True)
class Atlas:
    """Reference images [n, H, W], concept masks name -> bool [n, H, W], concept names, reference ids."""

    images: np.ndarray
    masks: dict[str, np.ndarray]
    concepts: tuple[str, ...]
    ids: tuple[str, ...]


def medfocus_masks(concept_masks: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """MedFocus concept masks of one phantom from its ``Phantom.concept_masks``."""
    return {name: np.logical_or.reduce([concept_masks[p] for p in parts])
            for name, parts in MEDFOCUS_CONCEPTS.items()}


def build_phantom_atlas(path: str | Path, seeds: tuple[int, ...] = ATLAS_SEEDS) -> Path:
    """Render one normal phantom per seed (anatomy from ``Anatomy.sample`` of that seed) and write the atlas."""
    from safetensors.numpy import save_file

    phantoms = [render(PhantomSpec(Anatomy.sample(np.random.default_rng(s))), s) for s in seeds]
    masks = [medfocus_masks(p.concept_masks) for p in phantoms]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(
        {"images": np.stack([p.image for p in phantoms]),
         "masks": np.array([[m[c] for c in MEDFOCUS_CONCEPTS] for m in masks], np.uint8)},
        str(path),
        metadata={"concepts": json.dumps(list(MEDFOCUS_CONCEPTS)),
                  "ids": json.dumps([f"phantom-{s}" for s in seeds]),
                  "seeds": json.dumps(list(seeds))},
    )
    return path


def _names(meta: dict[str, str], key: str, n: int, where: str) -> tuple[str, ...]:
    """Metadata ``key``: a JSON list of n distinct strings."""
    try:
        names = json.loads(meta[key])
    except (KeyError, json.JSONDecodeError):
        raise InterpError(f"{where}: metadata {key!r} must be a JSON list of names") from None
    if (not isinstance(names, list) or len(names) != n or len(set(names)) != n
            or not all(isinstance(s, str) and s for s in names)):
        raise InterpError(f"{where}: metadata {key!r} must list {n} distinct names, got {names!r}")
    return tuple(names)


def load_atlas(path: str | Path | None = None) -> Atlas:
    """The atlas at ``path`` (default: the shipped phantom atlas), checked for shape, dtype and content."""
    from safetensors import SafetensorError, safe_open

    path = Path(path) if path is not None else DEFAULT_PATH
    where = f"atlas {path}"
    if not path.is_file():
        raise InterpError(f"{where}: no such file")
    try:
        with safe_open(str(path), framework="np") as f:
            keys, meta = set(f.keys()), f.metadata() or {}
            if keys != {"images", "masks"}:
                raise InterpError(f"{where}: tensors {sorted(keys)}, expected ['images', 'masks']")
            images, masks = f.get_tensor("images"), f.get_tensor("masks")
    except (SafetensorError, OSError) as e:
        raise InterpError(f"{where}: not a readable safetensors file ({e})") from None
    if images.dtype != np.float32 or images.ndim != 3 or len(images) == 0:
        raise InterpError(f"{where}: images must be float32 [n, H, W], got {images.dtype} {list(images.shape)}")
    if not np.isfinite(images).all() or images.min() < 0:
        raise InterpError(f"{where}: images must be finite and >= 0")
    n, h, w = images.shape
    if masks.dtype != np.uint8 or masks.ndim != 4 or masks.shape[0] != n or masks.shape[2:] != (h, w):
        raise InterpError(f"{where}: masks must be uint8 [{n}, concepts, {h}, {w}], "
                          f"got {masks.dtype} {list(masks.shape)}")
    if masks.max(initial=0) > 1:
        raise InterpError(f"{where}: masks must hold 0 or 1")
    concepts = _names(meta, "concepts", masks.shape[1], where)
    ids = _names(meta, "ids", n, where)
    empty = [(ids[i], concepts[c]) for i, c in zip(*np.nonzero(~masks.any(axis=(2, 3))))]
    if empty:
        raise InterpError(f"{where}: empty masks (reference, concept): {empty}")
    return Atlas(images=images, masks={c: masks[:, k].astype(bool) for k, c in enumerate(concepts)},
                 concepts=concepts, ids=ids)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Build the MedFocus phantom atlas: normal phantoms, concept masks.")
    p.add_argument("--out", type=Path, default=DEFAULT_PATH, help="file to write (default: the shipped atlas)")
    print(build_phantom_atlas(p.parse_args(argv).out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
