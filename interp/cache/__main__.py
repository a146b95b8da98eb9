"""Cache activations of a model over a VQA data set into a Zarr v3 store.

    python -m interp.cache --model organism --data phantom-test --sites 'lm.blocks.*.resid_post'

Re-running the same command resumes an interrupted store from its last whole chunk; a store
made by another model, data set or settings is refused unless ``--overwrite``. Bad input
prints one line to stderr and exits 2, leaving nothing half-written.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Sequence

import numpy as np
from tqdm import tqdm
from transformers.utils import logging as hf_logging

from interp.cache.store import DTYPES, KIND_CODES, CacheWriter, remove_store
from interp.data.catalog import BUILTIN, load_dataset
from interp.data.phantom import CONFOUNDERS, FINDINGS
from interp.data.vqa import VQADataset, VQAItem
from interp.errors import InterpError
from interp.sites import parse

PROMPT_TEMPLATE = "{prompt}"  # prompts are used verbatim
SAMPLE_FIELDS = ("id", "kind", "finding", "mode", "answer", "target")
GRID_TOWERS = ("vision", "projector")
SEQ_TOWERS = ("lm", "text")  # sites over the token sequence, padded to the longest


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m interp.cache", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="organism", help="model id or checkpoint folder (default: organism)")
    p.add_argument("--data", default="phantom-test",
                   help=f"one of {', '.join(BUILTIN)}, a saved VQA data set (.json), or real images: a folder with "
                        "prompts.csv/.jsonl (columns image, prompt[, answer]) or such a table (default: phantom-test)")
    p.add_argument("--sites", default="", help="comma-separated sites or globs (default: every tower's block outputs "
                                                "and projector.out where the model has one)")
    p.add_argument("--out", help="store path or fsspec URL (default: caches/<model>-<data>.zarr)")
    p.add_argument("--batch-size", type=int, default=16, help="samples per forward pass (default: 16)")
    p.add_argument("--chunk-samples", type=int, default=32, help="samples per stored chunk (default: 32)")
    p.add_argument("--limit", type=int, help="cache only the first N samples")
    p.add_argument("--dtype", default="float32", choices=DTYPES, help="stored activation dtype (default: float32)")
    p.add_argument("--device", default="cpu", help="torch device (default: cpu)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing store (else one made differently is refused)")
    return p.parse_args(argv)


def default_sites(adapter) -> str:
    """Every tower's block outputs (the vision tower's where it keeps one sequence per sample) and projector.out."""
    towers = [t for t in adapter.towers if t != "vision" or adapter.vision_batched]
    projector = "projector.out" in adapter.hooks and adapter.vision_batched
    return ",".join([f"{t}.blocks.*.resid_post" for t in towers] + (["projector.out"] if projector else []))


def sequence_length(adapter, data, items: Sequence[VQAItem], batch_size: int) -> int:
    """Longest encoded sequence over ``items``: the processor only (no model), with the items' own
    images, since a family may give an image as many tokens as its size asks for."""
    longest = 0
    for i in range(0, len(items), batch_size):
        chunk = items[i:i + batch_size]
        longest = max(longest, adapter.encode([data.image(it.image) for it in chunk], [it.prompt for it in chunk]).input_ids.shape[1])
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


def run_chunk(adapter, data: VQADataset, r: range, sites: list[str], seq_sites: set[str], seq_len: int,
              batch_size: int, span_names: list[str], device: str) -> dict:
    """Activations and typed positions of samples ``r``; ``seq_sites`` (LM sequence) padded to ``seq_len`` with zeros."""
    images = {i: data.image(i) for i in dict.fromkeys(data.items[j].image for j in r)}
    parts = []
    for b0 in range(r.start, r.stop, batch_size):
        items = data.items[b0:min(b0 + batch_size, r.stop)]
        batch = adapter.encode([images[it.image] for it in items], [it.prompt for it in items],
                               [it.spans for it in items]).to(device)
        _, acts = adapter.run(batch, read=sites)
        parts.append(_pad(batch, {s: a.float().cpu().numpy() for s, a in acts.items()}, seq_sites, seq_len,
                          span_names))
    return {k: ({s: np.concatenate([p[k][s] for p in parts]) for s in sites} if k == "acts"
                else np.concatenate([p[k] for p in parts])) for k in parts[0]}


def _pad(batch, acts: dict[str, np.ndarray], seq_sites: set[str], seq_len: int, span_names: list[str]) -> dict:
    b, width = batch.input_ids.shape
    out = {"tokens": np.full((b, seq_len), -1, np.int32), "position_kind": np.zeros((b, seq_len), np.int8),
           "position_row": np.full((b, seq_len), -1, np.int16), "position_col": np.full((b, seq_len), -1, np.int16),
           "position_span": np.zeros((b, seq_len), np.uint16)}
    for i, p in enumerate(batch.positions):
        out["position_kind"][i, :width] = [KIND_CODES[k] for k in p.kinds]
        out["position_row"][i, :width], out["position_col"][i, :width] = p.rows, p.cols
        for bit, name in enumerate(span_names):
            out["position_span"][i, p.spans.get(name, [])] |= np.uint16(1 << bit)
    real = out["position_kind"][:, :width] != KIND_CODES["pad"]
    out["tokens"][:, :width] = np.where(real, batch.input_ids.cpu().numpy(), -1)
    out["acts"] = {}
    for site, a in acts.items():
        if site in seq_sites:
            a = np.pad(a * real[..., None], ((0, 0), (0, seq_len - width), (0, 0)))
        out["acts"][site] = a
    return out


def cache(args: argparse.Namespace) -> str:
    """Create or resume the store; returns its URL."""
    from interp.models import load

    for flag in ("batch_size", "chunk_samples"):
        if getattr(args, flag) < 1:
            raise InterpError(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(args, flag)}")
    data = load_dataset(args.data, args.limit)
    out = args.out or f"caches/{Path(args.model).name}-{Path(args.data).stem}.zarr"
    adapter = load(args.model, device=args.device)
    sites = adapter.expand_sites(args.sites or default_sites(adapter))
    packed = [s for s in sites if parse(s).tower in GRID_TOWERS and not adapter.vision_batched]
    if packed:
        raise InterpError(f"cannot cache {packed[0]}: {adapter.name}'s vision tower packs or tiles images, so its sites "
                          "are not one sequence per sample; cache projector.out or lm sites")
    seq_len = sequence_length(adapter, data, data.items, args.batch_size)
    shapes = {s: adapter.site_shape(s, seq_len) for s in sites}
    for s, shape in shapes.items():
        if len(shape) != 2:
            raise InterpError(f"site {s} has per-sample shape {shape}; the cache stores [position, d] sites only")
    grids = site_grids(adapter, shapes)
    span_names = ["image", *sorted({k for it in data.items for k in it.spans} - {"image"})]
    specs = [data.specs[it.image] for it in data.items] if data.specs else []
    writer = CacheWriter(
        out, meta={"model_id": adapter.model_id, "weight_hash": adapter.weight_hash, "adapter": adapter.name,
                   "dataset_id": data.name, "dataset_hash": data.hash, "prompt_template": PROMPT_TEMPLATE},
        site_shapes=shapes, n_samples=len(data.items), seq_len=seq_len, chunk_samples=args.chunk_samples,
        dtype=args.dtype, site_grids=grids, span_names=span_names, overwrite=args.overwrite,
        sample_fields={"question": [it.prompt for it in data.items],
                       **{f: [getattr(it, f) for it in data.items] for f in SAMPLE_FIELDS}},
        labels={name: [s.has(name) for s in specs] for name in FINDINGS + CONFOUNDERS} if specs else {})
    pending, written = writer.pending(), False
    try:
        with tqdm(total=sum(map(len, pending)), unit="sample", desc=f"caching {out}", file=sys.stderr) as bar:
            for r in pending:
                writer.write(r.start, **run_chunk(adapter, data, r, sites, {s for s in sites if parse(s).tower in SEQ_TOWERS}, seq_len,
                                                  args.batch_size, span_names, args.device))
                written = True
                bar.update(len(r))
    except BaseException:
        if writer.created and not written:
            remove_store(out)
        raise
    writer.close()
    return out


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    hf_logging.disable_progress_bar()  # keep stderr to our own bars and one-line errors
    try:
        out = cache(args)
    except InterpError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: rerun the same command to resume", file=sys.stderr)
        return 130
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
