"""Causal tracing and activation patching sweeps, from the command line.

    python -m interp.trace                 # layer sweep: embedded organism + phantom test split
    python -m interp.trace --mode patch --corrupt negation --sites 'lm.blocks.*.resid_post'

Modes: ``trace`` (ROME): Gaussian noise (``--noise-scale`` x the std of the corrupted embeddings,
``--copies`` noised copies) on the image (patch embeddings for the vision tower; image tokens
entering the LM for the LM) or on a named text span, then clean states restored site by site.
``patch``: activation patching from a clean input into its pair - ``negation`` (the negated
statement into "there is a ..."), ``counterfactual`` (the image into the same image with the
finding removed). Writes ``<out>/sweep.zarr`` (effects [sample, layer, position] per tower) and
``<out>/report.html``. ``nast``: NAST's tracing of a CLIP-style text encoder (``--model organism``
means the CLIP organism here) - the negated text's states patched into the positive text's per layer
and token role, CTE = s_traced / s - written to ``<out>/cte.zarr`` (group ``nast``, with the alphas)
and ``report.html``; it takes --model, --corrupt, --limit, --seed, --device and --out only.
``--method``: ``exact`` restored runs (at the FLOP floor for causal LMs: ``interp.trace.floor``), ``atp``
(attribution patching with the AtP* corrections: every cell from one corrupted forward and backward;
``interp.trace.atp``) or ``both`` (the report shows them side by side with their agreement).
``--layer-sweep`` is accepted and optional: the sweep is what this command runs.
Bad input: one line on stderr, exit code 2, nothing written (``--debug``: tracebacks).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from dataclasses import fields
from pathlib import Path
from types import SimpleNamespace
from typing import Sequence

from interp.cli import (Parser, non_negative_float, non_negative_int, out_dir, positive_float, positive_int, run,
                        torch_device)
from interp.trace.config import METHODS, MODES, SweepConfig

NAST_IMAGES = 48  # phantoms per data seed in --mode nast

HELP = {
    "model": "model id or checkpoint folder ('organism' = the embedded LVLM organism; with --mode nast the "
             "embedded CLIP organism, clip-organism)",
    "data": "phantom-{train,val,test}, mednega-phantom-{train,val,test}, a saved VQA data set or negation benchmark "
            "(.json, MedNega .csv), or real images: a folder with prompts.csv/.jsonl "
            "(columns image, prompt[, answer]) or such a table",
    "image": "trace one image file (PNG/JPEG/DICOM) instead of a data set; needs --prompt",
    "prompt": "the prompt for --image; its answer is the model's own top prediction",
    "sites": "sites to sweep (globs); tower and point come from the names (empty: every sweepable tower's resid_post)",
    "mode": "trace (noise + restore, ROME), patch (paired inputs) or nast (CLIP text-encoder negation tracing)",
    "method": "exact (restored runs), atp (AtP* estimates of every cell from one backward) or both (compared)",
    "corrupt": "; ".join(f"{m}: {', '.join(c)}" for m, c in MODES.items()) + " (first = default)",
    "metric": "LVLMs: prob, logprob or logit_diff (answer minus best alternative answer); dual encoders: logit "
              "(empty: prob / logit)",
    "window": "restore this many consecutive layers centred on each layer (ROME's window)",
    "lm_positions": "token (every position) or span (named spans: image, question, finding, ...)",
    "vision_positions": "patch, or block<k> for k x k blocks of patches",
    "copies": "noised copies averaged per restored run (ROME: 10)",
    "noise_scale": "noise std as a multiple of the corrupted embeddings' std (ROME: 3)",
    "batch_size": "restored runs per forward pass",
    "limit": "samples to sweep (--mode nast: pairs per data seed)",
    "min_gap": "keep only samples whose corruption moves the metric by at least this (ROME keeps such cases)",
    "seed": "noise seed (--mode nast: the first of 3 data seeds)",
    "device": "torch device: cpu, cuda, cuda:<index>, mps",
    "out": "output folder (sweep.zarr, or cte.zarr in --mode nast, + report.html)",
}
TYPES = {"window": positive_int, "copies": positive_int, "noise_scale": positive_float, "batch_size": positive_int,
         "limit": positive_int, "min_gap": non_negative_float, "seed": non_negative_int, "device": torch_device,
         "out": out_dir}
CHOICES = {"mode": tuple(MODES), "method": METHODS, "lm_positions": ("token", "span")}


def parser() -> Parser:
    p = Parser("python -m interp.trace", __doc__)
    p.add_argument("--layer-sweep", action="store_true", default=argparse.SUPPRESS,
                   help="accepted for compatibility: a layer x position sweep is what this command runs")
    for f in fields(SweepConfig):
        p.add_argument(f"--{f.name.replace('_', '-')}", type=TYPES.get(f.name, type(f.default)), default=f.default,
                       choices=CHOICES.get(f.name), help=f"{HELP[f.name]} (default: {f.default})")
    return p


def parse_args(argv: Sequence[str] | None) -> SweepConfig:
    """The sweep's settings, checked (InterpError on bad or inapplicable options)."""
    args = vars(parser().parse_args(argv))
    args.pop("layer_sweep", None)
    cfg = SweepConfig(**args)
    cfg.validate()
    return cfg


def nast_sweep(cfg: SweepConfig) -> None:
    """NAST's text-encoder tracing on a CLIP-style model over phantom claim pairs, 3 data seeds."""
    from interp.models import load
    from interp.nast.cte import trace_seeds, write_trace
    from interp.report.negation import write_cte_report

    adapter = load("clip-organism" if cfg.model == "organism" else cfg.model, device=cfg.device, kind="dual",
                   purpose="--mode nast (it traces a text encoder)")
    seeds = [cfg.seed, cfg.seed + 1, cfg.seed + 2]
    results, pooled, stab, alphas = trace_seeds(adapter, seeds, NAST_IMAGES, limit=cfg.limit,
                                                mode="nast" if cfg.corrupt == "negation" else "noise")
    out = Path(cfg.out)
    write_trace(str(out / "cte.zarr"), adapter, results, pooled, stab, alphas)
    write_cte_report(pooled, stab, alphas, out / "report.html", f"Negation tracing ({pooled.mode}): {adapter.model_id}")
    print(f"{adapter.model_id}: {len(pooled.values)} pairs over seeds {seeds}; per-layer profile rank correlation between seeds "
          f"{stab['mean']:.3f}; alphas {[round(float(a), 3) for a in alphas]}")
    for name in ("cte.zarr", "report.html"):
        print(f"{name}: {out / name}")


def file_hash(path: str) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def sweep(cfg: SweepConfig) -> Path:
    """Run the layer sweep into ``<out>/sweep.zarr``, write ``<out>/report.html`` and the printed figures to
    ``<out>/summary.json``; returns ``out``."""
    from interp.data.catalog import dataset_ref, load_dataset
    from interp.models import load
    from interp.report import write_sweep_report
    from interp.report.sweep import atp_agreement, score_ci
    from interp.store import SampleIndex
    from interp.store.ranks import process_group, rank_device
    from interp.trace.sweep import image_pair, is_lvlm, read_sweep, run_sweep, select_pairs

    out = Path(cfg.out)
    with process_group() as (rank, _):
        adapter = load(cfg.model, device=rank_device(cfg.device))
        if cfg.image:
            pairs = [image_pair(cfg.image, cfg.prompt)]
            ref = {"ref": str(Path(cfg.image).resolve()), "limit": None, "name": Path(cfg.image).name,
                   "hash": file_hash(cfg.image)}

            def samples(items):
                return SampleIndex.from_items(items, ref, SimpleNamespace(paths={-1: ref["ref"]}))
        else:
            data = load_dataset(cfg.data)

            def samples(items):
                return SampleIndex.from_data(data, items, dataset_ref(cfg.data))

            pairs = select_pairs(data, cfg, is_lvlm(adapter))
        run_sweep(adapter, pairs, cfg, samples, str(out / "sweep.zarr"))
        if rank > 0:
            return out
    results = read_sweep(str(out / "sweep.zarr"))
    tmp = out / ".report.html.new"  # written aside, then moved into place: never a half-written report
    write_sweep_report(results, tmp, title=f"Layer sweep: {cfg.mode} / {cfg.corrupt}")
    tmp.replace(out / "report.html")
    summary = {}
    for name, ds in results.items():
        print(f"{name}: {ds.sizes['sample']} samples x {ds.sizes['layer']} layers x {ds.sizes['position']} positions "
              f"in {ds.attrs['elapsed_s']} s; peak mean effect {float(ds.effect.mean('sample').max()):.3f}")
        score = score_ci(ds)
        summary[name] = {"samples": ds.sizes["sample"], "elapsed_s": ds.attrs["elapsed_s"],
                         "peak_mean_effect": float(ds.effect.mean("sample").max()), "ground_truth": score}
        if "atp_effect" in ds and cfg.method == "both":
            a = atp_agreement(ds)
            summary[name] |= {"elapsed_atp_s": ds.attrs["elapsed_atp_s"], "atp_agreement": a}
            print(f"  AtP* in {ds.attrs['elapsed_atp_s']} s; against exact: Spearman {a['spearman']:.3f} (signed), "
                  f"{a['spearman_strength']:.3f} (strength); top-{a['k']} recall {a['top_k_recall']:.2f}"
                  + (f"; DISAGREES: {'; '.join(a['flags'])}" if a["flags"] else ""))
        if any(r is not None for r in score["ratio"]):
            cells = [f"layer {layer} " + ("n/a" if r is None else f"{r:.1f}x" + ("" if lo is None else f" [{lo:.1f}, {hi:.1f}]"))
                     for layer, r, lo, hi in zip(score["layer"], score["ratio"], score["low"], score["high"])]
            print(f"  ground truth: share of positive effect on the finding's patches over the share expected by "
                  f"area (1x = chance; 95% bootstrap CI, n={score['n_samples']}): {'; '.join(cells)}")
    (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    print(f"sweep:   {out / 'sweep.zarr'}")
    print(f"report:  {out / 'report.html'}")
    print(f"figures: {out / 'summary.json'}")
    return out


def execute(cfg: SweepConfig) -> None:
    """The sweep of ``cfg.mode``."""
    if cfg.mode == "nast":
        nast_sweep(cfg)
    else:
        sweep(cfg)


def main(argv: Sequence[str] | None = None) -> int:
    return run(parse_args, execute, argv, resumable=lambda cfg: cfg.mode != "nast")


if __name__ == "__main__":
    sys.exit(main())
