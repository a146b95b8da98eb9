"""The LVLM model organism: a tiny LLaVA (CLIP vision tower, projector, Llama LM) built from a config.

It is trained here on phantom VQA (``python -m interp.models.train``) and shipped as
safetensors + config + tokenizer under ``interp/models/weights/lvlm``, loaded through the same
``from_pretrained`` path as a real checkpoint.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import (CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor,
                          PreTrainedTokenizerFast)

from interp.models.tokenizer import word_tokenizer

WEIGHTS_DIR = Path(__file__).parent / "weights"
LVLM_DIR = WEIGHTS_DIR / "lvlm"
IMAGE_SIZE = 64
PATCH_SIZE = 8
IMAGE_MEAN, IMAGE_STD = [0.5], [0.25]  # one grey channel
# the organism's chat template: BOS, the image, then the prompt verbatim (its training sequence)
CHAT_TEMPLATE = ("{{ bos_token }}{% for m in messages %}{% for c in m['content'] %}{% if c['type'] == 'image' %}<image>"
                 "{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}{% endfor %}")


def organism_config(vocab_size: int, *, d_vision: int = 64, n_vision: int = 2, d_lm: int = 128, n_lm: int = 4) -> LlavaConfig:
    """LLaVA config of the organism; every vision layer feeds the projector (``vision_feature_layer=-1``)."""
    vision = CLIPVisionConfig(
        hidden_size=d_vision, intermediate_size=4 * d_vision, num_hidden_layers=n_vision, num_attention_heads=4,
        image_size=IMAGE_SIZE, patch_size=PATCH_SIZE, num_channels=1,
    )
    text = LlamaConfig(
        hidden_size=d_lm, intermediate_size=4 * d_lm, num_hidden_layers=n_lm, num_attention_heads=4,
        num_key_value_heads=4, vocab_size=vocab_size, max_position_embeddings=256, tie_word_embeddings=False,
        bos_token_id=2, eos_token_id=3, pad_token_id=0,
    )
    return LlavaConfig(
        vision_config=vision, text_config=text, image_token_id=4, vision_feature_select_strategy="default",
        vision_feature_layer=-1, projector_hidden_act="gelu",
    )


def organism_tokenizer() -> PreTrainedTokenizerFast:
    """Word-level tokenizer over every word the phantom VQA templates produce."""
    from interp.data.vqa import vocabulary

    return word_tokenizer(vocabulary())


def build_organism(seed: int = 0, **sizes: int) -> tuple[LlavaForConditionalGeneration, PreTrainedTokenizerFast]:
    """A freshly initialised (untrained) organism and its tokenizer, deterministic in ``seed``. It seeds torch's
    global generator on purpose: it is the first step of a seeded training run, whose later draws follow from it."""
    tok = organism_tokenizer()
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(organism_config(len(tok), **sizes))
    model.set_attn_implementation("eager")
    return model.eval(), tok


def image_processor(size: int = IMAGE_SIZE, mean: list[float] = IMAGE_MEAN, std: list[float] = IMAGE_STD):
    """CLIP-style image processor (PIL backend) for grey ``size`` x ``size`` inputs."""
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    return CLIPImageProcessorPil(size={"shortest_edge": size}, crop_size={"height": size, "width": size},
                                 image_mean=mean, image_std=std, do_convert_rgb=False)


def organism_processor(tokenizer: PreTrainedTokenizerFast, chat_template: str = CHAT_TEMPLATE) -> LlavaProcessor:
    """The organism's processor: the image processor, the tokenizer and the chat template."""
    return LlavaProcessor(image_processor=image_processor(), tokenizer=tokenizer, patch_size=PATCH_SIZE,
                          vision_feature_select_strategy="default", num_additional_image_tokens=1,
                          chat_template=chat_template)


def save_organism(model: LlavaForConditionalGeneration, tokenizer: PreTrainedTokenizerFast, path: str | Path) -> None:
    """Save as a real checkpoint folder: safetensors + config + processor (image processor, tokenizer, chat template)."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path, safe_serialization=True)
    organism_processor(tokenizer).save_pretrained(path)
