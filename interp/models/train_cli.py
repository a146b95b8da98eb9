"""The command line of ``python -m interp.models.train``, apart from the trainer: parsing it (and
``--help``) imports no torch. The recipe is in ``interp.models.train``'s docstring.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from collections.abc import Sequence
from dataclasses import asdict, fields
from pathlib import Path

from interp.cli import Parser, fraction, non_negative_int, not_applicable, out_dir, positive_float, positive_int, run
from interp.data.phantom import FINDINGS
from interp.errors import InterpError
from interp.models.registry import ALIASES

# TrainConfig fields given as options
TRAINING = ("seed", "steps", "minutes", "aux_steps", "n_train_images", "confounder_rate", "confounded")
_PARSE = {"int": int, "float": float, "str": str}  # a --set value by its field's annotation (``float | None``...)


def parser() -> Parser:
    p = Parser("python -m interp.models.train", "Train the embedded LVLM organism on phantom VQA (or, with "
               "--eval-only, evaluate a checkpoint of it); the recipe: pydoc interp.models.train")
    p.add_argument("--out", default=str(ALIASES["organism"]),
                   help="checkpoint folder, written by training, read by --eval-only (default: the shipped organism)")
    p.add_argument("--seed", type=non_negative_int, help="training seed (default: TrainConfig's)")
    p.add_argument("--steps", type=positive_int, help="stage-2 steps")
    p.add_argument("--minutes", type=positive_float, help="stop on wall clock (overrides determinism)")
    p.add_argument("--aux-steps", type=non_negative_int, help="stage-1 (vision + aux head) steps")
    p.add_argument("--n-train-images", type=positive_int, help="training phantoms")
    p.add_argument("--confounder-rate", type=fraction, help="a chest tube in this fraction of the training images "
                   "with the --confounded finding and in 1 - it of those without (default: no tubes)")
    p.add_argument("--confounded", choices=FINDINGS, help="the finding the chest tube follows (default: pleural_effusion)")
    p.add_argument("--eval-only", action="store_true", help="evaluate the checkpoint at --out and print the table")
    p.add_argument("--eval-images", type=positive_int, default=200, help="test-split images for evaluation")
    p.add_argument("--eval-cot-images", type=non_negative_int, default=100, help="of those, how many also get cot items")
    p.add_argument("--eval-seed", type=non_negative_int, default=12345)
    p.add_argument("--shortcut-table", action="store_true", help="also measure how far pneumothorax answers follow a "
                   "chest tube (interp.models.shortcut) and print it; saved in metrics.json, with --eval-only too")
    p.add_argument("--shortcut-images", type=positive_int, default=200,
                   help="test phantoms with pneumothorax and tube for --shortcut-table, each rendered 4 ways")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a TrainConfig field")
    p.add_argument("--no-progress", action="store_true")
    return p


def config(a: argparse.Namespace):
    """The TrainConfig of the options and ``--set`` overrides."""
    from interp.models.train import TrainConfig

    types = {f.name: f.type for f in fields(TrainConfig) if f.name != "kind_weights"}
    values = {k: getattr(a, k) for k in TRAINING if getattr(a, k) is not None}
    for kv in a.set:
        key, _, val = kv.partition("=")
        if key not in types:
            raise InterpError(f"unknown config field {key!r}; valid: {', '.join(types)}")
        base, *optional = types[key].split(" | ")
        try:
            values[key] = None if optional == ["None"] and val.lower() == "none" else _PARSE[base](val)
        except ValueError:
            raise InterpError(f"bad value for {key}: {val!r} (type {types[key]})") from None
    return TrainConfig(**values)


def work(a: argparse.Namespace, command: str) -> None:
    """Train, evaluate and save (``command`` is recorded with the metrics), or evaluate only."""
    import torch

    from interp.models import load
    from interp.models.organism import save_organism
    from interp.models.registry import checkpoint_folder
    from interp.models.shortcut import format_shortcut, shortcut_table
    from interp.models.train import TrainConfig, Trainer, evaluate, format_table

    cot_images = min(a.eval_cot_images, a.eval_images)
    if a.eval_only:
        not_applicable([k for k in (*TRAINING, "set") if getattr(a, k) not in (None, [])], "to --eval-only")
        adapter = load(a.out, kind="lvlm", purpose="models.train --eval-only (the LVLM organism's VQA)")
        torch.set_num_threads(TrainConfig.threads)
        m = evaluate(adapter.model, adapter.tokenizer, a.eval_images, a.eval_seed, cot_images=cot_images,
                     progress=not a.no_progress)
        print(f"{a.out}: test split, seed {a.eval_seed}, {a.eval_images} images ({a.eval_cot_images} with cot items)")
        print(format_table(m))
        if a.shortcut_table:
            table = shortcut_table(adapter.model, adapter.tokenizer, a.shortcut_images, a.eval_seed)
            print(format_shortcut(table))
            path = checkpoint_folder(a.out) / "metrics.json"
            if path.is_file():  # a checkpoint trained here: its table joins its metrics
                path.write_text(json.dumps({**json.loads(path.read_text()), "shortcut": table}, indent=1))
        return
    out_dir(a.out)
    cfg = config(a)
    torch.set_num_threads(cfg.threads)
    trainer = Trainer(cfg, progress=not a.no_progress)
    info = trainer.train()
    m = evaluate(trainer.model, trainer.tok, a.eval_images, a.eval_seed, cot_images=cot_images,
                 progress=not a.no_progress)
    table = shortcut_table(trainer.model, trainer.tok, a.shortcut_images, a.eval_seed) if a.shortcut_table else None
    save_organism(trainer.model, trainer.tok, a.out)
    meta = {"metrics": m, **info, "config": asdict(cfg), "eval": {"split": "test", "seed": a.eval_seed,
            "images": a.eval_images, "cot_images": a.eval_cot_images},
            **({"shortcut": table} if table else {}), "command": command,
            "torch": torch.__version__, "threads": cfg.threads, "machine": platform.machine(), "history": trainer.history}
    (Path(a.out) / "metrics.json").write_text(json.dumps(meta, indent=1))
    print(f"trained in {info['train_seconds']} s ({info['steps']} stage-2 steps); saved to {a.out}")
    print(format_table(m))
    if table:
        print(format_shortcut(table))


def main(argv: Sequence[str] | None = None) -> int:
    command = "python -m interp.models.train " + " ".join(sys.argv[1:] if argv is None else argv)
    return run(parser().parse_args, lambda a: work(a, command), argv)
