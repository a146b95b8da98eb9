"""NAST's settings (a training run's, the ways to aggregate a trace): a light module, so
``python -m interp.nast`` parses them without torch."""

from __future__ import annotations

from dataclasses import dataclass

from interp.errors import InterpError

AGGREGATES = ("max", "negator", "mean")  # how a layer's CTE profile is read off its token roles
METHODS = ("base", "uniform", "nast", "shuffled", "random")
SCALE_MODES = ("grad", "lr")


@dataclass
class NastConfig:
    """One training run (``python -m interp.nast train``)."""

    model: str = "clip-organism"
    method: str = "nast"
    beta: float = 1.0
    scale_mode: str = "grad"
    steps: int = 60
    batch_size: int = 16
    lr: float = 0.01  # SGD (grad mode); AdamW (lr mode) wants ~1e-3
    momentum: float = 0.9
    rank: int = 4
    lora_alpha: float = 8.0
    claim_weight: float = 1.0
    vision: bool = False
    n_train: int = 256
    n_eval: int = 128
    data_seed: int = 0
    seed: int = 0
    image_size: int = 64

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
