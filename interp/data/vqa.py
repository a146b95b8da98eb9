"""VQA items and true/false statements about phantoms, in direct and step-by-step modes.

Texts are lowercase with words and punctuation separated by single spaces (the organisms
use a whitespace word-level tokenizer). Direct mode: the prompt ends with "answer :" and
the target is one word. Step-by-step (`cot`) mode: the prompt ends with "steps :" and the
target is a short chain about what THIS image shows, ending with "answer : {word}".
Negated and positive statements differ in exactly one token ("no" / "a"): minimal pairs
for activation patching. Spans are character ranges [start, end) into the prompt.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Iterable

import numpy as np

from interp.data.phantom import (
    CONFOUNDED_FINDING,
    FINDINGS,
    SEVERITIES,
    SIDES,
    ZONE_FINDINGS,
    ZONES,
    Anatomy,
    Finding,
    Phantom,
    PhantomSpec,
    render,
    sample_spec,
)
from interp.errors import InterpError

ALL_KINDS = ("presence", "laterality", "zone", "negated", "positive", "affirmative")
MODES = ("direct", "cot")
SPLITS = ("train", "val", "test")
CHAIN_END = "answer :"
FORMAT_VERSION = 1
# words of the negation benchmark's prompts (option letters) and contextual claims (severity, "not")
EXTRA_WORDS = ("b", "c", "d", "not", *SEVERITIES)

FINDING_WORDS = {
    "pleural_effusion": "pleural effusion",
    "pneumothorax": "pneumothorax",
    "consolidation": "consolidation",
    "nodule": "nodule",
    "cardiomegaly": "cardiomegaly",
}
#: affirmative rewrite of "there is no {finding}", without any negation word
AFFIRMATIVE = {
    "pleural_effusion": "the costophrenic angles are sharp",
    "pneumothorax": "the lungs are fully expanded",
    "consolidation": "the lungs are well aerated",
    "nodule": "the lung fields are clear of nodules",
    "cardiomegaly": "the heart size is normal",
}
#: per finding: (region inspected, observation if present, observation if absent)
_CHAIN = {
    "pleural_effusion": ("the costophrenic angles", "the {side} angle is blunted", "the angles are sharp"),
    "pneumothorax": ("the lung apices", "the {side} apex shows a pleural line", "the lungs are fully expanded"),
    "consolidation": ("the lung fields", "there is an opacity in the {side} {zone} zone", "the lung fields are clear"),
    "nodule": ("the lung fields", "there is a round opacity in the {side} {zone} zone", "there is no round opacity"),
    "cardiomegaly": ("the heart", "the heart is enlarged", "the heart size is normal"),
}
_QUESTION = {
    "presence": "is there a {f} ?",
    "laterality": "which side is the {f} on ?",
    "zone": "which zone is the {f} in ?",
}
_STATEMENT = {
    "negated": "there is no {f} .",
    "positive": "there is a {f} .",
    "affirmative": "{f} .",
}


@dataclass
class VQAItem:
    """One prompt/target pair about image `image` of its data set."""

    id: str
    image: int
    kind: str
    finding: str
    mode: str
    prompt: str
    target: str
    answer: str
    spans: dict[str, tuple[int, int]]


def _answer(kind: str, f: Finding | None) -> str:
    present = f is not None
    return {
        "presence": "yes" if present else "no",
        "laterality": f.side if f else "",
        "zone": f.zone if f else "",
        "negated": "false" if present else "true",
        "positive": "true" if present else "false",
        "affirmative": "false" if present else "true",
    }[kind]


def _applicable(kind: str, name: str, f: Finding | None) -> bool:
    if kind == "laterality":
        return f is not None and f.side is not None
    if kind == "zone":
        return f is not None and name in ZONE_FINDINGS
    return True


def _item(image: int, split: str, kind: str, name: str, mode: str, f: Finding | None) -> VQAItem:
    words = AFFIRMATIVE[name] if kind == "affirmative" else FINDING_WORDS[name]
    head = "question : " if kind in _QUESTION else "statement : "
    body = (_QUESTION.get(kind) or _STATEMENT[kind] + " true or false ?").format(f=words)
    tail = " answer :" if mode == "direct" else " steps :"
    prompt = head + body + tail
    start = len(head)
    f_at = prompt.index(words, start)
    spans = {
        "question": (start, start + len(body)),
        "finding": (f_at, f_at + len(words)),
        "answer": (len(prompt) - 1, len(prompt)),
    }
    if kind == "negated":
        cue = prompt.index(" no ", start) + 1
        spans["negation_cue"] = (cue, cue + 2)
    answer = _answer(kind, f)
    target = answer if mode == "direct" else f"{_chain(name, kind, f)} {CHAIN_END} {answer}"
    return VQAItem(
        id=f"{split}-{image:05d}-{kind}-{name}-{mode}", image=image, kind=kind, finding=name,
        mode=mode, prompt=prompt, target=target, answer=answer, spans=spans,
    )


def _chain(name: str, kind: str, f: Finding | None) -> str:
    region, seen, clear = _CHAIN[name]
    obs = seen.format(side=f.side, zone=f.zone) if f else clear
    chain = f"look at {region} . {obs} ."
    if kind in _STATEMENT:
        chain += f" so the {FINDING_WORDS[name]} is {'present' if f else 'absent'} ."
    return chain


def items_for(image: int, split: str, spec: PhantomSpec, kinds: Iterable[str], modes: Iterable[str]) -> list[VQAItem]:
    """Every item of ``kinds`` x ``modes`` about image ``image`` (its ``spec``), findings in order."""
    out = []
    for kind in kinds:
        for name in FINDINGS:
            f = spec.get(name)
            if _applicable(kind, name, f):
                out.extend(_item(image, split, kind, name, mode, f) for mode in modes)
    return out


def question(kind: str, finding: str, mode: str = "direct") -> VQAItem:
    """The prompt (and spans) asking ``kind`` about ``finding``, for any image (no answer)."""
    _check("kinds", [kind], ALL_KINDS), _check("findings", [finding], FINDINGS), _check("modes", [mode], MODES)
    return replace(_item(0, "any", kind, finding, mode, None), id=f"{kind}-{finding}-{mode}", image=-1, answer="", target="")


def split_target(text: str) -> str:
    """The answer word of a (direct or step-by-step) generation: the word after the last
    "answer :", or the whole stripped text when there is none."""
    text = text.strip()
    at = text.rfind(CHAIN_END)
    if at < 0:
        return text
    rest = text[at + len(CHAIN_END):].split()
    if not rest:
        raise InterpError(f"no answer word after {CHAIN_END!r} in {text!r}")
    return rest[0]


def vocabulary() -> list[str]:
    """Every word any prompt or target can contain (sorted)."""
    anatomy = Anatomy()
    specs = [PhantomSpec(anatomy)]
    for name in FINDINGS:
        if name == "cardiomegaly":
            specs.append(PhantomSpec(anatomy, (Finding(name, None, None, "small"),)))
            continue
        zones = ("lower",) if name == "pleural_effusion" else ("upper",) if name == "pneumothorax" else ZONES
        specs += [PhantomSpec(anatomy, (Finding(name, s, z, "small"),)) for s in SIDES for z in zones]
    words = set(EXTRA_WORDS)
    for spec in specs:
        for it in items_for(0, "train", spec, ALL_KINDS, MODES):
            words.update(it.prompt.split())
            words.update(it.target.split())
    return sorted(words)


def _check(what: str, got: Iterable[str] | None, valid: tuple[str, ...]) -> tuple[str, ...]:
    if got is None:
        return valid
    got = (got,) if isinstance(got, str) else tuple(got)
    bad = [g for g in got if g not in valid]
    if bad:
        raise InterpError(f"unknown {what} {bad}; valid: {', '.join(valid)}")
    return got


@dataclass
class VQADataset:
    """Phantom specs plus the items asked about them; images are rendered from seeds."""

    seed: int
    split: str
    image_size: int
    specs: list[PhantomSpec]
    items: list[VQAItem]
    config: dict = field(default_factory=dict)  # build parameters, kept for provenance

    def __len__(self) -> int:
        return len(self.items)

    @property
    def name(self) -> str:
        return f"phantom-vqa-{self.split}-seed{self.seed}-n{len(self.specs)}"

    def image_seed(self, i: int) -> int:
        """Render seed of image `i` (distinct across splits)."""
        ss = np.random.SeedSequence([self.seed, SPLITS.index(self.split), i])
        return int(ss.generate_state(1)[0])

    def phantom(self, i: int) -> Phantom:
        if not 0 <= i < len(self.specs):
            raise InterpError(f"image index {i} out of range 0..{len(self.specs) - 1}")
        return render(self.specs[i], self.image_seed(i), self.image_size)

    def image(self, i: int) -> np.ndarray:
        return self.phantom(i).image

    def filter(self, kinds=None, modes=None, findings=None) -> VQADataset:
        """Same images, only the items of the given kinds, modes and findings."""
        k = _check("kinds", kinds, ALL_KINDS)
        m = _check("modes", modes, MODES)
        f = _check("findings", findings, FINDINGS)
        items = [it for it in self.items if it.kind in k and it.mode in m and it.finding in f]
        return VQADataset(self.seed, self.split, self.image_size, self.specs, items, dict(self.config))

    def to_dict(self) -> dict:
        return {
            "format": FORMAT_VERSION,
            "seed": self.seed,
            "split": self.split,
            "image_size": self.image_size,
            "config": self.config,
            "specs": [s.to_dict() for s in self.specs],
            "items": [{**asdict(it), "spans": {k: list(v) for k, v in it.spans.items()}} for it in self.items],
        }

    @property
    def hash(self) -> str:
        """sha256 of the canonical JSON (same build parameters -> same hash)."""
        text = json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(text.encode()).hexdigest()

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({**self.to_dict(), "hash": self.hash}, sort_keys=True))
        return path

    @classmethod
    def load(cls, path: str | Path) -> VQADataset:
        try:
            d = json.loads(Path(path).read_text())
            if d.get("format") != FORMAT_VERSION:
                raise InterpError(f"unsupported VQA data set format {d.get('format')!r} in {path}")
            ds = cls(
                seed=d["seed"], split=d["split"], image_size=d["image_size"],
                specs=[PhantomSpec.from_dict(s) for s in d["specs"]],
                items=[VQAItem(**{**it, "spans": {k: tuple(v) for k, v in it["spans"].items()}}) for it in d["items"]],
                config=d["config"],
            )
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            if isinstance(e, InterpError):
                raise
            raise InterpError(f"cannot load VQA data set {path}: {e!r}") from None
        if d.get("hash") != ds.hash:
            raise InterpError(f"VQA data set {path} is corrupt: hash mismatch")
        n = len(ds.specs)
        bad = next((it for it in ds.items if type(it.image) is not int or not 0 <= it.image < n), None)
        if bad is not None:
            raise InterpError(f"VQA data set {path}: item {bad.id} points at image {bad.image!r}, but the data set "
                              f"has {n} images")
        return ds


def build_vqa(
    n_images: int,
    seed: int,
    split: str = "train",
    *,
    kinds: Iterable[str] = ALL_KINDS,
    modes: Iterable[str] = MODES,
    image_size: int = 64,
    prevalence: float = 0.5,
    confounder_rate: float | None = None,
    confounded: str = CONFOUNDED_FINDING,
) -> VQADataset:
    """`n_images` random specs for `split`, with every applicable (kind, finding, mode) item.

    Splits draw from independent streams (`default_rng([seed, split_index])`), so they
    never share images. The chest tube follows finding `confounded` (see `sample_spec`);
    the config records it only when it is not the default, so older data sets keep their hash.
    """
    if n_images < 1:
        raise InterpError(f"empty data set: n_images must be >= 1, got {n_images}")
    split = _check("split", split, SPLITS)[0]
    kinds, modes = _check("kinds", kinds, ALL_KINDS), _check("modes", modes, MODES)
    rng = np.random.default_rng([seed, SPLITS.index(split)])
    specs = [sample_spec(rng, prevalence, confounder_rate, confounded) for _ in range(n_images)]
    items = [it for i, s in enumerate(specs) for it in items_for(i, split, s, kinds, modes)]
    config = {"kinds": list(kinds), "modes": list(modes), "prevalence": prevalence,
              "confounder_rate": confounder_rate}
    if confounded != CONFOUNDED_FINDING:
        config["confounded"] = confounded
    return VQADataset(seed, split, image_size, specs, items, config)
