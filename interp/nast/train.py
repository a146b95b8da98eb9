"""NAST training runs (one runner, one config dataclass), scored by the organism's own evaluation.

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

Metrics: ``interp.models.train_clip.evaluate`` on ``eval_set(n_eval, eval_seed)`` (by default the 400
test phantoms of ``python -m interp.models.train_clip --eval-only``, so the ``base`` run reproduces its
numbers exactly): MedNega-style 4-way accuracy on the negated and the affirmative option sets and their
gap (affirmative - negated), contextual claim pair accuracy, image->text retrieval recall@1/5 over the
32 non-negated captions.
"""

from __future__ import annotations

import copy
import time
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from interp.data.negation import PHANTOM_BANK
from interp.data.phantom import FINDINGS
from interp.data.vqa import FINDING_WORDS, build_vqa
from interp.errors import InterpError
from interp.models.train_clip import EvalSet, claim_pairs, contrastive_loss, eval_set, evaluate, join, phrase
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
    if f.name == "cardiomegaly" or f.side is None:
        return PHANTOM_BANK[f.name].positive
    return f"there is a {FINDING_WORDS[f.name]} on the {f.side}"


def report_caption(spec, rng: np.random.Generator) -> str:
    """A training caption: each finding once, in random order; present -> positive sentence (with
    side), absent -> negated or affirmative sentence (coin flip)."""
    present = {f.name: f for f in spec.findings}
    return join([_finding_sentence(present[name]) if name in present else phrase(name, False, rng.random() < 0.5)
                 for name in rng.permutation(FINDINGS)])


def _feat(out) -> torch.Tensor:
    e = getattr(out, "pooler_output", out)
    return F.normalize(e.float(), dim=-1)


def train_data(n: int, seed: int, image_size: int = 64) -> tuple:
    """(data set, images, claim pairs per image) of the training phantoms; build once, pass to every run."""
    ds = build_vqa(n, seed, "train", kinds=("presence",), modes=("direct",), image_size=image_size)
    return ds, np.stack([ds.image(i) for i in range(n)]), claim_pairs(ds.specs, seed)


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
    """Train a copy of ``adapter.model`` with ``cfg`` (the adapter's model is not changed) and score it with
    ``train_clip.evaluate``; ``data`` / ``evals`` (``train_data`` / ``train_clip.eval_set`` of the config's
    sizes and seeds) are built when not given."""
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
        pixels = adapter.pixels(list(images)).float()
        dummy = [np.zeros((2, 2), np.float32)]
        rng = np.random.default_rng([cfg.seed, 3])
        scale = model.logit_scale.exp().detach()
        model.eval()  # no dropout: runs are deterministic in the seed
        b = cfg.batch_size
        for step in range(cfg.steps):
            idx = rng.choice(cfg.n_train, b, replace=False)
            caps = [report_caption(ds.specs[i], rng) for i in idx]
            picks = [claims[int(i)][rng.integers(len(claims[int(i)]))] for i in idx]
            texts = caps + [p for p, _, _ in picks] + [q for _, q, _ in picks]
            enc = adapter.encode(dummy * len(texts), texts)
            with torch.enable_grad():
                img = _feat(model.get_image_features(pixel_values=pixels[idx]))
                txt = _feat(model.get_text_features(input_ids=enc.input_ids, attention_mask=enc.attention_mask))
                l_con = contrastive_loss(scale * img @ txt[:b].T, None)
                sign = torch.tensor([1.0 if t else -1.0 for _, _, t in picks])
                diff = scale * ((img * txt[b : 2 * b]).sum(-1) - (img * txt[2 * b :]).sum(-1))
                loss = l_con + cfg.claim_weight * F.softplus(-sign * diff).mean()
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
            losses.append(round(loss.item(), 6))
            if progress and (step + 1) % max(1, cfg.steps // 5) == 0:
                print(f"  step {step + 1}/{cfg.steps} loss {loss.item():.4f}", flush=True)
        lora.remove_hooks()
        norms = lora.delta_norms("text")
    metrics = {}
    if evaluate_after:
        trained = type(adapter)(model, adapter.processor, f"{adapter.model_id} ({cfg.method})")
        metrics = evaluate(trained, evals or eval_set(cfg.n_eval, cfg.eval_seed, "test", cfg.image_size))
    return RunResult(asdict(cfg), None if a is None else [float(x) for x in a], losses, norms, metrics,
                     round(time.perf_counter() - t0, 2))
