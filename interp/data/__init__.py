"""Data layer: synthetic CXR phantoms with exact ground truth, VQA items, image loading."""

from interp.data.images import load_image
from interp.data.phantom import (
    CONCEPTS,
    CONFOUNDERS,
    FINDINGS,
    SEVERITIES,
    SIDES,
    ZONES,
    Anatomy,
    Finding,
    Phantom,
    PhantomSpec,
    render,
    sample_spec,
)
from interp.data.vqa import (
    ALL_KINDS,
    CHAIN_END,
    MODES,
    VQADataset,
    VQAItem,
    build_vqa,
    split_target,
    vocabulary,
)

__all__ = [
    "ALL_KINDS", "CHAIN_END", "CONCEPTS", "CONFOUNDERS", "FINDINGS", "MODES", "SEVERITIES",
    "SIDES", "ZONES", "Anatomy", "Finding", "Phantom", "PhantomSpec", "VQADataset", "VQAItem",
    "build_vqa", "load_image", "render", "sample_spec", "split_target", "vocabulary",
]
