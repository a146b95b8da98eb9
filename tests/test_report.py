"""Sweep HTML report on a synthetic sweep with a known effect on known patches."""

from __future__ import annotations

import re

import numpy as np
import pytest
import xarray as xr
from browser import headless

from interp.report import ground_truth_score, tower_figure, write_sweep_report
from interp.report.sweep import MEAN

EVIL = "<script>alert(1)</script>"
IDS = ["s0", "s1", "s2"]
GRID = 4
A = np.array([0.2, 0.8, 0.5])    # effect on finding patches, per layer
B = np.array([-0.1, 0.05, 0.2])  # effect on the other patches, per layer
FINDING = [[(1, 1), (1, 2), (2, 1), (2, 2)], [(0, 3), (1, 3)], [(3, 0)]]  # finding patches per sample
TEXT = ["is", "there", EVIL, "effusion", "?"]


def sweep(tower: str) -> xr.Dataset:
    """3 samples, 3 layers: CLS/BOS, a 4x4 patch grid, and (lm) text; sample 2 has one text
    position fewer (pad, NaN effect). Effect A[l] on finding patches, B[l] on other patches."""
    n_s, n_l, n_patch = len(IDS), len(A), GRID * GRID
    text = TEXT if tower == "lm" else []
    n_p = 1 + n_patch + len(text)
    kind = np.array([["special"] + ["image"] * n_patch + ["text"] * len(text)] * n_s, dtype=object)
    token = np.array([["<s>" if tower == "lm" else "CLS"] + [f"p{i}" for i in range(n_patch)] + text] * n_s,
                     dtype=object)
    row = np.full((n_s, n_p), -1, np.int16)
    col = np.full((n_s, n_p), -1, np.int16)
    row[:, 1:1 + n_patch], col[:, 1:1 + n_patch] = np.divmod(np.arange(n_patch), GRID)
    mask = np.zeros((n_s, n_p), np.float32)
    effect = np.zeros((n_s, n_l, n_p), np.float32)
    effect[:, :, 1:1 + n_patch] = B[None, :, None]
    effect[:, :, 0] = 0.9  # not an image position: outside the score
    image = np.full((n_s, 32, 32), 0.3, np.float32)
    for s, cells in enumerate(FINDING):
        for i, (r, c) in enumerate(cells):
            p = 1 + r * GRID + c
            mask[s, p] = 1.0 if i == 0 else 0.25
            effect[s, :, p] = A
            image[s, r * 8:(r + 1) * 8, c * 8:(c + 1) * 8] = 0.8
    if text:
        effect[:, :, -len(text):] = np.linspace(0, 1, len(text))
        effect[2, :, -1] = np.nan
        kind[2, -1], token[2, -1] = "pad", ""
    clean, corrupted = np.array([0.9, 0.8, 0.7], np.float32), np.array([0.1, 0.2, 0.3], np.float32)
    restored = corrupted[:, None, None] + effect * (clean - corrupted)[:, None, None]
    sp, slp = ("sample", "position"), ("sample", "layer", "position")
    return xr.Dataset(
        {"restored": (slp, restored), "effect": (slp, effect), "clean": ("sample", clean),
         "corrupted": ("sample", corrupted), "kind": (sp, kind.astype(str)), "row": (sp, row),
         "col": (sp, col), "token": (sp, token.astype(str)), "mask_fraction": (sp, mask),
         "image": (("sample", "y", "x"), image),
         "question": ("sample", ["Is there an effusion?", f"Q {EVIL}", "Is there a nodule?"]),
         "answer": ("sample", ["yes", "yes", "no"]),
         "finding": ("sample", ["pleural_effusion", "pneumothorax", "nodule"])},
        coords={"sample": IDS, "layer": np.arange(n_l), "position": np.arange(n_p)},
        attrs={"tower": tower, "mode": "trace", "corrupt": "image", "metric": "prob",
               "point": "resid_post", "window": 1, "granularity": "token" if text else "patch",
               "grid_rows": GRID, "grid_cols": GRID, "model_id": "organism-llava", "weight_hash": "abc123",
               "dataset": f"phantom-vqa {EVIL}", "dataset_hash": "def456", "noise_std": 0.1, "copies": 2,
               "seed": 0, "elapsed_s": 1.5 if text else 0.5})


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    datasets = {t: sweep(t) for t in ("lm", "vision")}
    path = write_sweep_report(datasets, tmp_path_factory.mktemp("r") / "sweep.html", title=f"Sweep {EVIL}")
    return path, path.read_text(encoding="utf-8"), datasets


def test_self_contained(report):
    path, html, _ = report
    assert path.is_file()
    assert html.count("window.PlotlyConfig") == 1  # the inlined plotly.js bundle, once
    assert html.count("Plotly.newPlot") == 2       # one figure per tower
    assert not re.search(r"<script[^>]*\bsrc=", html)


def test_strings_escaped(report):
    _, html, _ = report
    assert EVIL not in html and EVIL.replace("/", "\\/") not in html
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html


def test_ground_truth_score_by_hand():
    n_finding = np.array([len(c) for c in FINDING])
    n_other = GRID * GRID - n_finding
    for tower in ("lm", "vision"):
        score = ground_truth_score(sweep(tower))
        hit = A * n_finding.sum()
        expected_share = hit / (hit + np.maximum(B, 0) * n_other.sum())
        np.testing.assert_allclose(score["share"].values, expected_share, rtol=1e-6)
        np.testing.assert_allclose(float(score["expected"]), n_finding.sum() / (GRID * GRID * len(IDS)))
        np.testing.assert_allclose(score["sample_expected"].values, n_finding / GRID ** 2)
        assert score["share"].values[0] == 1.0  # layer 0: only finding patches have positive effect


def test_drilldown_one_entry_per_sample(report):
    _, html, datasets = report
    for name, ds in datasets.items():
        (menu,) = tower_figure(name, ds).layout.updatemenus
        assert [b.label for b in menu.buttons] == [MEAN, *IDS]
        assert all(len(b.args[0]["z"]) == 1 + 3 * ds.sizes["layer"] for b in menu.buttons)


def test_renders_in_chromium(report, tmp_path):
    """The page's scripts run in a real browser: both figures are drawn (plotly's SVG), no script error."""
    path, _, _ = report
    dom = headless(tmp_path / "profile", "--dump-dom", path.as_uri())
    assert dom.count('class="main-svg"') >= 2 * 2, dom[:500]  # plotly draws two SVG layers per figure
    assert EVIL not in dom  # the title shows escaped
    shot = tmp_path / "report.png"
    headless(tmp_path / "profile", f"--screenshot={shot}", "--window-size=1280,2600", path.as_uri())
    assert shot.stat().st_size > 20_000


def test_tower_without_patches(tmp_path):
    ds = sweep("lm").assign(row=lambda d: d.row * 0 - 1)  # e.g. positions grouped by span
    assert np.isnan(ground_truth_score(ds)["share"].values).all()
    assert len(tower_figure("lm", ds).data) == 1
    assert "no ground-truth score" in write_sweep_report({"lm": ds}, tmp_path / "r.html").read_text()


def test_score_ci_is_the_pooled_ratio_with_a_bootstrap_interval():
    from interp.report.sweep import score_ci

    ds = sweep("vision")
    score, gt = score_ci(ds, n_boot=200), ground_truth_score(ds)
    expected = gt["share"].values / float(gt["expected"])
    np.testing.assert_allclose([np.nan if r is None else r for r in score["ratio"]], expected, rtol=1e-6)
    assert all(lo <= r <= hi for r, lo, hi in zip(score["ratio"], score["low"], score["high"]) if r is not None)
    same = ds.isel(sample=[0] * ds.sizes["sample"])  # every resample is the same data: a zero-width interval
    one = score_ci(same, n_boot=50)
    np.testing.assert_allclose(one["low"], one["ratio"], rtol=1e-6)
    np.testing.assert_allclose(one["high"], one["ratio"], rtol=1e-6)
