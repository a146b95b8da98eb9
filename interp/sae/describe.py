"""SAE-Rad on plain arrays: feature descriptions from report text, compiled reports, their scores.

`describe_features(image_acts, reports)`: a feature's description is distilled from the reports
of its `top_k` most activating images (activation > 0) contrasted with `n_random` other images
drawn at random (seeded per feature).
- ``extractive`` (default): reports are split into sentences and each sentence gets a key: its
  findings with their status as read by `NegationDetector` ("small left pleural effusion" and
  "there is a large right effusion" share ``(pleural_effusion, affirmed)``), or, for a sentence
  without findings, its normalised text (lower case, no numbering or final punctuation). Each
  key found in the top reports is tested against the contrast reports: one-sided Fisher exact
  test of its document frequency (fraction of reports holding it), Bonferroni over the keys
  tested; its score is ``df_top - df_contrast``. The description is the `max_sentences` most
  significant keys with p <= alpha / n_keys, each written as its medoid sentence among the top
  reports (word-set Jaccard), de-duplicated like a compiled report. A feature never active, or
  with no significant key, gets an empty description. ``top_k=20``: at the phantoms' 50%
  prevalence a finding in 10 of 10 top reports is borderline (p ~ 0.5^10 vs 0.05 / ~30 keys).
- ``lm``: a local causal LM (`lm_path`, loaded offline) reads the top reports and as many contrast
  reports (fewer of each if the prompt would not fit) and writes one sentence; greedy decoding,
  the chat template when the tokenizer has one. The extractive sentences and scores are kept.

`compile_report`: an image's active features, strongest first -> their descriptions' sentences;
a sentence is dropped if its normalised text was said, if every finding it mentions was already
said with the same status, or if it contradicts a finding said by a stronger feature.

`score_reports`: finding-level precision/recall/F1 of texts read by the labeller (affirmed =
positive; negated, uncertain or not mentioned = negative) against 0/1 labels. `label_agreement`
runs it on IU-Xray reports against their MeSH terms.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import asdict, dataclass
from functools import cache
from math import comb
from typing import Callable, Mapping, Sequence

import numpy as np

from interp.data.negation import PHANTOM_BANK
from interp.data.phantom import FINDINGS
from interp.data.reports import MESH_OF, NegationDetector, Report
from interp.errors import InterpError

METHODS = ("extractive", "lm")
_HEADER = re.compile(r"\b[A-Z][A-Z /&]{2,}:")  # "FINDINGS:", "IMPRESSION:"
_BULLET = re.compile(r"^(?:\d+\s*[.)]|[-*])\s*")
_PROMPT = (
    "Chest X-ray reports.\nGroup A (images where one visual feature is strongly active):\n{top}\n"
    "Group B (random images):\n{contrast}\n"
    "In one short sentence, the radiological finding that group A shares and group B lacks:"
)


@cache
def default_detector() -> NegationDetector:
    """One shared labeller (building it takes a moment)."""
    return NegationDetector()


@dataclass(frozen=True)
class FeatureDescription:
    """A feature's description; `sentences`: the extractive sentences, with their `scores`
    (df_top - df_contrast) and one-sided Fisher `p_values`; `top_images`: the images
    described, most active first; `n_active`: images with activation > 0."""

    feature: int
    description: str
    sentences: tuple[str, ...]
    scores: tuple[float, ...]
    p_values: tuple[float, ...]
    top_images: tuple[int, ...]
    n_active: int
    method: str

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class _Sentence:
    text: str
    norm: str
    statuses: tuple[tuple[str, str], ...]  # sorted distinct (finding, status)

    @property
    def key(self) -> tuple[tuple[str, str], ...] | str:
        return self.statuses or self.norm


def _split(text: str, detector: NegationDetector) -> list[_Sentence]:
    out = []
    for s, mentions in detector.sentences(_HEADER.sub(" ", text)):
        s = _BULLET.sub("", s).rstrip(" .;:,")
        norm = " ".join(s.lower().split())
        if any(c.isalpha() for c in norm):
            out.append(_Sentence(s + ".", norm, tuple(sorted({(m.finding, m.status) for m in mentions}))))
    return out


def _splitter(text: Callable[[int], str], detector: NegationDetector) -> Callable[[int], list[_Sentence]]:
    """i -> the sentences of text(i), each text split once, on first use."""
    done: dict[int, list[_Sentence]] = {}

    def sentences(i: int) -> list[_Sentence]:
        if i not in done:
            done[i] = _split(text(i), detector)
        return done[i]

    return sentences


class _Said:
    """What a text has said so far: its sentences' wordings and one status per finding."""

    def __init__(self) -> None:
        self.norms: set[str] = set()
        self.status: dict[str, str] = {}

    def add(self, s: _Sentence) -> bool:
        """Take `s` unless it repeats a wording, says nothing new or contradicts."""
        if s.norm in self.norms or any(self.status.get(f, st) != st for f, st in s.statuses):
            return False
        if s.statuses and all(self.status.get(f) == st for f, st in s.statuses):
            return False
        self.norms.add(s.norm)
        self.status.update(s.statuses)
        return True


def _medoid(cands: list[_Sentence]) -> _Sentence:
    words = [set(c.norm.split()) for c in cands]
    central = [sum(len(w & v) / len(w | v) for v in words) for w in words]
    return cands[max(range(len(cands)), key=lambda i: (central[i], -len(cands[i].norm)))]


def _fisher(k: int, n: int, k2: int, n2: int) -> float:
    """One-sided Fisher exact p-value that k of n beats k2 of n2 (hypergeometric upper tail)."""
    total, hits = n + n2, k + k2
    tail = sum(comb(hits, x) * comb(total - hits, n - x) for x in range(k, min(n, hits) + 1))
    return tail / comb(total, n)


def _extract(sentences: Callable[[int], list[_Sentence]], top: np.ndarray, contrast: np.ndarray,
             max_sentences: int, alpha: float) -> list[tuple[str, float, float]]:
    """(sentence, score, p) of the keys significant after Bonferroni, most significant first."""

    def df(images: np.ndarray) -> Counter:
        return Counter(k for i in images for k in {s.key for s in sentences(int(i))})

    in_top, in_con = df(top), df(contrast)
    n, n2 = len(top), len(contrast)
    stats = {k: (_fisher(c, n, in_con[k], n2), c / n - (in_con[k] / n2 if n2 else 0.0)) for k, c in in_top.items()}
    said, out = _Said(), []
    for k in sorted(stats, key=lambda k: (stats[k][0], -stats[k][1], str(k))):
        p, score = stats[k]
        if p > alpha / len(stats) or len(out) == max_sentences:
            break
        s = _medoid([s for i in top for s in sentences(int(i)) if s.key == k])
        if said.add(s):
            out.append((s.text, round(score, 6), p))
    return out


def _load_lm(path: str, device: str):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
        model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError) as e:
        raise InterpError(f"cannot load a causal LM from {path}: {e}") from None
    return model.to(device).eval(), tok


def _generate(model, tok, top: list[str], contrast: list[str], max_new_tokens: int) -> str:
    import torch

    def encode(n: int) -> torch.Tensor:
        prompt = _PROMPT.format(top="\n".join(f"- {r}" for r in top[:n]),
                                contrast="\n".join(f"- {r}" for r in contrast[:n]))
        if getattr(tok, "chat_template", None):
            prompt = tok.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                             add_generation_prompt=True)
            return tok(prompt, return_tensors="pt", add_special_tokens=False).input_ids
        return tok(prompt, return_tensors="pt").input_ids

    budget = max(1, getattr(model.config, "max_position_embeddings", 1 << 30) - max_new_tokens)
    n = len(top)
    ids = encode(n)
    while ids.shape[1] > budget and n > 1:  # fewer reports per group until the prompt fits
        n -= 1
        ids = encode(n)
    ids = ids[:, -budget:].to(model.device)
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                             do_sample=False, pad_token_id=pad)
    lines = tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip().splitlines()
    return " ".join(lines[0].split()) if lines else ""


def describe_features(
    image_acts: np.ndarray,
    reports: Sequence[str],
    top_k: int = 20,
    n_random: int = 100,
    seed: int = 0,
    method: str = "extractive",
    lm_path: str | None = None,
    features: Sequence[int] | None = None,
    max_sentences: int = 2,
    alpha: float = 0.05,
    lm_device: str = "cpu",
    max_new_tokens: int = 40,
    detector: NegationDetector | None = None,
) -> list[FeatureDescription]:
    """Describe each of `features` (default: all) of `image_acts` [n_images, n_features] from
    `reports` (one per image); see the module docstring."""
    acts = np.asarray(image_acts, dtype=np.float64)
    if acts.ndim != 2 or acts.shape[0] != len(reports):
        raise InterpError(f"image_acts must be [n_images={len(reports)}, n_features], got {acts.shape}")
    if method not in METHODS:
        raise InterpError(f"unknown method {method!r}; valid: {', '.join(METHODS)}")
    if (method == "lm") != (lm_path is not None):
        raise InterpError("method 'lm' needs lm_path, and lm_path applies to method 'lm' only")
    if top_k < 1 or n_random < 0 or max_sentences < 1:
        raise InterpError(f"need top_k >= 1, n_random >= 0, max_sentences >= 1; got {top_k}, {n_random}, {max_sentences}")
    feats = range(acts.shape[1]) if features is None else [int(j) for j in features]
    if any(not 0 <= j < acts.shape[1] for j in feats):
        raise InterpError(f"features must be in [0, {acts.shape[1]})")
    sentences = _splitter(reports.__getitem__, detector or default_detector())
    lm = _load_lm(lm_path, lm_device) if lm_path is not None else None
    n, out = acts.shape[0], []
    for j in feats:
        a = acts[:, j]
        active = np.flatnonzero(a > 0)
        if not len(active):
            out.append(FeatureDescription(j, "", (), (), (), (), 0, method))
            continue
        top = active[np.argsort(-a[active], kind="stable")][:top_k]
        rest = np.setdiff1d(np.arange(n), top)
        contrast = np.random.default_rng([seed, j]).choice(rest, min(n_random, len(rest)), replace=False)
        picked = _extract(sentences, top, contrast, max_sentences, alpha)
        said, scores, p_values = (tuple(x) for x in zip(*picked)) if picked else ((), (), ())
        text = " ".join(said)
        if lm is not None:
            text = _generate(*lm, [reports[i] for i in top], [reports[i] for i in contrast], max_new_tokens)
        out.append(FeatureDescription(j, text, said, scores, p_values, tuple(int(i) for i in top), len(active), method))
    return out


def _text(d: FeatureDescription | str) -> str:
    return d if isinstance(d, str) else d.description


def _compile(active: np.ndarray, strengths: np.ndarray, sentences: Callable[[int], list[_Sentence]],
             max_sentences: int) -> str:
    said, out = _Said(), []
    for j in active[np.argsort(-strengths, kind="stable")]:
        for s in sentences(int(j)):
            if len(out) < max_sentences and said.add(s):
                out.append(s.text)
    return " ".join(out)


def _check_active(active, strengths, n_features: int) -> tuple[np.ndarray, np.ndarray]:
    a, s = np.asarray(active, dtype=np.int64).ravel(), np.asarray(strengths, dtype=np.float64).ravel()
    if a.shape != s.shape:
        raise InterpError(f"active and strengths differ in length: {a.shape[0]} vs {s.shape[0]}")
    if len(a) and not (0 <= a.min() and a.max() < n_features):
        raise InterpError(f"active features must be in [0, {n_features})")
    return a, s


def compile_report(
    active: Sequence[int] | np.ndarray,
    strengths: Sequence[float] | np.ndarray,
    descriptions: Sequence[FeatureDescription | str],
    max_sentences: int = 10,
    detector: NegationDetector | None = None,
) -> str:
    """One image's report from its active features (indices into `descriptions`) and their
    strengths; see the module docstring."""
    a, s = _check_active(active, strengths, len(descriptions))
    return _compile(a, s, _splitter(lambda j: _text(descriptions[j]), detector or default_detector()), max_sentences)


def compile_reports(
    image_acts: np.ndarray,
    descriptions: Sequence[FeatureDescription | str],
    max_sentences: int = 10,
    detector: NegationDetector | None = None,
) -> list[str]:
    """`compile_report` for every image of `image_acts` [n_images, n_features]: active = > 0,
    strength = the activation over the feature's maximum across the images."""
    acts = np.asarray(image_acts, dtype=np.float64)
    if acts.ndim != 2 or acts.shape[1] != len(descriptions):
        raise InterpError(f"image_acts must be [n_images, {len(descriptions)}], got {acts.shape}")
    sentences = _splitter(lambda j: _text(descriptions[j]), detector or default_detector())
    peak = acts.max(0)
    rel = acts / np.where(peak > 0, peak, 1.0)
    return [_compile(np.flatnonzero(r > 0), r[r > 0], sentences, max_sentences) for r in rel]


# ---------------------------------------------------------------------------------------
# scoring


def answers_to_text(present: Mapping[str, bool]) -> str:
    """Yes/no answers about phantom findings as statements ("there is a nodule. there is no
    pneumothorax."), so `score_reports` can score them like reports."""
    unknown = set(present) - set(PHANTOM_BANK)
    if unknown:
        raise InterpError(f"unknown findings {sorted(unknown)}; valid: {', '.join(PHANTOM_BANK)}")
    return " ".join(f"{PHANTOM_BANK[f].positive if p else PHANTOM_BANK[f].negated}." for f, p in present.items())


def read_findings(texts: Sequence[str], findings: Sequence[str], detector: NegationDetector | None = None) -> np.ndarray:
    """[n_texts, n_findings] report-level statuses: "affirmed", "negated", "uncertain", or ""
    (not mentioned); see `NegationDetector.report_status`."""
    det = detector or default_detector()
    unknown = [f for f in findings if f not in det.terms]
    if unknown:
        raise InterpError(f"the labeller has no terms for {unknown}; valid: {', '.join(det.terms)}")
    out = np.full((len(texts), len(findings)), "", dtype=object)
    for i, t in enumerate(texts):
        st = det.report_status(t)
        out[i] = [st.get(f, "") for f in findings]
    return out


def _prf(y: np.ndarray, p: np.ndarray) -> dict:
    tp, fp = int((y & p).sum()), int((~y & p).sum())
    fn, tn = int((y & ~p).sum()), int((~y & ~p).sum())

    def ratio(a: int, b: int) -> float | None:
        return a / b if b else None

    return {"tp": tp, "fp": fp, "fn": fn, "tn": tn, "support": tp + fn, "precision": ratio(tp, tp + fp),
            "recall": ratio(tp, tp + fn), "f1": ratio(2 * tp, 2 * tp + fp + fn), "specificity": ratio(tn, tn + fp)}


def _score(y: np.ndarray, statuses: np.ndarray, findings: Sequence[str]) -> dict:
    pred = statuses == "affirmed"
    per = {f: _prf(y[:, k], pred[:, k]) | {"uncertain": int((statuses[:, k] == "uncertain").sum())}
           for k, f in enumerate(findings)}
    macro = {}
    for m in ("precision", "recall", "f1"):
        vals = [d[m] for d in per.values() if d[m] is not None]
        macro[m] = float(np.mean(vals)) if vals else None
    return {"n": len(y), "findings": list(findings), "per_finding": per, "micro": _prf(y.ravel(), pred.ravel()),
            "macro": macro, "uncertain_counts_as": "negative"}


def score_reports(
    texts: Sequence[str],
    labels: Mapping[str, Sequence[int]] | np.ndarray,
    findings: Sequence[str] | None = None,
    detector: NegationDetector | None = None,
) -> dict:
    """Finding-level precision/recall/F1 of `texts` read by the labeller against 0/1 `labels`:
    {finding: [n_texts]} or an [n_texts, n_findings] array over `findings` (default: the
    phantom findings). Affirmed = positive; negated, uncertain (counted per finding) or not
    mentioned = negative. Per finding: tp/fp/fn/tn, precision, recall, F1, specificity (None
    where undefined); micro (pooled counts) and macro (mean over findings where defined)."""
    if isinstance(labels, Mapping):
        if findings is not None:
            raise InterpError("findings come from the labels' keys when labels is a mapping")
        findings = list(labels)
        if any(len(labels[f]) != len(texts) for f in findings):
            raise InterpError(f"every finding needs {len(texts)} labels, one per text")
        y = np.array([list(labels[f]) for f in findings]).T.reshape(len(texts), len(findings))
    else:
        findings = list(FINDINGS if findings is None else findings)
        y = np.asarray(labels)
    if y.shape != (len(texts), len(findings)):
        raise InterpError(f"labels must be [{len(texts)} texts, {len(findings)} findings], got {y.shape}")
    if not np.isin(y, (0, 1)).all():
        raise InterpError("labels must be 0/1")
    return _score(y.astype(bool), read_findings(texts, findings, detector), findings)


def _mesh_means(term: str, prefixes: Sequence[str]) -> bool:
    return any(term == p or term.startswith(p + "/") for p in prefixes)


def label_agreement(
    reports: Sequence[Report],
    findings: Sequence[str] = FINDINGS,
    detector: NegationDetector | None = None,
) -> dict:
    """The labeller against IU-Xray's MeSH major terms (`Report.mesh`, `MESH_OF`): `score_reports`
    over the reports with text and MeSH terms (not "No Indexing"), plus ``normal``: of the reports
    whose MeSH says "normal", the fraction with none of `findings` affirmed."""
    unknown = [f for f in findings if f not in MESH_OF]
    if unknown:
        raise InterpError(f"no MeSH mapping for {unknown}; valid: {', '.join(MESH_OF)}")
    kept = [r for r in reports if r.text.strip() and r.mesh and "No Indexing" not in r.mesh]
    if not kept:
        raise InterpError("no reports with text and MeSH terms (IU-Xray / OpenI XML)")
    y = np.array([[any(_mesh_means(m, MESH_OF[f]) for m in r.mesh) for f in findings] for r in kept])
    statuses = read_findings([r.text for r in kept], findings, detector)
    out = _score(y, statuses, findings)
    normal = np.array(["normal" in (m.lower() for m in r.mesh) for r in kept])
    clean = ~(statuses[normal] == "affirmed").any(1)
    out["normal"] = {"n": int(normal.sum()), "no_affirmed": float(clean.mean()) if normal.any() else None}
    return out
