"""Two CPU processes (torchrun) write one store: byte-identical to one process, for the cache and the sweep."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}  # the same kernels in both runs


def run(*args: str, ranks: int = 1) -> None:
    launcher = ["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={ranks}"] if ranks > 1 else []
    done = subprocess.run([sys.executable, *launcher, "-m", *args], env=ENV, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]


def files(path: Path, skip: tuple[str, ...] = ()) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*"))
            if p.is_file() and str(p.relative_to(path)) not in skip}


def test_cache_two_processes_byte_identical(tmp_path: Path) -> None:
    args = ("interp.cache", "--limit", "6", "--chunk-samples", "2", "--batch-size", "2")
    run(*args, "--out", str(tmp_path / "one.zarr"))
    run(*args, "--out", str(tmp_path / "two.zarr"), ranks=2)
    one, two = files(tmp_path / "one.zarr"), files(tmp_path / "two.zarr")
    assert len(one) > 50 and one == two


def test_sweep_two_processes_byte_identical(tmp_path: Path) -> None:
    args = ("interp.trace", "--layer-sweep", "--limit", "3", "--copies", "2", "--min-gap", "0")
    run(*args, "--out", str(tmp_path / "one"))
    run(*args, "--out", str(tmp_path / "two"), ranks=2)
    skip = ("sweep/zarr.json",)  # its summary holds wall-clock times
    one, two = files(tmp_path / "one" / "sweep.zarr", skip), files(tmp_path / "two" / "sweep.zarr", skip)
    assert len(one) > 50 and one == two
    assert (tmp_path / "two" / "report.html").stat().st_size > 1e5
