"""Data sets by name: the built-in phantom splits, or a saved VQA data set (JSON)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from interp.data.folder import FolderDataset, load_folder
from interp.data.vqa import SPLITS, VQADataset, build_vqa
from interp.errors import InterpError

BUILTIN = {f"phantom-{split}": split for split in SPLITS}  # built with seed 0 from BUILTIN_IMAGES phantoms
BUILTIN_IMAGES = 16


def load_dataset(spec: str, limit: int | None = None) -> VQADataset | FolderDataset:
    """A built-in phantom split, a saved VQA data set (JSON file), or real images with prompts (a folder
    with prompts.csv/.jsonl, or such a table), optionally its first ``limit`` items."""
    path = Path(spec)
    if spec in BUILTIN:
        data = build_vqa(BUILTIN_IMAGES, seed=0, split=BUILTIN[spec])
    elif path.is_dir() or path.suffix in (".csv", ".jsonl") and path.is_file():
        data = load_folder(path)
    elif path.is_file():
        data = VQADataset.load(spec)
    else:
        raise InterpError(f"unknown data set {spec!r}: give one of {', '.join(BUILTIN)}, a saved VQA .json file, "
                          "or a folder of images with prompts.csv / prompts.jsonl")
    if limit is not None:
        if limit < 1:
            raise InterpError(f"--limit must be >= 1, got {limit}")
        data = replace(data, items=data.items[:limit])
    if not data.items:
        raise InterpError(f"empty data set: {spec} has no items")
    return data
