"""NAST's settings, defined once for every entry point (``python -m interp.nast trace | train | study``,
``experiments/nast_clip.py``, ``python -m interp.trace --mode nast``): a light module, so the command
line parses them without torch. ``add_options`` turns a settings dataclass into command-line options."""

from __future__ import annotations

import argparse
from dataclasses import MISSING, dataclass, field, fields

from interp.cli import fraction, int_list, non_negative_float, non_negative_int, positive_float, positive_int
from interp.errors import InterpError

AGGREGATES = ("max", "negator", "mean")  # how a layer's CTE profile is read off its token roles
ALPHA_RULES = ("state", "block")  # alpha of a block: the effect at its output, or the EOT effect it adds
METHODS = ("base", "uniform", "nast", "shuffled", "random")
SCALE_MODES = ("grad", "lr")


@dataclass
class TraceConfig:
    """Negation tracing -> alphas (``python -m interp.nast trace``; the study's first step)."""

    model: str = "clip-organism-biased"
    n_images: int = 24  # phantoms per data seed
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])  # data seeds of the traced pairs
    limit: int | None = 40  # pairs per data seed
    aggregate: str = "max"
    min_margin: float = 0.1
    alpha_rule: str = "state"


@dataclass
class NastConfig:
    """One training run (``python -m interp.nast train``); the study runs it per method, beta and seed."""

    model: str = "clip-organism-biased"
    method: str = "nast"
    beta: float = 1.0
    # per-layer AdamW learning rates: on the biased organism, 60-200 SGD steps (mode grad, lr 0.01) move the gap
    # by single-seed noise only; 100 AdamW steps over 2000 phantoms move it consistently (README)
    scale_mode: str = "lr"
    steps: int = 100
    batch_size: int = 16
    lr: float = 0.003  # AdamW (lr mode); SGD (grad mode) wants ~0.01
    momentum: float = 0.9
    rank: int = 4
    lora_alpha: float = 8.0
    claim_weight: float = 1.0
    vision: bool = False
    n_train: int = 2000
    data_seed: int = 0
    seed: int = 0
    image_size: int = 64
    n_eval: int = 400  # test phantoms of the evaluation (``train_clip.eval_set``), as ``train_clip --eval-only``
    eval_seed: int = 1

    def validate(self) -> None:
        if self.method not in METHODS:
            raise InterpError(f"unknown method {self.method!r}: choose {', '.join(METHODS)}")
        if self.scale_mode not in SCALE_MODES:
            raise InterpError(f"unknown scale mode {self.scale_mode!r}: choose {', '.join(SCALE_MODES)}")
        for k in ("steps", "batch_size", "n_train", "n_eval", "rank"):
            if getattr(self, k) < 1:
                raise InterpError(f"{k} must be >= 1, got {getattr(self, k)}")
        if self.batch_size > self.n_train:
            raise InterpError(f"batch_size {self.batch_size} exceeds n_train {self.n_train}")


@dataclass
class StudyConfig:
    """The comparison (``python -m interp.nast study``): base, uniform LoRA, NAST per beta with both alpha
    rules, shuffled and random alphas (beta 1), every trained method once per seed."""

    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])  # training seeds, and the trace's data seeds
    betas: list[float] = field(default_factory=lambda: [0.5, 1.0, 2.0, 4.0])


def float_list(value: str) -> list[float]:
    """Comma-separated finite numbers >= 0 (betas), at least one."""
    try:
        return [non_negative_float(p.strip()) for p in value.split(",")]
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"must be comma-separated numbers >= 0 (e.g. 0.5,1,2), got {value!r}") from None


TYPES = {"beta": non_negative_float, "steps": positive_int, "batch_size": positive_int, "lr": positive_float,
         "momentum": fraction, "rank": positive_int, "lora_alpha": positive_float, "claim_weight": non_negative_float,
         "n_train": positive_int, "n_eval": positive_int, "data_seed": non_negative_int, "seed": non_negative_int,
         "eval_seed": non_negative_int, "image_size": positive_int, "n_images": positive_int, "seeds": int_list,
         "limit": positive_int, "min_margin": non_negative_float, "betas": float_list}
CHOICES = {"method": METHODS, "scale_mode": SCALE_MODES, "aggregate": AGGREGATES, "alpha_rule": ALPHA_RULES}
HELP = {"n_images": "phantoms per data seed", "limit": "claim pairs traced per data seed",
        "seeds": "comma-separated seeds (trace: data seeds; study: training seeds, also the trace's data seeds)",
        "aggregate": "how the per-layer profile is read off the roles", "min_margin": "pairs with |logit(pos) - "
        "logit(neg)| at most this are left out (CTE divides by it)", "n_eval": "test phantoms evaluated",
        "alpha_rule": "state: a block's alpha is the effect at its output; block: the EOT effect the block adds",
        "betas": "comma-separated betas of the NAST grid", "scale_mode": "lr: AdamW, per-layer learning rates; "
        "grad: SGD, per-layer gradient hooks", "method": "base, uniform LoRA, nast (alphas^beta), shuffled or random alphas"}


def add_options(parser: argparse.ArgumentParser, cls: type, skip: tuple[str, ...] = ()) -> None:
    """One ``--flag`` per field of the settings dataclass ``cls`` (but ``skip``), with its default."""
    for f in fields(cls):
        if f.name in skip:
            continue
        default = f.default_factory() if f.default is MISSING else f.default
        flag = "--" + f.name.replace("_", "-")
        if isinstance(default, bool):
            parser.add_argument(flag, action="store_true", default=default)
            continue
        help_ = HELP.get(f.name, "") + (f" (default: {','.join(map(str, default))})" if isinstance(default, list) else
                                        " (default: %(default)s)")
        parser.add_argument(flag, type=TYPES.get(f.name, str), default=default, choices=CHOICES.get(f.name),
                            help=help_.strip())


def settings(cls: type, args: argparse.Namespace, **given):
    """The ``cls`` settings read off parsed options (fields not among them keep their defaults)."""
    return cls(**{**{f.name: getattr(args, f.name) for f in fields(cls) if hasattr(args, f.name)}, **given})
