"""The settings of a layer sweep (``python -m interp.trace``): a light module, so parsing them imports no torch."""

from __future__ import annotations

from dataclasses import dataclass, fields

from interp.cli import not_applicable
from interp.errors import InterpError

MODES = {"trace": ("image", "negation_cue", "finding", "question"), "patch": ("negation", "counterfactual"),
         "nast": ("negation", "noise")}
#: how restored runs are evaluated: exactly, by attribution patching (AtP*), or both (compared in the report)
METHODS = ("exact", "atp", "both")
#: settings a mode does not use: giving one is an error rather than silently ignored
UNUSED = {"patch": ("copies", "noise_scale", "seed"),
          "nast": ("data", "image", "prompt", "sites", "metric", "window", "lm_positions", "vision_positions", "copies",
                   "noise_scale", "batch_size", "min_gap", "method")}


@dataclass
class SweepConfig:
    """One run of ``python -m interp.trace --layer-sweep`` (defaults = the embedded organism)."""

    model: str = "organism"
    data: str = "phantom-test"
    image: str = ""
    prompt: str = ""
    sites: str = ""  # empty: every sweepable tower's block outputs
    mode: str = "trace"
    method: str = "exact"
    corrupt: str = ""  # empty: the mode's first choice (image / negation / negation)
    metric: str = ""  # empty: prob for LVLMs, logit for dual encoders
    window: int = 1
    lm_positions: str = "token"
    vision_positions: str = "patch"
    copies: int = 10
    noise_scale: float = 3.0
    batch_size: int = 128
    limit: int = 4
    min_gap: float = 0.1
    seed: int = 0
    device: str = "cpu"
    out: str = "reports/layer-sweep"

    def __post_init__(self) -> None:
        self.corrupt = self.corrupt or MODES.get(self.mode, ("",))[0]

    def block(self, tower: str) -> int:
        """Patches per side of one restored vision group (1 = per patch)."""
        return 1 if tower != "vision" or self.vision_positions == "patch" else int(self.vision_positions[5:])

    def given(self, names: tuple[str, ...]) -> list[str]:
        """The settings among ``names`` set to something other than their default."""
        return [f.name for f in fields(self) if f.name in names and getattr(self, f.name) != f.default]

    def validate(self) -> None:
        if self.mode not in MODES:
            raise InterpError(f"unknown mode {self.mode!r}: choose {', '.join(MODES)}")
        not_applicable(self.given(UNUSED.get(self.mode, ())), f"to --mode {self.mode}" + (
            " (it traces a CLIP-style text encoder per layer x token role)" if self.mode == "nast" else ""))
        if self.method not in METHODS:
            raise InterpError(f"unknown method {self.method!r}: choose {', '.join(METHODS)}")
        if self.method != "exact" and self.window != 1:
            raise InterpError(f"--method {self.method} estimates one-layer restores (AtP*): use --window 1")
        if self.prompt and not self.image:
            raise InterpError("--prompt goes with --image (the question asked about that image)")
        if self.image and self.given(("data",)):
            raise InterpError("--image and --data are two inputs: give one")
        if self.corrupt not in MODES[self.mode]:
            raise InterpError(f"--corrupt {self.corrupt!r} does not go with --mode {self.mode}: choose one of {', '.join(MODES[self.mode])}")
        if self.lm_positions not in ("token", "span"):
            raise InterpError(f"unknown --lm-positions {self.lm_positions!r}: choose token or span")
        if self.vision_positions != "patch" and not (self.vision_positions.startswith("block") and self.vision_positions[5:].isdigit()):
            raise InterpError(f"unknown --vision-positions {self.vision_positions!r}: choose patch or block<k> (e.g. block2)")
        if self.image and (self.mode != "trace" or self.corrupt != "image"):
            raise InterpError("--image traces the image with noise: use --mode trace --corrupt image")
        for name in ("limit", "window", "copies", "batch_size"):
            if getattr(self, name) < 1:
                raise InterpError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
