"""Interactive explorer of a store's cached activations (Plotly Dash): ``python -m interp.explore STORE``.

Pick a site (a block site stands for its family ``<tower>.blocks.*.<point>``, the layer slider picks the
block), a sample and an overlay on its image: the per-patch norm, the projection onto a direction (the
difference of means between the samples with and without a label), an SAE feature, or a stored
attribution map; the ground-truth mask is outlined where a store holds it. Sequence sites show per-token
bars instead. Clicking a patch lists its top SAE features, linked to their dashboards; a sample in a
layer sweep shows its effect heatmaps. Callbacks read only the chosen sample (a direction is computed
once per site and label), so a large store stays responsive.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np
import plotly.graph_objects as go
from dash import Dash, Input, Output, dcc, html

from interp.errors import InterpError
from interp.explore.api import Explorer
from interp.report.html import esc
from interp.report.linked import blocks, sweep_figure
from interp.report.sae import ACT_SCALE, sae_pages
from interp.report.sweep import _outline, _thumb_size, _Tower

BLOCK = re.compile(r"^(?P<tower>[^.]+)\.blocks\.(?P<layer>\d+)\.(?P<point>.+)$")
MAX_OPTIONS = 100  # sample ids offered by the dropdown at once (searchable), so 10k-sample stores stay light
MAP_CELLS = 64  # longest side of the grid an attribution map is drawn on
TOP_FEATURES = 8
DASHBOARD = "/sae/features.html"  # where the app serves the SAE dashboards
TRUTH_COLOR = "#3ec1d3"
Dashboard = tuple[Path | None, dict[int, str], set[int] | None]  # page, feature descriptions, features it shows


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


def message(text: str) -> go.Figure:
    """An empty figure saying ``text``."""
    fig = go.Figure()
    fig.add_annotation(text=esc(text), showarrow=False, x=0.5, y=0.5, xref="paper", yref="paper")
    fig.update_xaxes(visible=False)
    fig.update_yaxes(visible=False)
    return fig.update_layout(margin={"t": 40, "l": 10, "r": 10, "b": 10}, plot_bgcolor="white")


class View:
    """What the app draws for one explorer: overlay options, the sample figure, a patch's SAE features, the
    sample's sweep. ``dashboard``: the SAE dashboards page (served by the app) and its feature descriptions."""

    def __init__(self, explorer: Explorer, dashboard: Dashboard = (None, {}, None)) -> None:
        self.ex = explorer
        self.page, self.descriptions, self.shown = dashboard
        self._directions: dict[tuple[str, str], np.ndarray] = {}
        labels = explorer.tree["labels"] if "labels" in explorer.tree else None
        self.labels = [] if labels is None else [
            str(n) for n, col in zip(labels["label"].values, np.asarray(labels.values).T) if 0 < col.sum() < col.size]
        self.has_sae = explorer.sae is not None or any("sae" in t.children for t, _ in explorer._trees)
        self.has_sweep = any("sweep" in t.children for t, _ in explorer._trees)

    def overlays(self) -> dict[str, str]:
        """Overlay value -> label."""
        out = {"norm": "norm"}
        out |= {f"direction:{n}": f"projection: {n} (mean with - without)" for n in self.labels}
        out |= {"sae": "SAE feature"} if self.has_sae else {}
        return out | {f"attribution:{m}": f"attribution: {m}" for m in self.ex.methods()}

    def direction(self, site: str, label: str) -> np.ndarray:
        """The difference of means of ``site`` between samples with and without ``label`` (computed once)."""
        key = (site, label)
        if key not in self._directions:
            has = self.ex.tree["labels"].sel(label=label) == 1
            self._directions[key] = self.ex.mean_difference(site, has, ~has).values
        return self._directions[key]

    def figure(self, site: str, sample: str | int, overlay: str = "norm", feature: int | None = None) -> go.Figure:
        """The overlay on the sample's image (grid sites and image overlays), or per-token bars (sequence sites)."""
        ex, row = self.ex, self.ex._one(sample)
        kind, _, arg = overlay.partition(":")
        title = f"{esc(self.overlays().get(overlay, overlay))} · {esc(ex.ids[row])}"
        if kind in ("norm", "direction"):
            x = (ex.patch_norms(site, row) if kind == "norm"
                 else ex.per_position(site, row, ex.project(site, self.direction(site, arg)).isel(sample=row)))
            if x.dims != ("row", "col"):
                return self._bars(x, f"{esc(site)} {title}", kind)
            return self._on_image(row, x.values, f"{esc(site)} {title}", "norm" if kind == "norm" else "projection")
        if kind == "sae":
            codes = ex.features(row)
            if codes is None:
                return message(f"no SAE features for {ex.ids[row]}")
            f = int(codes.max((0, 1)).argmax()) if feature is None else int(feature)
            if not 0 <= f < codes.shape[-1]:
                return message(f"feature must be between 0 and {codes.shape[-1] - 1}")
            return self._on_image(row, codes[..., f], f"SAE feature {f} · {esc(ex.ids[row])}", "activation")
        amap = ex.attribution(arg, row) if kind == "attribution" else None
        if amap is None:
            return message(f"no {overlay} for {ex.ids[row]}")
        cells = -(-max(amap.shape) // MAP_CELLS)  # pixels a side of each block
        return self._on_image(row, blocks(amap.astype(float), MAP_CELLS), title, "attribution", cells)

    def _on_image(self, row: int, z: np.ndarray, title: str, what: str, cells: float | None = None) -> go.Figure:
        """``z`` over the sample's image (image pixels; each cell ``cells`` pixels, default: the grid spans
        the image), the ground truth outlined where known."""
        h, w = self.ex.image_size(row)
        tw, th = _thumb_size(w, h, self.ex.tree.sizes["thumb_x"])
        thumb = np.asarray(self.ex.tree["thumbnail"][row].values, dtype=float)[:th, :tw]
        dy, dx = (cells, cells) if cells else (h / z.shape[0], w / z.shape[1])
        scale = {"norm": {"colorscale": "Inferno", "opacity": 0.5},
                 "projection": {"colorscale": "RdBu_r", "zmid": 0, "opacity": 0.6}}.get(what, {"colorscale": ACT_SCALE})
        fig = go.Figure([
            go.Heatmap(z=thumb, x0=w / tw / 2, dx=w / tw, y0=h / th / 2, dy=h / th, colorscale="gray", showscale=False,
                       hoverinfo="skip", name="image"),
            go.Heatmap(z=z, x0=dx / 2, dx=dx, y0=dy / 2, dy=dy, colorbar={"title": what}, name=what,
                       hovertemplate="x %{x:.0f}, y %{y:.0f}: %{z:.3g}<extra></extra>", **scale)])
        truth = self.ex.truth(row)
        if truth is not None and truth.any():
            k = -(-max(truth.shape) // MAP_CELLS)
            xs, ys = _outline(blocks(truth.astype(float), MAP_CELLS) >= 0.5)
            fig.add_scatter(x=[None if v is None else (v + 0.5) * k for v in xs],
                            y=[None if v is None else (v + 0.5) * k for v in ys], mode="lines", name="ground truth",
                            line={"color": TRUTH_COLOR, "width": 2}, hoverinfo="skip", showlegend=False)
        fig.update_xaxes(range=[0, w], showticklabels=False, constrain="domain")
        fig.update_yaxes(range=[h, 0], showticklabels=False, scaleanchor="x")
        return fig.update_layout(title=title, margin={"t": 40, "l": 40, "r": 10, "b": 40})

    @staticmethod
    def _bars(x: Any, title: str, kind: str) -> go.Figure:
        text = [esc(t) for t in x["token_text"].values]
        pos = x["position"].values if "position" in x.coords else np.arange(len(text))
        fig = go.Figure(go.Bar(x=pos, y=x.values, hovertext=text, name=kind,
                               marker={"color": x.values, "colorscale": "Inferno"},
                               hovertemplate="%{hovertext} (%{x}): %{y:.3g}<extra></extra>"))
        fig.update_xaxes(tickvals=pos, ticktext=text, tickangle=-60, title="token")
        fig.update_yaxes(title=kind)
        return fig.update_layout(title=title, margin={"t": 40, "l": 40, "r": 10, "b": 40})

    def patch_features(self, sample: str | int, click: dict | None) -> list:
        """The clicked patch's top SAE features (activation, description, link to its dashboard section)."""
        if not self.has_sae:
            return [html.P("Give an SAE (a features.zarr store or --sae CHECKPOINT) to see a patch's features.")]
        if not click or not click.get("points"):
            return [html.P("Click a patch to see its top SAE features.")]
        codes = self.ex.features(sample)
        if codes is None:
            return [html.P(f"No SAE features for {self.ex.ids[self.ex._one(sample)]}.")]
        h, w = self.ex.image_size(sample)
        point = click["points"][0]
        r = min(max(int(point["y"] / h * codes.shape[0]), 0), codes.shape[0] - 1)
        c = min(max(int(point["x"] / w * codes.shape[1]), 0), codes.shape[1] - 1)
        acts = codes[r, c]
        top = [int(f) for f in np.argsort(-acts, kind="stable")[:TOP_FEATURES] if acts[f] > 0]
        items = [html.Li([html.A(f"feature {f}", href=f"{DASHBOARD}#feature-{f}", target="_blank")
                          if self.page and (self.shown is None or f in self.shown) else f"feature {f}",
                          f": {acts[f]:.3g}", f" - {self.descriptions[f]}" if self.descriptions.get(f) else ""])
                 for f in top]
        return [html.H4(f"Patch row {r}, col {c}: top SAE features"), html.Ol(items) if items else html.P("none active")]

    def sweep(self, sample: str | int) -> go.Figure:
        found = self.ex.sweep(sample)
        if not found:
            return message(f"no layer sweep of {self.ex.ids[self.ex._one(sample)]}")
        return sweep_figure([_Tower(name, ds) for name, ds in found.items()]).update_layout(title="layer sweep: effect")


def dashboard_of(explorer: Explorer, page: str | None) -> Dashboard:
    """The SAE dashboards page and descriptions: ``page``, else beside the SAE's ``features.zarr`` or checkpoint."""
    folder = next((Path(u).parent for u in explorer.urls if u and (Path(u) / "sae" / "zarr.json").exists()),
                  Path(explorer.sae_path).parent if explorer.sae_path else None)
    found = sae_pages(folder, page)
    if page and found[0] is None:
        raise InterpError(f"no SAE dashboards page at {page}")
    return found


def create_app(store: str | Explorer, dashboard: str | None = None) -> Dash:
    """The explorer app of ``store`` (a URL or an ``Explorer``); ``dashboard``: the SAE ``features.html``
    to link (default: the one beside the SAE's store or checkpoint)."""
    from flask import send_file

    ex = store if isinstance(store, Explorer) else Explorer(store)
    view = View(ex, dashboard_of(ex, dashboard))
    fams = families(ex)
    first = next(iter(fams))
    sample0 = str(ex.ids[0])
    app = Dash(__name__, title="interp explorer")
    if view.page:
        app.server.add_url_rule(DASHBOARD, "sae_dashboard", lambda: send_file(view.page.resolve()))
    overlays = view.overlays()
    app.layout = html.Div([
        html.Div([
            html.Label("site"), dcc.Dropdown(list(fams), first, id="site", clearable=False),
            html.Label("sample"), dcc.Dropdown(sample_options(ex, None, sample0), sample0, id="sample",
                                               clearable=False),
            html.Label("overlay"), dcc.Dropdown([{"label": v, "value": k} for k, v in overlays.items()], "norm",
                                                id="overlay", clearable=False),
            html.Label("SAE feature (empty: the sample's strongest)"),
            dcc.Input(id="feature", type="number", min=0, step=1, debounce=True, disabled=True),
            html.Label("layer"), dcc.Slider(0, 0, step=None, id="layer"),
        ], style={"maxWidth": "60em"}),
        html.Div([dcc.Graph(id="figure", style={"height": "70vh", "flex": "2"}),
                  html.Div(id="patch", style={"flex": "1", "padding": "1em"})], style={"display": "flex"}),
        dcc.Graph(id="sweep", style={"height": "45vh", "display": "block" if view.has_sweep else "none"}),
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

    @app.callback(Output("feature", "disabled"), Input("overlay", "value"))
    def feature_input(overlay: str) -> bool:
        return overlay != "sae"

    @app.callback(Output("figure", "figure"), Input("site", "value"), Input("layer", "value"),
                  Input("sample", "value"), Input("overlay", "value"), Input("feature", "value"))
    def show(family: str, layer: int | None, sample: str, overlay: str, feature: int | None) -> go.Figure:
        return view.figure(site_of(family, layer), sample, overlay, feature)

    @app.callback(Output("patch", "children"), Input("figure", "clickData"), Input("sample", "value"))
    def patch(click: dict | None, sample: str) -> list:
        return view.patch_features(sample, click)

    if view.has_sweep:
        @app.callback(Output("sweep", "figure"), Input("sample", "value"))
        def sweep(sample: str) -> go.Figure:
            return view.sweep(sample)

    @app.callback(Output("info", "children"), Input("sample", "value"))
    def describe(sample: str) -> str:
        return info(ex, sample)

    return app
