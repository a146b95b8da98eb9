"""Bad input found at load time, before any work: broken weights, model ids that name nothing, a model of
the wrong kind, oversized images, data set items pointing at images the data set lacks. Each raises
InterpError from the library, and through a CLI gives exit 2, one ``error:`` line and no output."""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
import warnings
from dataclasses import replace
from pathlib import Path
from typing import Callable

import pytest
from PIL import Image

from interp.cache.__main__ import main as cache_main
from interp.data.catalog import load_dataset
from interp.data.images import check_image, load_image
from interp.data.vqa import build_vqa
from interp.errors import InterpError
from interp.models import load
from interp.models.tiny import build_tiny
from interp.trace.__main__ import main as trace_main

BIG = (12000, 12000)  # 144 megapixels, over PIL's MAX_IMAGE_PIXELS; a 1-bit all-black PNG of 18 kB


def _images(root: Path, sizes: dict[str, tuple[int, int]]) -> Path:
    """PNGs named by ``sizes`` (W, H) in ``root`` and a prompts.csv asking about each."""
    root.mkdir(parents=True, exist_ok=True)
    for name, size in sizes.items():
        Image.new("1", size).save(root / name)
    with open(root / "prompts.csv", "w", newline="") as fh:
        csv.writer(fh).writerows([["image", "prompt"], *[[n, "is there a nodule ?"] for n in sizes]])
    return root


@pytest.fixture(scope="module")
def llava(tmp_path_factory) -> Path:
    return build_tiny("llava", tmp_path_factory.mktemp("llava"))


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return _images(tmp_path_factory.mktemp("images"), {"a.png": (32, 32)})


def cli_error(main: Callable, argv: list[str], out: Path, capfd) -> str:
    """Run a CLI that must refuse its input: exit 2, one ``error:`` line on stderr, ``out`` not created."""
    assert main([*argv, "--out", str(out)]) == 2
    err = capfd.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    assert not out.exists()
    return lines[0]


def cache_error(model: str | Path, data: str | Path, tmp_path: Path, capfd) -> str:
    return cli_error(cache_main, ["--model", str(model), "--data", str(data)], tmp_path / "out.zarr", capfd)


# --- weights ------------------------------------------------------------------------------


def _truncate(d: Path) -> None:
    f = d / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])


def _garble_header(d: Path) -> None:
    f = d / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[:8] + b"#" * 64 + data[72:])


def _resize_config(d: Path) -> None:
    cfg = json.loads((d / "config.json").read_text())
    cfg["text_config"]["intermediate_size"] += 32
    (d / "config.json").write_text(json.dumps(cfg))


def _drop_tensor(d: Path) -> None:
    from safetensors.torch import load_file, save_file

    tensors = load_file(d / "model.safetensors")
    del tensors[next(k for k in sorted(tensors) if k.endswith("down_proj.weight"))]
    save_file(tensors, d / "model.safetensors", metadata={"format": "pt"})


def _pickle_only(d: Path) -> None:
    import torch
    from safetensors.torch import load_file

    torch.save(load_file(d / "model.safetensors"), d / "pytorch_model.bin")
    (d / "model.safetensors").unlink()


BROKEN = {
    "truncated": (_truncate, r"corrupt weights .*model\.safetensors: .*header"),
    "garbled header": (_garble_header, r"corrupt weights .*model\.safetensors: .*header"),
    "shapes unlike the config": (_resize_config, r"do not match its config: \S+mlp\.\w+_proj\.weight is \[.*\] in the "
                                                  r"checkpoint, \[.*\] in the model"),
    "missing tensor": (_drop_tensor, r"lack 1 of the model's tensors, first \S+down_proj\.weight"),
    "pickles only": (_pickle_only, r"pickled weights only \(pytorch_model\.bin\)"),
}


@pytest.mark.parametrize("case", sorted(BROKEN))
def test_broken_weights_are_refused(case, llava, folder, tmp_path, capfd):
    mutate, message = BROKEN[case]
    model = tmp_path / "model"
    shutil.copytree(llava, model)
    mutate(model)
    with pytest.raises(InterpError, match=message) as e:
        load(model)
    assert cache_error(model, folder, tmp_path, capfd) == f"error: {e.value}"


# --- model ids ----------------------------------------------------------------------------


@pytest.mark.parametrize("missing", ["./no/such/dir", "{tmp}/nothing", "{tmp}/file.safetensors"])
def test_a_model_path_naming_nothing_is_one_line(missing, folder, tmp_path, capfd):
    (tmp_path / "file.safetensors").write_bytes(b"")
    model = missing.format(tmp=tmp_path)
    message = f"no model at {model}: not a folder, not a hub id"
    with pytest.raises(InterpError, match=message):
        load(model)
    assert cache_error(model, folder, tmp_path, capfd).startswith(f"error: {message}")


def test_an_unknown_hub_id_fails_fast_without_retries(folder, tmp_path):
    """No network here (or a repository that does not exist): one line, no retry warnings. The timeout
    is a safety net only; the command takes seconds."""
    message = "cannot fetch someone/unknown-model from the hub: "
    with pytest.raises(InterpError, match=message):
        load("someone/unknown-model")
    out = tmp_path / "out.zarr"
    run = subprocess.run([sys.executable, "-m", "interp.cache", "--model", "someone/unknown-model", "--data", str(folder),
                          "--out", str(out)], capture_output=True, text=True, timeout=60,
                         env={**os.environ, "PYTHONWARNINGS": "default"})
    assert run.returncode == 2 and run.stderr.count("\n") == 1, run.stderr
    assert run.stderr.startswith(f"error: {message}") and run.stderr.rstrip().endswith("give a local folder")
    assert not out.exists()


def test_a_hub_id_is_read_from_the_local_cache_first(llava, tmp_path, monkeypatch):
    import huggingface_hub.constants

    repo_id, sha = "interp-tests/no-such-model-3f9c", "0" * 40
    snapshot = tmp_path / f"models--{repo_id.replace('/', '--')}" / "snapshots" / sha
    shutil.copytree(llava, snapshot)
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text(sha)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    assert load(repo_id).model_id == repo_id
    (snapshot / "model.safetensors").unlink()  # an incomplete cache is fetched again, from a hub that lacks it
    with pytest.raises(InterpError, match=f"cannot fetch {repo_id} from the hub: .*; give a local folder"):
        load(repo_id)


# --- kind ---------------------------------------------------------------------------------


def test_a_model_of_the_wrong_kind_is_named(llava, tmp_path, capfd):
    with pytest.raises(InterpError, match=r"^nast train needs a CLIP-style dual encoder \(kind dual\); organism is an "
                                          r"LVLM \(llava\)$"):
        load("organism", kind="dual", purpose="nast train")
    with pytest.raises(InterpError, match=r"^this command needs an LVLM \(kind lvlm\); clip-organism is a CLIP-style "
                                          r"dual encoder \(clip\)$"):
        load("clip-organism", kind="lvlm")
    assert load("clip-organism", kind="dual").towers == ("vision", "text")
    err = cli_error(trace_main, ["--mode", "nast", "--model", str(llava)], tmp_path / "out", capfd)
    assert f"needs a CLIP-style dual encoder (kind dual); {llava} is an LVLM (llava)" in err


# --- images -------------------------------------------------------------------------------


def test_an_oversized_image_is_refused_from_its_header(tmp_path, monkeypatch):
    _images(tmp_path, {"big.png": BIG})
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no DecompressionBombWarning
        for read in (check_image, load_image):
            with pytest.raises(InterpError, match=r"big\.png is too large \(12000 x 12000 pixels, limit 89478485\)"):
                read(tmp_path / "big.png")
        monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # over twice the limit PIL itself refuses to open
        _images(tmp_path, {"small.png": (15, 15)})
        with pytest.raises(InterpError, match=r"small\.png is too large \(over 200 pixels, limit 100\)"):
            load_image(tmp_path / "small.png")


def test_a_data_set_with_an_oversized_image_is_refused_when_loaded(llava, tmp_path, capfd):
    data = _images(tmp_path / "images", {"a.png": (32, 32), "big.png": BIG})
    with pytest.raises(InterpError, match="big.png is too large"):
        load_dataset(str(data))  # headers only: no image is decoded
    assert "big.png is too large (12000 x 12000 pixels" in cache_error(llava, data, tmp_path, capfd)


# --- data sets ----------------------------------------------------------------------------


@pytest.mark.parametrize("index", [2, -1])
def test_items_pointing_at_images_the_data_set_lacks(index, llava, tmp_path, capfd):
    data = build_vqa(2, seed=0, split="test")
    items = list(data.items)
    bad = next(i for i, it in enumerate(items) if it.image == 1)
    items[bad] = replace(items[bad], image=index)
    path = replace(data, items=items).save(tmp_path / "vqa.json")
    message = rf"item {items[bad].id} points at image {index}, but the data set has 2 images"
    with pytest.raises(InterpError, match=message):
        load_dataset(str(path))
    assert "points at image" in cache_error(llava, path, tmp_path, capfd)
