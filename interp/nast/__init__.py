"""NAST: negation tracing (CTE per layer x role) -> alpha_l -> alpha_l^beta-scaled LoRA training.

Names are imported on first use, so ``python -m interp.nast --help`` answers before torch loads.
"""

from __future__ import annotations

import importlib

_FROM = {**dict.fromkeys(("AGGREGATES", "ROLES", "CTEResult", "NegationPair", "alphas_from_cte", "alphas_from_profile",
                          "check_alphas", "minmax", "negation_pairs", "negation_trace", "seed_stability", "spearman",
                          "token_roles", "trace_pair"), "cte"),
         "ScaledLoRA": "lora", "apply_scaled_lora": "lora"}
__all__ = sorted(_FROM)


def __getattr__(name: str):
    if name not in _FROM:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_FROM[name]}"), name)
