"""Vision activations streamed from a results store: shuffled token batches for SAE training and evaluation.

A store's ``acts`` group holds [sample, position, d] per site; vision and projector sites lie on the
patch grid with static position kinds (``<dim>_kind``: 1 = CLS / special, 2 = image patch). Samples
that show the same image (phantom VQA items ask several questions about one image) carry identical
vision features, so each image is used once, and the held-out split is drawn by image: no image is
on both sides. Batches are read chunk by chunk into a bounded shuffle buffer, never the whole store.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import torch
import xarray as xr
import zarr

from interp.errors import InterpError
from interp.sae.config import SAETrainConfig
from interp.sites import parse
from interp.store import open_store
from interp.store.layout import target

TOKENS = ("patch", "cls", "all")
GRID_TOWERS = ("vision", "projector")
KIND = {"cls": 1, "patch": 2}
SPLITS = ("train", "val", "test")


@dataclass
class StoreActivations:
    """The tokens of ``site`` in the store at ``url`` for one split of its images.

    ``tokens``: ``patch`` (image patches), ``cls`` (the CLS / special tokens) or ``all``; ``split``:
    ``train``, ``val`` or ``test`` (``test_fraction`` and ``val_fraction`` of the distinct images, drawn with
    ``seed``); ``centre`` [n_positions, d], when given, is subtracted from every token at its position
    (:func:`position_mean`)."""

    url: str
    site: str
    tokens: str = "patch"
    split: str = "train"
    test_fraction: float = 0.1
    seed: int = 0
    centre: np.ndarray | None = field(default=None, repr=False)
    val_fraction: float = 0.0
    acts: xr.DataArray = field(init=False, repr=False)
    _zarr: zarr.Array = field(init=False, repr=False)
    samples: np.ndarray = field(init=False, repr=False)  # store rows of this split, one per image, ascending
    positions: np.ndarray = field(init=False, repr=False)  # position indices of the chosen tokens
    kinds: np.ndarray = field(init=False, repr=False)  # their kind codes

    def __post_init__(self) -> None:
        if self.tokens not in TOKENS:
            raise InterpError(f"unknown tokens {self.tokens!r}: choose {', '.join(TOKENS)}")
        if self.split not in SPLITS:
            raise InterpError(f"unknown split {self.split!r}: choose {', '.join(SPLITS)}")
        if not (0 <= self.test_fraction and 0 <= self.val_fraction and self.test_fraction + self.val_fraction < 1):
            raise InterpError(f"test and validation fractions must be >= 0 and leave images to train on, got "
                              f"{self.test_fraction} and {self.val_fraction}")
        tree = open_store(self.url)
        if "acts" not in tree.children:
            raise InterpError(f"store {self.url} holds no cached activations (write one with python -m interp.cache)")
        node = tree["acts"]
        if parse(self.site).tower not in GRID_TOWERS:
            raise InterpError(f"SAEs here train on vision features: {self.site} is not a vision.* or projector.* site")
        if self.site not in node.data_vars:
            raise InterpError(f"site {self.site} is not in {self.url}; cached sites: {', '.join(node.data_vars)}")
        self.acts = node[self.site]
        where, opts = target(self.url, None)
        self._zarr = zarr.open_group(where, mode="r", **opts)[f"acts/{self.site}"]  # reads without dask's graph
        kind = node[f"{self.acts.dims[1]}_kind"].values
        wanted = (kind == KIND["patch"]) | (kind == KIND["cls"]) if self.tokens == "all" else kind == KIND[self.tokens]
        self.positions, self.kinds = np.flatnonzero(wanted), kind[wanted]
        if not len(self.positions):
            raise InterpError(f"{self.site} has no {self.tokens} tokens")
        self.samples = self._split(tree)

    def _split(self, tree: xr.DataTree) -> np.ndarray:
        """Rows of the store, one per distinct image, in this split."""
        keys = [f"{i}|{p}" for i, p in zip(tree["image"].values, tree["image_path"].values)]
        first = {}
        for row, key in enumerate(keys):
            first.setdefault(key, row)
        rows = np.array(sorted(first.values()))
        n_test, n_val = (int(np.ceil(f * len(rows))) for f in (self.test_fraction, self.val_fraction))
        split = np.zeros(len(rows), int)  # 0 train, 1 test, 2 val: the test images do not depend on val_fraction
        order = np.random.default_rng([self.seed, 17]).permutation(len(rows))
        split[order[:n_test]], split[order[n_test:n_test + n_val]] = 1, 2
        chosen = rows[split == {"train": 0, "test": 1, "val": 2}[self.split]]
        if not len(chosen):
            raise InterpError(f"the {self.split} split of {self.url} is empty ({len(rows)} distinct images)")
        return chosen

    @property
    def d_in(self) -> int:
        return int(self.acts.shape[-1])

    @property
    def n_tokens(self) -> int:
        return len(self.samples) * len(self.positions)

    def chunks(self) -> list[np.ndarray]:
        """This split's rows grouped by the store chunk that holds them (one read each)."""
        size = self._zarr.chunks[0]
        return [g for g in np.split(self.samples, np.flatnonzero(np.diff(self.samples // size)) + 1) if len(g)]

    def read(self, rows: np.ndarray) -> np.ndarray:
        """float32 [len(rows), n_positions, d]: the chosen tokens of these rows (one chunk's worth)."""
        values = np.asarray(self._zarr[int(rows[0]):int(rows[-1]) + 1][rows - rows[0]][:, self.positions], np.float32)
        return values if self.centre is None else values - self.centre

    def batches(self, batch_size: int, *, shuffle: bool = True, buffer_chunks: int = 16, start: int = 0,
                epochs: int | None = None, order_seed: int | None = None) -> Iterator[torch.Tensor]:
        """[batch_size, d] token batches, epoch after epoch (``epochs=None``: forever). Shuffled: chunks in a
        random order per epoch, tokens shuffled within a buffer of ``buffer_chunks`` chunks (the memory
        bound), drawn with ``order_seed`` (default: the split's seed). ``start`` skips that many batches (a
        resumed run sees the batches it has not seen)."""
        chunks, done, epoch, carry = self.chunks(), 0, 0, np.empty((0, self.d_in), np.float32)
        while epochs is None or epoch < epochs:
            rng = np.random.default_rng([self.seed if order_seed is None else order_seed, 29, epoch])
            order = rng.permutation(len(chunks)) if shuffle else np.arange(len(chunks))
            for b in range(0, len(order), buffer_chunks):
                tokens = np.concatenate([carry, *(self.read(chunks[i]).reshape(-1, self.d_in)
                                                   for i in order[b:b + buffer_chunks])])
                tokens = tokens[np.isfinite(tokens).all(1)]  # positions a sample lacks (NaN) never train
                if shuffle:
                    tokens = tokens[rng.permutation(len(tokens))]
                n_full = len(tokens) // batch_size
                for k in range(n_full):
                    if done >= start:
                        yield torch.from_numpy(tokens[k * batch_size:(k + 1) * batch_size])
                    done += 1
                carry = tokens[n_full * batch_size:]
            epoch += 1
        if len(carry) and not shuffle:
            yield torch.from_numpy(carry)

    def image_tokens(self) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """(store rows, float32 [rows, positions, d]) chunk by chunk, in store order: per-image analyses."""
        for rows in self.chunks():
            yield rows, self.read(rows)


def position_mean(source: StoreActivations) -> np.ndarray:
    """float32 [n_positions, d]: each chosen position's mean over the split's images (one pass, float64 sums;
    positions a sample lacks are left out of their mean). A ViT's tokens carry their position (most of the
    projector output's variance on the organism); taking it out leaves what differs between images."""
    total, count = np.zeros((len(source.positions), source.d_in)), np.zeros((len(source.positions), 1))
    for _, x in source.image_tokens():
        ok = np.isfinite(x).all(-1, keepdims=True)
        total += np.where(ok, x, 0).sum(0)
        count += ok.sum(0)
    return (total / np.maximum(count, 1)).astype(np.float32)


def config_split(cfg: SAETrainConfig, split: str, tokens: str | None = None) -> StoreActivations:
    """The tokens of ``cfg``'s store and site in ``split`` (its fractions and split seed; not centred)."""
    return StoreActivations(cfg.store, cfg.site, tokens or cfg.tokens, split, cfg.test_fraction, cfg.split_seed,
                            val_fraction=cfg.val_fraction)
