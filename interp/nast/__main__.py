"""``python -m interp.nast``: NAST's one entry point - negation tracing -> alphas, one training run, or the study.

    python -m interp.nast trace --model clip-organism-biased --out reports/nast
    python -m interp.nast train --model clip-organism-biased --method nast --beta 1 --alphas reports/nast/cte.zarr
    python -m interp.nast study --model clip-organism-biased          # = python experiments/nast_clip.py

Every option and default comes from ``interp/nast/config.py`` (``TraceConfig``, ``NastConfig``,
``StudyConfig``), shared by the three commands; ``python -m interp.trace --mode nast`` traces with the
same ``trace_seeds``. All need a CLIP-style dual encoder. Runs are scored by the organism's own
evaluation (``python -m interp.models.train_clip --eval-only``: same function, same default set).
Bad input: one line on stderr, exit code 2, nothing written (``--debug``: tracebacks).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from interp.cli import Parser, out_dir, out_file, positive_int, run
from interp.nast.config import NastConfig, StudyConfig, TraceConfig, add_options, settings


def parser() -> Parser:
    p = Parser("python -m interp.nast", __doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("trace", help="CTE per layer x role on phantom claim pairs and alphas; writes <out>/cte.zarr")
    add_options(t, TraceConfig)
    r = sub.add_parser("train", help="one training run; prints its metrics")
    add_options(r, NastConfig)
    r.add_argument("--alphas", default=None, help="the cte.zarr store `trace` wrote, or a .json list of numbers "
                                                  "(one per text block); needed by nast / shuffled")
    s = sub.add_parser("study", help="base vs uniform LoRA vs NAST (beta grid, both alpha rules) vs shuffled/random "
                                     "alphas over seeds; writes <out>/study.json, study.html, cte.zarr")
    add_options(s, StudyConfig)
    add_options(s, TraceConfig, skip=("model", "seeds", "alpha_rule"))
    add_options(s, NastConfig, skip=("method", "beta", "seed"))
    for q, default, kind in ((t, "reports/nast", out_dir), (r, None, out_file), (s, "reports/nast", out_dir)):
        q.add_argument("--out", type=kind, default=default,
                       help="output folder" if kind is out_dir else "write the run's JSON here")
        q.add_argument("--threads", type=positive_int, default=1, help="torch threads (1: fastest on shared cores)")
    return p


def trace(args: argparse.Namespace) -> None:
    import numpy as np

    from interp.models import load
    from interp.nast.cte import trace_seeds, write_trace

    cfg = settings(TraceConfig, args)
    adapter = load(cfg.model, kind="dual", purpose="nast trace")
    results, pooled, stab, alphas = trace_seeds(adapter, cfg.seeds, cfg.n_images, aggregate=cfg.aggregate,
                                                min_margin=cfg.min_margin, limit=cfg.limit, alpha_rule=cfg.alpha_rule)
    store = write_trace(str(Path(args.out) / "cte.zarr"), adapter, results, pooled, stab, alphas, cfg.aggregate,
                        cfg.alpha_rule)
    print(f"profile ({cfg.aggregate}): {np.round(pooled.profile(cfg.aggregate), 3).tolist()}")
    print(f"alphas ({cfg.alpha_rule} rule): {np.round(alphas, 3).tolist()}  seed rank correlation: {stab['mean']:.3f}")
    print(f"wrote {store}")


def train(args: argparse.Namespace) -> None:
    from interp.models import load
    from interp.nast.cte import load_alphas
    from interp.nast.train import train_run

    cfg = settings(NastConfig, args)
    cfg.validate()
    adapter = load(cfg.model, kind="dual", purpose="nast train (LoRA on a text encoder)")
    alphas = load_alphas(args.alphas, adapter.n_layers("text")) if args.alphas else None
    res = train_run(adapter, cfg, alphas, progress=True)
    print(json.dumps(res.metrics, indent=1))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(res.to_dict(), indent=1))


def study(args: argparse.Namespace, command: str) -> None:
    from interp.nast.study import run_study

    cfg = settings(NastConfig, args)
    cfg.validate()
    run_study(settings(StudyConfig, args), settings(TraceConfig, args), cfg, args.out, command)


def work(args: argparse.Namespace, command: str) -> None:
    import torch

    torch.set_num_threads(args.threads)
    if args.cmd == "study":
        study(args, command)
    else:
        (trace if args.cmd == "trace" else train)(args)


def main(argv: Sequence[str] | None = None) -> int:
    command = " ".join(["python -m interp.nast", *(sys.argv[1:] if argv is None else argv)])
    return run(parser().parse_args, lambda args: work(args, command), argv)


if __name__ == "__main__":
    raise SystemExit(main())
