"""The linked per-sample report (``python -m interp.report``) over sweep, SAE and attribution stores, in chromium too."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest

from browser import files_app, headless, page, serve

from interp.attribution.base import Attribution
from interp.attribution.store import layout, sample_row
from interp.report.__main__ import main
from interp.report.attribution import COLUMNS
from interp.report.linked import write_linked_report
from interp.store import Field, SampleIndex, StoreWriter, open_store

EVIL = "<script>alert(1)</script>"
N_FEATURES, GRID = 6, 4


def _sae_store(folder: Path, ids: list[str], dataset: dict) -> str:
    """A small ``sae`` store (features.zarr) with analysis.json and features.html beside it."""
    rng = np.random.default_rng(0)
    patch = rng.random((len(ids), GRID * GRID, N_FEATURES)).astype(np.float32)
    url = str(folder / "features.zarr")
    w = StoreWriter(url, "sae", samples=SampleIndex(ids, {"prompt": [f"is there {EVIL} ?"] * len(ids)}, dataset=dataset),
                    fields={"image_acts": Field((N_FEATURES,), ("feature",), "float32"),
                            "patch_acts": Field((GRID * GRID, N_FEATURES), ("patch", "feature"), "float32")},
                    meta={"model_id": "test"}, chunk_samples=len(ids))
    w.write(0, {"image_acts": patch.max(1), "patch_acts": patch}, images=[rng.random((32, 32))] * len(ids))
    w.close()
    descriptions = [{"feature": f, "description": f"feature {f} sees {EVIL}"} for f in range(N_FEATURES)]
    (folder / "analysis.json").write_text(json.dumps({"descriptions": descriptions,
                                                      "dashboard_features": list(range(N_FEATURES))}))
    (folder / "features.html").write_text("<html></html>")
    return url


def _attribution_store(url: str, ids: list[str], dataset: dict, images: np.ndarray) -> str:
    """An ``attribution`` group as ``python -m interp.attribution`` lays it out: a plain map method and a
    MedFocus-like one (tokens, concepts, region), with a ground-truth mask; strings from data are evil."""
    rng = np.random.default_rng(1)
    shape = images.shape[1:]
    outputs = {"saliency": {"tokens": False, "region": False, "concepts": []},
               "medfocus": {"tokens": True, "region": True, "concepts": ["lung_left", EVIL]}}
    fields, statics = layout(outputs, shape, masks=True)

    def box(y: int, x: int) -> np.ndarray:
        out = np.zeros(shape, bool)
        out[y:y + 12, x:x + 16] = True
        return out

    def row(sample_id: str) -> dict:
        tokens = [EVIL, "yes"]
        results = {"saliency": Attribution("saliency", rng.random(shape), EVIL, tokens),
                   "medfocus": Attribution("medfocus", rng.random(shape), EVIL, tokens, tokens=rng.random(2),
                                           concepts={"lung_left": 0.5, EVIL: 2.0}, region=box(4, 30))}
        return sample_row(results, outputs, fields, box(20, 8), sample_id)

    rows = [row(i) for i in ids]
    meta = {"model_id": "organism", "methods": {m: {"name": m, "settings": {}} for m in outputs}, "outputs": outputs}
    w = StoreWriter(url, "attribution", samples=SampleIndex(ids, {"mode": ["direct"] * len(ids)}, dataset=dataset),
                    fields=fields, statics=statics,
                    meta=meta, chunk_samples=len(ids))
    w.write(0, {k: np.stack([r[k] for r in rows]) for k in fields}, images=list(images))
    w.close()
    return url


def _evaluation(path: Path) -> str:
    """An evaluation's results.json scoring medfocus (and a method the stores do not hold)."""
    score = {"mean": 0.5, "lo": 0.25, "hi": 0.75}
    rows = [{"organism": "organism", "kind": kind, "mode": "direct", "method": m, "n": 4,
             **{c: score for c in COLUMNS}} for m in ("medfocus", EVIL) for kind in ("lesion", "shortcut")]
    path.write_text(json.dumps({"summary": rows}))
    return str(path)


@pytest.fixture(scope="module")
def stores(tmp_path_factory) -> tuple[str, str, str]:
    """(a 4-sample layer-sweep store from the CLI, an SAE store and an attribution store of the same samples)."""
    from interp.trace.__main__ import main as trace

    root = tmp_path_factory.mktemp("linked")
    assert trace(["--layer-sweep", "--limit", "4", "--copies", "2", "--min-gap", "0", "--out", str(root / "sweep")]) == 0
    sweep = str(root / "sweep" / "sweep.zarr")
    tree = open_store(sweep)
    ids, dataset = [str(i) for i in tree["sample"].values], dict(tree.attrs["dataset"])
    (root / "sae").mkdir()
    return (sweep, _sae_store(root / "sae", ids, dataset),
            _attribution_store(str(root / "attribution.zarr"), ids, dataset, tree["sweep"]["image"].values))


def test_joined_report(stores, tmp_path):
    out = write_linked_report(list(stores), tmp_path / "r" / "report.html", max_samples=3)
    page = out.read_text()
    assert 'src="http' not in page and page.count("window.PlotlyConfig") == 1
    for i in range(3):
        assert f'id="sample-{i}"' in page and f'href="#sample-{i}"' in page
    assert 'id="sample-3"' not in page and "3 of 4 shown" in page
    assert page.count("<h3>Layer sweep</h3>") == 3 and page.count("<h3>SAE features</h3>") == 3
    assert page.count("<h3>Attributions</h3>") == 3 and page.count("<h4>Concept scores</h4>") == 3
    assert "peak layer on image patches" in page
    for tower in open_store(stores[0])["sweep"].children:  # layer -> its patch map (vision and LM image tokens)
        assert re.search(rf'<a href="#sample-0-{tower}-layers">\d+</a>', page) and f'id="sample-0-{tower}-layers"' in page
    assert re.search(r'href="\.\./\.\./[^"]*sae/features\.html#feature-\d+"', page)  # relative to the report
    assert "sees &lt;script&gt;" in page and EVIL not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page and "#method-" not in page  # no evaluation given
    dom = headless(tmp_path / "profile", "--dump-dom", out.as_uri())  # plotly draws two SVG layers per figure
    assert dom.count('class="main-svg"') >= 3 * 2 * (1 + 1 + 2 + 1 + 1)  # attributions, concepts, sweep + maps, SAE


def test_attributions_link_to_their_evaluation(stores, tmp_path):
    results = _evaluation(tmp_path / "results.json")
    out = tmp_path / "report.html"
    assert main([stores[2], "--out", str(out), "--evaluation", results]) == 0
    page = out.read_text()
    assert EVIL not in page and page.count("window.PlotlyConfig") == 1
    assert '<h3 id="method-medfocus">medfocus</h3>' in page and '<h3 id="method-saliency">' in page
    assert page.count('<a href="#method-medfocus">medfocus</a>') == 4  # from each sample
    assert "pointing 0.5 · energy 0.5" in page  # medfocus, lesion cases, this model, the sample's mode
    assert "0.5 [0.25, 0.75]" in page and "saliency is not in this evaluation" in page
    assert "<h4>Response tokens</h4>" in page and 'title="' in page


def test_size_grows_linearly(stores, tmp_path):
    size = {n: write_linked_report(list(stores), tmp_path / f"{n}.html", max_samples=n).stat().st_size for n in (1, 2, 4)}
    per_sample = (size[4] - size[2]) / 2
    assert 0.7 < per_sample / (size[2] - size[1]) < 1.3
    assert per_sample < 60_000, per_sample


def test_escapes_ids_and_uses_thumbnails(tmp_path):
    url = _sae_store(tmp_path, [EVIL, "b"], {"ref": "x", "hash": "h", "name": "tiny"})
    out = tmp_path / "r.html"
    assert main([url, "--out", str(out)]) == 0
    page = out.read_text()
    assert EVIL not in page and "Sample 0: &lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert 'href="features.html#feature-' in page and "Layer sweep" not in page
    assert page.count('<img alt="sample') == 2 and page.count("window.PlotlyConfig") == 1


def test_cli_errors(stores, tmp_path, capsys):
    def error(args: list[str]) -> str:
        assert main([*args, "--out", str(tmp_path / "r.html")]) == 2
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ")
        return lines[0]

    assert "no store at" in error([str(tmp_path / "missing.zarr")])
    assert "--max-samples" in error([stores[0], "--max-samples", "0"])
    tree = open_store(stores[0])
    (tmp_path / "other").mkdir()
    other = _sae_store(tmp_path / "other", ["not-shared"], dict(tree.attrs["dataset"]))
    assert "share no sample" in error([stores[0], other])
    assert "cannot read the evaluation" in error([stores[2], "--evaluation", str(tmp_path / "none.json")])
    (tmp_path / "bad.json").write_text(json.dumps({"summary": [{"method": "x"}]}))
    assert "a summary row lacks auprc, box_f1" in error([stores[2], "--evaluation", str(tmp_path / "bad.json")])
    assert "no store given holds an attribution" in error([stores[0], "--evaluation", _evaluation(tmp_path / "e.json")])
    assert not (tmp_path / "r.html").exists()


def test_report_in_chromium(stores, tmp_path):
    """Served from localhost: no console error, no request leaving it, a layer slider redraws the patch map,
    the screenshot is not blank."""
    out = write_linked_report(list(stores), tmp_path / "report.html", max_samples=2,
                              evaluation=_evaluation(tmp_path / "results.json"))
    visible = ("() => [...document.querySelectorAll('.js-plotly-plot')].filter(d => d.layout.sliders)"
               ".map(d => d.data.map(t => t.visible !== false))")
    with serve(files_app(str(tmp_path))) as url, page() as w:
        w.page.goto(url + out.name)
        w.page.wait_for_selector(".js-plotly-plot .main-svg", timeout=30_000)
        before = w.page.evaluate(visible)
        assert before and all(sum(v) == 3 for v in before)  # image, one layer's map, the outline
        rail = w.page.locator(".slider-container .slider-rail-touch-rect").first
        rail.scroll_into_view_if_needed()
        box = rail.bounding_box()
        first_on = before[0].index(True, 1) == 1  # the first layer shows: go to the last
        rail.click(position={"x": box["width"] - 2 if first_on else 2, "y": box["height"] / 2})
        w.page.wait_for_function(f"before => JSON.stringify(({visible})()) !== JSON.stringify(before)", arg=before)
        w.page.click('a[href="#method-medfocus"]')
        assert w.page.evaluate("location.hash") == "#method-medfocus"
        w.screenshot_is_not_blank()
        w.check()
