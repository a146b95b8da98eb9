"""What caching activations into the results store costs over a plain forward pass, and its write speed.

    python benchmarks/store_throughput.py [--model organism | --tiny-width 512] [--limit 128] [--batch-size 16]
                                          [--sites 'lm.blocks.*.resid_post'] [--repeats 5] [--json PATH]

One torch thread. The first ``--limit`` phantom-test items are encoded once (images and encoding
are outside every timing). Each repeat interleaves the methods, over the same batches:

* ``plain``: ``adapter.run(batch)`` (no reads);
* ``cache``: the cache CLI's loop (``write_all``) over what ``run_chunk`` does per chunk, into a fresh
  store per repeat, timed as a whole and in parts: ``forward`` (``adapter.run(batch, read=sites)``),
  ``host`` (``.float().cpu().numpy()``, ``sequence_rows`` padding, concatenation into a chunk) and
  ``write`` (the rest: ``StoreWriter.write`` of the chunk with its images' thumbnails);
* write speed of the chunks of real activations (no thumbnails): ``StoreWriter.write`` (zstd 3),
  ``StoreWriter.write`` with the numeric arrays replaced by random bits (incompressible; strings kept),
  ``numpy.save`` of each array of each chunk; all into the same temporary folder (page cache, no fsync).

Medians over repeats; the ratio is median cache / median plain (the issue's goal: at most 1.25).
MB/s is uncompressed MB (1e6 bytes) per second. FLOPs of one plain forward from
``torch.utils.flop_counter``. Figures go to stdout and to ``--json``
(default ``reports/benchmarks/store_throughput.json``).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from statistics import median

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

from interp.cache.__main__ import SEQ_TOWERS, default_sites, site_grids
from interp.cache.acts import acts_layout, sequence_rows
from interp.data.catalog import load_dataset
from interp.models import load
from interp.models.tiny import save_tiny_llava
from interp.sites import parse
from interp.store import SampleIndex, StoreWriter
from interp.store.ranks import write_all
from figures import write_figures

Chunk = dict[str, np.ndarray]


def nbytes(a: np.ndarray) -> int:
    """Bytes of the values: UTF-8 bytes for string (object) arrays."""
    return sum(len(str(v).encode()) for v in a.flat) if a.dtype == object else a.nbytes


def timed(fn: Callable[[], object]) -> tuple[float, object]:
    t = time.perf_counter()
    out = fn()
    return time.perf_counter() - t, out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="organism")
    p.add_argument("--tiny-width", type=int, default=0,
                   help="instead of --model, a tiny LLaVA (2 + 2 layers) of this width: store bytes grow with the "
                        "width, forward FLOPs with its square")
    p.add_argument("--limit", type=int, default=128, help="samples (default 128)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--chunk-samples", type=int, default=32)
    p.add_argument("--sites", default="", help="default: the cache CLI's (every tower's block outputs, projector.out)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--json", default="reports/benchmarks/store_throughput.json")
    args = p.parse_args()
    if args.chunk_samples % args.batch_size:
        p.error("--chunk-samples must be a multiple of --batch-size")
    torch.set_num_threads(1)
    tmp_model = tempfile.TemporaryDirectory()
    adapter = load(str(save_tiny_llava(tmp_model.name, width=args.tiny_width)) if args.tiny_width else args.model)
    data = load_dataset("phantom-test", args.limit)
    items, bs, cs = data.items, args.batch_size, args.chunk_samples
    sites = adapter.expand_sites(args.sites or default_sites(adapter))
    images = [data.image(it.image) for it in items]
    batches = [adapter.encode(images[i:i + bs], [it.prompt for it in items[i:i + bs]],
                              [it.spans for it in items[i:i + bs]]) for i in range(0, len(items), bs)]
    seq_len = max(b.input_ids.shape[1] for b in batches)
    shapes = {s: adapter.site_shape(s, seq_len) for s in sites}
    span_names = ["image", *sorted({k for it in items for k in it.spans} - {"image"})]
    fields, statics = acts_layout(shapes, site_grids(adapter, shapes), seq_len, "float32", span_names)
    seq_sites = {s for s in sites if parse(s).tower in SEQ_TOWERS}
    index = SampleIndex.from_data(data, items, "phantom-test", args.limit)
    chunks_of = [batches[i:i + cs // bs] for i in range(0, len(batches), cs // bs)]

    def writer(path: str) -> StoreWriter:
        return StoreWriter(path, "acts", samples=index, fields=fields, statics=statics, meta={"model_id": args.model},
                           chunk_samples=cs)

    def plain() -> float:
        return sum(timed(lambda: adapter.run(b))[0] for b in batches)

    def cache(path: str) -> tuple[dict[str, float], list[Chunk]]:
        t, chunks = dict.fromkeys(("forward", "host"), 0.0), []

        def chunk(r: range) -> tuple[Chunk, list[np.ndarray]]:
            parts = []
            for b in chunks_of[r.start // cs]:
                dt, (_, acts) = timed(lambda: adapter.run(b, read=sites))
                t["forward"] += dt
                dt, rows = timed(lambda: sequence_rows(b, {s: a.float().cpu().numpy() for s, a in acts.items()},
                                                       seq_sites, seq_len, span_names))
                t["host"] += dt
                parts.append(rows)
            dt, out = timed(lambda: {k: np.concatenate([p[k] for p in parts]) for k in parts[0]})
            t["host"] += dt
            chunks.append(out)
            return out, images[r.start:r.stop]

        t["create"], w = timed(lambda: writer(path))  # once per store, whatever its size: reported apart
        total = timed(lambda: write_all(lambda create: w, chunk, "cache"))[0]  # the CLI's own loop
        t["write"] = total - t["forward"] - t["host"]
        return t, chunks

    def store_write(path: str, chunks: list[Chunk]) -> float:
        w = writer(path)
        return sum(timed(lambda: w.write(c * cs, chunk))[0] for c, chunk in enumerate(chunks))

    def npy_write(folder: Path, chunks: list[Chunk]) -> float:
        folder.mkdir()
        return sum(timed(lambda: [np.save(folder / f"{c}-{k}.npy", a) for k, a in chunk.items()])[0]
                   for c, chunk in enumerate(chunks))

    rng = np.random.default_rng(0)
    times: dict[str, list[float]] = {k: [] for k in ("plain", "forward", "host", "write", "create", "cache", "store real",
                                                     "store random", "numpy.save")}
    sizes: dict[str, int] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for rep in range(args.repeats):  # odd repeats run the methods in reverse order
            flip = -1 if rep % 2 else 1
            for name in ("plain", "cache")[::flip]:
                if name == "plain":
                    times["plain"].append(plain())
                    continue
                parts, chunks = cache(f"{tmp}/cache-{rep}.zarr")
                for k, v in parts.items():
                    times[k].append(v)
                times["cache"].append(parts["forward"] + parts["host"] + parts["write"])
            noise = [{k: a if a.dtype == object else np.frombuffer(rng.bytes(a.nbytes), a.dtype).reshape(a.shape)
                      for k, a in c.items()} for c in chunks]
            writes = {"store real": lambda: store_write(f"{tmp}/real-{rep}.zarr", chunks),
                      "store random": lambda: store_write(f"{tmp}/random-{rep}.zarr", noise),
                      "numpy.save": lambda: npy_write(Path(tmp) / f"npy-{rep}", chunks)}
            for name in list(writes)[::flip]:
                times[name].append(writes[name]())
        total = sum(nbytes(a) for c in chunks for a in c.values())
        for name, path in (("store real", "real-0.zarr/acts"), ("store random", "random-0.zarr/acts"),
                           ("numpy.save", "npy-0")):
            sizes[name] = sum(f.stat().st_size for f in (Path(tmp) / path).rglob("*") if f.is_file())
    with FlopCounterMode(display=False) as fc:
        adapter.run(batches[0])
    flops = fc.get_total_flops() / len(batches[0])
    med = {k: median(v) for k, v in times.items()}
    n = len(items)
    label = f"tiny LLaVA width {args.tiny_width}" if args.tiny_width else adapter.model_id
    result = {"benchmark": "store_throughput", "model": label, "n": n, "batch_size": bs,
              "chunk_samples": cs, "repeats": args.repeats, "torch_threads": torch.get_num_threads(),
              "sites": sites, "seq_len": seq_len, "chunk_bytes_total": total,
              "seconds_median": med, "seconds_all": times,
              "ms_per_sample_median": {k: 1e3 * v / n for k, v in med.items()},
              "ratio_cache_over_plain": med["cache"] / med["plain"],
              "flops_per_sample": flops, "plain_gflop_per_s": flops * n / med["plain"] / 1e9,
              "write_mb_per_s": {k: total / med[k] / 1e6 for k in ("store real", "store random", "numpy.save")},
              "bytes_on_disk": sizes}
    print(f"model {label}, n={n} samples, batch {bs}, chunk {cs}, seq_len {seq_len}, {len(sites)} sites, "
          f"{args.repeats} repeats (medians), 1 torch thread; {flops / 1e6:.1f} MFLOP/sample forward, plain "
          f"{result['plain_gflop_per_s']:.1f} GFLOP/s")
    print(f"\n{'':<24}{'s':>8}{'ms/sample':>11}{'x plain':>9}")
    for k, row in [("plain", "plain forward"), ("cache", "cache (total)"), ("forward", "  forward with reads"),
                     ("host", "  host copy + padding"), ("write", "  store write + thumbs"),
                     ("create", "store creation (once)")]:
        print(f"{row:<24}{med[k]:>8.3f}{1e3 * med[k] / n:>11.2f}{med[k] / med['plain']:>9.2f}")
    print(f"ratio cache / plain: {result['ratio_cache_over_plain']:.2f} (n={n}, goal <= 1.25)")
    print(f"\nwrite of {total / 1e6:.1f} MB ({n} samples, {len(chunks)} chunks){'MB/s':>12}{'on disk MB':>12}"
          f"{'compr.':>7}")
    for k in ("store real", "store random", "numpy.save"):
        print(f"  {k:<43}{result['write_mb_per_s'][k]:>10.0f}{sizes[k] / 1e6:>12.1f}{total / sizes[k]:>7.1f}")
    write_figures(args.json, result)


if __name__ == "__main__":
    main()
