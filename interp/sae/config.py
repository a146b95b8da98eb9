"""SAE training settings (light: the command line parses them before torch loads)."""

from __future__ import annotations

from dataclasses import dataclass

from interp.errors import InterpError

ARCHITECTURES = ("standard", "topk", "batchtopk", "jumprelu", "matryoshka")
CENTRES = ("none", "position")


@dataclass
class SAETrainConfig:
    """One SAE training run (SAELens-style: the architecture's own knobs sit beside the shared ones)."""

    store: str = "caches/organism-phantom-train-2000.zarr"
    site: str = "projector.out"
    tokens: str = "patch"
    # position: each token position's training mean subtracted before the SAE (and added back after it), so the
    # features code what differs between images rather than where a token sits (README: SAE results)
    centre: str = "none"
    architecture: str = "matryoshka"
    expansion: int = 8  # d_sae = expansion x d_in
    k: int = 8  # topk / batchtopk / matryoshka: active features per token
    # matryoshka: nested prefixes that must reconstruct on their own (then the full width). Doubling from one feature:
    # the first levels can hold a finding's side- and zone-free feature (8,32,128 split them; README: SAE results)
    widths: str = "1,2,4,8,16,32,64,128,256"
    l1_coefficient: float = 5.0  # standard
    l0_coefficient: float = 1.0  # jumprelu
    lr: float = 1e-3
    batch_size: int = 1024
    training_tokens: int = 3_000_000
    test_fraction: float = 0.1
    # SAEs trained from seeds seed, seed + 1, ...; the one kept has the best worst-finding AUROC (phantom stores;
    # else explained variance) on val_fraction of the images, held out from training and from the reported split
    inits: int = 3
    val_fraction: float = 0.1
    split_seed: int = 0  # which images are held out (``seed``: the SAE's initialisation and batch order)
    buffer_chunks: int = 16
    checkpoint_every: int = 500_000
    seed: int = 0
    threads: int = 1  # torch intra-op threads: float sums (and so the features learnt) depend on them
    device: str = "cpu"
    out: str = "reports/sae"

    def validate(self) -> None:
        if self.architecture not in ARCHITECTURES:
            raise InterpError(f"unknown architecture {self.architecture!r}: choose {', '.join(ARCHITECTURES)}")
        if self.centre not in CENTRES:
            raise InterpError(f"unknown centre {self.centre!r}: choose {', '.join(CENTRES)}")
        self.nested_widths()
        if self.inits < 1:
            raise InterpError(f"--inits must be >= 1, got {self.inits}")
        if self.inits > 1 and not self.val_fraction:
            raise InterpError("choosing among --inits needs validation images: --val-fraction > 0")
        if self.training_tokens < self.batch_size:
            raise InterpError(f"training tokens ({self.training_tokens}) must be at least one batch ({self.batch_size})")

    def nested_widths(self) -> list[int]:
        """``widths`` as integers (a one-line error for anything else)."""
        try:
            widths = [int(w) for w in self.widths.split(",") if w.strip()]
        except ValueError:
            widths = []
        if not widths or min(widths) < 1:
            raise InterpError(f"--widths must be comma-separated positive integers, got {self.widths!r}")
        return widths
