"""Shared fixtures: a seeded random-init tiny LLaVA organism, in memory and saved as a checkpoint;
the real annotation files shipped in the torchxrayvision wheel.

The tokenizer uses a fixed word list (not ``interp.data.vqa.vocabulary()``) so model fixtures do
not depend on the data layer's vocabulary changing.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

TXV_VERSION = "1.5.7"

TINY_WORDS = (
    "is there a pleural effusion pneumothorax nodule on the left right lung ? yes no answer : "
    "the costophrenic angles are sharp . not present"
).split()


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models gain nothing from intra-op threads; on 2 shared cores extra ones spin-wait."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def tiny_parts():
    """(model, tokenizer): random-init organism-architecture LLaVA, seed 0, eager attention."""
    from transformers import LlavaForConditionalGeneration

    from interp.models.organism import organism_config
    from interp.models.tokenizer import word_tokenizer

    tok = word_tokenizer(TINY_WORDS)
    torch.manual_seed(0)
    model = LlavaForConditionalGeneration(organism_config(len(tok)))
    model.set_attn_implementation("eager")
    return model.eval(), tok


@pytest.fixture(scope="session")
def tiny_adapter(tiny_parts):
    """The in-memory organism wrapped in a ``LlavaAdapter`` (same preprocessing a load() gives)."""
    from interp.models.llava import LlavaAdapter
    from interp.models.organism import organism_processor

    model, tok = tiny_parts
    return LlavaAdapter(model, organism_processor(tok), model_id="tiny-seed0")


@pytest.fixture(scope="session")
def tiny_model_dir(tiny_parts, tmp_path_factory):
    """The same organism saved with ``save_organism`` (safetensors + config + tokenizer + preprocessor)."""
    from interp.models.organism import save_organism

    path = tmp_path_factory.mktemp("tiny_llava")
    save_organism(*tiny_parts, path)
    return path


@pytest.fixture(scope="session")
def tiny_images():
    """Three distinct grey images [64, 64] in [0, 1] (one at another size, to exercise resizing)."""
    rng = np.random.default_rng(0)
    return [
        rng.random((64, 64), dtype=np.float32),
        np.linspace(0, 1, 64 * 64, dtype=np.float32).reshape(64, 64),
        rng.random((96, 96), dtype=np.float32),
    ]


@pytest.fixture(scope="session")
def acts_store(tmp_path_factory) -> str:
    """A results store of the shipped organism on 24 training phantoms: vision, projector and LM sites."""
    from interp.cache.__main__ import main

    path = str(tmp_path_factory.mktemp("acts") / "store.zarr")
    assert main(["--data", "phantom-train:24", "--sites", "vision.blocks.*.resid_post,projector.out,lm.blocks.*.resid_post",
                 "--out", path, "--chunk-samples", "8"]) == 0
    return path


@pytest.fixture(scope="session")
def txv_data() -> Path:
    """The ``torchxrayvision/data`` folder of the torchxrayvision wheel (real annotation files, no images),
    fetched once into ~/.cache/interp-test; skips when the wheel cannot be fetched. Never installed (it pulls
    torchvision); the files' licenses vary, so they stay out of the repository."""
    root = Path.home() / ".cache" / "interp-test" / f"torchxrayvision-{TXV_VERSION}"
    data = root / "torchxrayvision" / "data"
    if data.is_dir():
        return data
    data.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=root) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--retries", "1", "--timeout", "20",
               f"torchxrayvision=={TXV_VERSION}", "-d", tmp]
        try:
            subprocess.run(cmd, check=True, capture_output=True, timeout=300)
        except (subprocess.SubprocessError, OSError) as e:
            pytest.skip(f"cannot fetch the torchxrayvision wheel: {e}")
        wheel = next(Path(tmp).glob("torchxrayvision-*.whl"))
        with zipfile.ZipFile(wheel) as z:
            z.extractall(tmp, [n for n in z.namelist() if n.startswith("torchxrayvision/data/")])
        (Path(tmp) / "torchxrayvision" / "data").rename(data)
    return data


@pytest.fixture(scope="session")
def organism():
    """The shipped LVLM organism, loaded once."""
    from interp.models.registry import load

    return load("organism")


@pytest.fixture(scope="session")
def one(tiny_adapter, tiny_images):
    """The trace tests' sample: one image and a presence question (its finding span named), encoded."""
    return tiny_adapter.encode([tiny_images[0]], ["is there a pleural effusion on the left ? answer :"], [{"finding": (11, 27)}])
