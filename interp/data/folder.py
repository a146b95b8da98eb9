"""Real images with prompts: a folder of images plus a table of (image, prompt[, answer]) rows.

``--data DIR`` reads ``DIR/prompts.csv`` or ``DIR/prompts.jsonl`` (columns ``image``, ``prompt``,
optional ``answer``; image paths relative to DIR); ``--data FILE.csv|.jsonl`` reads that table
(paths relative to its folder). Items look like VQA items (kind ``custom``, no finding) so the
cache and the sweep take them as they take phantoms; images are loaded on demand, after a check of
every image's header at load time.
"""

from __future__ import annotations

import csv
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from interp.data.images import check_image, load_image
from interp.data.vqa import VQAItem
from interp.errors import InterpError

TABLES = ("prompts.csv", "prompts.jsonl")


@dataclass
class FolderDataset:
    """Images on disk and one prompt per item; ``image(i)`` loads image ``i`` as float [H, W] in [0, 1]."""

    root: Path
    paths: list[Path]
    items: list[VQAItem]
    specs: list = field(default_factory=list)  # no phantom specs: no ground-truth labels

    @property
    def name(self) -> str:
        return str(self.root)

    @property
    def hash(self) -> str:
        """sha256 over the table rows and every image's bytes."""
        h = hashlib.sha256()
        for it in self.items:
            h.update(json.dumps([it.id, it.prompt, it.answer]).encode())
        for p in self.paths:
            h.update(p.read_bytes())
        return h.hexdigest()

    def image(self, i: int) -> np.ndarray:
        return load_image(self.paths[i])

    def mask(self, i: int, finding: str) -> np.ndarray:
        """No ground truth for real images: an empty mask of the image's size."""
        return np.zeros(self.image(i).shape, dtype=bool)


def _rows(table: Path) -> list[dict]:
    try:
        if table.suffix == ".csv":
            with open(table, newline="") as fh:
                return list(csv.DictReader(fh))
        return [json.loads(line) for line in table.read_text().splitlines() if line.strip()]
    except (OSError, ValueError, UnicodeDecodeError) as e:
        raise InterpError(f"unreadable prompt table {table}: {e}") from None


def load_folder(spec: str | Path) -> FolderDataset:
    """A folder holding a prompt table, or the table itself (see the module docstring)."""
    spec = Path(spec)
    table = next((spec / t for t in TABLES if (spec / t).is_file()), None) if spec.is_dir() else spec
    if table is None:
        raise InterpError(f"{spec} has no {' or '.join(TABLES)} listing (image, prompt) rows")
    rows = _rows(table)
    root = table.parent
    paths: dict[Path, int] = {}
    items = []
    for n, row in enumerate(rows, 1):
        if not isinstance(row, dict) or not row.get("image") or not str(row.get("prompt") or "").strip():
            raise InterpError(f"{table} row {n}: needs non-empty 'image' and 'prompt' fields")
        path = (root / row["image"]).resolve()
        if not path.is_file():
            raise InterpError(f"{table} row {n}: image {row['image']} not found in {root}")
        idx = paths.setdefault(path, len(paths))
        items.append(VQAItem(id=f"{path.stem}-{n}", image=idx, kind="custom", finding="", mode="direct",
                             prompt=str(row["prompt"]), target=str(row.get("answer") or ""),
                             answer=str(row.get("answer") or ""), spans={}))
    if not items:
        raise InterpError(f"empty data set: {table} has no rows")
    for path in paths:
        check_image(path)
    return FolderDataset(root, list(paths), items)
