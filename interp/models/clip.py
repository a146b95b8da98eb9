"""Dual encoders (CLIP, SigLIP): an adapter over the site grammar, and the CLIP model organism.

**Adapter** (``ClipAdapter``) for transformers ``CLIPModel`` and ``SiglipModel``. Sites, in
execution order (probed once at load with plain forward hooks, so vision-first or
text-first models both work):
``vision.embed``, ``vision.blocks.{l}.{resid_pre,attn.pattern,attn.out,mlp.out,resid_post}``,
``vision.pooled`` (image embedding after projection / pooling head, before normalisation),
``text.embed``, ``text.blocks.{l}.*``, ``text.pooled`` (text embedding after projection).
A ``Batch`` pairs one image with one text per row; ``run`` returns ``logits_per_image``
[b, b] and ``readout`` its diagonal [b, 1]: each row's own image-text logit
(logit_scale * cos, + logit_bias for SigLIP), so ``restore_sweep`` works with a metric
such as ``lambda z: z[:, 0] - foil_logit``. Text positions index the text tower's
sequence; vision positions (``vision_positions()``) are CLS (CLIP only) + patches.

**Organism**: a small ``CLIPModel`` (text tower over the word-level tokenizer with <bos>/<eos>
added by its post-processor, as a real CLIP tokenizer does; vision tower 64x64 grey,
patch 8), trained on phantoms with report-style captions by ``python -m
interp.models.train_clip`` and shipped under ``interp/models/weights/clip``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from transformers import CLIPConfig, CLIPModel, CLIPProcessor, PreTrainedTokenizerFast

from interp import sites as S
from interp.errors import InterpError
from interp.models.adapter import Batch, Hook, HookedAdapter, Positions, block_hooks, grid_positions, right_pad
from interp.models.lvlm import Frame, ImageInputs, fixed_size_frame, identity_resize_kwargs, image_arrays, load_processor
from interp.models.organism import IMAGE_SIZE, PATCH_SIZE, WEIGHTS_DIR, image_processor
from interp.models.tokenizer import word_tokenizer

CLIP_DIR = WEIGHTS_DIR / "clip"
TOWERS = ("vision", "text")


class ClipAdapter(ImageInputs, HookedAdapter):
    """Dual encoders (transformers ``CLIPModel``, ``SiglipModel``) over the site grammar."""

    towers = TOWERS

    def __init__(self, model: torch.nn.Module, processor, model_id: str) -> None:
        cfg = model.config
        if cfg.model_type not in ("clip", "siglip"):
            raise InterpError(f"ClipAdapter takes CLIPModel or SiglipModel, got model_type {cfg.model_type!r}")
        self.name = cfg.model_type
        self.model = model.eval()
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.model_id = model_id
        self.vision_config, self.text_config = cfg.vision_config, cfg.text_config
        side = self.vision_config.image_size // self.vision_config.patch_size
        self.grid = (side, side)
        self.n_patches = side * side
        self.has_cls = self.name == "clip"  # SigLIP has no class token: patches only, pooled by a MAP head
        self.max_len = self.text_config.max_position_embeddings
        self.eos_token_id = getattr(self.text_config, "eos_token_id", None)
        if self.name == "clip":
            self.embed_dims = {"text": cfg.projection_dim, "vision": cfg.projection_dim}
        else:
            self.embed_dims = {"text": getattr(self.text_config, "projection_size", None) or self.text_config.hidden_size,
                               "vision": self.vision_config.hidden_size}
        self._attach(self._site_map())
        self.validate()

    # --- sites -------------------------------------------------------------------------
    def _site_map(self) -> dict[str, Hook]:
        """Sites in execution order, found by running a dummy input once with plain hooks."""
        pooled = ({"vision": "visual_projection", "text": "text_projection"} if self.name == "clip"
                  else {"vision": "vision_model.head", "text": "text_model.head"})
        groups: dict[str, dict[str, Hook]] = {}
        for tower, root, cfg in (("vision", "vision_model", self.vision_config), ("text", "text_model", self.text_config)):
            hooks = {f"{tower}.embed": Hook(f"{root}.embeddings")}
            hooks.update(block_hooks(tower, f"{root}.encoder.layers", cfg.num_hidden_layers))
            hooks[f"{tower}.pooled"] = Hook(pooled[tower])
            groups[tower] = hooks
        hooks = {**groups["vision"], **groups["text"]}
        order = self._probe_order(set(hooks.values()))
        names = list(hooks)
        return {n: hooks[n] for n in sorted(names, key=lambda n: (order[hooks[n]], names.index(n)))}

    def _probe_order(self, hooks: set[Hook]) -> dict[Hook, int]:
        events: dict[tuple[str, str], int] = {}
        handles = []
        try:
            def note(key: tuple[str, str]):
                def hook(*_) -> None:  # returns None: the module's inputs and outputs are untouched
                    events.setdefault(key, len(events))
                return hook

            for module in sorted({h.module for h in hooks}):
                m = self.model.get_submodule(module)
                handles.append(m.register_forward_pre_hook(note((module, "input"))))
                handles.append(m.register_forward_hook(note((module, "output"))))
            with torch.no_grad():
                self.model(**self._dummy().model_inputs())
        except Exception as e:
            raise InterpError(f"site map of {self.model_id} does not run: {(str(e) or type(e).__name__).splitlines()[0]}") from e
        finally:
            for h in handles:
                h.remove()
        missing = [h for h in hooks if (h.module, h.io) not in events]
        if missing:
            raise InterpError(f"site map of {self.model_id} does not run: module {missing[0].module!r} is never called")
        return {h: events[(h.module, h.io)] for h in hooks}

    def _dummy(self) -> Batch:
        size = self.vision_config.image_size
        img = np.random.default_rng(0).random((size, size), dtype=np.float32)
        return self.encode([img], ["a"])

    def validate(self) -> None:
        """nnterp-style load check: every site has the shape ``site_shape`` gives, each block's resid_pre
        is the previous block's resid_post, and the pooled sites reproduce the model's logit."""
        batch = self._dummy()
        self._check_sites(batch)
        logits, cache = self.run(batch, read=["vision.pooled", "text.pooled"])
        want = self.logit(cache["vision.pooled"], cache["text.pooled"])
        if not torch.allclose(self.readout(logits, batch)[:, 0], want, atol=1e-4, rtol=1e-4):
            raise InterpError(f"pooled sites of {self.model_id} do not reproduce its logits: wrong hook module?")

    @classmethod
    def from_pretrained(cls, src: str | Path, model_id: str, *, device: str = "cpu", trust_remote_code: bool = False):
        """A CLIP/SigLIP checkpoint folder (:func:`~interp.models.registry.load_weights`, its own processor)."""
        from transformers import AutoModel

        from interp.models.registry import load_weights

        model = load_weights(AutoModel, src, model_id, device=device, trust_remote_code=trust_remote_code)
        return cls(model, load_processor(src, model_id, trust_remote_code), model_id)

    def processor_kwargs(self, image: np.ndarray) -> dict:
        return identity_resize_kwargs(self.image_processor, image)

    def site_shape(self, site: str, seq_len: int) -> tuple[int, ...]:
        """Shape of one sample's value at ``site`` for a text sequence of ``seq_len`` tokens."""
        s = S.parse(self.expand_sites([site])[0])
        if s.point == "pooled":
            return (self.embed_dims[s.tower],)
        cfg = self.vision_config if s.tower == "vision" else self.text_config
        n = self.n_patches + self.has_cls if s.tower == "vision" else seq_len
        return (cfg.num_attention_heads, n, n) if s.point == "attn.pattern" else (n, cfg.hidden_size)

    def vision_positions(self, batch: Batch | None = None) -> list[Positions]:
        """Per row, the vision tower's sequence: the CLS token (CLIP only), then patches in row-major
        order, with boxes in the input image's pixels (model pixels without a batch)."""
        side, p = self.vision_config.image_size, self.vision_config.patch_size
        frames = batch.frames if batch is not None and batch.frames else [Frame((side, side))]
        return [grid_positions(*self.grid, lambda r, c, f=f: f.cell(r, c, p, p), cls=self.has_cls) for f in frames]


    # --- inputs ------------------------------------------------------------------------
    def encode(
        self,
        images: Sequence[np.ndarray],
        texts: Sequence[str],
        spans: Sequence[Mapping[str, tuple[int, int]]] | None = None,
        responses: Sequence[str] | None = None,
    ) -> Batch:
        """One image and one text per row. Texts are tokenized with the tokenizer's own special
        tokens (CLIP: <bos> ... <eos>), right-padded to the longest (SigLIP: to the model's
        ``max_position_embeddings`` with a mask of ones, as SigLIP was trained).

        ``spans`` are character spans into each text; they become named position lists. ``eot``
        (the position the text tower pools) and ``sot`` (a leading special token) are added.
        """
        if responses is not None:
            raise InterpError(f"{self.model_id} is a dual encoder: it scores image-text pairs and generates no response")
        if len(images) != len(texts) or not texts:
            raise InterpError(f"need one image per text and at least one: got {len(images)} images, {len(texts)} texts")
        spans = spans or [{} for _ in texts]
        if len(spans) != len(texts):
            raise InterpError(f"need one span dict per text: got {len(spans)} for {len(texts)} texts")
        tok = self.tokenizer
        enc = tok(list(texts), add_special_tokens=True, return_offsets_mapping=True, return_special_tokens_mask=True)
        legacy_eos = self.name == "clip" and self.eos_token_id == 2  # CLIP then pools at argmax(input_ids)
        positions, seqs = [], []
        for text, ids, offsets, special, sp in zip(texts, enc["input_ids"], enc["offset_mapping"], enc["special_tokens_mask"], spans):
            if len(ids) > self.max_len:
                raise InterpError(f"text has {len(ids)} tokens, the text tower takes at most {self.max_len}: {text[:60]!r}")
            named = {}
            for name, (a, b) in sp.items():
                if not 0 <= a < b <= len(text):
                    raise InterpError(f"span {name!r} = ({a}, {b}) is outside the text {text!r}")
                named[name] = [i for i, (s, e) in enumerate(offsets) if not special[i] and s < b and e > a]
            if special and special[0]:
                named["sot"] = [0]
            if self.name == "clip" and not legacy_eos:
                if self.eos_token_id not in ids:
                    raise InterpError(f"text has no end token (id {self.eos_token_id}), where CLIP pools: {text[:60]!r}")
                named["eot"] = [ids.index(self.eos_token_id)]
            elif self.name == "clip":
                named["eot"] = [int(np.argmax(ids))]
            seqs.append(list(ids))
            positions.append(Positions(
                ["special" if s else "text" for s in special], [-1] * len(ids), [-1] * len(ids),
                tok.convert_ids_to_tokens(list(ids)), named,
            ))
        width = self.max_len if self.name == "siglip" else max(map(len, seqs))
        pad_id = tok.pad_token_id if tok.pad_token_id is not None else 0
        input_ids, mask = right_pad(seqs, positions, width, pad_id, tok.pad_token or "<pad>")
        if self.name == "siglip":
            for p in positions:
                p.spans["eot"] = [width - 1]  # SigLIP pools the last position
        if self.name == "siglip":
            mask = torch.ones_like(mask)
        arrays = image_arrays(images, self.channels)
        return Batch({"input_ids": input_ids, "attention_mask": mask, "pixel_values": self.pixels(arrays)}, positions,
                     frames=[fixed_size_frame(self.image_processor, a) for a in arrays])

    # --- execution ---------------------------------------------------------------------
    def _check_run(self, batch: Batch, names: list[str]) -> None:
        if batch.inputs_embeds is not None:
            raise InterpError("dual encoders take input_ids and pixel_values, not inputs_embeds")

    def _trace_output(self):
        """``run`` returns ``logits_per_image`` [b, b] (image i vs text j)."""
        return self.nn.output.logits_per_image.save()

    def readout(self, outputs: torch.Tensor, batch: Batch) -> torch.Tensor:
        """Each row's own image-text logit [rows, 1]: the diagonal of ``logits_per_image``."""
        return outputs.diagonal()[:, None]

    # --- embeddings (plain forward, no hooks): scoring and retrieval -------------------
    def logit(self, image_embeds: torch.Tensor, text_embeds: torch.Tensor) -> torch.Tensor:
        """Row-wise logit of unnormalised pooled embeddings [b, d] x [b, d] -> [b]."""
        cos = F.cosine_similarity(image_embeds.float(), text_embeds.float(), dim=-1)
        out = cos * self.model.logit_scale.exp().float()
        return out + self.model.logit_bias.float() if self.name == "siglip" else out

    @torch.no_grad()
    def image_embeds(self, images: Sequence[np.ndarray], batch_size: int = 256) -> torch.Tensor:
        """L2-normalised image embeddings [n, d]."""
        out = [self.model.get_image_features(pixel_values=self.pixels(images[i : i + batch_size]))
               for i in range(0, len(images), batch_size)]
        return F.normalize(torch.cat([_pooled(o) for o in out]).float(), dim=-1)

    @torch.no_grad()
    def text_embeds(self, texts: Sequence[str], batch_size: int = 512) -> torch.Tensor:
        """L2-normalised text embeddings [n, d]."""
        out = []
        dummy = [np.zeros((2, 2), np.float32)]
        for i in range(0, len(texts), batch_size):
            chunk = list(texts[i : i + batch_size])
            b = self.encode(dummy * len(chunk), chunk)
            out.append(_pooled(self.model.get_text_features(input_ids=b.input_ids, attention_mask=b.attention_mask)))
        return F.normalize(torch.cat(out).float(), dim=-1)

    def similarity(self, image_embeds: torch.Tensor, text_embeds: torch.Tensor) -> torch.Tensor:
        """Logits [n_images, n_texts] from normalised embeddings (logit_scale * cos [+ bias])."""
        out = image_embeds @ text_embeds.T * self.model.logit_scale.exp().float()
        return out + self.model.logit_bias.float() if self.name == "siglip" else out


def _pooled(out) -> torch.Tensor:
    return out if isinstance(out, torch.Tensor) else out.pooler_output


# ---------------------------------------------------------------------------------------
# the organism


def caption_words() -> list[str]:
    """Every word of the organism's captions and benchmark options, plus the VQA vocabulary."""
    from interp.data.negation import PHANTOM_BANK, QUESTIONS
    from interp.data.vqa import vocabulary

    words = set(vocabulary()) | set(QUESTIONS["phantom"].split()) | {"."}
    for p in PHANTOM_BANK.values():
        words.update(f"{p.positive} {p.negated} {p.affirmative}".split())
    return sorted(words)


def clip_tokenizer(words: Sequence[str] | None = None) -> PreTrainedTokenizerFast:
    """Word-level tokenizer that wraps every text in <bos> ... <eos> (CLIP pools at <eos>)."""
    from tokenizers.processors import TemplateProcessing

    tok = word_tokenizer(caption_words() if words is None else words)
    bos, eos = tok.bos_token, tok.eos_token
    tok.backend_tokenizer.post_processor = TemplateProcessing(
        single=f"{bos} $A {eos}", special_tokens=[(bos, tok.bos_token_id), (eos, tok.eos_token_id)]
    )
    return tok


def clip_config(vocab_size: int, *, d_text: int = 64, n_text: int = 4, d_vision: int = 64, n_vision: int = 4,
                d_embed: int = 64, max_len: int = 48) -> CLIPConfig:
    """Config of the CLIP organism (pad 0, bos 2, eos 3: the word tokenizer's ids)."""
    text = dict(hidden_size=d_text, intermediate_size=4 * d_text, num_hidden_layers=n_text, num_attention_heads=4,
                vocab_size=vocab_size, max_position_embeddings=max_len, pad_token_id=0, bos_token_id=2, eos_token_id=3)
    vision = dict(hidden_size=d_vision, intermediate_size=4 * d_vision, num_hidden_layers=n_vision,
                  num_attention_heads=4, image_size=IMAGE_SIZE, patch_size=PATCH_SIZE, num_channels=1)
    return CLIPConfig(text_config=text, vision_config=vision, projection_dim=d_embed)


def build_clip_organism(seed: int = 0, **sizes: int) -> tuple[CLIPModel, PreTrainedTokenizerFast]:
    """A freshly initialised (untrained) CLIP organism and its tokenizer, deterministic in ``seed``. It seeds
    torch's global generator on purpose: it is the first step of a seeded training run, whose later draws follow."""
    tok = clip_tokenizer()
    torch.manual_seed(seed)
    model = CLIPModel(clip_config(len(tok), **sizes))
    model.set_attn_implementation("eager")
    return model.eval(), tok


def clip_processor(tokenizer: PreTrainedTokenizerFast, size: int = IMAGE_SIZE) -> CLIPProcessor:
    """The CLIP organism's processor: grey ``size`` x ``size`` images, the organism's normalisation."""
    return CLIPProcessor(image_processor=image_processor(size), tokenizer=tokenizer)


def save_clip_organism(model: CLIPModel, tokenizer: PreTrainedTokenizerFast, path: str | Path = CLIP_DIR) -> Path:
    """Save as a real checkpoint folder: safetensors + config + processor (image processor + tokenizer)."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path, safe_serialization=True)
    clip_processor(tokenizer).save_pretrained(path)
    return path
