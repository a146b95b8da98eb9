"""Tiny random-weight checkpoints of every supported family, built from transformers configs (no
download), saved with their processor and loadable by path exactly like a hub checkpoint.

    python -m interp.models.tiny --family qwen2_5_vl --out /tmp/tiny-qwen

``BUILDERS`` maps each family's ``model_type`` to its builder ``(path, seed) -> path``.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

from interp.cli import Parser, non_negative_int, out_dir, run
from interp.errors import InterpError
from interp.models.seeds import isolated_rng

if TYPE_CHECKING:  # torch loads with a builder: the command line parses without it
    import torch

# words of the tiny models' word-level tokenizers (chat-template words included)
TINY_WORDS = (
    "is there a pleural effusion pneumothorax nodule cardiomegaly consolidation on the left right lung ? yes no "
    "answer : the costophrenic angles are sharp . not present USER: ASSISTANT: user assistant model describe image"
).split()


@isolated_rng
def save_tiny_llava(path: str | Path, seed: int = 0, width: int = 32, layers: int = 2) -> Path:
    """LLaVA-1.5 layout at toy size: CLIP vision and Llama ``layers`` x ``width`` (32 px images, patch 8),
    LLaVA-1.5 chat template."""
    import torch
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor

    from interp.models.organism import image_processor
    from interp.models.tokenizer import word_tokenizer

    tok = word_tokenizer(TINY_WORDS)
    vision = CLIPVisionConfig(hidden_size=width, intermediate_size=2 * width, num_hidden_layers=layers,
                              num_attention_heads=2, image_size=32, patch_size=8, num_channels=3)
    text = LlamaConfig(hidden_size=width, intermediate_size=2 * width, num_hidden_layers=layers, num_attention_heads=2,
                       num_key_value_heads=2, vocab_size=len(tok), max_position_embeddings=128,
                       bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    cfg = LlavaConfig(vision_config=vision, text_config=text, image_token_id=tok.convert_tokens_to_ids("<image>"),
                      vision_feature_select_strategy="default", vision_feature_layer=-2)
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(cfg).eval()
    template = ("{{ bos_token }}USER: {% for m in messages %}{% for c in m['content'] %}{% if c['type'] == 'image' %}"
                "<image> {% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}{% endfor %} ASSISTANT:")
    proc = LlavaProcessor(image_processor=image_processor(32, [0.48, 0.46, 0.41], [0.27, 0.26, 0.28]), tokenizer=tok,
                          patch_size=8, vision_feature_select_strategy="default", num_additional_image_tokens=1,
                          chat_template=template)
    return save(model, proc, path)


def save(model: torch.nn.Module, processor, path: str | Path) -> Path:
    """Safetensors + config + processor in ``path``."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path, safe_serialization=True)
    processor.save_pretrained(path)
    return path


@isolated_rng
def save_tiny_dual_encoder(path: str | Path, seed: int = 0, kind: str = "clip") -> Path:
    """CLIP or SigLIP at toy size: towers 2 x 32, 32 px RGB images, patch 8, the tiny word tokenizer."""
    import torch
    from transformers import CLIPConfig, CLIPModel, CLIPProcessor, SiglipConfig, SiglipModel, SiglipProcessor
    from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil

    from interp.models.clip import clip_tokenizer
    from interp.models.organism import image_processor

    tok = clip_tokenizer(TINY_WORDS)
    tower = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2)
    text = dict(tower, vocab_size=len(tok), max_position_embeddings=24, pad_token_id=tok.pad_token_id,
                bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    vision = dict(tower, image_size=32, patch_size=8, num_channels=3)
    torch.manual_seed(seed)
    if kind == "clip":
        model = CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16))
        proc = CLIPProcessor(image_processor=image_processor(32, [0.48, 0.46, 0.41], [0.27, 0.26, 0.28]), tokenizer=tok)
    else:
        model = SiglipModel(SiglipConfig(text_config=text, vision_config=vision))
        proc = SiglipProcessor(image_processor=SiglipImageProcessorPil(size={"height": 32, "width": 32}), tokenizer=tok)
    return save(model.eval(), proc, path)


# model_type -> "module:function" building a tiny checkpoint (path, seed) -> path
BUILDERS = {
    "llava": "interp.models.tiny:save_tiny_llava",
    "clip": "interp.models.tiny:save_tiny_dual_encoder",
    "siglip": "interp.models.tiny:save_tiny_siglip",
    "qwen2_5_vl": "interp.models.qwen2_5_vl:save_tiny_qwen2_5_vl",
    "idefics3": "interp.models.idefics3:save_tiny_idefics3",
    "gemma3": "interp.models.gemma3:save_tiny_gemma3",
    "blip-2": "interp.models.blip2:save_tiny_blip2",
    "llava_next": "interp.models.llava_next:save_tiny_llava_next",
}


def build_tiny(model_type: str, path: str | Path, seed: int = 0) -> Path:
    """Build and save the tiny checkpoint of a family."""
    module, fn = BUILDERS[model_type].split(":")
    return getattr(importlib.import_module(module), fn)(path, seed)


def save_tiny_siglip(path: str | Path, seed: int = 0) -> Path:
    return save_tiny_dual_encoder(path, seed, "siglip")


def parser() -> Parser:
    p = Parser("python -m interp.models.tiny", __doc__)
    p.add_argument("--family", required=True, choices=sorted(BUILDERS), help="HF model_type of the family")
    p.add_argument("--out", required=True, type=out_dir, help="checkpoint folder to write (new or empty)")
    p.add_argument("--seed", type=non_negative_int, default=0, help="weight init seed (default: 0)")
    return p


def build(args: argparse.Namespace) -> None:
    """Build the family's checkpoint into a new or empty folder; print its path."""
    out = Path(args.out)
    if out.is_dir() and any(out.iterdir()):
        raise InterpError(f"--out {out} exists and is not an empty folder")
    print(build_tiny(args.family, out, args.seed))


def main(argv: Sequence[str] | None = None) -> int:
    return run(parser().parse_args, build, argv)


if __name__ == "__main__":
    sys.exit(main())
