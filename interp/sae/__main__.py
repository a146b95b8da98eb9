"""``python -m interp.sae``: sparse autoencoders on vision features cached in a results store.

    python -m interp.cache --data phantom-train:2000 --sites 'vision.blocks.*.resid_post,projector.out' \\
        --out caches/organism-phantom-train-2000.zarr          # the activations (once)
    python -m interp.sae train                                 # SAE on projector.out patch tokens (sae_lens)
    python -m interp.sae analyze                               # metrics, ground truth, descriptions, dashboards

``train`` streams shuffled token batches from the store (a held-out share of the images is never
trained on), saves ``<out>/sae`` in SAELens's format, resumes from ``<out>/checkpoints`` when rerun,
then prints held-out explained variance, L0 and each finding's best-feature AUROC
(``<out>/train.json``). ``analyze`` adds the downstream check through the model, patch-level
ground truth, SAE-Rad descriptions and compiled reports, and the feature dashboards
(``<out>/analysis.json``, ``<out>/features.html``). Bad input: one line on stderr, exit 2.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from dataclasses import fields

from interp.cli import (Parser, fraction, non_negative_int, out_dir, positive_float, positive_int, run,
                        torch_device)
from interp.sae.config import ARCHITECTURES, CENTRES, SAETrainConfig

TYPES = {"expansion": positive_int, "k": positive_int, "l1_coefficient": positive_float,
         "l0_coefficient": positive_float, "lr": positive_float, "batch_size": positive_int,
         "training_tokens": positive_int, "test_fraction": fraction, "buffer_chunks": positive_int,
         "checkpoint_every": non_negative_int, "seed": non_negative_int, "split_seed": non_negative_int,
         "inits": positive_int, "val_fraction": fraction, "threads": positive_int, "device": torch_device, "out": out_dir}
CHOICES = {"architecture": ARCHITECTURES, "tokens": ("patch", "cls", "all"), "centre": CENTRES}
HELP = {"store": "results store with cached vision activations (python -m interp.cache)",
        "site": "a vision.* or projector.* site cached in the store", "tokens": "which tokens train the SAE",
        "architecture": "SAE kind (sae_lens)", "expansion": "d_sae = expansion x d_in",
        "k": "topk / batchtopk / matryoshka: active features per token",
        "widths": "matryoshka: comma-separated nested widths that must reconstruct alone (the full width is added)", "l1_coefficient": "standard SAE's sparsity penalty",
        "l0_coefficient": "jumprelu's sparsity penalty", "training_tokens": "tokens seen in training",
        "test_fraction": "share of the store's distinct images held out", "split_seed": "which images are held out",
        "inits": "SAEs trained from seeds seed, seed+1, ...: the one with the best worst-finding AUROC on the "
        "validation images is kept (phantom stores; else the best explained variance)",
        "val_fraction": "share of the distinct images held out for choosing among --inits",
        "seed": "the SAE's initialisation and batch order", "centre": "position: subtract each token position's "
        "training mean before the SAE (added back after it)", "buffer_chunks": "store chunks per "
        "shuffle buffer (the memory bound)", "checkpoint_every": "tokens between checkpoints (0: none)",
        "out": "output folder"}


def parser() -> Parser:
    p = Parser("python -m interp.sae", __doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("train", help="train an SAE (sae_lens) on activations streamed from a store")
    for f in fields(SAETrainConfig):
        t.add_argument("--" + f.name.replace("_", "-"), type=TYPES.get(f.name, type(f.default)), default=f.default,
                       choices=CHOICES.get(f.name), help=f"{HELP.get(f.name, f.name.replace('_', ' '))} "
                                                         f"(default: {f.default})")
    a = sub.add_parser("analyze", help="metrics, ground truth, descriptions, compiled reports, dashboards")
    a.add_argument("--out", type=out_dir, default=SAETrainConfig.out, help="the train command's --out (default: "
                                                                           f"{SAETrainConfig.out})")
    a.add_argument("--top-k", type=positive_int, default=10, help="top images per feature for descriptions")
    a.add_argument("--features", type=positive_int, default=24, help="features shown in the dashboards")
    a.add_argument("--downstream-samples", type=non_negative_int, default=100,
                   help="held-out samples run through the model for the splice check (0: skip)")
    a.add_argument("--lm", default=None, help="a local causal LM folder to word descriptions (default: extractive)")
    a.add_argument("--device", type=torch_device, default="cpu")
    return p


def train(args: argparse.Namespace) -> None:
    import json
    from pathlib import Path

    from interp.sae.analysis import init_report, quick_report
    from interp.sae.train import train_sae
    from interp.store import open_store

    import torch

    cfg = SAETrainConfig(**{f.name: getattr(args, f.name) for f in fields(SAETrainConfig)})
    torch.set_num_threads(cfg.threads)
    path = train_sae(cfg)
    summary = quick_report(str(path), cfg)
    if cfg.inits > 1 and "labels" in open_store(cfg.store).data_vars:
        summary["inits"] = init_report(cfg)
    log = Path(cfg.out) / "train.json"
    log.write_text(json.dumps({**json.loads(log.read_text()), "held_out": summary}, indent=1))
    print(f"sae:     {path}\nfigures: {log}")


def analyze(args: argparse.Namespace) -> None:
    from interp.sae.analysis import full_analysis

    for line in full_analysis(args.out, top_k=args.top_k, n_features=args.features,
                              downstream_samples=args.downstream_samples, lm=args.lm, device=args.device):
        print(line)


def main(argv: Sequence[str] | None = None) -> int:
    return run(parser().parse_args, lambda a: train(a) if a.cmd == "train" else analyze(a), argv,
               resumable=lambda a: a.cmd == "train")


if __name__ == "__main__":
    raise SystemExit(main())
