"""Causal tracing and activation patching sweeps, from the command line.

    python -m interp.trace                 # layer sweep: embedded organism, phantoms of every finding
    python -m interp.trace --mode trace --corrupt image --noise-scale 3     # ROME's causal tracing
    python -m interp.trace --mode patch --corrupt negation --sites 'lm.blocks.*.resid_post'

Every cell restores the clean run's state at one (layer, position) into a corrupted run. The corruption
decides what the ground-truth score (share of the positive effect on image patches that falls on the
finding's patches, over the share expected by area) can say:

Without --mode: the mode --corrupt belongs to; else trace when --image, --copies, --noise-scale or --seed is
given; else patch.
``--mode patch`` (paired inputs, activation patching):
  normal          (default) the corrupted run sees a normal phantom of another patient (the next image's
                  anatomy rendered with no finding): every finding's answer flips, and the two images differ
                  at every patch, so where the effect lands is not implied by construction.
  counterfactual  the same phantom rendered without the asked finding (interp.evaluate.counterfactual's exact
                  edit): answers flip, but the images differ only on the finding, so at the first vision layer
                  no other patch can restore anything: the score is circular there (implied by construction)
                  and favoured at later layers. Use it to see where the finding's evidence travels, not whether
                  the model looks at the finding.
  negation        the negated statement's states into "there is a ..." (no image score).
``--mode trace`` (ROME: Gaussian noise, ``--copies`` noised copies averaged; ``--noise-scale`` x σ, the
std of the noised embeddings):
  image           noise on every image patch embedding (the vision tower's for vision sweeps, the image
                  tokens entering the LM for LM sweeps). Not circular, but noise need not move every finding's
                  answer at any scale (the kept counts per finding and the calibration note say so).
  thorax          the same noise on the patches covering the patient's thorax only (lung fields, heart and
                  mediastinum of its normal anatomy: one region whatever the finding); the score then counts
                  thorax patches only, so chance is the finding's share of the thorax, not of the image.
  negation_cue, finding, question: noise on that text span (no image score).
  --noise-scale 3 is ROME's; ``auto`` calibrates it per tower for the model and data set (the rule: see
  --noise-scale below). ROME's code takes the noise level as a setting too: what moves one model's answers
  leaves another's alone.
``--mode nast``: NAST's tracing of a CLIP-style text encoder (``--model organism`` means the CLIP organism
here) - the negated text's states patched into the positive text's per layer and token role, CTE =
s_traced / s - written to ``<out>/cte.zarr`` (group ``nast``, with the alphas) and ``report.html``; it takes
--model, --corrupt, --limit, --seed, --device and --out only.

Samples: presence questions with the finding present, kept when the corruption moves the metric by >=
--min-gap on every swept tower, round-robin over findings (up to --limit / findings of each).
Writes ``<out>/sweep.zarr`` (effects [sample, layer, position] per tower), ``<out>/report.html`` and
``<out>/summary.json`` (per tower: samples per finding, the score with its 95% bootstrap CI per layer, pooled
and per finding, the noise scale and its calibration, and whether the corruption makes the score circular);
the terminal prints the same figures.
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
from interp.trace.config import (AUTO, CALIBRATION_SAMPLES, CALIBRATION_SHARE, DUAL_DATA, LVLM_DATA, METHODS, MODES,
                                 NAST_LIMIT, NOISE_GRID, SWEEP_LIMIT, SweepConfig, default_mode)

NAST_IMAGES = 48  # phantoms per data seed in --mode nast

HELP = {
    "model": "model id or checkpoint folder ('organism' = the embedded LVLM organism; with --mode nast the "
             "embedded CLIP organism, clip-organism)",
    "data": "phantom-{train,val,test}, phantom-<split>:<N> (N phantoms, one presence question each, the findings in "
            "turn), mednega-phantom-{train,val,test}, a saved VQA data set or negation benchmark "
            "(.json, MedNega .csv), or real images: a folder with prompts.csv/.jsonl "
            "(columns image, prompt[, answer]) or such a table",
    "image": "trace one image file (PNG/JPEG/DICOM) instead of a data set; needs --prompt",
    "prompt": "the prompt for --image; its answer is the model's own top prediction",
    "sites": "sites to sweep (globs); tower and point come from the names (empty: every sweepable tower's resid_post)",
    "mode": "patch (paired inputs), trace (noise + restore, ROME) or nast (CLIP text-encoder negation tracing)",
    "method": "exact (restored runs), atp (AtP* estimates of every cell from one backward) or both (compared)",
    "corrupt": "; ".join(f"{m}: {', '.join(c)}" for m, c in MODES.items()) + " (first = default; what each does "
               "and whether it makes the ground-truth score circular: see above)",
    "metric": "LVLMs: prob, logprob or logit_diff (answer minus best alternative answer); dual encoders: logit "
              "(empty: prob / logit)",
    "window": "restore this many consecutive layers centred on each layer (ROME's window)",
    "lm_positions": "token (every position) or span (named spans: image, question, finding, ...)",
    "vision_positions": "patch, or block<k> for k x k blocks of patches",
    "copies": "noised copies averaged per restored run (ROME: 10)",
    "noise_scale": f"noise std as a multiple of the noised embeddings' std σ (ROME: 3), or {AUTO}: per tower, the "
                   f"smallest of {', '.join(f'{g:g}' for g in NOISE_GRID)} x σ at which >= "
                   f"{CALIBRATION_SHARE * 100:.0f}%% of "
                   f"each finding's first {CALIBRATION_SAMPLES} correctly answered samples move the metric by >= "
                   "--min-gap (where none does: the one moving the worst finding most, then most on average, with a "
                   "note); written to summary.json and the store",
    "batch_size": "restored runs per forward pass",
    "limit": "samples to sweep, kept round-robin over findings (--mode nast: pairs per data seed)",
    "min_gap": "keep only samples whose corruption moves the metric by at least this (ROME keeps such cases)",
    "seed": "noise seed (--mode nast: the first of 3 data seeds)",
    "device": "torch device: cpu, cuda, cuda:<index>, mps",
    "out": "output folder (sweep.zarr, or cte.zarr in --mode nast, + report.html)",
}
#: defaults shown by --help where the field's own default means "decided by other settings"
SHOWN = {"data": f"{LVLM_DATA} for LVLMs with the image corrupted, else {DUAL_DATA}",
         "mode": "that of --corrupt; else trace with --image, --copies, --noise-scale or --seed; else patch",
         "corrupt": "the mode's first",
         "limit": f"{SWEEP_LIMIT}; --mode nast: {NAST_LIMIT}"}


def noise_scale(value: str) -> float | str:
    """``--noise-scale``: a number > 0, or ``auto``."""
    return AUTO if value == AUTO else positive_float(value)


TYPES = {"window": positive_int, "copies": positive_int, "noise_scale": noise_scale, "batch_size": positive_int,
         "limit": positive_int, "min_gap": non_negative_float, "seed": non_negative_int, "device": torch_device,
         "out": out_dir}
CHOICES = {"mode": tuple(MODES), "method": METHODS, "lm_positions": ("token", "span")}


def parser() -> Parser:
    p = Parser("python -m interp.trace", __doc__)
    p.add_argument("--layer-sweep", action="store_true", default=argparse.SUPPRESS,
                   help="accepted for compatibility: a layer x position sweep is what this command runs")
    for f in fields(SweepConfig):  # defaults left to SweepConfig: parse_args sees what the command line names
        p.add_argument(f"--{f.name.replace('_', '-')}", type=TYPES.get(f.name, type(f.default)),
                       default=argparse.SUPPRESS, choices=CHOICES.get(f.name),
                       help=f"{HELP[f.name]} (default: {SHOWN.get(f.name, f.default)})")
    return p


def parse_args(argv: Sequence[str] | None) -> SweepConfig:
    """The sweep's settings, checked (InterpError on bad or inapplicable options)."""
    args = vars(parser().parse_args(argv))
    args.pop("layer_sweep", None)
    args.setdefault("mode", default_mode(args, args.get("corrupt", "")))
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


def _ci(score: dict, k: int) -> str:
    """Layer ``k``'s ratio of a :func:`interp.report.sweep.score_ci` answer, with its interval."""
    r, lo, hi = (score[key][k] for key in ("ratio", "low", "high"))
    return "n/a" if r is None else f"{r:.1f}x" + ("" if lo is None else f" [{lo:.1f}, {hi:.1f}]")


def say_tower(name: str, ds, s: dict) -> None:
    """One tower's figures in the terminal: size and time, samples per finding, the noise, the ground-truth
    score with its CI per layer (and per finding at the best layer), and what the corruption lets it say."""
    print(f"{name}: {ds.sizes['sample']} samples x {ds.sizes['layer']} layers x {ds.sizes['position']} positions "
          f"in {ds.attrs['elapsed_s']} s; peak mean effect {s['peak_mean_effect']:.3f}")
    print("  samples per finding: " + ", ".join(f"{f or '(none)'} {n}" for f, n in s["per_finding"].items()))
    if s.get("noise_scale"):
        print(f"  noise: {s['noise_scale']:g} x σ" + (" (calibrated)" if s.get("calibration") else "")
              + f", std {ds.attrs['noise_std']:.3g}")
    score = s["ground_truth"]
    if all(r is None for r in score["ratio"]):
        return
    print(f"  ground truth: share of positive effect on the finding's patches over the share expected by area "
          f"(1x = chance, {1 / score['expected']:.1f}x = all on the finding; 95% bootstrap CI, n={score['n_samples']}):")
    for k, layer in enumerate(score["layer"]):
        share = score["share"][k]
        print(f"    layer {layer}: {_ci(score, k)}" + ("" if share is None else f" (share {share:.2f}, "
                                                        f"chance {score['expected']:.2f})"))
    best = max((k for k, r in enumerate(score["ratio"]) if r is not None), key=lambda k: score["ratio"][k])
    by = s["ground_truth_by_finding"]
    print(f"    by finding at layer {score['layer'][best]}: "
          + "; ".join(f"{f} {_ci(by[f], best)} (n={by[f]['n_samples']})" for f in by))
    if s.get("localisation"):
        print(f"  localisation: {s['localisation']}")


def sweep(cfg: SweepConfig) -> Path:
    """Run the layer sweep into ``<out>/sweep.zarr``, write ``<out>/report.html`` and the printed figures to
    ``<out>/summary.json``; returns ``out``."""
    from interp.data.catalog import dataset_ref, load_dataset
    from interp.models import load
    from interp.report import write_sweep_report
    from interp.report.sweep import atp_agreement, sweep_summary
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
            spec = cfg.data_for(is_lvlm(adapter))
            data = load_dataset(spec)

            def samples(items):
                return SampleIndex.from_data(data, items, dataset_ref(spec))

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
        summary[name] = sweep_summary(ds)
        say_tower(name, ds, summary[name])
        if "atp_effect" in ds and cfg.method == "both":
            a = atp_agreement(ds)
            summary[name] |= {"elapsed_atp_s": ds.attrs["elapsed_atp_s"], "atp_agreement": a}
            print(f"  AtP* in {ds.attrs['elapsed_atp_s']} s; against exact: Spearman {a['spearman']:.3f} (signed), "
                  f"{a['spearman_strength']:.3f} (strength); top-{a['k']} recall {a['top_k_recall']:.2f}"
                  + (f"; DISAGREES: {'; '.join(a['flags'])}" if a["flags"] else ""))
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
