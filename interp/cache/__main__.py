"""Cache activations of a model over a data set into the ``acts`` group of a results store (Zarr v3).

    python -m interp.cache --model organism --data phantom-test --sites 'lm.blocks.*.resid_post'
    torchrun --nproc-per-node 2 -m interp.cache ...     # ranks write disjoint chunks of one store

Re-running the same command resumes an interrupted store from its last whole chunk; a store
made by another model, data set or settings is refused unless ``--overwrite`` (which writes a
new store beside it and swaps it in when complete). ``--out`` takes a path or an fsspec URL
(``memory://``, ``s3://bucket/x.zarr`` with s3fs installed...). Read it with
``interp.store.open_store``. Bad input prints one line to stderr and exits 2, leaving nothing
half-written.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Sequence

import numpy as np

from interp.cache.acts import DTYPES, acts_layout, sequence_rows
from interp.cli import Parser, out_store, positive_int, run, torch_device
from interp.data.vqa import VQAItem
from interp.errors import InterpError
from interp.sites import parse
from interp.store import SampleIndex, StoreWriter

PROMPT_TEMPLATE = "{prompt}"  # prompts are used verbatim
GRID_TOWERS = ("vision", "projector")
SEQ_TOWERS = ("lm", "text")  # sites over the token sequence, padded to the longest


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    from interp.data.catalog import BUILTIN

    p = Parser("python -m interp.cache", __doc__)
    p.add_argument("--model", default="organism", help="model id or checkpoint folder (default: organism)")
    p.add_argument("--data", default="phantom-test",
                   help=f"one of {', '.join(BUILTIN)}, a saved VQA data set or negation benchmark (.json, MedNega "
                        ".csv), or real images: a folder with "
                        "prompts.csv/.jsonl (columns image, prompt[, answer]) or such a table (default: phantom-test)")
    p.add_argument("--sites", default="", help="comma-separated sites or globs (default: every tower's block outputs "
                                                "and projector.out where the model has one)")
    p.add_argument("--out", type=out_store, help="store path or fsspec URL (default: caches/<model>-<data>.zarr)")
    p.add_argument("--batch-size", type=positive_int, default=16, help="samples per forward pass (default: 16)")
    p.add_argument("--chunk-samples", type=positive_int, default=32, help="samples per stored chunk (default: 32)")
    p.add_argument("--limit", type=positive_int, help="cache only the first N samples")
    p.add_argument("--dtype", default="float32", choices=DTYPES, help="stored activation dtype (default: float32)")
    p.add_argument("--device", type=torch_device, default="cpu", help="torch device: cpu, cuda, cuda:<index>, mps "
                                                                "(default: cpu)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing store (else one made differently is refused)")
    return p.parse_args(argv)


def default_sites(adapter) -> str:
    """Every tower's block outputs (the vision tower's where it keeps one sequence per sample) and projector.out."""
    towers = [t for t in adapter.towers if t != "vision" or adapter.vision_batched]
    projector = "projector.out" in adapter.hooks and adapter.vision_batched
    return ",".join([f"{t}.blocks.*.resid_post" for t in towers] + (["projector.out"] if projector else []))


def sequence_length(adapter, data, items: Sequence[VQAItem], batch_size: int) -> int:
    """Longest encoded sequence over ``items``: the processor only (no model), with the items' own
    images (each loaded once per batch), since a family may give an image as many tokens as its size asks for."""
    longest = 0
    for i in range(0, len(items), batch_size):
        chunk = items[i:i + batch_size]
        images = {k: data.image(k) for k in dict.fromkeys(it.image for it in chunk)}
        longest = max(longest, adapter.encode([images[it.image] for it in chunk],
                                              [it.prompt for it in chunk]).input_ids.shape[1])
    return longest


def site_grids(adapter, shapes: dict[str, tuple[int, int]]) -> dict[str, tuple[int, int, bool]]:
    """(rows, cols, has_cls) of the sites laid out on the vision tower's patch grid."""
    if "vision" not in adapter.towers or not adapter.vision_batched:
        return {}
    vp = adapter.vision_positions()[0]
    cells = [(r, c) for k, r, c in zip(vp.kinds, vp.rows, vp.cols) if k == "image"]
    rows, cols = 1 + max(r for r, _ in cells), 1 + max(c for _, c in cells)
    return {s: (rows, cols, n == rows * cols + 1) for s, (n, _) in shapes.items()
            if parse(s).tower in GRID_TOWERS and n in (rows * cols, rows * cols + 1)}


def run_chunk(adapter, data, items: Sequence[VQAItem], sites: list[str], seq_sites: set[str], seq_len: int,
              batch_size: int, span_names: list[str], device: str) -> tuple[dict, list[np.ndarray]]:
    """Arrays of the ``acts`` group for ``items`` (one chunk), and their images (for the thumbnails)."""
    images = {i: data.image(i) for i in dict.fromkeys(it.image for it in items)}
    parts = []
    for b0 in range(0, len(items), batch_size):
        batch_items = items[b0:b0 + batch_size]
        batch = adapter.encode([images[it.image] for it in batch_items], [it.prompt for it in batch_items],
                               [it.spans for it in batch_items]).to(device)
        _, acts = adapter.run(batch, read=sites)
        parts.append(sequence_rows(batch, {s: a.float().cpu().numpy() for s, a in acts.items()}, seq_sites,
                                   seq_len, span_names))
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}, [images[it.image] for it in items]


def cache(args: argparse.Namespace) -> str:
    """Create or resume the store (this rank's chunks of it); returns its URL."""
    from interp.data.catalog import dataset_ref, load_dataset
    from interp.models import load
    from interp.store.ranks import process_group, rank_device, write_all

    out = args.out or out_store(f"caches/{Path(args.model).name}-{Path(args.data).stem}.zarr")
    data = load_dataset(args.data, args.limit)
    with process_group():
        device = rank_device(args.device)
        adapter = load(args.model, device=device)
        sites = adapter.expand_sites(args.sites or default_sites(adapter))
        packed = [s for s in sites if parse(s).tower in GRID_TOWERS and not adapter.vision_batched]
        if packed:
            raise InterpError(f"cannot cache {packed[0]}: {adapter.name}'s vision tower packs or tiles images, so its "
                              "sites are not one sequence per sample; cache projector.out or lm sites")
        seq_len = sequence_length(adapter, data, data.items, args.batch_size)
        shapes = {s: adapter.site_shape(s, seq_len) for s in sites}
        for s, shape in shapes.items():
            if len(shape) != 2:
                raise InterpError(f"site {s} has per-sample shape {shape}; the cache stores [position, d] sites only")
        span_names = ["image", *sorted({k for it in data.items for k in it.spans} - {"image"})]
        fields, statics = acts_layout(shapes, site_grids(adapter, shapes), seq_len, args.dtype, span_names)
        meta = {"model_id": adapter.model_id, "weight_hash": adapter.weight_hash, "adapter": adapter.name,
                "sites": sites, "dtype": args.dtype, "seq_len": seq_len, "batch_size": args.batch_size,
                "prompt_template": PROMPT_TEMPLATE,
                "config": {k: v for k, v in vars(args).items() if k not in ("overwrite", "device", "out")}}

        def open_writer(create: bool) -> StoreWriter:
            return StoreWriter(out, "acts", samples=SampleIndex.from_data(data, data.items, dataset_ref(args.data),
                                                                           args.limit),
                               fields=fields, statics=statics, meta=meta, chunk_samples=args.chunk_samples,
                               mode="overwrite" if args.overwrite else "resume", create=create)

        seq_sites = {s for s in sites if parse(s).tower in SEQ_TOWERS}
        write_all(open_writer, lambda r: run_chunk(adapter, data, data.items[r.start:r.stop], sites, seq_sites,
                                                   seq_len, args.batch_size, span_names, device), f"caching {out}")
    return out


def main(argv: Sequence[str] | None = None) -> int:
    return run(parse_args, report, argv, resumable=lambda _: True)


def report(args: argparse.Namespace) -> None:
    """Cache, then print the store's URL (rank 0)."""
    from interp.store.ranks import rank_world

    out = cache(args)
    if rank_world()[0] == 0:
        print(out)


if __name__ == "__main__":
    sys.exit(main())
