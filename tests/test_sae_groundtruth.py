"""SAE ground-truth scores against hand computations and synthetic features on phantoms."""

from __future__ import annotations

import json
from itertools import product

import numpy as np
import pytest

from interp.data.phantom import CONCEPTS, FINDINGS, render, sample_spec
from interp.models.adapter import grid_positions
from interp.sae import groundtruth as gt
from interp.sae.groundtruth import auroc, best_features, feature_concept_auroc, feature_iou, mask_to_grid, score_features


def brute_auroc(scores: np.ndarray, labels: np.ndarray) -> float:
    """P(positive > negative) + P(tie) / 2 over every (positive, negative) pair."""
    pairs = [(p > n) + 0.5 * (p == n) for p, n in product(scores[labels], scores[~labels])]
    return float(np.mean(pairs))


@pytest.mark.parametrize("seed", range(8))
def test_auroc_matches_brute_force(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(2, 40))
    labels = np.arange(n) < rng.integers(1, n)  # both classes present
    rng.shuffle(labels)
    for scores in (rng.integers(0, 4, n).astype(float), rng.normal(size=n)):  # with and without ties
        assert auroc(scores, labels) == pytest.approx(brute_auroc(scores, labels), abs=1e-12)


def test_auroc_edge_cases():
    labels = np.array([True, False, True, False])
    assert auroc(np.array([3.0, 1, 2, 0]), labels) == 1.0
    assert auroc(np.array([0.0, 1, 0, 2]), labels) == 0.0
    assert auroc(np.zeros(4), labels) == 0.5  # all tied
    assert np.isnan(auroc(np.arange(4.0), np.ones(4, bool)))
    assert np.isnan(auroc(np.arange(4.0), np.zeros(4, bool)))


def test_feature_concept_auroc_table(monkeypatch):
    rng = np.random.default_rng(0)
    acts = rng.integers(0, 5, (30, 7)).astype(float)
    labels = {"a": rng.random(30) < 0.4, "b": rng.random(30) < 0.6, "none": np.zeros(30, bool)}
    acts[:, 3] = labels["a"] * 2.0
    table = feature_concept_auroc(acts, labels)
    assert table.dims == ("concept", "feature") and table["concept"].values.tolist() == ["a", "b", "none"]
    for (i, name), j in product(enumerate(labels), range(7)):
        expected = auroc(acts[:, j], labels[name])
        assert table.values[i, j] == pytest.approx(expected, nan_ok=True)
    monkeypatch.setattr(gt, "CHUNK", 45)  # one column per chunk, ranked separately: same table
    np.testing.assert_array_equal(feature_concept_auroc(acts, labels).values, table.values)
    best = best_features(table)
    assert best["a"] == (3, 1.0)
    assert best["b"] == (int(np.nanargmax(table.values[1])), float(np.nanmax(table.values[1])))
    assert best["none"][0] is None and np.isnan(best["none"][1])


def test_mask_to_grid_by_hand():
    mask = np.zeros((4, 4), bool)
    mask[0, 0] = mask[0, 1] = mask[1, 0] = True  # 3 of the top-left 2x2 patch
    mask[3, 3] = True
    boxes = [(0, 0, 2, 2), (0, 2, 2, 4), (2, 0, 4, 2), (2, 2, 4, 4), (0.5, 0.5, 1.5, 1.5), None]
    # the fractional box covers pixels [0, 2) x [0, 2): partial pixels count whole
    np.testing.assert_allclose(mask_to_grid(mask, boxes), [0.75, 0, 0, 0.25, 0.75, 0])


def test_iou_by_hand():
    """Three images on a 2x2 grid; a patch is inside the mask at fraction >= 0.5."""
    acts = np.array([[0.0, 0.5, 0.2, 0.0],   # active 1, 2; inside 0, 1 -> I 1, U 3
                     [0.0, 0.0, 0.0, 0.0],   # nothing active or inside -> undefined
                     [1.0, 1.0, 0.0, 0.0]])  # active 0, 1; inside 0, 1, 2 -> I 2, U 3
    masks = np.array([[1.0, 0.5, 0.0, 0.4], [0.0, 0.0, 0.0, 0.0], [1.0, 1.0, 0.75, 0.0]])
    pooled, per_image = feature_iou(acts, masks)
    assert pooled == pytest.approx(3 / 6)
    np.testing.assert_allclose(per_image, [1 / 3, np.nan, 2 / 3])
    pooled, per_image = feature_iou(acts, masks, threshold=0.3)  # image 0: active 1 only -> I 1, U 2
    assert pooled == pytest.approx(3 / 5)
    np.testing.assert_allclose(per_image, [1 / 2, np.nan, 2 / 3])
    # 75th percentile of the 12 activations: 0.2 + 0.25 * (0.5 - 0.2) = 0.275, same active set as 0.3
    assert feature_iou(acts, masks, quantile=0.75)[0] == pytest.approx(3 / 5)
    both_pooled, both_per_image = feature_iou(np.stack([acts, masks], -1), masks)  # 3-d: one column per feature
    assert both_pooled.shape == (2,) and both_per_image.shape == (3, 2)
    assert both_pooled[0] == pytest.approx(3 / 6)
    assert both_pooled[1] < 1  # the mask itself, thresholded at > 0, also takes the 0.4 patch


@pytest.fixture(scope="module")
def phantoms():
    """60 phantoms: per finding and concept its mask on the 8x8 grid of 8-px patches, [n, 64]."""
    boxes = grid_positions(8, 8, lambda r, c: (8 * r, 8 * c, 8 * r + 8, 8 * c + 8), cls=False).boxes
    rng = np.random.default_rng(0)
    found = {f: [] for f in FINDINGS}
    concepts = {c: [] for c in CONCEPTS}
    for seed in range(60):
        p = render(sample_spec(rng), seed)
        for f in FINDINGS:
            found[f].append(mask_to_grid(p.finding_masks.get(f, np.zeros(p.image.shape, bool)), boxes))
        for c in CONCEPTS:
            concepts[c].append(mask_to_grid(p.concept_masks[c], boxes))
    return {f: np.array(v) for f, v in found.items()}, {c: np.array(v) for c, v in concepts.items()}


@pytest.mark.parametrize("inside", [0.5, 0.25])
def test_mask_features_score_one(phantoms, inside):
    """Features equal to each mask (then random ones) come first and score AUROC 1 and IoU 1; concepts
    with no patch at share >= ``inside`` (thin ones at 0.5) have no patch-level AUROC."""
    findings, concepts = phantoms
    masks = {**findings, **concepts}
    n, n_patch = next(iter(masks.values())).shape
    acts = np.concatenate([np.stack(list(masks.values()), -1), np.random.default_rng(1).random((n, n_patch, 8))], -1)
    # shares are multiples of 1/64: a mask feature above this threshold is active exactly on the patches inside
    rows = score_features(acts, findings, concepts, threshold=inside - 0.01, inside=inside)
    json.dumps(rows, allow_nan=False)
    assert [r["concept"] for r in rows] == list(masks)
    for i, r in enumerate(rows):
        assert r["level"] == ("image" if r["kind"] == "finding" else "patch")
        assert r["n"] == (n if r["kind"] == "finding" else n * n_patch)
        expected = (i, 1.0, 1.0) if r["positives"] else (None, None, None)
        assert (r["feature"], r["auroc"], r["iou"]) == expected, r
    undefined = {r["concept"] for r in rows if not r["positives"]}
    thin = {"diaphragm_left", "diaphragm_right", "trachea", "clavicle_left", "clavicle_right"}
    assert undefined == (thin if inside == 0.5 else set())


def test_random_features_score_half(phantoms):
    findings, concepts = phantoms
    n, n_patch = findings["nodule"].shape
    random = np.random.default_rng(1).random((n, n_patch, 8))
    image_level = feature_concept_auroc(random.max(1), {f: m.max(1) > 0 for f, m in findings.items()})
    large = {c: m.reshape(-1) >= 0.5 for c, m in concepts.items() if (m >= 0.5).sum() >= 200}
    patch_level = feature_concept_auroc(random.reshape(n * n_patch, -1), large)
    assert len(large) >= 5 and abs(patch_level.values - 0.5).max() < 0.06  # >= 200 of 3840 patches
    assert abs(image_level.values - 0.5).max() < 0.25  # 60 images
    assert (feature_iou(random, concepts["lung_left"], quantile=0.8)[0] < 0.3).all()
