"""One self-contained HTML report linking, per sample, what one or more results stores hold for it.

Input: results stores (``interp.store``) of the same data set, joined on the samples they share.
Output: one HTML file, plotly.js inlined once, every string escaped: an index table, then one section
per sample (anchor ``sample-<index>``) with its image and ground-truth labels and one part per analysis
found: the layer sweep (``sweep/<tower>``: effect by layer and position, the layer where the effect on
image patches peaks) and SAE features (``sae``: top features with descriptions, dashboard links and
patch maps). Each part is a function of ``SECTIONS``; a new analysis (e.g. ``attribution/<method>``
maps [sample, y, x] over the image) is one more such function. Images are at most ``IMAGE_PX`` and
figures small, so the file grows linearly with the samples shown.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Union

import numpy as np
import plotly.graph_objects as go
import xarray as xr
from plotly.subplots import make_subplots

from interp.errors import InterpError
from interp.report.html import Link, esc, figure_divs, meta_list, table, write_page
from interp.report.sae import ACT_SCALE
from interp.report.sweep import DECIMALS, EFFECT_SCALE, _clip, _image_uri, _limit, _masses, _thumb_size, _Tower
from interp.store import dataset_of, join_stores, open_store

IMAGE_PX = 96  # longest side of each embedded image
TOP_FEATURES = 5
FIG_PX = 240  # height of each per-sample figure
Part = Union[str, go.Figure]  # HTML, or a figure drawn once the page's plotly bundle is placed


@dataclass
class Context:
    """What every section reads: the joined tree, the samples' images, SAE descriptions and dashboard."""

    tree: xr.DataTree
    images: np.ndarray  # [sample, H, W] in [0, 1]
    dashboard: str | None  # link to features.html, relative to the report
    descriptions: dict[int, str]
    dashboard_features: set[int] | None  # features with a dashboard section (None: unknown, link all)


def _images(tree: xr.DataTree, n: int) -> np.ndarray:
    """The first ``n`` samples' images: the sweep's, else the index thumbnails (cropped to the image),
    else, where thumbnails were not stored, the data set's images."""
    if "sweep" in tree.children and "image" in tree["sweep"]:
        return tree["sweep"]["image"].values[:n].astype(float)
    thumbs = tree["thumbnail"].values[:n] / 255.0
    if "image_width" not in tree:
        return thumbs
    if thumbs.any():
        w, h = _thumb_size(int(tree["image_width"][0]), int(tree["image_height"][0]), thumbs.shape[-1])
        return thumbs[:, :h, :w]
    data = dataset_of(tree)
    return np.stack([np.asarray(data.image(int(i)), float) for i in tree["image"].values[:n]])


def _labels(tree: xr.DataTree, i: int) -> str:
    if "labels" not in tree:
        return "not known"
    names = [str(n) for n, v in zip(tree["label"].values, tree["labels"].values[i]) if v > 0]
    return ", ".join(names) or "none"


def _sweep(ctx: Context, i: int) -> list[Part]:
    """Per tower: the sample's effect heatmap (layer x position) and the layer where the positive
    effect on image patches peaks."""
    if "sweep" not in ctx.tree.children:
        return []
    towers = [_Tower(name, node.to_dataset().isel(sample=[i])) for name, node in ctx.tree["sweep"].children.items()]
    fig = make_subplots(rows=1, cols=len(towers), horizontal_spacing=0.08,
                        subplot_titles=[f"{esc(t.name)} tower" for t in towers])
    rows = []
    for k, t in enumerate(towers):
        effect = np.round(t.ds["effect"].values[0].astype(float), DECIMALS)
        lim = _limit(effect)
        vals, text = t.ticks(np.array([0]))
        fig.add_heatmap(z=effect, x=t.x_edges, y=t.layers, colorscale=EFFECT_SCALE, zmin=-lim, zmax=lim,
                        showscale=False, row=1, col=k + 1,
                        hovertemplate="layer %{y} · position %{x:.0f}<br>effect %{z:.3f}<extra></extra>")
        fig.update_xaxes(tickvals=vals, ticktext=text, tickangle=-60, tickfont={"size": 8}, row=1, col=k + 1)
        fig.update_yaxes(title_text="layer", tickvals=t.layers if len(t.layers) <= 16 else None, row=1, col=k + 1)
        mass = _masses(t.ds)[1].values[0]
        peak = int(np.argmax(mass)) if mass.size and mass.max() > 0 else None
        rows.append([t.name, "—" if peak is None else int(t.layers[peak]),
                     float("nan") if peak is None else float(mass[peak]),
                     float("nan") if peak is None else float(t.score["sample_share"].values[0, peak])])
    fig.update_layout(height=FIG_PX + 60, margin={"t": 30, "l": 50, "r": 10, "b": 70}, plot_bgcolor="white")
    return ["<h3>Layer sweep</h3>", fig,
            table(["tower", "peak layer on image patches", "positive effect there", "share on finding"], rows)]


def _sae(ctx: Context, i: int) -> list[Part]:
    """The sample's top features by image activation: description, dashboard link, patch map on the image."""
    if "sae" not in ctx.tree.children:
        return []
    node = ctx.tree["sae"]
    acts = node["image_acts"][i].values
    top = [int(f) for f in np.argsort(-acts, kind="stable")[:TOP_FEATURES]]
    rows = [[Link(f"feature {f}", f"{ctx.dashboard}#feature-{f}")
             if ctx.dashboard and (ctx.dashboard_features is None or f in ctx.dashboard_features) else f"feature {f}",
             float(acts[f]), _clip(ctx.descriptions.get(f) or "—", 100)] for f in top]
    parts: list[Part] = ["<h3>SAE features</h3>", table(["feature", "image activation", "description"], rows)]
    patch = node["patch_acts"][i].values[:, top]  # [patch, k]
    side = math.isqrt(patch.shape[0])
    if side * side != patch.shape[0]:
        return parts + [f"<p>{patch.shape[0]} patches: not a square grid, no patch maps.</p>"]
    image = ctx.images[i]
    uri = _image_uri(image, IMAGE_PX)
    px_w, px_h = _thumb_size(image.shape[1], image.shape[0], IMAGE_PX)
    fig = make_subplots(rows=1, cols=len(top), horizontal_spacing=0.01, subplot_titles=[f"feature {f}" for f in top])
    for k in range(len(top)):
        fig.add_image(source=uri, x0=-0.5 + side / px_w / 2, dx=side / px_w, y0=-0.5 + side / px_h / 2,
                      dy=side / px_h, hoverinfo="skip", row=1, col=k + 1)
        fig.add_heatmap(z=np.round(patch[:, k].reshape(side, side).astype(float), DECIMALS), coloraxis="coloraxis",
                        row=1, col=k + 1, hovertemplate="r%{y} c%{x}<br>activation %{z:.3f}<extra></extra>")
        fig.update_xaxes(range=[-0.5, side - 0.5], visible=False, row=1, col=k + 1)
        fig.update_yaxes(range=[side - 0.5, -0.5], scaleanchor=fig.get_subplot(1, k + 1).yaxis.anchor,
                         visible=False, row=1, col=k + 1)
    fig.update_layout(height=FIG_PX - 40, margin={"t": 30, "l": 10, "r": 10, "b": 10},
                      coloraxis={"colorscale": ACT_SCALE, "cmin": 0, "cmax": float(np.nanmax(patch, initial=0)) or 1.0})
    return parts + [fig]


SECTIONS: tuple[Callable[[Context, int], list[Part]], ...] = (_sweep, _sae)


def _sample(ctx: Context, i: int) -> list[Part]:
    """One sample's section: heading (its anchor), image, fields and labels, then each analysis part."""
    tree = ctx.tree
    fields = [(k, _clip(tree[k].values[i], 200)) for k in ("prompt", "answer", "finding", "image_path")
              if k in tree.coords and str(tree[k].values[i])]
    head = [f'<h2 id="sample-{i}">Sample {i}: {esc(tree["sample"].values[i])}</h2>',
            f'<img alt="sample {i}" src="{esc(_image_uri(ctx.images[i], IMAGE_PX))}" style="float:right;width:160px;'
            'image-rendering:pixelated">',
            meta_list(fields + [("ground truth", _labels(tree, i))]), '<div style="clear:both"></div>']
    return head + [p for section in SECTIONS for p in section(ctx, i)]


def _dashboard(urls: Sequence[str], out: Path, given: str | None) -> tuple[str | None, dict[int, str], set[int] | None]:
    """(link to the SAE dashboards relative to ``out``, feature descriptions, features with a dashboard)
    from ``analysis.json`` and ``features.html`` beside the store holding ``sae`` (local stores only)."""
    where = next((Path(u).parent for u in urls if (Path(u) / "sae" / "zarr.json").exists()), None)
    analysis = where / "analysis.json" if where else None
    info = json.loads(analysis.read_text()) if analysis and analysis.exists() else {}
    page = Path(given) if given else where / "features.html" if where else None
    link = os.path.relpath(page.resolve(), out.resolve().parent).replace(os.sep, "/") if page and page.exists() else None
    shown = set(info["dashboard_features"]) if "dashboard_features" in info else None
    return link, {int(d["feature"]): str(d["description"]) for d in info.get("descriptions", [])}, shown


def write_linked_report(urls: Sequence[str], out: str | Path, max_samples: int = 20,
                        sae_dashboard: str | None = None) -> Path:
    """Write the linked per-sample report of the stores at ``urls`` (joined on their shared samples)
    to ``out``, one section for each of the first ``max_samples`` samples; return its path.
    ``sae_dashboard``: the SAE ``features.html`` to link (default: the one beside the SAE store)."""
    if not urls:
        raise InterpError("no store given")
    if max_samples < 1:
        raise InterpError(f"max_samples must be >= 1, got {max_samples}")
    out = Path(out)
    tree = join_stores(*urls) if len(urls) > 1 else open_store(urls[0])
    n_all = tree.sizes["sample"]
    n = min(n_all, max_samples)
    ctx = Context(tree, _images(tree, n), *_dashboard(urls, out, sae_dashboard))
    nodes = [node.path.lstrip("/") for node in tree.subtree if not node.is_root and not node.children]
    index = table(["sample", "id", "prompt", "ground truth"],
                  [[Link(f"sample {i}", f"#sample-{i}"), tree["sample"].values[i],
                    _clip(tree["prompt"].values[i], 80) if "prompt" in tree.coords else "", _labels(tree, i)]
                   for i in range(n)])
    parts: list[Part] = ["<h1>Linked analysis report</h1>",
                         meta_list([("stores", ", ".join(urls)), ("data set", tree.attrs["dataset"].get("name")),
                                    ("analyses", ", ".join(nodes) or "none"), ("samples", f"{n} of {n_all} shown")]),
                         "<h2>Index</h2>", index]
    for i in range(n):
        parts += _sample(ctx, i)
    divs = iter(figure_divs(p for p in parts if isinstance(p, go.Figure)))
    return write_page(out, "Linked analysis report", [next(divs) if isinstance(p, go.Figure) else p for p in parts])

