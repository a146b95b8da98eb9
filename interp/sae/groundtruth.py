"""Score SAE features against phantom ground truth: AUROC for detection, IoU for localisation.

Everything works on plain arrays: feature activations per image ``[n_images, n_features]`` or per
image patch ``[n_images, n_patches, n_features]``, and the phantom's masks put on the model's patch
grid with :func:`mask_to_grid` (each patch's share of pixels inside the mask).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import xarray as xr

from interp.models.adapter import Box
from interp.trace.sweep import mask_fraction

MASK_FRACTION = 0.5  # default: a patch is inside a mask when at least this share of its pixels is
CHUNK = 2**22  # score elements ranked at once (bounds memory when scoring many features)


def mask_to_grid(mask: np.ndarray, boxes: Sequence[Box | None]) -> np.ndarray:
    """Share of each patch's box (y0, x0, y1, x1 in ``mask``'s pixels, end-exclusive) inside the
    bool ``mask`` [H, W]: float [n_patches]; a ``None`` box (no image patch) gives 0. Partial pixels
    count whole, as in :func:`interp.trace.sweep.mask_fraction`."""
    n = len(boxes)
    labels = {"kind": ["image"] * n, "row": [0] * n, "boxes": [[b] for b in boxes]}
    return np.asarray(mask_fraction(mask, labels), dtype=float)


def _ranks(scores: np.ndarray) -> np.ndarray:
    """1-based ranks within each row of ``scores`` [k, n], tied scores given their average rank."""
    order = np.argsort(scores, axis=1)
    s = np.take_along_axis(scores, order, axis=1)
    n = s.shape[1]
    first = np.ones(s.shape, bool)  # first / last element of a run of equal scores
    first[:, 1:] = s[:, 1:] != s[:, :-1]
    last = np.ones(s.shape, bool)
    last[:, :-1] = first[:, 1:]
    idx = np.arange(n)
    start = np.maximum.accumulate(np.where(first, idx, 0), axis=1)
    end = np.minimum.accumulate(np.where(last, idx + 1, n)[:, ::-1], axis=1)[:, ::-1]
    ranks = np.empty(s.shape)
    np.put_along_axis(ranks, order, (start + 1 + end) / 2, axis=1)
    return ranks


def _auroc_table(scores: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """AUROC [c, k] of each column of ``scores`` [n, k] for each row of bool ``labels`` [c, n]:
    Mann-Whitney U / (n_pos n_neg), ties averaged; NaN for a row with an empty class. Columns are
    ranked in chunks of at most ``CHUNK`` elements."""
    scores = np.asarray(scores)
    labels = np.asarray(labels, bool).reshape(-1, len(scores))
    n, k = scores.shape
    pos = labels.sum(1).astype(float)[:, None]
    rank_sums = np.empty((len(labels), k))
    step = max(1, CHUNK // max(n, 1))
    for j in range(0, k, step):
        rank_sums[:, j:j + step] = labels.astype(float) @ _ranks(np.ascontiguousarray(scores[:, j:j + step].T, dtype=float)).T
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(pos * (n - pos) > 0, (rank_sums - pos * (pos + 1) / 2) / (pos * (n - pos)), np.nan)


def auroc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Area under the ROC curve of ``scores`` [n] for bool ``labels`` [n]: the probability that a
    positive outscores a negative, ties counting half (rank-based Mann-Whitney U); NaN when one
    class is empty."""
    return float(_auroc_table(np.asarray(scores, float).reshape(-1, 1), labels)[0, 0])


def feature_concept_auroc(acts: np.ndarray, labels: Mapping[str, np.ndarray]) -> xr.DataArray:
    """AUROC of every feature for every concept: ``acts`` [n, n_features] (images, or patches
    flattened), ``labels`` concept -> bool [n]; a DataArray (concept, feature), concepts in
    ``labels``' order."""
    acts = np.asarray(acts)
    table = _auroc_table(acts, np.array(list(labels.values()), bool).reshape(len(labels), len(acts)))
    return xr.DataArray(table, dims=("concept", "feature"),
                        coords={"concept": list(labels), "feature": np.arange(acts.shape[1])})


def best_features(table: xr.DataArray) -> dict[str, tuple[int | None, float]]:
    """Per concept of a :func:`feature_concept_auroc` table, the feature with the highest AUROC and
    that AUROC; ``(None, nan)`` where the AUROC is undefined (a class is empty)."""
    out: dict[str, tuple[int | None, float]] = {}
    for concept, row in zip(table["concept"].values.tolist(), table.values):
        if np.isnan(row).all():
            out[concept] = (None, float("nan"))
        else:
            j = int(np.nanargmax(row))
            out[concept] = (int(table["feature"].values[j]), float(row[j]))
    return out


def feature_iou(patch_acts: np.ndarray, masks_on_grid: np.ndarray, threshold: float = 0.0,
                quantile: float | None = None, inside: float = MASK_FRACTION) -> tuple[float | np.ndarray, np.ndarray]:
    """IoU of a feature's active patches with the true mask.

    ``patch_acts``: one feature's activations [n_images, n_patches], or several
    [n_images, n_patches, n_features]; ``masks_on_grid`` [n_images, n_patches]: share of each patch
    inside the mask (:func:`mask_to_grid`), a patch counting as inside at ``inside`` or more.
    A patch is active when its activation exceeds ``threshold`` (default 0: a sparse code's active
    set) or, when ``quantile`` is given, that quantile of the feature's activations over all patches
    of all images. Returns (pooled IoU: sum of intersections / sum of unions over images; per-image
    IoU [n_images]), each with a trailing feature axis for 3-d input; NaN where the union is empty.
    """
    acts = np.asarray(patch_acts, float)
    single = acts.ndim == 2
    acts = acts[..., None] if single else acts
    cut = threshold if quantile is None else np.quantile(acts.reshape(-1, acts.shape[-1]), quantile, axis=0)
    active = acts > cut
    true = (np.asarray(masks_on_grid, float) >= inside)[..., None]
    inter, union = (active & true).sum(1), (active | true).sum(1)  # [n_images, n_features]

    def ratio(a: np.ndarray, b: np.ndarray) -> np.ndarray:
        return np.where(b > 0, a / np.maximum(b, 1), np.nan)

    pooled, per_image = ratio(inter.sum(0), union.sum(0)), ratio(inter, union)
    return (float(pooled[0]), per_image[:, 0]) if single else (pooled, per_image)


def _json(x: float) -> float | None:
    return None if np.isnan(x) else float(x)


def score_features(patch_acts: np.ndarray, findings: Mapping[str, np.ndarray],
                   concepts: Mapping[str, np.ndarray], image_acts: np.ndarray | None = None,
                   threshold: float = 0.0, quantile: float | None = None, inside: float = MASK_FRACTION) -> list[dict]:
    """For every finding and anatomical concept: its best single feature, that feature's AUROC and
    the pooled IoU of its thresholded patch map with the true mask (:func:`feature_iou`), as
    JSON-ready rows (``None`` where undefined).

    ``patch_acts`` [n_images, n_patches, n_features]: activations on image patches only;
    ``findings`` / ``concepts``: name -> mask on the grid [n_images, n_patches] (:func:`mask_to_grid`;
    zeros where the image lacks it). ``image_acts`` [n_images, n_features] default to the max over
    patches.

    Findings (``level: image``): an image is positive when any of its patches touches the finding;
    the best feature has the highest image-level AUROC of ``image_acts``. Anatomical concepts are
    present in every image, so image-level AUROC is undefined for them (``level: patch``): the best
    feature has the highest patch-level AUROC of the patch activation against the patch lying in
    the concept (share >= ``inside``), over all patches of all images. ``positives`` / ``n`` count
    images or patches accordingly; IoU takes the same ``inside`` (and ``threshold`` / ``quantile``).

    Structures thinner than a patch never fill half of one: on the organism's grid of 8-px patches
    the diaphragms and the trachea have no patch at share >= 0.5 (patch-level AUROC undefined:
    ``None``) and most nodules none either (their IoU then only counts false activations); pass a
    lower ``inside`` to score them.
    """
    acts = np.asarray(patch_acts)
    image_acts = acts.max(1) if image_acts is None else np.asarray(image_acts)
    groups = (("finding", "image", image_acts, findings, {k: np.asarray(m).max(1) > 0 for k, m in findings.items()}),
              ("anatomy", "patch", acts.reshape(-1, acts.shape[-1]), concepts,
               {k: np.asarray(m).reshape(-1) >= inside for k, m in concepts.items()}))
    rows = []
    for kind, level, scores, masks, labels in groups:
        for name, (feature, score) in best_features(feature_concept_auroc(scores, labels)).items():
            iou = float("nan") if feature is None else feature_iou(acts[..., feature], masks[name], threshold, quantile, inside)[0]
            rows.append({"concept": name, "kind": kind, "level": level, "feature": feature, "auroc": _json(score),
                         "iou": _json(iou), "positives": int(labels[name].sum()), "n": int(labels[name].size)})
    return rows
