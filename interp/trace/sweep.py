"""Layer sweeps over a data set: pick samples, build clean/corrupted pairs, run restore sweeps, store.

Written against the adapter contract only (any family: LLaVA-style LVLMs, dual encoders). Results go
to the ``sweep`` group of a results store (``interp.store``), one subgroup per (tower, point) with
dims (sample, layer, position), keyed by the store's sample index; ``read_sweep`` gives them back
as Datasets that ``interp.report.write_sweep_report`` turns into HTML.
"""

from __future__ import annotations

import sys
import time
from dataclasses import asdict, dataclass
from itertools import groupby
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch
import xarray as xr

from interp import sites as S
from interp.data.folder import FolderDataset
from interp.data.images import load_image
from interp.data.negation import MCQDataset
from interp.data.phantom import render
from interp.data.vqa import VQADataset, VQAItem
from interp.errors import InterpError
from interp.models.adapter import Adapter, Batch, Positions
from interp.store import Field, SampleIndex, StoreWriter, open_store
from interp.store.ranks import rank_world, write_all
from interp.trace.atp import atp_sweep
from interp.trace.config import SweepConfig
from interp.trace.patching import POINTS, Noise, SweepResult, metric_fn, restore_sweep

SWEEP_CHUNK = 1  # samples per stored chunk: a sample's sweep is the unit of resumption
CANDIDATES = 4  # samples considered per sample kept (see SweepConfig.min_gap)
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


def select_pairs(data: VQADataset | FolderDataset | MCQDataset, cfg: SweepConfig, lvlm: bool = True) -> list[Pair]:
    """Samples for the mode, round-robin over findings so a small ``limit`` still covers several.

    Phantoms: presence questions with a finding (dual encoders: the positive statement "there is a
    X ."), or negated statements for negation modes. Real images with prompts and benchmark items:
    every row, traced for the model's own answer against its runner-up."""
    if not isinstance(data, VQADataset):  # real images, benchmarks: no phantom pairs
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


def run_sweep(adapter: Adapter, pairs: list[Pair], cfg: SweepConfig, samples: Callable[[list[VQAItem]], SampleIndex],
              out: str) -> str:
    """Sweep every (tower, point) the sites name over ``pairs`` into the ``sweep`` group of the store at
    ``out`` (resumed if made the same way, else replaced); ``samples`` gives the kept items' index.
    Ranks of a launcher (``torchrun``) sweep disjoint sample chunks of one store. Returns ``out``."""
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

    def sweep(i: int, tower: str, layers: list[int], groups: list[list[int]], point: str = "resid_post",
              method: str = "exact") -> SweepResult:
        clean, corrupt = encoded[i]
        metric = metric_fn(metric_kind, targets[i][0], targets[i][1:]) if lvlm else (lambda z: z[:, 0].float())
        noise = None
        if stds:
            site, pos = noised(adapter, tower, clean, cfg.corrupt)
            noise = Noise(site, tuple(pos), stds[tower], cfg.copies, cfg.seed)
        if method == "atp":
            return atp_sweep(adapter, clean, corrupt, metric, tower=tower, layers=layers, groups=groups, point=point,
                             noise=noise)
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
    rank, world = rank_world()
    if len(kept) < checked and rank == 0:
        print(f"kept {len(kept)} of {checked} candidate samples (corruption gap >= {cfg.min_gap})", file=sys.stderr)
    labels = {(i, t): position_groups(adapter, t, encoded[i][0], cfg) for i in kept for t, _ in towers}
    names = {key: key[0] if key[1] == "resid_post" else f"{key[0]}.{key[1]}" for key in towers}
    fields, statics, attrs = _sweep_layout(adapter, cfg, towers, names, [candidates[i] for i in kept],
                                           {k: v[1] for k, v in labels.items()}, stds, metric_kind)
    meta = {"model_id": adapter.model_id, "weight_hash": adapter.weight_hash, "adapter": adapter.name,
            "config": {k: v for k, v in asdict(cfg).items() if k not in ("device", "out")}}

    def open_writer(create: bool) -> StoreWriter:
        return StoreWriter(out, "sweep", samples=samples([candidates[i].item for i in kept]), fields=fields,
                           statics=statics, group_attrs=attrs, meta=meta, chunk_samples=SWEEP_CHUNK,
                           mode="replace", create=create)

    methods = ["exact", "atp"] if cfg.method == "both" else [cfg.method]
    elapsed = {m: dict.fromkeys(names.values(), 0.0) for m in methods}

    def chunk(r: range) -> tuple[dict[str, np.ndarray], list[np.ndarray]]:
        arrays: dict[str, list] = {}
        for i in (kept[j] for j in r):
            p = candidates[i]
            for (tower, point), layers in towers.items():
                groups, lab = labels[(i, tower)]
                res = {}
                for m in methods:
                    t0 = time.perf_counter()
                    res[m] = sweep(i, tower, layers, groups, point, m)
                    elapsed[m][names[(tower, point)]] += time.perf_counter() - t0
                answer = adapter.tokenizer.convert_ids_to_tokens(targets[i][0]) if lvlm else p.item.answer
                row = _sweep_row(res[methods[0]], lab, mask_fraction(p.mask, lab), answer, fields, names[(tower, point)],
                                 res.get("atp"))
                for k, v in row.items():
                    arrays.setdefault(k, []).append(v)
            image = np.zeros(fields["image"].shape, np.float32)  # top-left aligned: boxes stay true
            image[: p.clean_image.shape[0], : p.clean_image.shape[1]] = p.clean_image
            arrays.setdefault("image", []).append(image)
        return {k: np.stack(v) for k, v in arrays.items()}, [candidates[kept[j]].clean_image for j in r]

    write_all(open_writer, chunk, "sweep", lambda: {("elapsed_s" if m == methods[0] else f"elapsed_{m}_s"):
                                                    {k: round(v, 2) for k, v in elapsed[m].items()} for m in methods})
    return out


def _target_ids(adapter: Adapter, p: Pair, clean: Batch) -> list[int]:
    """[answer id, alternative ids]: the item's answers, or the model's own top answer and its runner-up."""
    if p.item.answer and p.alternatives:
        return adapter.tokenizer.convert_tokens_to_ids([p.item.answer, *p.alternatives])
    logits, _ = adapter.run(clean)
    return adapter.readout(logits, clean)[0].topk(2).indices.tolist()


def _sweep_layout(adapter: Adapter, cfg: SweepConfig, towers: dict, names: dict, pairs: list[Pair], labels: dict,
                  stds: dict, metric: str) -> tuple[dict[str, Field], dict, dict]:
    """(fields, statics, subgroup attrs) of the ``sweep`` group: per tower ``<t>/restored``,
    ``<t>/effect`` [sample, layer, position] (NaN past a sample's own positions, ``valid`` False),
    ``clean``, ``corrupted``, ``answer`` and position labels; ``image`` [sample, y, x] shared."""
    h, w = (max(p.clean_image.shape[d] for p in pairs) for d in (0, 1))
    fields: dict[str, Field] = {"image": Field((h, w), ("y", "x"), "float32")}
    statics, attrs = {}, {}
    for (tower, point), layers in towers.items():
        name = names[(tower, point)]
        own = [lab for (_, t), lab in labels.items() if t == tower]
        n = max(len(lab["kind"]) for lab in own)
        cells = [(r, c) for lab in own for k, r, c in zip(lab["kind"], lab["row"], lab["col"]) if k == "image" and r >= 0]
        pos = (n,), ("position",)
        if cfg.method != "exact":
            fields |= {f"{name}/{k}": Field((len(layers), n), ("layer", "position"), "float32", float("nan"))
                       for k in ("atp_effect", "atp_magnitude")}
        fields |= {f"{name}/restored": Field((len(layers), n), ("layer", "position"), "float32", float("nan")),
                   f"{name}/effect": Field((len(layers), n), ("layer", "position"), "float32", float("nan")),
                   f"{name}/clean": Field((), (), "float32", float("nan")),
                   f"{name}/corrupted": Field((), (), "float32", float("nan")),
                   f"{name}/answer": Field((), (), "str", ""),
                   f"{name}/kind": Field(*pos, "str", "pad", coord=True),
                   f"{name}/row": Field(*pos, "int16", -1, coord=True),
                   f"{name}/col": Field(*pos, "int16", -1, coord=True),
                   f"{name}/token": Field(*pos, "str", "", coord=True),
                   f"{name}/valid": Field(*pos, "bool", False, coord=True),
                   f"{name}/mask_fraction": Field(*pos, "float32", 0.0)}
        statics[f"{name}/layer"] = (("layer",), np.asarray(layers), {})
        attrs[name] = {
            "tower": tower, "mode": cfg.mode, "corrupt": cfg.corrupt if cfg.mode == "trace" else f"pair:{cfg.corrupt}",
            "metric": metric, "method": cfg.method, "point": point, "window": cfg.window,
            "granularity": cfg.lm_positions if tower == "lm" else cfg.vision_positions,
            "grid_rows": 1 + max((r for r, _ in cells), default=-1), "grid_cols": 1 + max((c for _, c in cells), default=-1),
            "noise_std": stds.get(tower, 0.0), "copies": cfg.copies if cfg.mode == "trace" else 0, "seed": cfg.seed}
    return fields, statics, attrs


def _sweep_row(res: SweepResult, labels: dict, fraction: list[float], answer: str, fields: dict[str, Field],
               name: str, atp: SweepResult | None = None) -> dict[str, np.ndarray]:
    """One sample's arrays of tower ``name``, padded to the stored number of positions (``atp``: AtP*'s
    estimates too, effect and GradDrop strength normalised by the clean-corrupted gap)."""
    n, m = fields[f"{name}/kind"].shape[0], res.restored.shape[1]

    def pad(values: list, key: str) -> np.ndarray:
        f = fields[f"{name}/{key}"]
        return np.array(list(values) + [f.fill] * (n - len(values)), dtype=object if f.dtype == "str" else f.dtype)

    def grid(values: np.ndarray) -> np.ndarray:
        out = np.full(fields[f"{name}/restored"].shape, np.nan, np.float32)
        out[:, :m] = values
        return out

    restored = grid(res.restored)
    gap = res.clean - res.corrupted
    extra = {} if atp is None else {f"{name}/atp_effect": ((grid(atp.restored) - atp.corrupted) / gap).astype(np.float32),
                                    f"{name}/atp_magnitude": (grid(atp.magnitude) / abs(gap)).astype(np.float32)}
    return {**extra, f"{name}/restored": restored, f"{name}/effect": ((restored - res.corrupted) / gap).astype(np.float32),
            f"{name}/clean": np.float32(res.clean), f"{name}/corrupted": np.float32(res.corrupted),
            f"{name}/answer": np.array(answer, dtype=object), f"{name}/valid": np.arange(n) < m,
            f"{name}/mask_fraction": pad(fraction, "mask_fraction"),
            **{f"{name}/{k}": pad(labels[k], k) for k in ("kind", "row", "col", "token")}}


def read_sweep(url: str) -> dict[str, xr.Dataset]:
    """A sweep store as one Dataset per tower (with ``question``, ``finding`` and ``image``), as
    ``interp.report.write_sweep_report`` reads it."""
    tree = open_store(url)
    if "sweep" not in tree.children:
        raise InterpError(f"store {url} holds no sweep")
    image = tree["sweep"]["image"].variable
    out = {}
    for name, node in tree["sweep"].children.items():
        ds = node.to_dataset().assign(image=image).assign_coords(question=tree["prompt"].variable,
                                                                 finding=tree["finding"].variable)
        out[name] = ds.assign_attrs(**{k: ds.attrs[k][name] for k in ("elapsed_s", "elapsed_atp_s") if k in ds.attrs})
    return out
