"""The linked per-sample report (``python -m interp.report``) over sweep and SAE stores."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from interp.report.__main__ import main
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


@pytest.fixture(scope="module")
def stores(tmp_path_factory) -> tuple[str, str]:
    """(a 4-sample layer-sweep store from the CLI, an SAE store of the same samples)."""
    from interp.trace.__main__ import main as trace

    root = tmp_path_factory.mktemp("linked")
    assert trace(["--layer-sweep", "--limit", "4", "--copies", "2", "--min-gap", "0", "--out", str(root / "sweep")]) == 0
    sweep = str(root / "sweep" / "sweep.zarr")
    tree = open_store(sweep)
    (root / "sae").mkdir()
    return sweep, _sae_store(root / "sae", [str(i) for i in tree["sample"].values], dict(tree.attrs["dataset"]))


def _drawn(path: Path) -> int:
    """Plotly figures chromium drew on the page (its headless DOM dump)."""
    dom = subprocess.run(["chromium", "--headless", "--no-sandbox", "--dump-dom", str(path)],
                         capture_output=True, text=True, timeout=120).stdout
    return dom.count('class="main-svg"')


def test_joined_report(stores, tmp_path):
    out = write_linked_report(list(stores), tmp_path / "r" / "report.html", max_samples=3)
    page = out.read_text()
    assert 'src="http' not in page and page.count("window.PlotlyConfig") == 1
    for i in range(3):
        assert f'id="sample-{i}"' in page and f'href="#sample-{i}"' in page
    assert 'id="sample-3"' not in page and "3 of 4 shown" in page
    assert page.count("<h3>Layer sweep</h3>") == 3 and page.count("<h3>SAE features</h3>") == 3
    assert "peak layer on image patches" in page
    assert re.search(r'href="\.\./\.\./[^"]*sae/features\.html#feature-\d+"', page)  # relative to the report
    assert "sees &lt;script&gt;" in page and EVIL not in page
    if shutil.which("chromium"):
        assert _drawn(out) >= 3 * (1 + 2)  # per sample: sweep figure (one svg + overlay) and patch maps


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
    assert not (tmp_path / "r.html").exists()
