"""LLaVA-NeXT (transformers ``LlavaNextForConditionalGeneration``): LLaVA with any-resolution tiling.

The image processor picks the best of ``image_grid_pinpoints`` for the image, resizes the image to fit
it (aspect kept), pads it (centred) to that size and cuts it into vision-size *tiles*; a *base* view is
the whole image resized (squashed) to the vision size. ``pixel_values`` is [batch, views, c, h, w]
(views = 1 + tiles, zero-padded to the batch's most) and ``image_sizes`` [batch, 2] (the input
(H, W)) travels with it: the model reads each row's number of views from it.

**Vision sites** run on every real view of every row, concatenated: [sum of the rows' views, 1 + patches,
d] (rows with equal pinpoints: [batch * views, ...]); ``vision_positions(batch)`` returns one
:class:`Positions` per view in that order (groups ``base`` / ``tile r,c``, boxes in the row's input
image). ``projector.out`` is [sum of views, patches, d] likewise.

**LM image tokens** of a row, in the order ``pack_image_features`` builds them: the base view's patches
(row-major, group ``base``, cell on the base grid), then the tiles' patches as one grid over the whole
tiled canvas, with the rows/columns that fall in the padding dropped (``unpad_image``), row-major,
each row followed by an ``image_newline`` token. Tile tokens carry their cell on the tiled canvas
(``rows``/``cols``) and group ``tile r,c``. Newline tokens have no region: they are
(-1, -1, None, ``newline``), which makes their kind ``query`` (learned, not a place in the image).
Only ``vision_feature_select_strategy="default"`` (CLS dropped) is supported.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from transformers import LlavaNextForConditionalGeneration
from transformers.image_processing_utils import select_best_resolution

from interp.errors import InterpError
from interp.models.adapter import Batch, Box, Positions, grid_positions
from interp.models.llava import LlavaAdapter
from interp.models.lvlm import Frame
from interp.models.seeds import isolated_rng


@dataclass(frozen=True)
class AnyResFrame:
    """One row's any-res transform: ``base`` maps the input image onto the base view; ``canvas`` onto
    the padded tiled canvas of ``tiles`` = (rows, cols) vision-size tiles; the LM keeps canvas feature
    rows ``keep_rows`` and columns ``keep_cols`` (half-open ranges) after unpadding."""

    size: tuple[int, int]
    base: Frame
    canvas: Frame
    tiles: tuple[int, int]
    keep_rows: tuple[int, int]
    keep_cols: tuple[int, int]


class LlavaNextAdapter(LlavaAdapter):
    """LLaVA-NeXT (LLaVA-1.6) models; same module tree and sites as LLaVA."""

    name = "llava_next"
    model_class = LlavaNextForConditionalGeneration
    vision_batched = False  # vision and projector sites are [sum of the rows' views, ...], not [rows, ...]

    def __init__(self, model: torch.nn.Module, processor, model_id: str) -> None:
        if model.config.vision_feature_select_strategy != "default":
            raise InterpError(f"{model_id}: LLaVA-NeXT with vision_feature_select_strategy "
                              f"{model.config.vision_feature_select_strategy!r} is not supported (only 'default')")
        self.side = model.config.vision_config.image_size  # a tile's and the base view's size in pixels
        super().__init__(model, processor, model_id)

    # --- geometry ----------------------------------------------------------------------
    def processor_kwargs(self, image: np.ndarray) -> dict:
        """None: the tiles are always resized by the processor, and one processor call per batch keeps
        ``pixel_values`` one [batch, views, ...] tensor."""
        return {}

    def frame(self, image: np.ndarray, inputs, row: int) -> AnyResFrame:
        """The processor's any-res transform (``get_image_patches``) and the model's unpadding."""
        h, w = (int(v) for v in inputs["image_sizes"][row].tolist())
        ip, s, p = self.image_processor, self.side, self.patch
        th, tw = select_best_resolution((h, w), ip.image_grid_pinpoints)
        if tw / w < th / h:  # get_patch_output_size: fit, aspect kept
            nh, nw = min(math.ceil(h * (tw / w)), th), tw
        else:
            nh, nw = th, min(math.ceil(w * (th / h)), tw)
        canvas = Frame((h, w), nh / h, nw / w, -((th - nh) // 2), -((tw - nw) // 2))
        rows, cols = th // s * (s // p), tw // s * (s // p)  # feature grid of the canvas (unpad_image)
        keep_rows, keep_cols = (0, rows), (0, cols)
        if w / h > cols / rows:
            pad = (rows - int(round(h * (cols / w), 7))) // 2
            keep_rows = (pad, rows - pad)
        else:
            pad = (cols - int(round(w * (rows / h), 7))) // 2
            keep_cols = (pad, cols - pad)
        return AnyResFrame((h, w), Frame.resize((h, w), (s, s)), canvas, (th // s, tw // s), keep_rows, keep_cols)

    def image_regions(self, batch: Batch, row: int) -> list[tuple[int, int, Box | None, str]]:
        """Base patches, then the unpadded tiled canvas row by row, each row closed by a newline token."""
        f: AnyResFrame = batch.frames[row]
        base = grid_positions(*self.grid, self._cell(f.base), cls=False, group="base")
        out = [(base.rows[i], base.cols[i], base.boxes[i], "base") for i in range(len(base))]
        per_tile = self.grid[0]
        for r in range(*f.keep_rows):
            for c in range(*f.keep_cols):
                box = f.canvas.cell(r, c, self.patch, self.patch)
                if box[0] >= box[2] or box[1] >= box[3]:  # a kept cell wholly in the padding: no region
                    box = None
                out.append((r, c, box, f"tile {r // per_tile},{c // per_tile}"))
            out.append((-1, -1, None, "newline"))
        return out

    def vision_positions(self, batch: Batch | None = None) -> list[Positions]:
        """One entry per vision-tower view, in the vision tower's batch order (each row's base view, then its
        tiles row-major): CLS then the view's patches, boxes in the row's input image. Without a batch:
        one base view, boxes in the model's input pixels."""
        if batch is None:
            return [grid_positions(*self.grid, self._cell(Frame((self.side, self.side))), cls=True, group="base")]
        out = []
        for f in batch.frames:
            out.append(grid_positions(*self.grid, self._cell(f.base), cls=True, group="base"))
            for tr in range(f.tiles[0]):
                for tc in range(f.tiles[1]):
                    cell = (lambda r, c, tr=tr, tc=tc, f=f:
                            f.canvas.cell(r, c, self.patch, self.patch, y=tr * self.side, x=tc * self.side))
                    out.append(grid_positions(*self.grid, cell, cls=True, group=f"tile {tr},{tc}"))
        return out


@isolated_rng
def save_tiny_llava_next(path, seed: int = 0):
    """LLaVA-NeXT layout at toy size: CLIP vision 2 x 32 (32 px tiles, patch 8), Llama 2 x 32, pinpoints
    32x64 / 64x32 / 64x64, the LLaVA-1.6 (Vicuna) chat template and the tiny word tokenizer."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaNextConfig, LlavaNextProcessor
    from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil

    from interp.models.tiny import TINY_WORDS, save
    from interp.models.tokenizer import word_tokenizer

    tok = word_tokenizer(TINY_WORDS)
    pinpoints = [[32, 64], [64, 32], [64, 64]]
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                              image_size=32, patch_size=8, num_channels=3)
    text = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                       num_key_value_heads=2, vocab_size=len(tok), max_position_embeddings=256, rms_norm_eps=1e-5,
                       bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    cfg = LlavaNextConfig(vision_config=vision, text_config=text, image_token_index=tok.convert_tokens_to_ids("<image>"),
                          image_grid_pinpoints=pinpoints, vision_feature_select_strategy="default",
                          vision_feature_layer=-2)
    torch.manual_seed(seed)
    model = LlavaNextForConditionalGeneration(cfg).eval()
    template = ("{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}USER: {% for c in m['content'] %}"
                "{% if c['type'] == 'image' %}<image>\n{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}"
                "{% endfor %} {% endif %}{% endfor %}{% if add_generation_prompt %}ASSISTANT:{% endif %}")
    ip = LlavaNextImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32},
                                    image_grid_pinpoints=pinpoints, image_mean=[0.48, 0.46, 0.41],
                                    image_std=[0.27, 0.26, 0.28])
    proc = LlavaNextProcessor(image_processor=ip, tokenizer=tok, patch_size=8, vision_feature_select_strategy="default",
                              num_additional_image_tokens=1, chat_template=template)
    return save(model, proc, path)
