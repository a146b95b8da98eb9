"""Radiology-style free-text reports of phantoms, with varied phrasing (SAE-Rad's report text).

`phantom_report(spec, seed)` writes ``FINDINGS:`` and ``IMPRESSION:`` sections (the layout
`interp.data.reports.split_sections` reads). Every present finding is described with its side,
zone and severity through one of several templates and synonyms; every absent finding is
either negated ("no pleural effusion", "no pneumothorax is seen"), rewritten without a
negation word ("the costophrenic angles are sharp", "heart size is normal"), grouped with
other absent findings ("no pleural effusion or pneumothorax"), or left unsaid. A chest tube is
mentioned when present, and normal-anatomy sentences fill the rest. The phrasing depends on
`seed` only; the content on `spec` only.

Contract (tested): `NegationDetector.report_status` reads every finding back - present findings
affirmed, absent ones negated or not mentioned (never affirmed or uncertain).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from interp.data.phantom import FINDINGS, Finding, PhantomSpec

#: per finding: severity -> adjectives (default: the severity itself)
_SEVERITY = {
    "pleural_effusion": {"small": ("small", "minimal"), "large": ("large", "large-volume")},
    "consolidation": {"large": ("large", "extensive")},
    "nodule": {"small": ("small", "subcentimeter"), "moderate": ("moderate-sized", "1.5 cm")},
    "cardiomegaly": {"small": ("mild",), "large": ("marked", "severe")},
}
_ZONE = {"upper": ("upper",), "middle": ("mid", "middle"), "lower": ("lower",)}
_PRESENT = {
    "pleural_effusion": (
        "{sev} {side} pleural effusion.",
        "there is a {sev} {side} pleural effusion.",
        "a {sev} {side}-sided pleural effusion is present.",
        "blunting of the {side} costophrenic angle due to a {sev} pleural effusion.",
        "{sev} {side} pleural effusion layering at the {side} lung base.",
        "the {side} costophrenic angle is blunted by a {sev} effusion.",
    ),
    "pneumothorax": (
        "{sev} {side} apical pneumothorax.",
        "there is a {sev} {side} pneumothorax.",
        "a {sev} {side}-sided pneumothorax is present.",
        "a {side} apical pleural line is seen with a {sev} pneumothorax.",
        "{sev} pneumothorax at the {side} apex.",
    ),
    "consolidation": (
        "{sev} consolidation in the {side} {zone} zone.",
        "there is {sev} airspace consolidation in the {zone} zone of the {side} lung.",
        "a {sev} focus of consolidation is present in the {side} {zone} lung.",
        "consolidative opacity in the {side} {zone} zone, {sev} in extent.",
    ),
    "nodule": (
        "{sev} nodule in the {side} {zone} zone.",
        "there is a {sev} pulmonary nodule in the {zone} zone of the {side} lung.",
        "a {sev} rounded nodular opacity projects over the {side} {zone} lung.",
        "{sev} {side} {zone} zone nodule.",
        "a well-circumscribed {sev} nodule is seen in the {side} {zone} lung.",
    ),
    "cardiomegaly": (
        "{sev} cardiomegaly.",
        "there is {sev} cardiomegaly.",
        "{sev} cardiac enlargement.",
        "the cardiac silhouette is enlarged, consistent with {sev} cardiomegaly.",
    ),
}
#: the short form the impression uses (a template of `_PRESENT`)
_IMPRESSION = {
    "pleural_effusion": "{sev} {side} pleural effusion.",
    "pneumothorax": "{sev} {side} pneumothorax.",
    "consolidation": "{sev} {side} {zone} zone consolidation.",
    "nodule": "{sev} {side} {zone} zone nodule.",
    "cardiomegaly": "{sev} cardiomegaly.",
}
#: absent findings: negated or rewritten without a negation word
_ABSENT = {
    "pleural_effusion": (
        "no pleural effusion.", "there is no pleural effusion.", "no pleural effusion is seen.",
        "the costophrenic angles are sharp.", "no evidence of pleural effusion.", "no pleural fluid.",
    ),
    "pneumothorax": (
        "no pneumothorax.", "there is no pneumothorax.", "no pneumothorax is seen.",
        "no evidence of pneumothorax.", "the lungs are fully expanded.",
    ),
    "consolidation": (
        "no focal consolidation.", "there is no focal airspace consolidation.",
        "no consolidation is identified.", "the lungs are well aerated.",
    ),
    "nodule": (
        "no pulmonary nodules.", "no nodule or mass is seen.", "there is no pulmonary nodule.",
        "the lung fields are clear of nodules.",
    ),
    "cardiomegaly": (
        "heart size is normal.", "the cardiac silhouette is normal in size.", "normal heart size.",
        "no cardiomegaly.", "the cardiomediastinal silhouette is within normal limits.",
    ),
}
#: the other side of a one-sided finding, when only one side has it
_OTHER_SIDE = {
    "pleural_effusion": ("no {side} pleural effusion.", "the {side} costophrenic angle is sharp."),
    "pneumothorax": ("no {side} pneumothorax.",),
}
#: absent findings said together ("no {a} or {b}.")
_LIST_WORD = {
    "pleural_effusion": "pleural effusion", "pneumothorax": "pneumothorax",
    "consolidation": "focal consolidation", "nodule": "pulmonary nodule", "cardiomegaly": "cardiomegaly",
}
_LIST = ("no {}.", "there is no {}.", "no evidence of {}.")
_CLEAR_LUNGS = ("the lungs are clear.", "clear lungs bilaterally.")  # no lung finding at all
_TUBE = ("a chest tube is in place.", "chest tube in situ.", "a thoracostomy tube projects over the chest.")
_NORMAL = (
    "the trachea is midline.", "the mediastinal contours are normal.", "the hila are unremarkable.",
    "the osseous structures are intact.", "the visualized bones are unremarkable.",
    "no acute osseous abnormality.",
)
_NORMAL_IMPRESSION = (
    "no acute cardiopulmonary abnormality.", "no acute cardiopulmonary process.",
    "normal chest radiograph.", "no active disease.",
)
_LUNG = ("consolidation", "nodule", "pneumothorax")


def _pick(rng: np.random.Generator, options: Sequence[str]) -> str:
    return options[rng.integers(len(options))]


def _sentence(text: str) -> str:
    return text[0].upper() + text[1:]


def _describe(f: Finding, template: str, rng: np.random.Generator) -> str:
    sev = _pick(rng, _SEVERITY.get(f.name, {}).get(f.severity, (f.severity,)))
    zone = _pick(rng, _ZONE[f.zone]) if f.zone else ""
    return template.format(sev=sev, side=f.side, zone=zone)


def _absent(absent: list[str], spec: PhantomSpec, rng: np.random.Generator) -> list[str]:
    """Sentences for the absent findings: grouped, one each, or unsaid."""
    out = []
    rest = list(rng.permutation(absent))
    if len(rest) >= 2 and rng.random() < 0.4:
        n = int(rng.integers(2, min(3, len(rest)) + 1))
        words = [_LIST_WORD[name] for name in rest[:n]]
        out.append(_pick(rng, _LIST).format(", ".join(words[:-1]) + " or " + words[-1]))
        rest = rest[n:]
    if not any(spec.has(name) for name in _LUNG) and rng.random() < 0.5:
        out.append(_pick(rng, _CLEAR_LUNGS))
    out += [_pick(rng, _ABSENT[name]) for name in rest if rng.random() < 0.85]
    return out


def phantom_report(spec: PhantomSpec, seed: int | Sequence[int]) -> str:
    """A FINDINGS / IMPRESSION report of `spec`; the wording is a function of `seed`."""
    rng = np.random.default_rng(seed)
    findings, impression = [], []
    if "chest_tube" in spec.confounders:
        findings.append(_pick(rng, _TUBE))
        impression.append("chest tube in place.")
    for f in sorted(spec.findings, key=lambda f: FINDINGS.index(f.name)):
        findings.append(_describe(f, _pick(rng, _PRESENT[f.name]), rng))
        impression.append(_describe(f, _IMPRESSION[f.name], rng))
        sides = {g.side for g in spec.findings if g.name == f.name}
        if f.name in _OTHER_SIDE and len(sides) == 1 and rng.random() < 0.3:
            other = "left" if f.side == "right" else "right"
            findings.append(_pick(rng, _OTHER_SIDE[f.name]).format(side=other))
    findings += _absent([n for n in FINDINGS if not spec.has(n)], spec, rng)
    normal = rng.permutation(len(_NORMAL))[: rng.integers(1, 4)]
    findings += [_NORMAL[i] for i in sorted(normal)]
    if not spec.findings:
        impression = [_pick(rng, _NORMAL_IMPRESSION)] + impression
    body = " ".join(_sentence(s) for s in findings)
    return f"FINDINGS: {body}\n\nIMPRESSION: {' '.join(_sentence(s) for s in impression)}"


def phantom_reports(specs: Sequence[PhantomSpec], seed: int = 0) -> list[str]:
    """One report per spec; report i is worded from the seed sequence (seed, i)."""
    return [phantom_report(s, (seed, i)) for i, s in enumerate(specs)]
