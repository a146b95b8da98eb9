"""Data sets by name: the built-in phantom splits, or a saved VQA data set (JSON)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from interp.data.vqa import SPLITS, VQADataset, build_vqa
from interp.errors import InterpError

BUILTIN = {f"phantom-{split}": split for split in SPLITS}  # built with seed 0 from BUILTIN_IMAGES phantoms
BUILTIN_IMAGES = 16


def load_dataset(spec: str, limit: int | None = None) -> VQADataset:
    """A saved VQA data set (JSON file) or a built-in phantom split, optionally its first ``limit`` items."""
    if spec in BUILTIN:
        data = build_vqa(BUILTIN_IMAGES, seed=0, split=BUILTIN[spec])
    elif Path(spec).is_file():
        data = VQADataset.load(spec)
    else:
        raise InterpError(f"unknown data set {spec!r}: give a saved VQA .json file or one of {', '.join(BUILTIN)}")
    if limit is not None:
        if limit < 1:
            raise InterpError(f"--limit must be >= 1, got {limit}")
        data = replace(data, items=data.items[:limit])
    if not data.items:
        raise InterpError(f"empty data set: {spec} has no items")
    return data
