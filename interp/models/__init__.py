"""Models: ``load(id_or_path)`` returns an adapter exposing the site grammar."""

from __future__ import annotations

import json
from pathlib import Path

from interp.errors import InterpError
from interp.models.adapter import Adapter, Batch, Hook, LlavaAdapter, Positions
from interp.models.organism import LVLM_DIR

__all__ = ["Adapter", "Batch", "Hook", "LlavaAdapter", "Positions", "load"]

CLIP_DIR = LVLM_DIR.parent / "clip"
ALIASES = {"organism": LVLM_DIR, "clip-organism": CLIP_DIR}
TRAIN_HINT = {"organism": "python -m interp.models.train", "clip-organism": "python -m interp.models.train_clip"}


def load(
    id_or_path: str | Path = "organism", *, device: str = "cpu", trust_remote_code: bool = False
) -> Adapter:
    """Load a checkpoint (local folder or HF id; ``organism`` / ``clip-organism`` = the embedded ones) into an
    adapter: ``LlavaAdapter`` for llava, ``ClipAdapter`` for clip and siglip.

    Weights are read from safetensors only; ``trust_remote_code`` stays off unless asked for.
    """
    from transformers import AutoConfig, AutoTokenizer, LlavaForConditionalGeneration

    src = ALIASES.get(str(id_or_path), id_or_path)
    path = Path(src)
    if path.exists() or str(id_or_path) in ALIASES:
        if not (path / "config.json").is_file() or not any(path.glob("*.safetensors")):
            hint = f" (train it: {TRAIN_HINT[str(id_or_path)]})" if str(id_or_path) in ALIASES else ""
            raise InterpError(f"missing weights: {path} has no config.json + *.safetensors{hint}")
    try:
        config = AutoConfig.from_pretrained(src, trust_remote_code=trust_remote_code)
    except OSError as e:
        raise InterpError(f"cannot load model {id_or_path!r}: {str(e).splitlines()[0]}") from None
    if config.model_type in ("clip", "siglip"):
        from interp.models.clip import load_dual_encoder

        return load_dual_encoder(src, str(id_or_path), device=device, trust_remote_code=trust_remote_code)
    if config.model_type != "llava":
        raise InterpError(f"unsupported architecture {config.model_type!r} for {id_or_path}: supported: llava, clip, siglip")
    model = LlavaForConditionalGeneration.from_pretrained(
        src, use_safetensors=True, trust_remote_code=trust_remote_code, attn_implementation="eager"
    ).to(device)
    tokenizer = AutoTokenizer.from_pretrained(src, trust_remote_code=trust_remote_code)
    pre = path / "preprocessor_config.json"
    preprocess = json.loads(pre.read_text()) if pre.is_file() else {}
    return LlavaAdapter(model, tokenizer, preprocess, model_id=str(id_or_path))
