"""Attribute a model's own responses over a data set into the ``attribution`` group of a results store.

    python -m interp.attribution --data phantom-test:16 --methods saliency,occlusion,medfocus --out STORE
    torchrun --nproc-per-node 2 -m interp.attribution ...   # ranks write disjoint chunks of one store

Each sample's greedy response is explained by every method (``interp.attribution.store`` lists the
arrays). ``--out`` may be a store another analysis wrote for the same samples (e.g. the cache's store
of the same ``--data``): the group is added beside it, with the store's chunking. Re-running the same
command resumes from the last whole chunk; a store holding an attribution made differently is refused
unless ``--overwrite`` (which re-creates the whole store, dropping its other analyses). Bad input
prints one line to stderr and exits 2.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from interp.cli import Parser, out_store, positive_int, run, torch_device

CHUNK = 8  # samples per stored chunk of a new store (an existing one keeps its own)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = Parser("python -m interp.attribution", __doc__)
    p.add_argument("--model", default="organism", help="model id or checkpoint folder (default: organism)")
    p.add_argument("--data", default="phantom-test", help="data set, as for python -m interp.cache (default: phantom-test)")
    p.add_argument("--methods", required=True, help="comma-separated attribution methods (interp.attribution.METHODS)")
    p.add_argument("--modes", default="direct", help="output modes of the items attributed: direct, cot (step-by-step) "
                                                     "(default: direct)")
    p.add_argument("--out", type=out_store, required=True, help="store path or fsspec URL")
    p.add_argument("--limit", type=positive_int, help="only the first N items of the data set")
    p.add_argument("--chunk-samples", type=positive_int,
                   help=f"samples per stored chunk (default: an existing store's, else {CHUNK})")
    p.add_argument("--device", type=torch_device, default="cpu", help="torch device (default: cpu)")
    p.add_argument("--overwrite", action="store_true", help="re-create the store (else one made differently is refused)")
    return p.parse_args(argv)


def names(text: str, what: str) -> list[str]:
    out = [n.strip() for n in text.split(",") if n.strip()]
    if not out:
        raise argparse.ArgumentTypeError(f"{what}: give at least one")
    return out


def store_chunk(url: str) -> int | None:
    """The chunking of the store at ``url`` (None: no store there yet)."""
    from interp.store.layout import check_layout, occupied, root_attrs

    return check_layout(url, root_attrs(url, None))["chunk_samples"] if occupied(url, None)[1] else None


def attribute(args: argparse.Namespace) -> str:
    from interp.attribution import check_names
    from interp.attribution.store import write_attributions
    from interp.data.catalog import dataset_ref, load_dataset
    from interp.errors import InterpError
    from interp.models import load
    from interp.store import SampleIndex
    from interp.store.ranks import process_group, rank_device

    methods, modes = names(args.methods, "--methods"), names(args.modes, "--modes")
    check_names(methods)
    if set(modes) - {"direct", "cot"}:
        raise InterpError(f"--modes: choose direct and/or cot, got {args.modes!r}")
    data = load_dataset(args.data, args.limit)
    items = [it for it in data.items if it.mode in modes]
    if not items:
        raise InterpError(f"{args.data} has no {' or '.join(modes)} items")
    samples = SampleIndex.from_data(data, items, dataset_ref(args.data), args.limit)
    chunk = args.chunk_samples or (None if args.overwrite else store_chunk(args.out)) or CHUNK
    with process_group():
        adapter = load(args.model, device=rank_device(args.device))
        config = {k: v for k, v in vars(args).items() if k not in ("overwrite", "device", "out", "chunk_samples")}
        return write_attributions(adapter, methods, data, items, samples, args.out, config=config, chunk_samples=chunk,
                                  mode="overwrite" if args.overwrite else "resume")


def report(args: argparse.Namespace) -> None:
    from interp.store.ranks import rank_world

    out = attribute(args)
    if rank_world()[0] == 0:
        print(out)


def main(argv: Sequence[str] | None = None) -> int:
    return run(parse_args, report, argv, resumable=lambda _: True)


if __name__ == "__main__":
    sys.exit(main())
