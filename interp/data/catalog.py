"""Data sets by name: the built-in phantom and MedNega-phantom splits, a saved VQA data set or
negation benchmark, or real images with prompts."""

from __future__ import annotations

import csv
import json
import re
from dataclasses import replace
from pathlib import Path

from interp.data.folder import FolderDataset, load_folder
from interp.data.negation import MCQ_COLUMNS, MCQDataset, NegationBenchmark, mcq_dataset, mednega_from_dataset
from interp.data.phantom import FINDINGS
from interp.data.vqa import SPLITS, VQADataset, build_vqa
from interp.errors import InterpError

#: name -> split; all built with seed 0 from BUILTIN_IMAGES phantoms, the MedNega ones from the
#: phantom split of the same name (same images, same indices)
BUILTIN = {f"{prefix}-{split}": split for prefix in ("phantom", "mednega-phantom") for split in SPLITS}
BUILTIN_IMAGES = 16
SIZED = re.compile(rf"phantom-(?P<split>{'|'.join(SPLITS)}):(?P<n>\d+)")


def _is_benchmark(path: Path) -> bool:
    """Whether ``path`` is a saved negation benchmark: a .json whose ``items`` hold MCQ dicts, or a
    .csv with the MedNega columns (``image`` optional)."""
    try:
        if path.suffix == ".json":
            items = json.loads(path.read_text()).get("items")
            return isinstance(items, list) and any(isinstance(it, dict) and "correct_answer" in it for it in items)
        if path.suffix == ".csv":
            with path.open(newline="") as fh:
                header = next(csv.reader(fh), [])
            return set(MCQ_COLUMNS) - {"image"} <= set(header)
    except (OSError, ValueError, AttributeError):
        return False  # the loader that takes it reports what is wrong
    return False


def load_dataset(spec: str, limit: int | None = None) -> VQADataset | FolderDataset | MCQDataset:
    """A built-in split (phantom VQA, or its MedNega-style benchmark), ``phantom-<split>:<N>`` (N phantoms, one
    presence question each), a saved VQA data set (.json),
    a saved negation benchmark (.json, or MedNega .csv), or real images with prompts (a folder with
    prompts.csv/.jsonl, or such a table), optionally its first ``limit`` items."""
    path = Path(spec)
    sized = SIZED.fullmatch(spec)
    if sized:
        data = phantom_images(sized["split"], int(sized["n"]))
    elif spec in BUILTIN:
        data = build_vqa(BUILTIN_IMAGES, seed=0, split=BUILTIN[spec])
        if spec.startswith("mednega-"):
            data = mcq_dataset(mednega_from_dataset(data), spec)
    elif path.is_file() and _is_benchmark(path):
        data = mcq_dataset(NegationBenchmark.load(path), str(path.resolve()))
    elif path.is_dir() or path.suffix in (".csv", ".jsonl") and path.is_file():
        data = load_folder(path)
    elif path.is_file():
        data = VQADataset.load(spec)
    else:
        raise InterpError(f"unknown data set {spec!r}: give one of {', '.join(BUILTIN)}, phantom-<split>:<N>, a saved "
                          "VQA data set or "
                          "negation benchmark (.json, or MedNega .csv), or a folder of images with prompts.csv / "
                          "prompts.jsonl")
    if limit is not None:
        if limit < 1:
            raise InterpError(f"--limit must be >= 1, got {limit}")
        data = replace(data, items=data.items[:limit])
    if not data.items:
        raise InterpError(f"empty data set: {spec} has no items")
    return data


def phantom_images(split: str, n: int) -> VQADataset:
    """``n`` phantoms of ``split`` (seed 0), one presence question each, the findings in turn: many distinct
    images with few items, as SAEs on vision features want."""
    if n < 1:
        raise InterpError(f"phantom-{split}:{n}: the number of phantoms must be >= 1")
    data = build_vqa(n, seed=0, split=split, kinds=("presence",), modes=("direct",))
    return replace(data, items=[it for it in data.items if it.finding == FINDINGS[it.image % len(FINDINGS)]])


def dataset_ref(spec: str) -> str:
    """What ``load_dataset`` opens again from anywhere: a built-in name, or the absolute path."""
    return spec if spec in BUILTIN or SIZED.fullmatch(spec) else str(Path(spec).resolve())
