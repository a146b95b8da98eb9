"""The attribution protocol (Captum-style): every method is ``method.attribute(sample, target) -> Attribution``.

A :class:`Sample` is an image in its own pixel frame plus a prompt; the *target* is the response to
explain (the model's own greedy response when not given: one word in direct mode, the whole chain in
step-by-step mode). Every method scores the response the same way - the sum of its tokens'
log-probabilities under teacher forcing (:class:`Scorer`) - and returns an :class:`Attribution`: a
map in the input image's pixels (image-token scores are painted through each token's box, pixel
gradients are mapped back through the processor's transform, so maps, boxes and masks line up for
every family), per-response-token scores where the method defines them, and per-concept scores.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar, Mapping, Protocol, Sequence, runtime_checkable

import numpy as np
import torch

from interp.errors import InterpError
from interp.models.adapter import Adapter, Batch, Box, Edit, Positions
from interp.models.lvlm import Frame

MAX_NEW_TOKENS = 48


@dataclass(frozen=True)
class Sample:
    """One question about one image: ``image`` [H, W] or [H, W, C] in [0, 1], in its own pixel frame."""

    image: np.ndarray
    prompt: str
    spans: Mapping[str, tuple[int, int]] = field(default_factory=dict)
    id: str = ""


@dataclass
class Attribution:
    """What every method returns.

    ``map`` [H, W]: evidence per pixel of the sample's image (larger = more evidence for the response);
    ``tokens`` [n]: per response token (``token_text``) where the method defines it, else None;
    ``concepts``: per-concept scores where defined; ``region``: a method's chosen region, where it
    chooses one (MedFocus, prompting); ``meta``: method settings and by-products.
    """

    method: str
    map: np.ndarray
    response: str
    token_text: list[str]
    tokens: np.ndarray | None = None
    concepts: dict[str, float] = field(default_factory=dict)
    region: np.ndarray | None = None
    meta: dict[str, Any] = field(default_factory=dict)


@runtime_checkable
class AttributionMethod(Protocol):
    """The one call every attribution method offers."""

    name: str

    def attribute(self, sample: Sample, target: str | None = None) -> Attribution: ...


def is_lvlm(adapter: Adapter) -> bool:
    return "lm" in adapter.towers


@torch.no_grad()
def respond(adapter: Adapter, sample: Sample, max_new_tokens: int = MAX_NEW_TOKENS) -> str:
    """The model's greedy response to ``sample`` (teacher-forced re-encoding each step, so it uses the
    adapter alone). Stops at an end-of-sequence token, after the word that follows ``answer :`` (the
    step-by-step chain's end), or after one word when the prompt itself ends with ``answer :``."""
    from interp.data.vqa import CHAIN_END

    tok = adapter.tokenizer
    words: list[str] = []
    direct = sample.prompt.rstrip().endswith(CHAIN_END)
    for _ in range(max_new_tokens):
        batch = adapter.encode([sample.image], [sample.prompt], [sample.spans], [" ".join(words)] if words else None)
        logits, _ = adapter.run(batch)
        last = int(batch.attention_mask[0].sum()) - 1
        nxt = int(logits[0, last].argmax())
        if nxt == tok.eos_token_id:
            break
        words.append(tok.decode([nxt]).strip())
        if direct or " ".join(words[-3:-1]) == CHAIN_END:
            break
    if not words:
        raise InterpError(f"{adapter.model_id} gave an empty response to {sample.prompt!r}")
    return " ".join(words)


class Scorer:
    """Teacher-forced scoring of one response: per response token, its log-probability [rows, n].

    ``batch`` is the one-row teacher-forced batch; ``run`` scores it (or rows of it with other pixel
    values / edits), differentiably when asked.
    """

    def __init__(self, adapter: Adapter, sample: Sample, response: str) -> None:
        if not is_lvlm(adapter):
            raise InterpError(f"attribution explains a generated response: {adapter.model_id} has no language model")
        self.adapter, self.sample, self.response = adapter, sample, response
        self.batch = adapter.encode([sample.image], [sample.prompt], [sample.spans], [response])
        at = torch.tensor(self.batch.positions[0].span("response"))
        self.targets = self.batch.input_ids[0, at]
        self.predict_at = at - 1  # logits at position p predict token p + 1
        self.token_text = [self.batch.positions[0].tokens[int(i)] for i in at]
        self.image_index = self.batch.positions[0].span("image")

    @property
    def positions(self) -> Positions:
        return self.batch.positions[0]

    def token_logp(self, logits: torch.Tensor) -> torch.Tensor:
        """[rows, seq, vocab] logits -> [rows, n] log-probabilities of the response tokens."""
        lp = torch.log_softmax(logits[:, self.predict_at].double(), -1)
        return lp.gather(-1, self.targets.to(lp.device)[None, :, None].expand(len(lp), -1, 1))[..., 0]

    def rows(self, k: int, pixel_values: torch.Tensor | None = None) -> Batch:
        """``k`` copies of the batch, optionally with other ``pixel_values`` [k, ...]."""
        batch = self.batch.take([0] * k)
        if pixel_values is not None:
            batch.inputs["pixel_values"] = pixel_values
        return batch

    def run(self, batch: Batch | None = None, *, read: Sequence[str] | str = (), edit: Mapping[str, Edit] | None = None,
            grad: bool = False) -> tuple[torch.Tensor, Any]:
        """(token log-probs [rows, n], cache) of ``batch`` (default: the one-row batch)."""
        batch = self.batch if batch is None else batch
        logits, cache = self.adapter.run(batch, read=read, edit=edit, grad=grad)
        return self.token_logp(logits), cache

    def total(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Sum of response log-probs per row of ``pixel_values`` [k, ...] (the scalar Captum attributes)."""
        logp, _ = self.run(self.rows(len(pixel_values), pixel_values), grad=torch.is_grad_enabled())
        return logp.sum(-1)


def box_pixels(box: Box) -> tuple[slice, slice]:
    """The (rows, cols) slices of the pixels a box (input pixels, end-exclusive, maybe fractional) touches."""
    return slice(int(np.floor(box[0])), int(np.ceil(box[2]))), slice(int(np.floor(box[1])), int(np.ceil(box[3])))


def paint(scores: np.ndarray | torch.Tensor, positions: Positions, index: Sequence[int], shape: tuple[int, int]) -> np.ndarray:
    """Scores of tokens ``index`` -> [H, W] map: each pixel gets the mean score of the tokens whose box
    covers it (views of a tiled image overlap: their scores average); uncovered pixels get 0."""
    scores = np.asarray(torch.as_tensor(scores).detach().double().cpu())
    total, count = np.zeros(shape), np.zeros(shape)
    for s, i in zip(scores, index):
        box = positions.boxes[i]
        if box is None:
            continue
        at = box_pixels(box)
        total[at] += s
        count[at] += 1
    return np.divide(total, count, out=np.zeros(shape), where=count > 0)


def to_image_frame(model_map: np.ndarray, frame: Any, shape: tuple[int, int]) -> np.ndarray:
    """A map over the model's input pixels [h, w] -> the sample image's pixels [H, W], through the
    processor's resize-and-crop (:class:`~interp.models.lvlm.Frame`), by nearest model pixel."""
    if not isinstance(frame, Frame):
        raise InterpError(f"pixel-space attribution needs a single-view processor transform, not {type(frame).__name__} "
                          "(tiled or packed images): use a token-space method")
    h, w = model_map.shape
    ys = np.clip(np.floor((np.arange(shape[0]) + 0.5) * frame.sy - frame.oy).astype(int), 0, h - 1)
    xs = np.clip(np.floor((np.arange(shape[1]) + 0.5) * frame.sx - frame.ox).astype(int), 0, w - 1)
    return model_map[np.ix_(ys, xs)]


def pixel_map(attr: torch.Tensor, scorer: Scorer) -> np.ndarray:
    """Attributions on ``pixel_values`` [1, C, h, w] -> [H, W] in the sample's pixels (summed over channels)."""
    if attr.dim() != 4:
        raise InterpError(f"pixel-space attribution needs pixel values [rows, C, h, w], got {tuple(attr.shape)}: "
                          "use a token-space method for this family")
    return to_image_frame(attr[0].sum(0).detach().double().cpu().numpy(), scorer.batch.frames[0], scorer.sample.image.shape[:2])


class Method:
    """Shared plumbing: ``attribute`` resolves the target response and builds the :class:`Scorer`;
    subclasses implement ``_attribute(scorer) -> Attribution``."""

    name: ClassVar[str] = ""

    def __init__(self, adapter: Adapter) -> None:
        if not is_lvlm(adapter):
            raise InterpError(f"{self.name}: {adapter.model_id} has no language model to explain")
        self.adapter = adapter

    def attribute(self, sample: Sample, target: str | None = None) -> Attribution:
        response = respond(self.adapter, sample) if target is None else target
        return self._attribute(Scorer(self.adapter, sample, response))

    def _attribute(self, scorer: Scorer) -> Attribution:  # pragma: no cover - per method
        raise NotImplementedError

    def result(self, scorer: Scorer, image_map: np.ndarray, **kw: Any) -> Attribution:
        return Attribution(self.name, image_map, scorer.response, scorer.token_text, **kw)

    def token_map(self, scorer: Scorer, scores: np.ndarray | torch.Tensor, **kw: Any) -> Attribution:
        """An attribution from one score per LM image token."""
        return self.result(scorer, paint(scores, scorer.positions, scorer.image_index, scorer.sample.image.shape[:2]), **kw)
