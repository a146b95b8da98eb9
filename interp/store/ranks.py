"""Several processes writing one store: ranks from ``torchrun`` / ``accelerate launch``, one barrier.

Each rank takes the chunks ``pending()[rank::world]`` of one writer; rank 0 lays the store out before
the others open it and closes it after every rank has written (the barrier between).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch.distributed as dist
from tqdm import tqdm

from interp.store.writer import StoreWriter


def rank_world() -> tuple[int, int]:
    """(rank, world size) from the launcher's environment (1 process: (0, 1))."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


@contextmanager
def process_group() -> Iterator[tuple[int, int]]:
    """Join the launcher's process group (gloo: CPU or GPU) for the duration; yields (rank, world)."""
    rank, world = rank_world()
    owned = world > 1 and not dist.is_initialized()
    if owned:
        dist.init_process_group("gloo")
    try:
        yield rank, world
    finally:
        if owned:
            dist.destroy_process_group()


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def rank_device(device: str) -> str:
    """``cuda`` means this rank's own GPU (``LOCAL_RANK``) when several processes share a machine."""
    local = os.environ.get("LOCAL_RANK")
    return f"cuda:{local}" if device == "cuda" and local is not None and rank_world()[1] > 1 else device


Chunk = tuple[Mapping[str, np.ndarray], Sequence[np.ndarray] | None]  # (arrays, images) of one sample chunk


def write_all(open_writer: Callable[[bool], StoreWriter], chunk: Callable[[range], Chunk], desc: str,
              summary: Callable[[], Mapping[str, Any]] | None = None) -> None:
    """Fill a store from every rank: rank 0 lays it out (``open_writer(True)``) or resumes it, the others
    then open it (``open_writer(False)``), each writes its share of the pending chunks (``chunk(samples)``),
    and rank 0 closes it once all are in. A single process that fails before its first chunk leaves nothing."""
    rank, world = rank_world()
    writer = open_writer(True) if rank == 0 else None
    barrier()
    writer = writer or open_writer(False)
    pending = writer.pending()
    if not pending and rank == 0:
        print(f"{writer.url}: already complete for these settings, nothing to compute (a new --out recomputes)",
              file=sys.stderr)
    mine = pending[rank::world]
    try:
        with tqdm(total=sum(map(len, mine)), desc=desc, unit="sample", file=sys.stderr, disable=rank > 0 or not mine) as bar:
            for r in mine:
                writer.write(r.start, *chunk(r))
                bar.update(len(r))
    except BaseException:
        if world == 1:
            writer.discard()
        raise
    barrier()
    if rank == 0:
        writer.close(summary() if summary else None)
