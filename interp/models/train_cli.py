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
#: the shipped organisms' recipes as TrainConfig overrides (v1: the defaults; the shortcut organism is v1 + a tube).
#: v2 (``organism``): trained under the shifts it is tested on (interp.data.shifts) - rotation within +-12 degrees,
#: contrast 0.5-1.2, a chest tube in half the images beside no finding -, a location-free finding head, a lung-zone
#: head, statement and zone items weighted up, twice the training phantoms and a long stage 1 (the vision tower's
#: zone features are what zone answers lacked: cheap steps without the LM)
RECIPES = {
    "v1": {},
    "v2": {"confounder_rate": 0.5, "aug_rotation": 12.0, "aug_contrast_min": 0.5, "aug_contrast_max": 1.2,
           "finding_weight": 1.0, "zone_weight": 1.0, "n_train_images": 3000, "aux_batch": 32, "aux_steps": 2000,
           "steps": 1000, "threads": 2,
           "kind_weights": {"presence": 2.0, "negated": 2.0, "positive": 3.0, "affirmative": 1.0, "laterality": 1.0,
                            "zone": 4.0}},
}
_PARSE = {"int": int, "float": float, "str": str}  # a --set value by its field's annotation (``float | None``...)


def parser() -> Parser:
    p = Parser("python -m interp.models.train", "Train the embedded LVLM organism on phantom VQA (or, with "
               "--eval-only, evaluate a checkpoint of it); the recipe: pydoc interp.models.train")
    p.add_argument("--out", default=str(ALIASES["organism"]),
                   help="checkpoint folder, written by training, read by --eval-only (default: the shipped organism)")
    p.add_argument("--recipe", choices=RECIPES, help="the base recipe the options below change: v2 "
                   "(default: the shipped organism, trained under shifts) or v1 (organism-v1, organism-shortcut); see RECIPES")
    p.add_argument("--seed", type=non_negative_int, help="training seed (default: TrainConfig's)")
    p.add_argument("--steps", type=positive_int, help="stage-2 steps")
    p.add_argument("--minutes", type=positive_float, help="stop on wall clock (overrides determinism)")
    p.add_argument("--aux-steps", type=non_negative_int, help="stage-1 (vision + aux head) steps")
    p.add_argument("--n-train-images", type=positive_int, help="training phantoms")
    p.add_argument("--confounder-rate", type=fraction, help="a chest tube in this fraction of the training images "
                   "with the --confounded finding and in 1 - it of those without (default: no tubes)")
    p.add_argument("--confounded", choices=FINDINGS, help="the finding the chest tube follows (default: pleural_effusion)")
    p.add_argument("--eval-only", action="store_true", help="evaluate the checkpoint at --out and print the table")
    p.add_argument("--eval-images", type=positive_int, default=200, help="phantoms of --eval-split evaluated")
    p.add_argument("--eval-cot-images", type=non_negative_int, default=100, help="of those, how many also get cot items")
    p.add_argument("--eval-seed", type=non_negative_int, default=12345)
    p.add_argument("--eval-split", choices=("val", "test"), default="test",
                   help="phantom split evaluated (val: for choosing among checkpoints; its table joins metrics.json "
                        "as 'validation')")
    p.add_argument("--shortcut-table", action="store_true", help="also measure how far pneumothorax answers follow a "
                   "chest tube (interp.models.shortcut) and print it; saved in metrics.json, with --eval-only too")
    p.add_argument("--shortcut-images", type=positive_int, default=200,
                   help="test phantoms with pneumothorax and tube for --shortcut-table, each rendered 4 ways")
    p.add_argument("--shifts", action="store_true", help="also evaluate under each distribution shift of "
                   "interp.data.shifts (contrast 0.6 / 0.85, rotation 10, chest tube) and print the points lost; "
                   "saved in metrics.json, with --eval-only too")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a TrainConfig field (kind_weights=positive:2,zone:3 updates the given kinds)")
    p.add_argument("--no-progress", action="store_true")
    return p


def config(a: argparse.Namespace):
    """The TrainConfig of the recipe, the options and ``--set`` overrides."""
    from interp.models.train import TrainConfig

    types = {f.name: f.type for f in fields(TrainConfig) if f.name != "kind_weights"}
    values = {**RECIPES[a.recipe or "v2"], **{k: getattr(a, k) for k in TRAINING if getattr(a, k) is not None}}
    for kv in a.set:
        key, _, val = kv.partition("=")
        if key == "kind_weights":
            values[key] = {**values.get(key, TrainConfig().kind_weights), **_kind_weights(val)}
            continue
        if key not in types:
            raise InterpError(f"unknown config field {key!r}; valid: {', '.join([*types, 'kind_weights'])}")
        base, *optional = types[key].split(" | ")
        try:
            values[key] = None if optional == ["None"] and val.lower() == "none" else _PARSE[base](val)
        except ValueError:
            raise InterpError(f"bad value for {key}: {val!r} (type {types[key]})") from None
    return TrainConfig(**values)


def _kind_weights(text: str) -> dict[str, float]:
    """``positive:2,zone:3`` -> {"positive": 2.0, "zone": 3.0}."""
    out = {}
    for part in text.split(","):
        kind, _, w = part.partition(":")
        try:
            out[kind.strip()] = float(w)
        except ValueError:
            raise InterpError(f"bad kind_weights entry {part!r}: write KIND:WEIGHT, e.g. positive:2") from None
    return out


def _shift_metrics(model, tok, a: argparse.Namespace, cot_images: int) -> dict:
    """Accuracy per (kind, mode) under every shift of interp.data.shifts."""
    from interp.data.shifts import SHIFTS
    from interp.models.train import evaluate

    return {name: evaluate(model, tok, a.eval_images, a.eval_seed, a.eval_split, cot_images=cot_images,
                           progress=not a.no_progress, shift=s) for name, s in SHIFTS.items()}


def work(a: argparse.Namespace, command: str) -> None:
    """Train, evaluate and save (``command`` is recorded with the metrics), or evaluate only."""
    import torch

    from interp.models import load
    from interp.models.organism import save_organism
    from interp.models.registry import checkpoint_folder
    from interp.models.shortcut import format_shortcut, shortcut_table
    from interp.models.train import TrainConfig, Trainer, evaluate, format_shifts, format_table

    cot_images = min(a.eval_cot_images, a.eval_images)
    if a.eval_only:
        not_applicable([k for k in (*TRAINING, "recipe", "set") if getattr(a, k) not in (None, [])], "to --eval-only")
        adapter = load(a.out, kind="lvlm", purpose="models.train --eval-only (the LVLM organism's VQA)")
        torch.set_num_threads(TrainConfig.threads)
        m = evaluate(adapter.model, adapter.tokenizer, a.eval_images, a.eval_seed, a.eval_split, cot_images=cot_images,
                     progress=not a.no_progress)
        print(f"{a.out}: {a.eval_split} split, seed {a.eval_seed}, {a.eval_images} images ({a.eval_cot_images} with "
              "cot items)")
        print(format_table(m))
        extra = {}
        shifted = _shift_metrics(adapter.model, adapter.tokenizer, a, cot_images) if a.shifts else None
        if shifted:
            print(format_shifts(m, shifted))
        if a.eval_split == "val":  # beside the test split's tables, never over them
            extra["validation"] = {"seed": a.eval_seed, "images": a.eval_images, "cot_images": cot_images, "metrics": m,
                                   **({"shifts": shifted} if shifted else {})}
        elif shifted:
            extra["shifts"] = shifted
        if a.shortcut_table:
            extra["shortcut"] = shortcut_table(adapter.model, adapter.tokenizer, a.shortcut_images, a.eval_seed)
            print(format_shortcut(extra["shortcut"]))
        path = checkpoint_folder(a.out) / "metrics.json"
        if extra and path.is_file():  # a checkpoint trained here: the tables join its metrics
            path.write_text(json.dumps({**json.loads(path.read_text()), **extra}, indent=1))
        return
    out_dir(a.out)
    cfg = config(a)
    torch.set_num_threads(cfg.threads)
    trainer = Trainer(cfg, progress=not a.no_progress)
    info = trainer.train()
    m = evaluate(trainer.model, trainer.tok, a.eval_images, a.eval_seed, a.eval_split, cot_images=cot_images,
                 progress=not a.no_progress)
    table = shortcut_table(trainer.model, trainer.tok, a.shortcut_images, a.eval_seed) if a.shortcut_table else None
    shifted = _shift_metrics(trainer.model, trainer.tok, a, cot_images) if a.shifts else None
    save_organism(trainer.model, trainer.tok, a.out)
    meta = {"metrics": m, **info, "config": asdict(cfg), "eval": {"split": a.eval_split, "seed": a.eval_seed,
            "images": a.eval_images, "cot_images": a.eval_cot_images},
            **({"shortcut": table} if table else {}), **({"shifts": shifted} if shifted else {}), "command": command,
            "torch": torch.__version__, "threads": cfg.threads, "machine": platform.machine(), "history": trainer.history}
    (Path(a.out) / "metrics.json").write_text(json.dumps(meta, indent=1))
    print(f"trained in {info['train_seconds']} s ({info['steps']} stage-2 steps); saved to {a.out}")
    print(format_table(m))
    if shifted:
        print(format_shifts(m, shifted))
    if table:
        print(format_shortcut(table))


def main(argv: Sequence[str] | None = None) -> int:
    command = "python -m interp.models.train " + " ".join(sys.argv[1:] if argv is None else argv)
    return run(parser().parse_args, lambda a: work(a, command), argv)
