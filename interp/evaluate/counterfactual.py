"""The causal filter of the MedFocus evaluation: keep a sample only if its expert region is verified
causal by counterfactual editing.

Three edits of the image (as published): the finding region edited to show no finding; the
background (everything outside the region) edited to show no finding; the background edited to show
no abnormality. A sample is kept when the model answers yes on the original, no on the finding edit
and yes on both background edits. Phantoms give every edit exactly (re-rendering the same spec without
the finding leaves pixels outside its mask unchanged; background edits are re-rendered with another
texture seed and pasted around the untouched region). With a confounder (chest tube) one more edit
removes both the finding and the confounder, which separates *lesion-causal* samples (the filter
passes) from *shortcut-causal* ones (the finding edit keeps "yes", removing the confounder too flips it
to "no": the evidence the model answers from is the confounder). Real images take a folder of edited images from the user's own generative
editor (:func:`folder_edits`) or the documented crude edit :func:`blur_edits`.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

import numpy as np
from scipy import ndimage

from interp.data.phantom import CONFOUNDERS, Phantom, PhantomSpec, render
from interp.errors import InterpError

EDITS = ("finding_removed", "background_no_finding", "background_normal")
CONFOUNDER_EDIT = "finding_and_confounder_removed"
#: what the model must answer on the original and each edit for a sample to be kept
EXPECTED = {"original": "yes", "finding_removed": "no", "background_no_finding": "yes", "background_normal": "yes"}
BACKGROUND_SEED = 7919  # added to the image's seed for the re-rendered background
DILATE = 1  # pixels the finding region grows by, so its anti-aliased rim is inside it


@dataclass
class Verdict:
    """Answers on the original and each edit, the kind of sample, and the expert region."""

    answers: dict[str, str]
    kind: str  # "lesion" (kept), "shortcut" (confounder-causal), "rejected"
    region: np.ndarray  # the evidence region for evaluation: the finding mask, or the confounder's for shortcut samples
    edits: dict[str, np.ndarray] = field(default_factory=dict)

    @property
    def kept(self) -> bool:
        return self.kind == "lesion"


def region_of(mask: np.ndarray, dilate: int = DILATE) -> np.ndarray:
    """The edited region: ``mask`` grown by ``dilate`` pixels."""
    return ndimage.binary_dilation(mask, iterations=dilate) if dilate else mask.copy()


def phantom_edits(phantom: Phantom, finding: str, seed: int, size: int) -> dict[str, np.ndarray]:
    """The three published edits (plus the finding and the confounder removed together, when one is drawn)."""
    spec = phantom.spec
    if finding not in phantom.finding_masks:
        raise InterpError(f"the phantom has no {finding}: nothing to edit")
    region = region_of(phantom.finding_masks[finding])
    without = spec.without(finding)
    normal = PhantomSpec(spec.anatomy)
    bg = seed + BACKGROUND_SEED
    edits = {
        "finding_removed": render(without, seed, size).image,
        "background_no_finding": np.where(region, phantom.image, render(without, bg, size).image),
        "background_normal": np.where(region, phantom.image, render(normal, bg, size).image),
    }
    if spec.confounders:
        edits[CONFOUNDER_EDIT] = render(replace(without, confounders=()), seed, size).image
    return edits


def blur_edits(image: np.ndarray, region: np.ndarray, sigma: float = 8.0) -> dict[str, np.ndarray]:
    """A crude, documented edit for real images with no generative editor: the region is filled from its
    surroundings (nearest outside pixel, then Gaussian-blurred with ``sigma``); background edits blur
    everything outside the region (no texture, so "no finding" and "no abnormality" are the same edit)."""
    if region.shape != image.shape[:2] or not region.any():
        raise InterpError(f"edit region must be a non-empty mask of the image's shape {image.shape[:2]}, got {region.shape}")
    idx = ndimage.distance_transform_edt(region, return_distances=False, return_indices=True)
    filled = image[tuple(idx)]
    spatial = (sigma, sigma) + (0,) * (image.ndim - 2)
    smooth = ndimage.gaussian_filter(filled, spatial)
    inside = region if image.ndim == 2 else region[..., None]
    background = np.where(inside, image, ndimage.gaussian_filter(image, spatial))
    return {"finding_removed": np.where(inside, smooth, image), "background_no_finding": background,
            "background_normal": background}


def folder_edits(folder: str | Path, image_id: str) -> dict[str, np.ndarray]:
    """Edited images from a user's generative editor: ``<folder>/<image_id>/<edit>.png`` (or any format
    :func:`~interp.data.images.load_image` reads) for each of :data:`EDITS`."""
    from interp.data.images import load_image

    out = {}
    for edit in EDITS:
        found = sorted((Path(folder) / image_id).glob(f"{edit}.*"))
        if not found:
            raise InterpError(f"no {edit} image for {image_id!r} in {folder} (expected {image_id}/{edit}.png)")
        out[edit] = load_image(found[0])
    return out


def judge(answer: Callable[[np.ndarray], str], original: np.ndarray, edits: dict[str, np.ndarray],
          finding_region: np.ndarray, confounder_region: np.ndarray | None = None) -> Verdict:
    """Ask ``answer(image) -> "yes" | "no" | ...`` on the original and every edit; classify the sample."""
    answers = {"original": answer(original), **{k: answer(v) for k, v in edits.items()}}
    passes = all(answers[k] == v for k, v in EXPECTED.items())
    if passes:
        return Verdict(answers, "lesion", finding_region, edits)
    shortcut = (CONFOUNDER_EDIT in answers and confounder_region is not None and answers["original"] == "yes"
                and answers["finding_removed"] == "yes" and answers[CONFOUNDER_EDIT] == "no")
    if shortcut:
        return Verdict(answers, "shortcut", confounder_region, edits)
    return Verdict(answers, "rejected", finding_region, edits)


def confounder_mask(phantom: Phantom) -> np.ndarray | None:
    """Union of the phantom's confounder masks (None without one)."""
    masks = [phantom.confounder_masks[c] for c in CONFOUNDERS if c in phantom.confounder_masks]
    return np.logical_or.reduce(masks) if masks else None
