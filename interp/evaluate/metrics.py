"""Localisation, faithfulness and human-agreement metrics for attribution maps.

A map is a float array [H, W] in the image's pixel frame; a mask is a boolean array of the same
shape; a box is (y0, x0, y1, x1) in pixels, end-exclusive. Pixel i spans [i, i + 1), so a box
with fractional edges covers the pixels whose centres it contains, and a (y, x) point lies in
pixel (floor(y), floor(x)). Values a metric leaves undefined (the NSS, CC or AUC-Judd of a
constant map) are NaN, which `bootstrap_ci` drops; bad input raises InterpError.

- boxes: `boxes_from_map` (the MedFocus boxes: threshold at a quantile, 8-connected components,
  the largest kept), `box_union_mask`, `box_scores` (IoU, precision, recall, F1 of the box unions);
- masks: `pointing_game`, `energy_in_mask`, `auprc` (average precision as sklearn defines it);
- faithfulness: `deletion_insertion` (pixels removed / restored in the map's order);
- concepts: `concept_rank`, `concept_rank_accuracy`; statistics: `bootstrap_ci`;
- human attention, as defined by Bylinskii et al. 2018 ("What do different evaluation metrics tell
  us about saliency models?") and their MIT saliency benchmark MATLAB code (cvzoya/saliency,
  ``code_forMetrics``): `nss`, `auc_judd` (without its random jitter), `cc`, `kl`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence

import numpy as np
from scipy import ndimage, stats

from interp.errors import InterpError

Bbox = tuple[int, int, int, int]  # (y0, x0, y1, x1), end-exclusive
SCORE_KEYS = ("iou", "precision", "recall", "f1")
_EIGHT = np.ones((3, 3), dtype=bool)  # 8-connectivity for ndimage.label


def _map(values: np.ndarray, name: str = "map") -> np.ndarray:
    a = np.asarray(values, dtype=np.float64)
    if a.ndim != 2 or a.size == 0:
        raise InterpError(f"{name} must be a non-empty 2-D array [H, W], got shape {a.shape}")
    if not np.isfinite(a).all():
        raise InterpError(f"{name} has non-finite values")
    return a


def _mask(mask: np.ndarray, shape: tuple[int, ...], name: str = "mask") -> np.ndarray:
    a = np.asarray(mask)
    if a.dtype != bool:
        raise InterpError(f"{name} must be boolean, got dtype {a.dtype}")
    if a.shape != shape:
        raise InterpError(f"{name} shape {a.shape} does not match the map's shape {shape}")
    if not a.any():
        raise InterpError(f"{name} is empty (no True pixel)")
    return a


def _pair(a: np.ndarray, b: np.ndarray, name: str) -> tuple[np.ndarray, np.ndarray]:
    a, b = _map(a), _map(b, name)
    if a.shape != b.shape:
        raise InterpError(f"{name} shape {b.shape} does not match the map's shape {a.shape}")
    return a, b


def _components(binary: np.ndarray) -> tuple[list[Bbox], np.ndarray]:
    """Bounding boxes and areas of the 8-connected components of ``binary``, in label order."""
    labels, n = ndimage.label(binary, structure=_EIGHT)
    boxes = [(s[0].start, s[1].start, s[0].stop, s[1].stop) for s in ndimage.find_objects(labels)]
    return boxes, np.bincount(labels.ravel(), minlength=n + 1)[1:]


# ---------------------------------------------------------------------------------------
# boxes


def boxes_from_map(map: np.ndarray, quantile: float = 0.9, min_area: int = 16, max_boxes: int = 10) -> list[Bbox]:
    """Boxes around the map's top region: pixels >= the map's ``quantile`` quantile, 8-connected
    components of at least ``min_area`` pixels, the ``max_boxes`` largest (ties in label order)."""
    m = _map(map)
    if not 0.0 <= quantile <= 1.0:
        raise InterpError(f"quantile must lie in [0, 1], got {quantile}")
    boxes, areas = _components(m >= np.quantile(m, quantile))
    order = np.argsort(-areas, kind="stable")
    return [boxes[i] for i in order if areas[i] >= min_area][:max_boxes]


def box_union_mask(boxes: Iterable[Sequence[float]], shape: tuple[int, int]) -> np.ndarray:
    """Boolean [H, W] union of boxes (y0, x0, y1, x1), end-exclusive; a pixel is in a box when its
    centre is; parts outside the image are clipped."""
    mask = np.zeros(shape, dtype=bool)
    for box in boxes:
        if len(box) != 4:
            raise InterpError(f"a box is (y0, x0, y1, x1), got {box!r}")
        y0, x0, y1, x1 = (max(int(np.ceil(v - 0.5)), 0) for v in box)  # first pixel centre >= edge
        if box[2] < box[0] or box[3] < box[1]:
            raise InterpError(f"box {tuple(box)} ends before it starts")
        mask[y0:y1, x0:x1] = True
    return mask


def box_scores(map: np.ndarray, truth: np.ndarray | Iterable[Sequence[float]], quantile: float = 0.9,
               min_area: int = 16, max_boxes: int = 10) -> dict[str, float]:
    """IoU, precision, recall and F1 (each x100) of the union of `boxes_from_map` against the union of
    the ground-truth boxes. ``truth`` is boxes, or a boolean mask whose 8-connected components'
    bounding boxes are the ground truth (so a mask is scored as its boxes, not pixel by pixel).
    No predicted box scores all zeros."""
    m = _map(map)
    if isinstance(truth, np.ndarray) and truth.dtype == bool:
        truth = _components(_mask(truth, m.shape, "ground-truth mask"))[0]
    gt = box_union_mask(truth, m.shape)
    if not gt.any():
        raise InterpError(f"no ground-truth box covers a pixel of the {m.shape} map")
    predicted = boxes_from_map(m, quantile, min_area, max_boxes)
    if not predicted:
        return dict.fromkeys(SCORE_KEYS, 0.0)
    pred = box_union_mask(predicted, m.shape)
    inter = float((pred & gt).sum())
    precision, recall = inter / pred.sum(), inter / gt.sum()
    f1 = 2 * precision * recall / (precision + recall) if inter else 0.0
    return {k: 100.0 * float(v) for k, v in zip(SCORE_KEYS, (inter / (pred | gt).sum(), precision, recall, f1))}


# ---------------------------------------------------------------------------------------
# masks


def pointing_game(map: np.ndarray, mask: np.ndarray, tolerance: float = 0.0) -> bool:
    """Whether the map's maximum lies within ``tolerance`` pixels (Euclidean, between pixel centres) of
    the mask (TorchRay's protocol uses 15 px at 224 px). The point is the maximal pixel nearest the
    centroid of all maximal pixels: a token-level map's best token is a block, pointed at by its centre
    (not its top-left pixel); a flat region by its middle; a constant map points nowhere (a miss)."""
    m = _map(map)
    ys, xs = np.nonzero(_mask(mask, m.shape))
    if tolerance < 0:
        raise InterpError(f"tolerance must be >= 0, got {tolerance}")
    if np.ptp(m) == 0:
        return False
    py, px = np.nonzero(m == m.max())
    k = np.argmin(np.hypot(py - py.mean(), px - px.mean()))
    return bool(np.hypot(ys - py[k], xs - px[k]).min() <= tolerance)


def energy_in_mask(map: np.ndarray, mask: np.ndarray) -> float:
    """Share of the map's positive mass inside the mask (0 when the map has no positive value)."""
    m = _map(map)
    inside = _mask(mask, m.shape)
    positive = np.clip(m, 0.0, None)
    total = positive.sum()
    return float(positive[inside].sum() / total) if total > 0 else 0.0


def auprc(map: np.ndarray, mask: np.ndarray) -> float:
    """Average precision of the map's values ranking the mask's pixels: sum over the distinct values,
    highest first, of (R_n - R_{n-1}) P_n, equal values taken as one step (sklearn's
    ``average_precision_score``)."""
    # by hand: sklearn is not a dependency, and the step-wise sum is three cumulative-sum lines
    m = _map(map)
    hits = _mask(mask, m.shape).ravel()
    order = np.argsort(-m.ravel(), kind="stable")
    scores, hits = m.ravel()[order], hits[order]
    last = np.r_[np.flatnonzero(np.diff(scores)), scores.size - 1]  # last index of each run of equal scores
    tp = np.cumsum(hits)[last]
    recall = tp / tp[-1]
    return float(np.sum(np.diff(recall, prepend=0.0) * tp / (last + 1)))


# ---------------------------------------------------------------------------------------
# faithfulness


def deletion_insertion(map: np.ndarray, image: np.ndarray, score_fn: Callable[[np.ndarray], np.ndarray],
                       steps: int = 16, baseline: float | np.ndarray = 0.0) -> dict[str, float | list[float]]:
    """Deletion and insertion curves and their areas.

    Pixels are ordered by the map, highest first (ties in row-major order). Step k = 0..steps
    changes the top ``k * H * W // steps`` pixels: deletion sets them to ``baseline`` in the image,
    insertion restores them into the baseline image. ``image`` is [H, W] or [H, W, C] (a pixel's
    channels change together); ``baseline`` is a number or an array broadcastable to the image (a
    blurred copy, say). ``score_fn`` gets each curve's images in one batch [steps + 1, *image.shape]
    and returns [steps + 1] scores. Areas use the trapezoid rule over the fractions of pixels
    changed, 0 to 1."""
    m = _map(map)
    img = np.asarray(image)
    if img.ndim not in (2, 3) or img.shape[:2] != m.shape:
        raise InterpError(f"image shape {img.shape} does not match the map's shape {m.shape} "
                          "(an image is [H, W] or [H, W, C])")
    try:
        fits = np.broadcast_shapes(np.shape(baseline), img.shape) == img.shape
    except ValueError:
        fits = False
    if not fits:
        raise InterpError(f"baseline shape {np.shape(baseline)} does not broadcast to the image shape {img.shape}")
    if steps < 1:
        raise InterpError(f"steps must be >= 1, got {steps}")
    rank = np.empty(m.size, dtype=np.int64)
    rank[np.argsort(-m.ravel(), kind="stable")] = np.arange(m.size)
    counts = np.arange(steps + 1) * m.size // steps
    top = (rank < counts[:, None]).reshape(steps + 1, *m.shape, *([1] * (img.ndim - 2)))
    fractions = counts / m.size
    out: dict[str, float | list[float]] = {"fractions": fractions.tolist()}
    for name, changed, kept in (("deletion", baseline, img), ("insertion", img, baseline)):
        scores = np.asarray(score_fn(np.where(top, changed, kept)), dtype=np.float64)
        if scores.shape != (steps + 1,):
            raise InterpError(f"score_fn returned shape {scores.shape} for {steps + 1} images, expected ({steps + 1},)")
        out[name] = float(np.trapezoid(scores, fractions))
        out[f"{name}_curve"] = scores.tolist()
    return out


# ---------------------------------------------------------------------------------------
# concepts and statistics


def concept_rank(scores: Mapping[str, float], truth: str | Iterable[str]) -> int:
    """1-based rank of the best-scored true concept among all concepts. Ties go against the truth: a
    false concept scored equal to it ranks ahead (a constant scorer ranks last, not first)."""
    true = {truth} if isinstance(truth, str) else set(truth)
    missing = sorted(true - scores.keys())
    if not true or missing:
        raise InterpError(f"true concepts {missing or '(none given)'} are not among the scored concepts")
    if any(np.isnan(v) for v in scores.values()):
        raise InterpError("concept scores contain NaN")
    best = max(scores[c] for c in true)
    return 1 + sum(v >= best for c, v in scores.items() if c not in true)


def concept_rank_accuracy(ranks: Iterable[int], k: int = 1) -> float:
    """Share of ranks <= k (top-k accuracy)."""
    r = np.asarray(list(ranks))
    if r.size == 0:
        raise InterpError("no ranks given")
    return float(np.mean(r <= k))


def bootstrap_ci(values: Iterable[float], stat: Callable[[np.ndarray], float] = np.mean, n: int = 1000,
                 level: float = 0.95, seed: int = 0) -> tuple[float, float, float]:
    """(stat(values), lo, hi): percentile bootstrap interval (scipy.stats.bootstrap) at ``level``, NaNs
    dropped; all NaN or empty gives NaNs; one value gives that value three times."""
    v = np.asarray(list(values), dtype=np.float64).ravel()
    v = v[~np.isnan(v)]
    if v.size == 0:
        return np.nan, np.nan, np.nan
    estimate = float(stat(v))
    if v.size == 1:  # every resample is the one value (scipy needs two)
        return estimate, estimate, estimate
    ci = stats.bootstrap((v,), stat, n_resamples=n, confidence_level=level, method="percentile", rng=seed)
    return estimate, float(ci.confidence_interval.low), float(ci.confidence_interval.high)


# ---------------------------------------------------------------------------------------
# human attention


def point_pixels(points: np.ndarray, shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(rows, cols, on_image) of (y, x) points [n, 2]: the pixel each point on the image lies in, and
    which points those are. Points off the image (gaze off it) are dropped; none left is an error."""
    p = np.asarray(points, dtype=np.float64)
    if p.ndim != 2 or p.shape[1] != 2:
        raise InterpError(f"points must be an array [n, 2] of (y, x), got shape {p.shape}")
    idx = np.floor(p)
    on = np.isfinite(idx).all(axis=1) & (idx >= 0).all(axis=1) & (idx[:, 0] < shape[0]) & (idx[:, 1] < shape[1])
    if not on.any():
        raise InterpError(f"none of the {len(p)} fixation points lies on the {tuple(shape)} image")
    return idx[on, 0].astype(np.int64), idx[on, 1].astype(np.int64), on


def _fixation_mask(fixations: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """A boolean fixation map as given, or the pixels of (y, x) points (repeats count once, as a map)."""
    f = np.asarray(fixations)
    if f.dtype == bool:
        return _mask(f, shape, "fixation map")
    rows, cols, _ = point_pixels(f, shape)
    mask = np.zeros(shape, dtype=bool)
    mask[rows, cols] = True
    return mask


def nss(map: np.ndarray, fixations: np.ndarray) -> float:
    """Normalized scanpath saliency: mean of the z-scored map over the fixated pixels (std with N - 1,
    MATLAB's ``std`` as in NSS.m). ``fixations``: a boolean map or (y, x) points [n, 2]."""
    m = _map(map)
    fixated = _fixation_mask(fixations, m.shape)
    if np.ptp(m) == 0:
        return np.nan
    return float(((m[fixated] - m.mean()) / m.std(ddof=1)).mean())


def auc_judd(map: np.ndarray, fixations: np.ndarray) -> float:
    """AUC-Judd: the ROC area with one threshold per fixated pixel's value, highest first; at the i-th,
    TPR = i / fixated and FPR = (pixels >= threshold - i) / unfixated (AUC_Judd.m without jitter)."""
    m = _map(map)
    fixated = _fixation_mask(fixations, m.shape)
    if np.ptp(m) == 0 or fixated.all():
        return np.nan
    thresholds = np.sort(m[fixated])[::-1]
    n_fix, n_pix = thresholds.size, m.size
    above = n_pix - np.searchsorted(np.sort(m.ravel()), thresholds, side="left")
    i = np.arange(1, n_fix + 1)
    tpr = np.r_[0.0, i / n_fix, 1.0]
    fpr = np.r_[0.0, (above - i) / (n_pix - n_fix), 1.0]
    return float(np.trapezoid(tpr, fpr))


def cc(map: np.ndarray, human_map: np.ndarray) -> float:
    """Pearson correlation of the map with a human attention map (CC.m)."""
    m, h = _pair(map, human_map, "human map")
    if np.ptp(m) == 0 or np.ptp(h) == 0:
        return np.nan
    return float(np.corrcoef(m.ravel(), h.ravel())[0, 1])


def kl(map: np.ndarray, human_map: np.ndarray, eps: float = float(np.finfo(np.float64).eps)) -> float:
    """KL(human || map) after each non-zero map is scaled to sum 1: sum h log(eps + h / (m + eps)),
    as KLdiv.m, whose ``eps`` is MATLAB's (2.2e-16, the default here). Maps must be non-negative."""
    m, h = _pair(map, human_map, "human map")
    if (m < 0).any() or (h < 0).any():
        raise InterpError("kl needs non-negative maps (pass the positive part or the absolute value)")
    m = m / m.sum() if m.any() else m
    h = h / h.sum() if h.any() else h
    return float(np.sum(h * np.log(eps + h / (m + eps))))
