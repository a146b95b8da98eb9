"""The layer sweep as an attribution method: ROME causal tracing of the image (noise on the image tokens'
embeddings, each patch restored at each layer; :func:`interp.trace.patching.restore_sweep`), with the
response's answer token as the metric. A patch's score is its best restoration effect over layers;
the whole [layers, patches] grid stays in ``meta``."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import torch

from interp.attribution.base import Attribution, Method, Scorer, paint
from interp.errors import InterpError
from interp.models.adapter import Adapter
from interp.trace.patching import Noise, metric_fn, restore_sweep
from interp.trace.sweep import noised, tower_positions


class CausalTrace(Method):
    """Causal tracing over image patches of ``tower`` (``vision`` or ``lm``) at ``point`` sites; noise
    ``noise_scale`` x the std of the corrupted embeddings, ``copies`` noise draws (ROME: 3x, 10)."""

    name = "causal_trace"

    def __init__(self, adapter: Adapter, tower: str = "vision", point: str = "resid_post", copies: int = 10,
                 noise_scale: float = 3.0, window: int = 1, seed: int = 0) -> None:
        super().__init__(adapter)
        if tower not in ("vision", "lm"):
            raise InterpError(f"causal_trace sweeps the vision or lm tower, not {tower!r}")
        adapter.n_layers(tower)
        self.tower, self.point, self.copies, self.noise_scale, self.window, self.seed = tower, point, copies, noise_scale, window, seed

    @torch.no_grad()
    def _attribute(self, scorer: Scorer) -> Attribution:
        # the metric reads the position that predicts the response's last token (the answer word)
        positions = replace(scorer.positions, spans={**scorer.positions.spans, "answer": [int(scorer.predict_at[-1])]})
        batch = replace(scorer.batch, positions=[positions])
        site, pos = noised(self.adapter, self.tower, batch, "image")
        _, cache = self.adapter.run(batch, read=[site])
        std = self.noise_scale * float(cache[site][0, pos].std())
        noise = Noise(site, tuple(pos), std, self.copies, self.seed)
        metric = metric_fn("logprob", int(scorer.targets[-1]), [])
        groups = [[p] for p in pos]
        n = self.adapter.n_layers(self.tower)
        res = restore_sweep(self.adapter, batch, batch, metric, tower=self.tower, layers=range(n), groups=groups,
                            point=self.point, window=self.window, noise=noise)
        effect = res.restored - res.corrupted  # [layers, patches], in log-probability
        where = tower_positions(self.adapter, self.tower, batch)
        image_map = paint(effect.max(0), where, pos, scorer.sample.image.shape[:2])
        return self.result(scorer, image_map, meta={"tower": self.tower, "effect": effect.tolist(), "clean": res.clean,
                                                    "corrupted": res.corrupted, "best_layer": int(np.argmax(effect.max(1)))})
