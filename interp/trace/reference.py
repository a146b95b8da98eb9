"""The plain per-(layer, position) loop with PyTorch forward hooks, as ROME's ``causal_trace`` does.

Kept deliberately naive and independent of the adapter and nnsight: tests check the batched
sweep against it, and ``benchmarks/layer_sweep.py`` times the sweep against it.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from interp.trace.patching import Metric, Noise, window_layers


def _blocks(model: torch.nn.Module, tower: str) -> torch.nn.ModuleList:
    return model.model.language_model.layers if tower == "lm" else model.model.vision_tower.encoder.layers


def _noise_module(model: torch.nn.Module, site: str) -> tuple[torch.nn.Module, bool]:
    """(module, is_pre_hook): lm.embed is the first LM block's input; vision.embed the embeddings' output."""
    if site == "lm.embed":
        return model.model.language_model.layers[0], True
    return model.model.vision_tower.embeddings, False


def reference_trace(
    model: torch.nn.Module,
    inputs: dict[str, torch.Tensor],
    answer_index: int,
    metric: Metric,
    *,
    tower: str,
    layers: Sequence[int],
    groups: Sequence[Sequence[int]],
    noise: Noise,
    window: int = 1,
) -> tuple[np.ndarray, float, float]:
    """ROME's loop: one forward per (layer, group) on [clean, noised x copies]; returns (restored, clean, corrupted)."""
    blocks = _blocks(model, tower)
    n = len(blocks)
    rows = 1 + noise.copies
    batch = {k: v.expand(rows, *v.shape[1:]).clone() for k, v in inputs.items()}
    pos = torch.tensor(noise.positions)

    def add_noise(x: torch.Tensor) -> torch.Tensor:
        x = x.clone()
        x[1:, pos] += noise.sample(x.shape[-1], x.dtype)
        return x

    mod, pre = _noise_module(model, noise.site)

    def run(patch: dict[int, list[int]]) -> torch.Tensor:
        handles = [
            mod.register_forward_pre_hook(lambda m, a, kw: ((add_noise(a[0]), *a[1:]), kw), with_kwargs=True)
            if pre
            else mod.register_forward_hook(lambda m, a, out: add_noise(out))
        ]

        def restore(positions: list[int]):
            def hook(m, a, out):
                h = out[0] if isinstance(out, tuple) else out
                h[1:, positions] = h[0, positions]
                return out

            return hook

        for layer, positions in patch.items():
            handles.append(blocks[layer].register_forward_hook(restore(positions)))
        try:
            with torch.no_grad():
                logits = model(**batch).logits
        finally:
            for h in handles:
                h.remove()
        return metric(logits[:, answer_index])

    base = run({})
    clean, corrupted = float(base[0]), float(base[1:].mean())
    out = np.zeros((len(layers), len(groups)))
    for li, layer in enumerate(layers):
        for gi, g in enumerate(groups):
            out[li, gi] = float(run({j: list(g) for j in window_layers(layer, window, n)})[1:].mean())
    return out, clean, corrupted
