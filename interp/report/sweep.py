"""Self-contained HTML report of a layer sweep (causal tracing / activation patching).

Input: one ``xarray.Dataset`` per tower swept (the sweep store's groups), with ``effect``
(sample, layer, position), ``restored``, ``clean``, ``corrupted``, typed positions (``kind``,
``row``, ``col``, ``token``), the phantom's ground truth (``mask_fraction``), the ``image`` and the
run's attrs. Output: one HTML file, plotly.js inlined, readable offline.
"""

from __future__ import annotations

import base64
import io
import math
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import plotly.graph_objects as go
import xarray as xr
from PIL import Image
from plotly.subplots import make_subplots
from scipy.stats import spearmanr

from interp.report.html import esc, figure_divs, meta_list, table, write_page

MEAN = "mean over samples"
PANEL_COLS = 6
IMAGE_PX = 128  # longest side of the embedded background image (repeated per panel and view)
DECIMALS = 3
RUN_ATTRS = ("model_id", "weight_hash", "dataset", "dataset_hash", "mode", "method", "corrupt", "metric",
             "point", "window", "granularity", "grid_rows", "grid_cols", "noise_std", "noise_scale", "copies",
             "seed", "elapsed_s", "elapsed_atp_s", "localisation")
TOP_K = 10  # strongest cells whose recall the AtP* agreement reports
AGREE = 0.9  # AtP* agreement figures below this are flagged
EFFECT_SCALE = "RdBu_r"
# Same hues as RdBu_r, transparent at zero so the image shows through where nothing is restored.
OVERLAY_SCALE = [[0.0, "rgba(5,48,97,0.9)"], [0.3, "rgba(67,147,195,0.75)"],
                 [0.45, "rgba(209,229,240,0.4)"], [0.5, "rgba(247,247,247,0)"],
                 [0.55, "rgba(253,219,199,0.4)"], [0.7, "rgba(214,96,77,0.75)"],
                 [1.0, "rgba(103,0,13,0.9)"]]
HOW_TO_READ = (
    "Each cell is the normalised effect of restoring the clean activation at one (layer, position) "
    "into the corrupted run: (restored − corrupted) / (clean − corrupted), so 1 means that site alone "
    "restores the clean output and 0 means it does nothing (red positive, blue negative). Image panels "
    "show the same effect on the patch grid over the input image, one panel per layer, with the "
    "ground-truth finding outlined in green. The ground-truth score is the share of positive effect "
    "on image patches that falls inside the finding; a faithful mechanism scores well above the share "
    "expected by area (with noise on the thorax only, counted over the thorax's patches); a corruption that "
    "changes the image only on the finding (counterfactual) makes that score circular at the first layers. "
    "Use each figure's dropdown to switch from the mean to a single sample. With "
    "attribution patching (method atp or both), effects are AtP* estimates (Kramár et al. 2024): first-order, "
    "with the attention softmax recomputed exactly at the next block; 'both' shows them beside the exact "
    "effects with their agreement (cells ranked by AtP*'s GradDrop strength).")


def _masses(ds: xr.Dataset) -> tuple[xr.DataArray, xr.DataArray, xr.DataArray, xr.DataArray]:
    """Per sample (and layer): positive effect mass on the finding's patches and on all image patches,
    and the number of finding patches and of image patches (only those of the corrupted ``region`` where a
    sweep records one: noise on the thorax makes chance the finding's share of the thorax)."""
    patch = (ds["kind"] == "image") & (ds["row"] >= 0)
    if "region" in ds:
        patch = patch & ds["region"]
    finding = patch & (ds["mask_fraction"] > 0)
    positive = ds["effect"].clip(min=0).fillna(0).where(patch, 0)
    return positive.where(finding, 0).sum("position"), positive.sum("position"), finding.sum("position"), patch.sum("position")


def _ratio(num: xr.DataArray | np.ndarray, den: xr.DataArray | np.ndarray):
    """num / den, NaN where den is 0 (no warning)."""
    with np.errstate(invalid="ignore", divide="ignore"):
        return num / np.where(den > 0, den, np.nan)


def ground_truth_score(ds: xr.Dataset) -> xr.Dataset:
    """Share of positive ``effect`` mass on image patches that falls on patches with
    ``mask_fraction > 0``, against the share expected by area (finding patches / all patches).

    Returns ``share`` (layer) and ``expected`` (scalar) pooled over samples (samples without a
    finding add to both denominators), and ``sample_share`` (sample, layer), ``sample_expected``
    (sample) per sample; NaN where there is no positive mass or no image patch.
    """
    hit, mass, n_finding, n_patch = _masses(ds)
    return xr.Dataset({"share": _ratio(hit.sum("sample"), mass.sum("sample")),
                       "expected": _ratio(n_finding.sum(), n_patch.sum()),
                       "sample_share": _ratio(hit, mass), "sample_expected": _ratio(n_finding, n_patch)})


def score_ci(ds: xr.Dataset, n_boot: int = 1000, level: float = 0.95, seed: int = 0) -> dict:
    """Per layer: the pooled ground-truth ratio (share of positive effect on the finding over the share
    expected by area; 1 = no better than area, 1 / expected = all of it on the finding) and its bootstrap CI
    over samples, the pooled ``share``, and the ``expected`` share (None where undefined)."""
    hit, mass, n_finding, n_patch = (a.values for a in _masses(ds))  # [sample, layer] / [sample]

    def ratio(rows: np.ndarray) -> np.ndarray:
        return _ratio(_ratio(hit[rows].sum(0), mass[rows].sum(0)), _ratio(n_finding[rows].sum(), n_patch[rows].sum()))

    n = len(mass)
    rng = np.random.default_rng(seed)
    boots = np.stack([ratio(rng.integers(0, n, n)) for _ in range(n_boot)])
    with warnings.catch_warnings():  # a layer with no defined ratio in any resample: NaN bounds
        warnings.simplefilter("ignore", RuntimeWarning)
        low, high = np.nanquantile(boots, [(1 - level) / 2, (1 + level) / 2], axis=0)

    def value(x: float) -> float | None:  # JSON-ready: None where undefined
        return float(x) if np.isfinite(x) else None

    def values(a: np.ndarray) -> list[float | None]:
        return [value(x) for x in a]

    return {"layer": ds["layer"].values.tolist(), "ratio": values(ratio(np.arange(n))), "low": values(low),
            "high": values(high), "share": values(_ratio(hit.sum(0), mass.sum(0))),
            "expected": value(_ratio(n_finding.sum(), n_patch.sum())), "n_samples": n,
            "level": level, "n_boot": n_boot}


def sweep_summary(ds: xr.Dataset) -> dict:
    """One tower's figures as ``summary.json`` holds them: samples (per finding), time, peak mean effect, the
    ground-truth score with its bootstrap CI (:func:`score_ci`) pooled and per finding, the noise scale and
    calibration (trace mode) and what the corruption lets the score say (``circular``, ``localisation``)."""
    findings = ds["finding"].values.astype(str)
    per = {f: int((findings == f).sum()) for f in sorted(set(findings))}
    return {"samples": ds.sizes["sample"], "per_finding": per, "elapsed_s": ds.attrs["elapsed_s"],
            "peak_mean_effect": float(ds.effect.mean("sample").max()), "ground_truth": score_ci(ds),
            "ground_truth_by_finding": {f: score_ci(ds.isel(sample=np.flatnonzero(findings == f))) for f in per},
            **{k: ds.attrs[k] for k in ("corrupt", "noise_scale", "calibration", "circular", "localisation")
               if k in ds.attrs}}


def agreement(exact: np.ndarray, estimate: np.ndarray, strength: np.ndarray, k: int = TOP_K) -> dict:
    """How AtP* agrees with exact patching on one tower's cells, arrays [sample, layer, position] (NaN: padding):
    per sample, the Spearman correlation of the signed effects, that of |exact| with the GradDrop strength,
    and the share of the ``k`` strongest exact cells among AtP*'s ``k`` strongest (mean over samples); per
    layer, the signed Spearman over every sample's cells; ``flags``: what falls below ``AGREE``."""

    def rho(a: np.ndarray, b: np.ndarray) -> float:
        keep = ~np.isnan(a) & ~np.isnan(b)
        return float(spearmanr(a[keep], b[keep])[0]) if keep.sum() > 2 and np.ptp(a[keep]) and np.ptp(b[keep]) else float("nan")

    signed, strong, recall = [], [], []
    for e, s, m in zip(exact, estimate, strength):
        signed.append(rho(e.ravel(), s.ravel()))
        strong.append(rho(np.abs(e).ravel(), m.ravel()))
        keep = np.flatnonzero(~np.isnan(e.ravel()))
        top = min(k, len(keep))
        best = set(keep[np.argsort(-np.abs(e.ravel()[keep]))[:top]])
        recall.append(len(best & set(keep[np.argsort(-m.ravel()[keep])[:top]])) / max(top, 1))
    out = {"spearman": float(np.nanmean(signed)), "spearman_strength": float(np.nanmean(strong)),
           "top_k_recall": float(np.mean(recall)), "k": k, "samples": len(exact),
           "per_layer": [rho(exact[:, j].ravel(), estimate[:, j].ravel()) for j in range(exact.shape[1])]}
    out["flags"] = [f"{name} {out[key]:.2f} < {AGREE}" for key, name in
                    (("spearman", "Spearman (signed)"), ("spearman_strength", "Spearman (strength)"), ("top_k_recall", f"top-{k} recall"))
                    if out[key] < AGREE]
    return out


def atp_agreement(ds: xr.Dataset, k: int = TOP_K) -> dict:
    """:func:`agreement` of a tower swept with ``--method both`` (exact ``effect``, AtP*'s ``atp_effect`` and
    ``atp_magnitude``)."""
    return agreement(*(ds[v].values for v in ("effect", "atp_effect", "atp_magnitude")), k=k)


def _nanmean(a: np.ndarray, axis: int = 0) -> np.ndarray:
    """Mean over ``axis`` ignoring NaN, NaN where all are NaN (no warning)."""
    n = np.sum(~np.isnan(a), axis=axis)
    return np.where(n > 0, np.nansum(a, axis=axis) / np.maximum(n, 1), np.nan)


def _thumb_size(width: int, height: int, px: int = IMAGE_PX) -> tuple[int, int]:
    """(width, height) scaled so the longest side is at most ``px``."""
    scale = min(1.0, px / max(width, height))
    return max(1, round(width * scale)), max(1, round(height * scale))


def _image_uri(image: np.ndarray, px: int = IMAGE_PX) -> str:
    """A [0, 1] grayscale image as a JPEG data URI, longest side at most ``px``."""
    pic = Image.fromarray((np.nan_to_num(image).clip(0, 1) * 255).astype(np.uint8), mode="L")
    pic = pic.resize(_thumb_size(*pic.size, px), Image.Resampling.LANCZOS)
    buf = io.BytesIO()
    pic.save(buf, format="JPEG", quality=85)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode()


def _outline(mask: np.ndarray) -> tuple[list, list]:
    """Boundary of the True cells of a (rows, cols) grid as line segments (None-separated)."""
    m = np.pad(mask, 1)
    xs: list = []
    ys: list = []
    for dr, dc in ((-1, 0), (1, 0), (0, -1), (0, 1)):
        for r, c in np.argwhere(m[1:-1, 1:-1] & ~m[1 + dr:m.shape[0] - 1 + dr, 1 + dc:m.shape[1] - 1 + dc]):
            if dr:
                xs += [c - 0.5, c + 0.5, None]
                ys += [r + dr / 2] * 2 + [None]
            else:
                xs += [c + dc / 2] * 2 + [None]
                ys += [r - 0.5, r + 0.5, None]
    return xs, ys


@dataclass
class _View:
    """What one drill-down entry shows: mean over samples or one sample."""

    label: str
    title: str
    effect: np.ndarray        # (layer, position)
    ticks: tuple[list, list]  # heatmap x tick values and labels
    grid: np.ndarray | None   # (layer, rows, cols) effect on the patch grid
    mask: np.ndarray | None   # (rows, cols) bool, finding patches (union over samples for the mean)
    image: str | None         # JPEG data URI
    share: np.ndarray         # (layer,) ground-truth score


class _Tower:
    """One tower's sweep, loaded, with positions typed and the patch grid resolved."""

    def __init__(self, name: str, ds: xr.Dataset):
        self.name, self.ds = name, ds.load()
        self.kind = self.ds["kind"].values.astype(str)
        self.token = self.ds["token"].values.astype(str)
        self.row, self.col = self.ds["row"].values.astype(int), self.ds["col"].values.astype(int)
        self.live = self.kind != "pad"
        self.layers = self.ds["layer"].values
        self.score = ground_truth_score(self.ds)
        on_grid = (self.kind == "image") & (self.row >= 0)
        # Positions that are a patch in every sample that has them; drawn narrow when they dominate.
        self.is_patch = (on_grid | ~self.live).all(0) & self.live.any(0)
        n_patch, n_other = self.is_patch.sum(), (~self.is_patch).sum()
        widths = np.where(self.is_patch, min(1.0, 2 * max(n_other, 8) / max(n_patch, 1)), 1.0)
        self.x_edges = np.concatenate([[0.0], np.cumsum(widths)])
        s, p = np.nonzero(on_grid)
        self.has_grid = s.size > 0
        if not self.has_grid:
            return
        self.shape = (int(self.ds.attrs.get("grid_rows") or self.row.max() + 1),
                      int(self.ds.attrs.get("grid_cols") or self.col.max() + 1))
        n_s, n_l = self.ds.sizes["sample"], self.ds.sizes["layer"]
        self.grid = np.full((n_s, n_l, *self.shape), np.nan)
        self.grid[s, :, self.row[s, p], self.col[s, p]] = self.ds["effect"].values[s, :, p]
        self.mask = np.zeros((n_s, *self.shape), bool)
        self.mask[s, self.row[s, p], self.col[s, p]] = self.ds["mask_fraction"].values[s, p] > 0

    def ticks(self, samples: np.ndarray) -> tuple[list[float], list[str]]:
        """x ticks (cell centres) of the heatmap for ``samples``: every non-patch position (its
        token when these samples agree, else kind + index) and the first patch of each grid row."""
        centres = (self.x_edges[:-1] + self.x_edges[1:]) / 2
        vals, text = [], []
        for p in np.flatnonzero(self.live[samples].any(0)):
            live = samples[self.live[samples, p]]
            if self.is_patch[p]:
                if (self.col[live, p] == 0).all():
                    vals.append(centres[p])
                    text.append(f"img r{self.row[live, p][0]}")
                continue
            kinds, tokens = set(self.kind[live, p]), set(self.token[live, p])
            vals.append(centres[p])
            text.append(esc(_clip(tokens.pop(), 14)) if len(tokens) == 1 else f"{'/'.join(sorted(kinds))} {p}")
        return vals, text

    def hover(self) -> np.ndarray:
        """Per position: index, kind, patch, and its tokens over samples (at most 4 distinct)."""
        out = []
        for p in range(self.token.shape[1]):
            live = np.flatnonzero(self.live[:, p])
            tokens = list(dict.fromkeys(self.token[live, p]))
            first = live[0] if live.size else 0
            where = f" r{self.row[first, p]} c{self.col[first, p]}" if self.row[first, p] >= 0 else ""
            shown = " | ".join(esc(t) for t in tokens[:4]) + (" | …" if len(tokens) > 4 else "")
            out.append(f"position {p} · {'/'.join(sorted(set(self.kind[live, p]))) or 'pad'}{where}: {shown}")
        return np.array(out, dtype=object)

    def view(self, sample: int | None) -> _View:
        """The mean view (``sample=None``) or one sample's."""
        ds = self.ds
        if sample is None:
            samples = np.arange(ds.sizes["sample"])
            label, title = MEAN, f"{esc(self.name)} tower — {MEAN} (n={samples.size})"
            effect, share = _nanmean(ds["effect"].values, 0), self.score["share"].values
            grid = _nanmean(self.grid, 0) if self.has_grid else None
            mask = self.mask.any(0) if self.has_grid else None
            image = ds["image"].values.mean(0)
        else:
            samples = np.array([sample])
            s = ds.isel(sample=sample)
            label = str(s["sample"].values)
            title = (f"{esc(self.name)} tower — sample {esc(label)}: {esc(_clip(s['question'].values))}"
                     f"<br>answer: {esc(_clip(s['answer'].values))} · finding: {esc(s['finding'].values)}"
                     f" · clean {float(s['clean']):.3g} · corrupted {float(s['corrupted']):.3g}")
            effect, share = s["effect"].values, self.score["sample_share"].values[sample]
            grid = self.grid[sample] if self.has_grid else None
            mask = self.mask[sample] if self.has_grid else None
            image = s["image"].values
        return _View(label, title, np.round(effect.astype(float), DECIMALS), self.ticks(samples),
                     None if grid is None else np.round(grid, DECIMALS), mask,
                     _image_uri(image) if self.has_grid else None, share)


def _clip(text: Any, n: int = 120) -> str:
    text = str(text)
    return text if len(text) <= n else text[: n - 1] + "…"


def _limit(effect: np.ndarray) -> float:
    """Symmetric colour limit: the largest |effect| (1 when there is none)."""
    return float(np.nanmax(np.abs(effect), initial=0)) or 1.0


def _panel_title(layer: Any, share: float) -> str:
    return f"L{layer}" + ("" if np.isnan(share) else f" · GT {share:.2f}")


def _view_update(v: _View, tower: _Tower) -> tuple[dict, dict]:
    """Plotly ``update`` args showing ``v``: per-trace data (main heatmap, then per layer
    image, effect overlay, outline; None where an attribute does not apply) and layout
    (title, position ticks, colour range, panel titles)."""
    data: dict[str, list] = {"z": [v.effect.tolist()], "source": [None],
                             "x": [tower.x_edges.tolist()], "y": [tower.layers.tolist()]}
    lim = _limit(v.effect)
    layout = {"title.text": v.title, "xaxis.tickvals": v.ticks[0], "xaxis.ticktext": v.ticks[1],
              "coloraxis.cmin": -lim, "coloraxis.cmax": lim}
    if tower.has_grid:
        lim = _limit(v.grid)
        layout.update({"coloraxis2.cmin": -lim, "coloraxis2.cmax": lim})
        xs, ys = _outline(v.mask)
        for i, layer in enumerate(tower.layers):
            data["z"] += [None, v.grid[i].tolist(), None]
            data["source"] += [v.image, None, None]
            data["x"] += [None, None, xs]
            data["y"] += [None, None, ys]
            layout[f"annotations[{i + 1}].text"] = _panel_title(layer, v.share[i])
    return data, layout


def tower_figure(name: str, ds: xr.Dataset, max_samples: int = 20) -> go.Figure:
    """One tower's figure: mean effect heatmap (layer x position) and, when the tower has image
    patches, one effect-over-image panel per layer; a dropdown switches all of it between the
    mean and each of the first ``max_samples`` samples."""
    tower = _Tower(name, ds)
    layers, n_layers = tower.layers, len(tower.layers)
    views = [tower.view(None)] + [tower.view(i) for i in range(min(ds.sizes["sample"], max_samples))]
    mean = views[0]
    ncols = min(n_layers, PANEL_COLS) if tower.has_grid else 1
    nrows = math.ceil(n_layers / ncols) if tower.has_grid else 0
    panel_px = 1050 / ncols * tower.shape[0] / tower.shape[1] + 30 if tower.has_grid else 0
    heat_px, ticks_px, top_px, gap_px = 360, 90, 130, 30
    height = top_px + heat_px + ticks_px + nrows * (panel_px + gap_px) + 30
    specs = [[{"colspan": ncols}] + [None] * (ncols - 1)] + [
        [{} if r * ncols + c < n_layers else None for c in range(ncols)] for r in range(nrows)]
    fig = make_subplots(rows=1 + nrows, cols=ncols, specs=specs,
                        row_heights=[heat_px + ticks_px] + [panel_px] * nrows,
                        vertical_spacing=gap_px / height, horizontal_spacing=0.02,
                        subplot_titles=["effect by layer and position"]
                        + [_panel_title(layer, s) for layer, s in zip(layers, mean.share)])
    fig.add_heatmap(z=mean.effect, x=tower.x_edges, y=layers, coloraxis="coloraxis", row=1, col=1,
                    customdata=np.broadcast_to(tower.hover(), mean.effect.shape),
                    hovertemplate="layer %{y} · %{customdata}<br>effect %{z:.3f}<extra></extra>")
    lo, hi = fig.layout.yaxis.domain
    heat_lo = lo + ticks_px / (height - top_px - 30)  # room for the rotated position labels
    fig.update_xaxes(tickvals=mean.ticks[0], ticktext=mean.ticks[1], tickangle=-60, row=1, col=1)
    fig.update_yaxes(title_text="layer", domain=[heat_lo, hi], row=1, col=1,
                     **({"tickvals": layers} if n_layers <= 32 else {}))
    if tower.has_grid:
        rows, cols = tower.shape
        px_w, px_h = _thumb_size(ds.sizes["x"], ds.sizes["y"])
        xs, ys = _outline(mean.mask)
        for i, layer in enumerate(layers):
            r, c = 2 + i // ncols, 1 + i % ncols
            fig.add_image(source=mean.image, x0=-0.5 + cols / px_w / 2, dx=cols / px_w,
                          y0=-0.5 + rows / px_h / 2, dy=rows / px_h, hoverinfo="skip", row=r, col=c)
            fig.add_heatmap(z=mean.grid[i], coloraxis="coloraxis2", row=r, col=c,
                            hovertemplate=f"layer {layer} · r%{{y}} c%{{x}}<br>effect %{{z:.3f}}<extra></extra>")
            fig.add_scatter(x=xs, y=ys, mode="lines", line={"color": "#00d26a", "width": 2},
                            hoverinfo="skip", showlegend=False, row=r, col=c)
            fig.update_xaxes(range=[-0.5, cols - 0.5], visible=False, row=r, col=c)
            fig.update_yaxes(range=[rows - 0.5, -0.5], scaleanchor=fig.get_subplot(r, c).yaxis.anchor,
                             visible=False, row=r, col=c)
    buttons = [{"label": esc(v.label), "method": "update", "args": list(_view_update(v, tower))}
               for v in views]
    mean_layout = buttons[0]["args"][1]
    if tower.has_grid:
        fig.update_layout(coloraxis2={
            "colorscale": OVERLAY_SCALE, "cmin": mean_layout["coloraxis2.cmin"], "cmax": mean_layout["coloraxis2.cmax"],
            "colorbar": {"title": {"text": "patch<br>effect"}, "len": lo, "y": 0, "yanchor": "bottom"}})
    fig.update_layout(
        height=height, margin={"t": top_px, "l": 60, "r": 20, "b": 30}, plot_bgcolor="white",
        title={"text": mean.title, "x": 0.01, "xanchor": "left", "font": {"size": 14}},
        coloraxis={"colorscale": EFFECT_SCALE, "cmin": mean_layout["coloraxis.cmin"],
                   "cmax": mean_layout["coloraxis.cmax"],
                   "colorbar": {"title": {"text": "effect"}, "len": hi - heat_lo, "y": hi, "yanchor": "top"}},
        updatemenus=[{"buttons": buttons, "direction": "down", "x": 1, "xanchor": "right",
                      "y": 1, "yanchor": "bottom", "pad": {"b": 60}, "showactive": True}],
    )
    return fig


def _run_meta(datasets: Mapping[str, xr.Dataset]) -> tuple[list[tuple[str, Any]], dict[str, list[tuple[str, Any]]]]:
    """Run attrs shared by all towers, and per tower the ones that differ."""
    values = {k: [ds.attrs.get(k) for ds in datasets.values()] for k in RUN_ATTRS}
    shared = [(k, v[0]) for k, v in values.items() if v[0] is not None and all(x == v[0] for x in v)]
    own = {name: [(k, ds.attrs[k]) for k in RUN_ATTRS if k in ds.attrs and k not in dict(shared)]
           for name, ds in datasets.items()}
    return shared, own


def _samples_table(datasets: Mapping[str, xr.Dataset]) -> str:
    """One row per sample: id, question, answer, finding, clean and corrupted metric per tower."""
    first = next(iter(datasets.values()))
    header = ["sample", "question", "answer", "finding"] + [
        f"{k} ({name})" for name in datasets for k in ("clean", "corrupted")]
    rows = [[first[f].values[i] for f in ("sample", "question", "answer", "finding")]
            + [float(ds[k].values[i]) for ds in datasets.values() for k in ("clean", "corrupted")]
            for i in range(first.sizes["sample"])]
    return table(header, rows)


def _agreement_html(a: dict, layers: np.ndarray) -> str:
    """The agreement figures of :func:`agreement` as a table, with what falls below ``AGREE`` flagged."""
    rows = [["Spearman, signed effects", a["spearman"]], ["Spearman, |exact| vs GradDrop strength", a["spearman_strength"]],
            [f"top-{a['k']} recall of the strongest exact cells", a["top_k_recall"]]]
    rows += [[f"Spearman, signed, layer {layer}", v] for layer, v in zip(layers, a["per_layer"])]
    verdict = (f"AtP* disagrees with exact patching here: {esc('; '.join(a['flags']))}." if a["flags"]
               else f"AtP* agrees with exact patching (every figure >= {AGREE}).")
    return f'<p class="note">{verdict} Means over {a["samples"]} samples.</p>' + table(["figure", "value"], rows)


def _score_table(name: str, ds: xr.Dataset) -> str:
    """Ground-truth score per layer of one tower (empty when it has no image patches)."""
    score = ground_truth_score(ds)
    expected = float(score["expected"])
    if np.isnan(expected):
        return f"<p>No image patches in the {esc(name)} tower: no ground-truth score.</p>"
    rows = [[int(layer), float(share), expected, float(share) / expected if expected else float("nan")]
            for layer, share in zip(ds["layer"].values, score["share"].values)]
    return table(["layer", "share of positive effect on finding", "expected by area", "ratio"], rows)


def write_sweep_report(datasets: Mapping[str, xr.Dataset], out: str | Path,
                       title: str = "Layer sweep report", max_samples: int = 20) -> Path:
    """Write the sweep's self-contained HTML report (plotly.js inlined) to ``out``; return its path.

    ``datasets`` maps tower name ("lm", "vision") to its sweep Dataset, e.g.
    ``{g: xr.open_zarr(store, group=g) for g in ("lm", "vision")}``. The per-sample dropdowns
    list the first ``max_samples`` samples (the mean always uses all).
    """
    datasets = {name: ds.load() for name, ds in datasets.items()}
    shared, own = _run_meta(datasets)
    first = next(iter(datasets.values()))
    n = first.sizes["sample"]
    elapsed = sum(float(ds.attrs.get("elapsed_s", 0)) for ds in datasets.values())
    parts = [f"<h1>{esc(title)}</h1>",
             meta_list(shared + [("towers", ", ".join(datasets)), ("samples", n),
                                 ("elapsed (all towers)", f"{elapsed:.1f} s")]),
             f'<p class="note">{esc(HOW_TO_READ)}</p>']
    if n > max_samples:
        parts.append(f"<p>Dropdowns list the first {max_samples} of {n} samples.</p>")
    both = [name for name, ds in datasets.items() if "atp_effect" in ds and ds.attrs.get("method") == "both"]
    divs = figure_divs([*(tower_figure(name, ds, max_samples) for name, ds in datasets.items()),
                        *(tower_figure(f"{name} (AtP*)", datasets[name].assign(effect=datasets[name]["atp_effect"]), max_samples)
                          for name in both)])
    atp = dict(zip(both, divs[len(datasets):]))
    for (name, ds), div in zip(datasets.items(), divs):
        parts += [f"<h2>{esc(name)} tower</h2>", meta_list(own[name])]
        if name in atp:
            parts += ['<div style="display:grid;grid-template-columns:1fr 1fr;gap:12px">'
                      f"<div><h3>exact</h3>{div}</div><div><h3>AtP*</h3>{atp[name]}</div></div>",
                      "<h3>AtP* against exact patching</h3>", _agreement_html(atp_agreement(ds), ds["layer"].values)]
        else:
            parts.append(div)
        parts += ["<h3>Ground-truth score</h3>", _score_table(name, ds)]
    parts += ["<h2>Samples</h2>", _samples_table(datasets)]
    return write_page(out, title, parts)
