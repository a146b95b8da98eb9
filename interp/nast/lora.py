"""alpha^beta-scaled LoRA on a dual encoder's text tower (vision optional), through peft.

LoRA adapters (``peft.inject_adapter_in_model``, in place: module paths, hence the adapter's
sites, do not change) go on every attention projection (q, k, v, out) and MLP linear (fc1, fc2)
of each text block; everything else is frozen. NAST's per-layer scaling is implemented as
**gradient hooks**: each LoRA parameter of block l gets ``grad <- alpha_l ** beta * grad``
(``Tensor.register_hook``), so anything that reads ``.grad`` (the optimizer, clipping) sees
the scaled gradient. With plain SGD (+ momentum) this scales block l's update by
``alpha_l ** beta`` exactly; Adam-type optimizers normalise gradients per parameter and undo a
constant scale (except where alpha = 0), which is why the training loop uses SGD for the
gradient mode and offers a per-layer learning-rate mode for AdamW (``param_groups``).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from interp.errors import InterpError
from interp.models.seeds import isolated_rng
from interp.nast.cte import check_alphas

PARTS = {
    "attn": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj"),
    "mlp": ("mlp.fc1", "mlp.fc2"),
}
TOWER_ROOT = {"text": "text_model.encoder.layers", "vision": "vision_model.encoder.layers"}
_LAYER = re.compile(r"(text|vision)_model\.encoder\.layers\.(\d+)\.")


def n_blocks(model: torch.nn.Module, tower: str = "text") -> int:
    cfg = model.config.text_config if tower == "text" else model.config.vision_config
    return int(cfg.num_hidden_layers)


def target_regex(towers: Sequence[str] = ("text",), parts: Sequence[str] = ("attn", "mlp")) -> str:
    bad = [p for p in parts if p not in PARTS] + [t for t in towers if t not in TOWER_ROOT]
    if bad:
        raise InterpError(f"unknown LoRA target {bad[0]!r}: parts {', '.join(PARTS)}, towers {', '.join(TOWER_ROOT)}")
    roots = "|".join(re.escape(TOWER_ROOT[t]) for t in towers)
    mods = "|".join(re.escape(m) for p in parts for m in PARTS[p])
    return rf"(?:{roots})\.\d+\.(?:{mods})"


def layer_of(param_name: str) -> tuple[str, int]:
    """(tower, block index) of a LoRA parameter name."""
    m = _LAYER.search(param_name)
    if not m:
        raise InterpError(f"parameter {param_name!r} is not inside a text/vision block")
    return m.group(1), int(m.group(2))


@dataclass
class ScaledLoRA:
    """LoRA params per (tower, layer), their scales, and the hook handles."""

    model: torch.nn.Module
    scales: dict[str, np.ndarray]
    params: dict[tuple[str, int], list[tuple[str, torch.nn.Parameter]]]
    handles: list = field(default_factory=list)
    lora_scaling: float = 1.0

    def trainable(self) -> list[torch.nn.Parameter]:
        return [p for ps in self.params.values() for _, p in ps]

    def param_groups(self, lr: float) -> list[dict]:
        """One optimizer group per layer with lr * its scale (the learning-rate mode)."""
        return [{"params": [p for _, p in ps], "lr": lr * float(self.scales[t][l]), "name": f"{t}.{l}"}
                for (t, l), ps in sorted(self.params.items())]

    def remove_hooks(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles.clear()

    @torch.no_grad()
    def delta_norms(self, tower: str = "text") -> np.ndarray:
        """[layers] Frobenius norm of the layer's LoRA weight updates (sqrt of the sum over its
        modules of ||scaling * B @ A||^2): where training moved the weights."""
        n = n_blocks(self.model, tower)
        out = np.zeros(n)
        for name, mod in self.model.named_modules():
            if not hasattr(mod, "lora_A") or "default" not in getattr(mod, "lora_A", {}):
                continue
            t, l = layer_of(name + ".")
            if t != tower:
                continue
            d = mod.lora_B["default"].weight @ mod.lora_A["default"].weight * mod.scaling["default"]
            out[l] += float(d.pow(2).sum())
        return np.sqrt(out)


@isolated_rng
def apply_scaled_lora(
    model: torch.nn.Module,
    alphas: Sequence[float] | None,
    beta: float = 1.0,
    *,
    rank: int = 8,
    lora_alpha: float = 16.0,
    dropout: float = 0.0,
    parts: Sequence[str] = ("attn", "mlp"),
    vision: bool = False,
    vision_alphas: Sequence[float] | None = None,
    hooks: bool = True,
    seed: int = 0,
) -> ScaledLoRA:
    """Inject LoRA (in place) and register alpha_l^beta gradient hooks on each layer's LoRA
    params. ``alphas=None``: uniform LoRA (scale 1). ``hooks=False``: scales are only recorded
    (use ``param_groups`` for the learning-rate mode)."""
    from peft import LoraConfig, inject_adapter_in_model

    if beta < 0 or not np.isfinite(beta):
        raise InterpError(f"beta must be finite and >= 0, got {beta}")
    towers = ("text", "vision") if vision else ("text",)
    scales = {}
    for t, a in (("text", alphas), ("vision", vision_alphas)):
        if t not in towers:
            continue
        n = n_blocks(model, t)
        a = np.ones(n) if a is None else check_alphas(a, n) if t == "text" else _check_vision(a, n)
        scales[t] = np.power(a, beta)  # 0 ** 0 = 1: beta 0 is uniform LoRA
    torch.manual_seed(seed)  # LoRA A init
    cfg = LoraConfig(r=rank, lora_alpha=lora_alpha, lora_dropout=dropout, target_modules=target_regex(towers, parts))
    inject_adapter_in_model(cfg, model)
    params: dict[tuple[str, int], list] = {}
    for name, p in model.named_parameters():
        if "lora_" in name:
            params.setdefault(layer_of(name), []).append((name, p))
        else:
            p.requires_grad_(False)
    lora = ScaledLoRA(model, scales, params, lora_scaling=lora_alpha / rank)
    if hooks:
        for (t, l), ps in params.items():
            s = float(scales[t][l])
            for _, p in ps:
                lora.handles.append(p.register_hook(lambda g, s=s: g * s))
    return lora


def _check_vision(a, n):
    v = np.asarray(a, dtype=np.float64).reshape(-1)
    if len(v) != n:
        raise InterpError(f"vision alphas have length {len(v)}, but the vision encoder has {n} layers")
    return check_alphas(v, n)
