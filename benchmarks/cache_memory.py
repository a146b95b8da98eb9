"""Peak memory of writing a results store, of reducing it lazily, and of the cache CLI, as n grows.

    python benchmarks/cache_memory.py [--sizes 1000 3000 10000] [--cli-sizes 1000 10000]
                                      [--cli-sites lm.blocks.0.resid_post] [--json PATH]

Every measurement runs once, in a fresh subprocess (one torch thread), sizes in order and the
methods interleaved per size. Synthetic rows (``--sizes``): two sites of [64 positions, 128 d]
float32 (64 KiB per sample), chunks of 32, peak RSS above the RSS after imports
(``resource.getrusage``):

* ``write``: ``StoreWriter`` over a ``SampleIndex`` of n samples, chunk by chunk, with the ``acts``
  coordinates and a 64x64 image per sample (the thumbnails);
* ``lazy mean``: ``open_store(path)["acts"][site].mean("sample")`` of both sites;
* ``eager mean``: the contrast that grows with n (each whole array read with zarr, then numpy).

CLI rows (``--cli-sizes``): ``python -m interp.cache --model organism --data <phantom VQA json of
n items> --sites ...`` end to end (``build_vqa(.., seed=0, split="test")``, items cut to n), its peak
RSS from ``os.wait4`` of that child, also above a baseline child that imports the CLI and loads
the model. Figures go to stdout and to ``--json`` (default ``reports/benchmarks/cache_memory.json``).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
from figures import write_figures

SITES = {"lm.blocks.0.resid_post": (64, 128), "lm.blocks.1.resid_post": (64, 128)}
SEQ_LEN, CHUNK, IMAGE = 64, 32, 64
CLI_ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
BASELINE = ("import torch; torch.set_num_threads(1); import interp.cache.__main__; from interp.models import load; "
            "load('organism'); import resource; print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)")


def peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def write(path: str, n: int) -> None:
    from interp.cache import KIND_CODES, acts_layout
    from interp.store import SampleIndex, StoreWriter

    fields, statics = acts_layout(SITES, {}, SEQ_LEN, "float32", ["image"])
    index = SampleIndex([f"s{i}" for i in range(n)], {"prompt": ["is there a lesion?"] * n}, list(range(n)))
    w = StoreWriter(path, "acts", samples=index, fields=fields, statics=statics, meta={"model_id": "synthetic"},
                    chunk_samples=CHUNK)
    rng = np.random.default_rng(0)
    for r in w.pending():
        b = len(r)
        arrays = {k: np.full((b, *f.shape), f.fill, object if f.dtype == "str" else f.dtype)
                  for k, f in fields.items() if k not in SITES}
        arrays["position_kind"][:] = KIND_CODES["text"]
        arrays["valid"][:] = True
        arrays |= {s: rng.standard_normal((b, *shape), dtype=np.float32) for s, shape in SITES.items()}
        w.write(r.start, arrays, list(rng.random((b, IMAGE, IMAGE), dtype=np.float32)))
    w.close()


def lazy_mean(path: str, _n: int) -> None:
    from interp.store import open_store

    acts = open_store(path)["acts"]
    for site in SITES:
        acts[site].mean("sample").compute()


def eager_mean(path: str, _n: int) -> None:
    import zarr

    for site in SITES:
        zarr.open_array(f"{path}/acts/{site}", mode="r")[:].mean(0)


TASKS = {"write": write, "lazy mean": lazy_mean, "eager mean": eager_mean}


def child(task: str, path: str, n: int) -> None:
    import dask.array  # noqa: F401  (imports count as baseline)
    import zarr  # noqa: F401

    import interp.cache  # noqa: F401
    import interp.store  # noqa: F401

    base = peak_mib()
    TASKS[task](path, n)
    print(json.dumps({"baseline": base, "peak": peak_mib()}))


def measure(task: str, path: str, n: int) -> float:
    """MiB of peak RSS above the post-import baseline of one fresh child running ``task``."""
    out = subprocess.run([sys.executable, __file__, "--child", task, path, str(n)], check=True,
                         capture_output=True, text=True, env=CLI_ENV)
    r = json.loads(out.stdout.strip().splitlines()[-1])
    return r["peak"] - r["baseline"]


def phantom_vqa(n: int, path: Path) -> str:
    """A saved phantom VQA data set of exactly ``n`` items (as many images as that takes)."""
    from interp.data.vqa import build_vqa

    per_image = len(build_vqa(8, seed=0, split="test").items) / 8
    n_images = math.ceil(n / per_image)
    while len((data := build_vqa(n_images, seed=0, split="test")).items) < n:
        n_images += 1
    replace(data, items=data.items[:n]).save(path)
    return str(path)


def run_cli(argv: list[str], log: Path) -> tuple[float, float]:
    """(peak RSS MiB, wall seconds) of one child process, from its own ``os.wait4`` rusage."""
    t = time.perf_counter()
    with log.open("w") as err:
        pid = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=err, env=CLI_ENV).pid
        _, status, usage = os.wait4(pid, 0)
    if os.waitstatus_to_exitcode(status):
        raise SystemExit(f"{' '.join(argv)} failed:\n{log.read_text()[-2000:]}")
    return usage.ru_maxrss / 1024, time.perf_counter() - t


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=int, nargs="*", default=[1000, 3000, 10000], help="synthetic store sizes")
    p.add_argument("--cli-sizes", type=int, nargs="*", default=[1000, 10000], help="cache CLI sizes (items)")
    p.add_argument("--cli-sites", default="lm.blocks.0.resid_post", help="--sites of the cache CLI")
    p.add_argument("--json", default="reports/benchmarks/cache_memory.json")
    p.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        task, path, n = args.child
        return child(task, path, int(n))
    per_sample = sum(math.prod(s) for s in SITES.values()) * 4 / 2**20
    result: dict = {"benchmark": "cache_memory", "repeats": 1, "unit": "MiB peak RSS",
                    "synthetic": {"sites": {s: list(v) for s, v in SITES.items()}, "dtype": "float32",
                                  "chunk_samples": CHUNK, "baseline": "RSS after imports", "rows": []},
                    "cli": {"model": "organism", "sites": args.cli_sites, "baseline": "RSS after import + load",
                            "rows": []}}
    with tempfile.TemporaryDirectory() as tmp:
        if args.sizes:
            print(f"synthetic store (peak RSS MiB above post-import baseline, 1 run each):\n"
                  f"{'n':>8} {'data MiB':>9} " + " ".join(f"{t:>11}" for t in TASKS))
        for n in args.sizes:
            path = f"{tmp}/bench-{n}.zarr"
            row = {"n": n, "data_mib": n * per_sample} | {t.replace(" ", "_") + "_mib": measure(t, path, n)
                                                           for t in TASKS}
            result["synthetic"]["rows"].append(row)
            print(f"{n:>8} {row['data_mib']:>9.0f} " + " ".join(f"{v:>11.1f}" for v in list(row.values())[2:]))
        if args.cli_sizes:
            base = int(subprocess.run([sys.executable, "-c", BASELINE], check=True, capture_output=True, text=True,
                                      env=CLI_ENV).stdout.split()[-1]) / 1024
            result["cli"]["baseline_mib"] = base
            print(f"\ncache CLI, --sites {args.cli_sites} (peak RSS MiB; baseline import + load {base:.0f} MiB):\n"
                  f"{'n':>8} {'peak':>8} {'above':>8} {'wall s':>8} {'store MiB':>10}")
        for n in args.cli_sizes:
            out = f"{tmp}/cli-{n}.zarr"
            argv = [sys.executable, "-m", "interp.cache", "--model", "organism", "--data",
                    phantom_vqa(n, Path(tmp) / f"vqa-{n}.json"), "--sites", args.cli_sites, "--out", out]
            peak, wall = run_cli(argv, Path(tmp) / f"cli-{n}.log")
            disk = sum(f.stat().st_size for f in Path(out).rglob("*") if f.is_file()) / 2**20
            result["cli"]["rows"].append({"n": n, "peak_mib": peak, "above_baseline_mib": peak - base,
                                          "wall_s": wall, "store_mib": disk})
            print(f"{n:>8} {peak:>8.0f} {peak - base:>8.0f} {wall:>8.1f} {disk:>10.1f}")
    write_figures(args.json, result)


if __name__ == "__main__":
    main()
