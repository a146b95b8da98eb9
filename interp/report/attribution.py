"""The attribution evaluation as one self-contained HTML page: verification counts, the table of every
metric with its bootstrap CI, and example overlays (each method's map over the image, the evidence
region outlined). plotly.js is embedded once."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from interp.report.html import esc, figure_divs, meta_list, table, write_page
from interp.report.sweep import _outline

COLUMNS = ("pointing", "box_f1", "box_iou", "energy", "auprc", "deletion", "insertion", "concept_top1")


def example_figure(title: str, image: np.ndarray, region: np.ndarray, maps: dict[str, np.ndarray]) -> go.Figure:
    """The image, then each method's map (normalised to its own range, block means on a grid of at most
    ``MAP_CELLS`` a side); the region outlined."""
    from interp.report.linked import blocks  # linked imports this module's table helpers

    names = ["image", *maps]
    cols = min(len(names), 6)
    rows = -(-len(names) // cols)
    fig = make_subplots(rows, cols, subplot_titles=[esc(n) for n in names], horizontal_spacing=0.02, vertical_spacing=0.08)
    xs, ys = _outline(blocks(region.astype(float)) >= 0.5)
    grey = image if image.ndim == 2 else image.mean(-1)
    for k, name in enumerate(names):
        r, c = divmod(k, cols)
        z = blocks(grey if name == "image" else maps[name])  # at most MAP_CELLS a side, in 1-byte percent: a small page
        lo, hi = float(np.min(z)), float(np.max(z))
        fig.add_trace(go.Heatmap(z=np.round(100 * (z - lo) / (hi - lo or 1.0)).astype(np.uint8), zmin=0, zmax=100, colorscale="Gray" if name == "image" else "Inferno",
                                 showscale=False, hovertemplate=f"{esc(name)}<br>y %{{y}} x %{{x}}<extra></extra>"), r + 1, c + 1)
        fig.add_trace(go.Scatter(x=xs, y=ys, mode="lines", line={"color": "#3ec1d3", "width": 1.5}, hoverinfo="skip",
                                 showlegend=False), r + 1, c + 1)
    fig.update_yaxes(autorange="reversed", scaleanchor="x", showticklabels=False)
    fig.update_xaxes(showticklabels=False)
    fig.update_layout(title=esc(title), height=190 * rows + 60, width=170 * cols + 40, margin={"l": 10, "r": 10, "t": 60, "b": 10})
    return fig


def _cell(entry: dict, metric: str) -> str:
    v = entry[metric]
    return "-" if not np.isfinite(v["mean"]) else f"{v['mean']:.3g} [{v['lo']:.3g}, {v['hi']:.3g}]"


def write_evaluation_report(result: dict, examples: list[dict], out: str | Path) -> Path:
    """``result`` from :func:`interp.evaluate.experiment.run`; ``examples``: dicts with title, image,
    region and maps (method -> map)."""
    cfg = result["config"]
    body = ["<h1>Attribution on the counterfactual-verified set</h1>",
            '<p class="note">Samples are presence questions about findings the phantom has, kept only when the model '
            "answers yes on the image, no with the finding removed and yes with the background re-rendered (with and "
            "without other findings); shortcut samples flip only when the confounder (chest tube) is removed, and "
            "their evidence region is the confounder. Metrics: pointing game, the published box metric (F1 and IoU "
            "x100), energy in the region, AUPRC, deletion (lower is better) and insertion AUC of the response's "
            "log-probability, concept top-1. Mean [95% bootstrap CI].</p>",
            meta_list([(k, v) for k, v in cfg.items()]),
            "<h2>Verification</h2>",
            table(["organism", "candidates", "lesion-causal", "shortcut-causal", "rejected"],
                  [[o, v["candidates"], v["lesion"], v["shortcut"], v["rejected"]] for o, v in result["verified"].items()]),
            "<h2>Scores</h2>",
            table(["organism", "kind", "mode", "method", "n", *COLUMNS],
                  [[e["organism"], e["kind"], e["mode"], e["method"], e["n"], *(_cell(e, m) for m in COLUMNS)]
                   for e in result["summary"]]),
            "<h2>Cost</h2>",
            table(["organism", "method", "seconds per sample"],
                  [[o, m, f"{s:.3f}"] for o, t in result["seconds_per_sample"].items() for m, s in t.items()])]
    if examples:
        body.append("<h2>Examples</h2>")
        body += figure_divs(example_figure(e["title"], e["image"], e["region"], e["maps"]) for e in examples)
    return write_page(out, "attribution evaluation", body)
