"""How responsive the explorer stays on a large store: time to first paint and per interaction, in chromium.

    python benchmarks/explorer_latency.py [--samples 10000] [--repeats 5] [--store DIR] [--json PATH]

One torch thread. A synthetic store of ``--samples`` samples is written with ``StoreWriter`` (once: an
existing one is reused): ``acts`` with small widths (vision.blocks.{0,1}.resid_post and projector.out on
an 8 x 8 grid, lm.blocks.0.resid_post over 24 tokens, d = 16, float16), an ``attribution`` group (two
methods' 64 x 64 maps and the ground-truth masks), and a features store (``sae``: 128 features per patch,
8 active). The explorer is served on localhost and driven by chromium (Playwright); each repeat opens a
fresh page and times, until the figure (or the patch panel) shows the new state:

* ``first_paint``: navigation to the first heatmap drawn;
* ``sample``: a new sample picked in the dropdown; ``layer``: the layer slider moved;
* ``overlay_attribution``, ``overlay_sae``, ``overlay_norm``: the overlay switched;
* ``patch_click``: a click on the image until its top SAE features are listed;
* ``direction_first`` (first repeat only: the difference of means of a label over every sample, one
  pass over the site, then cached) and ``direction``: the projection overlay.

Also the server side alone (``View.figure`` per overlay, no browser) and the start-up (open the stores and
build the app). Medians over repeats; figures to stdout and ``--json``
(default ``reports/benchmarks/explorer_latency.json``).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from statistics import median

import numpy as np

from figures import write_figures
from interp.attribution.base import Attribution
from interp.attribution.store import GROUP, layout, sample_row
from interp.cache.acts import acts_layout
from interp.explore.api import Explorer
from interp.explore.app import View, create_app
from interp.store import Field, SampleIndex, StoreWriter

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from browser import page, serve  # noqa: E402  (the browser tests' chromium and server)

GRID, D, SEQ, SIZE, CHUNK, FEATURES, ACTIVE = 8, 16, 24, 64, 256, 128, 8
SITES = {"vision.blocks.0.resid_post": (GRID * GRID + 1, D), "vision.blocks.1.resid_post": (GRID * GRID + 1, D),
         "projector.out": (GRID * GRID, D), "lm.blocks.0.resid_post": (SEQ, D)}
LABELS = ("pleural_effusion", "pneumothorax", "nodule")
METHODS = ("saliency", "medfocus")


def index(n: int) -> SampleIndex:
    rng = np.random.default_rng(0)
    findings = [LABELS[i % len(LABELS)] for i in range(n)]
    return SampleIndex([f"s{i:05d}" for i in range(n)],
                       {"prompt": [f"question : is there a {f} ? answer :" for f in findings], "finding": findings,
                        "mode": ["direct"] * n},
                       labels={name: rng.integers(0, 2, n).tolist() for name in LABELS},
                       dataset={"ref": "synthetic", "name": "synthetic", "hash": f"synthetic-{n}"})


def smooth(rng: np.random.Generator, n: int) -> np.ndarray:
    """``n`` [SIZE, SIZE] images in [0, 1]: 8 x 8 blocks (as compressible as real maps, roughly)."""
    return np.kron(rng.random((n, GRID, GRID)), np.ones((1, SIZE // GRID, SIZE // GRID))).astype(np.float32)


def build(folder: Path, n: int) -> tuple[str, str]:
    """(the store with acts and attributions, the features store), written where missing or incomplete."""
    samples, rng = index(n), np.random.default_rng(1)
    grids = {s: (GRID, GRID, shape[0] == GRID * GRID + 1) for s, shape in SITES.items() if not s.startswith("lm")}
    fields, statics = acts_layout(SITES, grids, SEQ, "float16", ["image"])
    acts = StoreWriter(str(folder / "store.zarr"), "acts", samples=samples, fields=fields, statics=statics,
                       meta={"model_id": "synthetic"}, chunk_samples=CHUNK)
    for r in acts.pending():
        k = len(r)
        arrays = {s: rng.standard_normal((k, *shape)).astype(np.float16) for s, shape in SITES.items()}
        arrays |= {"tokens": np.tile(np.arange(SEQ, dtype=np.int32), (k, 1)),
                   "token_text": np.full((k, SEQ), "tok", dtype=object),
                   "position_kind": np.full((k, SEQ), 3, np.int8), "position_row": np.full((k, SEQ), -1, np.int16),
                   "position_col": np.full((k, SEQ), -1, np.int16), "position_span": np.zeros((k, SEQ), np.uint16),
                   "valid": np.ones((k, SEQ), bool)}
        acts.write(r.start, arrays, list(smooth(rng, k)))
    acts.close()
    outputs = {m: {"tokens": False, "region": False, "concepts": []} for m in METHODS}
    fields, statics = layout(outputs, (SIZE, SIZE), masks=True)
    attr = StoreWriter(str(folder / "store.zarr"), GROUP, samples=samples, fields=fields, statics=statics,
                       meta={"model_id": "synthetic", "methods": {m: {"name": m, "settings": {}} for m in METHODS},
                             "outputs": outputs}, chunk_samples=CHUNK)
    mask = np.zeros((SIZE, SIZE), bool)
    mask[16:40, 8:28] = True
    for r in attr.pending():
        maps = smooth(rng, len(r) * len(METHODS)).reshape(len(r), len(METHODS), SIZE, SIZE)
        rows = [sample_row({m: Attribution(m, maps[j, k], "yes", ["yes"]) for k, m in enumerate(METHODS)}, outputs,
                           fields, mask, str(j)) for j in range(len(r))]
        attr.write(r.start, {f: np.stack([row[f] for row in rows]) for f in fields})
    attr.close()
    feats = StoreWriter(str(folder / "features.zarr"), "sae", samples=samples,
                        fields={"patch_acts": Field((GRID * GRID, FEATURES), ("patch", "feature"), "float32")},
                        meta={"site": "projector.out"}, chunk_samples=CHUNK)
    for r in feats.pending():
        codes = np.zeros((len(r), GRID * GRID, FEATURES), np.float32)
        top = rng.integers(0, FEATURES, (len(r), GRID * GRID, ACTIVE))
        np.put_along_axis(codes, top, rng.random(top.shape).astype(np.float32) * 5, axis=-1)
        feats.write(r.start, {"patch_acts": codes})
    feats.close()
    (folder / "features.html").write_text("".join(f'<h2 id="feature-{f}">feature {f}</h2>' for f in range(FEATURES)))
    return str(folder / "store.zarr"), str(folder / "features.zarr")


def browse(url: str, ids: list[str], repeats: int) -> dict[str, list[float]]:
    """Seconds per interaction in chromium, one fresh page per repeat."""
    times: dict[str, list[float]] = {}

    def timed(name: str, action: Callable[[], None], done: str, arg: object = None) -> None:
        t0 = time.perf_counter()
        action()
        w.page.wait_for_function(done, arg=arg, timeout=60_000)
        times.setdefault(name, []).append(time.perf_counter() - t0)

    def pick(dropdown: str, search: str, value: str) -> Callable[[], None]:
        def act() -> None:
            w.page.click(dropdown)
            w.page.fill("input.dash-dropdown-search", search)
            w.page.click(f'label.dash-dropdown-option:has(input[value="{value}"])')
        return act

    title = "document.querySelector('#figure .gtitle')"
    changed = f"t => {title} && {title}.textContent !== t"
    for rep in range(repeats):
        with page() as w:
            timed("first_paint", lambda: w.page.goto(url), "() => document.querySelector('#figure .heatmaplayer image')")
            sample = ids[(rep * 7919 + 1234) % len(ids)]
            for name, action in [("sample", pick("#sample", sample, sample)),
                                 ("overlay_attribution", pick("#overlay", "saliency", "attribution:saliency")),
                                 ("overlay_sae", pick("#overlay", "SAE", "sae")),
                                 ("overlay_norm", pick("#overlay", "norm", "norm")),
                                 ("direction_first" if rep == 0 else "direction",
                                  pick("#overlay", "nodule", "direction:nodule"))]:
                timed(name, action, changed, w.page.text_content("#figure .gtitle"))
            before = w.page.evaluate("() => JSON.stringify(document.querySelector('#figure .js-plotly-plot').data[1].z)")
            timed("layer", lambda: w.page.press("#layer .dash-slider-thumb", "Home"),  # to the first layer
                  "z => JSON.stringify(document.querySelector('#figure .js-plotly-plot').data[1].z) !== z", before)
            box = w.page.locator("#figure .nsewdrag").first.bounding_box()
            x, y = box["x"] + box["width"] * (0.2 + 0.1 * rep), box["y"] + box["height"] / 2
            timed("patch_click", lambda: w.page.mouse.click(x, y),
                  "() => document.querySelector('#patch h4')")
            w.check()
    return times


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--samples", type=int, default=10_000)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--store", help="folder for the synthetic stores (default: a temporary one)")
    p.add_argument("--json", default="reports/benchmarks/explorer_latency.json")
    args = p.parse_args()
    import torch

    torch.set_num_threads(1)
    folder = Path(args.store or tempfile.mkdtemp(prefix="explorer-latency-"))
    t0 = time.perf_counter()
    store, features = build(folder, args.samples)
    built = time.perf_counter() - t0
    t0 = time.perf_counter()
    ex = Explorer(store, features)
    app = create_app(ex)
    startup = time.perf_counter() - t0
    view = View(ex)
    server: dict[str, list[float]] = {}
    for rep in range(args.repeats):
        row = (rep * 7919 + 99) % len(ex.ids)
        for overlay in ("norm", "direction:pneumothorax", "attribution:saliency", "sae"):
            t = time.perf_counter()
            view.figure("vision.blocks.1.resid_post", row, overlay)
            server.setdefault(overlay, []).append(time.perf_counter() - t)
    with serve(app.server) as url:
        browser = browse(url, [str(i) for i in ex.ids], args.repeats)
    size = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())
    result = {"samples": args.samples, "repeats": args.repeats, "store_mb": round(size / 1e6, 1),
              "build_s": round(built, 1), "startup_s": round(startup, 2),
              "browser_median_s": {k: round(median(v), 3) for k, v in browser.items()},
              "server_median_s": {k: round(median(v), 4) for k, v in server.items()},
              "server_first_direction_s": round(server["direction:pneumothorax"][0], 3)}
    print(f"{args.samples} samples, {result['store_mb']} MB on disk (built in {built:.0f} s); start-up {startup:.2f} s")
    print(f"{'in chromium':24s} median s")
    for k, v in result["browser_median_s"].items():
        print(f"  {k:22s} {v:.3f}")
    print(f"{'server only (View.figure)':24s} median s (first projection: {result['server_first_direction_s']} s)")
    for k, v in result["server_median_s"].items():
        print(f"  {k:22s} {v:.4f}")
    write_figures(args.json, result)


if __name__ == "__main__":
    main()
