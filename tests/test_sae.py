"""SAEs from the store: the streaming provider against direct reads, sae_lens's own loader and trainer,
metrics against hand computations, resumption, and the CLI end to end on the organism."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from interp.cache import acts_layout
from interp.errors import InterpError
from interp.sae.config import SAETrainConfig
from interp.sae.data import StoreActivations
from interp.store import SampleIndex, StoreWriter

N, CS, D = 12, 4, 6
SITES = {"vision.blocks.0.resid_post": (5, D), "projector.out": (4, D)}  # CLS + 2x2 patches; 2x2 patches
GRIDS = {"vision.blocks.0.resid_post": (2, 2, True), "projector.out": (2, 2, False)}
IMAGE = [i // 2 for i in range(N)]  # two questions per image: the same vision features


def values(site: str) -> np.ndarray:
    """Deterministic activations, equal for samples of one image (an independent reference for reads)."""
    n_pos = SITES[site][0]
    base = np.arange(max(IMAGE) + 1)[:, None, None] * 100.0 + np.arange(n_pos)[None, :, None] * 10 + np.arange(D)
    return base[IMAGE].astype(np.float32)


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> str:
    url = str(tmp_path_factory.mktemp("sae") / "acts.zarr")
    fields, statics = acts_layout(SITES, GRIDS, 3, "float32", [])
    index = SampleIndex([f"s{i}" for i in range(N)], {"image_path": [""] * N}, IMAGE,
                        dataset={"ref": "synthetic", "limit": None, "name": "synthetic", "hash": "h"})
    w = StoreWriter(url, "acts", samples=index, fields=fields, statics=statics, meta={"model_id": "x"}, chunk_samples=CS)
    for r in w.pending():
        seq = {"tokens": np.zeros((len(r), 3)), "token_text": np.full((len(r), 3), "", object),
               "position_kind": np.full((len(r), 3), 3), "position_row": np.full((len(r), 3), -1),
               "position_col": np.full((len(r), 3), -1), "position_span": np.zeros((len(r), 3)),
               "valid": np.ones((len(r), 3), bool)}
        w.write(r.start, {**seq, **{s: values(s)[r.start:r.stop] for s in SITES}})
    w.close()
    return url


def test_split_by_image_and_one_sample_per_image(store: str) -> None:
    train = StoreActivations(store, "projector.out", split="train", test_fraction=0.34)
    test = StoreActivations(store, "projector.out", split="test", test_fraction=0.34)
    images = [IMAGE[r] for r in train.samples] + [IMAGE[r] for r in test.samples]
    assert sorted(images) == list(range(N // 2))  # every image once, on one side only
    assert len(test.samples) == 3 and set(train.samples).isdisjoint(test.samples)


@pytest.mark.parametrize("site, tokens, n_pos", [("vision.blocks.0.resid_post", "patch", 4),
                                                 ("vision.blocks.0.resid_post", "cls", 1),
                                                 ("vision.blocks.0.resid_post", "all", 5),
                                                 ("projector.out", "patch", 4)])
def test_one_epoch_streams_exactly_the_split(store: str, site: str, tokens: str, n_pos: int) -> None:
    src = StoreActivations(store, site, tokens, "train", test_fraction=0.34)
    want = values(site)[src.samples][:, src.positions].reshape(-1, D)
    assert len(src.positions) == n_pos and src.n_tokens == len(want)
    plain = torch.cat(list(src.batches(5, shuffle=False, epochs=1))).numpy()
    np.testing.assert_array_equal(plain, want)
    shuffled = torch.cat(list(src.batches(2, epochs=1, buffer_chunks=1))).numpy()
    assert len(shuffled) == len(want) // 2 * 2  # full batches only; the rest carries into the next epoch
    rows = {tuple(r) for r in want}
    assert {tuple(r) for r in shuffled} <= rows and not np.array_equal(shuffled, want[: len(shuffled)])


def test_validation_split_leaves_the_test_images_alone(store: str) -> None:
    parts = {s: StoreActivations(store, "projector.out", split=s, test_fraction=0.3, val_fraction=0.3).samples
             for s in ("train", "val", "test")}
    assert sorted(np.concatenate(list(parts.values()))) == sorted(
        StoreActivations(store, "projector.out", test_fraction=0).samples)  # disjoint, every image once
    assert all(len(p) == 2 for p in parts.values())
    np.testing.assert_array_equal(parts["test"], StoreActivations(store, "projector.out", split="test",
                                                                  test_fraction=0.3).samples)
    with pytest.raises(InterpError, match="leave images to train on"):
        StoreActivations(store, "projector.out", test_fraction=0.5, val_fraction=0.5)


def test_inits_keep_the_best_on_validation(store: str, tmp_path: Path) -> None:
    """Two inits: the kept SAE is the one whose validation score, recomputed here, is higher (no labels in this
    store: explained variance)."""
    from sae_lens import SAE

    from interp.sae.data import config_split
    from interp.sae.metrics import reconstruction
    from interp.sae.train import train_sae

    cfg = SAETrainConfig(store=store, site="projector.out", k=2, expansion=2, batch_size=4, training_tokens=32,
                         checkpoint_every=0, test_fraction=0.3, val_fraction=0.3, inits=2, out=str(tmp_path))
    kept = SAE.load_from_disk(str(train_sae(cfg))).state_dict()
    val = config_split(cfg, "val")
    ev = {seed: reconstruction(SAE.load_from_disk(str(tmp_path / "inits" / str(seed) / "sae")), val)["explained_variance"]
          for seed in (0, 1)}
    log = json.loads((tmp_path / "train.json").read_text())
    assert [r["score"] for r in log["inits"]] == pytest.approx([ev[0], ev[1]])
    assert log["chosen_seed"] == max(ev, key=ev.get) and ev[0] != ev[1]
    want = SAE.load_from_disk(str(tmp_path / "inits" / str(log["chosen_seed"]) / "sae")).state_dict()
    assert all(torch.equal(kept[k], want[k]) for k in want)


def test_position_mean_and_centred_tokens_by_hand(store: str) -> None:
    from interp.sae.data import position_mean

    src = StoreActivations(store, "vision.blocks.0.resid_post", "all", "train", test_fraction=0.34)
    raw = values("vision.blocks.0.resid_post")[src.samples][:, src.positions]
    mean = position_mean(src)
    np.testing.assert_allclose(mean, raw.mean(0), rtol=1e-6)
    src.centre = mean
    got = torch.cat(list(src.batches(5, shuffle=False, epochs=1))).numpy()
    np.testing.assert_allclose(got, (raw - raw.mean(0)).reshape(-1, D), atol=1e-4)


def test_centred_sae_saves_its_mean_and_reads_centred_tokens(store: str, tmp_path: Path) -> None:
    from sae_lens import SAE

    from interp.sae.analysis import load_centre, sae_source
    from interp.sae.data import config_split
    from interp.sae.train import train_sae

    cfg = SAETrainConfig(store=store, site="projector.out", centre="position", k=2, expansion=2, batch_size=4,
                         training_tokens=32, checkpoint_every=0, test_fraction=0.34, inits=1, out=str(tmp_path))
    SAE.load_from_disk(str(train_sae(cfg)))  # still sae_lens's format
    mean, positions = load_centre(str(tmp_path / "sae"))
    test = sae_source(cfg, "test")
    raw = values("projector.out")[test.samples][:, test.positions]
    train_rows = config_split(cfg, "train").samples
    np.testing.assert_allclose(mean, values("projector.out")[train_rows][:, positions].mean(0), rtol=1e-6)
    np.testing.assert_allclose(torch.cat(list(test.batches(1, shuffle=False, epochs=1))).numpy(),
                               (raw - mean).reshape(-1, D), atol=1e-4)


def test_start_skips_batches_exactly(store: str) -> None:
    src = StoreActivations(store, "projector.out", "patch", "train", test_fraction=0.34, seed=3)
    stream = src.batches(3)
    first = [next(stream) for _ in range(9)]
    resumed = src.batches(3, start=4)
    for b in first[4:]:
        assert torch.equal(next(resumed), b)


def test_bad_sources(store: str, tmp_path: Path) -> None:
    with pytest.raises(InterpError, match="not a vision"):
        StoreActivations(store, "lm.blocks.0.resid_post")
    with pytest.raises(InterpError, match="is not in"):
        StoreActivations(store, "vision.blocks.7.resid_post")
    with pytest.raises(InterpError, match="unknown tokens"):
        StoreActivations(store, "projector.out", tokens="everything")
    with pytest.raises(InterpError, match="has no cls tokens"):
        StoreActivations(store, "projector.out", tokens="cls")


def test_reporting_keeps_strong_activations_of_sparse_features() -> None:
    from interp.sae.analysis import reporting

    acts = np.array([[1.0, 0.2, 0.9], [0.4, 0.0, 0.1]])
    got = reporting(acts, peak=np.array([1.0, 0.5, 1.0]), density=np.array([0.2, 0.9, 0.6]), cut=0.5, cap=0.7)
    np.testing.assert_array_equal(got, [[1.0, 0.0, 0.9], [0.0, 0.0, 0.0]])  # feature 1: active on 90% > 70%


def test_metrics_against_hand_computation(store: str) -> None:
    """A ReLU SAE with identity weights: the code is relu(x), the reconstruction relu(x)."""
    from sae_lens import StandardSAE, StandardSAEConfig

    from interp.sae.metrics import reconstruction

    sae = StandardSAE(StandardSAEConfig(d_in=D, d_sae=D, apply_b_dec_to_input=False))
    with torch.no_grad():
        for p in sae.parameters():
            p.zero_()
        sae.W_enc.copy_(torch.eye(D))
        sae.W_dec.copy_(torch.eye(D))
        sae.b_dec.copy_(torch.tensor([0, 0, 0, 0, 0, -1000.0]))  # feature 5 reconstructs badly, on purpose
        sae.b_enc.copy_(torch.tensor([0, -1e9, 0, 0, 0, 0]))  # feature 1 never fires: dead
    src = StoreActivations(store, "projector.out", split="train", test_fraction=0.34)
    x = values("projector.out")[src.samples].reshape(-1, D).astype(np.float64)
    code = np.maximum(x + np.array([0, -1e9, 0, 0, 0, 0]), 0)
    recon = code + np.array([0, 0, 0, 0, 0, -1000.0])
    got = reconstruction(sae, src, batch_size=7)
    ev = 1 - ((recon - x) ** 2).sum() / ((x - x.mean(0)) ** 2).sum()
    assert got["explained_variance"] == pytest.approx(ev, rel=1e-9)
    assert got["l0"] == pytest.approx((code > 0).sum(1).mean())
    assert got["dead_features"] == 1 and got["dense_features"] == int(((code > 0).mean(0) > 0.1).sum())
    assert got["tokens"] == len(x)


@pytest.fixture(scope="module")
def trained(store: str, tmp_path_factory) -> tuple[SAETrainConfig, Path]:
    from interp.sae.train import train_sae

    cfg = SAETrainConfig(store=store, site="projector.out", k=2, expansion=2, batch_size=4, training_tokens=64,
                         checkpoint_every=32, test_fraction=0.34, inits=1, out=str(tmp_path_factory.mktemp("run")))
    return cfg, train_sae(cfg)


@pytest.mark.parametrize("architecture, inference", [("standard", "standard"), ("topk", "topk"),
                                                     ("batchtopk", "jumprelu"), ("jumprelu", "jumprelu"),
                                                     ("matryoshka", "jumprelu")])
def test_every_architecture_loads_with_sae_lens(store: str, tmp_path: Path, architecture: str, inference: str) -> None:
    """Saved as SAELens's inference model: its own loader opens it (BatchTopK becomes a JumpReLU SAE)."""
    from sae_lens import SAE

    from interp.sae.train import train_sae

    cfg = SAETrainConfig(store=store, site="projector.out", architecture=architecture, k=2, expansion=2, batch_size=4,
                         training_tokens=32, checkpoint_every=0, test_fraction=0.34, widths="4", inits=1,
                         out=str(tmp_path))
    sae = SAE.load_from_disk(str(train_sae(cfg)))
    assert sae.cfg.architecture() == inference and sae.cfg.d_in == D and sae.cfg.d_sae == 2 * D
    assert sae.cfg.metadata.hook_name == "projector.out"
    x = torch.from_numpy(values("projector.out")[:3, 0])
    assert sae.decode(sae.encode(x)).shape == x.shape


def test_resume_from_a_checkpoint_ends_where_an_uninterrupted_run_ends(trained) -> None:
    import shutil

    from sae_lens import SAE

    from interp.sae.train import train_sae

    cfg, path = trained
    full = {k: v.clone() for k, v in SAE.load_from_disk(str(path)).state_dict().items()}
    shutil.rmtree(path)  # as if killed after the checkpoint: the rerun resumes from it
    resumed = SAE.load_from_disk(str(train_sae(cfg))).state_dict()
    log = json.loads((Path(cfg.out) / "train.json").read_text())
    assert log["resumed_from"].endswith("checkpoints/36")  # not a fresh run (that would match too, being seeded)
    for k, v in full.items():
        torch.testing.assert_close(resumed[k], v, rtol=1e-5, atol=1e-6)


def test_checkpoints_of_another_run_are_not_resumed(trained) -> None:
    """A rerun with other settings (or another store's model) refuses the old checkpoints instead of resuming them."""
    from dataclasses import replace

    from interp.sae.train import train_sae

    cfg, _ = trained
    with pytest.raises(InterpError, match="holds checkpoints of another run"):
        train_sae(replace(cfg, lr=cfg.lr * 2))


# --- the organism end to end --------------------------------------------------------------


@pytest.fixture(scope="module")
def organism_store(tmp_path_factory) -> str:
    from interp.cache.__main__ import main as cache_main

    out = str(tmp_path_factory.mktemp("org") / "acts.zarr")
    assert cache_main(["--data", "phantom-train:30", "--sites", "projector.out", "--out", out, "--chunk-samples", "8"]) == 0
    return out


@pytest.mark.parametrize("centred", [False, True])
def test_exact_splice_changes_nothing(organism_store: str, centred: bool) -> None:
    """relu(x) - relu(-x) = x: an SAE with W_enc = [I, -I], W_dec = [I; -I] reconstructs exactly, so splicing
    it in leaves the answers as they are (KL 0, all the loss recovered), unlike zero- and mean-ablation; also
    when it reads the tokens less a per-position centre (added back after it), and the mean-ablation value
    stays the tokens' own mean."""
    from sae_lens import StandardSAE, StandardSAEConfig

    from interp.data.catalog import load_dataset
    from interp.models import load
    from interp.sae.metrics import downstream, token_mean

    adapter, data = load("organism"), load_dataset("phantom-train:30")
    test = StoreActivations(organism_store, "projector.out", split="test", test_fraction=0.2)
    d = test.d_in
    sae = StandardSAE(StandardSAEConfig(d_in=d, d_sae=2 * d, apply_b_dec_to_input=False))
    with torch.no_grad():
        for p in sae.parameters():
            p.zero_()
        sae.W_enc.copy_(torch.cat([torch.eye(d), -torch.eye(d)], 1))
        sae.W_dec.copy_(torch.cat([torch.eye(d), -torch.eye(d)], 0))
    items = [data.items[r] for r in test.samples]
    raw_mean = token_mean(test)
    if centred:
        test.centre = np.random.default_rng(0).normal(size=(len(test.positions), d)).astype(np.float32) * 3
        torch.testing.assert_close(token_mean(test), raw_mean, rtol=1e-5, atol=1e-5)
    got = downstream(adapter, sae, test, items, data.image, raw_mean)
    assert got["sae"]["kl"] == pytest.approx(0.0, abs=1e-9) and got["sae"]["ce"] == pytest.approx(got["clean"]["ce"], rel=1e-5)
    assert got["sae"]["loss_recovered_vs_zero"] == pytest.approx(1.0) and got["zero"]["kl"] > 0.01
    batch = adapter.encode([data.image(it.image) for it in items], [it.prompt for it in items])
    logits, _ = adapter.run(batch)  # the clean accuracy, independently
    top = adapter.readout(logits, batch).argmax(-1)
    want = np.mean([adapter.tokenizer.convert_ids_to_tokens(int(t)) == it.answer for t, it in zip(top, items)])
    assert got["clean"]["accuracy"] == pytest.approx(want)


def test_cli_train_and_analyze(organism_store: str, tmp_path: Path, capsys) -> None:
    from interp.sae.__main__ import main

    out = tmp_path / "sae"
    assert main(["train", "--store", organism_store, "--training-tokens", "4096", "--batch-size", "256",
                 "--test-fraction", "0.2", "--checkpoint-every", "0", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "explained variance" in printed and "cardiomegaly" in printed
    log = json.loads((out / "train.json").read_text())
    assert set(log["held_out"]["finding_auroc"]) == {"pleural_effusion", "pneumothorax", "consolidation", "nodule",
                                                     "cardiomegaly"}
    assert main(["analyze", "--out", str(out), "--downstream-samples", "4", "--features", "3", "--top-k", "3"]) == 0
    result = json.loads((out / "analysis.json").read_text())
    assert {"reconstruction", "downstream", "ground_truth", "reports"} <= set(result)
    assert len(result["dashboard_features"]) == 3
    html = (out / "features.html").read_text()
    assert html.count("window.PlotlyConfig") == 1 and 'src="http' not in html
    from interp.store import open_store

    tree = open_store(str(out / "features.zarr"))
    assert tree["sae"]["image_acts"].shape == (6, 8 * 64) and tree.sizes["sample"] == 6  # expansion 8 x d_in 64
    assert main(["analyze", "--out", str(tmp_path / "none")]) == 2
    assert "train an SAE" in capsys.readouterr().err


@pytest.mark.parametrize("args, message", [
    (["--store", "/nowhere/x.zarr"], "no store at /nowhere/x.zarr"),
    (["--site", "lm.blocks.0.resid_post"], "not a vision.* or projector.* site"),
    (["--site", "vision.blocks.9.resid_post"], "is not in"),
    (["--architecture", "gated"], "invalid choice"),
    (["--training-tokens", "10"], "must be at least one batch"),
    (["--test-fraction", "1.5"], "--test-fraction"),
])
def test_cli_bad_input_is_one_line(store: str, tmp_path: Path, capsys, args: list, message: str) -> None:
    from interp.sae.__main__ import main

    assert main(["train", "--store", store, "--out", str(tmp_path / "o"), *args]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.startswith("error: ") and message in err, err
    assert not (tmp_path / "o").exists()


def test_bad_matryoshka_widths(store: str, tmp_path: Path, capsys) -> None:
    from interp.sae.__main__ import main

    assert main(["train", "--store", store, "--widths", "8,x", "--out", str(tmp_path / "o")]) == 2
    assert "--widths must be comma-separated positive integers" in capsys.readouterr().err


def test_matryoshka_levels() -> None:
    """The nested widths sae_lens gets: the configured ones below d_sae, sorted, then the full width."""
    from interp.sae.train import sae_config

    assert sae_config(SAETrainConfig(), 64).matryoshka_widths == [1, 2, 4, 8, 16, 32, 64, 128, 256, 512]
    assert sae_config(SAETrainConfig(expansion=2), 6).matryoshka_widths == [1, 2, 4, 8, 12]
    assert sae_config(SAETrainConfig(widths="32,8,600", expansion=8), 64).matryoshka_widths == [8, 32, 512]
