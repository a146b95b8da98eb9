"""Train the embedded LVLM organism on phantom VQA: ``python -m interp.models.train``.

Recipe (why each part is there: see ``--help`` and the README):

1. A fixed pool of training phantoms is rendered once into numpy (images + per-patch labels).
2. Ground truth is exploited through an AUXILIARY per-patch loss on the projector output: a
   throwaway linear head (never saved) predicts, for each 8x8 patch, which findings (with side
   and zone) overlap it. Stage 1 trains vision tower + projector on it alone (cheap: no LM);
   it stays on during stage 2, so the LM reads localised, near-perfect finding features.
3. Stage 2 trains everything on answers: cross-entropy on the answer token (direct mode) and
   on every target token (step-by-step mode, teacher forcing), plus the auxiliary loss.
   Each image's prefix ``<bos> + 64 image tokens`` is run through the LM once and its
   key/value cache is shared by several prompts about that image (exactly the same function
   as the full forward, several times cheaper on CPU).

4. Organism v2 (``--recipe v2``, the default; ``RECIPES`` in ``train_cli``) trains under the shifts it is
   tested on (``interp.data.shifts``): patient rotation within +-12 degrees (rendered exactly), contrast
   scaled by 0.5-1.2 per image and step, a chest tube in half the images beside no finding; a second,
   location-free per-patch head (one direction per finding, whatever its side or zone) and a third for the
   lung zone each patch lies in; 3,000 phantoms and a stage 1 of 2,000 steps (zone answers were limited by
   the vision features, and stage-1 steps cost a fifth of stage-2 ones).

Deterministic given ``--seed`` and ``--steps`` (``--minutes`` stops on the clock instead).
``--confounder-rate`` / ``--confounded`` draw the training phantoms with a chest tube that follows a
finding: the shortcut organism (``organism-shortcut``; measured by ``interp.models.shortcut``).
"""

from __future__ import annotations

from interp.models.train_cli import main  # light: the command line answers --help and bad options before torch loads

if __name__ == "__main__":
    raise SystemExit(main())

import math
import time
from dataclasses import dataclass, field, replace

import numpy as np
import torch
import torch.nn.functional as F
from transformers import DynamicCache

from interp.data.phantom import CONFOUNDED_FINDING, FINDINGS, SIDES, ZONE_FINDINGS, ZONES, sample_spec
from interp.data.shifts import Shift, contrast, rotated
from interp.data.vqa import ALL_KINDS, MODES, VQADataset, build_vqa, split_target
from interp.errors import InterpError
from interp.models.organism import IMAGE_MEAN, IMAGE_SIZE, IMAGE_STD, PATCH_SIZE, build_organism

GRID = IMAGE_SIZE // PATCH_SIZE
N_PATCHES = GRID * GRID


def _aux_classes() -> list[tuple[str, str | None, str | None]]:
    out: list[tuple[str, str | None, str | None]] = []
    for name in FINDINGS:
        if name == "cardiomegaly":
            out.append((name, None, None))
        elif name in ZONE_FINDINGS:
            out += [(name, s, z) for s in SIDES for z in ZONES]
        else:
            out += [(name, s, None) for s in SIDES]
    return out


#: per-patch multi-label classes of the auxiliary head: finding x side (x zone where it varies)
AUX_CLASSES = _aux_classes()
AUX_INDEX = {c: i for i, c in enumerate(AUX_CLASSES)}
#: the phantom's lung-zone concept masks the zone head predicts per patch (organism v2)
LUNG_ZONES = tuple(f"lung_{s}_{z}" for s in SIDES for z in ZONES)
_GROUPS = [[i for i, c in enumerate(AUX_CLASSES) if c[0] == f] for f in FINDINGS]


def image_logits(patch_logits: torch.Tensor) -> torch.Tensor:
    """[b, 64, C] per-patch values -> [b, 5]: max over patches and a finding's classes."""
    return torch.stack([patch_logits[:, :, g].flatten(1).max(1).values for g in _GROUPS], 1)


@dataclass
class TrainConfig:
    seed: int = 0
    steps: int = 600  # stage-2 steps
    minutes: float | None = None  # stop stage 2 on the clock instead (not deterministic)
    n_train_images: int = 1500
    # training data: a chest tube in a fraction confounder_rate of the images with finding `confounded`
    # and 1 - confounder_rate of those without (None: no tubes; see sample_spec)
    confounder_rate: float | None = None
    confounded: str = CONFOUNDED_FINDING
    # augmentation (organism v2): patient rotation drawn in +-aug_rotation degrees instead of the phantom's
    # own +-4 (0: off), contrast scaled about the image mean by a factor drawn per image and step in
    # [aug_contrast_min, aug_contrast_max] (interp.data.shifts.contrast; 1, 1: off)
    aug_rotation: float = 0.0
    aug_contrast_min: float = 1.0
    aug_contrast_max: float = 1.0
    # stage 1: vision tower + projector + aux head only
    aux_steps: int = 400
    aux_batch: int = 64
    aux_lr: float = 3e-3
    # stage 2: everything
    images_per_step: int = 16
    prompts_per_image: int = 8
    lr: float = 2e-3
    lr_vision: float = 1e-3
    warmup: int = 30
    weight_decay: float = 0.01
    aux_weight: float = 1.0
    mil_weight: float = 0.3
    # a second per-patch head on the same features predicting each finding wherever it lies (organism v2):
    # one linear direction per finding shared by every side and zone (0: off)
    finding_weight: float = 0.0
    # a third per-patch head predicting which lung zone each patch lies in (the anatomy, findings or not; organism
    # v2): zone questions need the zones' boundaries, which finding patches alone teach sparsely (0: off)
    zone_weight: float = 0.0
    cot_fraction: float = 0.5
    kind_weights: dict = field(default_factory=lambda: {
        "presence": 2.0, "negated": 2.0, "positive": 1.0, "affirmative": 1.0, "laterality": 1.0, "zone": 1.0})
    # model sizes (organism_config)
    d_vision: int = 64
    n_vision: int = 2
    d_lm: int = 64
    n_lm: int = 3
    threads: int = 1

    def __post_init__(self) -> None:
        sample_spec(np.random.default_rng(0), 0.5, self.confounder_rate, self.confounded)  # checks both as the data will
        if not 0 < self.aug_contrast_min <= self.aug_contrast_max:
            raise InterpError(f"need 0 < aug_contrast_min <= aug_contrast_max, got {self.aug_contrast_min}, "
                              f"{self.aug_contrast_max}")
        if not 0 <= self.aug_rotation <= 45:
            raise InterpError(f"aug_rotation must be in [0, 45] degrees, got {self.aug_rotation}")
        unknown = set(self.kind_weights) - set(ALL_KINDS)
        if unknown:
            raise InterpError(f"unknown kinds in kind_weights: {sorted(unknown)}; valid: {', '.join(ALL_KINDS)}")

    def sizes(self) -> dict[str, int]:
        return {"d_vision": self.d_vision, "n_vision": self.n_vision, "d_lm": self.d_lm, "n_lm": self.n_lm}


# ---------------------------------------------------------------------------- data


def patch_labels(finding_masks: dict[str, np.ndarray], spec) -> np.ndarray:
    """[64 patches, len(AUX_CLASSES)] soft targets: fraction of a patch a finding covers, x8, clipped to 1."""
    y = np.zeros((N_PATCHES, len(AUX_CLASSES)), np.float32)
    for f in spec.findings:
        m = finding_masks.get(f.name)
        if m is None:
            continue
        key = (f.name, f.side, f.zone if f.name in ZONE_FINDINGS else None)
        cov = patch_cover(m)
        y[:, AUX_INDEX[key]] = np.maximum(y[:, AUX_INDEX[key]], np.minimum(cov * 8.0, 1.0))
    return y


def patch_cover(mask: np.ndarray) -> np.ndarray:
    """[64 patches]: the share of each patch inside ``mask`` [64, 64]."""
    return mask.reshape(GRID, PATCH_SIZE, GRID, PATCH_SIZE).mean((1, 3)).reshape(-1)


@dataclass
class Pool:
    """Rendered images (normalised pixels), per-patch labels and tokenised items, grouped by image."""

    pixels: torch.Tensor  # [n, 1, 64, 64]
    labels: torch.Tensor  # [n, 64, C]
    zones: torch.Tensor  # [n, 64, 6]: share of each patch in each lung zone (LUNG_ZONES)
    items: list[list[tuple[list[int], list[int], str, str]]]  # per image: (prompt ids, target ids, kind, mode)


def normalise(images: np.ndarray) -> torch.Tensor:
    x = torch.from_numpy(np.asarray(images, np.float32))[:, None]
    return (x - IMAGE_MEAN[0]) / IMAGE_STD[0]


def render_pool(ds: VQADataset, tok, progress: bool = False, zone_labels: bool = False) -> Pool:
    from tqdm import tqdm

    n = len(ds.specs)
    imgs = np.zeros((n, IMAGE_SIZE, IMAGE_SIZE), np.float32)
    labels = np.zeros((n, N_PATCHES, len(AUX_CLASSES)), np.float32)
    zones = np.zeros((n, N_PATCHES, len(LUNG_ZONES)), np.float32) if zone_labels else np.zeros((n, 0, 0), np.float32)
    for i in tqdm(range(n), desc="render", disable=not progress, leave=False):
        ph = ds.phantom(i)
        imgs[i] = ph.image
        labels[i] = patch_labels(ph.finding_masks, ds.specs[i])
        if zone_labels:
            zones[i] = np.stack([patch_cover(ph.concept_masks[c]) for c in LUNG_ZONES], -1)
    items: list[list] = [[] for _ in range(n)]
    vocab = tok.get_vocab()
    for it in ds.items:
        items[it.image].append(([vocab[w] for w in it.prompt.split()], [vocab[w] for w in it.target.split()], it.kind, it.mode))
    return Pool(normalise(imgs), torch.from_numpy(labels), torch.from_numpy(zones), items)


# ---------------------------------------------------------------------------- model pieces


def image_features(model, pixel_values: torch.Tensor) -> torch.Tensor:
    """Projector output [b, 64, d_lm] (same path as LlavaModel.get_image_features, CLS dropped)."""
    vo = model.model.vision_tower(pixel_values, output_hidden_states=True)
    return model.model.multi_modal_projector(vo.hidden_states[model.config.vision_feature_layer][:, 1:])


def prefix_kv(model, feats: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Run ``<bos> + image tokens`` through the LM once: each layer's (keys, values), one row per image."""
    lm = model.model.language_model
    bos = lm.embed_tokens(torch.full((feats.shape[0], 1), model.config.text_config.bos_token_id))
    out = lm(inputs_embeds=torch.cat([bos, feats], 1), use_cache=True)
    return [(layer.keys, layer.values) for layer in out.past_key_values.layers]


def text_logits(model, kv: list[tuple[torch.Tensor, torch.Tensor]], rows: torch.Tensor, ids: torch.Tensor,
                mask: torch.Tensor) -> torch.Tensor:
    """Logits of text tokens ``ids`` [B, T] (right-padded, ``mask``) after the cached prefix of images ``rows``."""
    lm = model.model.language_model
    # index_select, not k[rows]: the backward of advanced indexing accumulates in a thread-dependent order, so
    # two-thread training would stop reproducing bit for bit; index_select's index_add backward does not
    cache = DynamicCache([(k.index_select(0, rows), v.index_select(0, rows)) for k, v in kv])
    B, T = ids.shape
    n0 = 1 + N_PATCHES
    am = torch.cat([torch.ones(B, n0, dtype=torch.long), mask], 1)
    pos = torch.arange(n0, n0 + T)[None].expand(B, -1)
    out = lm(inputs_embeds=lm.embed_tokens(ids), attention_mask=am, position_ids=pos, past_key_values=cache, use_cache=True)
    return model.lm_head(out.last_hidden_state)


def pack(seqs: list[tuple[list[int], list[int], str, str]]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(ids, mask, labels) for teacher forcing: direct -> loss on the answer only, cot -> every target token."""
    rows, labs = [], []
    for p, t, _, mode in seqs:
        full = p + t[:-1]  # the last target token is predicted, never fed
        rows.append(full)
        lab = [-100] * (len(p) - 1) + t
        labs.append(lab)
    T = max(map(len, rows))
    ids = torch.zeros(len(rows), T, dtype=torch.long)
    mask = torch.zeros(len(rows), T, dtype=torch.long)
    labels = torch.full((len(rows), T), -100, dtype=torch.long)
    for i, (r, l) in enumerate(zip(rows, labs)):
        ids[i, : len(r)] = torch.tensor(r)
        mask[i, : len(r)] = 1
        labels[i, : len(l)] = torch.tensor(l)
    return ids, mask, labels


# ---------------------------------------------------------------------------- training


class Trainer:
    def __init__(self, cfg: TrainConfig, progress: bool = True) -> None:
        self.cfg = cfg
        self.progress = progress
        torch.manual_seed(cfg.seed)  # a training run is seeded as a whole (its threads are the caller's choice)
        self.model, self.tok = build_organism(cfg.seed, **cfg.sizes())
        self.model.train()
        g = torch.Generator().manual_seed(cfg.seed + 1)
        head = torch.nn.Linear(cfg.d_lm, len(AUX_CLASSES))
        with torch.no_grad():
            head.weight.copy_(torch.randn(head.weight.shape, generator=g) * cfg.d_lm**-0.5)
            head.bias.fill_(-3.0)
        self.aux_head = head
        self.finding_head = torch.nn.Linear(cfg.d_lm, len(FINDINGS)) if cfg.finding_weight else None
        self.zone_head = torch.nn.Linear(cfg.d_lm, len(LUNG_ZONES)) if cfg.zone_weight else None
        self.rng = np.random.default_rng([cfg.seed, 7])
        self.aug_rng = np.random.default_rng([cfg.seed, 13])  # its own stream: recipes without augmentation unchanged
        self.history: list[dict] = []

    # --- data
    def load_data(self) -> None:
        cfg = self.cfg
        ds = build_vqa(cfg.n_train_images, cfg.seed, "train", confounder_rate=cfg.confounder_rate, confounded=cfg.confounded)
        if cfg.aug_rotation:
            turn = self.aug_rng.uniform(-cfg.aug_rotation, cfg.aug_rotation, len(ds.specs))
            ds = replace(ds, specs=[rotated(s, r) for s, r in zip(ds.specs, turn)])
        self.pool = render_pool(ds, self.tok, self.progress, zone_labels=bool(cfg.zone_weight))

    def pixels(self, images) -> torch.Tensor:
        """Normalised pixels of pool images ``images``, contrast-augmented when the config says so."""
        x = self.pool.pixels[images]
        lo, hi = self.cfg.aug_contrast_min, self.cfg.aug_contrast_max
        if (lo, hi) == (1.0, 1.0):
            return x
        return torch.from_numpy(contrast(x.numpy(), self.aug_rng.uniform(lo, hi, len(x))))  # linear: same in [0, 1]

    # --- losses
    def aux_loss(self, feats: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
        """Per-patch BCE plus an image-level (max over patches, multiple-instance) BCE per finding; with
        ``finding_weight``, per-patch BCE of the location-free finding head too, with ``zone_weight`` that of the
        lung-zone head (soft targets: each patch's share of each zone)."""
        labels = self.pool.labels[images]
        logits = self.aux_head(feats)
        pos = torch.tensor(4.0)
        loss = F.binary_cross_entropy_with_logits(logits, labels, pos_weight=pos)
        if self.cfg.mil_weight:
            loss = loss + self.cfg.mil_weight * F.binary_cross_entropy_with_logits(
                image_logits(logits), (image_logits(labels) > 0).float())
        if self.finding_head is not None:
            anywhere = torch.stack([labels[..., g].amax(-1) for g in _GROUPS], -1)
            loss = loss + self.cfg.finding_weight * F.binary_cross_entropy_with_logits(
                self.finding_head(feats), anywhere, pos_weight=pos)
        if self.zone_head is not None:
            loss = loss + self.cfg.zone_weight * F.binary_cross_entropy_with_logits(
                self.zone_head(feats), self.pool.zones[images])
        return loss

    def heads(self) -> list[torch.nn.Parameter]:
        """Parameters of the throw-away auxiliary heads (never saved)."""
        return [p for h in (self.aux_head, self.finding_head, self.zone_head) if h is not None for p in h.parameters()]

    def sample_prompts(self, image: int, k: int) -> list:
        items = self.pool.items[image]
        w = np.array([self.cfg.kind_weights.get(kind, 1.0) * (self.cfg.cot_fraction if mode == "cot" else 1 - self.cfg.cot_fraction)
                      for _, _, kind, mode in items])
        # weight each kind equally regardless of how many items of it the image has
        counts: dict[tuple[str, str], int] = {}
        for _, _, kind, mode in items:
            counts[kind, mode] = counts.get((kind, mode), 0) + 1
        w = w / np.array([counts[kind, mode] for _, _, kind, mode in items])
        idx = self.rng.choice(len(items), size=k, replace=len(items) < k, p=w / w.sum())
        return [items[i] for i in idx]

    def answer_step(self, images: np.ndarray) -> dict[str, float]:
        cfg, model = self.cfg, self.model
        feats = image_features(model, self.pixels(images))
        aux = self.aux_loss(feats, images)
        kv = prefix_kv(model, feats)
        seqs = [(j, s) for j, i in enumerate(images) for s in self.sample_prompts(int(i), cfg.prompts_per_image)]
        # one batch per answer mode: direct rows are a third as long as step-by-step ones, so padding them
        # together would spend most of a direct row on padding
        ce_sum, n_tokens, hits = torch.zeros(()), 0, 0
        for mode in MODES:
            group = [(j, s) for j, s in seqs if s[3] == mode]
            if not group:
                continue
            ids, mask, labels = pack([s for _, s in group])
            logits = text_logits(model, kv, torch.tensor([j for j, _ in group]), ids, mask)
            ce_sum = ce_sum + F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1),
                                              ignore_index=-100, reduction="sum")
            n_tokens += int((labels != -100).sum())
            last = (labels != -100).cumsum(1).argmax(1)  # answer-token accuracy (the last target token of a row)
            rows = torch.arange(len(group))
            hits += int((logits[rows, last].argmax(-1) == labels[rows, last]).sum())
        ce = ce_sum / n_tokens
        loss = ce + cfg.aux_weight * aux
        return {"loss": loss, "ce": ce.item(), "aux": aux.item(), "acc": hits / len(seqs)}

    def train(self) -> dict:
        from tqdm import tqdm

        cfg, model = self.cfg, self.model
        t0 = time.time()
        self.load_data()
        t_data = time.time() - t0
        n = len(self.pool.pixels)
        vision = list(model.model.vision_tower.parameters()) + list(model.model.multi_modal_projector.parameters())
        # stage 1: vision + projector + aux head
        if cfg.aux_steps:
            opt = torch.optim.AdamW(vision + self.heads(), lr=cfg.aux_lr, weight_decay=cfg.weight_decay)
            sched = torch.optim.lr_scheduler.LambdaLR(opt, _cosine(cfg.aux_steps, 20))
            bar = tqdm(range(cfg.aux_steps), desc="stage 1 (vision+aux)", disable=not self.progress)
            for step in bar:
                idx = torch.from_numpy(self.rng.choice(n, min(cfg.aux_batch, n), replace=False))
                loss = self.aux_loss(image_features(model, self.pixels(idx)), idx)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                if step % 10 == 0:
                    bar.set_postfix(aux=f"{loss.item():.4f}")
                    self.history.append({"stage": 1, "step": step, "aux": loss.item()})
        # stage 2: everything
        vid = {id(p) for p in vision}
        rest = [p for p in model.parameters() if id(p) not in vid]
        opt = torch.optim.AdamW(
            [{"params": vision, "lr": cfg.lr_vision}, {"params": rest, "lr": cfg.lr},
             {"params": self.heads(), "lr": cfg.lr_vision}],
            weight_decay=cfg.weight_decay,
        )
        sched = torch.optim.lr_scheduler.LambdaLR(opt, _cosine(cfg.steps, cfg.warmup))
        t2 = time.time()
        bar = tqdm(range(cfg.steps), desc="stage 2 (answers)", disable=not self.progress)
        ema = None
        steps_done = 0
        for step in bar:
            if cfg.minutes is not None and time.time() - t0 > cfg.minutes * 60:
                break
            images = self.rng.choice(n, min(cfg.images_per_step, n), replace=False)
            out = self.answer_step(images)
            opt.zero_grad(set_to_none=True)
            out["loss"].backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            steps_done += 1
            ema = {k: out[k] if ema is None else 0.9 * ema[k] + 0.1 * out[k] for k in ("ce", "aux", "acc")}
            if step % 5 == 0:
                bar.set_postfix(ce=f"{ema['ce']:.3f}", aux=f"{ema['aux']:.4f}", acc=f"{ema['acc']:.3f}")
                self.history.append({"stage": 2, "step": step, **{k: round(v, 5) for k, v in ema.items()}})
        model.eval()
        return {"train_seconds": round(time.time() - t0, 1), "data_seconds": round(t_data, 1),
                "stage2_seconds": round(time.time() - t2, 1), "steps": steps_done}


def _cosine(total: int, warmup: int):
    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        t = (step - warmup) / max(1, total - warmup)
        return 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(t, 1.0)))
    return f


# ---------------------------------------------------------------------------- evaluation


@torch.no_grad()
def greedy(model, tok, pixel_values: torch.Tensor, prompts: list[list[int]], max_new: int = 40) -> list[str]:
    """Greedy decoding of equal-length prompts through the real HF forward (input_ids + pixel_values)."""
    ids = torch.tensor([[tok.bos_token_id] + [model.config.image_token_id] * N_PATCHES + p for p in prompts])
    out = model(input_ids=ids, pixel_values=pixel_values, use_cache=True)
    cache = out.past_key_values
    nxt = out.logits[:, -1].argmax(-1)
    gen = [nxt]
    vocab = tok.get_vocab()
    ans, colon = vocab.get("answer"), vocab.get(":")
    for _ in range(max_new - 1):
        g = torch.stack(gen, 1)
        done = ((g[:, :-2] == ans) & (g[:, 1:-1] == colon)).any(1) if g.shape[1] > 2 else torch.zeros(len(g), dtype=torch.bool)
        if done.all():
            break
        out = model(input_ids=nxt[:, None], past_key_values=cache, use_cache=True)
        cache = out.past_key_values
        nxt = out.logits[:, -1].argmax(-1)
        gen.append(nxt)
    texts = []
    for row in torch.stack(gen, 1).tolist():
        words = tok.convert_ids_to_tokens(row)
        for j in range(len(words) - 2):  # cut after the word that follows the first "answer :"
            if words[j] == "answer" and words[j + 1] == ":":
                words = words[: j + 3]
                break
        texts.append(" ".join(words))
    return texts


@torch.no_grad()
def evaluate(model, tok, n_images: int = 100, seed: int = 1, split: str = "test", kinds=ALL_KINDS,
             modes=MODES, batch: int = 128, cot_images: int | None = None, progress: bool = False,
             shift: Shift | None = None) -> dict:
    """Accuracy per (kind, mode) on a fresh split, under ``shift`` if given; cot answers by greedy decoding.
    Ground truth = the spec."""
    from tqdm import tqdm

    model.eval()
    ds = build_vqa(n_images, seed, split, kinds=kinds, modes=modes)
    seen = ds if shift is None else shift.dataset(ds)
    images = np.stack([seen.image(i) for i in range(n_images)])
    pix = normalise(images if shift is None else shift.pixels(images))
    vocab = tok.get_vocab()
    groups: dict[tuple[str, int], list] = {}
    for it in ds.items:
        if it.mode == "cot" and cot_images is not None and it.image >= cot_images:
            continue
        ids = [vocab[w] for w in it.prompt.split()]
        groups.setdefault((it.mode, len(ids)), []).append((it, ids))
    correct: dict[str, list[int]] = {}
    chunks = [(mode, g[i:i + batch]) for (mode, _), g in groups.items() for i in range(0, len(g), batch)]
    for mode, chunk in tqdm(chunks, desc="eval", disable=not progress, leave=False):
        px = pix[[it.image for it, _ in chunk]]
        prompts = [ids for _, ids in chunk]
        if mode == "direct":
            ids = torch.tensor([[tok.bos_token_id] + [model.config.image_token_id] * N_PATCHES + p for p in prompts])
            pred = model(input_ids=ids, pixel_values=px).logits[:, -1].argmax(-1).tolist()
            words = [tok.convert_ids_to_tokens(p) for p in pred]
        else:
            words = []
            for text in greedy(model, tok, px, prompts):
                try:
                    words.append(split_target(text) if "answer :" in text else "")
                except InterpError:
                    words.append("")
        for (it, _), w in zip(chunk, words):
            correct.setdefault(f"{it.kind}/{it.mode}", []).append(int(w == it.answer))
    return {k: {"acc": round(float(np.mean(v)), 4), "n": len(v)} for k, v in sorted(correct.items())}


def format_table(metrics: dict) -> str:
    kinds = [k for k in ALL_KINDS if any(m.startswith(k + "/") for m in metrics)]
    modes = [m for m in MODES if any(k.endswith("/" + m) for k in metrics)]
    lines = [f"{'kind':<12}" + "".join(f"{m:>18}" for m in modes)]
    for k in kinds:
        cells = []
        for m in modes:
            r = metrics.get(f"{k}/{m}")
            cells.append(f"{r['acc']:>10.3f} (n={r['n']:>4})" if r else f"{'-':>18}")
        lines.append(f"{k:<12}" + "".join(cells))
    return "\n".join(lines)


def format_shifts(base: dict, shifted: dict[str, dict]) -> str:
    """Accuracy per (kind, mode) unshifted and under each shift; last line the most points any shift loses."""
    keys = [k for k in base if all(k in m for m in shifted.values())]
    lines = [f"{'kind/mode':<20}{'none':>8}" + "".join(f"{name:>15}" for name in shifted)]
    worst = (0.0, "", "")
    for k in keys:
        cells = []
        for name, m in shifted.items():
            lost = 100 * (base[k]["acc"] - m[k]["acc"])
            worst = max(worst, (lost, name, k))
            cells.append(f"{m[k]['acc']:>8.3f} ({-lost:+4.0f})")
        lines.append(f"{k:<20}{base[k]['acc']:>8.3f}" + "".join(cells))
    lines.append(f"most points lost: {worst[0]:.1f} ({worst[1]}, {worst[2]})")
    return "\n".join(lines)
