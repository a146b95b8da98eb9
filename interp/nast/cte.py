"""Negation tracing on a dual encoder's text tower: CTE per layer x token role, and alphas.

**Mode ``nast``** (NAST / Quantmeyer et al. 2024, exact): one image, two texts that differ by
negation, the positive ("there is a pleural effusion .") and the negated ("there is no pleural
effusion ."). At each layer l (0 = the embeddings, l >= 1 = the output of block l - 1) and token
position p, the positive text's hidden state is replaced by the negated text's;
``s = logit(caption) - logit(foil)`` and ``CTE(l, p) = s_traced / s``. Which of the two texts is
the caption (true for the image) only flips the sign of numerator and denominator, so
``CTE = (logit(pos*) - logit(neg)) / (logit(pos) - logit(neg))`` either way: 1 = the patch
changes nothing, 0 = the patched positive text scores exactly like the negated one.

It runs as ``interp.trace.patching.restore_sweep`` (clean = negated text, corrupt = positive
text, metric = readout - logit(neg), then divided by s): batched, no_grad, with restorations that
change nothing (positions before the negator, under the causal text mask) not run. Layer 0
(embeddings) is one extra batched forward with an edit at ``text.embed``.

Positions are grouped by **role**: [SOT], "there", "is/are", negator, first subject token,
further subject tokens, ".", [EOT] (plus "other" for the rest, e.g. "on the left"). In aligned
pairs (same length; phantom presence/laterality claims) the positive text's article ("a") sits
in the negator's slot and takes the negator role. Unaligned pairs ("the nodule is large ." /
"the nodule is not large .") are patched role to role: each role's positions in the positive
text receive the states of the same role's positions in the negated text, in order, where both
texts have the role the same number of times; roles missing from either text are NaN (for
these pairs the negator has no counterpart, and position embeddings differ after the insert).

**Mode ``noise``** (ROME on the cue): the negated text is run clean and with Gaussian noise on
the negation cue's embeddings (``Noise`` at ``text.embed``), and each (block, role) is restored;
the metric is ``logit(neg) - logit(pos)`` and the value is the normalised indirect effect
``(restored - noised) / (clean - noised)`` (layer 0 is not traced in this mode: NaN).

**Alphas**: the per-layer profile is an aggregate over roles of the sample-mean *effect*
(``1 - CTE`` in mode nast, the indirect effect in mode noise), by default its max over roles
("where can one position carry the negation at this depth"); ``negator`` (the cue position
only) and ``mean`` are options. alpha for block l (the LoRA'd layer) uses the profile at
hidden state l + 1 (that block's output); alpha = min-max normalisation over the blocks, so the
least causal block gets alpha 0 (no update) and the most causal alpha 1 (rule ``state``). Rule
``block`` (the per-block variant) gives block l the effect it *adds* at EOT, the token CLIP pools:
min-max of max(0, effect at hidden state l + 1 - effect at hidden state l), so the blocks that move
negation onto the pooled token are trained and the later ones, where it has already arrived, are not.

**Store**: ``write_trace`` writes a multi-seed run as group ``nast`` of a results store
(``interp.store``; read with ``open_store``), ``load_alphas`` reads its alphas back for training.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from interp.errors import InterpError
from interp.models.adapter import Batch
from interp.nast.config import AGGREGATES, ALPHA_RULES, TraceConfig
from interp.store import Field, SampleIndex, StoreWriter, open_store
from interp.store.layout import digest
from interp.trace.patching import Noise, restore_sweep

ROLES = ("SOT", "there", "is/are", "negator", "subject_first", "subject_rest", ".", "EOT", "other")
NEGATORS = frozenset({"no", "not", "without", "never", "none", "nor"})
MODES = ("nast", "noise")
_PIECE = re.compile(r"(</w>|^Ġ|^▁|^##)")


@dataclass(frozen=True)
class NegationPair:
    """One image with a positive statement and its negated counterpart (spans: char ranges)."""

    image: np.ndarray
    positive: str
    negated: str
    positive_spans: dict = field(default_factory=dict)
    negated_spans: dict = field(default_factory=dict)
    positive_true: bool = True  # which text is the caption (true for the image)
    id: str = ""


# ---------------------------------------------------------------------------------------
# roles


def _word(token: str) -> str:
    return _PIECE.sub("", str(token)).strip().lower()


def token_roles(tokens: Sequence[str], ids: Sequence[int], tokenizer, subject: Sequence[int] = ()) -> list[str | None]:
    """Role of each position (None for padding). ``subject``: the finding's positions; without
    them every token that is not another role counts as "other"."""
    bos = {tokenizer.bos_token_id, getattr(tokenizer, "cls_token_id", None)} - {None}
    eos = {tokenizer.eos_token_id, getattr(tokenizer, "sep_token_id", None)} - {None}
    pad = tokenizer.pad_token_id
    eos_pos = next((i for i, t in enumerate(ids) if t in eos), None)
    subject = sorted(subject)
    roles: list[str | None] = []
    for i, (tok, t) in enumerate(zip(tokens, ids)):
        w = _word(tok)
        if i == 0 and t in bos:
            r = "SOT"
        elif i == eos_pos:
            r = "EOT"
        elif eos_pos is not None and i > eos_pos or (t == pad and t not in eos):
            r = None
        elif w in NEGATORS:
            r = "negator"
        elif subject and i == subject[0]:
            r = "subject_first"
        elif i in subject:
            r = "subject_rest"
        elif w == "there":
            r = "there"
        elif w in ("is", "are"):
            r = "is/are"
        elif w == ".":
            r = "."
        else:
            r = "other"
        roles.append(r)
    return roles


def role_map(pos_roles: Sequence[str | None], neg_roles: Sequence[str | None]) -> dict[str, tuple[list[int], list[int]]]:
    """{role: (positions in the positive text, positions in the negated text)} for every role
    the pair can be patched at. Aligned pairs (same length, same roles except at the
    negator slot) map position to position and the positive's token in the negator slot
    takes the negator role; otherwise roles map in order where their counts agree."""
    if "negator" not in neg_roles:
        raise InterpError("negated text has no negation cue (no, not, without): nothing to trace")
    aligned = len(pos_roles) == len(neg_roles) and all(
        a == b or b == "negator" for a, b in zip(pos_roles, neg_roles)
    )
    out: dict[str, tuple[list[int], list[int]]] = {}
    if aligned:
        for role in ROLES:
            p = [i for i, r in enumerate(neg_roles) if r == role]
            if p:
                out[role] = (p, p)
        return out
    for role in ROLES:
        p = [i for i, r in enumerate(pos_roles) if r == role]
        q = [i for i, r in enumerate(neg_roles) if r == role]
        if p and len(p) == len(q):
            out[role] = (p, q)
    return out


def _rows_roles(adapter, batch, row: int, span_key: str = "finding") -> list[str | None]:
    pos = batch.positions[row]
    ids = batch.input_ids[row].tolist()
    subject = pos.spans.get(span_key, []) if hasattr(pos, "spans") else []
    tokens = pos.tokens if getattr(pos, "tokens", None) else adapter.tokenizer.convert_ids_to_tokens(ids)
    return token_roles(tokens, ids, adapter.tokenizer, subject)


# ---------------------------------------------------------------------------------------
# results


@dataclass
class CTEResult:
    """``values[sample, layer, role]``: CTE (mode nast) or indirect effect (mode noise); NaN
    where a role is absent from a pair or a layer is not traced. ``margin[sample]`` is
    logit(pos) - logit(neg) of the unpatched texts; ``pairs`` are the traced pairs, row by row."""

    values: np.ndarray
    margin: np.ndarray
    mode: str
    roles: tuple[str, ...] = ROLES
    ids: list[str] = field(default_factory=list)
    meta: dict = field(default_factory=dict)
    pairs: list[NegationPair] = field(default_factory=list)

    @property
    def n_layers(self) -> int:
        """Hidden states traced: embeddings + one per block."""
        return self.values.shape[1]

    def effect(self) -> np.ndarray:
        """[sample, layer, role] causal effect: 1 - CTE (nast) or the indirect effect (noise)."""
        return 1.0 - self.values if self.mode == "nast" else self.values

    def mean(self, effect: bool = False) -> np.ndarray:
        v = self.effect() if effect else self.values
        with np.errstate(all="ignore"), _quiet():
            return np.nanmean(v, axis=0)

    def ci(self, level: float = 0.95, n_boot: int = 1000, seed: int = 0, effect: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """Percentile bootstrap CI of the sample mean, per (layer, role)."""
        v = self.effect() if effect else self.values
        rng = np.random.default_rng(seed)
        idx = rng.integers(len(v), size=(n_boot, len(v)))
        with np.errstate(all="ignore"), _quiet():
            boots = np.stack([np.nanmean(v[i], axis=0) for i in idx])
            a = (1 - level) / 2
            return np.nanquantile(boots, a, axis=0), np.nanquantile(boots, 1 - a, axis=0)

    def profile(self, aggregate: str = "max") -> np.ndarray:
        """[layer] aggregate over roles of the sample-mean effect (see module doc)."""
        m = self.mean(effect=True)
        if aggregate not in AGGREGATES:
            raise InterpError(f"unknown aggregate {aggregate!r}: choose {', '.join(AGGREGATES)}")
        with np.errstate(all="ignore"), _quiet():
            if aggregate == "negator":
                return m[:, self.roles.index("negator")]
            return np.nanmax(m, axis=1) if aggregate == "max" else np.nanmean(m, axis=1)


class _quiet:
    def __enter__(self):
        import warnings

        self._w = warnings.catch_warnings()
        self._w.__enter__()
        warnings.simplefilter("ignore", RuntimeWarning)

    def __exit__(self, *exc):
        self._w.__exit__(*exc)


# ---------------------------------------------------------------------------------------
# tracing


def _logits(adapter, batch) -> torch.Tensor:
    out, _ = adapter.run(batch)
    return adapter.readout(out, batch).reshape(len(batch), -1)[:, 0].double()


def _encode_pair(adapter, pair: NegationPair):
    b = adapter.encode([pair.image, pair.image], [pair.positive, pair.negated], [pair.positive_spans, pair.negated_spans])
    return b, _rows_roles(adapter, b, 0), _rows_roles(adapter, b, 1)


@torch.no_grad()
def trace_pair(adapter, pair: NegationPair, *, mode: str = "nast", noise_scale: float = 3.0, copies: int = 10,
               seed: int = 0, batch_size: int = 512) -> tuple[np.ndarray, float]:
    """[hidden states (n_blocks + 1), roles] values of one pair and its margin logit(pos) - logit(neg)."""
    if mode not in MODES:
        raise InterpError(f"unknown negation-trace mode {mode!r}: choose {', '.join(MODES)}")
    n = adapter.n_layers("text")
    b, pos_roles, neg_roles = _encode_pair(adapter, pair)
    rmap = role_map(pos_roles, neg_roles)
    pos, neg = b.take([0]), b.take([1])
    z = _logits(adapter, b)
    margin = float(z[0] - z[1])
    out = np.full((n + 1, len(ROLES)), np.nan)
    roles = [r for r in ROLES if r in rmap]
    blocks = list(range(n))
    if mode == "noise":
        cue = rmap["negator"][1]
        _, emb = adapter.run(neg, read=["text.embed"])
        std = float(emb["text.embed"][0][neg.attention_mask[0].bool()].std()) * noise_scale
        groups = [rmap[r][1] for r in roles]
        res = restore_sweep(adapter, neg, neg, lambda v: v.reshape(len(v), -1)[:, 0] - z[0].to(v.dtype),
                            tower="text", layers=blocks, groups=groups,
                            noise=Noise("text.embed", tuple(cue), std, copies, seed), batch_size=batch_size)
        for k, r in enumerate(roles):
            out[1:, ROLES.index(r)] = res.effect[:, k]
        return out, margin
    if margin == 0:
        return out, margin
    aligned = all(p == q for p, q in rmap.values()) and pos.input_ids.shape == neg.input_ids.shape
    groups = [rmap[r][0] for r in roles]  # positions in the positive (patched) text
    metric = lambda v: v.reshape(len(v), -1)[:, 0] - z[1].to(v.dtype)
    states = None if aligned else _moved_states(adapter, pos, neg, rmap, metric)
    res = restore_sweep(adapter, neg if aligned else pos, pos, metric, tower="text", layers=blocks, groups=groups,
                        batch_size=batch_size, clean_states=states)
    for k, r in enumerate(roles):
        out[1:, ROLES.index(r)] = res.restored[:, k] / margin
    # layer 0: the embeddings, one batched forward (a row per role)
    _, cn = adapter.run(neg, read=["text.embed"])
    rows = pos.take([0] * len(roles))
    ri = torch.tensor([k for k, r in enumerate(roles) for _ in rmap[r][0]])
    pi = torch.tensor([p for r in roles for p in rmap[r][0]])
    qi = torch.tensor([q for r in roles for q in rmap[r][1]])
    vals = cn["text.embed"][0, qi]

    def put(x: torch.Tensor) -> torch.Tensor:
        x = x.clone()
        x[ri, pi] = vals.to(x.dtype)
        return x

    o, _ = adapter.run(rows, edit={"text.embed": put})
    s0 = adapter.readout(o, rows).reshape(len(rows), -1)[:, 0].double() - z[1]
    for k, r in enumerate(roles):
        out[0, ROLES.index(r)] = float(s0[k]) / margin
    return out, margin


def _moved_states(adapter, pos: Batch, neg: Batch, rmap: dict, metric) -> tuple[float, dict[str, torch.Tensor]]:
    """Clean states for unaligned pairs: the negated text's block outputs moved onto the positive
    text's positions role by role (elsewhere the positive's own states, so restore_sweep sees
    nothing to restore there), and the negated text's metric."""
    sites = [f"text.blocks.{j}.resid_post" for j in range(adapter.n_layers("text"))]
    p = torch.tensor([p for ps, _ in rmap.values() for p in ps])
    q = torch.tensor([q for _, qs in rmap.values() for q in qs])
    out_n, cache_n = adapter.run(neg, read=sites)
    _, cache_p = adapter.run(pos, read=sites)
    merged = {}
    for k, v in cache_p.items():
        v = v.clone()
        v[:, p] = cache_n[k][:, q].to(v.dtype)
        merged[k] = v
    return float(metric(adapter.readout(out_n, neg))[0]), merged


def negation_pairs(n_images: int, seed: int = 0, split: str = "test", *, attributes: Sequence[str] = ("presence", "laterality"),
                   image_size: int = 64, limit: int | None = None) -> list[NegationPair]:
    """Positive/negated claim pairs (`interp.data.negation.contextual_claims`) on phantoms of
    `build_vqa(n_images, seed, split)`; presence and laterality pairs align token by token."""
    from interp.data.negation import ATTRIBUTES, contextual_claims
    from interp.data.vqa import build_vqa

    bad = [a for a in attributes if a not in ATTRIBUTES]
    if bad:
        raise InterpError(f"unknown attribute {bad[0]!r}; valid: {', '.join(ATTRIBUTES)}")
    ds = build_vqa(n_images, seed, split, kinds=("presence",), modes=("direct",), image_size=image_size)
    claims = [c for c in contextual_claims(ds, seed) if c.attribute in attributes]
    by_id: dict[str, dict] = {}
    for c in claims:
        by_id.setdefault(c.id.rsplit("-", 1)[0], {})[c.negated] = c
    images: dict[int, np.ndarray] = {}
    pairs = []
    for key, d in by_id.items():
        p, q = d[False], d[True]
        if p.image not in images:
            images[p.image] = ds.image(p.image)
        pairs.append(NegationPair(images[p.image], p.text, q.text, dict(p.spans), dict(q.spans), bool(p.label), key))
        if limit is not None and len(pairs) >= limit:
            break
    return pairs


def negation_trace(adapter, pairs: Sequence[NegationPair], *, mode: str = "nast", min_margin: float = 0.0,
                   noise_scale: float = 3.0, copies: int = 10, seed: int = 0, batch_size: int = 512,
                   progress: Callable | None = None) -> CTEResult:
    """Trace every pair (see module doc); pairs with |margin| < ``min_margin`` are left out
    (CTE divides by the margin) and counted in ``meta["dropped"]``."""
    if not pairs:
        raise InterpError("no negation pairs to trace")
    vals, margins, ids, kept, dropped = [], [], [], [], 0
    it = progress(pairs) if progress else pairs
    for k, pair in enumerate(it):
        v, m = trace_pair(adapter, pair, mode=mode, noise_scale=noise_scale, copies=copies, seed=seed + k,
                          batch_size=batch_size)
        if mode == "nast" and abs(m) <= min_margin:
            dropped += 1
            continue
        vals.append(v)
        margins.append(m)
        ids.append(pair.id or str(k))
        kept.append(pair)
    if not vals:
        raise InterpError(f"every pair has |logit(pos) - logit(neg)| <= {min_margin}: CTE is undefined")
    meta = {"mode": mode, "min_margin": min_margin, "dropped": dropped, "n_pairs": len(pairs),
            "model": getattr(adapter, "model_id", "?"), "aggregate_default": "max"}
    if mode == "noise":
        meta.update(noise_scale=noise_scale, copies=copies)
    return CTEResult(np.stack(vals), np.asarray(margins), mode, ROLES, ids, meta, kept)


# ---------------------------------------------------------------------------------------
# alphas and stability


def minmax(x: Sequence[float]) -> np.ndarray:
    """(x - min) / (max - min); a constant profile gives all ones (every layer equally causal)."""
    a = np.asarray(x, dtype=np.float64)
    if a.ndim != 1 or not len(a) or not np.isfinite(a).all():
        raise InterpError(f"min-max needs a finite 1-D profile, got {a.tolist()}")
    span = a.max() - a.min()
    return np.ones_like(a) if span == 0 else (a - a.min()) / span


def alphas_from_profile(profile: Sequence[float], n_blocks: int | None = None) -> np.ndarray:
    """alpha per block from a per-hidden-state profile ([embeddings, block 0 out, ...]):
    block l gets min-max(profile[1:])[l]."""
    p = np.asarray(profile, dtype=np.float64)
    if n_blocks is not None and len(p) != n_blocks + 1:
        raise InterpError(f"profile has {len(p)} entries, expected {n_blocks + 1} (embeddings + {n_blocks} blocks)")
    return minmax(np.nan_to_num(p[1:], nan=0.0))


def alphas_from_cte(result: CTEResult, aggregate: str = TraceConfig.aggregate,
                    rule: str = TraceConfig.alpha_rule) -> np.ndarray:
    """alpha_l (one per text block). Rule ``state``: min-max normalised per-layer aggregate effect at the
    block's output. Rule ``block``: min-max normalised effect the block adds at EOT (where CLIP pools),
    max(0, effect after it - effect before it): the blocks that move negation to the pooled token."""
    if rule not in ALPHA_RULES:
        raise InterpError(f"unknown alpha rule {rule!r}: choose {', '.join(ALPHA_RULES)}")
    if rule == "state":
        return alphas_from_profile(result.profile(aggregate), result.n_layers - 1)
    eot = np.nan_to_num(result.mean(effect=True)[:, result.roles.index("EOT")], nan=0.0)
    return minmax(np.clip(np.diff(eot), 0.0, None))


def check_alphas(alphas: Sequence[float], n_layers: int) -> np.ndarray:
    """Alphas as an array, or InterpError naming the mismatch in one line."""
    a = np.asarray(alphas, dtype=np.float64).reshape(-1)
    if len(a) != n_layers:
        raise InterpError(f"alphas have length {len(a)}, but the text encoder has {n_layers} layers")
    if not np.isfinite(a).all() or (a < 0).any():
        raise InterpError(f"alphas must be finite and >= 0, got {a.round(4).tolist()}")
    return a


def spearman(a: Sequence[float], b: Sequence[float]) -> float:
    """Spearman rank correlation (average ranks for ties; NaN entries dropped pairwise)."""
    x, y = np.asarray(a, float), np.asarray(b, float)
    ok = np.isfinite(x) & np.isfinite(y)
    x, y = x[ok], y[ok]
    if len(x) < 2:
        return float("nan")

    def rank(v):
        order = np.argsort(v, kind="mergesort")
        r = np.empty(len(v))
        r[order] = np.arange(len(v), dtype=float)
        for u in np.unique(v):
            r[v == u] = r[v == u].mean()
        return r

    rx, ry = rank(x), rank(y)
    if rx.std() == 0 or ry.std() == 0:
        return float("nan")
    return float(np.corrcoef(rx, ry)[0, 1])


def seed_stability(profiles: Sequence[Sequence[float]]) -> dict:
    """Pairwise Spearman correlations of per-layer profiles from different seeds and their mean."""
    rs = {f"{i}-{j}": spearman(profiles[i], profiles[j]) for i in range(len(profiles)) for j in range(i + 1, len(profiles))}
    vals = [v for v in rs.values() if np.isfinite(v)]
    return {"pairwise": rs, "mean": float(np.mean(vals)) if vals else float("nan")}


def trace_seeds(adapter, seeds: Sequence[int], n_images: int, *, attributes: Sequence[str] = ("presence", "laterality"),
                aggregate: str = TraceConfig.aggregate, min_margin: float = TraceConfig.min_margin,
                limit: int | None = None, split: str = "val", mode: str = "nast",
                alpha_rule: str = TraceConfig.alpha_rule) -> tuple[list[CTEResult], CTEResult, dict, np.ndarray]:
    """CTE per data seed (ids ``seed<s>/<pair>``), their pooled result (its meta also records how the
    pairs were built: seeds, split, n_images, attributes, limit), the per-seed profiles' rank
    stability, and alphas."""
    results = []
    for s in seeds:
        r = negation_trace(adapter, negation_pairs(n_images, s, split, attributes=attributes, limit=limit),
                           mode=mode, min_margin=min_margin)
        results.append(replace(r, ids=[f"seed{s}/{i}" for i in r.ids]))
    recipe = {"seeds": list(seeds), "split": split, "n_images": n_images, "attributes": list(attributes), "limit": limit}
    pooled = CTEResult(np.concatenate([r.values for r in results]), np.concatenate([r.margin for r in results]), mode,
                       results[0].roles, [i for r in results for i in r.ids],
                       {**results[0].meta, **recipe, "dropped": sum(r.meta["dropped"] for r in results),
                        "n_pairs": sum(r.meta["n_pairs"] for r in results)}, [p for r in results for p in r.pairs])
    stab = seed_stability([r.profile(aggregate) for r in results])
    return results, pooled, stab, alphas_from_cte(pooled, aggregate, alpha_rule)


# ---------------------------------------------------------------------------------------
# the results store

COUNTS = ("dropped", "n_pairs")  # pooled.meta entries that are results, not settings
NOT_CONFIG = (*COUNTS, "model", "aggregate_default")  # the model is in the run meta, the aggregate given
QUANTITY = {"nast": "CTE = s_traced / s: 1 = the patch changes nothing, 0 = the patched positive scores like the negated",
            "noise": "normalised indirect effect of restoring the negated text's state (layer 0 not traced: NaN)"}


def _json(a: np.ndarray | float) -> list | float | None:
    """Numbers as attributes hold them: NaN as null."""
    return np.where(np.isfinite(a), a, None).tolist()


def _samples(pooled: CTEResult) -> SampleIndex:
    """One row per traced pair: prompt = the negated text; the data set is the phantom claim pairs' recipe."""
    pairs = pooled.pairs
    recipe = {k: pooled.meta[k] for k in ("seeds", "split", "n_images", "attributes", "limit")}
    fields = {"prompt": [p.negated for p in pairs], "positive": [p.positive for p in pairs],
              "caption": ["positive" if p.positive_true else "negated" for p in pairs],  # the text true for the image
              "finding": [p.negated[slice(*p.negated_spans.get("finding", (0, 0)))] for p in pairs],
              "spans": [json.dumps(p.negated_spans, sort_keys=True) for p in pairs],
              "positive_spans": [json.dumps(p.positive_spans, sort_keys=True) for p in pairs]}
    texts = [[i, p.positive, p.negated, p.positive_true] for i, p in zip(pooled.ids, pairs)]
    name = (f"phantom claim pairs ({', '.join(recipe['attributes'])}) on {recipe['n_images']} {recipe['split']} "
            f"phantoms per data seed {', '.join(map(str, recipe['seeds']))}")
    return SampleIndex(list(pooled.ids), fields, dataset={"ref": "phantom-claims", "name": name,
                                                          "hash": digest([recipe, texts]), **recipe})


def write_trace(url: str, adapter, results: Sequence[CTEResult], pooled: CTEResult, stability: dict,
                alphas: np.ndarray, aggregate: str = TraceConfig.aggregate,
                alpha_rule: str = TraceConfig.alpha_rule) -> str:
    """Write a ``trace_seeds`` run as group ``nast`` of the results store at ``url`` (replacing it).

    Sample index: one row per traced pair (see ``_samples``; thumbnails of its image). Group ``nast``:
    ``cte`` [sample, layer, role], ``margin`` [sample], coordinate ``seed`` [sample] (data seed);
    statics ``layer`` (hidden state: 0 = embeddings), ``role``, pooled ``cte_mean``, ``cte_ci_low``,
    ``cte_ci_high`` [layer, role], ``profile`` [layer] and ``alpha`` [layer] (the alpha of the block whose
    output is that hidden state; NaN at the embeddings). Node attrs: run meta and settings, ``n_pairs``,
    ``dropped``, ``stability`` and ``per_seed`` (seed, counts, profile, cte_mean and its CI per data seed)."""
    ci = {"level": 0.95, "n_boot": 1000}
    lo, hi = pooled.ci(ci["level"], ci["n_boot"])
    grid = ("layer", "role")
    statics = {"layer": (("layer",), np.arange(pooled.n_layers), {}), "role": (("role",), np.asarray(pooled.roles), {}),
               "cte_mean": (grid, pooled.mean(), {}), "cte_ci_low": (grid, lo, ci), "cte_ci_high": (grid, hi, ci),
               "profile": (("layer",), pooled.profile(aggregate), {"aggregate": aggregate}),
               "alpha": (("layer",), np.r_[np.nan, alphas], {"aggregate": aggregate, "rule": alpha_rule})}
    fields = {"cte": Field((pooled.n_layers, len(pooled.roles)), grid, "float64", float("nan"),
                           {"quantity": QUANTITY[pooled.mode]}),
              "margin": Field((), (), "float64", float("nan"), {"quantity": "logit(positive) - logit(negated)"}),
              "seed": Field((), (), "int32", coord=True)}
    meta = {"model_id": adapter.model_id, "weight_hash": adapter.weight_hash, "adapter": adapter.name,
            "config": {**{k: v for k, v in pooled.meta.items() if k not in NOT_CONFIG}, "aggregate": aggregate,
                       "alpha_rule": alpha_rule}}
    seeds = pooled.meta["seeds"]
    per_seed = []
    for s, r in zip(seeds, results):
        slo, shi = r.ci(n_boot=200)
        per_seed.append({"seed": s, **{k: r.meta[k] for k in COUNTS}, "profile": _json(r.profile(aggregate)),
                         "cte_mean": _json(r.mean()), "cte_ci_low": _json(slo), "cte_ci_high": _json(shi)})
    seed_of = np.repeat(np.asarray(seeds, np.int32), [len(r.values) for r in results])
    writer = StoreWriter(url, "nast", samples=_samples(pooled), fields=fields, statics=statics, meta=meta,
                         mode="overwrite")
    for r in writer.pending():
        rows = slice(r.start, r.stop)
        writer.write(r.start, {"cte": pooled.values[rows], "margin": pooled.margin[rows], "seed": seed_of[rows]},
                     [p.image for p in pooled.pairs[rows]])
    writer.close({**{k: pooled.meta[k] for k in COUNTS}, "per_seed": per_seed,
                  "stability": {"pairwise": {k: _json(v) for k, v in stability["pairwise"].items()},
                                "mean": _json(stability["mean"])}})
    return url


def load_alphas(source: str, n_blocks: int) -> np.ndarray:
    """Alphas from a trace store (``.../cte.zarr``, group ``nast``) or a ``.json`` file holding a list of
    numbers, one per text block; InterpError in one line otherwise."""
    if source.endswith(".json"):
        try:
            values = json.loads(Path(source).read_text())
        except (OSError, ValueError) as e:
            raise InterpError(f"cannot read alphas from {source}: {e}") from None
        if not isinstance(values, list) or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
            raise InterpError(f"{source} must hold a JSON list of numbers (one alpha per text block), "
                              f"got {json.dumps(values)[:80]}")
    else:
        tree = open_store(source)
        if "nast" not in tree.children:
            raise InterpError(f"store {source} holds no NAST trace (no nast group): write one with python -m interp.nast trace")
        values = tree["nast"]["alpha"].sel(layer=slice(1, None)).values
    try:
        return check_alphas(values, n_blocks)
    except InterpError as e:
        raise InterpError(f"{source}: {e}") from None
