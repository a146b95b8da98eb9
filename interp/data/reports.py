"""Local radiology report corpora and NegEx-style negated/affirmed finding mentions.

Loaders (local files only):
- MIMIC-CXR reports: ``files/pXX/pNNNNNNNN/sNNNNNNNN.txt`` (`load_mimic_reports`);
- IU-Xray / OpenI: one ``ecgen-radiology`` XML per report with ``<AbstractText
  Label="FINDINGS">`` / ``"IMPRESSION"``, ``<uId id=...>`` and ``<parentImage id=...>``
  (`load_openi_reports`).

Detection (`NegationDetector`): negspacy's ``negex`` on ``spacy.blank("en")`` with a
``sentencizer`` and an ``entity_ruler`` of finding terms. Mention phrases and cues follow
the CheXpert labeller (stanfordmlgroup/chexpert-labeler: ``phrases/mention``,
``phrases/unmention``, ``patterns/negation.txt``, ``patterns/pre_negation_uncertainty.txt``,
``patterns/post_negation_uncertainty.txt``), its dependency patterns rewritten as NegEx
phrases; what was taken is marked "CheXpert" beside each list. Each mention gets a status,
in CheXpert's order (pre-negation uncertainty, negation, post-negation uncertainty):
- ``uncertain`` first for "cannot exclude pneumonia", "pneumonia is not excluded", "no new
  consolidation" (pseudo-negations of the negation pass, cues of the hedge pass);
- ``negated``: "no pleural effusion", "no evidence of pneumothorax", "without
  consolidation", "effusion is not seen", "atelectasis rather than pneumonia", and
  **"pleural effusion has resolved"**: a resolved finding is absent now, so it is negated
  (decision documented here and tested);
- ``uncertain``: hedged ("possible consolidation", "may represent atelectasis", "concern for
  pneumonia", "differential diagnosis includes edema"), or one of alternatives within a
  clause ("atelectasis or pneumonia", "effusion versus pleural thickening", "and/or"),
  like CheXpert's -1 (neither negative nor positive);
- ``affirmed``: everything else ("small left pleural effusion", "no change in the
  pleural effusion" - "no change" is a pseudo-negation).
Organ terms of a size finding (`SIZE_TERMS`: "heart size", "cardiac silhouette") mention
cardiomegaly only with a size statement: affirmed when enlarged ("the heart is mildly
enlarged"), negated when normal ("heart size is normal", "upper limits of normal", "not
enlarged"), uncertain when hedged ("borderline heart size"); otherwise not at all ("the
heart and lungs have XXXX"). Unmention phrases ("pericardial effusion") hide the finding
word inside them.
"""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

from interp.errors import InterpError

STATUSES = ("affirmed", "negated", "uncertain")

#: finding -> surface terms, matched token by token, case-insensitively (split like the text:
#: "air-space" is three tokens); a trailing "*" matches any word that starts so; longest match
#: wins. CheXpert phrases/mention (mention_phrases for pneumothorax and lung opacity) taken:
#: effusion, pleural fluid; pneumothorax (a substring match there, so hydropneumothorax too);
#: consolidat*; mass, nodule, nodular density/opacity/opacification, lump, cavitary lesion,
#: carcinoma, neoplasm, tumor; cardiomegaly, cardiac enlargement, enlarged heart and the organ
#: terms in `SIZE_TERMS`; atelecta*, collapse; edema, chf, heart failure; pneumonia,
#: infection, infectious process; opaci*, airspace disease, infiltrate, infiltration,
#: increased density, decreased translucency; fracture; pleural thickening, fibrothorax,
#: pleural / pleural-parenchymal / pleuro-pericardial scar. Left out: the interstitial and
#: scar terms of Lung Opacity (chronic patterns, not an airspace opacity), "fibrosis" under
#: Pleural Other (a lung finding).
FINDING_TERMS: dict[str, tuple[str, ...]] = {
    "pleural_effusion": ("pleural effusion", "pleural effusions", "effusion", "effusions", "pleural fluid"),
    "pneumothorax": ("pneumothorax", "pneumothoraces", "hydropneumothorax", "ptx"),
    "consolidation": ("consolidat*", "consolidative opacity", "airspace consolidation"),
    "nodule": ("nodule", "nodules", "mass", "masses", "nodular opacity", "nodular opacities", "nodular opacification",
               "nodular density", "nodular densities", "lung lesion", "cavitary lesion", "cavitary lesions", "lump", "lumps",
               "carcinoma", "neoplasm", "neoplasms", "tumor", "tumors"),
    "cardiomegaly": ("cardiomegaly", "enlarged heart", "cardiac enlargement", "enlarged cardiac silhouette"),
    "atelectasis": ("atelecta*", "collapse"),
    "edema": ("edema", "oedema", "pulmonary edema", "interstitial edema", "chf", "heart failure"),
    "pneumonia": ("pneumonia", "pneumonias", "infection", "infections", "infectious process"),
    "opacity": ("opaci*", "airspace disease", "air space disease", "air-space disease", "infiltrat*",
                "increased density", "decreased translucency"),
    "fracture": ("fracture*",),
    "pleural_thickening": ("pleural thickening", "fibrothorax", "pleural scar*", "pleural-parenchymal scar*",
                           "pleural parenchymal scar*", "pleuro-parenchymal scar*", "pleuroparenchymal scar*",
                           "pleuro-pericardial scar*"),
}
#: finding -> organ terms that mention it only with a size statement (CheXpert's cardiomegaly
#: mentions "the heart", "heart size", "cardiac size/shadow/contour/silhouette"; its negation
#: "normal", "unremarkable", "within (upper) limits of normal", "not enlarged" and
#: uncertainty "borderline heart size"). CheXpert calls a bare "the heart" positive; here it
#: is no mention, which IU-Xray's MeSH terms agree with ("heart and lungs have XXXX").
SIZE_TERMS: dict[str, tuple[str, ...]] = {
    "cardiomegaly": ("heart", "heart size", "cardiac size", "heart silhouette", "cardiac silhouette",
                     "cardiac silhouettes", "cardiac contour", "cardiac contours", "cardiac shadow"),
}
#: finding -> terms that mention it as uncertain unless negated (CheXpert post-negation
#: uncertainty: vascular/pulmonary congestion, indistinctness, vascular prominence = edema -1)
HEDGED_TERMS: dict[str, tuple[str, ...]] = {
    "edema": ("vascular congestion", "pulmonary congestion", "pulmonary vascular congestion", "indistinctness",
              "vascular prominence"),
}
#: phrases holding a finding term that are not that finding: CheXpert's unmention "pericardial
#: effusion" and one of ours (old granulomatous infection is not pneumonia). Left out: its
#: "calcified nodul" (a calcified nodule is a nodule here, and IU-Xray's MeSH indexes it
#: "Nodule"); "massive", "massengale" (terms match whole words here)
UNMENTION = ("pericardial effusion*", "granulomatous infection*")
#: finding -> CheXpert condition (for joining with label CSVs)
CHEXPERT_OF = {
    "pleural_effusion": "Pleural Effusion", "pneumothorax": "Pneumothorax", "consolidation": "Consolidation",
    "nodule": "Lung Lesion", "cardiomegaly": "Cardiomegaly", "atelectasis": "Atelectasis", "edema": "Edema",
    "pneumonia": "Pneumonia", "opacity": "Lung Opacity", "fracture": "Fracture", "pleural_thickening": "Pleural Other",
}
#: finding -> IU-Xray MeSH major terms that mean it is present: a term matches it and every
#: longer term under it ("Pleural Effusion" matches "Pleural Effusion/left/small"); a
#: hydropneumothorax is a pneumothorax (a `FINDING_TERMS` term too)
MESH_OF = {
    "pleural_effusion": ("Pleural Effusion",), "pneumothorax": ("Pneumothorax", "Hydropneumothorax"),
    "consolidation": ("Consolidation",), "nodule": ("Nodule", "Mass"),
    "cardiomegaly": ("Cardiomegaly", "Cardiac Shadow/enlarged"),
    "atelectasis": ("Pulmonary Atelectasis",), "edema": ("Pulmonary Edema",), "pneumonia": ("Pneumonia",),
    "opacity": ("Opacity", "Airspace Disease"), "fracture": ("Fractures, Bone",),
}

#: CheXpert pre_negation_uncertainty.txt: not negations (pseudo here), hedges (`_UNCERTAIN`)
_PRE_UNCERTAIN = [
    "cannot exclude", "can not exclude", "cannot be excluded", "can not be excluded", "cannot be entirely excluded",
    "cannot entirely be excluded", "not entirely excluded", "cannot rule out", "cannot be ruled out", "not excluded",
    "not be excluded", "not be ruled out", "no new", "no evidence to rule out",
]
_EXTRA_NEGATION = {
    "preceding_negations": [
        "no radiographic evidence of", "no definite", "no convincing", "resolution of", "resolved",
        "interval resolution of", "clear of", "no longer",
        "no obvious", "rather than", "disappearance of",  # CheXpert negation.txt
    ],
    "following_negations": [
        "has resolved", "have resolved", "is resolved", "are resolved", "resolved", "is not seen",
        "are not seen", "not seen", "is not identified", "not identified", "is absent", "are absent",
        "absent", "is no longer seen", "no longer seen", "no longer present", "is not present",
        "not present", "not appreciated", "not visualized", "has cleared", "have cleared",
    ],
    "pseudo_negations": [*_PRE_UNCERTAIN, "no change in", "no significant change in", "no interval change in"],
    "termination": ["there is", "there are", "there has been", "and there", "with"],
}
#: CheXpert post_negation_uncertainty.txt as phrases: possible/possibly/presumably/probable/
#: questionable/suspect(ed)/suspicious, question, may/might/would/could before a mention and
#: "may be present" after it (its modal rules), suggestion of, concern/suspicion for, favor,
#: consider, differential diagnosis, borderline, poorly/incompletely evaluated, not well
#: visualized, not clearly seen; "suggesting" and "likely" are ours. Alternatives (or, and/or,
#: versus) are `_ALTERNATIVE`; "not appreciated" stays a negation (CheXpert: uncertain).
_UNCERTAIN = {
    "pseudo_negations": ["no evidence of", "not likely"],
    "preceding_negations": [
        *_PRE_UNCERTAIN, "possible", "possibly", "probable", "probably", "presumably", "may", "might", "could",
        "would", "suspicious for", "concerning for", "concern for", "suspicion for", "suspicion of", "suspect",
        "suspected", "suggestive of", "suggestion of", "suggesting", "question", "question of", "questionable",
        "likely", "differential includes", "differential diagnosis", "worrisome for", "favor", "consider",
        "borderline",
    ],
    "following_negations": [
        *_PRE_UNCERTAIN, "not ruled out", "is possible", "is suspected", "suspected", "is likely", "is questioned",
        "may be present", "might be present", "could be present", "borderline", "poorly evaluated",
        "incompletely evaluated", "not well visualized", "not well evaluated", "not clearly seen",
    ],
    "termination": ["although", "but", "however", "except", "there is", "there are", "and there", "which"],
}
#: clause ends for the narrow-scope passes below
_CLAUSE = [";", "with", "which", "but", "however", "although", "though", "there is", "there are", "and there"]
#: CheXpert post-negation "XXX or YYY", "XXX and/or YYY", "XXX versus YYY": either side, within a clause
_ALTERNATIVE = {"pseudo_negations": [], "preceding_negations": ["or", "and/or", "versus", "vs", "vs."],
                "following_negations": ["or", "and/or", "versus", "vs", "vs."], "termination": [",", *_CLAUSE]}
_NOT_ENLARGED = ["not enlarged", "not significantly enlarged", "not grossly enlarged", "not large"]
#: size statements about an organ term (`SIZE_TERMS`)
_ENLARGED = {"pseudo_negations": _NOT_ENLARGED, "preceding_negations": ["enlarged", "enlargement of"],
             "following_negations": ["enlarged", "enlargement", "large", "larger"], "termination": [",", *_CLAUSE]}
_NORMAL = {"pseudo_negations": [], "preceding_negations": ["normal", "unremarkable"],
           "following_negations": ["normal", "unremarkable", *_NOT_ENLARGED], "termination": _CLAUSE}
_UNMENTIONED = "UNMENTION"  # entity label of `UNMENTION`; "finding|size", "finding|hedged": of the other dicts


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


def _pattern(nlp, term: str) -> list[dict]:
    """Token pattern of a term; a trailing "*" makes its last word a prefix."""
    stem = term.endswith("*")
    words = [t.lower_ for t in nlp.make_doc(term.rstrip("*"))]
    pat: list[dict] = [{"LOWER": w} for w in words]
    if stem:
        pat[-1] = {"LOWER": {"REGEX": f"^{re.escape(words[-1])}"}}
    return pat


def _status(ent, kind: str) -> str | None:
    """A mention's status; `kind`: "" (`FINDING_TERMS`), "size" or "hedged"; None: an organ term
    without a size statement."""
    if ent._.negex:
        return "negated"
    if kind == "hedged" or ent._.uncertain or ent._.alternative:
        return "uncertain"
    if kind != "size" or ent._.enlarged:
        return "affirmed"
    return "negated" if ent._.normal_size else None


class NegationDetector:
    """NegEx over finding mentions (negspacy on a blank English spaCy pipeline)."""

    def __init__(self, terms: dict[str, Iterable[str]] | None = None):
        import importlib

        import spacy

        importlib.import_module("negspacy.negation")  # registers the "negex" factory

        self.terms = {k: tuple(v) for k, v in (terms or FINDING_TERMS).items()}
        if not self.terms:
            raise InterpError("NegationDetector needs at least one finding term")
        nlp = spacy.blank("en")
        nlp.add_pipe("sentencizer")
        labelled = [(f, t) for f, ts in self.terms.items() for t in ts] + [(_UNMENTIONED, t) for t in UNMENTION]
        for kind, extra in (("size", SIZE_TERMS), ("hedged", HEDGED_TERMS)):
            labelled += [(f"{f}|{kind}", t) for f, ts in extra.items() if f in self.terms for t in ts]
        nlp.add_pipe("entity_ruler").add_patterns([{"label": f, "pattern": _pattern(nlp, t)} for f, t in labelled])
        labels = list(self.terms)
        sized = [f + "|size" for f in SIZE_TERMS if f in self.terms]
        hedged = [f + "|hedged" for f in HEDGED_TERMS if f in self.terms]
        passes = [("negex", _EXTRA_NEGATION, labels + hedged), ("uncertain", _UNCERTAIN, labels + sized),
                  ("alternative", _ALTERNATIVE, labels + sized), ("enlarged", _ENLARGED, sized),
                  ("normal_size", _NORMAL, sized)]
        for name, extra, types in passes:
            if types:  # negspacy reads no types as every type
                nlp.add_pipe("negex", name=name, config={
                    "neg_termset": _termset(extra, name == "negex"), "ent_types": types, "extension_name": name})
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
            finding, _, kind = ent.label_.partition("|")
            status = None if finding == _UNMENTIONED else _status(ent, kind)
            if status is not None:
                sent = ent.sent
                out.append(Mention(finding, ent.text, status, (ent.start_char, ent.end_char),
                                   sent.text, (sent.start_char, sent.end_char)))
        return out

    def status(self, sentence: str, finding: str) -> str | None:
        """Status of `finding` in `sentence` as `report_status` reads it, or None if it is not mentioned."""
        return self.report_status(sentence).get(finding)

    def report_status(self, text: str) -> dict[str, str]:
        """Status of each mentioned finding, CheXpert-style: affirmed if any mention is (a left
        effusion and "no right effusion" is an effusion), else uncertain if any is, else negated.
        Findings not mentioned are left out."""
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
