"""SAE feature dashboards: one self-contained, escaped HTML page that grows linearly with features."""

from __future__ import annotations

import re

import numpy as np
import pytest
from browser import headless

from interp.report.sae import FeatureView, write_feature_dashboards

EVIL = "<script>alert(1)</script>"
ESCAPED = "&lt;script&gt;alert(1)&lt;/script&gt;"


def view(feature: int, k: int = 4) -> FeatureView:
    """A feature whose top images are random 64-px phantoms-to-be with an 8x8 activation map."""
    rng = np.random.default_rng(feature)
    maps = rng.random((k, 8, 8)) * (rng.random((k, 8, 8)) < 0.3)
    return FeatureView(
        feature=feature, images=rng.random((k, 64, 64)), maps=maps,
        values=np.concatenate([np.zeros(900), rng.gamma(2.0, size=100)]),
        description=f"feature {feature} fires on {EVIL}", captions=[f"img {i} {EVIL}" for i in range(k)],
        masks=maps > 0.5,
        matches=[{"concept": f"nodule {EVIL}", "kind": "finding", "level": "image", "feature": feature,
                  "auroc": 0.97, "iou": None}],
        effects={"accuracy (ablated)": -0.12, f"KL {EVIL}": None})


def write(tmp_path, n: int) -> str:
    path = write_feature_dashboards(tmp_path / f"f{n}.html", [view(1000 + i) for i in range(n)],
                                    title=f"SAE {EVIL}", meta={"sae": f"run {EVIL}", "site": "vision.blocks.3.resid_post"})
    return path.read_text(encoding="utf-8")


@pytest.fixture(scope="module")
def page(tmp_path_factory):
    return write(tmp_path_factory.mktemp("dash"), 3)


def test_self_contained(page):
    assert page.count("window.PlotlyConfig") == 1  # the inlined plotly.js bundle, once
    assert page.count("Plotly.newPlot") == 3       # one figure per feature
    assert not re.search(r"<script[^>]*\bsrc=", page) and 'src="http' not in page
    assert page.count("jpeg;base64,") == 3 * 4  # every top image embedded (plotly writes "/" as \u002f)


def test_sections_and_index(page):
    for f in (1000, 1001, 1002):
        assert page.count(f'id="feature-{f}"') == 1
        assert f'<a href="#feature-{f}">feature {f}</a>' in page
    assert page.count("0.970") >= 3 * 2  # AUROC in the index and in each section
    assert "not measured" in page and "-0.120" in page


def test_strings_escaped(page):
    assert EVIL not in page and EVIL.replace("/", "\\/") not in page
    assert ESCAPED in page


def test_size_linear(tmp_path):
    size = {n: len(write(tmp_path, n)) for n in (3, 6)}
    base = size[3] - 3 * (size[6] - size[3]) / 3  # page without features: the plotly bundle and boilerplate
    per_feature = (size[6] - size[3]) / 3
    assert 0 < per_feature < 60_000  # small thumbnails, binned histogram
    assert abs(len(write(tmp_path, 1)) - (base + per_feature)) < 0.1 * per_feature


def test_feature_without_images(tmp_path):
    """A dead feature: no top images, only its (all-zero) histogram."""
    empty = FeatureView(feature=7, images=np.zeros((0, 64, 64)), maps=np.zeros((0, 8, 8)), values=np.zeros(50))
    page = write_feature_dashboards(tmp_path / "dead.html", [empty], "dead", {}).read_text(encoding="utf-8")
    assert 'id="feature-7"' in page and "No description." in page and "not measured" in page


def test_renders_in_chromium(tmp_path):
    """The page's scripts run in a real browser: every feature's figure is drawn, no escape broken."""
    path = tmp_path / "page.html"
    path.write_text(write(tmp_path, 3), encoding="utf-8")
    dom = headless(tmp_path / "profile", "--dump-dom", path.as_uri())
    assert dom.count('class="main-svg"') >= 3 * 2, dom[:500]  # plotly draws two SVG layers per figure
    assert EVIL not in dom
