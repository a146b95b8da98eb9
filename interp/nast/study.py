"""The NAST comparison study (``python -m interp.nast study``, also ``python experiments/nast_clip.py``).

Trace once (``TraceConfig``; data seeds = the study's seeds) -> alphas by both rules (``state``: effect
at each block's output; ``block``: the EOT effect each block adds) -> at equal steps, data order and
LoRA init per seed: uniform LoRA, NAST per beta with each rule, and the controls at beta 1 (the
``state`` alphas permuted across blocks; min-max normalised uniform random alphas). Every run, and
the base model once, is scored by ``interp.models.train_clip.evaluate`` on one evaluation set (the
``base`` row is the organism's ``--eval-only`` figures). Writes ``study.json`` (config, per-run
metrics, the mean ± sd table, paired comparisons with uniform), ``study.html`` and the trace's store
``cte.zarr`` under ``--out``.

Comparison with uniform LoRA, per NAST variant: paired over seeds (same seed = same data order
and LoRA init), d = |gap| - |gap of uniform| and the R@1 difference, mean and a 95% t interval.
NAST "beats" uniform when the interval of d lies below 0 and R@1 drops by <= 1 point.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import xarray as xr

from interp.nast.config import NastConfig, StudyConfig, TraceConfig

METRICS = ("negated", "affirmative", "gap", "claims", "recall@1", "recall@5")


def methods(study: StudyConfig) -> list[tuple[str, str, float, str]]:
    """(row name, training method, beta, alpha rule) of every trained row."""
    return [("uniform", "uniform", 1.0, "state"),
            *[(f"nast b={b:g}", "nast", b, "state") for b in study.betas],
            *[(f"nast-block b={b:g}", "nast", b, "block") for b in study.betas],
            ("shuffled b=1", "shuffled", 1.0, "state"), ("random b=1", "random", 1.0, "state")]


def table(runs: dict[str, list[dict]]) -> dict:
    """{row: {metric: {mean, sd (over seeds, ddof 1; 0 for one run), n}}}."""
    return {name: {m: {"mean": float(np.mean([x[m] for x in rs])),
                       "sd": float(np.std([x[m] for x in rs], ddof=1)) if len(rs) > 1 else 0.0, "n": len(rs)}
                   for m in METRICS} for name, rs in runs.items()}


def paired(runs: dict[str, list[dict]], name: str, ref: str = "uniform") -> dict:
    """Seed-paired differences of ``name`` against ``ref``: d|gap| and dR@1 (points), mean and 95% t interval."""
    from scipy import stats

    out = {}
    for key, f in (("abs_gap", lambda r: abs(r["gap"])), ("recall@1", lambda r: r["recall@1"])):
        d = 100 * np.array([f(a) - f(b) for a, b in zip(runs[name], runs[ref])])
        half = float(stats.t.ppf(0.975, len(d) - 1) * d.std(ddof=1) / np.sqrt(len(d))) if len(d) > 1 else float("nan")
        out[key] = {"mean": float(d.mean()), "ci": [float(d.mean() - half), float(d.mean() + half)], "n": len(d)}
    return out


def conclude(comparisons: dict[str, dict]) -> str:
    """One paragraph: the NAST variant with the lowest mean d|gap| against uniform, and whether it beats it."""
    best = min(comparisons, key=lambda k: comparisons[k]["abs_gap"]["mean"])
    g, r = comparisons[best]["abs_gap"], comparisons[best]["recall@1"]
    head = (f"best NAST variant {best}: |gap| {g['mean']:+.1f} points vs uniform LoRA (95% CI {g['ci'][0]:+.1f} to "
            f"{g['ci'][1]:+.1f}, n={g['n']} seeds), R@1 {r['mean']:+.1f} points. ")
    if g["ci"][1] < 0 and r["mean"] >= -1.0:
        return head + "NAST beats uniform LoRA on the gap without losing more than 1 point of recall."
    if g["mean"] < 0:
        return head + "Lower than uniform on average, but not beyond seed noise (or at > 1 point of recall)."
    return head + "NAST does not beat uniform LoRA on the gap in this setting."


def html_report(path: Path, study: dict, nast: xr.DataTree) -> Path:
    """The study page; ``nast``: the trace's node of the results store."""
    import plotly.graph_objects as go

    from interp.report.html import esc, figure_divs, meta_list, table as html_table, write_page

    roles, layers = nast["role"].values.tolist(), nast["layer"].values.tolist()
    mean, lo, hi = (nast[k].values for k in ("cte_mean", "cte_ci_low", "cte_ci_high"))
    text = [[f"CTE {m:.3f} [{a:.3f}, {b:.3f}]" for m, a, b in zip(r1, r2, r3)] for r1, r2, r3 in zip(mean, lo, hi)]
    heat = go.Figure(go.Heatmap(z=mean.T, x=[f"L{l}" for l in layers], y=[esc(r) for r in roles], text=np.array(text, dtype=object).T,
                                hoverinfo="text+x+y", colorscale="RdBu", zmid=1.0))
    heat.update_layout(title="CTE = s_traced / s per hidden state (L0 = embeddings) x role (1 = no effect, 0 = fully negated)",
                       height=380)
    prof = go.Figure()
    for seed in nast.attrs["per_seed"]:
        p = np.array(seed["profile"], dtype=float)
        prof.add_trace(go.Scatter(x=list(range(len(p))), y=p, mode="lines+markers", name=f"data seed {seed['seed']}"))
    blocks = list(range(1, len(study["alphas"]["state"]) + 1))
    for rule, a in study["alphas"].items():
        prof.add_trace(go.Bar(x=blocks, y=a, name=f"alpha ({rule} rule) of block l-1", opacity=0.4))
    prof.update_layout(title=f"per-layer effect profile ({esc(study['trace']['aggregate'])} over roles) and alphas", height=360,
                       xaxis_title="hidden state (block output)", barmode="group")
    norms = go.Figure()
    for name, row in study["delta_norms"].items():
        norms.add_trace(go.Bar(x=[f"block {l}" for l in range(len(row))], y=row, name=esc(name)))
    norms.update_layout(barmode="group", title="where updates concentrated: ||LoRA delta W|| per text block (mean over seeds)",
                        height=380)
    divs = figure_divs([heat, prof, norms])
    rows = [[name, *[f"{100 * r[m]['mean']:.1f} ± {100 * r[m]['sd']:.1f}" for m in METRICS]] for name, r in study["table"].items()]
    pairs = [[name, f"{c['abs_gap']['mean']:+.1f} [{c['abs_gap']['ci'][0]:+.1f}, {c['abs_gap']['ci'][1]:+.1f}]",
              f"{c['recall@1']['mean']:+.1f} [{c['recall@1']['ci'][0]:+.1f}, {c['recall@1']['ci'][1]:+.1f}]"]
             for name, c in study["vs_uniform"].items()]
    b = study["base"]
    body = [
        f"<h1>NAST on {esc(study['model'])}</h1>",
        meta_list([("command", study["command"]), ("seeds", study["seeds"]), ("steps", study["config"]["steps"]),
                   ("scale mode", study["config"]["scale_mode"]),
                   ("base gap (aff - neg)", f"{100 * b['gap']:+.1f} [{100 * b['gap_ci'][0]:+.1f}, {100 * b['gap_ci'][1]:+.1f}] "
                                            f"(n = {b['n_mcq']} items)"),
                   ("seed rank correlation (Spearman, mean)", f"{study['stability']['mean']:.3f}"),
                   ("wall time (s)", study["seconds"])]),
        "<h2>Comparison (%, mean ± sd over seeds)</h2>",
        html_table(["method", "negated acc", "affirmative acc", "gap (aff - neg)", "claim acc", "R@1", "R@5"], rows),
        "<h2>Against uniform LoRA (points, seed-paired mean [95% t interval])</h2>",
        html_table(["variant", "d |gap|", "d R@1"], pairs),
        f'<p class="note">{esc(study["conclusion"])}</p>',
        "<h2>Negation tracing</h2>", divs[0], divs[1],
        "<h2>Updates per layer</h2>", divs[2],
    ]
    return write_page(path, f"NAST study - {study['model']}", body)


def format_table(study: dict) -> str:
    """The printed table (points, mean ± sd over seeds) and the paired comparisons."""
    lines = [f"{'method':18s} " + " ".join(f"{m:>13s}" for m in METRICS)]
    for name, r in study["table"].items():
        lines.append(f"{name:18s} " + " ".join(f"{100 * r[m]['mean']:6.1f} ± {100 * r[m]['sd']:4.1f}" for m in METRICS))
    lines.append("\nagainst uniform LoRA (seed-paired, points, mean [95% t interval]):")
    for name, c in study["vs_uniform"].items():
        g, r = c["abs_gap"], c["recall@1"]
        lines.append(f"  {name:18s} d|gap| {g['mean']:+5.1f} [{g['ci'][0]:+5.1f}, {g['ci'][1]:+5.1f}]   "
                     f"dR@1 {r['mean']:+5.1f} [{r['ci'][0]:+5.1f}, {r['ci'][1]:+5.1f}]")
    return "\n".join(lines)


def run_study(study: StudyConfig, trace: TraceConfig, run: NastConfig, out: str, command: str) -> dict:
    """Run the study (see module doc); returns what ``study.json`` holds."""
    from interp.models import load
    from interp.models.train_clip import eval_set, evaluate, format_table as eval_table
    from interp.nast.cte import alphas_from_cte, trace_seeds, write_trace
    from interp.nast.train import train_data, train_run
    from interp.store import open_store

    t0 = time.perf_counter()
    trace = replace(trace, model=run.model, seeds=study.seeds)
    adapter = load(run.model, kind="dual", purpose="nast study")
    outp = Path(out)
    print("tracing ...", flush=True)
    per_seed, pooled, stab, alphas = trace_seeds(adapter, trace.seeds, trace.n_images, aggregate=trace.aggregate,
                                                 min_margin=trace.min_margin, limit=trace.limit, alpha_rule="state")
    rules = {"state": alphas, "block": alphas_from_cte(pooled, trace.aggregate, "block")}
    store = write_trace(str(outp / "cte.zarr"), adapter, per_seed, pooled, stab, alphas, trace.aggregate, "state")
    for rule, a in rules.items():
        print(f"  alphas ({rule} rule) {np.round(a, 3).tolist()}", flush=True)
    print(f"  {len(pooled.values)} pairs; seed rank correlation {stab['mean']:.3f}", flush=True)

    evals = eval_set(run.n_eval, run.eval_seed, "test", run.image_size)  # built once, for every run
    data = train_data(run.n_train, run.data_seed, run.image_size)
    base = evaluate(adapter, evals)
    print(f"base ({adapter.model_id}):\n{eval_table(base)}", flush=True)
    runs: dict[str, list[dict]] = {"base": [base]}
    norms: dict[str, list] = {}
    records = []
    for name, method, beta, rule in methods(study):
        for s in study.seeds:
            r = train_run(adapter, replace(run, method=method, beta=beta, seed=s), rules[rule], data=data, evals=evals)
            runs.setdefault(name, []).append(r.metrics)
            norms.setdefault(name, []).append(r.delta_norms)
            records.append({"name": name, "alpha_rule": rule, **r.to_dict()})
            print(f"  {name:18s} seed {s}: gap {100 * r.metrics['gap']:6.1f}  neg {100 * r.metrics['negated']:5.1f} "
                  f"R@1 {100 * r.metrics['recall@1']:5.1f}  ({r.seconds:.0f}s)", flush=True)
    nast_rows = [name for name, method, _, _ in methods(study) if method == "nast"]
    result = {
        "model": adapter.model_id, "weight_hash": adapter.weight_hash, "command": command, "seeds": study.seeds,
        "study": asdict(study), "trace": asdict(trace), "config": asdict(run),
        "alphas": {k: v.tolist() for k, v in rules.items()}, "cte_store": Path(store).name, "stability": stab,
        "base": base, "table": table(runs), "vs_uniform": {k: paired(runs, k) for k in nast_rows},
        "delta_norms": {k: np.mean(v, axis=0).tolist() for k, v in norms.items()}, "runs": records,
    }
    result["conclusion"] = conclude(result["vs_uniform"])
    result["seconds"] = round(time.perf_counter() - t0, 1)
    (outp / "study.json").write_text(json.dumps(result, indent=1))
    html_report(outp / "study.html", result, open_store(store)["nast"])
    print("\n" + format_table(result))
    print(f"\n{result['conclusion']}")
    print(f"wrote {outp / 'study.json'}, {outp / 'study.html'} and {store} ({result['seconds']:.0f}s)")
    return result
