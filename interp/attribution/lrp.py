"""CP-LRP for the language decoder: conservative gradient x input at the LM's input embeddings.

Ali et al. 2022 ("XAI for Transformers: Better Explanations through Conservative Propagation") show that
gradient x input becomes a conservative LRP-0 relevance once the gradient is stopped where the network
is not locally linear: through the attention probabilities and through the normalisation layers' scale.
Following ``lxt``'s CP-LRP rules for Llama-style decoders (AttnLRP, Achtibat et al. 2024), the SwiGLU
gate is detached too, so the gated MLP is linear in its ``up_proj`` branch. With all three detached, a
bias-free decoder (Llama, Qwen2, Gemma) is linear in its input embeddings up to the logits, so the
relevance summed over every LM input position equals ``sum_t (z_t - E_{p_t}[z])``: the attributed
scalar ``sum_t log p_t`` plus the entropies of the predicted distributions (the log-softmax's own
gradient x input leaves out ``-H(p_t)``).

The rules are PyTorch forward hooks on the LM's modules, removed in a ``finally`` (nothing is patched):

- ``attention``: the outputs of ``q_proj`` and ``k_proj`` are detached, which stops the gradient through
  ``softmax(q k^T)`` while the values keep theirs;
- ``norm``: a norm's output ``y`` becomes ``(y - b) * r / r.detach() + b`` with ``r`` its (centred for
  LayerNorm) root mean square plus epsilon: the same value, and exactly the gradient of the norm with its
  scale frozen, whatever its weight form (``w * h``, Gemma's ``(1 + w) * h``);
- ``gate``: the outputs of ``gate_proj`` are detached.

``detach=()`` runs the same code with no rule: plain gradient x input.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator, Sequence

import torch
from torch import nn

from interp.attribution.attention import read_grads
from interp.attribution.base import Attribution, Method, Scorer
from interp.errors import InterpError
from interp.models.adapter import Adapter

RULES = ("attention", "norm", "gate")
SITES = ("lm.embed", "projector.out")


def language_model(adapter: Adapter) -> nn.Module:
    """The LM's module: the parent of its block list, found through the adapter's site map."""
    block = adapter.hooks["lm.blocks.0.resid_pre"].module
    return adapter.model.get_submodule(block.rsplit(".", 2)[0])


def _detach(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
    return output.detach()


def _frozen_scale(module: nn.Module, args: tuple, kwargs: dict[str, Any], output: torch.Tensor) -> torch.Tensor:
    """The norm's output with the gradient of its scale stopped (value unchanged)."""
    x = (args[0] if args else next(iter(kwargs.values()))).float()
    centred = isinstance(module, nn.LayerNorm)
    if centred:
        x = x - x.mean(-1, keepdim=True)
    eps = getattr(module, "variance_epsilon", getattr(module, "eps", 0.0))
    r = (x.pow(2).mean(-1, keepdim=True) + eps).sqrt()
    bias = module.bias if centred and module.bias is not None else 0.0
    return ((output - bias) * (r / r.detach())).to(output.dtype) + bias


def _supported_norm(module: nn.Module) -> bool:
    return isinstance(module, nn.LayerNorm) or hasattr(module, "variance_epsilon") or type(module).__name__.endswith("RMSNorm")


@contextmanager
def cp_rules(adapter: Adapter, rules: Sequence[str] = RULES) -> Iterator[None]:
    """Within the block, the LM's forward pass applies the CP-LRP ``rules`` (see the module docstring)."""
    modules = dict(language_model(adapter).named_modules())
    detached = ({"q_proj", "k_proj"} if "attention" in rules else set()) | ({"gate_proj"} if "gate" in rules else set())
    norms = [m for m in modules.values() if "norm" in type(m).__name__.lower()] if "norm" in rules else []
    if "attention" in rules and sum(n.endswith((".q_proj", ".k_proj")) for n in modules) < 2 * adapter.n_layers("lm"):
        raise InterpError(f"lrp: {adapter.model_id}'s LM has no q_proj/k_proj per layer: cannot detach its attention")
    for m in norms:
        if not _supported_norm(m):
            raise InterpError(f"lrp: no frozen-scale rule for {type(m).__name__} in {adapter.model_id}'s LM")
    handles = [m.register_forward_hook(_detach) for n, m in modules.items() if n.rsplit(".", 1)[-1] in detached]
    handles += [m.register_forward_hook(_frozen_scale, with_kwargs=True) for m in norms]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


class CPLRP(Method):
    """CP-LRP relevance of the image tokens at ``site`` (``lm.embed``: the LM's input embeddings, or
    ``projector.out``), with the rules ``detach`` (default: all of ``RULES``)."""

    name = "lrp"

    def __init__(self, adapter: Adapter, site: str = "lm.embed", detach: Sequence[str] = RULES) -> None:
        super().__init__(adapter)
        unknown = sorted(set(detach) - set(RULES))
        if unknown:
            raise InterpError(f"lrp: unknown rule {unknown[0]!r}; choose from {', '.join(RULES)}")
        if site not in SITES:
            raise InterpError(f"lrp: site must be one of {', '.join(SITES)}, not {site!r}")
        adapter.expand_sites([site])
        self.site, self.detach = site, tuple(detach)

    def relevance(self, scorer: Scorer) -> tuple[float, torch.Tensor]:
        """(attributed scalar, relevance per position of the site: [seq] at ``lm.embed``, [n_img] at
        ``projector.out``)."""
        with cp_rules(self.adapter, self.detach):
            score, (x,), (g,) = read_grads(scorer, [self.site])
        return score, (x * g).sum(-1).reshape(-1)

    def _attribute(self, scorer: Scorer) -> Attribution:
        score, rel = self.relevance(scorer)
        tokens = rel[scorer.image_index] if self.site == "lm.embed" else rel
        if len(tokens) != len(scorer.image_index):
            raise InterpError(f"lrp: {self.site} has {len(tokens)} tokens for {len(scorer.image_index)} LM image tokens: use lm.embed")
        return self.token_map(scorer, tokens, meta={"site": self.site, "detach": list(self.detach), "score": score,
                                                    "relevance_sum": float(rel.sum())})
