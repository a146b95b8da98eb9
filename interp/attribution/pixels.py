"""Pixel-space baselines through Captum: saliency, gradient x input, integrated gradients, SmoothGrad,
GradientSHAP and grid occlusion, all on the processor's ``pixel_values`` with the response's summed
teacher-forced log-probability as the attributed scalar, mapped back to the sample's pixels.

The baseline input (IG, GradientSHAP, occlusion) is the processor's encoding of a black image of the
sample's size: what "no evidence" looks like to the model, whatever its normalisation.
"""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np
import torch
from captum.attr import GradientShap, InputXGradient, IntegratedGradients, NoiseTunnel, Occlusion, Saliency

from interp.attribution.base import Attribution, Method, Scorer, pixel_map
from interp.errors import InterpError
from interp.models.adapter import Adapter


def black(scorer: Scorer) -> torch.Tensor:
    """``pixel_values`` of a black image of the sample's size."""
    s = scorer.sample
    return scorer.adapter.encode([np.zeros_like(s.image)], [s.prompt], [s.spans], [scorer.response]).pixel_values


class CaptumMethod(Method):
    """A Captum attribution class applied to ``pixel_values`` (``captum`` + keyword arguments)."""

    captum: ClassVar[Any] = None
    needs_baseline: ClassVar[bool] = False

    def __init__(self, adapter: Adapter, **kwargs: Any) -> None:
        super().__init__(adapter)
        self.kwargs = kwargs

    def explainer(self, scorer: Scorer) -> Any:
        return self.captum(scorer.total)

    def _attribute(self, scorer: Scorer) -> Attribution:
        x = scorer.batch.pixel_values.detach().clone().requires_grad_(True)
        kw = dict(self.kwargs)
        if self.needs_baseline:
            kw["baselines"] = black(scorer)
        attr = self.explainer(scorer).attribute(x, **kw)
        return self.result(scorer, pixel_map(attr, scorer), meta={k: v for k, v in self.kwargs.items() if np.isscalar(v)})


class SaliencyMethod(CaptumMethod):
    """|d score / d pixel| (Simonyan et al. 2014), summed over channels."""

    name = "saliency"
    captum = Saliency


class GradientXInput(CaptumMethod):
    name = "gradient_x_input"
    captum = InputXGradient


class IntegratedGradientsMethod(CaptumMethod):
    """Integrated gradients (Sundararajan et al. 2017) from the black image, 32 steps by default."""

    name = "integrated_gradients"
    captum = IntegratedGradients
    needs_baseline = True

    def __init__(self, adapter: Adapter, n_steps: int = 32, internal_batch_size: int = 16) -> None:
        super().__init__(adapter, n_steps=n_steps, internal_batch_size=internal_batch_size)


class SmoothGrad(CaptumMethod):
    """Saliency averaged over noisy copies (Smilkov et al. 2017); noise std in normalised pixel units."""

    name = "smoothgrad"

    def __init__(self, adapter: Adapter, nt_samples: int = 16, stdevs: float = 0.15, seed: int = 0) -> None:
        super().__init__(adapter, nt_type="smoothgrad", nt_samples=nt_samples, stdevs=stdevs, nt_samples_batch_size=8)
        self.seed = seed

    def explainer(self, scorer: Scorer) -> Any:
        torch.manual_seed(self.seed)
        return NoiseTunnel(Saliency(scorer.total))


class GradientShapMethod(CaptumMethod):
    """GradientSHAP (Lundberg & Lee 2017) with the black image as the baseline distribution."""

    name = "gradient_shap"
    captum = GradientShap
    needs_baseline = True

    def __init__(self, adapter: Adapter, n_samples: int = 16, stdevs: float = 0.1, seed: int = 0) -> None:
        super().__init__(adapter, n_samples=n_samples, stdevs=stdevs)
        self.seed = seed

    def explainer(self, scorer: Scorer) -> Any:
        torch.manual_seed(self.seed)
        return GradientShap(scorer.total)


class GridOcclusion(CaptumMethod):
    """Occlude ``window`` x ``window`` model pixels (default: one patch) with the black image, stride
    ``stride``; a pixel's score is the mean drop of the response's log-probability over windows covering it."""

    name = "occlusion"
    captum = Occlusion
    needs_baseline = True

    def __init__(self, adapter: Adapter, window: int | None = None, stride: int | None = None, batch: int = 16) -> None:
        patch = getattr(adapter, "patch", None)
        window = window or patch
        if not window:
            raise InterpError(f"occlusion: give a window size ({adapter.model_id} has no single patch size)")
        super().__init__(adapter)
        self.window, self.stride, self.batch = window, stride or window, batch

    @torch.no_grad()
    def _attribute(self, scorer: Scorer) -> Attribution:
        x = scorer.batch.pixel_values
        c = x.shape[1]
        attr = Occlusion(scorer.total).attribute(
            x, sliding_window_shapes=(c, self.window, self.window), strides=(c, self.stride, self.stride),
            baselines=black(scorer), perturbations_per_eval=self.batch)
        return self.result(scorer, pixel_map(attr / c, scorer), meta={"window": self.window, "stride": self.stride})


class Rise(CaptumMethod):
    """RISE (Petsiuk et al. 2018; not in Captum): the response's probability under ``n_masks`` random
    masks (a ``cells`` x ``cells`` grid kept with probability ``p``, upsampled bilinearly with a random
    shift) blending the image into the black image; map = sum_i P_i M_i / (n p)."""

    name = "rise"
    needs_baseline = True

    def __init__(self, adapter: Adapter, n_masks: int = 256, cells: int = 8, p: float = 0.5, batch: int = 32, seed: int = 0) -> None:
        super().__init__(adapter)
        self.n_masks, self.cells, self.p, self.batch, self.seed = n_masks, cells, p, batch, seed

    def masks(self, h: int, w: int) -> torch.Tensor:
        """[n, 1, h, w] masks over the model's input pixels."""
        g = torch.Generator().manual_seed(self.seed)
        grid = (torch.rand(self.n_masks, 1, self.cells, self.cells, generator=g) < self.p).float()
        ch, cw = -(-h // self.cells), -(-w // self.cells)
        up = torch.nn.functional.interpolate(grid, size=((self.cells + 1) * ch, (self.cells + 1) * cw), mode="bilinear",
                                             align_corners=False)
        dy, dx = torch.randint(0, ch, (self.n_masks,), generator=g), torch.randint(0, cw, (self.n_masks,), generator=g)
        return torch.stack([up[i, :, y:y + h, x:x + w] for i, (y, x) in enumerate(zip(dy.tolist(), dx.tolist()))])

    @torch.no_grad()
    def _attribute(self, scorer: Scorer) -> Attribution:
        x, base = scorer.batch.pixel_values, black(scorer)
        if x.dim() != 4:
            raise InterpError(f"rise needs pixel values [rows, C, h, w], got {tuple(x.shape)}")
        masks = self.masks(*x.shape[-2:]).to(x.dtype)
        total = torch.zeros(x.shape[-2:], dtype=torch.float64)
        for i in range(0, self.n_masks, self.batch):
            m = masks[i:i + self.batch]
            prob = scorer.total(x * m + base * (1 - m)).exp()
            total += (prob[:, None, None] * m[:, 0].double()).sum(0)
        attr = (total / (self.n_masks * self.p))[None, None]
        return self.result(scorer, pixel_map(attr, scorer), meta={"n_masks": self.n_masks, "cells": self.cells, "p": self.p})
