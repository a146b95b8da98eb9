"""Attribution behind one protocol (``method.attribute(sample, target) -> Attribution``): pixel and
token-space baselines, the layer sweep as a method, and MedFocus; :func:`method` builds one by name."""

from __future__ import annotations

import importlib
from typing import Any

from interp.errors import InterpError

#: method name -> (module, class, keyword arguments)
METHODS: dict[str, tuple[str, str, dict[str, Any]]] = {
    "saliency": ("pixels", "SaliencyMethod", {}),
    "gradient_x_input": ("pixels", "GradientXInput", {}),
    "smoothgrad": ("pixels", "SmoothGrad", {}),
    "gradient_shap": ("pixels", "GradientShapMethod", {}),
    "integrated_gradients": ("pixels", "IntegratedGradientsMethod", {}),
    "occlusion": ("pixels", "GridOcclusion", {}),
    "rise": ("pixels", "Rise", {}),
    "attention_head": ("attention", "AttentionHead", {}),
    "attention_rollout": ("attention", "AttentionRollout", {}),
    "attention_relevance": ("attention", "AttentionRelevance", {}),
    "gradient_weighted_attention": ("attention", "GradientWeightedAttention", {}),
    "grad_cam": ("gradcam", "GradCam", {}),
    "grad_cam_plus_plus": ("gradcam", "GradCamPlusPlus", {}),
    "lrp": ("lrp", "CPLRP", {}),
    "causal_trace": ("tracing", "CausalTrace", {}),
    "prompting": ("prompting", "Prompting", {}),
    "prompting_segmentation": ("prompting", "Prompting", {"segment": True}),
    "medfocus": ("medfocus", "MedFocus", {}),
    "medfocus_refined": ("medfocus", "MedFocus", {"refine": True}),
    "medfocus_sharp": ("medfocus", "MedFocus", {"refine": True, "reg": 0.005}),
    "medfocus_reference": ("medfocus", "MedFocus", {"refine": True, "fill": "reference"}),
    "medfocus_specific": ("medfocus", "MedFocus", {"refine": True, "fill": "reference", "specific": 0.9}),
    "medfocus_patch_mean": ("medfocus", "MedFocus", {"intervention": "patch", "values": "mean"}),
    "medfocus_patch_counterfactual": ("medfocus", "MedFocus", {"intervention": "patch", "values": "counterfactual"}),
    "medfocus_patch_noise": ("medfocus", "MedFocus", {"intervention": "patch", "values": "noise"}),
}


def check_names(names: list[str] | tuple[str, ...]) -> None:
    """A one-line error naming the first of ``names`` that is not a method."""
    unknown = [n for n in names if n not in METHODS]
    if unknown:
        raise InterpError(f"unknown attribution method {unknown[0]!r}; choose from {', '.join(METHODS)}")


def method(name: str, adapter: Any, **kwargs: Any) -> Any:
    """The attribution method ``name`` on ``adapter`` (keyword arguments override its defaults)."""
    check_names([name])
    module, cls, defaults = METHODS[name]
    return getattr(importlib.import_module(f"interp.attribution.{module}"), cls)(adapter, **{**defaults, **kwargs})
