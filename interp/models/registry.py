"""Adapter registry keyed by the HF config's ``model_type``; ``load(id_or_path)``."""

from __future__ import annotations

import importlib
from pathlib import Path

from interp.errors import InterpError

# model_type -> "module:Class"; each family lives in one module
FAMILIES = {
    "llava": "interp.models.llava:LlavaAdapter",
    "qwen2_5_vl": "interp.models.qwen2_5_vl:Qwen25VLAdapter",
    "clip": "interp.models.clip:ClipAdapter",
    "siglip": "interp.models.clip:ClipAdapter",
    "idefics3": "interp.models.idefics3:Idefics3Adapter",
    "smolvlm": "interp.models.idefics3:SmolVLMAdapter",
    "gemma3": "interp.models.gemma3:Gemma3Adapter",
    "blip-2": "interp.models.blip2:Blip2Adapter",
    "llava_next": "interp.models.llava_next:LlavaNextAdapter",
}
_WEIGHTS = Path(__file__).parent / "weights"
ALIASES = {"organism": _WEIGHTS / "lvlm", "clip-organism": _WEIGHTS / "clip"}
TRAIN_HINT = {"organism": "python -m interp.models.train", "clip-organism": "python -m interp.models.train_clip"}


def family(model_type: str):
    """The adapter class of a ``model_type``; InterpError listing the supported ones otherwise."""
    if model_type not in FAMILIES:
        raise InterpError(f"unsupported architecture {model_type!r}: supported model types: {', '.join(sorted(FAMILIES))}")
    module, cls = FAMILIES[model_type].split(":")
    return getattr(importlib.import_module(module), cls)


def load(id_or_path: str | Path = "organism", *, device: str = "cpu", trust_remote_code: bool = False):
    """Load a checkpoint (local folder or HF id; ``organism`` / ``clip-organism`` = the embedded ones)
    into the adapter its config's ``model_type`` names.

    Weights are read from safetensors only; ``trust_remote_code`` stays off unless asked for.
    """
    from transformers import AutoConfig

    name = str(id_or_path)
    src = ALIASES.get(name, id_or_path)
    path = Path(src)
    if path.exists() or name in ALIASES:
        if not (path / "config.json").is_file() or not any(path.glob("*.safetensors")):
            hint = f" (train it: {TRAIN_HINT[name]})" if name in ALIASES else ""
            raise InterpError(f"missing weights: {path} has no config.json + *.safetensors{hint}")
    try:
        config = AutoConfig.from_pretrained(src, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        raise InterpError(f"cannot load model {name!r}: {str(e).splitlines()[0]}") from None
    return family(config.model_type).from_pretrained(src, name, device=device, trust_remote_code=trust_remote_code)
