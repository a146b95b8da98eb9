"""The Dash explorer: figures against numpy (norms, label directions, attribution maps, SAE features from a
features store and from a checkpoint), callbacks, the CLI, and the app driven in chromium (Playwright)."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from browser import page, serve

from interp.explore import Explorer
from interp.explore.app import View, create_app, dashboard_of, families, info, site_of
from interp.report.html import esc
from interp.report.linked import blocks
from interp.store import Field, SampleIndex, StoreWriter, open_store

LM, VIS, PROJ = "lm.blocks.1.resid_post", "vision.blocks.0.resid_post", "projector.out"
EVIL = "<b>bold</b>"


@pytest.fixture(scope="module")
def ex(acts_store: str) -> Explorer:
    return Explorer(acts_store)


@pytest.fixture(scope="module")
def sae_run(acts_store: str, tmp_path_factory) -> Path:
    """A tiny SAE on the store's projector.out (``<run>/sae``), a features store of its codes for the first 12
    samples, numpy-encoded (``<run>/features.zarr``), and dashboards with descriptions beside it."""
    from interp.sae.analysis import load_sae
    from interp.sae.config import SAETrainConfig
    from interp.sae.train import train_sae

    run = tmp_path_factory.mktemp("sae")
    cfg = SAETrainConfig(store=acts_store, site=PROJ, architecture="standard", expansion=2, batch_size=8,
                         training_tokens=64, checkpoint_every=0, test_fraction=0.34, out=str(run))
    sae = load_sae(str(train_sae(cfg)))
    tree = open_store(acts_store)
    x = np.asarray(tree["acts"][PROJ].values[:12], np.float32)  # projector.out: the 8 x 8 patches, row-major
    with torch.no_grad():
        codes = sae.encode(torch.from_numpy(x.reshape(-1, x.shape[-1]))).numpy().reshape(12, 64, -1)
    ids = [str(i) for i in tree["sample"].values[:12]]
    w = StoreWriter(str(run / "features.zarr"), "sae", samples=SampleIndex(ids, dataset=dict(tree.attrs["dataset"])),
                    fields={"patch_acts": Field(codes.shape[1:], ("patch", "feature"), "float32")}, meta={"site": PROJ},
                    chunk_samples=12)
    w.write(0, {"patch_acts": codes})
    w.close()
    (run / "features.html").write_text("".join(f'<h2 id="feature-{f}">feature {f}</h2>' for f in range(codes.shape[-1])))
    (run / "analysis.json").write_text(json.dumps({"descriptions": [{"feature": f, "description": f"{EVIL} {f}"}
                                                                    for f in range(codes.shape[-1])]}))
    return run


@pytest.fixture(scope="module")
def rich(acts_store: str, sae_run: Path, tmp_path_factory) -> Explorer:
    """The store with attributions (saliency, prompting: its ground-truth masks too), the features store
    and the SAE checkpoint."""
    from interp.attribution.__main__ import main as attribute

    attr = str(tmp_path_factory.mktemp("attr") / "attr.zarr")
    assert attribute(["--data", "phantom-train:24", "--methods", "saliency,prompting", "--out", attr]) == 0
    return Explorer(acts_store, attr, str(sae_run / "features.zarr"), sae=str(sae_run / "sae"))


@pytest.fixture(scope="module")
def swept(acts_store: str, tmp_path_factory) -> Explorer:
    """The store with a layer sweep of two of its samples (another store)."""
    from interp.trace.__main__ import main as trace

    out = tmp_path_factory.mktemp("sweep")
    assert trace(["--layer-sweep", "--data", "phantom-train:24", "--limit", "2", "--copies", "2", "--min-gap", "0",
                  "--sites", LM, "--out", str(out)]) == 0
    return Explorer(acts_store, str(out / "sweep.zarr"))


def np_grid(ex: Explorer, site: str, row: int, values: np.ndarray | None = None) -> np.ndarray:
    """Per-patch L2 norms of sample ``row`` (or ``values`` per position) as a [row, col] grid, by plain numpy."""
    x = np.asarray(ex.acts[site].values[row], dtype=np.float64)
    pos = ex.acts[site].dims[1]
    kind, r, c = (np.asarray(ex.acts[f"{pos}_{a}"].values) for a in ("kind", "row", "col"))
    img = kind == 2
    grid = np.full((r[img].max() + 1, c[img].max() + 1), np.nan)
    grid[r[img], c[img]] = np.linalg.norm(x[img], axis=-1) if values is None else values[img]
    return grid


def callback(app, output: str):
    """The plain python function behind the app's callback writing ``output``."""
    return app.callback_map[output]["callback"].__wrapped__


def test_figures_match_numpy(ex):
    view = View(ex)
    for site in (VIS, PROJ):
        fig = view.figure(site, str(ex.ids[2]))
        img, heat = fig.data
        assert img.z.shape == (64, 64) and img.z.dtype == float
        np.testing.assert_allclose(heat.z, np_grid(ex, site, 2), rtol=1e-6)
        np.testing.assert_allclose(heat.z, ex.patch_norms(site, 2).values)
    (bar,) = view.figure(LM, 3).data
    valid = np.asarray(ex.acts["valid"].values[3])
    want = np.linalg.norm(np.asarray(ex.acts[LM].values[3], dtype=np.float64)[valid], axis=-1)
    np.testing.assert_allclose(bar.y, want, rtol=1e-6)
    assert list(bar.hovertext) == [esc(t) for t in ex.acts["token_text"].values[3][valid]]  # <bos>: escaped


def test_families_and_info(ex):
    assert families(ex) == {"vision.blocks.*.resid_post": [0, 1], PROJ: [], "lm.blocks.*.resid_post": [0, 1, 2]}
    assert site_of("lm.blocks.*.resid_post", 1) == LM and site_of(PROJ, None) == PROJ
    text = info(ex, 0)
    assert f"prompt: {ex.tree['prompt'].values[0]}" in text and "labels: " in text


def test_direction_overlay_matches_numpy(ex):
    view = View(ex)
    label = view.labels[0]
    assert f"direction:{label}" in view.overlays() and "sae" not in view.overlays()
    has = ex.tree["labels"].sel(label=label).values == 1
    x = np.asarray(ex.acts[PROJ].values, np.float64)  # every position of projector.out is a patch
    u = x[has].reshape(-1, x.shape[-1]).mean(0) - x[~has].reshape(-1, x.shape[-1]).mean(0)
    heat = view.figure(PROJ, 4, f"direction:{label}").data[1]
    np.testing.assert_allclose(heat.z, np_grid(ex, PROJ, 4, x[4] @ (u / np.linalg.norm(u))), rtol=1e-6, atol=1e-9)
    (bar,) = view.figure(LM, 4, f"direction:{label}").data  # sequence sites: per token
    assert len(bar.y) == int(ex.acts["valid"].values[4].sum())


def test_attribution_overlay_and_ground_truth(rich):
    view = View(rich)
    assert {"attribution:saliency", "attribution:prompting", "sae"} <= set(view.overlays())
    attr = open_store(rich.urls[1])["attribution"]
    shown = 0
    for row in range(6):
        fig = view.figure(VIS, row, "attribution:saliency")
        stored = attr["saliency"]["map"].values[row]
        np.testing.assert_array_equal(fig.data[1].z, blocks(stored.astype(float), 64))
        mask = attr["mask"].values[row]
        assert (len(fig.data) == 3) == bool(mask.any())  # the ground truth outlined where there is one
        shown += mask.any()
    assert shown and view.figure(VIS, 0, "attribution:magic").layout.annotations[0].text.startswith("no attribution")


def test_sae_features_from_store_and_checkpoint(rich, sae_run):
    from_store = rich.features(3)
    assert rich.find("sae", 3) is not None and rich.find("sae", 20) is None  # the features store holds 12 samples
    fresh = Explorer(rich.tree, sae=str(sae_run / "sae"))  # the checkpoint alone
    np.testing.assert_allclose(fresh.features(3), from_store, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(rich.features(20), fresh.features(20))
    view = View(rich, dashboard_of(rich, None))
    assert view.page == sae_run / "features.html"
    heat = view.figure(PROJ, 3, "sae", 1).data[1]
    np.testing.assert_allclose(heat.z, from_store[..., 1])
    assert "feature must be between" in view.figure(PROJ, 3, "sae", 999).layout.annotations[0].text
    h, w = rich.image_size(3)
    panel = view.patch_features(3, {"points": [{"x": w * 0.6, "y": h * 0.3}]})
    acts = from_store[2, 4]
    top = [int(f) for f in np.argsort(-acts, kind="stable") if acts[f] > 0][:8]
    items = panel[1].children
    assert panel[0].children == "Patch row 2, col 4: top SAE features" and len(items) == len(top)
    assert [li.children[0].href for li in items] == [f"/sae/features.html#feature-{f}" for f in top]
    assert items[0].children[2] == f" - {EVIL} {top[0]}"  # text nodes: Dash escapes them
    app = create_app(rich)
    assert app.server.test_client().get("/sae/features.html").data.startswith(b'<h2 id="feature-0"')


def test_sweep_of_a_sample(swept):
    view = View(swept)
    sweep = open_store(swept.urls[1])
    ids = [str(i) for i in sweep["sample"].values]
    (heat,) = view.sweep(ids[1]).data
    np.testing.assert_allclose(heat.z, np.round(sweep["sweep/lm"]["effect"].values[1].astype(float), 3), equal_nan=True)
    other = next(str(i) for i in swept.ids if str(i) not in ids)
    assert view.sweep(other).layout.annotations[0].text.startswith("no layer sweep")
    assert "sweep.figure" in create_app(swept).callback_map


def test_callbacks_follow_sample_layer_and_overlay(ex, rich):
    app = create_app(ex)
    show = callback(app, "figure.figure")
    layers = callback(app, "..layer.min...layer.max...layer.marks...layer.value...layer.disabled..")
    assert layers("lm.blocks.*.resid_post") == (0, 2, {0: "0", 1: "1", 2: "2"}, 2, False)
    assert layers(PROJ)[-1] is True
    a, b = (show("vision.blocks.*.resid_post", 1, str(ex.ids[i]), "norm", None) for i in (0, 1))
    c = show("vision.blocks.*.resid_post", 0, str(ex.ids[0]), "norm", None)
    assert not np.array_equal(a.data[1].z, b.data[1].z) and not np.array_equal(a.data[1].z, c.data[1].z)
    assert not np.array_equal(show("lm.blocks.*.resid_post", 0, ex.ids[0], "norm", None).data[0].y,
                              show("lm.blocks.*.resid_post", 2, ex.ids[0], "norm", None).data[0].y)
    assert callback(app, "info.children")(str(ex.ids[1])) == info(ex, 1)
    assert callback(app, "sample.options")("-0001", None) == [s for s in ex.ids if "-0001" in s]
    assert "sweep.figure" not in app.callback_map  # no store holds a sweep
    app = create_app(rich)
    show = callback(app, "figure.figure")
    assert show(PROJ, None, str(rich.ids[0]), "attribution:saliency", None).data[1].colorbar.title.text == "attribution"
    assert callback(app, "feature.disabled")("sae") is False and callback(app, "feature.disabled")("norm") is True
    assert callback(app, "patch.children")(None, str(rich.ids[0]))[0].children.startswith("Click a patch")


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


def test_app_in_chromium(rich):
    """Served on localhost and driven by chromium: no console error, no request off localhost, a new sample
    and then an attribution overlay redraw the figure, a click on a patch lists its SAE features, the
    screenshot is not blank."""
    def redrawn(action) -> float:
        before = w.page.text_content("#figure .gtitle")
        t0 = time.perf_counter()
        with w.page.expect_response(lambda r: "_dash-update-component" in r.url and "figure" in
                                    (r.request.post_data or "")):
            action()
        w.page.wait_for_function("t => document.querySelector('#figure .gtitle').textContent !== t", arg=before)
        return time.perf_counter() - t0

    def pick(dropdown: str, search: str, value: str) -> None:
        w.page.click(dropdown)
        w.page.fill("input.dash-dropdown-search", search)
        w.page.click(f'label.dash-dropdown-option:has(input[value="{value}"])')

    sample = str(rich.ids[5])
    with serve(create_app(rich).server) as url, page() as w:
        t0 = time.perf_counter()
        w.page.goto(url)
        w.page.wait_for_selector("#figure .heatmaplayer image", timeout=30_000)
        first_paint = time.perf_counter() - t0
        change = redrawn(lambda: pick("#sample", sample, sample))
        assert sample in w.page.text_content("#figure .gtitle")
        overlay = redrawn(lambda: pick("#overlay", "saliency", "attribution:saliency"))
        assert "attribution: saliency" in w.page.text_content("#figure .gtitle")
        box = w.page.locator("#figure .nsewdrag").first.bounding_box()
        w.page.mouse.click(box["x"] + box["width"] / 2, box["y"] + box["height"] / 2)
        w.page.wait_for_selector('#patch a[href^="/sae/features.html#feature-"]', timeout=10_000)
        w.screenshot_is_not_blank()
        w.check()
    print(f"first paint {first_paint:.2f} s, sample change {change:.2f} s, overlay change {overlay:.2f} s")
