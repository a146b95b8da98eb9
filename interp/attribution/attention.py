"""Attention-based token-space baselines in the language decoder (the MedFocus paper's attention baselines).

Each reads the LM's attention weights (``lm.blocks.{l}.attn.pattern`` [rows, heads, seq, seq]; they need
``attn_implementation="eager"``, as ``interp.models.registry`` loads every model) and scores the image
tokens as keys, from the query positions that predict the response tokens (``scorer.predict_at``),
averaged over those queries:

- ``attention_head``: one head's raw attention at one layer;
- ``attention_rollout``: Abnar & Zuidema 2020, head-mean attention plus identity, row-normalised,
  multiplied through the layers;
- ``attention_relevance``: Chefer et al. 2021 (bi-modal / encoder-decoder), ``R = I`` then per layer
  ``R += mean_h((dS/dA * A)^+) @ R``;
- ``gradient_weighted_attention``: one layer's ``mean_h((dS/dA * A)^+)``.

``S`` is the response's summed teacher-forced log-probability. Its gradient w.r.t. the attention
weights comes from reading the pattern sites in a differentiable run: the weights the eager attention
returns are the very tensor it multiplies the values with, so ``torch.autograd.grad`` on the cached
pattern gives dS/dA exactly.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch

from interp.attribution.base import Attribution, Method, Scorer
from interp.errors import InterpError
from interp.models.adapter import Adapter


def cached(scorer: Scorer, cache: Mapping[str, Any], sites: Sequence[str]) -> list[torch.Tensor]:
    """The values of ``sites`` in ``cache``; InterpError names a site that gave no tensor."""
    for site in sites:
        if not isinstance(cache[site], torch.Tensor):
            hint = " (attention weights need attn_implementation='eager')" if site.endswith("attn.pattern") else ""
            raise InterpError(f"{scorer.adapter.model_id} gives no tensor at {site}{hint}")
    return [cache[s] for s in sites]


def read_grads(scorer: Scorer, sites: Sequence[str]) -> tuple[float, list[torch.Tensor], list[torch.Tensor]]:
    """(score, values, gradients) of ``sites`` in one differentiable run of the scorer's batch, the
    score being the response's summed log-probability and the gradients d score / d value."""
    logp, cache = scorer.run(read=list(sites), grad=True)
    values = cached(scorer, cache, sites)
    score = logp.sum()
    grads = torch.autograd.grad(score, values, materialize_grads=True)
    return float(score.detach()), [v.detach().double() for v in values], [g.double() for g in grads]


def image_rows(scorer: Scorer, m: torch.Tensor) -> torch.Tensor:
    """[..., seq, seq] query-by-key map -> [..., n_img]: each image token's score as a key, averaged
    over the queries that predict the response tokens."""
    return m[..., scorer.predict_at.to(m.device), :][..., scorer.image_index].mean(-2)


def positive_grad_attention(pattern: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """Chefer et al.'s head-mean of the positive part of gradient x attention: [heads, seq, seq] -> [seq, seq]."""
    return (grad * pattern).clamp(min=0).mean(0)


class AttentionMethod(Method):
    """Shared plumbing: the LM layers' attention weights (and their gradients) for row 0."""

    def __init__(self, adapter: Adapter) -> None:
        super().__init__(adapter)
        self.n_layers = adapter.n_layers("lm")

    def layer_index(self, layer: int | None) -> int:
        """``layer`` (negative counts from the end; None: the last layer) -> 0..n_layers - 1."""
        if layer is None:
            return self.n_layers - 1
        if not -self.n_layers <= layer < self.n_layers:
            raise InterpError(f"{self.name}: layer {layer} out of range: {self.adapter.model_id} has LM layers 0..{self.n_layers - 1}")
        return layer % self.n_layers

    def patterns(self, scorer: Scorer, layers: Sequence[int], grad: bool = False
                 ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Per layer, row 0's attention weights [heads, seq, seq] and, with ``grad``, d score / d weights
        (else an empty list)."""
        sites = [f"lm.blocks.{l}.attn.pattern" for l in layers]
        if grad:
            _, values, grads = read_grads(scorer, sites)
            return [v[0] for v in values], [g[0] for g in grads]
        _, cache = scorer.run(read=sites)
        return [v[0].double() for v in cached(scorer, cache, sites)], []


class AttentionHead(AttentionMethod):
    """Raw attention of one head at one layer (default: the last layer and, per sample, the head whose
    attention mass on the image tokens is largest); ``meta`` records the layer and head used."""

    name = "attention_head"

    def __init__(self, adapter: Adapter, layer: int | None = None, head: int | None = None) -> None:
        super().__init__(adapter)
        self.layer, self.head = self.layer_index(layer), head

    def _attribute(self, scorer: Scorer) -> Attribution:
        (pattern,), _ = self.patterns(scorer, [self.layer])
        per_head = image_rows(scorer, pattern)  # [heads, n_img]
        if self.head is not None and not 0 <= self.head < len(per_head):
            raise InterpError(f"{self.name}: head {self.head} out of range: layer {self.layer} has heads 0..{len(per_head) - 1}")
        head = int(per_head.sum(-1).argmax()) if self.head is None else self.head
        return self.token_map(scorer, per_head[head], meta={"layer": self.layer, "head": head})


class AttentionRollout(AttentionMethod):
    """Attention rollout (Abnar & Zuidema 2020) through every LM layer."""

    name = "attention_rollout"

    def _attribute(self, scorer: Scorer) -> Attribution:
        patterns, _ = self.patterns(scorer, range(self.n_layers))
        eye = torch.eye(patterns[0].shape[-1], dtype=patterns[0].dtype, device=patterns[0].device)
        rollout = eye
        for pattern in patterns:
            a = pattern.mean(0) + eye
            rollout = (a / a.sum(-1, keepdim=True)) @ rollout
        return self.token_map(scorer, image_rows(scorer, rollout))


class AttentionRelevance(AttentionMethod):
    """Generic attention-model explainability (Chefer et al. 2021) through every LM layer."""

    name = "attention_relevance"

    def _attribute(self, scorer: Scorer) -> Attribution:
        patterns, grads = self.patterns(scorer, range(self.n_layers), grad=True)
        relevance = torch.eye(patterns[0].shape[-1], dtype=patterns[0].dtype, device=patterns[0].device)
        for pattern, grad in zip(patterns, grads):
            relevance = relevance + positive_grad_attention(pattern, grad) @ relevance
        return self.token_map(scorer, image_rows(scorer, relevance))


class GradientWeightedAttention(AttentionMethod):
    """Head-mean of (gradient x attention)^+ at one layer (default: the last)."""

    name = "gradient_weighted_attention"

    def __init__(self, adapter: Adapter, layer: int | None = None) -> None:
        super().__init__(adapter)
        self.layer = self.layer_index(layer)

    def _attribute(self, scorer: Scorer) -> Attribution:
        (pattern,), (grad,) = self.patterns(scorer, [self.layer], grad=True)
        return self.token_map(scorer, image_rows(scorer, positive_grad_attention(pattern, grad)), meta={"layer": self.layer})
