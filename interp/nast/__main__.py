"""``python -m interp.nast``: negation tracing -> alphas, and one NAST training run.

    python -m interp.nast trace --model clip-organism --n-images 48 --seeds 0,1,2 --out reports/nast
    python -m interp.nast train --method nast --beta 1 --alphas reports/nast/cte.zarr

The full comparison (base, uniform, NAST per beta, shuffled/random controls, >= 3 seeds) is
``python experiments/nast_clip.py``.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from dataclasses import fields
from pathlib import Path

import numpy as np

from interp.errors import InterpError


def main(argv: Sequence[str] | None = None) -> int:
    from interp.models import load
    from interp.nast.cte import load_alphas, trace_seeds, write_trace
    from interp.nast.train import NastConfig

    p = argparse.ArgumentParser(prog="python -m interp.nast", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("trace", help="CTE per layer x role on phantom claim pairs and alphas; writes <out>/cte.zarr")
    t.add_argument("--model", default="clip-organism")
    t.add_argument("--n-images", type=int, default=48)
    t.add_argument("--seeds", default="0,1,2")
    t.add_argument("--limit", type=int, default=None, help="pairs per seed")
    t.add_argument("--aggregate", default="max", choices=("max", "negator", "mean"))
    t.add_argument("--min-margin", type=float, default=0.1)
    t.add_argument("--out", default="reports/nast")
    r = sub.add_parser("train", help="one training run; prints its metrics")
    for f in fields(NastConfig):
        flag = "--" + f.name.replace("_", "-")
        if f.type in ("bool", bool):
            r.add_argument(flag, action="store_true", default=f.default)
        else:
            r.add_argument(flag, type=type(f.default), default=f.default)
    r.add_argument("--alphas", default=None, help="the cte.zarr store `trace` wrote, or a .json list of numbers "
                                                  "(one per text block); needed by nast / shuffled")
    r.add_argument("--out", default=None, help="write the run's JSON here")
    args = p.parse_args(argv)
    try:
        if args.cmd == "trace":
            adapter = load(args.model)
            seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
            results, pooled, stab, alphas = trace_seeds(adapter, seeds, args.n_images, aggregate=args.aggregate,
                                                        min_margin=args.min_margin, limit=args.limit)
            store = write_trace(str(Path(args.out) / "cte.zarr"), adapter, results, pooled, stab, alphas, args.aggregate)
            print(f"profile ({args.aggregate}): {np.round(pooled.profile(args.aggregate), 3).tolist()}")
            print(f"alphas: {np.round(alphas, 3).tolist()}  seed rank correlation: {stab['mean']:.3f}")
            print(f"wrote {store}")
        else:
            from interp.nast.train import train_run

            cfg = NastConfig(**{f.name: getattr(args, f.name) for f in fields(NastConfig)})
            adapter = load(cfg.model)
            alphas = load_alphas(args.alphas, adapter.n_layers("text")) if args.alphas else None
            res = train_run(adapter, cfg, alphas, progress=True)
            print(json.dumps(res.metrics, indent=1))
            if args.out:
                Path(args.out).parent.mkdir(parents=True, exist_ok=True)
                Path(args.out).write_text(json.dumps(res.to_dict(), indent=1))
    except InterpError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
