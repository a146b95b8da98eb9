"""Qwen2.5-VL (transformers ``Qwen2_5_VLForConditionalGeneration``): windowed ViT, 2x2 patch merger, Qwen2 LM with M-RoPE.

Geometry. The image processor resizes each image with ``smart_resize`` (both sides multiples of
``patch * merge``, area within [min_pixels, max_pixels], aspect kept) and flattens it into patches
in *merge-friendly* order: merged cells row-major, and inside each cell its ``merge x merge`` patches
row-major (``patchify``). ``pixel_values`` is [sum of the images' patches, C * T * patch * patch]
(ragged: no batch dimension), ``image_grid_thw`` is [images, 3] (t, h, w in patches).

Vision tower order. ``Qwen2_5_VisionTransformerPretrainedModel.forward`` embeds the patches
(``patch_embed``), then permutes whole merged cells (groups of ``merge**2`` patches, which stay in
their in-cell order) into *window order* (``get_vision_window_index``: windows of
``window_size // merge // patch`` merged cells a side, windows row-major, cells row-major inside a
window; images one after another). Every block runs in that order (windowed attention, except
the ``fullatt_block_indexes`` blocks); the merger maps each cell's ``merge**2`` patches to one LM
vector, still in window order, and only then is the result permuted back to row-major for the LM.
So ``vision.embed`` (the input of block 0: the patch embeddings already in window order),
``vision.blocks.*`` and ``projector.out`` (the merger's output, one row per merged cell, window
order) all follow :meth:`Qwen25VLAdapter.vision_positions`; LM image tokens are the merged cells
row-major (:meth:`Qwen25VLAdapter.image_regions`).

Vision-tower and projector sites have **no batch dimension**: their values are the packed
sequence of all rows' images ([sum of tokens, d], rows one after another, row i's part as long as
``batch.ragged['pixel_values'][i]`` patches, or a quarter of that for ``projector.out``);
``site_shape`` gives only their trailing (feature) dimension. The vision attention module returns
no weights, so the vision tower has no ``attn.pattern`` site.

M-RoPE. The LM's position ids are 3-D (temporal, height, width) and depend on the image grid;
``encode`` computes them with the model's own ``get_rope_index`` and stores them as
``inputs['position_ids']`` [3, rows, seq] (dimension 1 is the batch: ``Batch.batch_dims``), so a run with ``inputs_embeds`` (the LM alone) sees the same positions as
a run from pixels.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import torch
from transformers import Qwen2_5_VLForConditionalGeneration, Qwen2_5_VLProcessor
from transformers.processing_utils import ProcessorMixin

from interp import sites as S
from interp.errors import InterpError
from interp.models.adapter import Batch, Box, Hook, Positions, block_hooks
from interp.models.lvlm import Frame, ProcessorAdapter, block_site_shape, load_processor
from interp.models.seeds import isolated_rng


@dataclass
class ImageTextProcessor(Qwen2_5_VLProcessor):
    """``Qwen2_5_VLProcessor`` without its video processor: transformers' video processors need
    torchvision, which cannot be installed beside the CPU torch here, and the stock processor cannot
    be built, saved or loaded without one. Images and text are processed by the stock code."""

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs) -> None:
        self.image_token = getattr(tokenizer, "image_token", None) or "<|image_pad|>"
        self.video_token = getattr(tokenizer, "video_token", None) or "<|video_pad|>"
        self.image_token_id = tokenizer.convert_tokens_to_ids(self.image_token)
        self.video_token_id = tokenizer.convert_tokens_to_ids(self.video_token)
        ProcessorMixin.__init__(self, image_processor, tokenizer, chat_template=chat_template)


def qwen_processor(src: str | Path, model_id: str, trust_remote_code: bool = False):
    """The checkpoint's processor through AutoProcessor; where that fails only because the video processor
    cannot load (no torchvision), the same image processor (PIL), tokenizer and chat template in an
    :class:`ImageTextProcessor`."""
    try:
        return load_processor(src, model_id, trust_remote_code)
    except InterpError as e:
        error = e
    try:
        from transformers import AutoTokenizer
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

        tok = AutoTokenizer.from_pretrained(src, trust_remote_code=trust_remote_code)
        ip = Qwen2VLImageProcessorPil.from_pretrained(src)
        template = tok.chat_template
        folder = Path(src)
        if (folder / "chat_template.jinja").is_file():
            template = (folder / "chat_template.jinja").read_text()
        elif (folder / "chat_template.json").is_file():
            template = json.loads((folder / "chat_template.json").read_text())["chat_template"]
        return ImageTextProcessor(ip, tok, chat_template=template)
    except Exception:  # no usable image processor / tokenizer either: report AutoProcessor's error
        raise error from None


class Qwen25VLAdapter(ProcessorAdapter):
    """Qwen2.5-VL checkpoints (one image per row)."""

    name = "qwen2_5_vl"
    model_class = Qwen2_5_VLForConditionalGeneration
    vision_batched = False  # vision and projector sites are packed over the batch's images: [tokens, d]

    def __init__(self, model: torch.nn.Module, processor, model_id: str) -> None:
        cfg = model.config
        self.vision_config, self.text_config = cfg.vision_config, cfg.text_config
        self.patch = self.vision_config.patch_size
        self.merge = self.vision_config.spatial_merge_size
        super().__init__(model, processor, model_id)

    @classmethod
    def from_pretrained(cls, src: str | Path, model_id: str, *, device: str = "cpu", trust_remote_code: bool = False):
        """Weights (:func:`~interp.models.registry.load_weights`) and the folder's processor (:func:`qwen_processor`)."""
        from interp.models.registry import load_weights

        model = load_weights(cls.model_class, src, model_id, device=device, trust_remote_code=trust_remote_code)
        return cls(model, qwen_processor(src, model_id, trust_remote_code), model_id)

    def _site_map(self) -> dict[str, Hook]:
        root, n = "model.visual.blocks", self.vision_config.depth
        hooks: dict[str, Hook] = {"vision.embed": Hook(f"{root}.0", "input")}  # patch_embed output, window order
        for l in range(n):
            layer = f"{root}.{l}"
            hooks[f"vision.blocks.{l}.resid_pre"] = Hook(layer, "input")
            hooks[f"vision.blocks.{l}.attn.out"] = Hook(f"{layer}.attn")  # a tensor: no attention weights
            hooks[f"vision.blocks.{l}.mlp.out"] = Hook(f"{layer}.mlp")
            hooks[f"vision.blocks.{l}.resid_post"] = Hook(layer)
        hooks["projector.out"] = Hook("model.visual.merger")
        hooks["lm.embed"] = Hook("model.language_model.layers.0", "input")
        hooks.update(block_hooks("lm", "model.language_model.layers", self.text_config.num_hidden_layers))
        hooks["lm.logits"] = Hook("lm_head")
        return hooks

    def site_shape(self, site: str, seq_len: int) -> tuple[int, ...]:
        """As ProcessorAdapter's for LM sites; vision and projector sites are packed over the batch's
        images without a batch dimension, so only their feature dimension is given."""
        s = S.parse(self.expand_sites([site])[0])
        if s.tower == "vision":
            return (self.vision_config.hidden_size,)
        if s.tower == "projector":
            return (self.vision_config.out_hidden_size,)
        return block_site_shape(s.point, seq_len, self.text_config)

    # --- inputs ------------------------------------------------------------------------
    def _smart_resize(self, h: int, w: int) -> tuple[int, int]:
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize

        ip = self.image_processor
        return smart_resize(h, w, factor=ip.patch_size * ip.merge_size, min_pixels=ip.size["shortest_edge"],
                            max_pixels=ip.size["longest_edge"])

    def processor_kwargs(self, image: np.ndarray) -> dict:
        """Skip a resize that smart_resize would make to the same size (PIL would only quantise it)."""
        h, w = image.shape[:2]
        try:
            same = self._smart_resize(h, w) == (h, w)
        except ValueError:  # extreme aspect ratio: let the processor say so
            return {}
        return {"do_resize": False} if same else {}

    def ragged(self, inputs: Mapping[str, torch.Tensor]) -> dict[str, list[int]]:
        """``pixel_values`` is [sum of patches, d]: each row's part has t * h * w patches."""
        if inputs.get("image_grid_thw") is None:
            return {}
        return {"pixel_values": inputs["image_grid_thw"].prod(-1).tolist()}

    def encode(
        self,
        images: Sequence[np.ndarray],
        prompts: Sequence[str],
        spans: Sequence[Mapping[str, tuple[int, int]]] | None = None,
        responses: Sequence[str] | None = None,
    ) -> Batch:
        """As :meth:`ProcessorAdapter.encode`, plus the M-RoPE ``position_ids`` [3, rows, seq] the model
        would compute itself (``get_rope_index``), so runs with ``inputs_embeds`` keep them."""
        batch = super().encode(images, prompts, spans, responses)
        inputs = batch.inputs
        n_images = 0 if inputs.get("image_grid_thw") is None else len(inputs["image_grid_thw"])
        if n_images != len(batch):
            raise InterpError(f"{self.model_id}: expected one image per row, the processor made {n_images} "
                              f"for {len(batch)} rows")
        types = inputs.get("mm_token_type_ids")
        if types is None:
            types = (inputs["input_ids"] == self.config.image_token_id).int()
        with torch.no_grad():
            pos, _ = self.model.model.get_rope_index(
                inputs["input_ids"], mm_token_type_ids=types, image_grid_thw=inputs["image_grid_thw"],
                attention_mask=inputs.get("attention_mask"))
        inputs["position_ids"] = pos
        batch.batch_dims["position_ids"] = 1
        return batch

    # --- geometry ----------------------------------------------------------------------
    def _grid(self, batch: Batch, row: int) -> tuple[int, int]:
        """Row ``row``'s image grid in patches (h, w)."""
        t, h, w = (int(x) for x in batch.inputs["image_grid_thw"][row])
        if t != 1:
            raise InterpError(f"{self.model_id}: row {row} has {t} temporal patches; only still images are supported")
        return h, w

    def frame(self, image: np.ndarray, inputs, row: int) -> Frame:
        """smart_resize of the input to the grid the processor reports (no crop)."""
        _, gh, gw = (int(x) for x in inputs["image_grid_thw"][row])
        return Frame.resize(tuple(image.shape[:2]), (gh * self.patch, gw * self.patch))

    def image_regions(self, batch: Batch, row: int) -> list[tuple[int, int, Box | None, str]]:
        """One LM image token per merged ``merge x merge`` cell, row-major on the merged grid; its box is the
        cell's ``merge*patch`` square of model pixels mapped back to the input image."""
        gh, gw = self._grid(batch, row)
        frame, side, m = batch.frames[row], self.patch * self.merge, self.merge
        group = f"merged {m}x{m}"
        return [(r, c, frame.cell(r, c, side, side), group) for r in range(gh // m) for c in range(gw // m)]

    def _windows(self, gh: int, gw: int) -> tuple[list[int], list[int]]:
        from transformers.vision_utils import get_vision_window_index

        grid = torch.tensor([[1, gh, gw]])
        index, cu = get_vision_window_index(grid, spatial_merge_size=self.merge, window_size=self.vision_config.window_size,
                                            patch_size=self.patch)
        unit = self.merge ** 2
        bounds = (cu // unit).tolist()  # window boundaries in merged cells
        window = [k for k in range(len(bounds) - 1) for _ in range(bounds[k], bounds[k + 1])]
        return index.tolist(), window

    def vision_positions(self, batch: Batch | None = None) -> list[Positions]:
        """Per row, that row's part of the packed vision sequence (its offset is the sum of the previous
        rows' ``batch.ragged['pixel_values']``): merged cells in window order, each cell's
        ``merge x merge`` patches row-major inside it; rows/cols on the patch grid, boxes in input
        pixels, groups ``window k``. Needs the batch (the grid depends on the image size)."""
        if batch is None:
            raise InterpError(f"{self.model_id}: the vision sequence depends on the image size; pass the batch")
        out = []
        m = self.merge
        for row, frame in enumerate(batch.frames):
            gh, gw = self._grid(batch, row)
            order, window = self._windows(gh, gw)
            rows, cols, boxes, groups = [], [], [], []
            for cell, win in zip(order, window):
                cr, cc = divmod(cell, gw // m)
                for i in range(m):
                    for j in range(m):
                        r, c = cr * m + i, cc * m + j
                        rows.append(r)
                        cols.append(c)
                        boxes.append(frame.cell(r, c, self.patch, self.patch))
                        groups.append(f"window {win}")
            n = len(rows)
            out.append(Positions(["image"] * n, rows, cols, ["<patch>"] * n, {"image": list(range(n))},
                                 boxes=boxes, groups=groups))
        return out


# --- tiny checkpoint ---------------------------------------------------------------------
SPECIAL = ("<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>")
SYSTEM_WORDS = ("system", "You", "are", "a", "helpful", "assistant.")
# Qwen2.5-VL's own chat template (default system prompt, <|vision_start|><|image_pad|><|vision_end|> per image)
CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@isolated_rng
def save_tiny_qwen2_5_vl(path: str | Path, seed: int = 0) -> Path:
    """Qwen2.5-VL layout at toy size: vision 2 x 32 (patch 14, merge 2, windows of 2x2 merged cells, block 1
    full attention), LM 2 x 32 (GQA 2:1, M-RoPE sections 2/3/3), images smart-resized to 56..112 px a side
    (a 56 x 56 image = 16 patches = 4 LM tokens); word-level tokenizer with Qwen's special tokens and chat template."""
    from transformers import Qwen2_5_VLConfig
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    from interp.models.tiny import TINY_WORDS, save
    from interp.models.tokenizer import word_tokenizer

    tok = word_tokenizer([*TINY_WORDS, *SYSTEM_WORDS, *SPECIAL])
    tok.add_special_tokens({"extra_special_tokens": list(SPECIAL)})
    tok.image_token, tok.video_token = "<|image_pad|>", "<|video_pad|>"
    ids = {t: tok.convert_tokens_to_ids(t) for t in SPECIAL}
    vision = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, patch_size=14, spatial_merge_size=2,
                  temporal_patch_size=2, window_size=56, out_hidden_size=32, fullatt_block_indexes=[1],
                  initializer_range=0.2)
    text = dict(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                num_key_value_heads=1, max_position_embeddings=256, initializer_range=0.2,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]},
                bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    cfg = Qwen2_5_VLConfig(vision_config=vision, text_config=text, image_token_id=ids["<|image_pad|>"],
                           video_token_id=ids["<|video_pad|>"], vision_start_token_id=ids["<|vision_start|>"],
                           vision_end_token_id=ids["<|vision_end|>"])
    torch.manual_seed(seed)
    model = Qwen2_5_VLForConditionalGeneration(cfg).eval()
    ip = Qwen2VLImageProcessorPil(min_pixels=56 * 56, max_pixels=112 * 112, patch_size=14, merge_size=2,
                                  temporal_patch_size=2)
    path = save(model, ImageTextProcessor(ip, tok, chat_template=CHAT_TEMPLATE), path)
    # saved as the stock processor (as hub checkpoints are), with its video processor's settings, so that
    # AutoProcessor builds a Qwen2_5_VLProcessor where torchvision is installed
    for name in ("processor_config.json", "tokenizer_config.json"):
        cfg_file = path / name
        d = json.loads(cfg_file.read_text())
        d["processor_class"] = "Qwen2_5_VLProcessor"
        if name == "processor_config.json":
            d["video_processor"] = {"video_processor_type": "Qwen2VLVideoProcessor", "patch_size": 14, "temporal_patch_size": 2,
                                    "merge_size": 2, "size": {"shortest_edge": 56 * 56, "longest_edge": 112 * 112},
                                    "image_mean": list(ip.image_mean), "image_std": list(ip.image_std)}
        cfg_file.write_text(json.dumps(d, indent=2) + "\n")
    return path
