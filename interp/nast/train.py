"""NAST training runs and their evaluation on phantoms (one runner, one config dataclass).

Loss (combined): CLIP contrastive (symmetric InfoNCE) on phantom report captions that mix
positive, negated and affirmative sentences, plus claim supervision: for each image one
positive/negated claim pair (`contextual_claims`: presence, laterality, zone, severity) and
``softplus(-(logit(true) - logit(false)))``, weighted by ``claim_weight``.

Methods (equal steps, seeds, data order and LoRA init): ``base`` (no training), ``uniform``
(LoRA, scale 1 everywhere), ``nast`` (alpha^beta), ``shuffled`` (the same alphas permuted
across layers), ``random`` (min-max normalised U(0, 1) alphas). Scaling mode ``grad`` puts
gradient hooks on the LoRA params and trains with SGD + momentum, whose update is linear in the
gradient (Adam would undo a constant per-layer gradient scale); mode ``lr`` uses AdamW with one
param group per layer at lr * alpha^beta.

Metrics (test-split phantoms, the same for every run): MedNega-style 4-way accuracy on the
negated and the affirmative option sets and their gap (affirmative - negated), contextual claim
pair accuracy (the true text of each positive/negated pair scores higher), and image->text
retrieval recall@1/5 among the distinct non-negated captions (present findings with side; the
affirmative sentences for an image without findings).
"""

from __future__ import annotations

import copy
import time
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from interp.data.negation import PHANTOM_BANK, contextual_claims, mednega_from_phantoms, score_negation
from interp.data.phantom import FINDINGS
from interp.data.vqa import AFFIRMATIVE, FINDING_WORDS, build_vqa
from interp.errors import InterpError
from interp.nast.config import NastConfig
from interp.nast.cte import minmax
from interp.nast.lora import apply_scaled_lora, n_blocks

@dataclass
class RunResult:
    config: dict
    alphas: list[float] | None
    losses: list[float]
    delta_norms: np.ndarray
    metrics: dict = field(default_factory=dict)
    seconds: float = 0.0

    def to_dict(self) -> dict:
        return {"config": self.config, "alphas": self.alphas, "losses": self.losses,
                "delta_norms": self.delta_norms.tolist(), "metrics": self.metrics, "seconds": self.seconds}


# ---------------------------------------------------------------------------------------
# texts


def _finding_sentence(f) -> str:
    words = FINDING_WORDS[f.name]
    if f.name == "cardiomegaly" or f.side is None:
        return PHANTOM_BANK[f.name].positive
    return f"there is a {words} on the {f.side}"


def report_caption(spec, rng: np.random.Generator) -> str:
    """A training caption: each finding once, in random order; present -> positive sentence (with
    side), absent -> negated or affirmative sentence (coin flip)."""
    parts = []
    present = {f.name: f for f in spec.findings}
    for name in rng.permutation(FINDINGS):
        if name in present:
            parts.append(_finding_sentence(present[name]))
        else:
            parts.append(PHANTOM_BANK[name].negated if rng.random() < 0.5 else AFFIRMATIVE[name])
    return " . ".join(parts) + " ."


def plain_caption(spec) -> str:
    """The non-negated caption used for retrieval: present findings with side in a fixed order;
    an image without findings gets the affirmative sentences."""
    parts = [_finding_sentence(f) for name in FINDINGS for f in spec.findings if f.name == name]
    return " . ".join(parts or [AFFIRMATIVE[n] for n in FINDINGS]) + " ."


def _claim_pairs(specs, seed: int) -> dict[int, list[tuple[str, str, bool]]]:
    by: dict[str, dict] = {}
    for c in contextual_claims(specs, seed):
        by.setdefault(c.id.rsplit("-", 1)[0], {})[c.negated] = c
    out: dict[int, list] = {}
    for d in by.values():
        p, q = d[False], d[True]
        out.setdefault(p.image, []).append((p.text, q.text, bool(p.label)))
    return out


# ---------------------------------------------------------------------------------------
# model plumbing


def _pixels(adapter, images) -> torch.Tensor:
    if hasattr(adapter, "pixels"):
        return adapter.pixels(images)
    return adapter.encode(list(images), ["."] * len(images)).pixel_values


def _tokens(adapter, texts, blank) -> tuple[torch.Tensor, torch.Tensor]:
    b = adapter.encode([blank] * len(texts), list(texts))
    return b.input_ids, b.attention_mask


def _feat(out) -> torch.Tensor:
    e = getattr(out, "pooler_output", out)
    if not torch.is_tensor(e):
        e = e[0]
    return F.normalize(e.float(), dim=-1)


def text_features(model, adapter, texts, blank, chunk: int = 256) -> torch.Tensor:
    outs = []
    for i in range(0, len(texts), chunk):
        ids, mask = _tokens(adapter, texts[i : i + chunk], blank)
        outs.append(_feat(model.get_text_features(input_ids=ids, attention_mask=mask)))
    return torch.cat(outs)


def image_features(model, pixels, chunk: int = 256) -> torch.Tensor:
    return torch.cat([_feat(model.get_image_features(pixel_values=pixels[i : i + chunk])) for i in range(0, len(pixels), chunk)])


def train_data(n: int, seed: int, image_size: int = 64) -> tuple:
    """(data set, images, claim pairs per image) of the training phantoms; build once, pass to every run."""
    ds = build_vqa(n, seed, "train", kinds=("presence",), modes=("direct",), image_size=image_size)
    return ds, np.stack([ds.image(i) for i in range(n)]), _claim_pairs(ds.specs, seed)


@dataclass
class EvalSet:
    """Test-split phantoms and every text the metrics score, built once per (n, seed)."""

    images: np.ndarray
    bench: object
    bench_images: np.ndarray
    claims: list[tuple[int, str, str, bool]]
    captions: list[str]


def eval_set(n: int, seed: int, image_size: int = 64) -> EvalSet:
    ds = build_vqa(n, seed, "test", kinds=("presence",), modes=("direct",), image_size=image_size)
    images = np.stack([ds.image(i) for i in range(n)])
    bench = mednega_from_phantoms(n, seed, "test", image_size=image_size)
    bench_images = np.stack([images[int(it.image)] for it in bench.items])
    claims = [(i, p, q, t) for i, ps in _claim_pairs(ds.specs, seed).items() for p, q, t in ps]
    return EvalSet(images, bench, bench_images, claims, [plain_caption(s) for s in ds.specs])


@torch.no_grad()
def evaluate(model, adapter, es: EvalSet) -> dict:
    """MedNega negated/affirmative accuracy and gap, claim accuracy, retrieval recall@1/5 (fractions)."""
    model.eval()
    blank = np.zeros_like(es.images[0])
    img = image_features(model, _pixels(adapter, es.images).to(next(model.parameters()).dtype))
    texts = sorted({t for it in es.bench.items for v in ("negation", "affirmative") for t in it.choices(v)}
                   | {t for _, p, q, _ in es.claims for t in (p, q)} | set(es.captions))
    index = {t: k for k, t in enumerate(texts)}
    txt = text_features(model, adapter, texts, blank)
    sims = img @ txt.T  # [images, texts]
    rows = torch.tensor([int(it.image) for it in es.bench.items])

    def mcq(variant):
        cols = torch.tensor([[index[t] for t in it.choices(variant)] for it in es.bench.items])
        return sims[rows[:, None], cols].numpy()

    neg = score_negation(mcq("negation"), mcq("affirmative"), es.bench.correct)
    d = np.array([float(sims[i, index[p]] - sims[i, index[q]]) * (1 if t else -1) for i, p, q, t in es.claims])
    claim_acc = float(((d > 0) + 0.5 * (d == 0)).mean())
    caps = sorted(set(es.captions))
    cidx = torch.tensor([index[c] for c in caps])
    s = sims[:, cidx]
    true = torch.tensor([caps.index(c) for c in es.captions])
    rank = (s > s[torch.arange(len(true)), true][:, None]).sum(1)
    return {"negated": neg.negated, "affirmative": neg.affirmative, "gap": neg.gap, "claims": claim_acc,
            "recall@1": float((rank < 1).float().mean()), "recall@5": float((rank < 5).float().mean()),
            "n_mcq": neg.n, "n_claims": len(d), "n_captions": len(caps)}


def method_alphas(method: str, alphas, n: int, seed: int) -> np.ndarray | None:
    """The per-layer alphas a method trains with (None = uniform)."""
    if method in ("base", "uniform"):
        return None
    if method == "random":
        return minmax(np.random.default_rng([seed, 7]).random(n))
    if alphas is None:
        raise InterpError(f"method {method!r} needs alphas (from `python -m interp.nast trace`)")
    a = np.asarray(alphas, dtype=np.float64)
    if method == "shuffled":
        rng = np.random.default_rng([seed, 11])
        perm = rng.permutation(len(a))
        while len(a) > 1 and np.array_equal(a[perm], a):  # a real shuffle
            perm = rng.permutation(len(a))
        a = a[perm]
    return a


def train_run(adapter, cfg: NastConfig, alphas=None, *, data: tuple | None = None, evals: EvalSet | None = None,
              evaluate_after: bool = True, progress: bool = False) -> RunResult:
    """Train a copy of ``adapter.model`` with ``cfg`` (the adapter's model is not changed); ``data`` /
    ``evals`` (``train_data`` / ``eval_set`` of the config's sizes and seeds) are built when not given."""
    cfg.validate()
    t0 = time.perf_counter()
    model = copy.deepcopy(adapter.model).float()
    n = n_blocks(model)
    a = method_alphas(cfg.method, alphas, n, cfg.seed)
    losses: list[float] = []
    norms = np.zeros(n)
    if cfg.method != "base":
        lora = apply_scaled_lora(model, a, cfg.beta, rank=cfg.rank, lora_alpha=cfg.lora_alpha, vision=cfg.vision,
                                 hooks=cfg.scale_mode == "grad", seed=cfg.seed)
        if cfg.scale_mode == "grad":
            opt = torch.optim.SGD(lora.trainable(), lr=cfg.lr, momentum=cfg.momentum)
        else:
            opt = torch.optim.AdamW(lora.param_groups(cfg.lr), lr=cfg.lr, weight_decay=0.0)
        ds, images, claims = data or train_data(cfg.n_train, cfg.data_seed, cfg.image_size)
        pixels = _pixels(adapter, images).float()
        blank = np.zeros_like(images[0])
        rng = np.random.default_rng([cfg.seed, 3])
        scale = model.logit_scale.exp().detach()
        model.eval()  # no dropout: runs are deterministic in the seed
        for step in range(cfg.steps):
            idx = rng.choice(cfg.n_train, cfg.batch_size, replace=False)
            caps = [report_caption(ds.specs[i], rng) for i in idx]
            picks = [claims[int(i)][rng.integers(len(claims[int(i)]))] for i in idx]
            texts = caps + [p for p, _, _ in picks] + [q for _, q, _ in picks]
            ids, mask = _tokens(adapter, texts, blank)
            with torch.enable_grad():
                img = _feat(model.get_image_features(pixel_values=pixels[idx]))
                txt = _feat(model.get_text_features(input_ids=ids, attention_mask=mask))
                b = cfg.batch_size
                logits = scale * img @ txt[:b].T
                target = torch.arange(b)
                l_con = (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2
                sign = torch.tensor([1.0 if t else -1.0 for _, _, t in picks])
                diff = scale * ((img * txt[b : 2 * b]).sum(-1) - (img * txt[2 * b :]).sum(-1))
                l_claim = F.softplus(-sign * diff).mean()
                loss = l_con + cfg.claim_weight * l_claim
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
            losses.append(round(loss.item(), 6))
            if progress and (step + 1) % max(1, cfg.steps // 5) == 0:
                print(f"  step {step + 1}/{cfg.steps} loss {loss.item():.4f}", flush=True)
        lora.remove_hooks()
        norms = lora.delta_norms("text")
    if evaluate_after:
        evals = evals or eval_set(cfg.n_eval, cfg.data_seed + 1000, cfg.image_size)
    metrics = evaluate(model, adapter, evals) if evaluate_after else {}
    return RunResult(asdict(cfg), None if a is None else [float(x) for x in a], losses, norms, metrics,
                     round(time.perf_counter() - t0, 2))
