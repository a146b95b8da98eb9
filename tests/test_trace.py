"""Causal tracing / activation patching: the batched sweep against independent plain loops."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from interp.store import open_store
from interp.trace.__main__ import main
from interp.trace.patching import Noise, metric_fn, restore_sweep, window_layers
from interp.trace.reference import reference_trace
from interp.trace.sweep import read_sweep


@pytest.fixture(scope="module")
def metric(tiny_adapter):
    ids = tiny_adapter.tokenizer.convert_tokens_to_ids(["yes", "no"])
    return metric_fn("prob", ids[0], ids[1:])


@pytest.mark.parametrize(
    "tower,site,window",
    [("lm", "lm.embed", 1), ("lm", "lm.embed", 3), ("vision", "vision.embed", 1), ("vision", "vision.embed", 2)],
)
def test_trace_matches_rome_loop(tiny_adapter, one, metric, tower, site, window):
    n = one.input_ids.shape[1] if tower == "lm" else 1 + tiny_adapter.n_patches
    corrupted = one.positions[0].spans["image"] if tower == "lm" else list(range(1, 1 + tiny_adapter.n_patches))
    noise = Noise(site, tuple(corrupted), std=0.8, copies=4, seed=3)
    layers = range(tiny_adapter.n_layers(tower))
    groups = [[p] for p in range(0, n, 5)] + [[1, 2, 9], [n - 1]]
    got = restore_sweep(tiny_adapter, one, one, metric, tower=tower, layers=layers, groups=groups,
                        noise=noise, window=window, batch_size=37)
    ref, clean, corrupted_m = reference_trace(tiny_adapter.model, one.model_inputs(), int(one.answer_index[0]), metric,
                                              tower=tower, layers=layers, groups=groups, noise=noise, window=window)
    assert got.clean == pytest.approx(clean, abs=1e-6)
    assert got.corrupted == pytest.approx(corrupted_m, abs=1e-6)
    np.testing.assert_allclose(got.restored, ref, atol=1e-5)
    assert np.ptp(ref) > 1e-4  # the sweep is not trivially constant


def test_text_span_noise_and_noop_positions(tiny_adapter, one, metric):
    """Noise on the finding span: positions before it restore nothing (causal LM)."""
    span = one.positions[0].spans["finding"]
    noise = Noise("lm.embed", tuple(span), std=1.0, copies=3, seed=0)
    groups = [[p] for p in [0, 30, span[0] - 1, *span, one.input_ids.shape[1] - 1]]
    got = restore_sweep(tiny_adapter, one, one, metric, tower="lm", layers=[0, 2], groups=groups, noise=noise)
    ref, _, corrupted = reference_trace(tiny_adapter.model, one.model_inputs(), int(one.answer_index[0]), metric,
                                        tower="lm", layers=[0, 2], groups=groups, noise=noise)
    np.testing.assert_allclose(got.restored, ref, atol=1e-5)
    np.testing.assert_allclose(got.restored[:, :3], corrupted, atol=1e-6)


def _hand_patch(model, clean_inputs, corrupt_inputs, answer, metric, layer, positions, point):
    """Plain loop: cache the clean value of (layer, point) with a hook, write it into the corrupt run."""
    blocks = model.model.language_model.layers
    pre = point == "resid_pre"
    module = {"resid_pre": blocks[layer], "resid_post": blocks[layer], "mlp.out": blocks[layer].mlp,
              "attn.out": blocks[layer].self_attn}[point]
    store = {}

    def value(a, out):
        return a[0] if pre else out[0] if isinstance(out, tuple) else out

    def grab(m, a, out=None):
        store["v"] = value(a, out).clone()

    def put(m, a, out=None):
        value(a, out)[:, positions] = store["v"][:, positions]

    register = module.register_forward_pre_hook if pre else module.register_forward_hook
    with torch.no_grad():
        hd = register(grab)
        model(**clean_inputs)
        hd.remove()
        hd = register(put)
        logits = model(**corrupt_inputs).logits
        hd.remove()
    return float(metric(logits[:, answer])[0])


@pytest.mark.parametrize("point", ["resid_pre", "resid_post", "mlp.out", "attn.out"])
def test_pair_patching_matches_hand_loop(tiny_adapter, tiny_images, metric, point):
    """Activation patching between a negated and an affirmative prompt (and two images)."""
    clean = tiny_adapter.encode([tiny_images[0]], ["the costophrenic angles are not sharp . answer :"])
    corrupt = tiny_adapter.encode([tiny_images[1]], ["the costophrenic angles are sharp . . answer :"])
    groups = [[p] for p in range(clean.input_ids.shape[1])]
    layers = list(range(tiny_adapter.n_layers("lm")))
    got = restore_sweep(tiny_adapter, clean, corrupt, metric, tower="lm", layers=layers, groups=groups, point=point)
    answer = int(clean.answer_index[0])
    for li in layers:
        for p in (0, 5, 64, 68, answer):
            ref = _hand_patch(tiny_adapter.model, clean.model_inputs(), corrupt.model_inputs(), answer, metric, li, [p], point)
            assert got.restored[li, p] == pytest.approx(ref, abs=1e-5)


def test_window_is_romes():
    assert list(window_layers(0, 10, 48)) == list(range(0, 5))
    assert list(window_layers(20, 10, 48)) == list(range(15, 25))
    assert list(window_layers(47, 10, 48)) == list(range(42, 48))
    assert list(window_layers(3, 1, 4)) == [3]


def test_paired_inputs_must_align(tiny_adapter, tiny_images, metric):
    a = tiny_adapter.encode([tiny_images[0]], ["is there a nodule ? answer :"])
    b = tiny_adapter.encode([tiny_images[0]], ["is there a pleural effusion ? answer :"])
    with pytest.raises(ValueError, match="differ in length"):
        restore_sweep(tiny_adapter, a, b, metric, tower="lm", layers=[0], groups=[[0]])
    with pytest.raises(ValueError, match="layer out of range"):
        restore_sweep(tiny_adapter, a, a, metric, tower="lm", layers=[7], groups=[[0]])


@pytest.fixture(scope="module")
def organism_dir(tmp_path_factory):
    """An untrained organism with the full phantom vocabulary, saved as a checkpoint."""
    from interp.models.organism import build_organism, save_organism

    path = tmp_path_factory.mktemp("organism")
    save_organism(*build_organism(seed=1), path)
    return path


@pytest.mark.parametrize(
    "args,message",
    [
        (["--sites", "lm.blocks.*.bogus"], "unknown site"),
        (["--sites", "lm.blocks.9.resid_post"], "layer out of range"),
        (["--data", "nowhere.json"], "unknown data set"),
        (["--mode", "patch", "--corrupt", "image"], "does not go with"),
        (["--limit", "0"], "--limit: must be an integer >= 1"),
        (["--min-gap", "5"], "no sample among"),
        (["--sites", "lm.blocks.0.attn.pattern"], "cannot sweep site"),
    ],
)
def test_cli_bad_input(organism_dir, tmp_path, capsys, args, message):
    out = tmp_path / "out"
    assert main(["--layer-sweep", "--model", str(organism_dir), "--out", str(out), "--limit", "2", *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: ") and message in err[-1]
    assert not out.exists() and not list(tmp_path.glob(".sweep-*"))


def test_cli_unreadable_image(organism_dir, tmp_path, capsys):
    bad = tmp_path / "scan.png"
    bad.write_text("not a png")
    out = tmp_path / "o"
    args = ["--layer-sweep", "--model", str(organism_dir), "--out", str(out), "--image", str(bad), "--prompt", "is there a nodule ?"]
    assert main(args) == 2
    assert "unreadable image" in capsys.readouterr().err.strip().splitlines()[-1]
    assert not out.exists()


def test_cli_user_image(organism_dir, tmp_path):
    from PIL import Image

    path = tmp_path / "scan.png"
    Image.fromarray((np.random.default_rng(0).random((80, 80)) * 255).astype(np.uint8)).save(path)
    out = tmp_path / "o"
    args = ["--layer-sweep", "--model", str(organism_dir), "--out", str(out), "--image", str(path), "--prompt",
            "question : is there a nodule ? answer :", "--sites", "lm.blocks.2.resid_post", "--lm-positions", "span",
            "--copies", "2", "--min-gap", "0"]
    assert main(args) == 0
    tree = open_store(str(out / "sweep.zarr"))
    assert tree.attrs["dataset"]["ref"] == str(path) and tree["sweep/lm"].sizes["sample"] == 1
    assert tree["image_path"].values.tolist() == [str(path)] and tree["thumbnail"].shape == (1, 64, 64)


def test_cli_missing_weights(tmp_path, capsys):
    assert main(["--layer-sweep", "--model", str(tmp_path), "--out", str(tmp_path / "o")]) == 2
    assert "missing weights" in capsys.readouterr().err


def test_cli_end_to_end(organism_dir, tmp_path, capsys):
    out = tmp_path / "sweep"
    args = ["--layer-sweep", "--model", str(organism_dir), "--out", str(out), "--mode", "trace", "--corrupt", "image",
            "--limit", "2", "--copies", "2", "--min-gap", "0",
            "--sites", "vision.blocks.1.resid_post,lm.blocks.0.resid_post,lm.blocks.3.resid_post",
            "--vision-positions", "block4", "--lm-positions", "span"]
    assert main(args) == 0
    assert "report:" in capsys.readouterr().out
    towers = read_sweep(str(out / "sweep.zarr"))
    lm, vision = towers["lm"], towers["vision"]
    assert lm.sizes["sample"] == 2 and list(lm.layer.values) == [0, 3]
    assert lm.attrs["noise_scale"] == 3.0 and lm.attrs["calibration"] == {}  # ROME's fixed 3 x std
    assert lm.attrs["noise_std"] > 0 and not lm.attrs["circular"]
    assert set(lm.token.values[0]) >= {"image", "finding", "question"}
    assert vision.sizes["position"] == 1 + 4  # CLS + 2x2 blocks of 4x4 patches
    # restoring every position of the last LM layer's output restores the clean run exactly
    effect = lm.effect.sel(layer=3).values
    answer_group = list(lm.token.values[0]).index("answer")
    np.testing.assert_allclose(effect[:, answer_group], 1.0, atol=1e-4)
    # ground truth carried along: the finding's mask lies on some image patches
    assert float(vision.mask_fraction.max()) > 0
    html = (out / "report.html").read_text()
    assert "Plotly" in html and "<script src=\"http" not in html


def test_cli_nast_mode(organism_dir, tmp_path, capsys):
    """NAST tracing of the shipped CLIP organism: CTE of the negator at the embeddings is 0 by construction."""
    from interp.nast.cte import load_alphas

    assert main(["--layer-sweep", "--mode", "nast", "--model", str(organism_dir), "--out", str(tmp_path / "x")]) == 2
    assert "traces a text encoder" in capsys.readouterr().err
    out = tmp_path / "nast"
    assert main(["--layer-sweep", "--mode", "nast", "--limit", "2", "--out", str(out)]) == 0
    tree = open_store(str(out / "cte.zarr"))
    nast = tree["nast"]
    assert tree.attrs["dataset"]["ref"] == "phantom-claims" and tree.attrs["dataset"]["seeds"] == [0, 1, 2]
    assert nast.sizes["sample"] == 6 and sorted(set(nast["seed"].values.tolist())) == [0, 1, 2]
    assert all(i.startswith(f"seed{s}/") for i, s in zip(tree["sample"].values, nast["seed"].values))
    assert all(" no " in p for p in tree["prompt"].values) and set(tree["caption"].values) <= {"positive", "negated"}
    layer0 = nast["cte"].sel(layer=0)  # per pair (float32 model: a margin of ~1e-1 leaves ~1e-6 of noise)
    np.testing.assert_allclose(layer0.sel(role="negator"), 0.0, atol=1e-5)  # the cue itself swapped at layer 0
    np.testing.assert_allclose(layer0.sel(role="SOT"), 1.0, atol=1e-5)  # identical tokens
    assert float(nast["cte_mean"].sel(layer=0, role="negator")) == pytest.approx(0.0, abs=1e-6)
    assert float(nast["cte_mean"].sel(layer=0, role="SOT")) == pytest.approx(1.0, abs=1e-6)
    assert (nast["cte_ci_low"] <= nast["cte_mean"] + 1e-12).sel(layer=0, role=["SOT", "negator"]).all()
    assert [s["seed"] for s in nast.attrs["per_seed"]] == [0, 1, 2] and nast.attrs["n_pairs"] == 6
    alphas = load_alphas(str(out / "cte.zarr"), 4)
    assert alphas.min() == 0.0 and alphas.max() == 1.0
    np.testing.assert_array_equal(alphas, nast["alpha"].values[1:])
    assert "Negation tracing" in (out / "report.html").read_text()
