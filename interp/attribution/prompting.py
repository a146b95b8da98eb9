"""Prompting baselines of the MedFocus paper: the model names the region itself.

The organism is asked the laterality question (and, for findings that have one, the zone question)
about the finding in the sample's question; the named region (side, zone; the heart for
cardiomegaly) becomes the map. ``prompting``: the region's canonical box, averaged over the atlas's
normal references (no look at this image's anatomy); ``prompting_segmentation``: the named anatomy
localised on this image by the MedFocus UOT step, then cut to the named zone. Questions use the
phantom VQA vocabulary, so these baselines run on organisms (a real LVLM would be asked for box
coordinates instead).
"""

from __future__ import annotations

import numpy as np

from interp.attribution.base import Attribution, Method, Sample, Scorer, respond
from interp.attribution.medfocus_atlas import Atlas, load_atlas
from interp.data.phantom import FIXED_ZONE, SIDES, ZONES
from interp.data.vqa import FINDING_WORDS, question
from interp.errors import InterpError
from interp.models.adapter import Adapter


def finding_of(sample: Sample) -> str:
    """The finding a phantom VQA question asks about (from its ``finding`` span)."""
    if "finding" not in sample.spans:
        raise InterpError("prompting baselines need the question's 'finding' span (phantom VQA prompts)")
    a, b = sample.spans["finding"]
    words = sample.prompt[a:b]
    names = [f for f, w in FINDING_WORDS.items() if w == words]
    if not names:
        raise InterpError(f"prompting baselines know the phantom findings only, not {words!r}")
    return names[0]


def zone_rows(mask: np.ndarray, zone: str | None) -> np.ndarray:
    """``mask`` cut to one third of its rows' extent (upper / middle / lower); all of it without a zone."""
    if zone is None or not mask.any():
        return mask
    ys = np.nonzero(mask.any(1))[0]
    lo, hi = ys.min(), ys.max() + 1
    k = ZONES.index(zone)
    cut = np.zeros_like(mask)
    cut[lo + (hi - lo) * k // 3: lo + (hi - lo) * (k + 1) // 3] = True
    return mask & cut


def box_of(mask: np.ndarray) -> np.ndarray:
    from interp.attribution.medfocus import bounding_box

    return bounding_box(mask)


class Prompting(Method):
    """The region the model names, as a canonical atlas box (``segment=False``) or segmented on the image."""

    name = "prompting"

    def __init__(self, adapter: Adapter, atlas: Atlas | str | None = None, segment: bool = False) -> None:
        super().__init__(adapter)
        self.atlas = atlas if isinstance(atlas, Atlas) else load_atlas(atlas)
        self.segment = segment
        if segment:
            self.name = "prompting_segmentation"

    def named(self, sample: Sample, finding: str) -> tuple[str, str | None] | str:
        """(concept, zone) the model names for ``finding`` in ``sample``'s image, or its answer when that names
        no side or zone (e.g. about a finding it does not see)."""
        if finding == "cardiomegaly":
            return "cardiac_silhouette", None

        def ask(kind: str) -> str:
            q = question(kind, finding)
            return respond(self.adapter, Sample(sample.image, q.prompt, q.spans)).split()[-1]

        side = ask("laterality")
        if side not in SIDES:
            return side
        zone = FIXED_ZONE.get(finding) or ask("zone")
        if zone not in ZONES:
            return zone
        return (f"costophrenic_{side}", None) if finding == "pleural_effusion" else (f"lung_{side}", zone)

    def _attribute(self, scorer: Scorer) -> Attribution:
        image = scorer.sample.image
        named = self.named(scorer.sample, finding_of(scorer.sample))
        if isinstance(named, str):  # the model locates nothing: an empty map, its answer in meta
            empty = np.zeros(image.shape[:2], dtype=bool)
            return self.result(scorer, empty.astype(np.float64), region=empty, meta={"concept": None, "answer": named})
        concept, zone = named
        if self.segment:
            from interp.attribution.uot import localise

            region = zone_rows(localise(image if image.ndim == 2 else image.mean(-1), self.atlas, [concept])[concept], zone)
        else:
            boxes = [box_of(zone_rows(m, zone)) for m in self.atlas.masks[concept]]
            mean = np.mean(boxes, axis=0) >= 0.5  # the pixels most references' boxes cover
            h, w = image.shape[:2]
            ah, aw = mean.shape
            region = mean[np.ix_((np.arange(h) * ah // h), (np.arange(w) * aw // w))]
        return self.result(scorer, region.astype(np.float64), region=region, meta={"concept": concept, "zone": zone})
