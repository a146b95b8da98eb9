"""HTML report of negation tracing (CTE per layer x token role, NAST's tracing)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import plotly.graph_objects as go

from interp.nast.cte import CTEResult
from interp.report.html import esc, figure_divs, meta_list, table, write_page


def write_cte_report(pooled: CTEResult, stability: dict, alphas: np.ndarray, out: str | Path, title: str) -> Path:
    """Heatmap of the mean CTE (layer x role) with bootstrap CIs, the seed stability and the alphas."""
    mean, (lo, hi) = pooled.mean(), pooled.ci(n_boot=500)
    roles = [esc(r) for r in pooled.roles]
    layers = list(range(pooled.n_layers))
    fig = go.Figure(go.Heatmap(
        z=mean, x=roles, y=layers, colorscale="RdBu", zmid=1.0 if pooled.mode == "nast" else 0.0,
        colorbar={"title": "CTE" if pooled.mode == "nast" else "effect"},
        customdata=np.stack([lo, hi], -1), hovertemplate="layer %{y}, %{x}: %{z:.3f} [%{customdata[0]:.3f}, %{customdata[1]:.3f}]<extra></extra>"))
    fig.update_layout(title="mean over samples (layer 0 = embeddings)", xaxis_title="token role", yaxis_title="layer",
                      height=420, margin={"t": 50})
    prof = pooled.profile("max")
    rows = [[layer, *[float(v) for v in mean[layer]]] for layer in layers]
    body = [
        f"<h1>{esc(title)}</h1>",
        meta_list([("samples", len(pooled.values)), *pooled.meta.items(),
                   ("seed rank correlation (mean Spearman of per-layer profiles)", f"{stability['mean']:.3f}"),
                   ("alphas (min-max of the per-layer effect, blocks)", np.round(alphas, 3).tolist())]),
        '<p class="note">NAST tracing: at each layer and token role the positive text\'s hidden state is '
        "replaced by the negated text's; CTE = s_traced / s with s = logit(positive) - logit(negated), so "
        "CTE near 0 marks where the negation is carried. Hover shows 95% bootstrap intervals.</p>",
        *figure_divs([fig]),
        "<h2>Mean CTE per layer and role</h2>",
        table(["layer", *pooled.roles], rows),
        "<h2>Per-layer effect profile (max over roles of 1 - CTE)</h2>",
        table(["layer", "effect"], [[layer, float(v)] for layer, v in zip(layers, prof)]),
    ]
    return write_page(out, title, body)
