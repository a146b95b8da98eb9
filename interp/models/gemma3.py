"""Gemma 3 (transformers ``Gemma3ForConditionalGeneration``; MedGemma too): SigLIP vision tower, a
projector that average-pools the patch grid to ``mm_tokens_per_image`` soft tokens, Gemma 3 LM.

The image processor resizes to a fixed size (no crop); SigLIP has no CLS token. Each LM image token
(``<image_soft_token>``) is the average of a k x k block of SigLIP patches, row-major on the pooled
grid; ``<start_of_image>`` / ``<end_of_image>`` around them are special tokens. ``token_type_ids``
(1 on soft image tokens) give image tokens bidirectional attention among themselves; they stay in
the batch, so runs from ``inputs_embeds`` get the same masks. Pan-and-scan crops are switched off.

Sites: ``vision.embed``, ``vision.blocks.{l}.*``, ``projector.out``, ``lm.embed`` (the LM's input
after image features are merged), ``lm.blocks.{l}.*``, ``lm.logits``. Gemma's LM blocks normalise
each branch before adding it back (sandwich norms), so ``lm.blocks.{l}.attn.out`` and ``.mlp.out``
are the outputs of ``post_attention_layernorm`` / ``post_feedforward_layernorm``: what each branch
adds to the residual stream (resid_post = resid_pre + attn.out + mlp.out), as in TransformerLens.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from transformers import Gemma3ForConditionalGeneration

from interp import sites as S
from interp.errors import InterpError
from interp.models.adapter import Batch, Box, Hook, Positions, block_hooks, grid_positions
from interp.models.lvlm import Frame, ProcessorAdapter, identity_resize_kwargs
from interp.models.seeds import isolated_rng


class Gemma3Adapter(ProcessorAdapter):
    """Gemma 3 / MedGemma image-text models."""

    name = "gemma3"
    model_class = Gemma3ForConditionalGeneration

    def __init__(self, model: torch.nn.Module, processor, model_id: str) -> None:
        cfg = model.config
        self.vision_config, self.text_config = cfg.vision_config, cfg.text_config
        self.patch = self.vision_config.patch_size
        self.side = self.vision_config.image_size // self.patch  # SigLIP patch grid side
        self.n_patches = self.side * self.side
        pooled = int(cfg.mm_tokens_per_image ** 0.5)
        self.kernel = self.side // pooled  # the projector's AvgPool2d kernel = stride
        self.pooled = self.side // self.kernel
        if self.pooled ** 2 != cfg.mm_tokens_per_image:
            raise InterpError(f"{model_id}: a {self.side}x{self.side} patch grid pooled by {self.kernel} does not give "
                              f"mm_tokens_per_image = {cfg.mm_tokens_per_image} tokens")
        ip = processor.image_processor
        if getattr(ip, "do_pan_and_scan", False):
            ip.do_pan_and_scan = False  # crops add image-token blocks per image; one view per image here
        super().__init__(model, processor, model_id)

    def _site_map(self) -> dict[str, Hook]:
        vision = "model.vision_tower" + (".vision_model" if hasattr(self.model.model.vision_tower, "vision_model") else "")
        hooks: dict[str, Hook] = {"vision.embed": Hook(f"{vision}.embeddings")}
        hooks.update(block_hooks("vision", f"{vision}.encoder.layers", self.vision_config.num_hidden_layers))
        hooks["projector.out"] = Hook("model.multi_modal_projector")
        hooks["lm.embed"] = Hook("model.language_model.layers.0", "input")
        lm = "model.language_model.layers"
        for site, hook in block_hooks("lm", lm, self.text_config.num_hidden_layers).items():
            s = S.parse(site)
            if s.point == "attn.out":
                hook = Hook(f"{lm}.{s.layer}.post_attention_layernorm")
            elif s.point == "mlp.out":
                hook = Hook(f"{lm}.{s.layer}.post_feedforward_layernorm")
            hooks[site] = hook
        hooks["lm.logits"] = Hook("lm_head")
        return hooks

    def vision_tokens(self) -> int:
        return self.n_patches

    def projector_tokens(self) -> int:
        return self.pooled ** 2

    # --- geometry ----------------------------------------------------------------------
    def image_token_ids(self) -> set[int]:
        """Only the soft image tokens carry image features (not <start_of_image> / <end_of_image>)."""
        return {self.config.image_token_id}

    def processor_kwargs(self, image: np.ndarray) -> dict:
        return identity_resize_kwargs(self.image_processor, image)

    def processor_images(self, arrays: list[np.ndarray]) -> list:
        """Gemma3Processor reads a flat image list as the images of one sample: nest one per row."""
        return [[a] for a in arrays]

    def frame(self, image: np.ndarray, inputs, row: int) -> Frame:
        """A plain resize to the processor's fixed size (no crop)."""
        size = self.image_processor.size
        return Frame.resize(tuple(image.shape[:2]), (size["height"], size["width"]))

    def image_regions(self, batch: Batch, row: int) -> list[tuple[int, int, Box | None, str]]:
        """One LM image token per pooled k x k block of patches, row-major on the pooled grid."""
        frame, px = batch.frames[row], self.kernel * self.patch
        group = f"pooled {self.kernel}x{self.kernel}"
        return [(r, c, frame.cell(r, c, px, px), group) for r in range(self.pooled) for c in range(self.pooled)]

    def vision_positions(self, batch: Batch | None = None) -> list[Positions]:
        """Per row, the SigLIP sequence: patches in row-major order, no CLS (boxes need the batch's
        images; without a batch, boxes are in the model's input pixels)."""
        side = self.vision_config.image_size
        frames = batch.frames if batch is not None else [Frame((side, side))]
        return [grid_positions(self.side, self.side, lambda r, c, f=f: f.cell(r, c, self.patch, self.patch), cls=False)
                for f in frames]


# Gemma 3's chat template (hub gemma-3-*-it): the image item becomes <start_of_image>, which the
# processor expands into \n\n<start_of_image><image_soft_token>*N<end_of_image>\n\n.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{%- if messages[0]['role'] == 'system' -%}"
    "{%- if messages[0]['content'] is string -%}{%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}"
    "{%- else -%}{%- set first_user_prefix = messages[0]['content'][0]['text'] + '\n\n' -%}{%- endif -%}"
    "{%- set loop_messages = messages[1:] -%}"
    "{%- else -%}{%- set first_user_prefix = \"\" -%}{%- set loop_messages = messages -%}{%- endif -%}"
    "{%- for message in loop_messages -%}"
    "{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{%- endif -%}"
    "{%- if (message['role'] == 'assistant') -%}{%- set role = \"model\" -%}{%- else -%}{%- set role = message['role'] -%}{%- endif -%}"
    "{{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else \"\") }}"
    "{%- if message['content'] is string -%}{{ message['content'] | trim }}"
    "{%- elif message['content'] is iterable -%}"
    "{%- for item in message['content'] -%}"
    "{%- if item['type'] == 'image' -%}{{ '<start_of_image>' }}"
    "{%- elif item['type'] == 'text' -%}{{ item['text'] | trim }}{%- endif -%}"
    "{%- endfor -%}"
    "{%- else -%}{{ raise_exception('Invalid content type') }}{%- endif -%}"
    "{{ '<end_of_turn>\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<start_of_turn>model\n' }}{%- endif -%}"
)
SPECIAL_TOKENS = {"start_of_turn": "<start_of_turn>", "end_of_turn": "<end_of_turn>", "boi_token": "<start_of_image>",
                  "eoi_token": "<end_of_image>", "image_token": "<image_soft_token>"}


def gemma3_tokenizer(words):
    """The tiny word-level tokenizer plus Gemma 3's special tokens, named as Gemma3Processor reads them."""
    from transformers import PreTrainedTokenizerFast

    from interp.models.tokenizer import word_tokenizer

    base = word_tokenizer([*words, *SPECIAL_TOKENS.values()])
    return PreTrainedTokenizerFast(tokenizer_object=base.backend_tokenizer, pad_token="<pad>", unk_token="<unk>",
                                   bos_token="<bos>", eos_token="<eos>", extra_special_tokens=dict(SPECIAL_TOKENS))


@isolated_rng
def save_tiny_gemma3(path: str | Path, seed: int = 0) -> Path:
    """Gemma 3 layout at toy size: SigLIP 2 x 32 (32 px, patch 8: 4x4 patches pooled 2x2 to 4 image
    tokens), Gemma 3 LM 2 x 32 (one sliding-window layer, one global; GQA 2:1), Gemma's chat template."""
    from transformers import Gemma3Config, Gemma3Processor, Gemma3TextConfig, SiglipVisionConfig
    from transformers.models.gemma3.image_processing_pil_gemma3 import Gemma3ImageProcessorPil

    from interp.models.tiny import TINY_WORDS, save

    tok = gemma3_tokenizer(TINY_WORDS)
    vision = SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                image_size=32, patch_size=8, num_channels=3, vision_use_head=False)
    text = Gemma3TextConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                            num_key_value_heads=1, head_dim=16, query_pre_attn_scalar=16, vocab_size=len(tok),
                            max_position_embeddings=128, sliding_window=8,
                            layer_types=["sliding_attention", "full_attention"], bos_token_id=tok.bos_token_id,
                            eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    ids = tok.convert_tokens_to_ids
    cfg = Gemma3Config(vision_config=vision, text_config=text, mm_tokens_per_image=4,
                       boi_token_index=ids("<start_of_image>"), eoi_token_index=ids("<end_of_image>"),
                       image_token_index=ids("<image_soft_token>"))
    torch.manual_seed(seed)
    model = Gemma3ForConditionalGeneration(cfg).eval()
    with torch.no_grad():  # HF zero-inits these (RMSNorm scales are 1 + w): give them values so they matter
        model.model.multi_modal_projector.mm_input_projection_weight.normal_(0, 0.2)
        for name, p in model.named_parameters():
            if "norm" in name and "language_model" in name or "mm_soft_emb_norm" in name:
                p.normal_(0, 0.1)
    ip = Gemma3ImageProcessorPil(size={"height": 32, "width": 32}, image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5])
    proc = Gemma3Processor(image_processor=ip, tokenizer=tok, chat_template=CHAT_TEMPLATE, image_seq_length=4)
    return save(model, proc, path)
