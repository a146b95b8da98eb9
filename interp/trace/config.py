"""The settings of a layer sweep (``python -m interp.trace``): a light module, so parsing them imports no torch."""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass, fields

from interp.cli import not_applicable
from interp.errors import InterpError

MODES = {"trace": ("image", "thorax", "negation_cue", "finding", "question"),
         "patch": ("normal", "counterfactual", "negation"), "nast": ("negation", "noise")}
#: corruptions of the image (the rest corrupt the text)
IMAGE_CORRUPTIONS = ("image", "thorax", "normal", "counterfactual")
#: what each image corruption lets the ground-truth localisation score say (in the sweep's attrs and summary.json)
LOCALISATION = {
    "image": (False, "not implied by construction: the noise covers every image patch alike"),
    "thorax": (False, "not implied by construction: the noise covers every thorax patch whatever the finding, and "
                      "the score counts thorax patches only (chance = the finding's share of the thorax)"),
    "normal": (False, "not implied by construction: the corrupted image is another patient's normal phantom, "
                      "different from the clean one at every patch"),
    "counterfactual": (True, "CIRCULAR, implied by construction: the clean and corrupted images differ only on the "
                             "finding, so at the first vision layer no other patch can restore anything (and later "
                             "layers inherit that); the score says where the evidence travels, not whether the model "
                             "looks at the finding"),
}
#: how restored runs are evaluated: exactly, by attribution patching (AtP*), or both (compared in the report)
METHODS = ("exact", "atp", "both")
#: settings a mode does not use: giving one is an error rather than silently ignored
UNUSED = {"patch": ("copies", "noise_scale", "seed"),
          "nast": ("data", "image", "prompt", "sites", "metric", "window", "lm_positions", "vision_positions", "copies",
                   "noise_scale", "batch_size", "min_gap", "method")}
AUTO = "auto"  # --noise-scale calibrated per data set (interp.trace.sweep.calibrate)
#: multiples of the noised values' std that ``--noise-scale auto`` tries, smallest first (ROME's 3 among them)
NOISE_GRID = (1.0, 2.0, 3.0, 4.0, 6.0, 8.0, 12.0, 16.0)
CALIBRATION_SAMPLES = 4  # correctly answered candidates per finding that calibrate the noise scale
CALIBRATION_SHARE = 0.75  # share of them the calibrated noise must move by --min-gap
#: default --data: for LVLMs with the image corrupted 200 phantoms asked about the findings in turn (presence
#: questions; enough to keep >= 5 of every finding), else the split with every question kind (negated and
#: positive statements)
LVLM_DATA, DUAL_DATA = "phantom-test:200", "phantom-test"
SWEEP_LIMIT = 40  # default samples of a sweep (kept round-robin over findings: 8 each of the 5 phantom findings)
NAST_LIMIT = 4  # default pairs per data seed of --mode nast


def default_mode(given: Collection[str], corrupt: str = "") -> str:
    """The mode of a command line without --mode (``given``: the settings it names): the one --corrupt belongs to;
    else trace for --image or a setting only trace uses (--copies, --noise-scale, --seed); else patch."""
    owner = next((m for m in ("patch", "trace") if corrupt in MODES[m]), None)
    return owner or ("trace" if "image" in given or set(UNUSED["patch"]) & set(given) else "patch")


@dataclass
class SweepConfig:
    """One run of ``python -m interp.trace --layer-sweep`` (defaults = the embedded organism)."""

    model: str = "organism"
    data: str = ""  # empty: data_for the model's kind
    image: str = ""
    prompt: str = ""
    sites: str = ""  # empty: every sweepable tower's block outputs
    mode: str = "patch"  # the command line infers it when not given: default_mode
    method: str = "exact"
    corrupt: str = ""  # empty: the mode's first choice (normal / image / negation)
    metric: str = ""  # empty: prob for LVLMs, logit for dual encoders
    window: int = 1
    lm_positions: str = "token"
    vision_positions: str = "patch"
    copies: int = 10
    noise_scale: float | str = 3.0  # a multiple of the noised values' std, or AUTO
    batch_size: int = 128
    limit: int = 0  # 0: SWEEP_LIMIT (--mode nast: NAST_LIMIT)
    min_gap: float = 0.1
    seed: int = 0
    device: str = "cpu"
    out: str = "reports/layer-sweep"

    def __post_init__(self) -> None:
        self.corrupt = self.corrupt or MODES.get(self.mode, ("",))[0]
        self.limit = self.limit or (NAST_LIMIT if self.mode == "nast" else SWEEP_LIMIT)

    def data_for(self, lvlm: bool) -> str:
        """--data, or the default for an LVLM (``lvlm``) corrupting the image, else (a dual encoder, or text
        corruptions, which need every question kind) the phantom test split."""
        return self.data or (LVLM_DATA if lvlm and self.corrupt in IMAGE_CORRUPTIONS else DUAL_DATA)

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
        if isinstance(self.noise_scale, str) and self.noise_scale != AUTO:
            raise InterpError(f"--noise-scale must be a number > 0 or {AUTO}, got {self.noise_scale!r}")
        for name in ("limit", "window", "copies", "batch_size"):
            if getattr(self, name) < 1:
                raise InterpError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
