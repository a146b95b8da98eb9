"""Peak memory of writing a cache store and of lazily reducing it, as the store grows.

    python benchmarks/cache_memory.py [--sizes 256 1024 4096]

Each measurement runs in a fresh subprocess and reports peak RSS above the RSS after imports
(``resource.getrusage``). Synthetic activations: two sites of [64 positions, 128 d] float32
(64 KiB per sample), chunks of 32 samples. ``lazy mean`` is ``open_cache(..)[site].mean("sample")``;
``eager mean`` (loading the whole array with zarr, then numpy) is the contrast that does grow.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile

import numpy as np

SITES = {"lm.blocks.0.resid_post": (64, 128), "lm.blocks.1.resid_post": (64, 128)}
CHUNK = 32
META = {"model_id": "synthetic", "weight_hash": "0", "adapter": "none", "dataset_id": "synthetic",
        "dataset_hash": "0", "prompt_template": "{prompt}"}


def peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def write(path: str, n: int) -> None:
    from interp.cache import CacheWriter

    w = CacheWriter(path, meta=META, site_shapes=SITES, n_samples=n, seq_len=64, chunk_samples=CHUNK)
    rng = np.random.default_rng(0)
    zeros = np.zeros((CHUNK, 64), np.int8)
    for r in w.pending():
        acts = {s: rng.standard_normal((len(r), *shape), dtype=np.float32) for s, shape in SITES.items()}
        w.write(r.start, acts, zeros[: len(r)], zeros[: len(r)], zeros[: len(r)], zeros[: len(r)])
    w.close()


def lazy_mean(path: str, _n: int) -> None:
    from interp.cache import open_cache

    ds = open_cache(path)
    for site in SITES:
        ds[site].mean("sample").compute()


def eager_mean(path: str, _n: int) -> None:
    import zarr

    for site in SITES:
        zarr.open_array(f"{path}/acts/{site}", mode="r")[:].mean(0)


TASKS = {"write": write, "lazy mean": lazy_mean, "eager mean": eager_mean}


def child(task: str, path: str, n: int) -> None:
    import zarr  # noqa: F401

    import interp.cache  # noqa: F401  (imports count as baseline)

    base = peak_mib()
    TASKS[task](path, n)
    print(json.dumps({"baseline": base, "peak": peak_mib()}))


def measure(task: str, path: str, n: int) -> dict:
    out = subprocess.run([sys.executable, __file__, "--child", task, path, str(n)], check=True,
                         capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=int, nargs="+", default=[256, 1024, 4096])
    p.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        task, path, n = args.child
        return child(task, path, int(n))
    per_sample = sum(np.prod(s) for s in SITES.values()) * 4 / 2**20
    print(f"{'samples':>8} {'data MiB':>9} " + " ".join(f"{t + ' MiB':>15}" for t in TASKS))
    with tempfile.TemporaryDirectory() as tmp:
        for n in args.sizes:
            path = f"{tmp}/bench-{n}.zarr"
            row = [measure(t, path, n) for t in TASKS]
            print(f"{n:>8} {n * per_sample:>9.0f} " + " ".join(f"{r['peak'] - r['baseline']:>15.1f}" for r in row))


if __name__ == "__main__":
    main()
