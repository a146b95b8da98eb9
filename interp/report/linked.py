"""One self-contained HTML report linking, per sample, what one or more results stores hold for it.

Input: results stores (``interp.store``) of the same data set, joined on the samples they share.
Output: one HTML file, plotly.js inlined once, every string escaped: an index table, then one section
per sample (anchor ``sample-<index>``) with its image and ground-truth labels and one part per analysis
found: attributions (``attribution``: each method's map over the image with the ground truth outlined,
MedFocus concept bars, token-level scores, each method linked to its evaluation scores when an
evaluation's ``results.json`` is given), the layer sweep (``sweep/<tower>``: effect by layer and
position, the layer where the effect on image patches peaks, linked to the patch map of each layer)
and SAE features (``sae``: top features with descriptions, dashboard links and patch maps). Each part
is a function of ``SECTIONS``. Images are at most ``IMAGE_PX``, maps at most ``MAP_CELLS`` cells a side
and figures small, so the file grows linearly with the samples shown.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Union

import numpy as np
import plotly.graph_objects as go
import xarray as xr
from plotly.subplots import make_subplots

from interp.errors import InterpError
from interp.report.attribution import COLUMNS, _cell
from interp.report.html import Link, esc, figure_divs, meta_list, table, write_page
from interp.report.sae import ACT_SCALE, sae_pages
from interp.report.sweep import (DECIMALS, EFFECT_SCALE, OVERLAY_SCALE, _clip, _image_uri, _limit, _masses, _nanmean,
                                 _outline, _thumb_size, _Tower)
from interp.store import dataset_of, join_stores, open_store

IMAGE_PX = 96  # longest side of each embedded image
TOP_FEATURES = 5
FIG_PX = 240  # height of each per-sample figure
MAP_CELLS = 32  # longest side of the grid an attribution map is shown on (block means)
TRUTH_COLOR = "#3ec1d3"
HEADLINE = ("pointing", "energy")  # evaluation scores shown beside each method
Part = Union[str, go.Figure]  # HTML, or a figure drawn once the page's plotly bundle is placed
Backdrop = tuple[str, int, int]  # an image as a JPEG data URI, and its width and height in pixels


@dataclass
class Context:
    """What every section reads: the joined tree, the samples' images, SAE descriptions and dashboard."""

    tree: xr.DataTree
    images: np.ndarray  # [sample, H, W] in [0, 1]
    dashboard: str | None  # link to features.html, relative to the report
    descriptions: dict[int, str]
    dashboard_features: set[int] | None  # features with a dashboard section (None: unknown, link all)
    evaluation: dict[str, list[dict]] = field(default_factory=dict)  # method -> its evaluation summary rows


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


def _backdrop(image: np.ndarray) -> Backdrop:
    return (_image_uri(image, IMAGE_PX), *_thumb_size(image.shape[1], image.shape[0], IMAGE_PX))


def _on_image(fig: go.Figure, back: Backdrop, width: float, height: float, col: int) -> None:
    """The image stretched over a ``width`` x ``height`` grid of cells in subplot (1, ``col``), axes fitted."""
    uri, px_w, px_h = back
    fig.add_image(source=uri, x0=-0.5 + width / px_w / 2, dx=width / px_w, y0=-0.5 + height / px_h / 2,
                  dy=height / px_h, hoverinfo="skip", row=1, col=col)
    fig.update_xaxes(range=[-0.5, width - 0.5], visible=False, row=1, col=col)
    fig.update_yaxes(range=[height - 0.5, -0.5], scaleanchor=fig.get_subplot(1, col).yaxis.anchor, visible=False,
                     row=1, col=col)


def _layer_maps(t: _Tower, back: Backdrop, active: int) -> go.Figure:
    """One tower's effect on the patch grid over the image, one layer at a time (a slider), the finding outlined."""
    rows, cols = t.shape
    grid = t.grid[0].astype(np.float32)  # plotly sends arrays as binary: 4 bytes a cell
    lim = _limit(grid)
    fig = make_subplots(rows=1, cols=1)
    _on_image(fig, back, cols, rows, 1)
    for k, layer in enumerate(t.layers):
        fig.add_heatmap(z=grid[k], coloraxis="coloraxis", visible=k == active, row=1, col=1,
                        hovertemplate=f"layer {layer} · r%{{y}} c%{{x}}<br>effect %{{z:.3f}}<extra></extra>")
    xs, ys = _outline(t.mask[0])
    fig.add_scatter(x=xs, y=ys, mode="lines", line={"color": TRUTH_COLOR, "width": 2}, hoverinfo="skip",
                    showlegend=False, row=1, col=1)
    steps = [{"label": str(layer), "method": "restyle",
              "args": [{"visible": [True, *(j == k for j in range(len(t.layers))), True]}]}
             for k, layer in enumerate(t.layers)]
    fig.update_layout(height=FIG_PX + 80, width=FIG_PX + 120, margin={"t": 30, "l": 10, "r": 10, "b": 10},
                      title={"text": f"{esc(t.name)} tower: effect on the patch grid", "font": {"size": 12}},
                      coloraxis={"colorscale": OVERLAY_SCALE, "cmin": -lim, "cmax": lim},
                      sliders=[{"active": active, "steps": steps, "currentvalue": {"prefix": "layer "}, "pad": {"t": 10}}])
    return fig


def sweep_figure(towers: Sequence[_Tower]) -> go.Figure:
    """One sample's sweep (towers loaded with ``isel(sample=[i])``): its effect heatmap (layer x position) per tower."""
    fig = make_subplots(rows=1, cols=len(towers), horizontal_spacing=0.08,
                        subplot_titles=[f"{esc(t.name)} tower" for t in towers])
    for k, t in enumerate(towers):
        effect = np.round(t.ds["effect"].values[0].astype(float), DECIMALS)
        lim = _limit(effect)
        vals, text = t.ticks(np.array([0]))
        fig.add_heatmap(z=effect, x=t.x_edges, y=t.layers, colorscale=EFFECT_SCALE, zmin=-lim, zmax=lim,
                        showscale=False, row=1, col=k + 1,
                        hovertemplate="layer %{y} · position %{x:.0f}<br>effect %{z:.3f}<extra></extra>")
        fig.update_xaxes(tickvals=vals, ticktext=text, tickangle=-60, tickfont={"size": 8}, row=1, col=k + 1)
        fig.update_yaxes(title_text="layer", tickvals=t.layers if len(t.layers) <= 16 else None, row=1, col=k + 1)
    fig.update_layout(height=FIG_PX + 60, margin={"t": 30, "l": 50, "r": 10, "b": 70}, plot_bgcolor="white")
    return fig


def _sweep(ctx: Context, i: int) -> list[Part]:
    """Per tower: the sample's effect heatmap (layer x position) and the layer where the positive
    effect on image patches peaks, linked to the effect on the patch grid layer by layer."""
    if "sweep" not in ctx.tree.children:
        return []
    towers = [_Tower(name, node.to_dataset().isel(sample=[i])) for name, node in ctx.tree["sweep"].children.items()]
    rows, maps = [], []
    for t in towers:
        mass = _masses(t.ds)[1].values[0]
        peak = int(np.argmax(mass)) if mass.size and mass.max() > 0 else None
        anchor = f"sample-{i}-{t.name}-layers"
        if t.has_grid:
            maps += [f'<div id="{esc(anchor)}"></div>', _layer_maps(t, _backdrop(ctx.images[i]), peak or 0)]
        layer = "—" if peak is None else int(t.layers[peak])
        rows.append([t.name, Link(str(layer), f"#{anchor}") if t.has_grid and peak is not None else layer,
                     float("nan") if peak is None else float(mass[peak]),
                     float("nan") if peak is None else float(t.score["sample_share"].values[0, peak])])
    return ["<h3>Layer sweep</h3>", sweep_figure(towers),
            table(["tower", "peak layer on image patches", "positive effect there", "share on finding"], rows), *maps]


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
    back = _backdrop(ctx.images[i])
    fig = make_subplots(rows=1, cols=len(top), horizontal_spacing=0.01, subplot_titles=[f"feature {f}" for f in top])
    for k in range(len(top)):
        _on_image(fig, back, side, side, k + 1)
        fig.add_heatmap(z=np.round(patch[:, k].reshape(side, side).astype(float), DECIMALS), coloraxis="coloraxis",
                        row=1, col=k + 1, hovertemplate="r%{y} c%{x}<br>activation %{z:.3f}<extra></extra>")
    fig.update_layout(height=FIG_PX - 40, margin={"t": 30, "l": 10, "r": 10, "b": 10},
                      coloraxis={"colorscale": ACT_SCALE, "cmin": 0, "cmax": float(np.nanmax(patch, initial=0)) or 1.0})
    return parts + [fig]


def blocks(z: np.ndarray, cells: int = MAP_CELLS) -> np.ndarray:
    """``z`` [H, W] as the means of square blocks, at most ``cells`` on its longest side (NaN ignored)."""
    k = -(-max(z.shape) // cells)
    h, w = -(-z.shape[0] // k), -(-z.shape[1] // k)
    padded = np.full((h * k, w * k), np.nan)
    padded[: z.shape[0], : z.shape[1]] = z
    return _nanmean(padded.reshape(h, k, w, k).transpose(0, 2, 1, 3).reshape(h, w, k * k), axis=-1)


def _evaluation_cell(ctx: Context, name: str, model_id: str, mode: str) -> str:
    """The method's headline scores on the evaluation for this model and output mode (lesion cases)."""
    rows = [e for e in ctx.evaluation.get(name, []) if e["organism"] == model_id and e["mode"] == mode
            and e["kind"] == "lesion"]
    return " · ".join(f"{m} {rows[0][m]['mean']:.3g}" for m in HEADLINE) if rows else "—"


def _attribution(ctx: Context, i: int) -> list[Part]:
    """Each stored method's map over the image (normalised to its own range; the ground truth outlined, and
    the method's chosen region dotted where it chooses one), each method's evaluation scores when given,
    concept bars and token-level scores."""
    if "attribution" not in ctx.tree.children:
        return []
    node = ctx.tree["attribution"]
    h, w = int(ctx.tree["image_height"][i]), int(ctx.tree["image_width"][i])
    names = list(node.attrs["methods"])  # in the order given

    def outline(mask: xr.DataArray) -> tuple[list, list]:
        return _outline(blocks(mask[i, :h, :w].values.astype(float)) >= 0.5)

    truth = outline(node["mask"]) if "mask" in node else ([], [])
    back = _backdrop(ctx.images[i])
    fig = make_subplots(rows=1, cols=len(names), horizontal_spacing=0.01, subplot_titles=[esc(n) for n in names])
    for k, name in enumerate(names):
        z = blocks(node[name]["map"][i, :h, :w].values.astype(float))
        lo, hi = np.nanmin(z), np.nanmax(z)
        _on_image(fig, back, z.shape[1], z.shape[0], k + 1)
        percent = np.round(100 * np.nan_to_num((z - lo) / (hi - lo or 1.0))).astype(np.uint8)  # 1 byte a cell
        fig.add_heatmap(z=percent, coloraxis="coloraxis", row=1, col=k + 1,
                        hovertemplate=f"{esc(name)}<br>r%{{y}} c%{{x}}: %{{z}}% of its range<extra></extra>")
        lines = [(truth, "solid")] + ([(outline(node[name]["region"]), "dot")] if "region" in node[name] else [])
        for (xs, ys), dash in lines:
            fig.add_scatter(x=xs, y=ys, mode="lines", line={"color": TRUTH_COLOR if dash == "solid" else "white",
                                                            "width": 1.5, "dash": dash},
                            hoverinfo="skip", showlegend=False, row=1, col=k + 1)
    fig.update_layout(height=FIG_PX - 40, margin={"t": 30, "l": 10, "r": 10, "b": 10},
                      coloraxis={"colorscale": ACT_SCALE, "cmin": 0, "cmax": 100, "showscale": False})
    note = "ground truth (the asked finding) outlined" if truth[0] else "no ground-truth region for this sample"
    parts: list[Part] = ["<h3>Attributions</h3>", f"<p>response: <b>{esc(node['response'][i].values)}</b> · {note}; "
                         "a method's chosen region dotted</p>", fig]
    if ctx.evaluation:
        mode = str(ctx.tree["mode"].values[i]) if "mode" in ctx.tree.coords else ""
        own = {name: node.attrs["methods"][name]["name"] for name in names}
        parts.append(table(["method", f"evaluation: {', '.join(HEADLINE)} (lesion cases, {mode or 'any'} mode)"],
                           [[Link(name, f"#method-{name}"), _evaluation_cell(ctx, own[name], node.attrs["model_id"], mode)]
                            for name in names]))
    return parts + _concept_bars(node, names, i) + _token_scores(node, names, i)


def _concept_bars(node: xr.DataTree, names: list[str], i: int) -> list[Part]:
    """Per method scoring concepts (MedFocus): its concept scores as bars, largest first."""
    with_concepts = [n for n in names if "concepts" in node[n]]
    if not with_concepts:
        return []
    fig = make_subplots(rows=1, cols=len(with_concepts), subplot_titles=[esc(n) for n in with_concepts])
    for k, name in enumerate(with_concepts):
        scores = node[name]["concepts"][i]
        order = np.argsort(-np.nan_to_num(scores.values, nan=-np.inf), kind="stable")
        fig.add_bar(x=np.round(scores.values[order].astype(float), DECIMALS),
                    y=[esc(c) for c in scores["concept"].values[order]], orientation="h", showlegend=False,
                    marker_color=TRUTH_COLOR, row=1, col=k + 1, hovertemplate="%{y}: %{x:.3f}<extra></extra>")
        fig.update_yaxes(autorange="reversed", tickfont={"size": 9}, row=1, col=k + 1)
        fig.update_xaxes(title_text="concept effect", row=1, col=k + 1)
    fig.update_layout(height=FIG_PX + 60, margin={"t": 30, "l": 140, "r": 10, "b": 40}, plot_bgcolor="white")
    return ["<h4>Concept scores</h4>", fig]


def _token_scores(node: xr.DataTree, names: list[str], i: int) -> list[Part]:
    """Per method scoring response tokens: the response with each token shaded by its score."""
    text = [str(t) for t in node["token_text"][i].values]
    lines = []
    for name in (n for n in names if "tokens" in node[n]):
        scores = node[name]["tokens"][i].values.astype(float)
        top = np.nanmax(np.abs(scores), initial=0.0) or 1.0
        spans = "".join(f'<span title="{s:.3g}" style="background:rgba(189,0,38,{min(1.0, abs(s) / top) * 0.8:.2f});'
                        f'padding:0 3px;margin:0 1px">{esc(t)}</span>' for t, s in zip(text, scores) if t)
        lines.append(f"<p><b>{esc(name)}</b>: {spans}</p>")
    return ["<h4>Response tokens</h4>", *lines] if lines else []


SECTIONS: tuple[Callable[[Context, int], list[Part]], ...] = (_attribution, _sweep, _sae)


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
    page, descriptions, shown = sae_pages(where, given)
    link = os.path.relpath(page.resolve(), out.resolve().parent).replace(os.sep, "/") if page else None
    return link, descriptions, shown


def _read_evaluation(path: str | None) -> dict[str, list[dict]]:
    """The summary rows of an evaluation's ``results.json`` (``python -m interp.evaluate``) by method name."""
    if path is None:
        return {}
    try:
        summary = json.loads(Path(path).read_text())["summary"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise InterpError(f"cannot read the evaluation {path}: {type(e).__name__}: {e}") from None
    need = {"method", "organism", "kind", "mode", "n", *COLUMNS}
    bad = [e for e in summary if not isinstance(e, dict) or need - set(e)] if isinstance(summary, list) else [{}]
    if bad:
        lacks = need - set(bad[0]) if isinstance(bad[0], dict) else need
        raise InterpError(f"evaluation {path}: a summary row lacks {', '.join(sorted(lacks))}")
    out: dict[str, list[dict]] = {}
    for e in summary:
        out.setdefault(str(e["method"]), []).append(e)
    return out


def _evaluation(ctx: Context, path: str) -> list[Part]:
    """Each stored method's evaluation summary (anchor ``method-<name>``, where the samples' tables link)."""
    if "attribution" not in ctx.tree.children:
        raise InterpError("--evaluation scores attribution methods, and no store given holds an attribution group")
    methods = ctx.tree["attribution"].attrs["methods"]
    parts: list[Part] = ['<h2 id="evaluation">Evaluation</h2>', meta_list([("results", path)])]
    for name, info in methods.items():
        rows = ctx.evaluation.get(info["name"], [])
        parts.append(f'<h3 id="method-{esc(name)}">{esc(name)}</h3>')
        parts.append(table(["organism", "kind", "mode", "n", *COLUMNS],
                           [[e["organism"], e["kind"], e["mode"], e["n"], *(_cell(e, m) for m in COLUMNS)] for e in rows])
                     if rows else f"<p>{esc(info['name'])} is not in this evaluation.</p>")
    return parts


def write_linked_report(urls: Sequence[str], out: str | Path, max_samples: int = 20,
                        sae_dashboard: str | None = None, evaluation: str | None = None) -> Path:
    """Write the linked per-sample report of the stores at ``urls`` (joined on their shared samples)
    to ``out``, one section for each of the first ``max_samples`` samples; return its path.
    ``sae_dashboard``: the SAE ``features.html`` to link (default: the one beside the SAE store);
    ``evaluation``: an evaluation's ``results.json``, whose scores each attribution method links to."""
    if not urls:
        raise InterpError("no store given")
    if max_samples < 1:
        raise InterpError(f"max_samples must be >= 1, got {max_samples}")
    out = Path(out)
    tree = join_stores(*urls) if len(urls) > 1 else open_store(urls[0])
    n_all = tree.sizes["sample"]
    n = min(n_all, max_samples)
    ctx = Context(tree, _images(tree, n), *_dashboard(urls, out, sae_dashboard), _read_evaluation(evaluation))
    nodes = [node.path.lstrip("/") for node in tree.subtree if not node.is_root and not node.children]
    index = table(["sample", "id", "prompt", "ground truth"],
                  [[Link(f"sample {i}", f"#sample-{i}"), tree["sample"].values[i],
                    _clip(tree["prompt"].values[i], 80) if "prompt" in tree.coords else "", _labels(tree, i)]
                   for i in range(n)])
    parts: list[Part] = ["<h1>Linked analysis report</h1>",
                         meta_list([("stores", ", ".join(urls)), ("data set", tree.attrs["dataset"].get("name")),
                                    ("analyses", ", ".join(nodes) or "none"), ("samples", f"{n} of {n_all} shown")]),
                         "<h2>Index</h2>", index, *(_evaluation(ctx, evaluation) if evaluation else [])]
    for i in range(n):
        parts += _sample(ctx, i)
    # no plotly theme: it would add ~6.5 kB to every figure
    divs = iter(figure_divs(p.update_layout(template="none") for p in parts if isinstance(p, go.Figure)))
    return write_page(out, "Linked analysis report", [next(divs) if isinstance(p, go.Figure) else p for p in parts])

