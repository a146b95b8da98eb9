"""BLIP-2 (transformers ``Blip2ForConditionalGeneration``): ViT vision tower, Q-Former, projection, causal LM.

The Q-Former's learned queries cross-attend to the vision tower's output; ``language_projection``
maps the query outputs into the LM, where they replace the ``num_query_tokens`` image tokens that
``Blip2Processor`` puts *before* the prompt. Those LM tokens are **queries with no place in the
image**: their kind is ``query`` (no box). Spatial questions go to the vision tower, whose sequence
(``vision_positions``) is CLS then the patch grid.

Sites in execution order:

- ``vision.embed``, ``vision.blocks.{l}.{resid_pre,attn.pattern,attn.out,mlp.out,resid_post}``
  (pre-LN ViT, additive residual);
- ``qformer.embed`` (the queries after the Q-Former's input LayerNorm),
  ``qformer.blocks.{l}.resid_pre``, ``.attn.pattern`` [heads, Q, Q], ``.attn.out``,
  ``.xattn.pattern`` [heads, Q, 1 + patches] and ``.xattn.out`` (only on cross-attention layers,
  every ``cross_attention_frequency``-th), ``.mlp.out``, ``.resid_post``. The Q-Former is post-LN
  (BERT): ``attn.out`` / ``xattn.out`` / ``mlp.out`` are the sub-blocks' contributions *before*
  their residual add and LayerNorm (the ``dense`` outputs), so resid_post is not their sum;
- ``projector.out`` (``language_projection``, [Q, d_lm]);
- ``lm.embed``: the LM's ``inputs_embeds`` after the query features are scattered in (for OPT,
  before the learned position embeddings are added), the value a batch's ``inputs_embeds`` takes;
- ``lm.blocks.{l}.*`` (OPT LMs have no ``mlp.out``: ``fc2`` runs on flattened [batch * seq, d]
  rows and the MLP's contribution is no module's output), ``lm.logits``.

BLIP-2 has no chat template: the processor gets ``prompt_format.format(prompt)`` (default the
prompt itself; real VQA checkpoints were tuned on ``"Question: {} Answer:"``).
"""

from __future__ import annotations

import inspect
import warnings
from dataclasses import dataclass, fields
from typing import Mapping

import numpy as np
import torch
from nnsight import NNsight
from nnsight.intervention.envoy import Envoy
from transformers import Blip2ForConditionalGeneration

from interp import sites as S
from interp.errors import InterpError
from interp.models.adapter import Batch, Box, Hook, Positions, block_hooks, grid_positions, weight_hash
from interp.models.lvlm import Frame, ProcessorAdapter, block_site_shape, identity_resize_kwargs
from interp.models.seeds import isolated_rng


@dataclass
class _LMOnly(Batch):
    """A batch carrying ``inputs_embeds``: BLIP-2's forward always runs the vision tower and Q-Former
    from ``pixel_values``, so the LM-only run passes ``mm_encoder_outputs`` whose features are the
    image-token rows of ``inputs_embeds`` themselves (scattered back unchanged)."""

    image_token_id: int = -1

    def model_inputs(self) -> dict:
        from transformers.models.blip_2.modeling_blip_2 import BaseModelOutputWithVisionQformerOutputs

        emb, ids = self.inputs_embeds, self.inputs["input_ids"]
        feats = emb[ids.to(emb.device) == self.image_token_id]
        kept = {k: v for k, v in self.inputs.items() if k not in self.image_inputs}
        return {**kept, "inputs_embeds": emb, "pixel_values": None,
                "mm_encoder_outputs": {"image": BaseModelOutputWithVisionQformerOutputs(pooler_output=feats)}}


class _Envoys(NNsight):
    """nnsight wrapper whose ``get`` takes torch module paths: nnsight moves a submodule named like one of
    its own attributes (BERT-style ``output``, as in the Q-Former) to ``E_output``, so the torch path
    ``attention.output.dense`` is ``attention.E_output.dense`` for nnsight."""

    def get(self, path: str):
        obj = self
        for part in path.split("."):
            overloaded = not part.startswith("_") and inspect.isdatadescriptor(getattr(Envoy, part, None))
            obj = getattr(obj, f"{Envoy.OVERLOAD_PREFIX}{part}" if overloaded else part)
        return obj


def _lm_layers(model: torch.nn.Module) -> tuple[str, str | None]:
    """(path of the LM's decoder layer list, the MLP module of a layer or None). OPT's ``fc2`` runs on
    flattened [batch * seq, d] rows and its output is not a module's: OPT LMs have no ``mlp.out`` site."""
    lm = model.language_model
    for path in ("model.decoder.layers", "model.layers"):
        try:
            layers = lm.get_submodule(path)
        except AttributeError:
            continue
        return f"language_model.{path}", "mlp" if hasattr(layers[0], "mlp") else None
    raise InterpError(f"unsupported BLIP-2 language model {type(lm).__name__}: no decoder layers found")


class Blip2Adapter(ProcessorAdapter):
    """BLIP-2 with a decoder-only LM (OPT, or any causal LM with ``model.layers``)."""

    name = "blip-2"
    model_class = Blip2ForConditionalGeneration
    towers = ("vision", "qformer", "lm")
    prompt_format = "{}"

    def __init__(self, model: torch.nn.Module, processor, model_id: str) -> None:
        cfg = model.config
        if not cfg.use_decoder_only_language_model:
            raise InterpError(f"{model_id}: BLIP-2 with an encoder-decoder LM ({cfg.text_config.model_type}) is not supported")
        self.vision_config, self.qformer_config, self.text_config = cfg.vision_config, cfg.qformer_config, cfg.text_config
        self.patch = self.vision_config.patch_size
        side = self.vision_config.image_size // self.patch
        self.grid = (side, side)
        self.n_patches = side * side
        self.n_queries = cfg.num_query_tokens
        self.cross_layers = [l for l in range(self.qformer_config.num_hidden_layers)
                             if l % self.qformer_config.cross_attention_frequency == 0]
        super().__init__(model, processor, model_id)

    def _site_map(self) -> dict[str, Hook]:
        hooks: dict[str, Hook] = {"vision.embed": Hook("vision_model.embeddings")}
        hooks.update(block_hooks("vision", "vision_model.encoder.layers", self.vision_config.num_hidden_layers))
        hooks["qformer.embed"] = Hook("qformer.layernorm")
        for l in range(self.qformer_config.num_hidden_layers):
            layer = f"qformer.encoder.layer.{l}"
            hooks[f"qformer.blocks.{l}.resid_pre"] = Hook(layer, "input")
            hooks[f"qformer.blocks.{l}.attn.pattern"] = Hook(f"{layer}.attention.attention", "output", 1)
            hooks[f"qformer.blocks.{l}.attn.out"] = Hook(f"{layer}.attention.output.dense")
            if l in self.cross_layers:
                hooks[f"qformer.blocks.{l}.xattn.pattern"] = Hook(f"{layer}.crossattention.attention", "output", 1)
                hooks[f"qformer.blocks.{l}.xattn.out"] = Hook(f"{layer}.crossattention.output.dense")
            hooks[f"qformer.blocks.{l}.mlp.out"] = Hook(f"{layer}.output_query.dense")
            hooks[f"qformer.blocks.{l}.resid_post"] = Hook(layer)
        hooks["projector.out"] = Hook("language_projection")
        hooks["lm.embed"] = Hook("language_model", "input")
        root, mlp = _lm_layers(self.model)
        lm = block_hooks("lm", root, self.text_config.num_hidden_layers, mlp=mlp or "mlp")
        hooks.update({k: v for k, v in lm.items() if mlp or not k.endswith(".mlp.out")})
        hooks["lm.logits"] = Hook("language_model.lm_head")
        return hooks

    def _attach(self, hooks: dict[str, Hook]) -> None:
        """As ``HookedAdapter._attach``, with an nnsight wrapper that resolves the Q-Former's ``output`` modules."""
        self.hooks = hooks
        self.sites = list(hooks)
        self._hook_order = {h: i for i, h in enumerate(dict.fromkeys(hooks.values()))}
        with warnings.catch_warnings():  # nnsight warns that it moved each `output` submodule to `E_output`
            warnings.filterwarnings("ignore", message=".*has a submodule named")
            self.nn = _Envoys(self.model)
        self.weight_hash = weight_hash(self.model)

    def vision_tokens(self) -> int:
        return 1 + self.n_patches

    def projector_tokens(self) -> int:
        return self.n_queries

    def site_shape(self, site: str, seq_len: int) -> tuple[int, ...]:
        """As ProcessorAdapter's, plus the Q-Former: its queries, and cross-attention onto the patches."""
        s = S.parse(self.expand_sites([site])[0])
        if s.tower != "qformer":
            return super().site_shape(site, seq_len)
        if s.point == "xattn.pattern":
            return (self.qformer_config.num_attention_heads, self.n_queries, 1 + self.n_patches)
        return block_site_shape(s.point, self.n_queries, self.qformer_config)

    # --- inputs ------------------------------------------------------------------------
    def template(self, prompt: str) -> str:
        """No chat template: the processor gets the prompt (``prompt_format``); it prepends the query tokens."""
        return self.prompt_format.format(prompt)

    def image_token_ids(self) -> set[int]:
        return {self.config.image_token_id}

    def run(self, batch: Batch, read=(), edit: Mapping | None = None, **kw):
        if batch.inputs_embeds is not None and not isinstance(batch, _LMOnly):
            batch = _LMOnly(**{f.name: getattr(batch, f.name) for f in fields(batch)},
                            image_token_id=self.config.image_token_id)
        return super().run(batch, read, edit, **kw)

    # --- geometry ----------------------------------------------------------------------
    def processor_kwargs(self, image: np.ndarray) -> dict:
        return identity_resize_kwargs(self.image_processor, image)

    def frame(self, image: np.ndarray, inputs, row: int) -> Frame:
        """BLIP's image processor resizes to a fixed size (no crop)."""
        h, w = image.shape[:2]
        ip, size = self.image_processor, self.image_processor.size
        if "height" in size:
            to = (size["height"], size["width"])
        else:
            s = size["shortest_edge"]
            to = (s, int(s * w / h)) if h <= w else (int(s * h / w), s)
        crop = (ip.crop_size["height"], ip.crop_size["width"]) if getattr(ip, "do_center_crop", False) else None
        return Frame.resize((h, w), to, crop)

    def image_regions(self, batch: Batch, row: int) -> list[tuple[int, int, Box | None, str]]:
        """The LM's image tokens are Q-Former queries: no grid cell, no box (kind ``query``)."""
        return [(-1, -1, None, "query")] * self.n_queries

    def vision_positions(self, batch: Batch | None = None) -> list[Positions]:
        """Per row, the vision tower's sequence [1 + patches]: CLS, then patches in row-major order (boxes
        need the batch's images; without a batch, boxes are in the model's input pixels)."""
        side = self.vision_config.image_size
        frames = batch.frames if batch is not None else [Frame((side, side))]
        return [grid_positions(*self.grid, lambda r, c, f=f: f.cell(r, c, self.patch, self.patch), cls=True,
                               group="base") for f in frames]


@isolated_rng
def save_tiny_blip2(path, seed: int = 0):
    """BLIP-2 layout at toy size: ViT 2 x 32 (32 px, patch 8), Q-Former 2 x 32 (4 queries, cross-attention
    every 2nd layer), OPT 2 x 32; ``Blip2Processor`` with a BLIP image processor (PIL) and the tiny word
    tokenizer (``Blip2Processor`` fails on a
    tokenizer whose ``image_token`` is a plain string, as ``word_tokenizer``'s is). Queries and vision weights get a 0.02 init (HF's defaults are zeros / 1e-10: every query
    would be identical)."""
    from transformers import Blip2Config, Blip2Processor, OPTConfig, PreTrainedTokenizerFast
    from transformers.models.blip.image_processing_pil_blip import BlipImageProcessorPil

    from interp.models.tiny import TINY_WORDS, save
    from interp.models.tokenizer import word_tokenizer

    words = word_tokenizer(TINY_WORDS)  # without its image_token attribute: Blip2Processor adds "<image>" itself
    tok = PreTrainedTokenizerFast(tokenizer_object=words.backend_tokenizer, pad_token="<pad>", unk_token="<unk>",
                                  bos_token="<bos>", eos_token="<eos>")
    text = OPTConfig(hidden_size=32, ffn_dim=64, num_hidden_layers=2, num_attention_heads=2, vocab_size=len(tok),
                     max_position_embeddings=128, word_embed_proj_dim=32, bos_token_id=tok.bos_token_id,
                     eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=32,
                  patch_size=8, initializer_range=0.02)
    qformer = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                   encoder_hidden_size=32, cross_attention_frequency=2)
    cfg = Blip2Config(vision_config=vision, qformer_config=qformer, text_config=text, num_query_tokens=4,
                      image_token_index=tok.convert_tokens_to_ids("<image>"))
    torch.manual_seed(seed)
    model = Blip2ForConditionalGeneration(cfg).eval()
    with torch.no_grad():
        model.query_tokens.normal_(0.0, 0.02)
    proc = Blip2Processor(image_processor=BlipImageProcessorPil(size={"height": 32, "width": 32}), tokenizer=tok,
                          num_query_tokens=cfg.num_query_tokens)
    return save(model, proc, path)
