"""Distribution shifts (interp.data.shifts) change how phantoms look, never what they show; training augments with them."""

from __future__ import annotations

import numpy as np
import pytest

from interp.data.phantom import _Geometry
from interp.data.shifts import SHIFTS, contrast, shift
from interp.data.vqa import build_vqa
from interp.errors import InterpError


def test_contrast_by_hand():
    img = np.array([[0.0, 0.2], [0.4, 1.0]], np.float32)  # mean 0.4
    assert np.allclose(contrast(img, 0.5), [[0.2, 0.3], [0.4, 0.7]])
    batch = np.stack([img, img])[:, None]  # [2, 1, 2, 2], one factor per image
    out = contrast(batch, np.array([1.0, 0.0]))
    assert np.allclose(out[0, 0], img) and np.allclose(out[1, 0], 0.4)


def test_shifts_keep_items_and_change_only_their_part():
    ds = build_vqa(6, 3, "test", kinds=("presence",), modes=("direct",))
    rot, tube = shift("rotation 10").dataset(ds), shift("chest tube").dataset(ds)
    assert rot.items == ds.items and tube.items == ds.items
    assert [s.anatomy.rotation for s in rot.specs] == [10.0, -10.0] * 3
    assert all(s.findings == t.findings and "chest_tube" in t.confounders for s, t in zip(ds.specs, tube.specs))
    assert np.array_equal(tube.phantom(0).finding_masks.get("nodule", 0), ds.phantom(0).finding_masks.get("nodule", 0))
    img = ds.image(0)
    shifted = SHIFTS["contrast 0.6"].pixels(img)
    assert np.isclose(shifted.mean(), img.mean(), atol=1e-6) and np.isclose(shifted.std(), 0.6 * img.std(), rtol=1e-5)
    with pytest.raises(InterpError, match="unknown shift"):
        shift("blur")


def test_zone_findings_are_drawn_in_their_zone():
    """A finding's centre lies in the zone its spec names (large lower-zone consolidations used to sit in the middle)."""
    ds = build_vqa(300, 11, "train", kinds=("zone",), modes=("direct",))
    checked = 0
    for i, s in enumerate(ds.specs):
        for f in s.findings:
            if f.name == "consolidation" and f.severity != "small" and f.zone == "lower":
                g = _Geometry(s.anatomy, 64)
                m = ds.phantom(i).finding_masks[f.name]
                top = float(g.v[m].min())  # the blob's top edge: below the middle zone's centres' reach
                _, _, z2, _ = g.zone_rows(f.side)
                assert top > z2 - 0.17, (i, top, z2)
                checked += 1
    assert checked >= 10


def test_training_config_checks_augmentation():
    from interp.models.train import TrainConfig

    with pytest.raises(InterpError, match="aug_contrast_min"):
        TrainConfig(aug_contrast_min=1.2, aug_contrast_max=1.0)
    with pytest.raises(InterpError, match="aug_rotation"):
        TrainConfig(aug_rotation=90)
    with pytest.raises(InterpError, match="kind_weights"):
        TrainConfig(kind_weights={"colour": 1.0})


def test_augmented_training_rotates_specs_and_varies_contrast():
    from interp.models.train import TrainConfig, Trainer

    cfg = TrainConfig(n_train_images=8, aug_rotation=12, aug_contrast_min=0.5, aug_contrast_max=1.2)
    t = Trainer(cfg, progress=False)
    t.load_data()
    a, b = t.pixels(np.arange(4)), t.pixels(np.arange(4))
    assert not np.allclose(a.numpy(), b.numpy())  # a new contrast draw per call
    ratio = a.flatten(1).std(1) / t.pool.pixels[:4].flatten(1).std(1)
    assert ((ratio > 0.5 - 1e-4) & (ratio < 1.2 + 1e-4)).all()
    plain = Trainer(TrainConfig(n_train_images=8), progress=False)
    plain.load_data()
    assert np.array_equal(plain.pixels(np.arange(4)).numpy(), plain.pool.pixels[:4].numpy())


def test_format_shifts_reports_the_worst_loss():
    from interp.models.train import format_shifts

    base = {"presence/direct": {"acc": 0.96, "n": 10}, "zone/direct": {"acc": 0.9, "n": 5}}
    shifted = {"contrast 0.6": {"presence/direct": {"acc": 0.90, "n": 10}, "zone/direct": {"acc": 0.9, "n": 5}},
               "chest tube": {"presence/direct": {"acc": 0.95, "n": 10}, "zone/direct": {"acc": 0.7, "n": 5}}}
    assert format_shifts(base, shifted).splitlines()[-1] == "most points lost: 20.0 (chest tube, zone/direct)"


def test_patch_cover_by_hand():
    from interp.models.train import patch_cover

    m = np.zeros((64, 64), bool)
    m[:4, :12] = True  # half of patch 0's rows; a quarter (4 x 4 pixels) of patch 1
    cover = patch_cover(m)
    assert cover[0] == 0.5 and cover[1] == 0.25 and cover[2:].sum() == 0


def test_zone_head_targets_follow_the_lung_zones():
    """The zone head's targets: each patch's share of each lung zone, upper above middle above lower, and
    together the lung (the phantom's own lung mask, cut like the zones by heart and mediastinum)."""
    from interp.models.train import LUNG_ZONES, TrainConfig, Trainer, patch_cover

    t = Trainer(TrainConfig(n_train_images=6, zone_weight=1.0), progress=False)
    t.load_data()
    z = t.pool.zones.numpy()
    assert z.shape == (6, 64, 6) and t.zone_head is not None
    rows = np.arange(64) // 8
    for i in range(6):
        for s in ("left", "right"):
            at = [LUNG_ZONES.index(f"lung_{s}_{zone}") for zone in ("upper", "middle", "lower")]
            centre = [(z[i, :, k] * rows).sum() / z[i, :, k].sum() for k in at]
            assert centre[0] < centre[1] < centre[2]
        ph = build_vqa(6, t.cfg.seed, "train").phantom(i)
        lungs = patch_cover(ph.concept_masks["lung_left"] | ph.concept_masks["lung_right"])
        np.testing.assert_allclose(z[i].sum(-1), lungs, atol=1e-6)
    assert sum(p.numel() for p in t.heads()) > sum(p.numel() for p in t.aux_head.parameters())
