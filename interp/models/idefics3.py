"""Idefics3 (transformers ``Idefics3ForConditionalGeneration``) and SmolVLM (``SmolVLMForConditionalGeneration``,
the same design): SigLIP-style vision tower, connector (pixel shuffle by ``scale_factor`` then a linear
projection), Llama LM.

Module tree (both): ``model.vision_model.{embeddings, encoder.layers.{l}, post_layernorm}``,
``model.connector`` (``pixel_shuffle`` + ``modality_projection``), ``model.text_model.layers.{l}``, ``lm_head``.
Sites, in execution order: ``vision.embed``, ``vision.blocks.{l}.*``, ``projector.out`` (connector output),
``lm.embed`` (the LM's input after image features are merged), ``lm.blocks.{l}.*``, ``lm.logits``.

Views. The image processor resizes the longest edge to ``size["longest_edge"]``; with
``do_image_splitting`` it then resizes both sides up to multiples of ``M = max_image_size["longest_edge"]``
and, if that is larger than M x M, cuts M x M tiles (row-major) and appends a *global* view (the whole image
resized to M x M); otherwise (or without splitting) the image becomes one M x M global view. Each view runs
through the vision tower as its own sequence, so **vision sites are [views, patches, d]**: the views of every
row concatenated in row order (tiles row-major, then global), with the model's all-zero padding views
dropped; ``views(batch)`` lists (row, group) for each, and ``vision_positions(batch)`` types each view's
patches (one :class:`Positions` per view, same order). ``projector.out`` is [views, patches / s^2, d_lm]: the
connector's pixel shuffle makes one LM token of each s x s block of patches (token k of a view covers
patches rows s*(k // g) .. +s, cols s*(k % g) .. +s, with g = side / s). LM image tokens (only ``<image>``)
carry group ``tile r,c`` (0-based) or ``global`` and their cell on that view's shuffled g x g grid; their
boxes are mapped back through the resize and tiling to input-image pixels. ``<fake_token_around_image>``,
``<global-img>`` and ``<row_i_col_j>`` are special or text tokens.

Caveat of the HF model: a view whose normalised pixels are all exactly 0 (e.g. a uniform image at the
processor's mean) is taken for padding and dropped; ``encode`` refuses such images.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from transformers import Idefics3ForConditionalGeneration, SmolVLMForConditionalGeneration

from interp.errors import InterpError
from interp.models.adapter import Batch, Box, Hook, Positions, block_hooks, grid_positions
from interp.models.lvlm import Frame, ProcessorAdapter
from interp.models.seeds import isolated_rng


@dataclass(frozen=True)
class TiledFrame:
    """The processor's transform of one image into views: ``views[k] = (group, frame)`` in the processor's
    (and the LM's) order; each frame maps input pixels into that view's M x M model pixels."""

    size: tuple[int, int]
    views: tuple[tuple[str, Frame], ...]


def _edge(size, key: str = "longest_edge"):
    """``size[key]`` for a dict or a SizeDict (None when absent)."""
    return size.get(key) if isinstance(size, dict) else getattr(size, key, None)


def tiled_frame(ip, h: int, w: int) -> TiledFrame:
    """The views an Idefics3/SmolVLM PIL image processor ``ip`` makes of an (h, w) image (its arithmetic, replayed)."""
    from transformers.models.idefics3.image_processing_pil_idefics3 import (
        MAX_IMAGE_SIZE, _resize_output_size_rescale_to_max_len, _resize_output_size_scale_below_upper_bound)

    m = _edge(ip.max_image_size)
    h1, w1 = h, w
    if ip.do_resize:
        if _edge(ip.size):
            h1, w1 = _resize_output_size_rescale_to_max_len(h, w, max_len=_edge(ip.size))
            h1, w1 = _resize_output_size_scale_below_upper_bound(h1, w1, max_len=MAX_IMAGE_SIZE)
        else:
            h1, w1 = _edge(ip.size, "height"), _edge(ip.size, "width")
    whole = Frame.resize((h, w), (m, m))
    if not ip.do_image_splitting:
        return TiledFrame((h, w), (("global", whole),))
    # resize_for_vision_encoder: both sides up to multiples of m
    if w1 >= h1:
        w2 = math.ceil(w1 / m) * m
        h2 = math.ceil(int(w2 / (w1 / h1)) / m) * m
    else:
        h2 = math.ceil(h1 / m) * m
        w2 = math.ceil(int(h2 * (w1 / h1)) / m) * m
    if h2 <= m and w2 <= m:
        return TiledFrame((h, w), (("global", whole),))
    big = Frame.resize((h, w), (h2, w2))
    tiles = tuple((f"tile {r},{c}", Frame((h, w), big.sy, big.sx, r * m, c * m))
                  for r in range((h2 - m) // m + 1) for c in range((w2 - m) // m + 1))
    return TiledFrame((h, w), (*tiles, ("global", whole)))


class Idefics3Adapter(ProcessorAdapter):
    """Idefics3 checkpoints (e.g. HuggingFaceM4/Idefics3-8B-Llama3)."""

    name = "idefics3"
    model_class = Idefics3ForConditionalGeneration
    vision_batched = False  # vision sites are [views, patches, d] over all rows' tiles and global views

    def __init__(self, model: torch.nn.Module, processor, model_id: str) -> None:
        cfg = model.config
        self.vision_config, self.text_config = cfg.vision_config, cfg.text_config
        self.patch, self.scale = self.vision_config.patch_size, cfg.scale_factor
        self.side = self.vision_config.image_size // self.patch  # patches per side of a view
        if self.side % self.scale:
            raise InterpError(f"{model_id}: {self.side} patches per side is not a multiple of scale_factor {self.scale}")
        self.n_patches = self.side * self.side
        self.n_tokens = self.n_patches // self.scale**2  # LM tokens per view
        m = _edge(processor.image_processor.max_image_size)
        if m != self.vision_config.image_size or processor.image_seq_len != self.n_tokens:
            raise InterpError(f"{model_id}: processor views of {m} px / {processor.image_seq_len} tokens do not match "
                              f"the vision tower's {self.vision_config.image_size} px / {self.n_tokens} tokens")
        super().__init__(model, processor, model_id)

    def _site_map(self) -> dict[str, Hook]:
        hooks: dict[str, Hook] = {"vision.embed": Hook("model.vision_model.embeddings")}
        hooks.update(block_hooks("vision", "model.vision_model.encoder.layers", self.vision_config.num_hidden_layers))
        hooks["projector.out"] = Hook("model.connector")
        hooks["lm.embed"] = Hook("model.text_model.layers.0", "input")
        hooks.update(block_hooks("lm", "model.text_model.layers", self.text_config.num_hidden_layers))
        hooks["lm.logits"] = Hook("lm_head")
        return hooks

    def vision_tokens(self) -> int:
        return self.n_patches

    def projector_tokens(self) -> int:
        return self.n_tokens

    # --- geometry ----------------------------------------------------------------------
    def frame(self, image: np.ndarray, inputs, row: int) -> TiledFrame:
        """The row's views (resize, then tiles + global or one global view), checked against ``pixel_values``."""
        frame = tiled_frame(self.image_processor, *image.shape[:2])
        pv = inputs.get("pixel_values")
        if pv is not None:
            real = int(self._real_views(pv[row : row + 1]).sum())
            if real != len(frame.views):
                raise InterpError(f"{self.model_id}: row {row}'s image gives {real} non-zero views but the processor's "
                                  f"transform {len(frame.views)} (a view all 0 after normalisation is dropped by the "
                                  "model as padding: shift the image's intensities)")
        return frame

    @staticmethod
    def _real_views(pixel_values: torch.Tensor) -> torch.Tensor:
        """[rows, views] bool: the views the model keeps (it drops all-zero padding views)."""
        b, n = pixel_values.shape[:2]
        return pixel_values.reshape(b, n, -1).ne(0).any(-1)

    def views(self, batch: Batch) -> list[tuple[int, str]]:
        """(row, group) of each view the vision tower runs, in its order (the first dim of vision sites)."""
        real = self._real_views(batch.pixel_values).tolist()
        out = []
        for row, (keep, f) in enumerate(zip(real, batch.frames)):
            groups = [g for g, _ in f.views]
            if sum(keep) != len(groups):
                raise InterpError(f"row {row} has {sum(keep)} views in pixel_values but {len(groups)} in its frame")
            out += [(row, g) for g in groups]
        return out

    def image_regions(self, batch: Batch, row: int) -> list[tuple[int, int, Box | None, str]]:
        """Each view's g x g shuffled grid, row-major, views in processor order (tiles row-major, then global)."""
        g, px = self.side // self.scale, self.patch * self.scale
        return [(r, c, f.cell(r, c, px, px), group)
                for group, f in batch.frames[row].views for r in range(g) for c in range(g)]

    def vision_positions(self, batch: Batch | None = None) -> list[Positions]:
        """One :class:`Positions` per view the vision tower runs (see ``views``): its side x side patches
        row-major, no CLS. Without a batch: one global view, boxes in the model's input pixels."""
        if batch is None:
            m = self.vision_config.image_size
            views = [("global", Frame((m, m)))]
        else:
            self.views(batch)  # checks frames against pixel_values
            views = [v for f in batch.frames for v in f.views]
        return [grid_positions(self.side, self.side, lambda r, c, f=f: f.cell(r, c, self.patch, self.patch),
                               cls=False, group=group) for group, f in views]


class SmolVLMAdapter(Idefics3Adapter):
    """SmolVLM checkpoints (e.g. HuggingFaceTB/SmolVLM-256M-Instruct): Idefics3's design, image processor and
    image-token layout (their ``SmolVLMProcessor`` needs the ``num2words`` package)."""

    name = "smolvlm"
    model_class = SmolVLMForConditionalGeneration


# --- tiny checkpoints ----------------------------------------------------------------------
IDEFICS3_TOKENS = ("<fake_token_around_image>", "<global-img>", "<end_of_utterance>",
                   *[f"<row_{i}_col_{j}>" for i in range(1, 7) for j in range(1, 7)])

# Idefics3's chat template (the real one opens with <|begin_of_text|>: here the tokenizer's bos)
IDEFICS3_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{{ message['role'] | capitalize }}"
    "{% if message['content'][0]['type'] == 'image' %}{{ ':' }}{% else %}{{ ': ' }}{% endif %}"
    "{% for line in message['content'] %}{% if line['type'] == 'text' %}{{ line['text'] }}"
    "{% elif line['type'] == 'image' %}{{ '<image>' }}{% endif %}{% endfor %}<end_of_utterance>\n{% endfor %}"
    "{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)


@isolated_rng
def tiny_idefics3(seed: int = 0, kind: str = "idefics3"):
    """(model, processor) of the Idefics3 (or SmolVLM) layout at toy size: vision 2 x 32 (32 px views, patch 8),
    scale_factor 2 (4 LM tokens per view), Llama 2 x 32; images resized to longest edge 64, then split into
    32 px tiles + a global view. The processor is always ``Idefics3Processor``: ``SmolVLMProcessor`` needs
    ``num2words`` and a video processor, and expands images into the same tokens."""
    from transformers import Idefics3Config, Idefics3Processor, LlamaConfig, SmolVLMConfig
    from transformers.models.idefics3.image_processing_pil_idefics3 import Idefics3ImageProcessorPil

    from interp.models.tiny import TINY_WORDS
    from interp.models.tokenizer import word_tokenizer

    tok = word_tokenizer([*TINY_WORDS, "User:", "Assistant:", *IDEFICS3_TOKENS])
    tok.add_tokens([t for t in IDEFICS3_TOKENS if t != "<end_of_utterance>"])  # split out of "<a><b>" runs
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=32,
                  patch_size=8)
    text = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                       num_key_value_heads=2, vocab_size=len(tok), max_position_embeddings=256,
                       bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    config_class, model_class = ((Idefics3Config, Idefics3ForConditionalGeneration) if kind == "idefics3"
                                 else (SmolVLMConfig, SmolVLMForConditionalGeneration))
    cfg = config_class(vision_config=vision, text_config=text.to_dict(), scale_factor=2,
                       image_token_id=tok.convert_tokens_to_ids("<image>"), pad_token_id=tok.pad_token_id)
    torch.manual_seed(seed)
    model = model_class(cfg).eval()
    # mean != 0.5: a mid-grey image must not normalise to an all-zero view (the model would drop it as padding)
    ip = Idefics3ImageProcessorPil(size={"longest_edge": 64}, max_image_size={"longest_edge": 32},
                                   image_mean=[0.48, 0.46, 0.41], image_std=[0.27, 0.26, 0.28])
    return model, Idefics3Processor(image_processor=ip, tokenizer=tok, image_seq_len=4, chat_template=IDEFICS3_TEMPLATE)


def save_tiny_idefics3(path: str | Path, seed: int = 0, kind: str = "idefics3") -> Path:
    """The tiny Idefics3 (or SmolVLM: ``kind="smolvlm"``, with an Idefics3Processor) of :func:`tiny_idefics3`,
    saved like a hub checkpoint (safetensors + processor)."""
    from interp.models.tiny import save

    return save(*tiny_idefics3(seed, kind), path)
