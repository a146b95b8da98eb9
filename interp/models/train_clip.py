"""Train the CLIP model organism on phantoms with report-style captions; evaluate it on the
MedNega-style phantom benchmark (negated vs affirmative 4-way accuracy, their gap), contextual
claim pairs and image->text retrieval of non-negated captions. ``eval_set`` / ``evaluate`` are the
one CLIP evaluation path: ``--eval-only`` and every NAST run (``interp.nast``) score through them.

    python -m interp.models.train_clip                 # train, save to interp/models/weights/clip
    python -m interp.models.train_clip --eval-only     # print the figures of the shipped organism

Captions: each finding is mentioned with probability ``mention`` (at least one per caption),
in random order; a present finding as its positive phrase ("there is a pleural effusion"),
an absent one as its negated phrase ("there is no pneumothorax") with probability
``negated_rate``, else as its affirmative rewrite ("the lungs are fully expanded"); phrases
joined by " . ". Loss: the CLIP symmetric contrastive loss; with ``multi_positive`` images
of the same label vector in a batch count as positives of each other's captions (their
captions are equally true). ``hard_negatives``: each image's caption with one mentioned
finding's polarity flipped is added as an extra text negative (image->text direction).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from interp.cli import Parser, fraction, non_negative_int, not_applicable, out_dir, positive_int, run
from interp.data.negation import (PHANTOM_BANK, VARIANTS, NegationBenchmark, _bootstrap_ci, contextual_claims, mcq_correct,
                                  mednega_from_phantoms, score_negation)
from interp.data.phantom import FINDINGS, sample_spec
from interp.data.vqa import AFFIRMATIVE, SPLITS, VQADataset
from interp.errors import InterpError
from interp.models.registry import ALIASES

if TYPE_CHECKING:  # torch and the CLIP model load on use: the command line parses without them
    import torch

    from interp.models.clip import ClipAdapter


@dataclass
class ClipTrainConfig:
    seed: int = 0
    n_train: int = 6000  # phantoms rendered once (train split)
    steps: int = 1000
    batch: int = 64
    lr: float = 1e-3
    warmup: int = 100
    weight_decay: float = 0.05
    mention: float = 0.7
    negated_rate: float = 0.5
    multi_positive: bool = True
    hard_negatives: bool = False
    sizes: dict = field(default_factory=lambda: dict(d_text=64, n_text=4, d_vision=64, n_vision=3, d_embed=64))
    threads: int = 1  # 2 shared cores: one thread is faster than two under contention
    eval_images: int = 400  # held-out test split phantoms (benchmark + retrieval)
    eval_seed: int = 1


# ---------------------------------------------------------------------------------------
# captions


def phrase(name: str, present: bool, negated: bool) -> str:
    p = PHANTOM_BANK[name]
    return p.positive if present else p.negated if negated else p.affirmative


def join(phrases: list[str]) -> str:
    return " . ".join(phrases) + " ."


def sample_caption(labels: np.ndarray, rng: np.random.Generator, cfg: ClipTrainConfig) -> tuple[str, str]:
    """(caption, hard negative: the same caption with one finding's polarity flipped)."""
    order = rng.permutation(len(FINDINGS))
    keep = [i for i in order if rng.random() < cfg.mention] or [int(order[0])]
    neg = {i: bool(rng.random() < cfg.negated_rate) for i in keep}
    flip = keep[rng.integers(len(keep))]
    cap = [phrase(FINDINGS[i], bool(labels[i]), neg[i]) for i in keep]
    hard = [phrase(FINDINGS[i], bool(labels[i]) ^ (i == flip), neg[i]) for i in keep]
    return join(cap), join(hard)


def full_caption(labels: np.ndarray | tuple[int, ...]) -> str:
    """The non-negated caption of a label vector: every finding in fixed order, absent ones as
    affirmative rewrites (the retrieval gallery)."""
    return join([PHANTOM_BANK[n].positive if v else AFFIRMATIVE[n] for n, v in zip(FINDINGS, labels)])


def labels_of(spec) -> np.ndarray:
    return np.array([int(spec.has(n)) for n in FINDINGS], dtype=np.int64)


# ---------------------------------------------------------------------------------------
# training


def render_split(n: int, seed: int, split: str, progress: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """(images [n, 64, 64] float32, labels [n, 5]) of the phantoms ``build_vqa(n, seed, split)`` draws."""
    from tqdm import tqdm

    rng = np.random.default_rng([seed, SPLITS.index(split)])
    ds = VQADataset(seed, split, 64, [sample_spec(rng) for _ in range(n)], [])
    images = np.stack([ds.image(i) for i in tqdm(range(n), desc=f"render {split}", disable=not progress, leave=False)])
    return images.astype(np.float32), np.stack([labels_of(s) for s in ds.specs])


def contrastive_loss(logits: torch.Tensor, labels: torch.Tensor | None, n_hard: int = 0) -> torch.Tensor:
    """Symmetric CLIP loss on logits [images, texts (+ n_hard extra text negatives)]; with ``labels``
    [b, k] every text of the same label vector is a positive (targets spread uniformly)."""
    import torch

    b = logits.shape[0]
    if labels is None:
        target = torch.eye(b)
    else:
        target = (labels[:, None, :] == labels[None, :, :]).all(-1).float()
    target = target / target.sum(1, keepdim=True)
    t_img = torch.cat([target, torch.zeros(b, n_hard)], 1) if n_hard else target
    loss_i = -(t_img * logits.log_softmax(1)).sum(1).mean()
    loss_t = -(target.T / target.T.sum(1, keepdim=True) * logits[:, :b].T.log_softmax(1)).sum(1).mean()
    return (loss_i + loss_t) / 2


def train(cfg: ClipTrainConfig, progress: bool = True) -> tuple[ClipAdapter, dict]:
    import torch
    from tqdm import tqdm

    from interp.models.clip import ClipAdapter, build_clip_organism, clip_processor

    torch.manual_seed(cfg.seed)  # a training run is seeded as a whole (its threads are the caller's choice)
    model, tok = build_clip_organism(cfg.seed, **cfg.sizes)
    adapter_tmp = ClipAdapter(model, clip_processor(tok), "clip-organism-training")  # tokenisation + pixels
    images, labels = render_split(cfg.n_train, cfg.seed, "train", progress)
    pixels = adapter_tmp.pixels(list(images))
    rng = np.random.default_rng([cfg.seed, 77])
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / cfg.warmup) * 0.5 * (1 + np.cos(np.pi * min(1.0, s / cfg.steps))))
    model.train()
    dummy = [np.zeros((2, 2), np.float32)]
    t0, hist = time.time(), []
    bar = tqdm(range(cfg.steps), desc="train clip", disable=not progress)
    for step in bar:
        idx = rng.choice(cfg.n_train, size=cfg.batch, replace=False)
        caps, hards = zip(*(sample_caption(labels[i], rng, cfg) for i in idx))
        texts = list(caps) + (list(hards) if cfg.hard_negatives else [])
        enc = adapter_tmp.encode(dummy * len(texts), texts)
        out = model(input_ids=enc.input_ids, attention_mask=enc.attention_mask, pixel_values=pixels[idx])
        lab = torch.from_numpy(labels[idx]) if cfg.multi_positive else None
        loss = contrastive_loss(out.logits_per_image, lab, cfg.batch if cfg.hard_negatives else 0)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, np.log(100))
        hist.append(loss.item())
        if step % 20 == 0:
            bar.set_postfix(loss=f"{np.mean(hist[-20:]):.3f}", scale=f"{model.logit_scale.exp().item():.1f}")
    model.eval()
    info = {"train_seconds": round(time.time() - t0, 1), "final_loss": float(np.mean(hist[-50:])),
            "loss_first_50": float(np.mean(hist[:50])), "threads": torch.get_num_threads()}
    return ClipAdapter(model, clip_processor(tok), "clip-organism"), info


# ---------------------------------------------------------------------------------------
# evaluation: the one path for the organism (``--eval-only``, after training) and every NAST run


@dataclass
class EvalSet:
    """Held-out phantoms and what the metrics score on them; build once (``eval_set``), score any model."""

    bench: NegationBenchmark  # MedNega-style items of the qualifying phantoms
    images: np.ndarray  # [n_images, size, size]: every phantom drawn
    labels: np.ndarray  # [n_images, findings]
    claims: dict[int, list[tuple[str, str, bool]]]  # image -> (positive text, negated text, positive is true)

    @property
    def meta(self) -> dict:
        m = self.bench.meta
        return {"n_items": len(self.bench), "n_images": m["n_images"], "seed": m["seed"], "split": m["split"],
                "hash": self.bench.hash[:16]}


def claim_pairs(specs, seed: int) -> dict[int, list[tuple[str, str, bool]]]:
    """Per phantom, its contextual claim pairs (``interp.data.negation.contextual_claims``)."""
    by: dict[str, dict] = {}
    for c in contextual_claims(specs, seed):
        by.setdefault(c.id.rsplit("-", 1)[0], {})[c.negated] = c
    out: dict[int, list] = {}
    for d in by.values():
        p, q = d[False], d[True]
        out.setdefault(p.image, []).append((p.text, q.text, bool(p.label)))
    return out


def eval_set(n_images: int = 400, seed: int = 1, split: str = "test", image_size: int = 64) -> EvalSet:
    """The ``n_images`` phantoms ``build_vqa(n_images, seed, split)`` draws, their MedNega-style items and claims."""
    bench = mednega_from_phantoms(n_images, seed, split, image_size=image_size)
    ds = bench.dataset()
    return EvalSet(bench, np.stack([ds.image(i) for i in range(n_images)]), np.stack([labels_of(s) for s in ds.specs]),
                   claim_pairs(ds.specs, seed))


def evaluate(adapter: ClipAdapter, es: EvalSet) -> dict:
    """MedNega-style 4-way accuracy on the negated and the affirmative option sets (gap = affirmative -
    negated; 95% bootstrap CIs, the gap's paired over items), contextual claim accuracy (the true text of
    each positive/negated pair scores higher), and image->text retrieval recall@1/5 over the 32
    non-negated captions (one per label vector), as fractions."""
    img = adapter.image_embeds(list(es.images))
    gallery = [tuple(int(b) for b in np.binary_repr(k, len(FINDINGS))) for k in range(2 ** len(FINDINGS))]
    captions = [full_caption(v) for v in gallery]
    texts = sorted({t for v in VARIANTS for ch in es.bench.choices(v) for t in ch}
                   | {t for ps in es.claims.values() for p, q, _ in ps for t in (p, q)} | set(captions))
    col = {t: k for k, t in enumerate(texts)}
    sims = (img @ adapter.text_embeds(texts).T).numpy()  # cosine [images, texts]: the ranking of any logit

    rows = np.array([int(it.image) for it in es.bench.items])
    mcq = {v: sims[rows[:, None], [[col[t] for t in ch] for ch in es.bench.choices(v)]] for v in VARIANTS}
    s = score_negation(mcq["negation"], mcq["affirmative"], es.bench.correct)
    paired = mcq_correct(mcq["affirmative"], es.bench.correct) - mcq_correct(mcq["negation"], es.bench.correct)
    d = np.array([(sims[i, col[p]] - sims[i, col[q]]) * (1 if t else -1) for i, ps in es.claims.items() for p, q, t in ps])

    g = sims[:, [col[c] for c in captions]]
    truth = np.array([gallery.index(tuple(v)) for v in es.labels.tolist()])
    rank = (g > g[np.arange(len(truth)), truth][:, None]).sum(1)  # 0 = top
    pred = np.array(gallery)[g.argmax(1)]
    return {
        "negated": s.negated, "affirmative": s.affirmative, "gap": s.gap, "negated_ci": list(s.negated_ci),
        "affirmative_ci": list(s.affirmative_ci), "gap_ci": list(_bootstrap_ci(paired)),
        "claims": float(((d > 0) + 0.5 * (d == 0)).mean()),
        "recall@1": float((rank < 1).mean()), "recall@5": float((rank < 5).mean()),
        "finding_acc_from_top1": {n: float((pred[:, j] == es.labels[:, j]).mean()) for j, n in enumerate(FINDINGS)},
        "n_mcq": s.n, "n_claims": len(d), "gallery": len(gallery), "benchmark": es.meta,
    }


def format_table(m: dict) -> str:
    b = m["benchmark"]
    ci = lambda k: f"95% CI [{m[k][0]:.3f}, {m[k][1]:.3f}]"
    lines = [
        f"MedNega-style phantom benchmark ({b['n_items']} items, split {b['split']}, seed {b['seed']}; chance 0.25)",
        f"  negated     acc {m['negated']:.3f}  {ci('negated_ci')}",
        f"  affirmative acc {m['affirmative']:.3f}  {ci('affirmative_ci')}",
        f"  gap (affirmative - negated) {m['gap']:+.3f}  {ci('gap_ci')} (paired bootstrap over items)",
        f"contextual claim pairs ({m['n_claims']}): true text scores higher {m['claims']:.3f} (chance 0.5)",
        f"image->text retrieval, {b['n_images']} images vs {m['gallery']} non-negated captions: "
        f"R@1 {m['recall@1']:.3f} (chance {1 / m['gallery']:.3f})  R@5 {m['recall@5']:.3f} (chance {5 / m['gallery']:.3f})",
        "per-finding label read from the top-1 caption: " + ", ".join(f"{k} {v:.2f}" for k, v in m["finding_acc_from_top1"].items()),
    ]
    return "\n".join(lines)


def parser() -> Parser:
    p = Parser("python -m interp.models.train_clip", __doc__.split("\n\n")[0])
    p.add_argument("--eval-only", action="store_true", help="evaluate a saved model and print the figures")
    p.add_argument("--model", help="model for --eval-only, id or folder (default: clip-organism)")
    p.add_argument("--out", help=f"where to save the trained organism (default: {ALIASES['clip-organism']})")
    p.add_argument("--steps", type=positive_int)
    p.add_argument("--seed", type=non_negative_int)
    p.add_argument("--n-train", type=positive_int, help=f"training phantoms, at least a batch ({ClipTrainConfig.batch})")
    p.add_argument("--hard-negatives", action="store_true", default=None)
    p.add_argument("--negated-rate", type=fraction, help=f"share of absent findings' mentions that are negated phrases "
                                                        f"(default {ClipTrainConfig.negated_rate}; the rest affirmative rewrites)")
    p.add_argument("--eval-images", type=positive_int)
    p.add_argument("--no-progress", action="store_true")
    return p


TRAINING = ("steps", "seed", "n_train", "negated_rate", "hard_negatives")  # ClipTrainConfig fields given as options


def work(a: argparse.Namespace, command: str) -> None:
    """Train, evaluate and save (``command`` is recorded with the metrics), or evaluate only."""
    import torch

    from interp.models import load
    from interp.models.clip import save_clip_organism

    unused = (*TRAINING, "out") if a.eval_only else ("model",)
    not_applicable([k for k in unused if getattr(a, k) is not None],
                   "to --eval-only" if a.eval_only else "to training (--model goes with --eval-only)")
    cfg = ClipTrainConfig(**{k: getattr(a, k) for k in (*TRAINING, "eval_images") if getattr(a, k) is not None})
    torch.set_num_threads(cfg.threads)
    if a.eval_only:
        model = a.model or "clip-organism"
        adapter = load(model, kind="dual", purpose="train_clip --eval-only (CLIP-style retrieval)")
        m = evaluate(adapter, eval_set(cfg.eval_images, cfg.eval_seed))
        print(f"model {model} (weights {adapter.weight_hash})")
        print(format_table(m))
        return
    out = out_dir(a.out or str(ALIASES["clip-organism"]))
    if cfg.n_train < cfg.batch:
        raise InterpError(f"--n-train {cfg.n_train} is less than a batch ({cfg.batch} phantoms)")
    adapter, info = train(cfg, progress=not a.no_progress)
    m = evaluate(adapter, eval_set(cfg.eval_images, cfg.eval_seed))
    out = save_clip_organism(adapter.model, adapter.tokenizer, out)
    metrics = {"config": asdict(cfg), "train": info, "weight_hash": adapter.weight_hash, "eval": m,
               "command": command, "eval_command": "python -m interp.models.train_clip --eval-only"}
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    print(format_table(m))
    print(f"saved to {out} ({info['train_seconds']} s training)")


def main(argv: Sequence[str] | None = None) -> int:
    command = "python -m interp.models.train_clip " + " ".join(sys.argv[1:] if argv is None else argv)
    return run(parser().parse_args, lambda a: work(a, command), argv)


if __name__ == "__main__":
    raise SystemExit(main())
