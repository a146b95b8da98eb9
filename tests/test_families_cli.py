"""Every family end to end from the command line: the layer sweep and the cache on a small folder of
real image files with prompts, through ``--model DIR`` of a tiny checkpoint; bad input per the contract."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
from PIL import Image

from interp.cache.__main__ import main as cache_main
from interp.errors import InterpError
from interp.models import load
from interp.models.registry import FAMILIES
from interp.models.tiny import BUILDERS, build_tiny
from interp.store import open_store
from interp.trace.__main__ import main as trace_main
from interp.trace.sweep import read_sweep

PROMPTS = ["is there a left pleural effusion ?", "is there a nodule on the right lung ?"]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """Two PNGs of different sizes and a prompts.csv naming them."""
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for name, shape in (("a.png", (48, 40)), ("b.png", (32, 32))):
        Image.fromarray((rng.random(shape) * 255).astype(np.uint8)).save(root / name)
    with open(root / "prompts.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["image", "prompt"])
        w.writerows([["a.png", PROMPTS[0]], ["b.png", PROMPTS[1]]])
    return root


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    return {name: build_tiny(name, tmp_path_factory.mktemp(name.replace("-", "_"))) for name in sorted(BUILDERS)}


def test_every_registered_family_has_a_tiny_builder():
    assert set(BUILDERS) <= set(FAMILIES)
    assert set(FAMILIES) - set(BUILDERS) <= {"smolvlm"}  # built by save_tiny_idefics3(kind="smolvlm")


@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_sweep_and_cache_run_on_every_family(name, checkpoints, folder, tmp_path, capsys):
    model = str(checkpoints[name])
    assert trace_main(["--layer-sweep", "--model", model, "--data", str(folder), "--min-gap", "0", "--limit", "1",
                       "--copies", "2", "--out", str(tmp_path / "sweep")]) == 0, capsys.readouterr().err
    adapter = load(model)
    # image corruption: every tower that sees the image (a dual encoder's text tower does not)
    towers = read_sweep(str(tmp_path / "sweep" / "sweep.zarr"))
    assert set(towers) == {t for t in adapter.towers if t in ("vision", "lm") and (t != "vision" or adapter.vision_batched)}
    for group, ds in towers.items():
        eff = ds.restored.values
        assert ds.sizes["layer"] == adapter.n_layers(group) and np.isfinite(eff[~np.isnan(eff)]).all()
    assert (tmp_path / "sweep" / "report.html").is_file()
    out = tmp_path / "cache.zarr"
    assert cache_main(["--model", model, "--data", str(folder), "--out", str(out), "--chunk-samples", "1"]) == 0
    ds = open_store(str(out))["acts"].to_dataset()
    assert ds.sizes["sample"] == 2 and ds.attrs["adapter"] == adapter.name
    # the cached LM/text values of a sample equal a direct run of the adapter on that sample's image and prompt
    tower = "lm" if "lm" in adapter.towers else "text"
    site = f"{tower}.blocks.{adapter.n_layers(tower) - 1}.resid_post"
    img = np.asarray(Image.open(folder / "b.png"), np.float32)
    batch = adapter.encode([(img - img.min()) / (img.max() - img.min())], [PROMPTS[1]])
    _, cache = adapter.run(batch, read=site)
    real = [i for i, k in enumerate(batch.positions[0].kinds) if k != "pad"]
    np.testing.assert_allclose(ds[site][1, real].values, cache[site][0, real].numpy(), atol=1e-5)
    assert np.isnan(ds[site][1].values[~ds["valid"][1].values]).all()  # pads are NaN, marked invalid


def test_clip_sweeps_both_towers_through_the_cli(tmp_path, capsys):
    """Used to die with a raw IndexError (a hidden CLS assumption)."""
    for sites, corrupt in (("vision.blocks.*.resid_post", "image"), ("text.blocks.*.resid_post", "finding")):
        rc = trace_main(["--layer-sweep", "--model", "clip-organism", "--sites", sites, "--corrupt", corrupt,
                         "--min-gap", "0", "--limit", "2", "--copies", "2", "--out", str(tmp_path / corrupt)])
        assert rc == 0, capsys.readouterr().err
    vision = read_sweep(str(tmp_path / "image" / "sweep.zarr"))["vision"]
    assert vision.attrs["metric"] == "logit" and vision.sizes["position"] == 65  # CLS + 8 x 8 patches
    assert (vision.kind.values[0, 1:] == "image").all() and vision.mask_fraction.values.max() > 0
    text = read_sweep(str(tmp_path / "finding" / "sweep.zarr"))["text"]
    assert text.sizes["layer"] == 4


def _one_line_exit_2(argv, capsys, main=trace_main) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.startswith("error: "), err
    return err


def test_unsupported_architecture_lists_the_families(tmp_path, capsys):
    from transformers import BertConfig, BertModel

    BertModel(BertConfig(hidden_size=8, num_hidden_layers=1, num_attention_heads=2, intermediate_size=8,
                         vocab_size=10)).save_pretrained(tmp_path)
    err = _one_line_exit_2(["--layer-sweep", "--model", str(tmp_path), "--out", str(tmp_path / "o")], capsys)
    assert "unsupported architecture 'bert'" in err and "qwen2_5_vl" in err and "llava" in err
    assert not (tmp_path / "o").exists()


def test_missing_processor_is_one_line(checkpoints, tmp_path, capsys):
    import shutil

    folder = tmp_path / "llava"
    shutil.copytree(checkpoints["llava"], folder)
    for f in folder.glob("*"):
        if f.name.startswith(("processor", "preprocessor", "chat_template")):
            f.unlink()
    err = _one_line_exit_2(["--layer-sweep", "--model", str(folder), "--out", str(tmp_path / "o")], capsys)
    assert "processor" in err and not (tmp_path / "o").exists()


def test_input_the_processor_rejects_is_one_line(checkpoints):
    adapter = load(str(checkpoints["llava"]))
    with pytest.raises(InterpError, match="rejected the input"):  # a second image placeholder, one image
        adapter.encode([np.zeros((32, 32), np.float32)], ["<image> is there a nodule ?"])
    with pytest.raises(InterpError, match="wrong image shape"):
        adapter.encode([np.zeros((32, 32, 2), np.float32)], ["is there a nodule ?"])


def test_tiny_cli_refuses_a_used_folder(tmp_path, capsys):
    from interp.models.tiny import main

    (tmp_path / "x").write_text("")
    err = _one_line_exit_2(["--family", "llava", "--out", str(tmp_path)], capsys, main)
    assert "not an empty folder" in err
    assert json.loads(json.dumps(sorted(BUILDERS)))  # the CLI's choices
