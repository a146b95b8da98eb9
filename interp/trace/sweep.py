"""Layer sweeps over a data set: pick samples, build clean/corrupted pairs, run restore sweeps, store.

Written against the adapter contract only (any family: LLaVA-style LVLMs, dual encoders). Results go
to the ``sweep`` group of a results store (``interp.store``), one subgroup per (tower, point) with
dims (sample, layer, position), keyed by the store's sample index; ``read_sweep`` gives them back
as Datasets that ``interp.report.write_sweep_report`` turns into HTML.
"""

from __future__ import annotations

import sys
import time
from dataclasses import asdict, dataclass, field
from itertools import groupby
from pathlib import Path
from typing import Callable, Iterator, Mapping, Sequence

import numpy as np
import torch
import xarray as xr

from interp import sites as S
from interp.attribution.base import box_pixels
from interp.data.folder import FolderDataset
from interp.data.images import load_image
from interp.data.negation import MCQDataset
from interp.data.phantom import Phantom, PhantomSpec, render
from interp.data.vqa import VQADataset, VQAItem
from interp.errors import InterpError
from interp.evaluate.counterfactual import phantom_edits
from interp.models.adapter import Adapter, Batch, Positions
from interp.store import Field, SampleIndex, StoreWriter, open_store
from interp.store.ranks import rank_world, write_all
from interp.trace.atp import atp_sweep
from interp.trace.config import (AUTO, CALIBRATION_SAMPLES, CALIBRATION_SHARE, IMAGE_CORRUPTIONS, LOCALISATION,
                                 NOISE_GRID, SweepConfig)
from interp.trace.patching import POINTS, Noise, SweepResult, metric_fn, restore_sweep

SWEEP_CHUNK = 1  # samples per stored chunk: a sample's sweep is the unit of resumption
CANDIDATES = 4  # samples considered per sample kept (see SweepConfig.min_gap)
#: the patient's thorax (concept masks of its normal anatomy): where --corrupt thorax puts the noise
THORAX = ("lung_left", "lung_right", "heart", "mediastinum")


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
    region: np.ndarray | None = None  # pixels of the noised region (--corrupt thorax); None: the whole image

    def scored(self) -> np.ndarray:
        """Pixels whose image positions the ground-truth score counts: the noised region, else the whole image."""
        return np.ones(self.clean_image.shape[:2], dtype=bool) if self.region is None else self.region


def is_lvlm(adapter: Adapter) -> bool:
    """LVLMs read an answer token from an LM; dual encoders score an image-text pair."""
    return "lm" in adapter.towers


def normal_phantom(data: VQADataset, i: int) -> Phantom:
    """Image ``i``'s patient with no finding: its anatomy rendered alone, with its own seed."""
    return render(PhantomSpec(data.specs[i].anatomy), data.image_seed(i), data.image_size)


def thorax(phantom: Phantom) -> np.ndarray:
    """The thorax's pixels: lung fields, heart and mediastinum."""
    return np.logical_or.reduce([phantom.concept_masks[c] for c in THORAX])


def select_pairs(data: VQADataset | FolderDataset | MCQDataset, cfg: SweepConfig, lvlm: bool = True) -> list[Pair]:
    """Samples for the mode, round-robin over findings so a small ``limit`` still covers several.

    Phantoms: presence questions with a finding (dual encoders: the positive statement "there is a
    X ."), or negated statements for negation modes; the corrupted input by ``cfg.corrupt`` (see
    ``python -m interp.trace --help``). Real images with prompts and benchmark items: every row, traced
    for the model's own answer against its runner-up."""
    if not isinstance(data, VQADataset):  # real images, benchmarks: no phantom pairs
        if cfg.mode != "trace" or cfg.corrupt != "image":
            raise InterpError(f"--mode {cfg.mode} --corrupt {cfg.corrupt} needs phantom data (pairs with ground truth); "
                              "real images trace with --mode trace --corrupt image")
        return [Pair(it, img, img, it.prompt, {}, np.zeros(img.shape, dtype=bool), [])
                for it in data.items[: CANDIDATES * cfg.limit] for img in [data.image(it.image)]]
    direct = [it for it in data.items if it.mode == "direct"]
    if not lvlm and cfg.corrupt == "negation":
        raise InterpError("--corrupt negation patches an LVLM's answer; for dual encoders use --mode nast")
    if cfg.corrupt == "normal" and len(data.specs) < 2:
        raise InterpError(f"--corrupt normal takes another patient's phantom: {data.name} has one image")
    if cfg.corrupt in ("negation", "negation_cue"):
        pool = [it for it in direct if it.kind == "negated"]
    else:
        pool = ([it for it in direct if it.kind == "presence" and it.answer == "yes"] if lvlm
                else [it for it in direct if it.kind == "positive" and it.answer == "true"])
    positive = {(it.image, it.finding): it for it in direct if it.kind == "positive"}
    answers = {kind: sorted({it.answer for it in data.items if it.kind == kind}) for kind in {it.kind for it in pool}}
    by_finding = [list(g) for _, g in groupby(sorted(pool, key=lambda it: it.finding), key=lambda it: it.finding)]
    ordered = [it for row in _interleave(by_finding) for it in row]
    pairs = []
    for it in ordered[: CANDIDATES * cfg.limit]:
        ph = data.phantom(it.image)
        mask = ph.finding_masks.get(it.finding, np.zeros_like(ph.image, dtype=bool))
        pair = Pair(it, ph.image, ph.image, it.prompt, it.spans, mask, [a for a in answers[it.kind] if a != it.answer])
        if cfg.corrupt == "counterfactual":
            edits = phantom_edits(ph, it.finding, data.image_seed(it.image), data.image_size)
            pair.corrupt_image = edits["finding_removed"]
        elif cfg.corrupt == "normal":
            pair.corrupt_image = normal_phantom(data, (it.image + 1) % len(data.specs)).image
        elif cfg.corrupt == "thorax":
            pair.region = thorax(normal_phantom(data, it.image))
        elif cfg.corrupt == "negation":
            pos = positive[(it.image, it.finding)]
            pair.corrupt_prompt, pair.corrupt_spans = pos.prompt, pos.spans
        pairs.append(pair)
    if not pairs:
        hint = "" if lvlm else " (dual encoders trace positive statements 'there is a X .': e.g. --data phantom-test)"
        raise InterpError(f"empty data set: no items in {data.name} fit --mode {cfg.mode} --corrupt {cfg.corrupt}{hint}")
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
        for box in filter(None, boxes):
            region[box_pixels(box)] = True
        out.append(float(mask[region].mean()))
    return out


def noised(adapter: Adapter, tower: str, batch: Batch, span: str,
           region: np.ndarray | None = None) -> tuple[str, list[int]]:
    """Where trace mode's noise goes: (site, positions). Image corruption: the vision tower's patch
    embeddings for vision sweeps, the LM's image tokens for LM sweeps, only those whose pixels touch
    ``region`` when one is given (--corrupt thorax); text corruption: a named span of the LM's (or text
    tower's) input embeddings."""
    positions = tower_positions(adapter, tower, batch)
    pos = positions.span("image" if tower == "vision" else span)
    if region is not None:
        pos = [p for p in pos if positions.boxes[p] is not None and region[box_pixels(positions.boxes[p])].any()]
    return adapter.embed_site(tower), pos


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
    image = cfg.corrupt in IMAGE_CORRUPTIONS
    blind = "text" if image else "vision"  # a dual encoder's text tower never sees the image, a vision tower the text
    towers = {k: v for k, v in towers.items() if k[0] != blind}
    if not towers:
        raise InterpError(f"--corrupt {cfg.corrupt} corrupts the {'image' if image else 'text'}: sweep "
                          f"{'vision or lm' if image else 'lm or text'} sites")
    return towers


def stratified(findings: Sequence[str], passes: Callable[[int], bool], limit: int) -> tuple[list[int], int]:
    """Up to ``limit`` candidate indices taken round-robin over ``findings``: per finding, its next candidate
    that ``passes`` (in candidate order), at most ceil(limit / findings) each, so that no finding outweighs
    the others in pooled figures (one whose candidates run out leaves its share unfilled). Returns (kept,
    candidates checked)."""
    queues: dict[str, list[int]] = {}
    for i, f in enumerate(findings):
        queues.setdefault(f, []).append(i)
    left = {f: iter(q) for f, q in queues.items()}
    quota = -(-limit // max(len(queues), 1))
    kept: list[int] = []
    checked = 0
    for _ in range(quota):
        for f in list(left):
            for i in left[f]:
                checked += 1
                if passes(i):
                    kept.append(i)
                    break
            else:
                del left[f]
            if len(kept) == limit:
                return kept, checked
    return kept, checked


def calibrate(gap: Callable[[int, float], float], samples: Mapping[str, Sequence[int]], min_gap: float,
              grid: Sequence[float] = NOISE_GRID, share: float = CALIBRATION_SHARE) -> dict:
    """``--noise-scale auto``: the smallest multiple of σ on ``grid`` at which, for every finding, at least
    ``share`` of its calibration ``samples`` move the metric by >= ``min_gap`` (``gap(sample, scale)``: |clean -
    corrupted|). ROME fixes 3σ for its models; its code takes the noise level as a setting, and what moves one
    model's answers leaves another's alone, so the scale is chosen per model and data set. Where no grid value
    meets the rule (``met`` False), the one whose worst finding moves most, then most on average, smallest first.
    Returns {"scale", "met", "share", "min_gap", "grid": scales tried, "moved": {finding: share moved per scale}}."""
    if not samples:
        raise InterpError("--noise-scale auto: the model answers no candidate sample right: nothing to calibrate on")
    moved: dict[str, list[float]] = {f: [] for f in samples}
    for k, scale in enumerate(grid):
        for f, idx in samples.items():
            moved[f].append(float(np.mean([gap(i, scale) >= min_gap for i in idx])))
        if min(m[k] for m in moved.values()) >= share:
            return {"scale": scale, "met": True, "share": share, "min_gap": min_gap, "grid": list(grid[: k + 1]),
                    "moved": moved}
    shares = [[m[k] for m in moved.values()] for k in range(len(grid))]
    best = max(range(len(grid)), key=lambda k: (min(shares[k]), np.mean(shares[k]), -k))
    return {"scale": grid[best], "met": False, "share": share, "min_gap": min_gap, "grid": list(grid), "moved": moved}


@dataclass
class SweepPlan:
    """What a sweep runs on: its candidates encoded with their answer ids, the noise per tower (trace mode)
    and the candidates kept (:func:`plan_sweep`)."""

    adapter: Adapter
    cfg: SweepConfig
    towers: dict[tuple[str, str], list[int]]
    candidates: list[Pair]
    encoded: list[tuple[Batch, Batch]]
    targets: list[list[int]]
    metric_kind: str
    sigma: dict[str, float] = field(default_factory=dict)  # per tower: the std of the values noised (ROME's σ)
    scales: dict[str, float] = field(default_factory=dict)  # per tower: the noise std in σ
    calibration: dict[str, dict] = field(default_factory=dict)  # per tower, with --noise-scale auto: calibrate's answer
    kept: list[int] = field(default_factory=list)
    checked: int = 0

    @property
    def swept(self) -> list[str]:
        return list(dict.fromkeys(tower for tower, _ in self.towers))

    def noised(self, i: int, tower: str) -> tuple[str, list[int]]:
        """(site, positions) the noise of candidate ``i`` goes to in ``tower``'s sweep."""
        span = "image" if self.cfg.corrupt in IMAGE_CORRUPTIONS else self.cfg.corrupt
        return noised(self.adapter, tower, self.encoded[i][0], span, self.candidates[i].region)

    def run(self, i: int, tower: str, layers: Sequence[int], groups: list[list[int]], point: str = "resid_post",
            method: str = "exact", std: float | None = None) -> SweepResult:
        """Candidate ``i``'s sweep of ``tower`` (``std``: this noise std instead of the plan's)."""
        clean, corrupt = self.encoded[i]
        t = self.targets[i]
        metric = metric_fn(self.metric_kind, t[0], t[1:]) if t else (lambda z: z[:, 0].float())
        std = self.scales[tower] * self.sigma[tower] if std is None and self.sigma else std
        noise = None if std is None else Noise(*self.noised(i, tower), std, self.cfg.copies, self.cfg.seed)
        if method == "atp":
            return atp_sweep(self.adapter, clean, corrupt, metric, tower=tower, layers=layers, groups=groups,
                             point=point, noise=noise)
        return restore_sweep(self.adapter, clean, corrupt, metric, tower=tower, layers=layers, groups=groups,
                             point=point, window=self.cfg.window, noise=noise, batch_size=self.cfg.batch_size)

    def gap(self, i: int, tower: str, std: float | None = None) -> float:
        """|clean - corrupted| of candidate ``i`` on ``tower`` (clean and corrupted runs only, no restores)."""
        r = self.run(i, tower, [], [[0]], std=std)
        return abs(r.clean - r.corrupted)

    def answered(self, i: int) -> bool:
        """Whether the model answers candidate ``i`` right: its answer scores above every alternative."""
        t = self.targets[i]
        if len(t) < 2:
            return True
        clean = self.encoded[i][0]
        scores = self.adapter.readout(self.adapter.run(clean)[0], clean)[0]
        return bool(scores[t[0]] >= scores[t[1:]].max())

    def calibration_samples(self) -> dict[str, list[int]]:
        """Per finding, its first CALIBRATION_SAMPLES candidates the model answers right."""
        out: dict[str, list[int]] = {}
        for i, p in enumerate(self.candidates):
            f = out.setdefault(p.item.finding, [])
            if len(f) < CALIBRATION_SAMPLES and self.answered(i):
                f.append(i)
        return {k: v for k, v in out.items() if v}

    def kept_findings(self) -> dict[str, int]:
        """Kept samples per finding."""
        findings = [self.candidates[i].item.finding for i in self.kept]
        return {f: findings.count(f) for f in sorted(set(findings))}


def plan_sweep(adapter: Adapter, pairs: list[Pair], cfg: SweepConfig) -> SweepPlan:
    """Encode the first candidates of ``pairs``, set the noise (trace mode: ``--noise-scale`` x σ per tower, or
    calibrated), and keep up to ``cfg.limit`` candidates whose corruption moves the metric by >= ``cfg.min_gap``
    on every swept tower (ROME keeps such cases: tiny gaps make normalised effects noise), round-robin over
    findings."""
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
    plan = SweepPlan(adapter, cfg, towers, candidates, encoded, targets, metric_kind)
    if cfg.mode == "trace":
        plan.sigma = {t: noise_std(adapter, [(c, plan.noised(i, t)) for i, (c, _) in enumerate(encoded)])
                      for t in plan.swept}
        if cfg.noise_scale == AUTO:
            samples = plan.calibration_samples()
            plan.calibration = {t: calibrate(lambda i, s, t=t: plan.gap(i, t, s * plan.sigma[t]), samples, cfg.min_gap)
                                for t in plan.swept}
        plan.scales = {t: plan.calibration[t]["scale"] if plan.calibration else float(cfg.noise_scale)
                       for t in plan.swept}
    plan.kept, plan.checked = stratified([p.item.finding for p in candidates],
                                         lambda i: all(plan.gap(i, t) >= cfg.min_gap for t in plan.swept), cfg.limit)
    if not plan.kept:
        raise InterpError(f"no sample among {len(candidates)} where the corruption moves the {metric_kind} by >= "
                          f"{cfg.min_gap}: lower --min-gap or check the model")
    return plan


def _say_plan(plan: SweepPlan) -> None:
    """The calibrated noise scale and the kept samples per finding, on stderr."""
    for tower, c in plan.calibration.items():
        k = c["grid"].index(c["scale"])
        rule = f"{c['share']:.0%} of each finding's calibration samples by >= {c['min_gap']}"
        if c["met"]:
            why = f"the smallest of {list(NOISE_GRID)} moving {rule}"
        else:
            worst = min(c["moved"], key=lambda f: c["moved"][f][k])
            why = (f"none of {list(NOISE_GRID)} moves {rule} (here {c['moved'][worst][k]:.0%} of {worst}): "
                   "noise does not corrupt every finding on this model; --mode patch does")
        print(f"{tower}: noise {c['scale']:g} x σ, calibrated: {why}", file=sys.stderr)
    counts = ", ".join(f"{f or 'samples'} {n}" for f, n in plan.kept_findings().items())
    print(f"kept {len(plan.kept)} of {plan.checked} candidate samples (corruption gap >= {plan.cfg.min_gap}): {counts}",
          file=sys.stderr)


def run_sweep(adapter: Adapter, pairs: list[Pair], cfg: SweepConfig, samples: Callable[[list[VQAItem]], SampleIndex],
              out: str) -> str:
    """Sweep every (tower, point) the sites name over the samples :func:`plan_sweep` keeps of ``pairs`` into the
    ``sweep`` group of the store at ``out`` (resumed if made the same way, else replaced); ``samples`` gives the
    kept items' index. Ranks of a launcher (``torchrun``) sweep disjoint sample chunks of one store. Returns ``out``."""
    plan = plan_sweep(adapter, pairs, cfg)
    rank, _ = rank_world()
    if rank == 0:
        _say_plan(plan)
    kept, candidates, towers = plan.kept, plan.candidates, plan.towers
    labels = {(i, t): position_groups(adapter, t, plan.encoded[i][0], cfg) for i in kept for t, _ in towers}
    names = {key: key[0] if key[1] == "resid_post" else f"{key[0]}.{key[1]}" for key in towers}
    fields, statics, attrs = _sweep_layout(plan, names, {k: v[1] for k, v in labels.items()})
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
                    res[m] = plan.run(i, tower, layers, groups, point, m)
                    elapsed[m][names[(tower, point)]] += time.perf_counter() - t0
                answer = adapter.tokenizer.convert_ids_to_tokens(plan.targets[i][0]) if plan.targets[i] else p.item.answer
                region = [f > 0 for f in mask_fraction(p.scored(), lab)]
                row = _sweep_row(res[methods[0]], lab, mask_fraction(p.mask, lab), region, answer, fields,
                                 names[(tower, point)], res.get("atp"))
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


def _sweep_layout(plan: SweepPlan, names: dict, labels: dict) -> tuple[dict[str, Field], dict, dict]:
    """(fields, statics, subgroup attrs) of the ``sweep`` group: per tower ``<t>/restored``,
    ``<t>/effect`` [sample, layer, position] (NaN past a sample's own positions, ``valid`` False),
    ``clean``, ``corrupted``, ``answer``, position labels, the finding's share of each position
    (``mask_fraction``) and whether the ground-truth score counts it (``region``); ``image`` [sample, y, x] shared."""
    cfg = plan.cfg
    pairs = [plan.candidates[i] for i in plan.kept]
    h, w = (max(p.clean_image.shape[d] for p in pairs) for d in (0, 1))
    fields: dict[str, Field] = {"image": Field((h, w), ("y", "x"), "float32")}
    statics, attrs = {}, {}
    circular, note = LOCALISATION.get(cfg.corrupt, (False, ""))
    for (tower, point), layers in plan.towers.items():
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
                   f"{name}/mask_fraction": Field(*pos, "float32", 0.0),
                   f"{name}/region": Field(*pos, "bool", False)}
        statics[f"{name}/layer"] = (("layer",), np.asarray(layers), {})
        attrs[name] = {
            "tower": tower, "mode": cfg.mode, "corrupt": cfg.corrupt if cfg.mode == "trace" else f"pair:{cfg.corrupt}",
            "metric": plan.metric_kind, "method": cfg.method, "point": point, "window": cfg.window,
            "granularity": cfg.lm_positions if tower == "lm" else cfg.vision_positions,
            "grid_rows": 1 + max((r for r, _ in cells), default=-1), "grid_cols": 1 + max((c for _, c in cells), default=-1),
            "noise_std": plan.scales.get(tower, 0.0) * plan.sigma.get(tower, 0.0),
            "noise_scale": plan.scales.get(tower, 0.0), "calibration": plan.calibration.get(tower, {}),
            "copies": cfg.copies if cfg.mode == "trace" else 0, "seed": cfg.seed,
            "circular": circular, "localisation": note}
    return fields, statics, attrs


def _sweep_row(res: SweepResult, labels: dict, fraction: list[float], region: list[bool], answer: str,
               fields: dict[str, Field], name: str, atp: SweepResult | None = None) -> dict[str, np.ndarray]:
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
            f"{name}/mask_fraction": pad(fraction, "mask_fraction"), f"{name}/region": pad(region, "region"),
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
