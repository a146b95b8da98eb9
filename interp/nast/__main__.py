"""``python -m interp.nast``: negation tracing -> alphas, and one NAST training run.

    python -m interp.nast trace --model clip-organism --n-images 48 --seeds 0,1,2 --out reports/nast
    python -m interp.nast train --method nast --beta 1 --alphas reports/nast/cte.zarr

Both need a CLIP-style dual encoder. The full comparison (base, uniform, NAST per beta,
shuffled/random controls, >= 3 seeds) is ``python experiments/nast_clip.py``.
Bad input: one line on stderr, exit code 2, nothing written (``--debug``: tracebacks).
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from dataclasses import fields
from pathlib import Path

from interp.cli import (Parser, fraction, int_list, non_negative_float, non_negative_int, out_dir, out_file, positive_float,
                        positive_int, run)
from interp.nast.config import AGGREGATES, METHODS, SCALE_MODES, NastConfig

TYPES = {"beta": non_negative_float, "steps": positive_int, "batch_size": positive_int, "lr": positive_float,
         "momentum": fraction, "rank": positive_int, "lora_alpha": positive_float, "claim_weight": non_negative_float,
         "n_train": positive_int, "n_eval": positive_int, "data_seed": non_negative_int, "seed": non_negative_int,
         "image_size": positive_int}
CHOICES = {"method": METHODS, "scale_mode": SCALE_MODES}


def parser() -> Parser:
    p = Parser("python -m interp.nast", __doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("trace", help="CTE per layer x role on phantom claim pairs and alphas; writes <out>/cte.zarr")
    t.add_argument("--model", default="clip-organism")
    t.add_argument("--n-images", type=positive_int, default=48)
    t.add_argument("--seeds", type=int_list, default=[0, 1, 2], help="comma-separated data seeds (default: 0,1,2)")
    t.add_argument("--limit", type=positive_int, default=None, help="pairs per seed")
    t.add_argument("--aggregate", default="max", choices=AGGREGATES)
    t.add_argument("--min-margin", type=non_negative_float, default=0.1)
    t.add_argument("--out", type=out_dir, default="reports/nast")
    r = sub.add_parser("train", help="one training run; prints its metrics")
    for f in fields(NastConfig):
        flag = "--" + f.name.replace("_", "-")
        if f.type in ("bool", bool):
            r.add_argument(flag, action="store_true", default=f.default)
        else:
            r.add_argument(flag, type=TYPES.get(f.name, type(f.default)), default=f.default, choices=CHOICES.get(f.name))
    r.add_argument("--alphas", default=None, help="the cte.zarr store `trace` wrote, or a .json list of numbers "
                                                  "(one per text block); needed by nast / shuffled")
    r.add_argument("--out", type=out_file, default=None, help="write the run's JSON here")
    return p


def trace(args: argparse.Namespace) -> None:
    import numpy as np

    from interp.models import load
    from interp.nast.cte import trace_seeds, write_trace

    adapter = load(args.model, kind="dual", purpose="nast trace")
    results, pooled, stab, alphas = trace_seeds(adapter, args.seeds, args.n_images, aggregate=args.aggregate,
                                                min_margin=args.min_margin, limit=args.limit)
    store = write_trace(str(Path(args.out) / "cte.zarr"), adapter, results, pooled, stab, alphas, args.aggregate)
    print(f"profile ({args.aggregate}): {np.round(pooled.profile(args.aggregate), 3).tolist()}")
    print(f"alphas: {np.round(alphas, 3).tolist()}  seed rank correlation: {stab['mean']:.3f}")
    print(f"wrote {store}")


def train(args: argparse.Namespace) -> None:
    from interp.models import load
    from interp.nast.cte import load_alphas
    from interp.nast.train import train_run

    cfg = NastConfig(**{f.name: getattr(args, f.name) for f in fields(NastConfig)})
    cfg.validate()
    adapter = load(cfg.model, kind="dual", purpose="nast train (LoRA on a text encoder)")
    alphas = load_alphas(args.alphas, adapter.n_layers("text")) if args.alphas else None
    res = train_run(adapter, cfg, alphas, progress=True)
    print(json.dumps(res.metrics, indent=1))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(res.to_dict(), indent=1))


def main(argv: Sequence[str] | None = None) -> int:
    return run(parser().parse_args, lambda args: (trace if args.cmd == "trace" else train)(args), argv)


if __name__ == "__main__":
    raise SystemExit(main())
