"""SAE training throughput: batches streamed from the results store vs from an in-memory tensor, one run.

    python benchmarks/sae_stream.py [--store caches/organism-phantom-train-2000.zarr] [--site projector.out]
                                    [--tokens 400000] [--repeats 3] [--json PATH]

One torch thread. The default SAE config (``interp.sae.config``) and sae_lens's trainer run ``--tokens``
tokens per repeat, fed either by ``StoreActivations.batches`` (chunks read from Zarr into a shuffle buffer)
or by random batches of a tensor holding every training token (loaded once, outside the timing); the methods
alternate order each repeat; medians. The last line is ``stream_vs_memory: <x>`` (streamed tokens/s
over in-memory tokens/s; the goal is >= 0.8).
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Iterator
from statistics import median

import torch
from figures import write_figures

from interp.sae.config import SAETrainConfig
from interp.sae.data import StoreActivations, config_split
from interp.sae.train import sae_config


def train_tokens_per_s(batches: Iterator[torch.Tensor], cfg: SAETrainConfig, d_in: int) -> float:
    from sae_lens.config import LoggingConfig, SAETrainerConfig
    from sae_lens.saes.sae import TrainingSAE
    from sae_lens.training.sae_trainer import SAETrainer

    torch.manual_seed(0)
    sae = TrainingSAE.from_dict(sae_config(cfg, d_in).to_dict())
    trainer = SAETrainer(SAETrainerConfig(total_training_samples=cfg.training_tokens, train_batch_size_samples=cfg.batch_size,
                                          lr=cfg.lr, lr_end=cfg.lr, logger=LoggingConfig(log_to_wandb=False)), sae, batches)
    t = time.perf_counter()
    trainer.fit()
    return cfg.training_tokens / (time.perf_counter() - t)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--store", default=SAETrainConfig.store)
    p.add_argument("--site", default=SAETrainConfig.site)
    p.add_argument("--tokens", type=int, default=400_000)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--json", default="reports/benchmarks/sae_stream.json")
    args = p.parse_args()
    torch.set_num_threads(1)
    cfg = SAETrainConfig(store=args.store, site=args.site, training_tokens=args.tokens)
    source = config_split(cfg, "train")
    memory = torch.cat(list(source.batches(8192, shuffle=False, epochs=1)))

    def from_memory() -> Iterator[torch.Tensor]:
        g = torch.Generator().manual_seed(0)
        while True:
            yield memory[torch.randint(len(memory), (cfg.batch_size,), generator=g)]

    methods = {"stream": lambda: source.batches(cfg.batch_size, buffer_chunks=cfg.buffer_chunks),
               "memory": from_memory}
    rates: dict[str, list[float]] = {k: [] for k in methods}
    for rep in range(args.repeats):
        for name in list(methods)[:: -1 if rep % 2 else 1]:
            rates[name].append(train_tokens_per_s(methods[name](), cfg, source.d_in))
    med = {k: median(v) for k, v in rates.items()}
    print(f"{cfg.architecture} SAE d_in {source.d_in} x{cfg.expansion}, batch {cfg.batch_size}, {args.tokens} tokens per "
          f"run, {args.repeats} repeats (medians), 1 torch thread; store {cfg.store} ({len(source.samples)} images, "
          f"{len(memory)} tokens, {memory.numel() * 4 / 2**20:.0f} MiB in memory)")
    for k, v in med.items():
        print(f"  {k:<7} {v:>10.0f} tokens/s")
    ratio = med["stream"] / med["memory"]
    write_figures(args.json, {"benchmark": "sae_stream", "store": cfg.store, "site": cfg.site, "tokens": args.tokens,
                              "repeats": args.repeats, "tokens_per_s": rates, "median": med, "stream_vs_memory": ratio})
    print(f"stream_vs_memory: {ratio:.2f}")


if __name__ == "__main__":
    main()
