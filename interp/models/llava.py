"""LLaVA (transformers ``LlavaForConditionalGeneration``): CLIP-style vision tower, projector, causal LM.

Image tokens map 1:1 onto the vision tower's patches (plus CLS with
``vision_feature_select_strategy="full"``); the processor resizes the shortest edge and centre-crops.
Sites: ``vision.embed``, ``vision.blocks.{l}.*``, ``projector.out``, ``lm.embed`` (the LM's input
after image features are merged), ``lm.blocks.{l}.*``, ``lm.logits``.
"""

from __future__ import annotations

import numpy as np
import torch
from transformers import LlavaForConditionalGeneration

from interp.errors import InterpError
from interp.models.adapter import Batch, Box, Hook, Positions, block_hooks, grid_positions
from interp.models.lvlm import Frame, ProcessorAdapter, fixed_size_frame, identity_resize_kwargs


class LlavaAdapter(ProcessorAdapter):
    """LLaVA-1.5-style models (LLaVA-Med included)."""

    name = "llava"
    model_class = LlavaForConditionalGeneration

    def __init__(self, model: torch.nn.Module, processor, model_id: str) -> None:
        cfg = model.config
        self.vision_config, self.text_config = cfg.vision_config, cfg.text_config
        if cfg.vision_feature_select_strategy not in ("default", "full"):
            raise InterpError(f"unsupported vision_feature_select_strategy {cfg.vision_feature_select_strategy!r}")
        self.patch = self.vision_config.patch_size
        side = self.vision_config.image_size // self.patch
        self.grid = (side, side)
        self.n_patches = side * side
        self.full = cfg.vision_feature_select_strategy == "full"  # the CLS token is an LM image token too
        super().__init__(model, processor, model_id)

    def _site_map(self) -> dict[str, Hook]:
        hooks: dict[str, Hook] = {"vision.embed": Hook("model.vision_tower.embeddings")}
        hooks.update(block_hooks("vision", "model.vision_tower.encoder.layers", self.vision_config.num_hidden_layers))
        hooks["projector.out"] = Hook("model.multi_modal_projector")
        hooks["lm.embed"] = Hook("model.language_model.layers.0", "input")
        hooks.update(block_hooks("lm", "model.language_model.layers", self.text_config.num_hidden_layers))
        hooks["lm.logits"] = Hook("lm_head")
        return hooks

    def vision_tokens(self) -> int:
        return 1 + self.n_patches

    def projector_tokens(self) -> int:
        return self.n_patches + self.full

    # --- geometry ----------------------------------------------------------------------
    def processor_kwargs(self, image: np.ndarray) -> dict:
        return identity_resize_kwargs(self.image_processor, image)

    def frame(self, image: np.ndarray, inputs, row: int) -> Frame:
        return fixed_size_frame(self.image_processor, image)

    def _cell(self, frame: Frame):
        return lambda r, c: frame.cell(r, c, self.patch, self.patch)

    def image_regions(self, batch: Batch, row: int) -> list[tuple[int, int, Box | None, str]]:
        """One LM image token per patch, row-major (the CLS token first with the ``full`` strategy)."""
        p = self.vision_positions(batch)[row]
        keep = range(len(p)) if self.full else p.spans["image"]
        return [(p.rows[i], p.cols[i], p.boxes[i], p.groups[i]) for i in keep]

    def vision_positions(self, batch: Batch | None = None) -> list[Positions]:
        """Per row, the vision tower's sequence: CLS, then patches in row-major order (boxes need the
        batch's images; without a batch, boxes are in the model's input pixels)."""
        side = self.vision_config.image_size
        frames = batch.frames if batch is not None else [Frame((side, side))]
        return [grid_positions(*self.grid, self._cell(f), cls=True) for f in frames]
