"""The MedFocus evaluation: attribution methods x output modes x organisms on the counterfactual-verified
set, scored against the phantoms' ground truth with bootstrap confidence intervals.

Candidates are presence questions about findings present in fresh test phantoms (``per_finding`` per
finding and mode); each is asked on the original and its edits (:mod:`interp.evaluate.counterfactual`)
and kept when its region is verified causal (lesion-causal; with a confounder drawn, shortcut-causal
samples are kept apart with the confounder as their evidence region). Every method explains the
model's own response; each map is scored by the published box metric and by pointing game, energy in
the mask, AUPRC, deletion/insertion AUC and concept rank.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np
from tqdm import tqdm

from interp.attribution import method
from interp.attribution.base import Attribution, Sample, Scorer, respond
from interp.data.phantom import FINDINGS
from interp.data.vqa import CHAIN_END, FINDING_WORDS, MODES, build_vqa
from interp.evaluate import counterfactual as cf
from interp.evaluate import metrics as M

#: the MedFocus concept holding each finding's evidence (side filled in from the spec)
TRUTH_CONCEPT = {"pleural_effusion": "costophrenic_{side}", "pneumothorax": "lung_{side}", "consolidation": "lung_{side}",
                 "nodule": "lung_{side}", "cardiomegaly": "cardiac_silhouette"}
POINTING_TOLERANCE = 15  # pixels at 224 px (TorchRay's pointing game), scaled to the image
METRICS = ("pointing", "box_f1", "box_iou", "energy", "auprc", "deletion", "insertion", "concept_top1")


@dataclass
class Case:
    """One candidate: a presence question about a finding present in phantom ``image``."""

    id: str
    image: int
    finding: str
    mode: str
    sample: Sample
    kind: str = ""  # lesion | shortcut | rejected
    answers: dict[str, str] = field(default_factory=dict)
    region: np.ndarray | None = None
    response: str = ""
    truth_concept: str | None = None


#: how a real LVLM is asked (the published question; the organism is asked in its own phantom vocabulary)
QUESTION = "Is there evidence of {finding} in the image?"
SUFFIX = {"direct": " Answer yes or no.", "cot": " Think step by step, then answer yes or no."}


def answer_word(adapter: Any, sample: Sample) -> str:
    """The model's answer: the last word of its response (direct: the response; step-by-step: after
    ``answer :``), lower-cased, punctuation stripped."""
    words = respond(adapter, sample).split(CHAIN_END)[-1].split()
    return words[-1].strip(".,:;!?\"'").lower() if words else ""


def asked(item: Any, question: str | None) -> Sample:
    """The item's own prompt, or ``question`` (with ``{finding}``) plus the mode's suffix."""
    if question is None:
        return Sample(np.empty(0), item.prompt, item.spans, item.id)
    words = FINDING_WORDS[item.finding]
    prompt = question.format(finding=words) + SUFFIX[item.mode]
    at = prompt.index(words)
    return Sample(np.empty(0), prompt, {"finding": (at, at + len(words))}, item.id)


def candidates(n_images: int, seed: int, modes: Iterable[str], per_finding: int, confounder_rate: float | None = None,
               confounded: str | None = None, question: str | None = None) -> tuple[Any, list[Case]]:
    """(data set, cases): up to ``per_finding`` presence questions per finding and mode whose finding is
    present; asked as the phantom VQA item, or with ``question`` (e.g. :data:`QUESTION`) for real LVLMs."""
    kw = {"confounded": confounded} if confounded else {}
    ds = build_vqa(n_images, seed, "test", kinds=["presence"], modes=modes, confounder_rate=confounder_rate, **kw)
    taken: dict[tuple[str, str], int] = {}
    cases = []
    for it in ds.items:
        key = (it.finding, it.mode)
        if it.answer != "yes" or taken.get(key, 0) >= per_finding:
            continue
        taken[key] = taken.get(key, 0) + 1
        f = ds.specs[it.image].get(it.finding)
        concept = TRUTH_CONCEPT[it.finding].format(side=f.side) if f else None
        q = asked(it, question)
        cases.append(Case(it.id, it.image, it.finding, it.mode, Sample(ds.image(it.image), q.prompt, q.spans, it.id),
                          truth_concept=concept))
    return ds, cases


def verify(adapter: Any, ds: Any, case: Case) -> Case:
    """Ask the model on the original and every edit; set the case's kind, answers and evidence region."""
    ph = ds.phantom(case.image)
    edits = cf.phantom_edits(ph, case.finding, ds.image_seed(case.image), ds.image_size)
    ask = lambda img: answer_word(adapter, Sample(img, case.sample.prompt, case.sample.spans))  # noqa: E731
    v = cf.judge(ask, ph.image, edits, ph.finding_masks[case.finding], cf.confounder_mask(ph))
    case.kind, case.answers, case.region = v.kind, v.answers, v.region
    return case


def score_map(a: Attribution, case: Case, scorer: Scorer, steps: int = 8) -> dict[str, float]:
    """Every metric of one attribution against the case's evidence region."""
    s = case.sample

    def total(images: np.ndarray) -> np.ndarray:
        pv = scorer.adapter.encode(list(images.astype(np.float32)), [s.prompt] * len(images), [s.spans] * len(images),
                                   [scorer.response] * len(images)).pixel_values
        return scorer.total(pv).detach().numpy()

    mask = case.region
    box = M.box_scores(a.map, mask)
    di = M.deletion_insertion(a.map, s.image, total, steps=steps)
    top1 = float(M.concept_rank(a.concepts, case.truth_concept) == 1) if a.concepts and case.truth_concept and case.kind == "lesion" else np.nan
    return {"pointing": float(M.pointing_game(a.map, mask, POINTING_TOLERANCE * mask.shape[0] / 224)), "box_f1": box["f1"], "box_iou": box["iou"],
            "energy": M.energy_in_mask(a.map, mask), "auprc": M.auprc(a.map, mask), "deletion": di["deletion"],
            "insertion": di["insertion"], "concept_top1": top1}


def summarise(rows: list[dict], n_boot: int = 1000) -> list[dict]:
    """Mean and 95% bootstrap CI of every metric per (organism, kind, mode, method)."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["organism"], r["kind"], r["mode"], r["method"]), []).append(r)
    out = []
    for (org, kind, mode, name), rs in sorted(groups.items()):
        entry = {"organism": org, "kind": kind, "mode": mode, "method": name, "n": len(rs)}
        for m in METRICS:
            est, lo, hi = M.bootstrap_ci([r[m] for r in rs], n=n_boot)
            entry[m] = {"mean": est, "lo": lo, "hi": hi}
        out.append(entry)
    return out


def run(organisms: dict[str, Any], methods: list[str], *, n_images: int = 160, seed: int = 2024, modes: Iterable[str] = MODES,
        per_finding: int = 6, confounder_rate: float | None = None, confounded: str | None = None,
        questions: dict[str, str | None] | None = None, progress: bool = True, examples: Callable[[str, Case, Attribution], None] | None = None) -> dict:
    """Verify candidates and score every method on the kept (lesion and shortcut) cases, per organism
    (``questions[org]``: how to ask that model, default its phantom VQA prompt)."""
    rows, verified, timing = [], {}, {}
    for org, adapter in organisms.items():
        ds, cases = candidates(n_images, seed, modes, per_finding, confounder_rate, confounded, (questions or {}).get(org))
        for c in tqdm(cases, desc=f"{org}: verify", disable=not progress, leave=False):
            verify(adapter, ds, c)
        verified[org] = {k: sum(c.kind == k for c in cases) for k in ("lesion", "shortcut", "rejected")}
        verified[org]["candidates"] = len(cases)
        kept = [c for c in cases if c.kind != "rejected"]
        for name in methods:
            m = method(name, adapter)
            t0 = time.perf_counter()
            for c in tqdm(kept, desc=f"{org}: {name}", disable=not progress, leave=False):
                c.response = c.response or respond(adapter, c.sample)
                a = m.attribute(c.sample, c.response)
                scorer = Scorer(adapter, c.sample, c.response)
                rows.append({"organism": org, "method": m.name, "id": c.id, "finding": c.finding, "mode": c.mode,
                             "kind": c.kind, **score_map(a, c, scorer)})
                if examples:
                    examples(org, c, a)
            timing.setdefault(org, {})[m.name] = (time.perf_counter() - t0) / max(1, len(kept))
    return {"rows": rows, "summary": summarise(rows), "verified": verified, "seconds_per_sample": timing,
            "config": {"n_images": n_images, "seed": seed, "modes": list(modes), "per_finding": per_finding,
                       "confounder_rate": confounder_rate, "confounded": confounded, "methods": methods,
                       "findings": list(FINDINGS)}}


def markdown(result: dict, metrics: tuple[str, ...] = ("pointing", "box_f1", "energy", "auprc", "deletion", "insertion")) -> str:
    """The summary as a Markdown table (mean [95% CI])."""
    head = ["organism", "kind", "mode", "method", "n", *metrics]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for e in result["summary"]:
        cells = [e["organism"], e["kind"], e["mode"], e["method"], str(e["n"])]
        cells += [f"{e[m]['mean']:.3g} [{e[m]['lo']:.3g}, {e[m]['hi']:.3g}]" if np.isfinite(e[m]["mean"]) else "-" for m in metrics]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write(result: dict, out: str | Path) -> Path:
    """``results.json`` (rows, summary, verification counts, config) and ``table.md`` under ``out``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(result, indent=1, default=_json))
    (out / "table.md").write_text(markdown(result) + "\n")
    return out


def _json(x: Any) -> Any:
    if isinstance(x, np.generic):
        return x.item()
    if hasattr(x, "__dataclass_fields__"):
        return asdict(x)
    raise TypeError(type(x).__name__)
