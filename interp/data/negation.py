"""Negation benchmarks: MedNega-style paired multiple choice, and contextual claims.

**MedNega-style paired benchmark** (the MedNega-CXR construction, deterministic, no LLM):
from 0/1 labels of a study's conditions, keep studies with >= 3 negative and >= 2
positive conditions, pick 3 conditions (at least one negative and one positive: one of
each, then a third from the remaining known ones, in random order), put the true 0/1
vector at a random letter and three distinct random non-zero flips of it at the other
letters (so the 4 vectors are distinct and exactly one is true), and write each option
twice through a FIXED phrase bank: once with negated phrases for the 0s ("no pleural
effusion") and once with their affirmative equivalents ("the costophrenic angles are
sharp"). 1s use the positive phrase in both. Columns (MedNega's plus `image`):
``subject_id, study_id, image, question, binary_raw_choice_1..4,
negation_mcq_choice_1..4, affirmative_mcq_choice_1..4, correct_answer``.

Two phrase banks: ``chexpert`` (the 13 CheXpert conditions, sentence case, real report
phrasing) and ``phantom`` (the 5 phantom findings in the organisms' word-level style:
lowercase, punctuation as separate tokens; the affirmatives are `interp.data.vqa.AFFIRMATIVE`
so the organisms see the same rewrites they were trained on).

Deviation for phantoms: there are only 5 findings, so a phantom qualifies with >= 2
negative and >= 1 positive finding (instead of >= 3 and >= 2).

Every item is validated on construction: each option (both variants) parses back to
its label vector through `parse_option`, the 4 vectors are distinct, and exactly one
equals the study's true labels. `mcq_dataset` turns a benchmark into VQA-style items
(one per item and variant, prompt `mcq_prompt`) that `load_dataset` gives the cache.

**Contextual claims** (`contextual_claims`): attribute-level statements about a phantom
(presence, laterality, zone, severity), each as a positive/negated minimal pair
("there is a pleural effusion on the left ." / "there is no pleural effusion on the
left ."; "the nodule is large ." / "the nodule is not large ."), with the true/false
label from the spec and character spans for `finding` and `negation_cue`.
"""

from __future__ import annotations

import csv
import hashlib
import json
import re
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from interp.data.images import load_image
from interp.data.phantom import FINDINGS, SEVERITIES, SIDES, ZONE_FINDINGS, ZONES, PhantomSpec, sample_spec
from interp.data.vqa import AFFIRMATIVE, FINDING_WORDS, SPLITS, VQADataset, VQAItem
from interp.errors import InterpError

FORMAT_VERSION = 1
LETTERS = ("A", "B", "C", "D")
#: the 14 label columns of CheXpert / `mimic-cxr-2.0.0-chexpert.csv`
CHEXPERT_COLUMNS = (
    "Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Enlarged Cardiomediastinum",
    "Fracture", "Lung Lesion", "Lung Opacity", "No Finding", "Pleural Effusion",
    "Pleural Other", "Pneumonia", "Pneumothorax", "Support Devices",
)
#: the 13 conditions MedNega draws from (all but "No Finding")
CHEXPERT_CONDITIONS = tuple(c for c in CHEXPERT_COLUMNS if c != "No Finding")
MCQ_COLUMNS = (
    ("subject_id", "study_id", "image", "question")
    + tuple(f"binary_raw_choice_{k}" for k in range(1, 5))
    + tuple(f"negation_mcq_choice_{k}" for k in range(1, 5))
    + tuple(f"affirmative_mcq_choice_{k}" for k in range(1, 5))
    + ("correct_answer",)
)
VARIANTS = ("negation", "affirmative")


# ---------------------------------------------------------------------------------------
# phrase banks


@dataclass(frozen=True)
class Phrase:
    """How one condition is written: present, absent (negated), absent (affirmative)."""

    condition: str
    positive: str
    negated: str
    affirmative: str


def _bank(rows: Iterable[tuple[str, str, str, str]]) -> dict[str, Phrase]:
    return {r[0]: Phrase(*r) for r in rows}


#: the 13 CheXpert conditions in report phrasing; no phrase contains a "." (options are
#: sentences joined by ". ") and no affirmative contains a negation word
CHEXPERT_BANK = _bank([
    ("Atelectasis", "There is bibasilar atelectasis", "No atelectasis", "Lung volumes are well preserved"),
    ("Cardiomegaly", "The heart is enlarged", "No cardiomegaly", "The heart size is normal"),
    ("Consolidation", "There is focal consolidation", "No focal consolidation", "The lung parenchyma is clear"),
    ("Edema", "There is pulmonary edema", "No pulmonary edema", "The pulmonary vasculature is normal"),
    ("Enlarged Cardiomediastinum", "The cardiomediastinal silhouette is widened",
     "No widening of the cardiomediastinal silhouette", "The cardiomediastinal silhouette is within normal limits"),
    ("Fracture", "There is an acute rib fracture", "No acute fracture", "The osseous structures are intact"),
    ("Lung Lesion", "There is a pulmonary nodule", "No pulmonary nodules or masses", "The lungs are clear of focal lesions"),
    ("Lung Opacity", "There is an airspace opacity", "No airspace opacity", "The lungs are clear"),
    ("Pleural Effusion", "There is a pleural effusion", "No pleural effusion", "The costophrenic angles are sharp"),
    ("Pleural Other", "There is pleural thickening", "No pleural thickening", "The pleural surfaces are smooth"),
    ("Pneumonia", "Pneumonia is seen", "No pneumonia is seen", "Aerated alveoli are seen"),
    ("Pneumothorax", "There is a pneumothorax", "No pneumothorax", "The lungs are fully expanded"),
    ("Support Devices", "Support devices are in place", "No support devices are seen", "The chest is clear of lines and tubes"),
])

#: the phantom findings in the organisms' style (every word in `vqa.vocabulary()`)
PHANTOM_BANK = _bank([
    (name, f"there is {'' if name == 'cardiomegaly' else 'a '}{FINDING_WORDS[name]}",
     f"there is no {FINDING_WORDS[name]}", AFFIRMATIVE[name])
    for name in FINDINGS
])
BANKS = {"chexpert": CHEXPERT_BANK, "phantom": PHANTOM_BANK}
QUESTIONS = {
    "chexpert": "Which of the following statements about this chest X-ray is correct?",
    "phantom": "which statement is true ?",
}


def _norm(text: str) -> str:
    return " ".join(text.lower().replace(".", " ").split())


def _lookup() -> dict[str, dict[str, tuple[str, int]]]:
    out: dict[str, dict[str, tuple[str, int]]] = {}
    for bank_name, bank in BANKS.items():
        table = out.setdefault(bank_name, {})
        for p in bank.values():
            for text, value in ((p.positive, 1), (p.negated, 0), (p.affirmative, 0)):
                key = _norm(text)
                if key in table or "." in text:
                    raise AssertionError(f"phrase bank {bank_name}: {text!r} is ambiguous")
                table[key] = (p.condition, value)
    return out


_LOOKUP = _lookup()


def _check_bank(bank: str) -> None:
    if bank not in BANKS:
        raise InterpError(f"unknown phrase bank {bank!r}; valid: {', '.join(BANKS)}")


def parse_phrase(text: str, bank: str = "chexpert") -> tuple[str, int]:
    """(condition, 0/1) of one phrase of `bank` (case, spacing and a final "." ignored)."""
    _check_bank(bank)
    hit = _LOOKUP[bank].get(_norm(text))
    if hit is None:
        raise InterpError(f"not a phrase of the {bank} bank: {text!r}")
    return hit


def _sentences(option: str) -> list[str]:
    return [s for s in (p.strip() for p in re.split(r"\s*\.(?:\s+|$)", option.strip())) if s]


def parse_option(option: str, bank: str | None = None) -> dict[str, int]:
    """{condition: 0/1} of an option (bank phrases joined by "."; each condition at most
    once). Without `bank`, the first bank (chexpert, phantom) in which every phrase parses."""
    if bank is None:
        for name in BANKS:
            try:
                return parse_option(option, name)
            except InterpError:
                continue
        raise InterpError(f"option is not made of the phrases of any one bank: {option!r}")
    out: dict[str, int] = {}
    for sentence in _sentences(option):
        cond, value = parse_phrase(sentence, bank)
        if cond in out:
            raise InterpError(f"condition {cond!r} appears twice in option {option!r}")
        out[cond] = value
    if not out:
        raise InterpError(f"empty option {option!r}")
    return out


def bank_of(conditions: Iterable[str]) -> str:
    """The bank whose conditions these are."""
    conditions = set(conditions)
    for name, bank in BANKS.items():
        if conditions <= set(bank):
            return name
    raise InterpError(f"conditions {sorted(conditions)} are not all in one phrase bank")


def write_option(bank: str, labels: dict[str, int], variant: str) -> str:
    """The option text for {condition: 0/1} in `variant` ("negation" or "affirmative")."""
    if variant not in VARIANTS:
        raise InterpError(f"unknown variant {variant!r}; valid: {', '.join(VARIANTS)}")
    _check_bank(bank)
    phrases = BANKS[bank]
    missing = [c for c in labels if c not in phrases]
    if missing:
        raise InterpError(f"conditions {missing} are not in the {bank} phrase bank")
    parts = []
    for cond, v in labels.items():
        p = phrases[cond]
        parts.append(p.positive if v else p.negated if variant == "negation" else p.affirmative)
    if bank == "phantom":
        return " . ".join(parts) + " ."
    return ". ".join(parts) + "."


# ---------------------------------------------------------------------------------------
# MCQ items and the benchmark


@dataclass(frozen=True)
class MCQItem:
    """One MedNega-style item; `binary_raw_choices[k]` is option k's {condition: 0/1}."""

    subject_id: str
    study_id: str
    image: str  # phantom index (as text) or image path relative to the benchmark's image_root
    question: str
    binary_raw_choices: tuple[dict[str, int], ...]
    negation_mcq_choices: tuple[str, ...]
    affirmative_mcq_choices: tuple[str, ...]
    correct_answer: str  # "A".."D"

    @property
    def correct_index(self) -> int:
        return LETTERS.index(self.correct_answer)

    def choices(self, variant: str) -> tuple[str, ...]:
        if variant not in VARIANTS:
            raise InterpError(f"unknown variant {variant!r}; valid: {', '.join(VARIANTS)}")
        return self.negation_mcq_choices if variant == "negation" else self.affirmative_mcq_choices

    def validate(self, truth: dict[str, int] | None = None) -> None:
        """Options parse back to their vectors, are distinct, and exactly one is `truth`."""
        where = f"item {self.subject_id}/{self.study_id}"
        if self.correct_answer not in LETTERS:
            raise InterpError(f"{where}: correct_answer {self.correct_answer!r} not in {LETTERS}")
        n = {len(self.binary_raw_choices), len(self.negation_mcq_choices), len(self.affirmative_mcq_choices)}
        if n != {4}:
            raise InterpError(f"{where}: needs exactly 4 options per column group")
        vectors = [tuple(sorted(b.items())) for b in self.binary_raw_choices]
        if len(set(vectors)) != 4:
            raise InterpError(f"{where}: options are not distinct")
        if len({tuple(b) for b in self.binary_raw_choices}) != 1:
            raise InterpError(f"{where}: options differ in their conditions")
        bank = bank_of(self.binary_raw_choices[0])
        for k, b in enumerate(self.binary_raw_choices):
            for variant in VARIANTS:
                got = parse_option(self.choices(variant)[k], bank)
                if got != b:
                    raise InterpError(f"{where}: {variant} option {LETTERS[k]} parses to {got}, not {b}")
        truth = truth if truth is not None else self.binary_raw_choices[self.correct_index]
        hits = [k for k, b in enumerate(self.binary_raw_choices) if b == {c: truth.get(c) for c in b}]
        if hits != [self.correct_index]:
            raise InterpError(f"{where}: options matching the true labels {hits}, expected [{self.correct_index}]")

    def to_row(self) -> dict[str, str]:
        row = {"subject_id": self.subject_id, "study_id": self.study_id, "image": self.image,
               "question": self.question, "correct_answer": self.correct_answer}
        for k in range(4):
            row[f"binary_raw_choice_{k + 1}"] = json.dumps(self.binary_raw_choices[k])
            row[f"negation_mcq_choice_{k + 1}"] = self.negation_mcq_choices[k]
            row[f"affirmative_mcq_choice_{k + 1}"] = self.affirmative_mcq_choices[k]
        return row

    @classmethod
    def from_row(cls, row: dict) -> MCQItem:
        try:
            return cls(
                subject_id=str(row["subject_id"]), study_id=str(row["study_id"]),
                image=str(row.get("image") or ""), question=str(row["question"]),
                binary_raw_choices=tuple(
                    {str(k): int(v) for k, v in json.loads(row[f"binary_raw_choice_{k}"]).items()}
                    for k in range(1, 5)),
                negation_mcq_choices=tuple(str(row[f"negation_mcq_choice_{k}"]) for k in range(1, 5)),
                affirmative_mcq_choices=tuple(str(row[f"affirmative_mcq_choice_{k}"]) for k in range(1, 5)),
                correct_answer=str(row["correct_answer"]).strip().upper(),
            )
        except KeyError as e:
            raise InterpError(f"MedNega row lacks column {e.args[0]!r}") from None
        except (ValueError, TypeError, AttributeError) as e:
            raise InterpError(f"malformed MedNega row: {e!r}") from None

    def to_dict(self) -> dict:
        return {**asdict(self), "binary_raw_choices": [dict(b) for b in self.binary_raw_choices],
                "negation_mcq_choices": list(self.negation_mcq_choices),
                "affirmative_mcq_choices": list(self.affirmative_mcq_choices)}


def _make_item(
    bank: str, rng: np.random.Generator, labels: dict[str, int | None], min_neg: int, min_pos: int,
    subject_id: str, study_id: str, image: str,
) -> MCQItem | None:
    """One item from a study's labels (None/missing = unknown), or None if it does not qualify."""
    neg = [c for c, v in labels.items() if v == 0]
    pos = [c for c, v in labels.items() if v == 1]
    if len(neg) < min_neg or len(pos) < min_pos:
        return None
    first = [neg[rng.integers(len(neg))], pos[rng.integers(len(pos))]]
    rest = [c for c in neg + pos if c not in first]
    conds = first + [rest[rng.integers(len(rest))]]
    conds = [conds[i] for i in rng.permutation(3)]
    truth = np.array([labels[c] for c in conds], dtype=int)
    masks = rng.choice(np.arange(1, 8), size=3, replace=False)  # distinct non-zero flips
    flips = [truth ^ np.array([(m >> b) & 1 for b in range(3)]) for m in masks]
    correct = int(rng.integers(4))
    vectors = flips[:correct] + [truth] + flips[correct:]
    binary = tuple({c: int(v) for c, v in zip(conds, vec)} for vec in vectors)
    item = MCQItem(
        subject_id=subject_id, study_id=study_id, image=image, question=QUESTIONS[bank],
        binary_raw_choices=binary,
        negation_mcq_choices=tuple(write_option(bank, b, "negation") for b in binary),
        affirmative_mcq_choices=tuple(write_option(bank, b, "affirmative") for b in binary),
        correct_answer=LETTERS[correct],
    )
    item.validate({c: int(v) for c, v in zip(conds, truth)})
    return item


def _item_rng(seed: int, stream: int, index: int) -> np.random.Generator:
    return np.random.default_rng([seed, 4, stream, index])


@dataclass
class NegationBenchmark:
    """MedNega-style items plus what is needed to find their images.

    `meta` holds the build parameters (bank, seed, source; for phantoms split and
    image_size; for files image_root). Phantom benchmarks keep their `specs`, and
    `image(i)` renders item i's phantom exactly as the `VQADataset` of the same
    (n_images, seed, split) does.
    """

    items: list[MCQItem]
    meta: dict = field(default_factory=dict)
    specs: list[PhantomSpec] | None = None

    def __len__(self) -> int:
        return len(self.items)

    @property
    def bank(self) -> str:
        return self.meta.get("bank", "chexpert")

    @property
    def correct(self) -> np.ndarray:
        """[n] index 0..3 of the correct option of each item."""
        return np.array([it.correct_index for it in self.items], dtype=int)

    def choices(self, variant: str) -> list[tuple[str, ...]]:
        """[n][4] option texts of `variant`."""
        return [it.choices(variant) for it in self.items]

    def validate(self) -> None:
        """Re-check every item; for phantoms, against the labels read from the specs."""
        for it in self.items:
            if self.specs is not None and not 0 <= int(it.image) < len(self.specs):
                raise InterpError(f"benchmark item {it.study_id} points at phantom {it.image}, but the benchmark has "
                                  f"{len(self.specs)}")
            truth = _phantom_labels(self.specs[int(it.image)]) if self.specs is not None else None
            it.validate(truth)

    # images ------------------------------------------------------------------------
    def dataset(self) -> VQADataset:
        """The phantoms as a `VQADataset` (no items) for rendering; phantom benchmarks only."""
        if self.specs is None:
            raise InterpError("not a phantom benchmark: it has no phantom specs")
        return VQADataset(self.meta["seed"], self.meta["split"], self.meta["image_size"], self.specs, [])

    def image(self, i: int) -> np.ndarray:
        """Item i's phantom image (phantom benchmarks only)."""
        return self.dataset().image(int(self.items[i].image))

    def image_path(self, i: int) -> Path:
        """Item i's image file (file benchmarks): image_root / image."""
        ref = self.items[i].image
        if not ref:
            raise InterpError(f"item {i} has no image reference")
        root = self.meta.get("image_root")
        return Path(root) / ref if root else Path(ref)

    # persistence -------------------------------------------------------------------
    def to_dict(self) -> dict:
        return {
            "format": FORMAT_VERSION,
            "meta": self.meta,
            "specs": None if self.specs is None else [s.to_dict() for s in self.specs],
            "items": [it.to_dict() for it in self.items],
        }

    @property
    def hash(self) -> str:
        """sha256 of the canonical JSON (same build parameters -> same hash)."""
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":")).encode()).hexdigest()

    def save(self, path: str | Path) -> Path:
        """`.json`: everything; `.csv`: the MedNega columns, plus `<path>.meta.json`
        (meta, specs, hash) beside it."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.suffix == ".json":
            path.write_text(json.dumps({**self.to_dict(), "hash": self.hash}, sort_keys=True))
            return path
        if path.suffix != ".csv":
            raise InterpError(f"save a benchmark as .csv or .json, not {path.name}")
        with path.open("w", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=MCQ_COLUMNS)
            w.writeheader()
            w.writerows(it.to_row() for it in self.items)
        d = self.to_dict()
        del d["items"]
        _sidecar(path).write_text(json.dumps({**d, "hash": self.hash}, sort_keys=True))
        return path

    @classmethod
    def load(cls, path: str | Path) -> NegationBenchmark:
        """A saved benchmark (.json, or .csv with or without its `.meta.json`); a MedNega
        CSV without the `image` column loads too. Items are re-validated."""
        path = Path(path)
        if not path.is_file():
            raise InterpError(f"no benchmark file {path}")
        try:
            if path.suffix == ".json":
                d = json.loads(path.read_text())
                items = [MCQItem.from_row(_dict_to_row(it)) for it in d["items"]]
            else:
                with path.open(newline="") as fh:
                    reader = csv.DictReader(fh)
                    missing = [c for c in MCQ_COLUMNS if c != "image" and c not in (reader.fieldnames or [])]
                    if missing:
                        raise InterpError(f"{path}: missing columns {missing}")
                    items = [MCQItem.from_row(r) for r in reader]
                side = _sidecar(path)
                d = json.loads(side.read_text()) if side.is_file() else {"meta": {}, "specs": None}
        except (OSError, ValueError, KeyError, TypeError) as e:
            if isinstance(e, InterpError):
                raise
            raise InterpError(f"cannot load benchmark {path}: {e!r}") from None
        if "format" in d and d["format"] != FORMAT_VERSION:
            raise InterpError(f"unsupported benchmark format {d['format']!r} in {path}")
        specs = None if d.get("specs") is None else [PhantomSpec.from_dict(s) for s in d["specs"]]
        bench = cls(items, d.get("meta") or {}, specs)
        if "hash" in d and d["hash"] != bench.hash:
            raise InterpError(f"benchmark {path} is corrupt: hash mismatch")
        bench.validate()
        return bench


def _sidecar(path: Path) -> Path:
    return path.with_name(path.name + ".meta.json")


def _dict_to_row(d: dict) -> dict:
    row = {k: d[k] for k in ("subject_id", "study_id", "image", "question", "correct_answer")}
    for k in range(4):
        row[f"binary_raw_choice_{k + 1}"] = json.dumps(d["binary_raw_choices"][k])
        row[f"negation_mcq_choice_{k + 1}"] = d["negation_mcq_choices"][k]
        row[f"affirmative_mcq_choice_{k + 1}"] = d["affirmative_mcq_choices"][k]
    return row


# ---------------------------------------------------------------------------------------
# builders


def _phantom_labels(spec: PhantomSpec) -> dict[str, int]:
    return {name: int(spec.has(name)) for name in FINDINGS}


def mednega_from_phantoms(
    n_images: int, seed: int, split: str = "test", *, image_size: int = 64, prevalence: float = 0.5,
) -> NegationBenchmark:
    """Items for the qualifying phantoms among the `n_images` that
    `build_vqa(n_images, seed, split, prevalence=...)` draws (same specs, same render
    seeds, so item.image indexes that data set). A phantom qualifies with >= 2 absent
    and >= 1 present finding (5 findings only; MedNega asks >= 3 and >= 2), so the
    benchmark has at most `n_images` items (about 25/32 of them at prevalence 0.5)."""
    if n_images < 1:
        raise InterpError(f"n_images must be >= 1, got {n_images}")
    if split not in SPLITS:
        raise InterpError(f"unknown split {split!r}; valid: {', '.join(SPLITS)}")
    rng = np.random.default_rng([seed, SPLITS.index(split)])  # the stream build_vqa uses
    specs = [sample_spec(rng, prevalence) for _ in range(n_images)]
    return _phantom_benchmark(specs, seed, split, image_size, {"prevalence": prevalence})


def mednega_from_dataset(dataset: VQADataset) -> NegationBenchmark:
    """Items for the qualifying phantoms of a `VQADataset` (its seed drives the options;
    item.image indexes `dataset.specs`, and `image(i)` renders the same pixels)."""
    if not isinstance(dataset, VQADataset):
        raise InterpError(f"mednega_from_dataset takes a VQADataset, got {type(dataset).__name__}")
    return _phantom_benchmark(list(dataset.specs), dataset.seed, dataset.split, dataset.image_size,
                              {"dataset": dataset.name})


def _phantom_benchmark(specs: list[PhantomSpec], seed: int, split: str, image_size: int, extra: dict) -> NegationBenchmark:
    items = []
    for i, spec in enumerate(specs):
        it = _make_item("phantom", _item_rng(seed, SPLITS.index(split), i), _phantom_labels(spec),
                        2, 1, f"{split}-{i:05d}", f"{split}-{i:05d}", str(i))
        if it is not None:
            items.append(it)
    if not items:
        raise InterpError(f"no phantom of {len(specs)} has >= 2 absent and >= 1 present finding")
    meta = {"bank": "phantom", "source": "phantom", "seed": seed, "split": split, "image_size": image_size,
            "n_images": len(specs), "min_negative": 2, "min_positive": 1, **extra}
    return NegationBenchmark(items, meta, specs)


_IMAGE_EXT = (".jpg", ".jpeg", ".png", ".dcm")


def _label_value(raw: str, where: str) -> int | None:
    s = (raw or "").strip()
    if s == "":
        return None
    try:
        v = float(s)
    except ValueError:
        raise InterpError(f"{where}: label {raw!r} is not 1, 0, -1 or blank") from None
    if v == 1.0:
        return 1
    if v == 0.0:
        return 0
    if v == -1.0:
        return None  # uncertain counts as unknown, never as negative
    raise InterpError(f"{where}: label {raw!r} is not 1, 0, -1 or blank")


def _mimic_study_image(root: Path, subject: str, study: str) -> str:
    rel = Path("files") / f"p{subject[:2]}" / f"p{subject}" / f"s{study}"
    d = root / rel
    files = sorted(p for p in d.iterdir() if p.suffix.lower() in _IMAGE_EXT) if d.is_dir() else []
    if not files:
        raise InterpError(f"labels do not match images: study s{study} of p{subject} has no image under {d}")
    return str(files[0].relative_to(root))


def _chexpert_image(root: Path, rel: str) -> str:
    for cand in (Path(rel), Path(*Path(rel).parts[1:])):
        if cand.parts and (root / cand).is_file():
            return str(cand)
    raise InterpError(f"labels do not match images: {rel} not found under {root}")


def mednega_from_labels(
    csv_path: str | Path, image_root: str | Path | None = None, seed: int = 0, *, missing_images: str = "error",
) -> NegationBenchmark:
    """Items from a CheXpert-style label CSV: `mimic-cxr-2.0.0-chexpert.csv` (subject_id,
    study_id, label columns) or CheXpert `train.csv`/`valid.csv` (Path, Sex, Age, ...,
    label columns; one item per study, frontal view preferred). Labels: 1 positive, 0
    negative, -1 (uncertain) and blank unknown. With `image_root`, every kept study must
    have its image there (MIMIC-CXR-JPG `files/pXX/pNNNNNNNN/sNNNNNNNN/*.jpg`; CheXpert
    `Path`, relative to the root or to its parent); `image` is then relative to the root.
    A kept study without its image is an error, or with ``missing_images="skip"`` left
    out (listed in ``meta["skipped"]``). Each study's options come from its own seeded
    stream, so dropping rows does not change the other items."""
    if missing_images not in ("error", "skip"):
        raise InterpError(f"missing_images must be 'error' or 'skip', got {missing_images!r}")
    path = Path(csv_path)
    if not path.is_file():
        raise InterpError(f"no label file {path}")
    root = Path(image_root) if image_root is not None else None
    if root is not None and not root.is_dir():
        raise InterpError(f"image root {root} is not a directory")
    with path.open(newline="") as fh:
        reader = csv.DictReader(fh)
        cols = reader.fieldnames or []
        rows = list(reader)
    if {"subject_id", "study_id"} <= set(cols):
        layout = "mimic"
    elif "Path" in cols:
        layout = "chexpert"
    else:
        raise InterpError(f"{path}: neither MIMIC-CXR (subject_id, study_id) nor CheXpert (Path) columns")
    missing = [c for c in CHEXPERT_CONDITIONS if c not in cols]
    if missing:
        raise InterpError(f"{path}: missing label columns {missing}")
    studies: dict[tuple[str, str], tuple[int, dict]] = {}
    for n, row in enumerate(rows):
        where = f"{path.name} row {n + 2}"
        labels = {c: _label_value(row[c], f"{where} {c}") for c in CHEXPERT_CONDITIONS}
        if layout == "mimic":
            subject, study = row["subject_id"].strip(), row["study_id"].strip()
            if not subject.isdigit() or not study.isdigit():
                raise InterpError(f"{where}: subject_id/study_id must be numbers, got {subject!r}/{study!r}")
            key = (subject, study)
            if key in studies:
                if studies[key][1]["labels"] != labels:
                    raise InterpError(f"{where}: study {study} listed twice with different labels")
                continue
            studies[key] = (n, {"labels": labels, "image": f"files/p{subject[:2]}/p{subject}/s{study}"})
        else:
            rel = row["Path"].strip()
            parts = Path(rel).parts
            if len(parts) < 3:
                raise InterpError(f"{where}: Path {rel!r} is not .../patientNNNNN/studyN/view.jpg")
            key = (parts[-3], parts[-2])
            frontal = row.get("Frontal/Lateral", "Frontal") != "Lateral"
            if key in studies and not (frontal and not studies[key][1]["frontal"]):
                continue
            studies[key] = (studies.get(key, (n,))[0], {"labels": labels, "image": rel, "frontal": frontal})
    items, skipped = [], []
    for (subject, study), (n, s) in studies.items():
        it = _make_item("chexpert", _item_rng(seed, 0, n), s["labels"], 3, 2, subject, study, s["image"])
        if it is None:
            continue
        if root is not None:
            try:
                image = (_mimic_study_image(root, subject, study) if layout == "mimic"
                         else _chexpert_image(root, s["image"]))
            except InterpError:
                if missing_images == "error":
                    raise
                skipped.append(f"{subject}/{study}")
                continue
            it = replace(it, image=image)
        items.append(it)
    if not items:
        raise InterpError(f"{path}: no study has >= 3 negative and >= 2 positive conditions")
    meta = {"bank": "chexpert", "source": str(path), "layout": layout, "seed": seed,
            "image_root": None if root is None else str(root), "n_studies": len(studies), "skipped": skipped,
            "min_negative": 3, "min_positive": 2}
    return NegationBenchmark(items, meta, None)


# ---------------------------------------------------------------------------------------
# scoring (model-agnostic)


def _correct_indices(correct: Sequence | np.ndarray, n: int) -> np.ndarray:
    c = np.asarray(correct)
    if c.dtype.kind in "US":
        bad = [x for x in c if str(x).upper() not in LETTERS]
        if bad:
            raise InterpError(f"correct answers must be A-D or 0-3, got {bad[:3]}")
        c = np.array([LETTERS.index(str(x).upper()) for x in c])
    c = c.astype(int)
    if c.shape != (n,):
        raise InterpError(f"correct must have shape ({n},), got {c.shape}")
    if ((c < 0) | (c > 3)).any():
        raise InterpError("correct indices must be in 0..3")
    return c


def mcq_correct(scores: np.ndarray, correct: Sequence | np.ndarray) -> np.ndarray:
    """[n] credit per item: 1 if the correct option scores highest, 1/k if it ties with
    k - 1 others (expected accuracy under random tie-breaking), else 0."""
    s = np.asarray(scores, dtype=float)
    if s.ndim != 2 or s.shape[1] != 4:
        raise InterpError(f"scores must have shape [n, 4], got {list(s.shape)}")
    if not np.isfinite(s).all():
        raise InterpError("scores contain NaN or inf")
    c = _correct_indices(correct, s.shape[0])
    top = s == s.max(axis=1, keepdims=True)
    return top[np.arange(len(c)), c] / top.sum(axis=1)


def score_mcq(scores: np.ndarray, correct: Sequence | np.ndarray) -> float:
    """4-way accuracy of [n, 4] option scores (image-text similarity, or the answer
    letter's log-probability) against the correct indices (0-3 or letters A-D)."""
    credit = mcq_correct(scores, correct)
    if credit.size == 0:
        raise InterpError("no items to score")
    return float(credit.mean())


@dataclass(frozen=True)
class NegationScore:
    """Accuracy on the negated and the affirmative set; gap = affirmative - negated
    (positive: affirmation bias, as reported for medical CLIP models)."""

    negated: float
    affirmative: float
    gap: float
    n: int
    negated_ci: tuple[float, float]
    affirmative_ci: tuple[float, float]


def _bootstrap_ci(credit: np.ndarray, n_boot: int = 1000, seed: int = 0) -> tuple[float, float]:
    rng = np.random.default_rng(seed)
    means = credit[rng.integers(len(credit), size=(n_boot, len(credit)))].mean(axis=1)
    return float(np.quantile(means, 0.025)), float(np.quantile(means, 0.975))


def score_negation(negated_scores: np.ndarray, affirmative_scores: np.ndarray, correct) -> NegationScore:
    """Accuracy on both variants of the same items, their gap and 95% bootstrap CIs."""
    neg = mcq_correct(negated_scores, correct)
    aff = mcq_correct(affirmative_scores, correct)
    if neg.shape != aff.shape or neg.size == 0:
        raise InterpError(f"negated and affirmative scores must cover the same non-empty items, "
                          f"got {neg.size} and {aff.size}")
    return NegationScore(float(neg.mean()), float(aff.mean()), float(aff.mean() - neg.mean()), int(neg.size),
                         _bootstrap_ci(neg), _bootstrap_ci(aff))


def mcq_prompt(item: MCQItem, variant: str) -> str:
    """Phantom-style LVLM prompt: "question : {q} a : {opt} b : ... d : {opt} answer :";
    the target is the lowercase letter (`item.correct_answer.lower()`)."""
    return mcq_prompt_spans(item, variant)[0]


def mcq_prompt_spans(item: MCQItem, variant: str) -> tuple[str, dict[str, tuple[int, int]]]:
    """`mcq_prompt` and its [start, end) character spans: `question` (its text),
    `option_a`..`option_d` (the option texts) and `answer` (the final ":")."""
    prompt = f"question : {item.question}"
    spans = {"question": (len("question : "), len(prompt))}
    for letter, option in zip(LETTERS, item.choices(variant)):
        prompt += f" {letter.lower()} : "
        spans[f"option_{letter.lower()}"] = (len(prompt), len(prompt) + len(option))
        prompt += option
    prompt += " answer :"
    spans["answer"] = (len(prompt) - 1, len(prompt))
    return prompt, spans


@dataclass
class MCQDataset:
    """A benchmark as VQA-style items, with the interface of the other `load_dataset` data
    sets: per MCQ item one item per variant (kind ``mcq-negation`` / ``mcq-affirmative``, answer and
    target the correct letter lowercased). ``item.image`` indexes the phantoms
    (``specs``) or the image files (``paths``); ``image(i)`` is float [H, W] in [0, 1]."""

    bench: NegationBenchmark
    name: str
    items: list[VQAItem]
    paths: list[Path] = field(default_factory=list)  # empty for phantom benchmarks

    @property
    def specs(self) -> list[PhantomSpec]:
        return self.bench.specs or []

    @property
    def hash(self) -> str:
        """sha256 over the benchmark, the items and the bytes of the image files they use."""
        h = hashlib.sha256(self.bench.hash.encode())
        h.update(json.dumps([asdict(it) for it in self.items], sort_keys=True).encode())
        for i in sorted({it.image for it in self.items} if self.paths else ()):
            h.update(self.paths[i].read_bytes())
        return h.hexdigest()

    def image(self, i: int) -> np.ndarray:
        return load_image(self.paths[i]) if self.paths else self.bench.dataset().image(i)


def mcq_dataset(bench: NegationBenchmark, name: str) -> MCQDataset:
    """`bench` as an `MCQDataset`; a file benchmark's image files must all exist."""
    files = [bench.image_path(i).resolve() for i in range(len(bench))] if bench.specs is None else []
    paths = {p: k for k, p in enumerate(dict.fromkeys(files))}
    missing = [p for p in paths if not p.is_file()]
    if missing:
        raise InterpError(f"benchmark {name}: image {missing[0]} not found ({len(missing)} of {len(paths)} missing)")
    items = []
    for i, it in enumerate(bench.items):
        image = paths[files[i]] if files else int(it.image)
        key = it.study_id if it.subject_id == it.study_id else f"{it.subject_id}-{it.study_id}"
        letter = it.correct_answer.lower()
        for variant in VARIANTS:
            prompt, spans = mcq_prompt_spans(it, variant)
            items.append(VQAItem(id=f"{key}-{variant}", image=image, kind=f"mcq-{variant}", finding="",
                                 mode="direct", prompt=prompt, target=letter, answer=letter, spans=spans))
    if len({it.id for it in items}) != len(items):
        raise InterpError(f"benchmark {name}: a (subject_id, study_id) appears twice")
    return MCQDataset(bench, name, items, list(paths))


# ---------------------------------------------------------------------------------------
# contextual claims

ATTRIBUTES = ("presence", "laterality", "zone", "severity")
NEGATION_CUES = ("no", "not", "without")
_CUE_RE = re.compile(r"\b(no|not|without)\b")


@dataclass(frozen=True)
class Claim:
    """A true/false statement about image `image`; `value` is the asserted attribute
    value (side, zone, severity; None for presence). Spans are [start, end) into `text`."""

    id: str
    image: int
    finding: str
    attribute: str
    value: str | None
    negated: bool
    text: str
    label: bool
    spans: dict[str, tuple[int, int]]

    def __post_init__(self) -> None:
        cues = list(_CUE_RE.finditer(self.text))
        if self.negated and not cues:
            raise InterpError(f"negated claim has no negation cue ({', '.join(NEGATION_CUES)}): {self.text!r}")
        if not self.negated and cues:
            raise InterpError(f"positive claim contains negation cue {cues[0].group()!r}: {self.text!r}")
        if self.attribute not in ATTRIBUTES:
            raise InterpError(f"unknown attribute {self.attribute!r}; valid: {', '.join(ATTRIBUTES)}")
        if "finding" not in self.spans or (self.negated and "negation_cue" not in self.spans):
            raise InterpError(f"claim {self.id}: needs spans 'finding'{' and negation_cue' if self.negated else ''}")
        if self.negated:
            s, e = self.spans["negation_cue"]
            if self.text[s:e] not in NEGATION_CUES:
                raise InterpError(f"claim {self.id}: negation_cue span {self.text[s:e]!r} is not a cue")

    def prompt(self) -> tuple[str, dict[str, tuple[int, int]]]:
        """The VQA statement prompt ("statement : {text} true or false ? answer :") and
        the spans shifted into it (plus `question` and `answer`)."""
        head = "statement : "
        body = f"{self.text} true or false ?"
        p = f"{head}{body} answer :"
        spans = {k: (s + len(head), e + len(head)) for k, (s, e) in self.spans.items()}
        spans["question"] = (len(head), len(head) + len(body))
        spans["answer"] = (len(p) - 1, len(p))
        return p, spans


def _claim(image: int, name: str, attribute: str, value: str | None, negated: bool, label: bool) -> Claim:
    f = FINDING_WORDS[name]
    if attribute == "presence":
        text = f"there is {'no' if negated else 'a'} {f} ."
    elif attribute == "laterality":
        text = f"there is {'no' if negated else 'a'} {f} on the {value} ."
    elif attribute == "zone":
        text = f"the {f} is {'not ' if negated else ''}in the {value} zone ."
    else:
        text = f"the {f} is {'not ' if negated else ''}{value} ."
    at = text.index(f)
    spans = {"finding": (at, at + len(f))}
    if negated:
        m = _CUE_RE.search(text)
        if m:
            spans["negation_cue"] = (m.start(), m.end())
    cid = f"{image:05d}-{name}-{attribute}{'-' + value if value else ''}-{'neg' if negated else 'pos'}"
    return Claim(cid, image, name, attribute, value, negated, text, label, spans)


def _truth(spec: PhantomSpec, name: str, attribute: str, value: str | None) -> bool | None:
    """Whether the positive claim holds; None where it presupposes a (single) finding that is not there."""
    inst = [f for f in spec.findings if f.name == name]
    if attribute == "presence":
        return bool(inst)
    if attribute == "laterality":
        return any(f.side == value for f in inst)
    if len(inst) != 1:
        return None
    return (inst[0].zone if attribute == "zone" else inst[0].severity) == value


def _values(name: str, attribute: str) -> tuple[str | None, ...] | None:
    if attribute == "presence":
        return (None,)
    if attribute == "laterality":
        return SIDES if name != "cardiomegaly" else None
    if attribute == "zone":
        return ZONES if name in ZONE_FINDINGS else None
    return SEVERITIES


def contextual_claims(
    data: VQADataset | Sequence[PhantomSpec], seed: int = 0, *, exhaustive: bool = False,
) -> list[Claim]:
    """Positive/negated claim pairs per image and finding.

    For each image, finding and attribute (presence; laterality for all but cardiomegaly;
    zone for consolidation and nodule; severity) one asserted value is drawn from `seed`:
    the true one with probability 1/2, else a wrong one, so the positive labels are
    balanced (`exhaustive=True`: every value). Zone and severity claims presuppose the
    finding ("the nodule is not large ."), so they are made only where it is present
    once. Presence claims are made for every finding of every image; laterality claims
    ("there is no pleural effusion on the left .", existential: true iff no instance is
    on that side) only where the finding is present (absent findings are covered by the
    presence claims, and would make the negated laterality claims mostly true). The
    negated claim's label is the negation of the positive one's.
    """
    specs = list(data.specs) if isinstance(data, VQADataset) else list(data)
    if not specs:
        raise InterpError("no phantom specs to make claims about")
    if not all(isinstance(s, PhantomSpec) for s in specs):
        raise InterpError("contextual_claims takes a VQADataset or a list of PhantomSpec")
    claims = []
    for i, spec in enumerate(specs):
        rng = np.random.default_rng([seed, 5, i])
        for name in FINDINGS:
            for attribute in ATTRIBUTES:
                values = _values(name, attribute)
                if values is None or (attribute == "laterality" and not spec.has(name)):
                    continue
                truths = {v: _truth(spec, name, attribute, v) for v in values}
                if any(t is None for t in truths.values()):
                    continue
                if not exhaustive and len(values) > 1:
                    want = bool(rng.random() < 0.5)
                    pool = [v for v in values if truths[v] == want] or list(values)
                    values = (pool[rng.integers(len(pool))],)
                for v in values:
                    for negated in (False, True):
                        claims.append(_claim(i, name, attribute, v, negated, truths[v] != negated))
    return claims
