"""SAE training settings (light: the command line parses them before torch loads)."""

from __future__ import annotations

from dataclasses import dataclass

from interp.errors import InterpError

ARCHITECTURES = ("standard", "topk", "batchtopk", "jumprelu", "matryoshka")


@dataclass
class SAETrainConfig:
    """One SAE training run (SAELens-style: the architecture's own knobs sit beside the shared ones)."""

    store: str = "caches/organism-phantom-train-2000.zarr"
    site: str = "projector.out"
    tokens: str = "patch"
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
    buffer_chunks: int = 16
    checkpoint_every: int = 500_000
    seed: int = 0
    threads: int = 1  # torch intra-op threads: float sums (and so the features learnt) depend on them
    device: str = "cpu"
    out: str = "reports/sae"

    def validate(self) -> None:
        if self.architecture not in ARCHITECTURES:
            raise InterpError(f"unknown architecture {self.architecture!r}: choose {', '.join(ARCHITECTURES)}")
        self.nested_widths()
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
