"""The Dash explorer: figures against numpy, callbacks, the CLI, and the app driven in chromium (Playwright)."""

from __future__ import annotations

import io
import os
import shutil
import subprocess
import sys
import threading
import time
from urllib.parse import urlparse

import numpy as np
import pytest

from interp.explore import Explorer
from interp.explore.app import create_app, families, figure, info, site_of

LM, VIS, PROJ = "lm.blocks.1.resid_post", "vision.blocks.0.resid_post", "projector.out"


@pytest.fixture(scope="module")
def ex(acts_store: str) -> Explorer:
    return Explorer(acts_store)


def np_grid(ex: Explorer, site: str, row: int) -> np.ndarray:
    """Per-patch L2 norms of sample ``row`` as a [row, col] grid, by plain numpy."""
    x = np.asarray(ex.acts[site].values[row], dtype=np.float64)
    pos = ex.acts[site].dims[1]
    kind, r, c = (np.asarray(ex.acts[f"{pos}_{a}"].values) for a in ("kind", "row", "col"))
    img = kind == 2
    grid = np.full((r[img].max() + 1, c[img].max() + 1), np.nan)
    grid[r[img], c[img]] = np.linalg.norm(x[img], axis=-1)
    return grid


def callback(app, output: str):
    """The plain python function behind the app's callback writing ``output``."""
    return app.callback_map[output]["callback"].__wrapped__


def test_figures_match_numpy(ex):
    for site in (VIS, PROJ):
        fig = figure(ex, site, str(ex.ids[2]))
        img, heat = fig.data
        assert img.z.shape == (64, 64) and img.z.dtype == float
        np.testing.assert_allclose(heat.z, np_grid(ex, site, 2), rtol=1e-6)
        np.testing.assert_allclose(heat.z, ex.patch_norms(site, 2).values)
    (bar,) = figure(ex, LM, 3).data
    valid = np.asarray(ex.acts["valid"].values[3])
    want = np.linalg.norm(np.asarray(ex.acts[LM].values[3], dtype=np.float64)[valid], axis=-1)
    np.testing.assert_allclose(bar.y, want, rtol=1e-6)
    assert list(bar.hovertext) == [str(t) for t in ex.acts["token_text"].values[3][valid]]


def test_families_and_info(ex):
    assert families(ex) == {"vision.blocks.*.resid_post": [0, 1], PROJ: [], "lm.blocks.*.resid_post": [0, 1, 2]}
    assert site_of("lm.blocks.*.resid_post", 1) == LM and site_of(PROJ, None) == PROJ
    text = info(ex, 0)
    assert f"prompt: {ex.tree['prompt'].values[0]}" in text and "labels: " in text


def test_callbacks_follow_sample_and_layer(ex):
    app = create_app(ex)
    show = callback(app, "figure.figure")
    layers = callback(app, "..layer.min...layer.max...layer.marks...layer.value...layer.disabled..")
    assert layers("lm.blocks.*.resid_post") == (0, 2, {0: "0", 1: "1", 2: "2"}, 2, False)
    assert layers(PROJ)[-1] is True
    a, b = (show("vision.blocks.*.resid_post", 1, str(ex.ids[i])) for i in (0, 1))
    c = show("vision.blocks.*.resid_post", 0, str(ex.ids[0]))
    assert not np.array_equal(a.data[1].z, b.data[1].z) and not np.array_equal(a.data[1].z, c.data[1].z)
    assert not np.array_equal(show("lm.blocks.*.resid_post", 0, ex.ids[0]).data[0].y,
                              show("lm.blocks.*.resid_post", 2, ex.ids[0]).data[0].y)
    assert callback(app, "info.children")(str(ex.ids[1])) == info(ex, 1)
    assert callback(app, "sample.options")("-0001", None) == [s for s in ex.ids if "-0001" in s]


def test_cli_help_is_light_and_missing_store_fails(tmp_path):
    code = ("import sys; from interp.explore.__main__ import main\n"
            "try: main(['--help'])\nexcept SystemExit: pass\n"
            "assert 'torch' not in sys.modules and 'dash' not in sys.modules, 'heavy import'")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "--host" in r.stdout and "127.0.0.1" in r.stdout
    r = subprocess.run([sys.executable, "-m", "interp.explore", str(tmp_path / "none.zarr")],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and r.stderr.startswith("error: no store at")


def test_app_in_chromium(ex):
    """Served on localhost and driven by chromium: no console error, no request off localhost, a new sample
    redraws the figure, the screenshot is not blank."""
    browser = os.environ.get("CHROMIUM") or shutil.which("chromium")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        browser = None
    if not browser:
        if os.environ.get("INTERP_REQUIRE_BROWSER"):
            pytest.fail("no chromium or playwright, and INTERP_REQUIRE_BROWSER is set (CI)")
        pytest.skip("no chromium or playwright")
    from PIL import Image
    from werkzeug.serving import make_server

    server = make_server("127.0.0.1", 0, create_app(ex).server, threaded=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_port}/"
    errors: list[str] = []
    outside: list[str] = []
    try:
        with sync_playwright() as pw:
            b = pw.chromium.launch(executable_path=browser, args=["--headless", "--no-sandbox", "--disable-gpu"])
            page = b.new_page(viewport={"width": 1200, "height": 900})
            page.on("console", lambda m: m.type == "error" and errors.append(m.text))
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.on("request", lambda r: urlparse(r.url).hostname not in ("127.0.0.1", "localhost")
                    and outside.append(r.url))
            t0 = time.perf_counter()
            page.goto(url)
            page.wait_for_selector("#figure .heatmaplayer image", timeout=30_000)
            first_paint = time.perf_counter() - t0
            before = page.text_content("#figure .gtitle")
            t0 = time.perf_counter()
            with page.expect_response(lambda r: "_dash-update-component" in r.url and "figure" in
                                      (r.request.post_data or "")):
                page.click("#sample")
                page.fill("input.dash-dropdown-search", str(ex.ids[5]))
                page.click(f'label.dash-dropdown-option:has(input[value="{ex.ids[5]}"])')
            page.wait_for_function("t => document.querySelector('#figure .gtitle').textContent !== t", arg=before)
            interaction = time.perf_counter() - t0
            assert str(ex.ids[5]) in page.text_content("#figure .gtitle")
            shot = Image.open(io.BytesIO(page.screenshot()))
            b.close()
    finally:
        server.shutdown()
    print(f"first paint {first_paint:.2f} s, sample change {interaction:.2f} s")
    assert not errors, errors
    assert not outside, outside
    assert len(np.unique(np.asarray(shot.convert("RGB")).reshape(-1, 3), axis=0)) > 1
