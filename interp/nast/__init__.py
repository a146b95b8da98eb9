"""NAST: negation tracing (CTE per layer x role) -> alpha_l -> alpha_l^beta-scaled LoRA training.

Names are imported on first use (``interp.lazy``), so ``python -m interp.nast --help`` answers before torch loads.
"""

from __future__ import annotations

from interp.lazy import exports

_FROM = {**dict.fromkeys(("AGGREGATES", "ROLES", "CTEResult", "NegationPair", "alphas_from_cte", "alphas_from_profile",
                          "check_alphas", "minmax", "negation_pairs", "negation_trace", "seed_stability", "spearman",
                          "token_roles", "trace_pair"), "cte"),
         "ScaledLoRA": "lora", "apply_scaled_lora": "lora"}
__all__ = sorted(_FROM)

__getattr__ = exports(__name__, _FROM)
