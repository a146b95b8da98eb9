"""Layer sweeps over a data set: pick samples, build clean/corrupted pairs, run restore sweeps, store.

Written against the adapter contract only (any family: LLaVA-style LVLMs, dual encoders). Results
are one ``xarray.Dataset`` per (tower, point), with dims (sample, layer, position), written
to a Zarr store (one group each) that ``interp.report.write_sweep_report`` turns into HTML.
"""

from __future__ import annotations

import sys
import time
from dataclasses import asdict, dataclass
from itertools import groupby
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
import xarray as xr
from tqdm import tqdm

from interp import __version__
from interp import sites as S
from interp.data.folder import FolderDataset
from interp.data.images import load_image
from interp.data.phantom import render
from interp.data.vqa import VQADataset, VQAItem
from interp.errors import InterpError
from interp.models.adapter import Adapter, Batch, Positions
from interp.trace.patching import POINTS, Noise, SweepResult, metric_fn, restore_sweep

CANDIDATES = 4  # samples considered per sample kept (see SweepConfig.min_gap)
MODES = {"trace": ("image", "negation_cue", "finding", "question"), "patch": ("negation", "counterfactual"),
         "nast": ("negation", "noise")}


@dataclass
class SweepConfig:
    """One run of ``python -m interp.trace --layer-sweep`` (defaults = the embedded organism)."""

    model: str = "organism"
    data: str = "phantom-test"
    image: str = ""
    prompt: str = ""
    sites: str = ""  # empty: every sweepable tower's block outputs
    mode: str = "trace"
    corrupt: str = ""  # empty: the mode's first choice (image / negation / negation)
    metric: str = ""  # empty: prob for LVLMs, logit for dual encoders
    window: int = 1
    lm_positions: str = "token"
    vision_positions: str = "patch"
    copies: int = 10
    noise_scale: float = 3.0
    batch_size: int = 128
    limit: int = 4
    min_gap: float = 0.1
    seed: int = 0
    device: str = "cpu"
    out: str = "reports/layer-sweep"

    def __post_init__(self) -> None:
        self.corrupt = self.corrupt or MODES.get(self.mode, ("",))[0]

    def block(self, tower: str) -> int:
        """Patches per side of one restored vision group (1 = per patch)."""
        return 1 if tower != "vision" or self.vision_positions == "patch" else int(self.vision_positions[5:])

    def validate(self) -> None:
        if self.mode not in MODES:
            raise InterpError(f"unknown mode {self.mode!r}: choose {', '.join(MODES)}")
        if self.corrupt not in MODES[self.mode]:
            raise InterpError(f"--corrupt {self.corrupt!r} does not go with --mode {self.mode}: choose one of {', '.join(MODES[self.mode])}")
        if self.lm_positions not in ("token", "span"):
            raise InterpError(f"unknown --lm-positions {self.lm_positions!r}: choose token or span")
        if self.vision_positions != "patch" and not (self.vision_positions.startswith("block") and self.vision_positions[5:].isdigit()):
            raise InterpError(f"unknown --vision-positions {self.vision_positions!r}: choose patch or block<k> (e.g. block2)")
        if self.image and (self.mode != "trace" or self.corrupt != "image"):
            raise InterpError("--image traces the image with noise: use --mode trace --corrupt image")
        for name in ("limit", "window", "copies", "batch_size"):
            if getattr(self, name) < 1:
                raise InterpError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")


@dataclass
class Pair:
    """A clean sample and what it is compared with (same prompt + noise, or a paired input)."""

    item: VQAItem
    clean_image: np.ndarray
    corrupt_image: np.ndarray
    corrupt_prompt: str
    corrupt_spans: dict
    mask: np.ndarray  # ground-truth finding mask of the clean image (empty if none)
    alternatives: list[str]  # the other answers the metric compares with (empty: the model's runner-up)


def is_lvlm(adapter: Adapter) -> bool:
    """LVLMs read an answer token from an LM; dual encoders score an image-text pair."""
    return "lm" in adapter.towers


def select_pairs(data: VQADataset | FolderDataset, cfg: SweepConfig, lvlm: bool = True) -> list[Pair]:
    """Samples for the mode, round-robin over findings so a small ``limit`` still covers several.

    Phantoms: presence questions with a finding (dual encoders: the positive statement "there is a
    X ."), or negated statements for negation modes. Real images with prompts: every row, traced
    for the model's own answer against its runner-up."""
    if isinstance(data, FolderDataset):
        if cfg.mode != "trace" or cfg.corrupt != "image":
            raise InterpError(f"--mode {cfg.mode} --corrupt {cfg.corrupt} needs phantom data (pairs with ground truth); "
                              "real images trace with --mode trace --corrupt image")
        return [Pair(it, img, img, it.prompt, {}, np.zeros(img.shape, dtype=bool), [])
                for it in data.items[: CANDIDATES * cfg.limit] for img in [data.image(it.image)]]
    direct = [it for it in data.items if it.mode == "direct"]
    if not lvlm and cfg.corrupt == "negation":
        raise InterpError("--corrupt negation patches an LVLM's answer; for dual encoders use --mode nast")
    if cfg.mode == "trace" and cfg.corrupt != "negation_cue" or cfg.corrupt == "counterfactual":
        pool = ([it for it in direct if it.kind == "presence" and it.answer == "yes"] if lvlm
                else [it for it in direct if it.kind == "positive" and it.answer == "true"])
    else:
        pool = [it for it in direct if it.kind == "negated"]
    positive = {(it.image, it.finding): it for it in direct if it.kind == "positive"}
    answers = {kind: sorted({it.answer for it in data.items if it.kind == kind}) for kind in {it.kind for it in pool}}
    by_finding = [list(g) for _, g in groupby(sorted(pool, key=lambda it: it.finding), key=lambda it: it.finding)]
    ordered = [it for row in _interleave(by_finding) for it in row]
    pairs = []
    for it in ordered[: CANDIDATES * cfg.limit]:
        ph = data.phantom(it.image)
        mask = ph.finding_masks.get(it.finding, np.zeros_like(ph.image, dtype=bool))
        alt = [a for a in answers[it.kind] if a != it.answer]
        if cfg.corrupt == "counterfactual":
            other = render(data.specs[it.image].without(it.finding), data.image_seed(it.image), data.image_size).image
            pairs.append(Pair(it, ph.image, other, it.prompt, it.spans, mask, alt))
        elif cfg.corrupt == "negation":
            pos = positive[(it.image, it.finding)]
            pairs.append(Pair(it, ph.image, ph.image, pos.prompt, pos.spans, mask, alt))
        else:
            pairs.append(Pair(it, ph.image, ph.image, it.prompt, it.spans, mask, alt))
    if not pairs:
        raise InterpError(f"empty data set: no items in {data.name} fit --mode {cfg.mode} --corrupt {cfg.corrupt}")
    return pairs


def image_pair(path: str, prompt: str) -> Pair:
    """A user's image and prompt: traced for the model's own answer against its runner-up."""
    if not prompt.strip():
        raise InterpError("--image needs --prompt (the question to trace)")
    image = load_image(path)
    item = VQAItem(id=Path(path).name, image=-1, kind="custom", finding="", mode="direct", prompt=prompt,
                   target="", answer="", spans={})
    return Pair(item, image, image, prompt, {}, np.zeros(image.shape, dtype=bool), [])


def _interleave(groups: list[list[VQAItem]]) -> Iterator[list[VQAItem]]:
    for i in range(max(map(len, groups), default=0)):
        yield [g[i] for g in groups if i < len(g)]


def tower_positions(adapter: Adapter, tower: str, batch: Batch) -> Positions:
    """Positions of ``tower``'s sequence for the batch's one row (vision: the vision tower's tokens)."""
    return adapter.vision_positions(batch)[0] if tower == "vision" else batch.positions[0]


def position_groups(adapter: Adapter, tower: str, batch: Batch, cfg: SweepConfig) -> tuple[list[list[int]], dict]:
    """Position groups to restore together, and their labels (kind, row, col, token, boxes)."""
    positions = tower_positions(adapter, tower, batch)
    n = positions.kinds.index("pad") if "pad" in positions.kinds else len(positions.kinds)
    if tower == "vision":
        k = cfg.block(tower)
        cells: dict[tuple[int, int], list[int]] = {}
        singles = []
        for p in range(n):
            if positions.kinds[p] == "image" and positions.rows[p] >= 0:
                cells.setdefault((positions.rows[p] // k, positions.cols[p] // k), []).append(p)
            else:
                singles.append(p)
        groups = [[p] for p in singles] + list(cells.values())
        name = "patch" if k == 1 else "block"
        return groups, {
            "kind": [positions.kinds[p] for p in singles] + ["image"] * len(cells),
            "row": [-1] * len(singles) + [r for r, _ in cells], "col": [-1] * len(singles) + [c for _, c in cells],
            "token": [positions.tokens[p] for p in singles] + [f"{name} {r},{c}" for r, c in cells],
            "boxes": [[positions.boxes[p] for p in g] for g in groups],
        }
    if cfg.lm_positions == "token":
        groups = [[p] for p in range(n)]
        return groups, {"kind": positions.kinds[:n], "row": positions.rows[:n], "col": positions.cols[:n],
                        "token": positions.tokens[:n], "boxes": [[b] for b in positions.boxes[:n]]}
    named = {name: ps for name, ps in positions.spans.items() if ps}
    covered = {p for ps in named.values() for p in ps}
    rest = [p for p in range(n) if p not in covered]
    groups = list(named.values()) + ([rest] if rest else [])
    names = list(named) + (["other"] if rest else [])
    return groups, {"kind": ["image" if nm == "image" else "text" for nm in names], "row": [-1] * len(names),
                    "col": [-1] * len(names), "token": names, "boxes": [[None]] * len(names)}


def mask_fraction(mask: np.ndarray, labels: dict) -> list[float]:
    """Share of each image position's pixels (the union of its tokens' boxes in the input image)
    inside the ground-truth mask (0 for positions that are not image cells)."""
    out = []
    for kind, r, boxes in zip(labels["kind"], labels["row"], labels["boxes"]):
        if kind != "image" or r < 0 or not any(boxes):
            out.append(0.0)
            continue
        region = np.zeros(mask.shape, dtype=bool)
        for y0, x0, y1, x1 in filter(None, boxes):
            region[int(np.floor(y0)):int(np.ceil(y1)), int(np.floor(x0)):int(np.ceil(x1))] = True
        out.append(float(mask[region].mean()))
    return out


def noised(adapter: Adapter, tower: str, batch: Batch, span: str) -> tuple[str, list[int]]:
    """Where trace mode's noise goes: (site, positions). Image corruption: the vision tower's patch
    embeddings for vision sweeps, the LM's image tokens for LM sweeps; text corruption: a named span
    of the LM's (or text tower's) input embeddings."""
    if tower == "vision":
        return adapter.embed_site("vision"), adapter.vision_positions(batch)[0].span("image")
    return adapter.embed_site(tower), batch.positions[0].span(span)


def noise_std(adapter: Adapter, batches: list[tuple[Batch, tuple[str, list[int]]]]) -> float:
    """ROME: the std of the clean values being corrupted (here over the swept samples)."""
    vals = [adapter.run(b, read=[site])[1][site][0, pos] for b, (site, pos) in batches]
    return float(torch.cat(vals).std())


def sweep_towers(adapter: Adapter, cfg: SweepConfig) -> dict[tuple[str, str], list[int]]:
    """(tower, point) -> layers named by ``cfg.sites`` (default: every sweepable tower's block outputs)."""
    sweepable = [t for t in adapter.towers if t in ("vision", "lm", "text") and (t != "vision" or adapter.vision_batched)]
    patterns = cfg.sites or ",".join(f"{t}.blocks.*.resid_post" for t in sweepable)
    towers: dict[tuple[str, str], list[int]] = {}
    for site in adapter.expand_sites(patterns):
        s = S.parse(site)
        if s.layer is None or s.point not in POINTS:
            raise InterpError(f"cannot sweep site {site!r}: sweeps restore block sites {', '.join(POINTS)}")
        if s.tower not in sweepable:
            why = ("packs or tiles images in its vision tower" if s.tower == "vision"
                   else f"has no {s.tower} sweep")
            raise InterpError(f"cannot sweep {site!r}: {adapter.name} {why}; sweepable towers: {', '.join(sweepable)}")
        towers.setdefault((s.tower, s.point), []).append(s.layer)
    image = cfg.corrupt in ("image", "counterfactual")
    blind = "text" if image else "vision"  # a dual encoder's text tower never sees the image, a vision tower the text
    towers = {k: v for k, v in towers.items() if k[0] != blind}
    if not towers:
        raise InterpError(f"--corrupt {cfg.corrupt} corrupts the {'image' if image else 'text'}: sweep "
                          f"{'vision or lm' if image else 'lm or text'} sites")
    return towers


def run_sweep(adapter: Adapter, pairs: list[Pair], cfg: SweepConfig, source: tuple[str, str]) -> dict[str, xr.Dataset]:
    """Sweep every (tower, point) the sites name over ``pairs``; ``source`` = (data set name, hash)."""
    cfg.validate()
    lvlm = is_lvlm(adapter)
    metric_kind = cfg.metric or ("prob" if lvlm else "logit")
    if lvlm == (metric_kind == "logit"):
        raise InterpError(f"--metric {metric_kind} does not fit {adapter.name}: "
                          f"{'prob, logprob or logit_diff' if lvlm else 'dual encoders score the image-text logit'}")
    towers = sweep_towers(adapter, cfg)
    candidates = pairs[: CANDIDATES * cfg.limit]
    encoded = [
        (adapter.encode([p.clean_image], [p.item.prompt], [p.item.spans]).to(cfg.device),
         adapter.encode([p.corrupt_image], [p.corrupt_prompt], [p.corrupt_spans]).to(cfg.device))
        for p in candidates
    ]
    targets = [_target_ids(adapter, p, clean) if lvlm else [] for p, (clean, _) in zip(candidates, encoded)]
    swept = list(dict.fromkeys(tower for tower, _ in towers))
    stds = {tower: cfg.noise_scale * noise_std(adapter, [(c, noised(adapter, tower, c, cfg.corrupt)) for c, _ in encoded])
            for tower in swept} if cfg.mode == "trace" else {}

    def sweep(i: int, tower: str, layers: list[int], groups: list[list[int]], point: str = "resid_post") -> SweepResult:
        clean, corrupt = encoded[i]
        metric = metric_fn(metric_kind, targets[i][0], targets[i][1:]) if lvlm else (lambda z: z[:, 0].float())
        noise = None
        if stds:
            site, pos = noised(adapter, tower, clean, cfg.corrupt)
            noise = Noise(site, tuple(pos), stds[tower], cfg.copies, cfg.seed)
        return restore_sweep(adapter, clean, corrupt, metric, tower=tower, layers=layers,
                             groups=groups, point=point, window=cfg.window, noise=noise, batch_size=cfg.batch_size)

    # ROME keeps cases the corruption actually changes: tiny gaps make normalised effects noise
    kept: list[int] = []
    checked = 0
    for i in range(len(candidates)):  # clean + corrupted runs only (no layers), until `limit` pass
        if len(kept) == cfg.limit:
            break
        checked += 1
        if all(abs(r.clean - r.corrupted) >= cfg.min_gap for r in (sweep(i, t, [], [[0]]) for t in swept)):
            kept.append(i)
    if not kept:
        raise InterpError(f"no sample among {len(candidates)} where the corruption moves the {metric_kind} by >= "
                          f"{cfg.min_gap}: lower --min-gap or check the model")
    if len(kept) < checked:
        print(f"kept {len(kept)} of {checked} candidate samples (corruption gap >= {cfg.min_gap})", file=sys.stderr)
    out: dict[str, xr.Dataset] = {}
    for (tower, point), layers in towers.items():
        rows = []
        t0 = time.perf_counter()
        for i in tqdm(kept, desc=f"sweep {tower}.{point}", unit="sample"):
            groups, labels = position_groups(adapter, tower, encoded[i][0], cfg)
            res = sweep(i, tower, layers, groups, point)
            p = candidates[i]
            answer = adapter.tokenizer.convert_ids_to_tokens(targets[i][0]) if lvlm else p.item.answer
            rows.append((p, res, labels, mask_fraction(p.mask, labels), answer))
        out[tower if point == "resid_post" else f"{tower}.{point}"] = _dataset(
            rows, layers, tower, point, cfg, adapter, source, time.perf_counter() - t0, stds.get(tower, 0.0), metric_kind)
    return out


def _target_ids(adapter: Adapter, p: Pair, clean: Batch) -> list[int]:
    """[answer id, alternative ids]: the item's answers, or the model's own top answer and its runner-up."""
    if p.item.answer and p.alternatives:
        return adapter.tokenizer.convert_tokens_to_ids([p.item.answer, *p.alternatives])
    logits, _ = adapter.run(clean)
    return adapter.readout(logits, clean)[0].topk(2).indices.tolist()


def _dataset(
    rows: list, layers: list[int], tower: str, point: str, cfg: SweepConfig, adapter: Adapter,
    source: tuple[str, str], elapsed: float, std: float, metric: str,
) -> xr.Dataset:
    """The sweep of one (tower, point) in the layout ``interp.report`` reads."""
    n = max(len(r[2]["kind"]) for r in rows)

    def padded(key, fill, dtype):
        return np.array([list(r[2][key]) + [fill] * (n - len(r[2][key])) for r in rows], dtype=dtype)

    restored = np.full((len(rows), len(layers), n), np.nan, np.float32)
    for i, (_, res, labels, _, _) in enumerate(rows):
        restored[i, :, : res.restored.shape[1]] = res.restored
    clean = np.array([r[1].clean for r in rows], np.float32)
    corrupted = np.array([r[1].corrupted for r in rows], np.float32)
    cells = [(r, c) for row in rows for kind, r, c in zip(row[2]["kind"], row[2]["row"], row[2]["col"]) if kind == "image" and r >= 0]
    h, w = (max(r[0].clean_image.shape[d] for r in rows) for d in (0, 1))
    images = np.zeros((len(rows), h, w), np.float32)  # images of different sizes: top-left aligned (boxes stay true)
    for i, r in enumerate(rows):
        images[i, : r[0].clean_image.shape[0], : r[0].clean_image.shape[1]] = r[0].clean_image
    return xr.Dataset(
        {
            "restored": (("sample", "layer", "position"), restored),
            "effect": (("sample", "layer", "position"),
                       ((restored - corrupted[:, None, None]) / (clean - corrupted)[:, None, None]).astype(np.float32)),
            "clean": ("sample", clean),
            "corrupted": ("sample", corrupted),
            "kind": (("sample", "position"), padded("kind", "pad", str)),
            "row": (("sample", "position"), padded("row", -1, np.int16)),
            "col": (("sample", "position"), padded("col", -1, np.int16)),
            "token": (("sample", "position"), padded("token", "", str)),
            "mask_fraction": (("sample", "position"), np.array([r[3] + [0.0] * (n - len(r[3])) for r in rows], np.float32)),
            "image": (("sample", "y", "x"), images),
            "question": ("sample", [r[0].item.prompt for r in rows]),
            "answer": ("sample", [r[4] for r in rows]),
            "finding": ("sample", [r[0].item.finding for r in rows]),
        },
        coords={"sample": [r[0].item.id for r in rows], "layer": list(layers), "position": np.arange(n)},
        attrs={
            "tower": tower, "mode": cfg.mode,
            "corrupt": cfg.corrupt if cfg.mode == "trace" else f"pair:{cfg.corrupt}",
            "metric": metric, "point": point, "window": cfg.window,
            "granularity": cfg.lm_positions if tower == "lm" else cfg.vision_positions,
            "grid_rows": 1 + max((r for r, _ in cells), default=-1), "grid_cols": 1 + max((c for _, c in cells), default=-1),
            "model_id": adapter.model_id, "weight_hash": adapter.weight_hash,
            "dataset": source[0], "dataset_hash": source[1], "noise_std": std,
            "copies": cfg.copies if cfg.mode == "trace" else 0, "seed": cfg.seed, "elapsed_s": round(elapsed, 2),
            "code_version": __version__, "config": str(asdict(cfg)),
        },
    )
