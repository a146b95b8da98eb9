"""Processor-driven inputs shared by every family: the family's own HF processor and chat template
build the batch, so a real checkpoint gets exactly the inputs it was trained on.

``ProcessorAdapter`` (LVLMs) asks its family for three things: the site map, ``image_regions``
(which part of the input image each LM image token covers) and ``vision_positions``. Images
enter as float arrays in [0, 1] ([H, W] grey or [H, W, C]); they are given to the processor
with ``do_rescale=False`` (they are already in [0, 1]) and as many channels as it normalises.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch

from interp import sites as S
from interp.errors import InterpError
from interp.models.adapter import Batch, Box, HookedAdapter, Positions


@dataclass(frozen=True)
class Frame:
    """The processor's geometric transform of one image: input pixel (y, x) -> model pixel
    (y * sy - oy, x * sx - ox) (a resize, then a crop at offset (oy, ox)); ``size`` = input (H, W)."""

    size: tuple[int, int]
    sy: float = 1.0
    sx: float = 1.0
    oy: float = 0.0
    ox: float = 0.0

    @classmethod
    def resize(cls, size: tuple[int, int], to: tuple[int, int], crop: tuple[int, int] | None = None) -> Frame:
        """Resize (H, W) -> ``to`` then an optional centre crop to ``crop``."""
        (h, w), (rh, rw) = size, to
        oy, ox = ((rh - crop[0]) // 2, (rw - crop[1]) // 2) if crop else (0, 0)
        return cls(size, rh / h, rw / w, oy, ox)

    def box(self, y0: float, x0: float, y1: float, x1: float) -> Box:
        """A model-frame box -> input-image pixels, clipped to the image."""
        h, w = self.size
        return (max(0.0, (y0 + self.oy) / self.sy), max(0.0, (x0 + self.ox) / self.sx),
                min(float(h), (y1 + self.oy) / self.sy), min(float(w), (x1 + self.ox) / self.sx))

    def cell(self, r: int, c: int, ph: float, pw: float, y: float = 0.0, x: float = 0.0) -> Box:
        """Grid cell (r, c) of ``ph`` x ``pw`` model pixels whose grid starts at model pixel (y, x)."""
        return self.box(y + r * ph, x + c * pw, y + (r + 1) * ph, x + (c + 1) * pw)


def fixed_size_frame(ip, image: np.ndarray) -> Frame:
    """The transform of a CLIP-style image processor: resize (shortest edge, or to a fixed size), then
    an optional centre crop."""
    h, w = image.shape[:2]
    size = ip.size
    if "shortest_edge" in size:
        s = size["shortest_edge"]
        to = (s, int(s * w / h)) if h <= w else (int(s * h / w), s)
    else:
        to = (size["height"], size["width"])
    crop = (ip.crop_size["height"], ip.crop_size["width"]) if getattr(ip, "do_center_crop", False) else None
    return Frame.resize((h, w), to, crop)


def identity_resize_kwargs(ip, image: np.ndarray) -> dict:
    """Processor arguments that skip a resize (and centre crop) which would leave ``image``'s size
    unchanged: PIL's resize would only quantise it to 8 bits. For fixed-size processors (CLIP-style)."""
    size, (h, w) = getattr(ip, "size", None) or {}, image.shape[:2]
    if "shortest_edge" in size:
        same = min(h, w) == size["shortest_edge"]
    elif "height" in size:
        same = (h, w) == (size["height"], size["width"])
    else:
        return {}
    crop = getattr(ip, "do_center_crop", False)
    if not same or crop and (h, w) != (ip.crop_size["height"], ip.crop_size["width"]):
        return {}
    return {"do_resize": False, **({"do_center_crop": False} if crop else {})}


def image_arrays(images: Sequence[np.ndarray], channels: int) -> list[np.ndarray]:
    """Float [H, W] / [H, W, C] images in [0, 1] -> float32 [H, W, channels] (grey repeated)."""
    out = []
    for img in images:
        a = np.asarray(img, dtype=np.float32)
        if a.ndim == 3 and a.shape[-1] in (1, 3):
            a = a.mean(-1) if a.shape[-1] != channels else a
        if a.ndim == 2:
            a = np.repeat(a[..., None], channels, axis=-1)
        if a.ndim != 3 or a.shape[-1] != channels or min(a.shape[:2]) < 1:
            raise InterpError(f"wrong image shape {np.shape(img)}: expected a grey [H, W] or [H, W, {channels}] image")
        out.append(a)
    return out


class ImageInputs:
    """Pixels through the family's own image processor."""

    processor: Any

    @property
    def image_processor(self):
        return self.processor.image_processor

    @property
    def channels(self) -> int:
        mean = getattr(self.image_processor, "image_mean", None)
        return len(mean) if isinstance(mean, (list, tuple)) else 3

    def processor_kwargs(self, image: np.ndarray) -> dict:
        """Extra processor arguments for one image (per family; e.g. skip a resize to the same size,
        which PIL would quantise to 8 bits)."""
        return {}

    def _images(self, images: Sequence[np.ndarray]) -> tuple[list[np.ndarray], list[dict]]:
        """Images as the processor takes them, and per image the processor arguments."""
        arrays = image_arrays(images, self.channels)
        base = {"do_rescale": False, "input_data_format": "channels_last"}
        return arrays, [{**base, **self.processor_kwargs(a)} for a in arrays]

    def pixels(self, images: Sequence[np.ndarray]) -> torch.Tensor:
        """Images -> ``pixel_values`` exactly as the processor makes them (one call per run of rows
        that share processor arguments, so a row's pixels do not depend on its batch)."""
        arrays, kws = self._images(images)
        out = []
        try:
            for lo, hi in _runs(kws):
                out.append(self.image_processor(images=arrays[lo:hi], return_tensors="pt", **kws[lo])["pixel_values"])
        except Exception as e:  # processors raise ValueError/TypeError/... for images they cannot take
            raise InterpError(f"the image processor of {self.model_id} rejected the image: {str(e).splitlines()[0]}") from None
        return torch.cat(out).to(self.model.dtype)


def _runs(kws: list[dict]) -> list[tuple[int, int]]:
    """[lo, hi) runs of equal consecutive entries."""
    bounds = [0] + [i for i in range(1, len(kws)) if kws[i] != kws[i - 1]] + [len(kws)]
    return list(zip(bounds[:-1], bounds[1:]))


def _merge(parts: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """Concatenate processor outputs of consecutive rows; token-aligned tensors right-padded
    (``input_ids`` with the pad id, masks and the rest with 0). Used only for fixed-size image
    processors, whose other outputs are batch-first with equal shapes."""
    width = max(p["input_ids"].shape[1] for p in parts)
    out = {}
    for k in parts[0]:
        vals = []
        for p in parts:
            v = p[k]
            if v.dim() >= 2 and v.shape[1] == p["input_ids"].shape[1] and k != "pixel_values":
                v = torch.nn.functional.pad(v, (0, 0) * (v.dim() - 2) + (0, width - v.shape[1]),
                                            value=pad_id if k == "input_ids" else 0)
            vals.append(v)
        out[k] = torch.cat(vals)
    return out


class ProcessorAdapter(ImageInputs, HookedAdapter):
    """LVLMs (vision tower -> connector -> causal LM) whose inputs come from their processor.

    Families set ``towers``, ``model_class`` and define ``_site_map``, ``image_regions``,
    ``vision_positions`` and ``site_shape``; ``template`` may be overridden (default: the
    processor's chat template, one image then the prompt, generation prompt added).
    """

    towers = ("vision", "lm")
    model_class: Any = None

    def __init__(self, model: torch.nn.Module, processor: Any, model_id: str) -> None:
        self.model = model.eval()
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.model_id = model_id
        self.config = model.config
        self._attach(self._site_map())
        self.validate()

    @classmethod
    def from_pretrained(cls, src: str | Path, model_id: str, *, device: str = "cpu", trust_remote_code: bool = False):
        """Weights (:func:`~interp.models.registry.load_weights`) and the folder's own processor."""
        from interp.models.registry import load_weights

        model = load_weights(cls.model_class, src, model_id, device=device, trust_remote_code=trust_remote_code)
        return cls(model, load_processor(src, model_id, trust_remote_code), model_id)

    # --- per family --------------------------------------------------------------------
    def _site_map(self) -> dict:  # pragma: no cover - per family
        raise NotImplementedError

    def image_token_ids(self) -> set[int]:
        """Ids of the LM tokens that carry image features."""
        return {self.config.image_token_id}

    def image_regions(self, batch: Batch, row: int) -> list[tuple[int, int, Box | None, str]]:  # pragma: no cover
        """(grid row, grid col, input-pixel box or None, group) of each LM image token of ``row``, in order."""
        raise NotImplementedError

    def frame(self, image: np.ndarray, inputs: Mapping[str, torch.Tensor], row: int) -> Any:
        """What ``image_regions`` needs to know about row ``row``'s image (default: its size)."""
        return Frame(tuple(image.shape[:2]))

    def processor_images(self, arrays: list[np.ndarray]) -> list:
        """The ``images`` argument of the processor for one image per row (per family: some processors
        want a list per row)."""
        return arrays

    def template(self, prompt: str) -> str:
        """The text the processor gets for one image and ``prompt``: the family's chat template."""
        if not getattr(self.processor, "chat_template", None):
            raise InterpError(f"{self.model_id} has no chat template in its processor: save one with the checkpoint")
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
        return self.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)

    def validate(self) -> None:
        """nnterp-style load check on a random image: every site has the shape ``site_shape`` gives and
        each block's resid_pre is the previous block's resid_post; InterpError names the first broken site."""
        rng = np.random.default_rng(0)
        self._check_sites(self.encode([rng.random((32, 32), dtype=np.float32)], ["a"]))

    def vision_tokens(self) -> int:  # pragma: no cover - per family
        """Tokens of one vision-tower sequence (one image, or one view of a tiled image; CLS included)."""
        raise NotImplementedError

    def projector_tokens(self) -> int:  # pragma: no cover - per family
        """Connector output tokens per image (or view)."""
        raise NotImplementedError

    def site_shape(self, site: str, seq_len: int) -> tuple[int, ...]:
        """Shape of one sample's value at ``site`` (vision and projector: one image's or view's) for an
        LM sequence of ``seq_len``."""
        s = S.parse(self.expand_sites([site])[0])
        if s.tower == "projector":
            return (self.projector_tokens(), self.text_config.hidden_size)
        if s.tower == "vision":
            return block_site_shape(s.point, self.vision_tokens(), self.vision_config)
        return block_site_shape(s.point, seq_len, self.text_config)

    # --- contract ----------------------------------------------------------------------
    def readout(self, logits: torch.Tensor, batch: Batch) -> torch.Tensor:
        """What metrics read: each row's next-token logits at its answer position [rows, vocab]."""
        return logits[torch.arange(len(batch)), batch.answer_index.to(logits.device)]

    def _trace_output(self):
        """``run`` returns the logits [b, s, vocab]."""
        return self.nn.output.logits.save()

    def encode(
        self,
        images: Sequence[np.ndarray],
        prompts: Sequence[str],
        spans: Sequence[Mapping[str, tuple[int, int]]] | None = None,
        responses: Sequence[str] | None = None,
    ) -> Batch:
        """One image and one prompt per row, through the processor and chat template; right-padded.

        ``spans`` are character spans into each prompt; they become named position lists, with
        ``image`` added for the LM's image tokens. ``responses`` (teacher forcing) are appended after
        each templated prompt (a space between them where neither has one); their tokens form the
        ``response`` span.
        """
        if len(images) != len(prompts) or not prompts:
            raise InterpError(f"need one image per prompt and at least one: got {len(images)} images, {len(prompts)} prompts")
        spans = spans or [{} for _ in prompts]
        if len(spans) != len(prompts):
            raise InterpError(f"need one span dict per prompt: got {len(spans)} for {len(prompts)} prompts")
        arrays, kws = self._images(images)
        texts = [self.template(p) for p in prompts]
        if responses is not None:
            if len(responses) != len(prompts):
                raise InterpError(f"need one response per prompt: got {len(responses)} for {len(prompts)} prompts")
            texts = [t + (" " if r and not r[0].isspace() and not t[-1:].isspace() else "") + r
                     for t, r in zip(texts, responses)]
        tok = self.tokenizer
        side, tok.padding_side = tok.padding_side, "right"
        try:  # one call per run of rows sharing processor arguments, so a row does not depend on its batch
            parts = [{k: v for k, v in self.processor(images=self.processor_images(arrays[lo:hi]), text=texts[lo:hi], return_tensors="pt",
                                                      padding=True, **kws[lo]).items() if isinstance(v, torch.Tensor)}
                     for lo, hi in _runs(kws)]
        except Exception as e:  # processors raise ValueError/TypeError/... for inputs they cannot take
            raise InterpError(f"the processor of {self.model_id} rejected the input: {str(e).splitlines()[0]}") from None
        finally:
            tok.padding_side = side
        inputs = parts[0] if len(parts) == 1 else _merge(parts, tok.pad_token_id or 0)
        if inputs.get("pixel_values") is not None and inputs["pixel_values"].is_floating_point():
            inputs["pixel_values"] = inputs["pixel_values"].to(self.model.dtype)
        batch = Batch(inputs, [], ragged=self.ragged(inputs))
        batch.frames = [self.frame(a, inputs, i) for i, a in enumerate(arrays)]
        image_ids = self.image_token_ids()
        # tokens marked special in the vocabulary count too (Gemma's <start_of_turn> is not in all_special_ids)
        special = set(tok.all_special_ids) | {i for i, t in tok.added_tokens_decoder.items() if t.special}
        for i, (prompt, sp) in enumerate(zip(prompts, spans)):
            ids, mask = inputs["input_ids"][i].tolist(), inputs["attention_mask"][i].tolist()
            kinds = ["pad" if not m else "image" if t in image_ids else "special" if t in special else "text"
                     for t, m in zip(ids, mask)]
            p = Positions(kinds, [-1] * len(ids), [-1] * len(ids), tok.convert_ids_to_tokens(ids))
            batch.positions.append(p)
            at = [j for j, k in enumerate(kinds) if k == "image"]
            regions = self.image_regions(batch, i)
            if len(regions) != len(at):
                raise InterpError(f"{self.model_id}: {len(at)} image tokens in the sequence but the processor's "
                                  f"transform gives {len(regions)} image regions")
            for j, (r, c, box, group) in zip(at, regions):
                p.rows[j], p.cols[j], p.boxes[j], p.groups[j] = r, c, box, group
                if box is None:
                    p.kinds[j] = "query"
            p.spans = {"image": at, **prompt_spans(tok, ids, prompt, sp)}
            if responses is not None and responses[i].strip():
                p.spans["response"] = response_span(tok, ids, sum(mask), responses[i], self.model_id)
        return batch

    def ragged(self, inputs: Mapping[str, torch.Tensor]) -> dict[str, list[int]]:
        """Inputs whose first dimension is not the batch (per family)."""
        return {}


def block_site_shape(point: str, n: int, cfg) -> tuple[int, ...]:
    """Shape of a tower's site over ``n`` positions: attention weights [heads, n, n], logits [n, vocab],
    everything else [n, hidden]."""
    if point == "logits":
        return (n, cfg.vocab_size)
    return (cfg.num_attention_heads, n, n) if point == "attn.pattern" else (n, cfg.hidden_size)


def response_span(tok, ids: list[int], length: int, response: str, model_id: str) -> list[int]:
    """Positions of ``response``'s tokens: the last ones of the row's ``length`` real tokens."""
    own = tok(response.strip(), add_special_tokens=False)["input_ids"]
    if tok.unk_token_id is not None and tok.unk_token_id in own:
        raise InterpError(f"{model_id}: the response {response[:40]!r} has tokens its tokenizer does not know")
    at = list(range(length - len(own), length))
    if not own or ids[at[0]:length] != own:
        raise InterpError(f"{model_id}: the response {response[:40]!r} does not tokenize the same after the prompt "
                          "(a token merged across the boundary)")
    return at


def prompt_spans(tok, ids: list[int], prompt: str, spans: Mapping[str, tuple[int, int]]) -> dict[str, list[int]]:
    """Character spans of ``prompt`` -> positions in ``ids`` (the templated sequence), by finding the
    prompt's own tokens in it (the last occurrence; a first token merged with its context may differ)."""
    if not spans:
        return {}
    for name, (a, b) in spans.items():
        if not 0 <= a < b <= len(prompt):
            raise InterpError(f"span {name!r} = ({a}, {b}) is outside the prompt {prompt!r}")
    enc = tok(prompt, add_special_tokens=False, return_offsets_mapping=True)
    own, offsets = enc["input_ids"], enc["offset_mapping"]
    for drop in (0, 1):
        sub = own[drop:]
        starts = [s for s in range(len(ids) - len(sub), -1, -1) if sub and ids[s:s + len(sub)] == sub]
        if starts:
            base = starts[0] - drop
            return {name: [base + k for k, (s, e) in enumerate(offsets) if s < b and e > a and base + k >= 0]
                    for name, (a, b) in spans.items()}
    raise InterpError(f"cannot find the prompt's tokens in the templated sequence: {prompt[:60]!r}")


def load_processor(src: str | Path, model_id: str, trust_remote_code: bool = False):
    """The checkpoint's own processor (image processor + tokenizer + chat template); PIL image backend."""
    from transformers import AutoProcessor

    try:
        return AutoProcessor.from_pretrained(src, trust_remote_code=trust_remote_code, backend="pil")
    except Exception as e:  # missing or broken processor files: OSError, ValueError, KeyError, ...
        raise InterpError(f"no usable processor in {model_id}: {str(e).splitlines()[0][:200]} "
                          "(save the processor with the checkpoint: processor.save_pretrained)") from None
