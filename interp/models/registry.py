"""Adapter registry keyed by the HF config's ``model_type``; ``load(id_or_path)``.

Every check of a checkpoint happens here, before any weights are used: the folder (an alias, a
local folder, or a hub id fetched once into the local cache), the config, the kind of model a
caller needs, and the weights (safetensors only, no tensor missing or of another shape).
"""

from __future__ import annotations

import importlib
import logging
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Iterator

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
#: the embedded organisms: ``organism`` is organism v2 (trained under contrast, rotation and chest-tube shifts),
#: ``organism-v1`` the first one (most README figures before v2 were measured on it), ``organism-shortcut`` v1's
#: recipe with a chest tube beside every pneumothorax, ``clip-organism-biased`` with negated phrases rare in its
#: captions (an affirmation bias, as in medical CLIPs)
ALIASES = {"organism": _WEIGHTS / "lvlm", "organism-v1": _WEIGHTS / "lvlm-v1", "organism-shortcut": _WEIGHTS / "lvlm-shortcut",
           "clip-organism": _WEIGHTS / "clip", "clip-organism-biased": _WEIGHTS / "clip-biased"}
TRAIN_HINT = {"organism": "python -m interp.models.train --shifts",
              "organism-v1": "python -m interp.models.train --recipe v1 --out interp/models/weights/lvlm-v1 "
                             "--n-train-images 1500 --eval-images 100 --eval-cot-images 40",
              "organism-shortcut": "python -m interp.models.train --recipe v1 --out interp/models/weights/lvlm-shortcut "
                                   "--seed 1 --confounder-rate 1.0 --confounded pneumothorax --eval-images 100 "
                                   "--eval-cot-images 40 --shortcut-table",
              "clip-organism": "python -m interp.models.train_clip",
              "clip-organism-biased": "python -m interp.models.train_clip --steps 800 --negated-rate 0.05 "
                                      "--out interp/models/weights/clip-biased"}
#: what ``load(kind=...)`` can ask for: an LVLM has an ``lm`` tower, a dual encoder ``text`` and ``vision`` towers
KINDS = {"lvlm": "an LVLM", "dual": "a CLIP-style dual encoder"}
#: files fetched from the hub: config, processor, tokenizer, safetensors (never pickles), top level only
HUB_FILES = ["*.json", "*.jinja", "*.txt", "*.model", "*.tiktoken", "*.safetensors"]
HUB_TIMEOUT_S = 10


def family(model_type: str):
    """The adapter class of a ``model_type``; InterpError listing the supported ones otherwise."""
    if model_type not in FAMILIES:
        raise InterpError(f"unsupported architecture {model_type!r}: supported model types: {', '.join(sorted(FAMILIES))}")
    module, cls = FAMILIES[model_type].split(":")
    return getattr(importlib.import_module(module), cls)


def kind_of(adapter_class) -> str:
    """``lvlm`` or ``dual`` (see ``KINDS``) from an adapter class's towers."""
    return "lvlm" if "lm" in adapter_class.towers else "dual"


def load(id_or_path: str | Path = "organism", *, device: str = "cpu", kind: str | None = None,
         purpose: str | None = None, trust_remote_code: bool = False):
    """Load a checkpoint (local folder or HF id; an alias of ``ALIASES`` = an embedded one)
    into the adapter its config's ``model_type`` names.

    ``kind`` (``lvlm`` / ``dual``) is the kind of model the caller needs, ``purpose`` names the caller
    in the message when the model is of another kind. Weights are read from safetensors only;
    ``trust_remote_code`` stays off unless asked for.
    """
    from transformers import AutoConfig

    if kind is not None and kind not in KINDS:
        raise ValueError(f"kind must be one of {', '.join(KINDS)}, got {kind!r}")
    name = str(id_or_path)
    folder = checkpoint_folder(name, trust_remote_code)
    try:
        config = AutoConfig.from_pretrained(folder, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        raise InterpError(f"cannot load model {name!r}: {first_line(e)}") from None
    cls = family(config.model_type)
    if kind is not None and kind_of(cls) != kind:
        raise InterpError(f"{purpose or 'this command'} needs {KINDS[kind]} (kind {kind}); "
                          f"{name} is {KINDS[kind_of(cls)]} ({config.model_type})")
    return cls.from_pretrained(folder, name, device=device, trust_remote_code=trust_remote_code)


def checkpoint_folder(name: str, trust_remote_code: bool = False) -> Path:
    """The local folder of an alias, a folder or a hub id, holding config.json and safetensors weights."""
    path = ALIASES.get(name) or Path(name).expanduser()
    if name not in ALIASES and not path.is_dir():
        if path.exists() or not _is_hub_id(name):
            raise InterpError(f"no model at {name}: not a folder, not a hub id (owner/name) and not one of "
                              f"{', '.join(ALIASES)}")
        path = hub_folder(name, trust_remote_code)
    if not _complete(path):
        pickles = sorted(p.name for p in path.glob("*") if p.suffix in (".bin", ".pt", ".pth", ".ckpt"))
        if pickles:
            raise InterpError(f"{path} holds pickled weights only ({pickles[0]}): they are not loaded, since "
                              "unpickling can run code; save them as safetensors")
        hint = f" (train it: {TRAIN_HINT[name]})" if name in ALIASES else ""
        raise InterpError(f"missing weights: {path} has no config.json + *.safetensors{hint}")
    return path


def _complete(folder: Path) -> bool:
    return (folder / "config.json").is_file() and any(folder.glob("*.safetensors"))


def _is_hub_id(name: str) -> bool:
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return True


def hub_folder(repo_id: str, trust_remote_code: bool = False) -> Path:
    """The local snapshot of a hub repo: from the cache, else fetched (one request to find the
    revision, with a timeout and no retries; then its config, processor and safetensors files)."""
    from huggingface_hub import HfApi, snapshot_download

    files = dict(allow_patterns=HUB_FILES + ["*.py"] * trust_remote_code, ignore_patterns=["*/*"])
    with suppress(Exception):  # not (completely) in the cache: fetch it
        cached = Path(snapshot_download(repo_id, local_files_only=True, **files))
        if _complete(cached):
            return cached
    try:
        revision = HfApi().repo_info(repo_id, timeout=HUB_TIMEOUT_S).sha
        return Path(snapshot_download(repo_id, revision=revision, etag_timeout=HUB_TIMEOUT_S, **files))
    except Exception as e:  # offline, no network, no such repo, gated, ...: httpx and hub errors of many types
        raise InterpError(f"cannot fetch {repo_id} from the hub: {type(e).__name__}: {first_line(e)}; "
                          "give a local folder") from None


def load_weights(model_class, folder: Path, model_id: str, *, device: str = "cpu", trust_remote_code: bool = False):
    """``model_class.from_pretrained(folder)`` (safetensors, eager attention) on ``device``; InterpError
    naming a corrupt file, the first tensor whose shape differs from the config's, or the first
    missing tensor, where transformers would re-initialise it (nothing is logged)."""
    from safetensors import SafetensorError, safe_open

    for f in sorted(Path(folder).glob("*.safetensors")):
        try:
            with safe_open(f, "pt"):  # parses and checks the header against the file's size
                pass
        except (SafetensorError, OSError) as e:
            raise InterpError(f"corrupt weights {f}: {first_line(e)}") from None
    try:
        with _quiet("transformers.modeling_utils"):  # its load report; checked below
            model, info = model_class.from_pretrained(
                folder, use_safetensors=True, trust_remote_code=trust_remote_code, attn_implementation="eager",
                ignore_mismatched_sizes=True, output_loading_info=True)
    except (SafetensorError, OSError, RuntimeError, ValueError) as e:
        raise InterpError(f"cannot load the weights of {model_id}: {first_line(e)}") from None
    if info["mismatched_keys"]:
        key, stored, wanted = sorted(info["mismatched_keys"])[0]
        raise InterpError(f"weights of {model_id} do not match its config: {key} is {list(stored)} in the "
                          f"checkpoint, {list(wanted)} in the model ({len(info['mismatched_keys'])} tensors differ)")
    if info["missing_keys"]:
        missing = sorted(info["missing_keys"])
        raise InterpError(f"weights of {model_id} lack {len(missing)} of the model's tensors, first {missing[0]}")
    return model.to(device)


@contextmanager
def _quiet(logger: str) -> Iterator[None]:
    """Errors only from ``logger`` inside the block (a filter: transformers reads the level itself)."""
    log = logging.getLogger(logger)

    def errors(record: logging.LogRecord) -> bool:
        return record.levelno >= logging.ERROR

    log.addFilter(errors)
    try:
        yield
    finally:
        log.removeFilter(errors)


def first_line(e: BaseException) -> str:
    """The first line of an exception's message (its type when it has none), at most 200 characters."""
    return (str(e).strip() or type(e).__name__).splitlines()[0][:200].rstrip(" .")
