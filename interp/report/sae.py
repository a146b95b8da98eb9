"""Self-contained HTML dashboards of SAE features.

Input: one :class:`FeatureView` per feature, plain arrays and strings (top-activating images with
the feature's activation on their patch grid, all its activations, its description, the ground-truth
concepts it matches and its measured effect on answers). Output: one HTML file, plotly.js inlined
once, every string escaped, thumbnails at most ``THUMB_PX`` so the file grows linearly with the
number of features.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from interp.report.html import Link, esc, figure_divs, meta_list, table, write_page
from interp.report.sweep import _clip, _image_uri, _outline, _thumb_size

THUMB_PX = 64  # longest side of each embedded image
HIST_BINS = 40
PANEL_PX = 150  # widest an image panel is drawn
# transparent at zero so the image shows through where the feature is silent
ACT_SCALE = [[0.0, "rgba(255,255,178,0)"], [0.25, "rgba(254,204,92,0.45)"],
             [0.6, "rgba(253,141,60,0.7)"], [1.0, "rgba(189,0,38,0.9)"]]
HOW_TO_READ = (
    "Each section shows one feature: its top-activating images with the feature's activation on "
    "the patch grid overlaid (transparent where it is zero) and, where known, the matched concept's "
    "ground-truth patches outlined in green; the histogram of all its activations (log count); its "
    "description; the findings or anatomical concepts it is the best single feature for, with AUROC "
    "(image-level for findings, patch-level for anatomy) and the IoU of its active patches with the "
    "true mask; and its measured effect on the model's answers when ablated or steered.")


def sae_pages(folder: Path | None, page: str | None = None) -> tuple[Path | None, dict[int, str], set[int] | None]:
    """(the dashboards page, feature descriptions, features with a dashboard section: None if unknown) of an
    SAE analysis folder (``features.html`` and ``analysis.json``, as ``python -m interp.sae`` writes them);
    ``page`` names another dashboards page."""
    analysis = folder / "analysis.json" if folder else None
    info = json.loads(analysis.read_text()) if analysis and analysis.exists() else {}
    html = Path(page) if page else folder / "features.html" if folder else None
    shown = set(info["dashboard_features"]) if "dashboard_features" in info else None
    return (html if html and html.exists() else None,
            {int(d["feature"]): str(d["description"]) for d in info.get("descriptions", [])}, shown)


@dataclass
class FeatureView:
    """What one feature's section shows."""

    feature: int
    images: np.ndarray  # [k, H, W] top-activating images in [0, 1], most active first
    maps: np.ndarray    # [k, rows, cols] the feature's activation on each image's patch grid
    values: np.ndarray  # its activations over all images or patches (histogram)
    description: str = ""
    captions: Sequence[str] = ()  # per top image, e.g. sample id and activation
    masks: np.ndarray | None = None  # [k, rows, cols] bool: matched concept's patches, if known
    matches: Sequence[Mapping[str, Any]] = ()  # rows of interp.sae.groundtruth.score_features, best first
    effects: Mapping[str, float | None] = field(default_factory=dict)  # answer metric -> value
    values_label: str = "patch activation"

    @property
    def anchor(self) -> str:
        return f"feature-{int(self.feature)}"


def _histogram(values: np.ndarray) -> tuple[go.Bar, str]:
    """The activation histogram as a bar trace (counts binned here, so its size is fixed) and a
    title with the number of values and the share that is zero."""
    values = np.asarray(values, float).ravel()
    counts, edges = np.histogram(values, bins=HIST_BINS)
    zero = float(np.mean(values == 0)) if values.size else 0.0
    bar = go.Bar(x=(edges[:-1] + edges[1:]) / 2, y=counts, width=np.diff(edges), marker_color="#8aa4d6",
                 hovertemplate="%{x:.3g}: %{y}<extra></extra>", showlegend=False)
    return bar, f"{values.size} values · {zero:.0%} zero"


def feature_figure(view: FeatureView) -> go.Figure:
    """One feature's figure: a row of top-image panels (image, activation overlay, mask outline)
    above the activation histogram."""
    k = len(view.images)
    ncols = max(k, 1)
    rows, cols = view.maps.shape[1:] if k else (1, 1)
    panel_px = min(PANEL_PX, 1100 / ncols) * rows / cols + 30
    hist_px, top_px, gap_px = 220, 40, 60
    height = top_px + (panel_px + gap_px if k else 0) + hist_px + 40
    specs = ([[{}] * k] if k else []) + [[{"colspan": ncols}] + [None] * (ncols - 1)]
    bar, hist_title = _histogram(view.values)
    captions = [esc(_clip(c, 40)) for c in list(view.captions) + [""] * k][:k]
    fig = make_subplots(rows=len(specs), cols=ncols, specs=specs, row_heights=([panel_px] if k else []) + [hist_px],
                        vertical_spacing=gap_px / height, horizontal_spacing=0.01,
                        subplot_titles=captions + [esc(hist_title)])
    for i in range(k):
        px_w, px_h = _thumb_size(view.images.shape[2], view.images.shape[1], THUMB_PX)
        fig.add_image(source=_image_uri(view.images[i], THUMB_PX), x0=-0.5 + cols / px_w / 2, dx=cols / px_w,
                      y0=-0.5 + rows / px_h / 2, dy=rows / px_h, hoverinfo="skip", row=1, col=i + 1)
        fig.add_heatmap(z=np.round(view.maps[i].astype(float), 3), coloraxis="coloraxis", row=1, col=i + 1,
                        hovertemplate="r%{y} c%{x}<br>activation %{z:.3f}<extra></extra>")
        if view.masks is not None:
            xs, ys = _outline(np.asarray(view.masks[i], bool))
            fig.add_scatter(x=xs, y=ys, mode="lines", line={"color": "#00d26a", "width": 2},
                            hoverinfo="skip", showlegend=False, row=1, col=i + 1)
        fig.update_xaxes(range=[-0.5, cols - 0.5], visible=False, row=1, col=i + 1)
        fig.update_yaxes(range=[rows - 0.5, -0.5], scaleanchor=fig.get_subplot(1, i + 1).yaxis.anchor,
                         visible=False, row=1, col=i + 1)
    hist_row = len(specs)
    fig.add_trace(bar, row=hist_row, col=1)
    fig.update_xaxes(title_text=esc(view.values_label), row=hist_row, col=1)
    fig.update_yaxes(type="log", title_text="count", row=hist_row, col=1)
    fig.update_layout(height=height, margin={"t": top_px, "l": 60, "r": 20, "b": 40}, plot_bgcolor="white", bargap=0,
                      coloraxis={"colorscale": ACT_SCALE, "cmin": 0, "cmax": float(np.nanmax(view.maps, initial=0)) or 1.0,
                                 "colorbar": {"title": {"text": "activation"}, "len": 0.5, "y": 1, "yanchor": "top"}})
    return fig


def _number(x: Any) -> float:
    """A table number: NaN (shown as —) where missing."""
    return float("nan") if x is None else float(x)


def _index(features: Sequence[FeatureView]) -> str:
    """One row per feature, linking to its section: description, best match, its AUROC and IoU."""
    rows = []
    for f in features:
        best = f.matches[0] if f.matches else {}
        rows.append([Link(f"feature {int(f.feature)}", f"#{f.anchor}"), _clip(f.description or "—", 100),
                     ", ".join(str(m["concept"]) for m in f.matches) or "—",
                     _number(best.get("auroc")), _number(best.get("iou"))])
    return table(["feature", "description", "matches", "AUROC (best match)", "IoU (best match)"], rows)


def _section(view: FeatureView, div: str) -> list[str]:
    """One feature's section: heading (its anchor), description, figure, ground truth, effects."""
    matches = (table(["concept", "kind", "AUROC level", "AUROC", "IoU"],
                     [[m["concept"], m["kind"], m["level"], _number(m.get("auroc")), _number(m.get("iou"))]
                      for m in view.matches])
               if view.matches else "<p>Best single feature for no finding or anatomical concept.</p>")
    effects = (table(["metric", "value"], [[k, "not measured" if v is None else float(v)] for k, v in view.effects.items()])
               if view.effects else "<p>not measured</p>")
    return [f'<h2 id="{esc(view.anchor)}">Feature {int(view.feature)}</h2>',
            f"<p>{esc(view.description or 'No description.')}</p>", div,
            "<h3>Ground truth</h3>", matches, "<h3>Effect on answers (ablated / steered)</h3>", effects]


def write_feature_dashboards(out: str | Path, features: Sequence[FeatureView],
                             title: str = "SAE feature dashboards", meta: Mapping[str, Any] | None = None) -> Path:
    """Write the features' self-contained HTML dashboards (plotly.js inlined once) to ``out``: run
    ``meta``, an index table linking to each feature's section, then the sections; return the path."""
    parts = [f"<h1>{esc(title)}</h1>", meta_list((meta or {}).items()), f'<p class="note">{esc(HOW_TO_READ)}</p>',
             "<h2>Index</h2>", _index(features)]
    for view, div in zip(features, figure_divs(feature_figure(f) for f in features)):
        parts += _section(view, div)
    return write_page(out, title, parts)
