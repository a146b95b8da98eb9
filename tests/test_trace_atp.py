"""Attribution patching with the AtP* corrections against exact patching, brute force and plain autograd."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from interp.report.sweep import agreement
from interp.trace import atp
from interp.trace.__main__ import main
from interp.trace.atp import QKFix, atp_sweep, recording
from interp.trace.patching import Noise, metric_fn, restore_sweep
from interp.trace.sweep import read_sweep


@pytest.fixture(scope="module")
def metric(tiny_adapter):
    ids = tiny_adapter.tokenizer.convert_tokens_to_ids(["yes", "no"])
    return metric_fn("logit_diff", ids[0], ids[1:])


def noise_for(adapter, one, tower: str, std: float, copies: int = 3) -> Noise:
    site, pos = ("lm.embed", one.positions[0].spans["image"]) if tower == "lm" else ("vision.embed", range(1, 1 + adapter.n_patches))
    return Noise(site, tuple(pos), std=std, copies=copies, seed=2)


@pytest.mark.parametrize("tower,point", [("lm", "resid_post"), ("lm", "resid_pre"), ("lm", "mlp.out"), ("vision", "resid_post")])
def test_small_corruption_limit_is_exact(tiny_adapter, one, metric, tower, point):
    """First order is exact in the limit: AtP* (QK fix included) meets exact patching for a small corruption
    (1% of the corrupted embeddings' std: the error is second order)."""
    n = one.input_ids.shape[1] if tower == "lm" else 1 + tiny_adapter.n_patches
    kw = dict(tower=tower, layers=range(tiny_adapter.n_layers(tower)), groups=[[p] for p in range(0, n, 3)] + [[1, 2, 9]],
              point=point, noise=noise_for(tiny_adapter, one, tower, 0.0002 if tower == "lm" else 0.002))
    exact = restore_sweep(tiny_adapter, one, one, metric, **kw)
    est = atp_sweep(tiny_adapter, one, one, metric, **kw)
    assert est.clean == pytest.approx(exact.clean, abs=1e-6) and est.corrupted == pytest.approx(exact.corrupted, abs=1e-6)
    e, s = exact.restored - exact.corrupted, est.restored - est.corrupted
    assert np.abs(e).max() > 1e-5
    assert np.abs(e - s).max() < 0.03 * np.abs(e).max()


@pytest.mark.parametrize("tower", ["lm", "vision"])
def test_qk_fix_is_the_exact_pattern_change(tiny_adapter, one, tower):
    """QKFix against recomputing the whole pattern with a group's queries and keys taken from the clean run."""
    noise = noise_for(tiny_adapter, one, tower, 0.8)
    base = one.take([0] * noise.copies)
    with recording(tiny_adapter, tower) as seen:
        tiny_adapter.run(one)
        clean = seen[1]
        tiny_adapter.run(base, edit={noise.site: noise.edit(torch.arange(noise.copies))})
        corr = seen[1]
    groups = [[3], [1, 2, 9], [corr.query.shape[2] - 1]]
    grad = torch.randn(corr.pattern.shape, generator=torch.Generator().manual_seed(0))
    got = QKFix(corr, clean, atp._Groups(groups))(grad)
    for gi, g in enumerate(groups):
        q, k = corr.query.clone(), corr.key.clone()
        q[:, :, g], k[:, :, g] = clean.query[:, :, g], clean.key[:, :, g]
        new = (corr.scores(q, k) + corr.additive()).softmax(-1)
        want = (grad * (new - corr.pattern)).sum((1, 2, 3))
        torch.testing.assert_close(got[:, gi], want, atol=1e-5, rtol=1e-4)


def test_graddrop_against_dropped_backward(tiny_adapter, one, metric, monkeypatch):
    """GradDrop strength of layer-0 cells from plain autograd on the HF model, one block's residual
    contribution detached at a time (QK fix off: the estimate is then plain AtP)."""
    monkeypatch.setattr(atp.Attention, "softmax_ok", lambda self: False)
    n, groups = tiny_adapter.n_layers("lm"), [[p] for p in range(60, one.input_ids.shape[1])]
    noise = noise_for(tiny_adapter, one, "lm", 1.0)
    est = atp_sweep(tiny_adapter, one, one, metric, tower="lm", layers=[0], groups=groups, noise=noise)
    model, layers, answer = tiny_adapter.model, tiny_adapter.model.model.language_model.layers, int(one.answer_index[0])

    def layer0(noised: bool, drop: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Block 0's output [rows, seq, d] and d metric / d it, with block `drop`'s own contribution detached."""
        rows = noise.copies if noised else 1
        inputs = {k: v.expand(rows, *v.shape[1:]) for k, v in one.model_inputs().items()}
        kept = {}
        hooks = [layers[0].register_forward_hook(lambda m, a, out: kept.setdefault("h", out.retain_grad() or out), prepend=True)]
        if noised:
            hooks.append(layers[0].register_forward_pre_hook(lambda m, a: (noise.edit(torch.arange(rows))(a[0]), *a[1:])))
        if drop is not None:
            hooks.append(layers[drop].register_forward_hook(lambda m, a, out: a[0] + (out - a[0]).detach(), prepend=True))
        try:
            metric(model(**inputs).logits[:, answer]).sum().backward()
        finally:
            for h in hooks:
                h.remove()
        return kept["h"].detach(), kept["h"].grad

    delta = layer0(False)[0] - layer0(True)[0]
    per = [(delta * layer0(True, drop)[1]).sum(-1)[:, [g[0] for g in groups]].mean(0) for drop in (None, *range(1, n))]
    np.testing.assert_allclose(est.restored[0] - est.corrupted, per[0].numpy(), atol=1e-5)
    strength = sum(p.abs() for p in per[1:]) / (n - 2)
    np.testing.assert_allclose(est.magnitude[0], strength.numpy(), atol=1e-5)


def test_agreement_figures():
    rng = np.random.default_rng(0)
    exact = rng.normal(size=(3, 4, 30))
    exact[:, :, -2:] = np.nan  # padding
    same = agreement(exact, exact, np.abs(exact), k=5)
    assert same["spearman"] == pytest.approx(1) and same["top_k_recall"] == 1 and not same["flags"]
    flipped = agreement(exact, -exact, rng.random(exact.shape), k=5)
    assert flipped["spearman"] == pytest.approx(-1) and len(flipped["flags"]) == 3
    assert len(flipped["per_layer"]) == 4


@pytest.fixture(scope="module")
def organism_dir(tmp_path_factory):
    from interp.models.organism import build_organism, save_organism

    path = tmp_path_factory.mktemp("organism")
    save_organism(*build_organism(seed=1), path)
    return path


def test_cli_both_methods(organism_dir, tmp_path, capsys):
    out = tmp_path / "sweep"
    args = ["--model", str(organism_dir), "--out", str(out), "--limit", "1", "--copies", "2", "--min-gap", "0",
            "--sites", "vision.blocks.1.resid_post,lm.blocks.0.resid_post,lm.blocks.3.resid_post", "--method", "both",
            "--vision-positions", "block4"]
    assert main(args) == 0
    assert "AtP* in" in capsys.readouterr().out
    towers = read_sweep(str(out / "sweep.zarr"))
    for name, ds in towers.items():
        assert ds.attrs["method"] == "both" and ds.attrs["elapsed_atp_s"] >= 0
        valid = ds.valid.values
        assert np.isfinite(ds.atp_effect.values[:, :, valid[0]]).all() and (ds.atp_magnitude.values[:, :, valid[0]] >= 0).all()
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["lm"]["atp_agreement"]) >= {"spearman", "spearman_strength", "top_k_recall", "flags"}
    html = (out / "report.html").read_text()
    assert html.count("AtP* against exact patching") == 2


def test_cli_atp_alone_and_bad_input(organism_dir, tmp_path, capsys):
    out = tmp_path / "atp"
    assert main(["--model", str(organism_dir), "--out", str(out), "--limit", "1", "--copies", "2", "--min-gap", "0",
                 "--sites", "lm.blocks.1.resid_post", "--method", "atp", "--lm-positions", "span"]) == 0
    lm = read_sweep(str(out / "sweep.zarr"))["lm"]
    np.testing.assert_array_equal(lm.effect.values, lm.atp_effect.values)
    assert "elapsed_atp_s" not in lm.attrs
    for bad, message in ((["--method", "atp", "--window", "3"], "one-layer restores"),
                         (["--mode", "nast", "--method", "atp"], "method"), (["--method", "fast"], "invalid choice")):
        assert main(["--model", str(organism_dir), "--out", str(tmp_path / "x"), *bad]) == 2
        assert message in capsys.readouterr().err.strip().splitlines()[-1]
