"""Grad-CAM and Grad-CAM++ in the language decoder, over the image tokens as the "spatial" positions.

Activations ``A`` [n_img, d] are one LM site's values at the image-token positions, with the gradients
``G`` of the response's summed log-probability; channel weights ``w`` [d] come from ``G``, and the map is
``ReLU(A @ w)`` painted through each token's box.

- Grad-CAM (Selvaraju et al. 2017): ``w_c = mean_i G_ic``;
- Grad-CAM++ (Chattopadhay et al. 2018), with their closed form for an exponential score ``exp(S)``
  (whose positive factor is dropped): ``alpha_ic = G_ic^2 / (2 G_ic^2 + sum_j A_jc G_ic^3)`` (0 where the
  denominator is), ``w_c = sum_i alpha_ic ReLU(G_ic)``.

The default site is the last block's input ``lm.blocks.{last}.resid_pre``: the deepest site whose
image-token values still reach the response. (The last block's output at an image token feeds only that
token's own logits, so its gradient there is zero.)
"""

from __future__ import annotations

import torch

from interp import sites as S
from interp.attribution.attention import read_grads
from interp.attribution.base import Attribution, Method, Scorer
from interp.errors import InterpError
from interp.models.adapter import Adapter


class GradCam(Method):
    """Grad-CAM at an LM site of shape [rows, seq, d] (default: the last block's input)."""

    name = "grad_cam"

    def __init__(self, adapter: Adapter, site: str | None = None) -> None:
        super().__init__(adapter)
        self.site = site or f"lm.blocks.{adapter.n_layers('lm') - 1}.resid_pre"
        s = S.parse(self.site)
        if adapter.expand_sites([self.site]) != [self.site] or s.tower != "lm" or s.point in ("attn.pattern", "logits"):
            raise InterpError(f"{self.name}: site must be one LM site [rows, seq, d] "
                              f"(lm.embed, lm.blocks.<l>.resid_pre|attn.out|mlp.out|resid_post), not {self.site!r}")

    def weights(self, acts: torch.Tensor, grads: torch.Tensor) -> torch.Tensor:
        """Channel weights [d] from activations and gradients [n_img, d]."""
        return grads.mean(0)

    def _attribute(self, scorer: Scorer) -> Attribution:
        _, (value,), (grad,) = read_grads(scorer, [self.site])
        acts, grads = value[0, scorer.image_index], grad[0, scorer.image_index]
        return self.token_map(scorer, torch.relu(acts @ self.weights(acts, grads)), meta={"site": self.site})


class GradCamPlusPlus(GradCam):
    """Grad-CAM++ with the exponential-score closed form of its alpha weights."""

    name = "grad_cam_plus_plus"

    def weights(self, acts: torch.Tensor, grads: torch.Tensor) -> torch.Tensor:
        g2 = grads.pow(2)
        denom = 2 * g2 + acts.sum(0) * grads.pow(3)
        alpha = torch.where(denom != 0, g2 / torch.where(denom != 0, denom, 1.0), 0.0)
        return (alpha * torch.relu(grads)).sum(0)
