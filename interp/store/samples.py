"""The sample index every analysis of a store is keyed by: item ids, prompts, image references, labels."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from PIL import Image

from interp.errors import InterpError
from interp.store.layout import THUMBNAIL, digest

ITEM_FIELDS = ("prompt", "answer", "target", "kind", "finding", "mode")


@dataclass
class SampleIndex:
    """One row per sample: ``ids`` (unique), string ``fields``, ``image`` (index into the data set's
    images), ``labels`` (name -> 0/1 per sample, where known) and ``dataset`` (``ref`` and ``limit``
    that ``load_dataset`` opens again, plus its ``name`` and ``hash``)."""

    ids: list[str]
    fields: dict[str, list[str]] = field(default_factory=dict)
    image: list[int] = field(default_factory=list)
    labels: dict[str, list[int]] = field(default_factory=dict)
    dataset: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        n = len(self.ids)
        if n < 1:
            raise InterpError("a store needs at least one sample")
        if len(set(self.ids)) != n:
            dup = next(i for i in self.ids if self.ids.count(i) > 1)
            raise InterpError(f"sample ids must be unique: {dup!r} repeats")
        self.image = list(self.image) or [-1] * n
        for name, values in {**self.fields, **self.labels, "image": self.image}.items():
            if len(values) != n:
                raise InterpError(f"sample field {name!r} has {len(values)} values for {n} samples")

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def hash(self) -> str:
        """Identity of the index: what a second analysis must match to join the same store."""
        return digest([self.ids, self.dataset.get("hash")])

    @classmethod
    def from_items(cls, items: Sequence[Any], dataset: dict[str, Any], data: Any = None) -> SampleIndex:
        """The index of VQA-style ``items`` (id, image, prompt, answer, spans, ...); ``dataset`` describes
        their source (``ref``, ``limit``, ``name``, ``hash``); ``data`` (if any) adds image paths and
        phantom labels."""
        from interp.data.phantom import CONFOUNDERS, FINDINGS

        paths = getattr(data, "paths", None)
        fields = {f: [str(getattr(it, f, "")) for it in items] for f in ITEM_FIELDS}
        fields["spans"] = [json.dumps(getattr(it, "spans", {}) or {}, sort_keys=True) for it in items]
        fields["image_path"] = [str(paths[it.image]) if paths else "" for it in items]
        specs = getattr(data, "specs", None)
        labels = ({n: [int(specs[it.image].has(n)) for it in items] for n in FINDINGS + CONFOUNDERS}
                  if specs else {})
        return cls([it.id for it in items], fields, [int(it.image) for it in items], labels, dict(dataset))

    @classmethod
    def from_data(cls, data: Any, items: Sequence[Any], ref: str, limit: int | None = None) -> SampleIndex:
        """The index of ``items`` of ``data``, opened by ``load_dataset(ref, limit)``."""
        return cls.from_items(items, {"ref": ref, "limit": limit, "name": data.name, "hash": data.hash}, data)


def thumbnail(image: np.ndarray, size: int = THUMBNAIL) -> np.ndarray:
    """uint8 [size, size]: the image (float in [0, 1]) shrunk by area averaging, aspect kept, top-left."""
    pixels = Image.fromarray(np.clip(np.asarray(image, np.float32) * 255 + 0.5, 0, 255).astype(np.uint8))
    pixels.thumbnail((size, size), Image.Resampling.BOX)
    out = np.zeros((size, size), np.uint8)
    small = np.asarray(pixels)
    out[: small.shape[0], : small.shape[1]] = small
    return out


def image_rows(images: Sequence[np.ndarray]) -> dict[str, np.ndarray]:
    """The per-sample image arrays of the index for one chunk: thumbnail, image_height, image_width."""
    return {"thumbnail": np.stack([thumbnail(im) for im in images]),
            "image_height": np.array([im.shape[0] for im in images], np.int32),
            "image_width": np.array([im.shape[1] for im in images], np.int32)}


def sample_dict(index: SampleIndex) -> Mapping[str, np.ndarray]:
    """Index arrays written at creation (strings as object arrays)."""
    out: dict[str, np.ndarray] = {"id": np.asarray(index.ids, dtype=object),
                                  "image": np.asarray(index.image, np.int32)}
    out |= {name: np.asarray(values, dtype=object) for name, values in index.fields.items()}
    return out

