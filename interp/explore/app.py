"""Interactive explorer of a store's cached activations (Plotly Dash): ``python -m interp.explore STORE``.

Pick a site (a block site stands for its family ``<tower>.blocks.*.<point>``, the layer slider picks the
block), a sample and see its per-patch norm heatmap over the image thumbnail (grid sites) or per-token
norms (sequence sites). Callbacks read only the chosen sample of the chosen site.
"""

from __future__ import annotations

import re

import numpy as np
import plotly.graph_objects as go
from dash import Dash, Input, Output, dcc, html

from interp.explore.api import Explorer

BLOCK = re.compile(r"^(?P<tower>[^.]+)\.blocks\.(?P<layer>\d+)\.(?P<point>.+)$")
MAX_OPTIONS = 100  # sample ids offered by the dropdown at once (searchable), so 10k-sample stores stay light


def families(explorer: Explorer) -> dict[str, list[int]]:
    """Site families in store order: ``tower.blocks.*.point`` -> its layers, a plain site -> []."""
    out: dict[str, list[int]] = {}
    for s in explorer.sites():
        m = BLOCK.match(s)
        if m:
            out.setdefault(f"{m['tower']}.blocks.*.{m['point']}", []).append(int(m["layer"]))
        else:
            out[s] = []
    return {f: sorted(ls) for f, ls in out.items()}


def site_of(family: str, layer: int | None) -> str:
    """The concrete site of ``family`` at ``layer`` (a plain site is itself)."""
    return family.replace("*", str(layer)) if "*" in family else family


def figure(explorer: Explorer, site: str, sample: str | int) -> go.Figure:
    """Per-position L2 norms of one sample: a heatmap over the image thumbnail for grid sites, a bar chart
    labelled by token text for sequence sites."""
    norms = explorer.patch_norms(site, sample)
    row = explorer._one(sample)
    if norms.dims == ("row", "col"):
        thumb = np.asarray(explorer.tree["thumbnail"].isel(sample=row).values, dtype=float)
        nr, nc = norms.shape
        ty, tx = thumb.shape
        fig = go.Figure([
            go.Heatmap(z=thumb, x0=nc / tx / 2, dx=nc / tx, y0=nr / ty / 2, dy=nr / ty, colorscale="gray",
                       showscale=False, hoverinfo="skip", name="image"),
            go.Heatmap(z=norms.values, x0=0.5, dx=1, y0=0.5, dy=1, colorscale="Inferno", opacity=0.5,
                       colorbar={"title": "norm"}, name="norm",
                       hovertemplate="row %{y:.0f}, col %{x:.0f}: %{z:.3g}<extra></extra>"),
        ])
        fig.update_xaxes(range=[0, nc], showticklabels=False, constrain="domain")
        fig.update_yaxes(range=[nr, 0], showticklabels=False, scaleanchor="x")
    else:
        text = [str(t) for t in norms["token_text"].values]
        pos = norms["position"].values if "position" in norms.coords else np.arange(len(text))
        fig = go.Figure(go.Bar(x=pos, y=norms.values, hovertext=text, name="norm",
                               hovertemplate="%{hovertext} (%{x}): %{y:.3g}<extra></extra>"))
        fig.update_xaxes(tickvals=pos, ticktext=text, tickangle=-60, title="token")
        fig.update_yaxes(title="norm")
    fig.update_layout(title=f"{site} norm, {explorer.ids[row]}", margin={"t": 40, "l": 40, "r": 10, "b": 40})
    return fig


def info(explorer: Explorer, sample: str | int) -> str:
    """The sample's prompt, answer, finding and positive labels as plain text."""
    t = explorer.tree.to_dataset().isel(sample=explorer._one(sample))
    lines = [f"{k}: {t[k].values}" for k in ("prompt", "answer", "finding") if k in t.coords]
    if "labels" in t:
        pos = t["label"].values[np.asarray(t["labels"].values) == 1]
        lines.append("labels: " + (", ".join(map(str, pos)) or "none"))
    return "\n".join(lines)


def sample_options(explorer: Explorer, search: str | None, current: str | None) -> list[str]:
    """Up to ``MAX_OPTIONS`` sample ids containing ``search``, always with ``current``."""
    hits = [s for s in explorer.ids if not search or search.lower() in s.lower()][:MAX_OPTIONS]
    return hits if current is None or current in hits else [current, *hits]


def create_app(store: str | Explorer) -> Dash:
    """The explorer app of ``store`` (a URL or an ``Explorer``)."""
    ex = store if isinstance(store, Explorer) else Explorer(store)
    fams = families(ex)
    first = next(iter(fams))
    sample0 = str(ex.ids[0])
    app = Dash(__name__, title="interp explorer")
    app.layout = html.Div([
        html.Div([
            html.Label("site"), dcc.Dropdown(list(fams), first, id="site", clearable=False),
            html.Label("sample"), dcc.Dropdown(sample_options(ex, None, sample0), sample0, id="sample",
                                               clearable=False),
            html.Label("layer"), dcc.Slider(0, 0, step=None, id="layer"),
        ], style={"maxWidth": "60em"}),
        dcc.Graph(id="figure", style={"height": "70vh"}),
        html.Pre(id="info", style={"whiteSpace": "pre-wrap"}),
    ], style={"fontFamily": "sans-serif", "margin": "1em"})

    @app.callback(Output("sample", "options"), Input("sample", "search_value"), Input("sample", "value"))
    def options(search: str | None, current: str | None) -> list[str]:
        return sample_options(ex, search, current)

    @app.callback(Output("layer", "min"), Output("layer", "max"), Output("layer", "marks"),
                  Output("layer", "value"), Output("layer", "disabled"), Input("site", "value"))
    def layers(family: str) -> tuple[int, int, dict[int, str], int | None, bool]:
        ls = fams[family] or [0]
        return ls[0], ls[-1], {layer: str(layer) for layer in ls}, ls[-1], not fams[family]

    @app.callback(Output("figure", "figure"), Input("site", "value"), Input("layer", "value"),
                  Input("sample", "value"))
    def show(family: str, layer: int | None, sample: str) -> go.Figure:
        return figure(ex, site_of(family, layer), sample)

    @app.callback(Output("info", "children"), Input("sample", "value"))
    def describe(sample: str) -> str:
        return info(ex, sample)

    return app
