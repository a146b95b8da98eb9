"""Per-sample cost of every attribution method as a multiple of one forward pass, in one run.

One torch thread; methods interleaved (each repeat runs every method once, in turn, on the same samples),
median over repeats of the mean time per sample; model FLOPs counted with torch's per-op formulas (``figures.count_flops``) (the
UOT solve of MedFocus runs in NumPy and is not counted: its share shows as time beyond the FLOP ratio).
MedFocus's transport plans are cached after the first repeat, as in any real use (the first repeat's
time, with the solves, is printed too).

    python benchmarks/attribution_cost.py [--samples 4] [--repeats 3] [--mode direct] [--json reports/bench/attribution_cost.json]
"""

from __future__ import annotations

import argparse
import tempfile
import time

import numpy as np
import torch
from figures import count_flops, write_figures
from interp.attribution import METHODS, method
from interp.attribution.base import Sample, Scorer
from interp.data.vqa import build_vqa
from interp.models.registry import load


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--samples", type=int, default=4)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--mode", default="direct", choices=("direct", "cot"))
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--json", default="reports/bench/attribution_cost.json")
    args = p.parse_args()
    torch.set_num_threads(1)
    adapter = load("organism")
    ds = build_vqa(40, 77, "test", kinds=["presence"], modes=[args.mode])
    items = [it for it in ds.items if it.answer == "yes"][: args.samples]
    samples = [Sample(ds.image(it.image), it.prompt, it.spans, it.id) for it in items]
    responses = [it.target for it in items]
    names = args.methods.split(",")
    with tempfile.TemporaryDirectory() as cache:
        methods = {n: method(n, adapter, **({"cache_dir": cache} if n.startswith("medfocus") else {})) for n in names}

        def forward() -> None:
            for s, r in zip(samples, responses):
                with torch.no_grad():
                    Scorer(adapter, s, r).run()

        jobs = {"forward": forward, **{n: (lambda m=m: [m.attribute(s, r) for s, r in zip(samples, responses)]) for n, m in methods.items()}}
        times: dict[str, list[float]] = {k: [] for k in jobs}
        for _ in range(args.repeats):
            for k, fn in jobs.items():
                t = time.perf_counter()
                fn()
                times[k].append((time.perf_counter() - t) / len(samples))
        counted = {k: count_flops(fn) / len(samples) for k, fn in jobs.items()}
    base_t, base_f = float(np.median(times["forward"])), counted["forward"]
    rows = {}
    print(f"organism, {len(samples)} samples ({args.mode}), {args.repeats} repeats, 1 thread; "
          f"one forward: {base_t * 1e3:.1f} ms, {base_f / 1e6:.1f} MFLOP (teacher-forced, response scored)")
    print(f"{'method':34s} {'x forward (time)':>17s} {'x forward (FLOPs)':>18s} {'first repeat (s)':>17s}")
    for k in names:
        med = float(np.median(times[k]))
        rows[k] = {"seconds": med, "time_ratio": med / base_t, "flops": counted[k], "flop_ratio": counted[k] / base_f,
                   "first_repeat_seconds": times[k][0]}
        print(f"{k:34s} {med / base_t:17.1f} {counted[k] / base_f:18.1f} {times[k][0]:17.3f}")
    write_figures(args.json, {"benchmark": "attribution_cost", "mode": args.mode, "samples": len(samples),
                              "repeats": args.repeats, "forward_seconds": base_t, "forward_flops": base_f, "methods": rows})


if __name__ == "__main__":
    main()
