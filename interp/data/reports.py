"""Local radiology report corpora and NegEx-style negated/affirmed finding mentions.

Loaders (local files only):
- MIMIC-CXR reports: ``files/pXX/pNNNNNNNN/sNNNNNNNN.txt`` (`load_mimic_reports`);
- IU-Xray / OpenI: one ``ecgen-radiology`` XML per report with ``<AbstractText
  Label="FINDINGS">`` / ``"IMPRESSION"``, ``<uId id=...>`` and ``<parentImage id=...>``
  (`load_openi_reports`).

Detection (`NegationDetector`): negspacy's ``negex`` on ``spacy.blank("en")`` with a
``sentencizer`` and an ``entity_ruler`` of ``{"LOWER": ...}`` token patterns for finding
terms. The termset is negspacy's ``en_clinical`` plus radiology phrases. Each mention
gets a status:
- ``negated``: "no pleural effusion", "no evidence of pneumothorax", "without
  consolidation", "effusion is not seen", and **"pleural effusion has resolved"**: a
  resolved finding is absent now, so it is negated (decision documented here and tested);
- ``uncertain``: hedged ("cannot exclude pneumonia", "possible consolidation", "may
  represent atelectasis", "... cannot be excluded"); a second negex pass with an
  uncertainty termset, and it wins over negation, like CheXpert's -1 (neither negative
  nor positive);
- ``affirmed``: everything else ("small left pleural effusion", "no change in the
  pleural effusion" - "no change" is a pseudo-negation).
"""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

from interp.errors import InterpError

STATUSES = ("affirmed", "negated", "uncertain")

#: finding -> surface terms (lowercase, space-separated words); longest match wins
FINDING_TERMS: dict[str, tuple[str, ...]] = {
    "pleural_effusion": ("pleural effusion", "pleural effusions", "effusion", "effusions", "pleural fluid"),
    "pneumothorax": ("pneumothorax", "pneumothoraces", "ptx"),
    "consolidation": ("consolidation", "consolidations", "consolidative opacity", "airspace consolidation"),
    "nodule": ("nodule", "nodules", "mass", "masses", "nodular opacity", "lung lesion"),
    "cardiomegaly": ("cardiomegaly", "enlarged heart", "cardiac enlargement", "enlarged cardiac silhouette"),
    "atelectasis": ("atelectasis", "atelectases", "collapse"),
    "edema": ("edema", "oedema", "pulmonary edema", "interstitial edema", "vascular congestion"),
    "pneumonia": ("pneumonia", "pneumonias"),
    "opacity": ("opacity", "opacities", "opacification", "airspace disease"),
    "fracture": ("fracture", "fractures"),
    "pleural_thickening": ("pleural thickening",),
}
#: finding -> CheXpert condition (for joining with label CSVs)
CHEXPERT_OF = {
    "pleural_effusion": "Pleural Effusion", "pneumothorax": "Pneumothorax", "consolidation": "Consolidation",
    "nodule": "Lung Lesion", "cardiomegaly": "Cardiomegaly", "atelectasis": "Atelectasis", "edema": "Edema",
    "pneumonia": "Pneumonia", "opacity": "Lung Opacity", "fracture": "Fracture", "pleural_thickening": "Pleural Other",
}
#: finding -> IU-Xray MeSH major terms that mean it is present: a term matches it and every
#: longer term under it ("Pleural Effusion" matches "Pleural Effusion/left/small")
MESH_OF = {
    "pleural_effusion": ("Pleural Effusion",), "pneumothorax": ("Pneumothorax",),
    "consolidation": ("Consolidation",), "nodule": ("Nodule", "Mass"),
    "cardiomegaly": ("Cardiomegaly", "Cardiac Shadow/enlarged"),
    "atelectasis": ("Pulmonary Atelectasis",), "edema": ("Pulmonary Edema",), "pneumonia": ("Pneumonia",),
    "opacity": ("Opacity", "Airspace Disease"), "fracture": ("Fractures, Bone",),
}

_EXTRA_NEGATION = {
    "preceding_negations": [
        "no radiographic evidence of", "no definite", "no convincing", "resolution of", "resolved",
        "interval resolution of", "clear of", "no longer",
    ],
    "following_negations": [
        "has resolved", "have resolved", "is resolved", "are resolved", "resolved", "is not seen",
        "are not seen", "not seen", "is not identified", "not identified", "is absent", "are absent",
        "absent", "is no longer seen", "no longer seen", "no longer present", "is not present",
        "not present", "not appreciated", "not visualized", "has cleared", "have cleared",
    ],
    "pseudo_negations": [
        "cannot exclude", "can not exclude", "cannot be excluded", "can not be excluded",
        "cannot rule out", "not excluded", "not be excluded", "not be ruled out",
        "no change in", "no significant change in", "no interval change in",
    ],
    "termination": ["there is", "there are", "there has been", "and there", "with"],
}
_UNCERTAIN = {
    "pseudo_negations": ["no evidence of", "not likely"],
    "preceding_negations": [
        "possible", "possibly", "probable", "probably", "may represent", "may be", "might represent",
        "could represent", "could be", "suspicious for", "concerning for", "suggestive of",
        "question of", "questionable", "cannot exclude", "can not exclude", "cannot rule out",
        "likely", "versus", "vs", "differential includes", "worrisome for", "suspected",
    ],
    "following_negations": [
        "cannot be excluded", "can not be excluded", "not excluded", "not be excluded",
        "not ruled out", "not be ruled out", "is possible", "is suspected", "suspected", "is likely",
        "is questioned", "is not excluded",
    ],
    "termination": ["although", "but", "however", "except", "there is", "there are", "and there"],
}


@dataclass(frozen=True)
class Mention:
    """One finding mention: character spans index the text passed to the detector."""

    finding: str
    term: str
    status: str  # affirmed | negated | uncertain
    span: tuple[int, int]
    sentence: str
    sentence_span: tuple[int, int]


def _termset(extra: dict[str, list[str]], base: bool) -> dict[str, list[str]]:
    from negspacy.termsets import termset

    ts = termset("en_clinical").get_patterns() if base else {k: [] for k in extra}
    out = {k: list(dict.fromkeys(list(ts.get(k, [])) + list(extra.get(k, [])))) for k in ts}
    if base:  # "cannot" / "versus" alone are hedges, not negations, in radiology
        out["preceding_negations"] = [t for t in out["preceding_negations"] if t not in ("versus", "cannot", "evaluate for")]
    return out


class NegationDetector:
    """NegEx over finding mentions (negspacy on a blank English spaCy pipeline)."""

    def __init__(self, terms: dict[str, Iterable[str]] | None = None):
        import spacy
        from negspacy.negation import Negex  # noqa: F401  (registers the "negex" factory)

        self.terms = {k: tuple(v) for k, v in (terms or FINDING_TERMS).items()}
        if not self.terms:
            raise InterpError("NegationDetector needs at least one finding term")
        nlp = spacy.blank("en")
        nlp.add_pipe("sentencizer")
        ruler = nlp.add_pipe("entity_ruler")
        ruler.add_patterns([
            {"label": finding, "pattern": [{"LOWER": w} for w in term.lower().split()]}
            for finding, ts in self.terms.items() for term in ts
        ])
        labels = list(self.terms)
        nlp.add_pipe("negex", name="negex", config={
            "neg_termset": _termset(_EXTRA_NEGATION, True), "ent_types": labels})
        nlp.add_pipe("negex", name="hedge", config={
            "neg_termset": _termset(_UNCERTAIN, False), "ent_types": labels, "extension_name": "uncertain"})
        self.nlp = nlp

    def __call__(self, text: str) -> list[Mention]:
        return self._mentions(self.nlp(text))

    def sentences(self, text: str) -> list[tuple[str, list[Mention]]]:
        """Each sentence of `text` (stripped) with its mentions."""
        doc = self.nlp(text)
        by: dict[tuple[int, int], list[Mention]] = {}
        for m in self._mentions(doc):
            by.setdefault(m.sentence_span, []).append(m)
        return [(s.text.strip(), by.get((s.start_char, s.end_char), [])) for s in doc.sents]

    def _mentions(self, doc) -> list[Mention]:
        out = []
        for ent in doc.ents:
            status = "uncertain" if ent._.uncertain else "negated" if ent._.negex else "affirmed"
            sent = ent.sent
            out.append(Mention(ent.label_, ent.text, status, (ent.start_char, ent.end_char),
                               sent.text, (sent.start_char, sent.end_char)))
        return out

    def status(self, sentence: str, finding: str) -> str | None:
        """Status of `finding` in `sentence` (negated if any mention is, then uncertain,
        then affirmed), or None if it is not mentioned."""
        got = {m.status for m in self(sentence) if m.finding == finding}
        for s in ("uncertain", "negated", "affirmed"):
            if s in got:
                return s
        return None

    def report_status(self, text: str) -> dict[str, str]:
        """Report-level status of each mentioned finding, CheXpert-style: affirmed if any
        mention is (a left effusion and "no right effusion" is an effusion), else uncertain if
        any is, else negated. Findings not mentioned are left out."""
        got: dict[str, set[str]] = {}
        for m in self(text):
            got.setdefault(m.finding, set()).add(m.status)
        return {f: next(s for s in ("affirmed", "uncertain", "negated") if s in ss) for f, ss in got.items()}


# ---------------------------------------------------------------------------------------
# corpora


@dataclass(frozen=True)
class Report:
    """A report; `text` is findings + impression when the report has them, else all of it;
    `mesh`: IU-Xray's MeSH major terms ("normal", "Pleural Effusion/left/small", ...)."""

    id: str
    text: str
    sections: dict[str, str] = field(default_factory=dict)
    subject_id: str | None = None
    study_id: str | None = None
    images: tuple[str, ...] = ()
    source: str = ""
    mesh: tuple[str, ...] = ()


_SECTION = re.compile(r"^\s*([A-Z][A-Z /&]+):", re.MULTILINE)
_KEEP = ("FINDINGS", "IMPRESSION")


def split_sections(text: str) -> dict[str, str]:
    """{"FINDINGS": ..., "IMPRESSION": ...} from upper-case "HEADER:" lines (whitespace collapsed)."""
    heads = list(_SECTION.finditer(text))
    out = {}
    for k, m in enumerate(heads):
        end = heads[k + 1].start() if k + 1 < len(heads) else len(text)
        body = " ".join(text[m.end():end].split())
        if body:
            out[m.group(1).strip()] = body
    return out


def _body(sections: dict[str, str], whole: str) -> str:
    kept = [sections[k] for k in _KEEP if k in sections]
    return " ".join(kept) if kept else " ".join(whole.split())


def load_mimic_reports(root: str | Path, limit: int | None = None) -> list[Report]:
    """MIMIC-CXR reports under `root` (the folder holding `files/`, or `files/` itself):
    every `pNNNNNNNN/sNNNNNNNN.txt`, sorted by path."""
    root = Path(root)
    if not root.is_dir():
        raise InterpError(f"no MIMIC-CXR report folder {root}")
    paths = sorted(p for p in root.rglob("s*.txt")
                   if re.fullmatch(r"s\d+", p.stem) and re.fullmatch(r"p\d+", p.parent.name))
    if not paths:
        raise InterpError(f"no MIMIC-CXR reports (files/pXX/pNNNNNNNN/sNNNNNNNN.txt) under {root}")
    out = []
    for p in paths[:limit]:
        try:
            text = p.read_text(errors="replace")
        except OSError as e:
            raise InterpError(f"cannot read report {p}: {e}") from None
        sections = split_sections(text)
        out.append(Report(id=p.stem, text=_body(sections, text), sections=sections,
                          subject_id=p.parent.name[1:], study_id=p.stem[1:], source=str(p)))
    return out


def load_openi_reports(root: str | Path, limit: int | None = None) -> list[Report]:
    """IU-Xray / OpenI `ecgen-radiology` XML reports: a file or a folder of `*.xml`."""
    root = Path(root)
    paths = [root] if root.is_file() else sorted(root.glob("*.xml")) if root.is_dir() else []
    if not paths:
        raise InterpError(f"no OpenI XML reports at {root}")
    out = []
    for p in paths[:limit]:
        try:
            tree = ET.parse(p).getroot()
        except (ET.ParseError, OSError) as e:
            raise InterpError(f"malformed OpenI report {p}: {e}") from None
        sections = {}
        for a in tree.iter("AbstractText"):
            label = (a.get("Label") or "").upper()
            body = " ".join("".join(a.itertext()).split())
            if label and body:
                sections[label] = body
        uid = tree.find(".//uId")
        rid = uid.get("id") if uid is not None and uid.get("id") else p.stem
        images = tuple(i.get("id") for i in tree.iter("parentImage") if i.get("id"))
        mesh = tuple(m.text.strip() for m in tree.iter("major") if m.text and m.text.strip())
        out.append(Report(id=rid, text=_body(sections, ""), sections=sections, study_id=rid,
                          images=images, source=str(p), mesh=mesh))
    return out


def load_reports(path: str | Path, limit: int | None = None) -> list[Report]:
    """MIMIC-CXR (.txt tree) or OpenI (.xml) reports, by what `path` holds."""
    path = Path(path)
    if path.is_file() and path.suffix == ".xml" or path.is_dir() and any(path.glob("*.xml")):
        return load_openi_reports(path, limit)
    if path.is_dir():
        return load_mimic_reports(path, limit)
    raise InterpError(f"{path}: not a MIMIC-CXR report folder or OpenI XML file/folder")


@dataclass(frozen=True)
class FindingSentence:
    """A report sentence with its finding mentions; `polarity` is the common status of
    all mentions, or "mixed"."""

    report_id: str
    sentence: str
    mentions: tuple[tuple[str, str], ...]  # (finding, status)

    @property
    def polarity(self) -> str:
        statuses = {s for _, s in self.mentions}
        return statuses.pop() if len(statuses) == 1 else "mixed"


def extract_finding_sentences(
    reports: Iterable[Report], detector: NegationDetector | None = None,
) -> list[FindingSentence]:
    """Every sentence of the reports that mentions a finding, with each mention's status.
    Filter by `polarity` ("negated" / "affirmed") for negated and affirmative sentences."""
    detector = detector or NegationDetector()
    out = []
    for r in reports:
        by_sent: dict[tuple[int, int], list[Mention]] = {}
        for m in detector(r.text):
            by_sent.setdefault(m.sentence_span, []).append(m)
        for _, ms in sorted(by_sent.items()):
            out.append(FindingSentence(r.id, ms[0].sentence.strip(), tuple((m.finding, m.status) for m in ms)))
    return out
