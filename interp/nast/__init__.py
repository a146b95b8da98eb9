"""NAST: negation tracing (CTE per layer x role) -> alpha_l -> alpha_l^beta-scaled LoRA training."""

from interp.nast.cte import (
    AGGREGATES,
    ROLES,
    CTEResult,
    NegationPair,
    alphas_from_cte,
    alphas_from_profile,
    check_alphas,
    minmax,
    negation_pairs,
    negation_trace,
    seed_stability,
    spearman,
    token_roles,
    trace_pair,
)
from interp.nast.lora import ScaledLoRA, apply_scaled_lora

__all__ = [
    "AGGREGATES", "ROLES", "CTEResult", "NegationPair", "ScaledLoRA", "alphas_from_cte", "alphas_from_profile",
    "apply_scaled_lora", "check_alphas", "minmax", "negation_pairs", "negation_trace", "seed_stability",
    "spearman", "token_roles", "trace_pair",
]
