"""Evaluation metrics against hand computations on small hand-made maps, masks and fixations."""

from __future__ import annotations

import math

import numpy as np
import pytest

from interp.errors import InterpError
from interp.evaluate.metrics import (
    auc_judd,
    auprc,
    bootstrap_ci,
    box_scores,
    box_union_mask,
    boxes_from_map,
    cc,
    concept_rank,
    concept_rank_accuracy,
    deletion_insertion,
    energy_in_mask,
    kl,
    nss,
    point_pixels,
    pointing_game,
)


def _mask(shape, *pixels) -> np.ndarray:
    m = np.zeros(shape, dtype=bool)
    for p in pixels:
        m[p] = True
    return m


# ---------------------------------------------------------------------------------------
# boxes


def test_boxes_from_map_keeps_the_largest_components_above_the_quantile():
    m = np.zeros((10, 10))
    m[0:2, 6:8] = 4.0  # 4 pixels, first in raster order
    m[4:7, 1:4] = 5.0  # 9 pixels
    m[9, 9] = 3.0
    # sorted values: 86 zeros, one 3, four 4s, nine 5s; the 0.9 quantile interpolates ranks 89 and 90: 4
    assert boxes_from_map(m, min_area=1) == [(4, 1, 7, 4), (0, 6, 2, 8)]
    assert boxes_from_map(m, min_area=5) == [(4, 1, 7, 4)]
    assert boxes_from_map(m, min_area=1, max_boxes=1) == [(4, 1, 7, 4)]
    # 0.865 * 99 = 85.6: between rank 85 (0) and rank 86 (3), so the 3 joins; 0.85 takes every pixel
    assert boxes_from_map(m, quantile=0.865, min_area=1) == [(4, 1, 7, 4), (0, 6, 2, 8), (9, 9, 10, 10)]
    assert boxes_from_map(m, quantile=0.85, min_area=1) == [(0, 0, 10, 10)]
    assert all(isinstance(v, int) for v in boxes_from_map(m, min_area=1)[0])


def test_boxes_from_map_connects_diagonal_neighbours_and_handles_a_flat_map():
    m = np.zeros((6, 6))
    m[1, 1] = m[2, 2] = m[3, 3] = 1.0  # one 8-connected component, three 4-connected ones
    assert boxes_from_map(m, quantile=0.95, min_area=3) == [(1, 1, 4, 4)]
    assert boxes_from_map(np.ones((4, 5)), min_area=1) == [(0, 0, 4, 5)]
    with pytest.raises(InterpError, match="quantile"):
        boxes_from_map(m, quantile=1.5)


def test_box_union_mask_uses_pixel_centres_and_clips():
    got = box_union_mask([(0.5, 0.4, 2.5, 1.6)], (4, 4))
    assert np.array_equal(got, _mask((4, 4), (0, 0), (0, 1), (1, 0), (1, 1)))
    got = box_union_mask([(-2, -2, 1, 10), (3, 3, 4, 4)], (4, 4))
    assert np.array_equal(got, _mask((4, 4), (0, slice(None)), (3, 3)))
    assert not box_union_mask([], (2, 2)).any()
    with pytest.raises(InterpError, match="ends before"):
        box_union_mask([(3, 0, 1, 2)], (4, 4))
    with pytest.raises(InterpError, match="y0, x0, y1, x1"):
        box_union_mask([(1, 2, 3)], (4, 4))


def _one_blob_map() -> np.ndarray:
    m = np.zeros((10, 10))
    m[2:6, 2:6] = 1.0  # 16 pixels: the predicted box is (2, 2, 6, 6)
    return m


def test_box_scores_by_hand():
    # prediction (2, 2, 6, 6) vs truth (4, 4, 8, 8): 4 shared pixels of 16 each, union 28
    want = {"iou": 400 / 28, "precision": 25.0, "recall": 25.0, "f1": 25.0}
    assert box_scores(_one_blob_map(), [(4, 4, 8, 8)]) == pytest.approx(want)
    # a mask is scored as its components' boxes: a diagonal line's box is (4, 4, 8, 8)
    line = _mask((10, 10), *[(i, i) for i in range(4, 8)])
    assert box_scores(_one_blob_map(), line) == pytest.approx(want)
    assert box_scores(_one_blob_map(), [(2, 2, 6, 6)]) == pytest.approx(dict.fromkeys(want, 100.0))
    assert box_scores(_one_blob_map(), [(2, 2, 4, 6)]) == pytest.approx(
        {"iou": 50.0, "precision": 50.0, "recall": 100.0, "f1": 200 / 3})


def test_box_scores_edge_cases():
    assert box_scores(_one_blob_map(), [(0, 0, 2, 2)]) == dict.fromkeys(("iou", "precision", "recall", "f1"), 0.0)
    assert box_scores(_one_blob_map(), [(2, 2, 6, 6)], min_area=17) == dict.fromkeys(
        ("iou", "precision", "recall", "f1"), 0.0)  # no predicted box
    with pytest.raises(InterpError, match="no ground-truth box"):
        box_scores(_one_blob_map(), [(20, 20, 30, 30)])
    with pytest.raises(InterpError, match="empty"):
        box_scores(_one_blob_map(), np.zeros((10, 10), dtype=bool))
    with pytest.raises(InterpError, match="shape"):
        box_scores(_one_blob_map(), np.ones((9, 10), dtype=bool))


# ---------------------------------------------------------------------------------------
# masks


def test_pointing_game_points_at_the_centre_of_the_maximum_with_a_tolerance():
    m = np.zeros((5, 5))
    m[0:3, 0:3] = 2.0  # a token-level maximum: a 3 x 3 block, pointed at by its centre (1, 1)
    assert pointing_game(m, _mask((5, 5), (1, 1)))
    assert not pointing_game(m, _mask((5, 5), (0, 0)))  # in the block, but not its centre
    assert not pointing_game(m, _mask((5, 5), (3, 3)), tolerance=2.8)  # (1, 1) -> (3, 3): 2 * sqrt(2) = 2.83
    assert pointing_game(m, _mask((5, 5), (3, 3)), tolerance=2.9)
    assert not pointing_game(np.ones((5, 5)), _mask((5, 5), (3, 3)))  # a constant map points nowhere
    with pytest.raises(InterpError, match="tolerance"):
        pointing_game(m, _mask((5, 5), (3, 3)), tolerance=-1)


def test_energy_in_mask_counts_the_positive_part():
    m = np.array([[1.0, -2.0], [3.0, 0.0]])
    assert energy_in_mask(m, _mask((2, 2), (0, 0))) == 0.25
    assert energy_in_mask(m, _mask((2, 2), (0, 0), (0, 1))) == 0.25
    assert energy_in_mask(m, np.ones((2, 2), dtype=bool)) == 1.0
    assert energy_in_mask(-np.abs(m), _mask((2, 2), (0, 0))) == 0.0


def _ap_brute_force(scores: np.ndarray, labels: np.ndarray) -> float:
    """Step-wise AP written out: one step per distinct score, highest first."""
    ap, prev_recall = 0.0, 0.0
    for t in sorted(set(scores.tolist()), reverse=True):
        chosen = scores >= t
        tp = int((chosen & labels).sum())
        recall = tp / labels.sum()
        ap += (recall - prev_recall) * tp / chosen.sum()
        prev_recall = recall
    return ap


def test_auprc_by_hand_with_ties():
    m = np.array([[0.9, 0.8, 0.8], [0.3, 0.1, 0.1]])
    mask = np.array([[True, False, True], [False, True, False]])
    # steps: (R 1/3, P 1), (2/3, 2/3), (2/3, 1/2), (1, 1/2) -> 1/3 + 2/9 + 0 + 1/6
    assert auprc(m, mask) == pytest.approx(13 / 18)
    # sklearn's documented example: average_precision_score([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8]) = 0.83
    assert auprc(np.array([[0.1, 0.4, 0.35, 0.8]]), np.array([[False, False, True, True]])) == pytest.approx(5 / 6)
    assert auprc(np.ones((3, 3)), _mask((3, 3), (0, 0), (2, 2))) == pytest.approx(2 / 9)  # one tie: prevalence
    assert auprc(np.arange(9.0).reshape(3, 3), _mask((3, 3), (2, 2), (2, 1))) == 1.0


def test_auprc_matches_the_brute_force_on_random_tied_maps():
    rng = np.random.default_rng(0)
    for _ in range(50):
        m = rng.integers(0, 4, size=(4, 5)).astype(float)  # many ties
        mask = rng.random((4, 5)) < 0.3
        mask[0, 0] = True
        assert auprc(m, mask) == pytest.approx(_ap_brute_force(m.ravel(), mask.ravel()))


# ---------------------------------------------------------------------------------------
# deletion / insertion


def test_deletion_insertion_by_hand():
    image = np.array([[1.0, 2.0], [3.0, 4.0]])
    m = np.array([[0.1, 0.9], [0.5, 0.5]])  # order: (0, 1), then the tie (1, 0), (1, 1), then (0, 0)
    calls = []

    def total(images):
        calls.append(images.shape)
        return images.reshape(len(images), -1).sum(axis=1)

    r = deletion_insertion(m, image, total, steps=4)
    assert calls == [(5, 2, 2), (5, 2, 2)]
    assert r["fractions"] == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert r["deletion_curve"] == [10.0, 8.0, 5.0, 1.0, 0.0]
    assert r["insertion_curve"] == [0.0, 2.0, 5.0, 9.0, 10.0]
    assert r["deletion"] == pytest.approx(0.25 * (9 + 6.5 + 3 + 0.5))
    assert r["insertion"] == pytest.approx(0.25 * (1 + 3.5 + 7 + 9.5))
    ones = deletion_insertion(m, image, total, steps=4, baseline=np.ones((2, 2)))
    assert ones["deletion_curve"] == [10.0, 9.0, 7.0, 4.0, 4.0]
    assert ones["insertion_curve"] == [4.0, 5.0, 7.0, 10.0, 10.0]


def test_deletion_insertion_on_channels_and_uneven_steps():
    image = np.array([[1.0, 2.0], [3.0, 4.0]])
    m = np.array([[0.1, 0.9], [0.5, 0.5]])
    rgb = image[..., None] * np.array([1.0, 2.0, 3.0])  # a pixel's channels change together

    def total(images):
        return images.reshape(len(images), -1).sum(axis=1)

    r = deletion_insertion(m, rgb, total, steps=4)
    assert r["deletion_curve"] == [60.0, 48.0, 30.0, 6.0, 0.0]
    assert r["deletion"] == pytest.approx(6 * 4.75)
    r = deletion_insertion(np.arange(9.0).reshape(3, 3), np.ones((3, 3)), total, steps=2)
    assert r["fractions"] == pytest.approx([0.0, 4 / 9, 1.0])  # 9 * 1 // 2 = 4 pixels at step 1
    assert r["deletion_curve"] == [9.0, 5.0, 0.0]
    with pytest.raises(InterpError, match="score_fn returned shape"):
        deletion_insertion(m, image, lambda x: np.zeros(3), steps=4)
    with pytest.raises(InterpError, match="image shape"):
        deletion_insertion(m, np.ones((3, 2)), total)
    with pytest.raises(InterpError, match="baseline shape"):
        deletion_insertion(m, image, total, baseline=np.ones(3))


# ---------------------------------------------------------------------------------------
# concepts and statistics


def test_concept_rank_and_accuracy():
    scores = {"effusion": 0.9, "nodule": 0.5, "pneumothorax": 0.7}
    assert concept_rank(scores, "effusion") == 1
    assert concept_rank(scores, "nodule") == 3
    assert concept_rank(scores, {"nodule", "pneumothorax"}) == 2
    assert concept_rank({"a": 0.5, "b": 0.5, "c": 0.1}, "b") == 2  # a tie goes against the truth
    with pytest.raises(InterpError, match="edema"):
        concept_rank(scores, "edema")
    with pytest.raises(InterpError, match="NaN"):
        concept_rank({"a": math.nan, "b": 1.0}, "b")
    assert concept_rank_accuracy([1, 2, 3, 1]) == 0.5
    assert concept_rank_accuracy([1, 2, 3, 1], k=2) == 0.75
    with pytest.raises(InterpError, match="no ranks"):
        concept_rank_accuracy([])


def test_bootstrap_ci():
    est, lo, hi = bootstrap_ci([1.0, 2.0, 3.0, 4.0, math.nan])
    assert est == 2.5 and 1.0 <= lo < 2.5 < hi <= 4.0
    assert bootstrap_ci([1.0, 2.0, 3.0, 4.0]) == (est, lo, hi)  # NaN dropped, seeded
    assert bootstrap_ci([1, 2, 3, 4], seed=1) != (est, lo, hi)
    wide = bootstrap_ci([1.0, 2.0, 3.0, 4.0], level=0.99)
    assert wide[1] <= lo and wide[2] >= hi
    assert bootstrap_ci([2.0, 2.0, 2.0]) == (2.0, 2.0, 2.0)
    assert bootstrap_ci([7.0]) == (7.0, 7.0, 7.0)
    assert all(math.isnan(v) for v in bootstrap_ci([math.nan]))
    assert all(math.isnan(v) for v in bootstrap_ci([]))
    assert bootstrap_ci([1.0, 2.0, 10.0], stat=np.median)[0] == 2.0
    # mean of 400 standard normals: the 95% interval is about +-1.96 / sqrt(400) = +-0.098
    x = np.random.default_rng(0).standard_normal(400)
    est, lo, hi = bootstrap_ci(x, n=2000)
    assert (hi - lo) / 2 == pytest.approx(1.96 * x.std() / 20, rel=0.1)


# ---------------------------------------------------------------------------------------
# human attention


def test_point_pixels_floor_and_drop_points_off_the_image():
    rows, cols, on = point_pixels(np.array([[0.99, 2.0], [5.0, 1.0], [-0.1, 0.0], [1.5, 2.999]]), (3, 3))
    assert rows.tolist() == [0, 1] and cols.tolist() == [2, 2] and on.tolist() == [True, False, False, True]
    with pytest.raises(InterpError, match="none of the 1 fixation points"):
        point_pixels(np.array([[3.0, 0.0]]), (3, 3))
    with pytest.raises(InterpError, match=r"\[n, 2\]"):
        point_pixels(np.zeros((2, 3)), (3, 3))


def test_nss_by_hand():
    m = np.array([[1.0, 2.0], [3.0, 4.0]])
    sd = math.sqrt((1.5**2 + 0.5**2) * 2 / 3)  # N - 1, as MATLAB's std
    assert nss(m, _mask((2, 2), (1, 1))) == pytest.approx(1.5 / sd)
    assert nss(m, np.array([[1.2, 1.7]])) == pytest.approx(1.5 / sd)  # a point lies in pixel (1, 1)
    assert nss(m, np.array([[1.5, 1.5], [5.0, 5.0]])) == pytest.approx(1.5 / sd)  # off-image point dropped
    assert nss(m, np.array([[1.5, 1.5], [1.1, 1.9]])) == pytest.approx(1.5 / sd)  # repeats count once
    assert nss(m, _mask((2, 2), (0, 0), (1, 1))) == pytest.approx(0.0)
    assert math.isnan(nss(np.ones((2, 2)), _mask((2, 2), (0, 0))))
    with pytest.raises(InterpError, match="empty"):
        nss(m, np.zeros((2, 2), dtype=bool))


def _auc_judd_loop(s: np.ndarray, fixated: np.ndarray) -> float:
    """AUC_Judd.m written out as its loop (jitter off)."""
    values, sth = s.ravel(), s[fixated]
    n_fix, n_pix = len(sth), values.size
    tp, fp = [0.0], [0.0]
    for i, thresh in enumerate(sorted(sth, reverse=True), start=1):
        tp.append(i / n_fix)
        fp.append(((values >= thresh).sum() - i) / (n_pix - n_fix))
    tp.append(1.0)
    fp.append(1.0)
    return float(np.trapezoid(tp, fp))


def test_auc_judd_by_hand():
    m = np.array([[0.9, 0.1, 0.5], [0.3, 0.7, 0.2]])
    # thresholds 0.9 then 0.3: (FPR, TPR) = (0, 0), (0, 1/2), ((4 - 2) / 4, 1), (1, 1)
    assert auc_judd(m, _mask((2, 3), (0, 0), (1, 0))) == pytest.approx(0.375 + 0.5)
    assert auc_judd(m, np.array([[0.5, 0.5], [1.2, 0.1]])) == pytest.approx(0.875)
    rng = np.random.default_rng(1)
    for _ in range(20):
        s = rng.integers(0, 5, size=(4, 6)).astype(float)
        fixated = rng.random((4, 6)) < 0.25
        fixated[1, 2] = True
        s[0, 0] = 9.0  # not constant
        assert auc_judd(s, fixated) == pytest.approx(_auc_judd_loop(s, fixated))
    assert math.isnan(auc_judd(np.zeros((2, 2)), _mask((2, 2), (0, 0))))
    assert math.isnan(auc_judd(m, np.ones((2, 3), dtype=bool)))


def test_cc_by_hand():
    m = np.array([[1.0, 2.0], [3.0, 4.0]])
    assert cc(m, 2 * m) == pytest.approx(1.0)
    assert cc(m, -m + 7) == pytest.approx(-1.0)
    # deviations (-1.5, -0.5, 0.5, 1.5) . (-0.5, -0.5, 0.5, 0.5) = 2; norms sqrt(5) and 1
    assert cc(m, np.array([[0.0, 0.0], [1.0, 1.0]])) == pytest.approx(2 / math.sqrt(5))
    assert math.isnan(cc(m, np.ones((2, 2))))
    with pytest.raises(InterpError, match="human map shape"):
        cc(m, np.ones((2, 3)))


def test_kl_by_hand():
    flat = np.ones((2, 2))
    human = np.array([[1.0, 0.0], [0.0, 1.0]])
    assert kl(flat, human) == pytest.approx(math.log(2))  # 2 * 0.5 * log(0.5 / 0.25)
    assert kl(3 * human, human) == pytest.approx(0.0, abs=1e-12)
    eps = 1e-7
    want = 2 * 0.5 * math.log(eps + 0.5 / (0.25 + eps))
    assert kl(flat, human, eps=eps) == pytest.approx(want, rel=1e-12)
    # an all-zero map is left unscaled, as KLdiv.m does: 0.5 / eps per fixated half
    eps64 = np.finfo(np.float64).eps
    assert kl(np.zeros((2, 2)), human) == pytest.approx(math.log(eps64 + 0.5 / eps64))
    with pytest.raises(InterpError, match="non-negative"):
        kl(flat - 2, human)


def test_bad_inputs_name_the_problem():
    m = np.ones((3, 3))
    with pytest.raises(InterpError, match=r"2-D array \[H, W\]"):
        energy_in_mask(np.ones((3, 3, 1)), np.ones((3, 3), dtype=bool))
    with pytest.raises(InterpError, match="non-finite"):
        auprc(np.full((3, 3), np.nan), np.ones((3, 3), dtype=bool))
    with pytest.raises(InterpError, match="boolean"):
        pointing_game(m, np.ones((3, 3)))
    with pytest.raises(InterpError, match=r"mask shape \(2, 3\)"):
        energy_in_mask(m, np.ones((2, 3), dtype=bool))
    with pytest.raises(InterpError, match="empty"):
        auprc(m, np.zeros((3, 3), dtype=bool))
