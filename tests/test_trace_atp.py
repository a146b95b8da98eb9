"""Attribution patching with the AtP* corrections against exact patching, brute force and plain autograd."""

from __future__ import annotations

import json
from weakref import WeakKeyDictionary

import numpy as np
import pytest
import torch

from interp.report.sweep import agreement
from interp.trace import atp
from interp.trace.__main__ import main
from interp.trace.atp import Attention, QKFix, atp_sweep, recording
from interp.trace.floor import CausalLM
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


def _last_query(a: Attention) -> Attention:
    """The attention of the last position's query alone (as a causal LM's answer-only last block records it)."""
    return Attention(a.query[:, :, -1:], a.key, a.scaling, None if a.mask is None else a.mask[:, :, -1:], a.pattern[:, :, -1:])


@pytest.mark.parametrize("tower", ["lm", "vision"])
@pytest.mark.parametrize("queries", ["all", "last"])
@pytest.mark.parametrize("singles", [False, True])
def test_qk_fix_is_the_exact_pattern_change(tiny_adapter, one, tower, queries, singles):
    """QKFix against recomputing the whole pattern with a group's queries and keys taken from the clean run (mixed
    groups or one per position; every query, or the last one alone)."""
    noise = noise_for(tiny_adapter, one, tower, 0.8)
    base = one.take([0] * noise.copies)
    with recording(tiny_adapter, tower) as seen:
        tiny_adapter.run(one)
        clean = seen[1]
        tiny_adapter.run(base, edit={noise.site: noise.edit(torch.arange(noise.copies))})
        corr = seen[1]
    n = corr.query.shape[2]
    groups = [[p] for p in range(n)] if singles else [[3], [1, 2, 9], [n - 1]]
    rows = slice(n - 1, n) if queries == "last" else slice(0, n)
    grad = torch.randn(corr.pattern.shape, generator=torch.Generator().manual_seed(0))[:, :, rows]
    got = QKFix(*((_last_query(a) if queries == "last" else a) for a in (corr, clean)), atp._Groups(groups))(grad)
    for gi, g in enumerate(groups):
        q, k = corr.query.clone(), corr.key.clone()
        q[:, :, g], k[:, :, g] = clean.query[:, :, g], clean.key[:, :, g]
        new = (corr.scores(q, k) + corr.additive()).softmax(-1)
        want = (grad * (new - corr.pattern)[:, :, rows]).sum((1, 2, 3))
        torch.testing.assert_close(got[:, gi], want, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("point", ["resid_post", "resid_pre"])
def test_graddrop_against_dropped_backward(tiny_adapter, one, metric, point):
    """The signed estimate and the GradDrop strength of every cell (QK fix on) from plain autograd on the HF model,
    each block's residual contribution detached in turn: the gradient at the cell less its next attention pattern's
    path, plus the QK fix of that backward's pattern gradient."""
    n, answer = tiny_adapter.n_layers("lm"), int(one.answer_index[0])
    groups = [[p] for p in range(58, one.input_ids.shape[1])] + [[60, 66]]
    noise = noise_for(tiny_adapter, one, "lm", 1.0)
    est = atp_sweep(tiny_adapter, one, one, metric, tower="lm", layers=range(n), groups=groups, point=point, noise=noise)
    blocks, grp, shift = tiny_adapter.model.model.language_model.layers, atp._Groups(groups), int(point == "resid_post")

    def run(rows: int, drop: int | None = None) -> tuple[list[torch.Tensor], dict, torch.Tensor]:
        """Each block's input, then the last block's output [rows, seq, d]; the recorded attention; the metric per
        row. Noised when ``rows`` > 1; block ``drop``'s own contribution detached."""
        inputs = {k: v.expand(rows, *v.shape[1:]) for k, v in one.model_inputs().items()}
        states: list[torch.Tensor] = []

        def enter(m, args):
            x = noise.edit(torch.arange(rows))(args[0]) if rows > 1 and not states else args[0]
            states.append(x)
            return (x, *args[1:])

        hooks = [b.register_forward_pre_hook(enter, prepend=True) for b in blocks]
        hooks.append(blocks[-1].register_forward_hook(lambda m, args, out: states.append(out), prepend=True))
        if drop is not None:
            hooks.append(blocks[drop].register_forward_hook(lambda m, args, out: args[0] + (out - args[0]).detach(), prepend=True))
        try:
            with recording(tiny_adapter, "lm") as seen:
                values = metric(tiny_adapter.model(**inputs).logits[:, answer])
        finally:
            for h in hooks:
                h.remove()
        return states, dict(seen), values

    clean, clean_att, _ = run(1)

    def estimate(drop: int | None) -> np.ndarray:
        states, att, values = run(noise.copies, drop)
        qk = [getattr(att[b], x) for b in range(n) for x in ("query", "key", "pattern")]
        nodes = [*states, *qk]  # a dropped block's attention is out of the graph: gradient 0
        grads = [torch.zeros_like(x) if g is None else g
                 for x, g in zip(nodes, torch.autograd.grad(values.sum(), nodes, retain_graph=True, allow_unused=True))]
        out = np.zeros((n, grp.n))
        for l in range(n):
            b = l + shift  # the cell is block b's input
            delta = (clean[b] - states[b]).detach()
            grad = grads[b]
            if b < n:  # the QK fix: the pattern's path out of the gradient, its exact change in
                q, k, pattern = grads[n + 1 + 3 * b : n + 4 + 3 * b]
                grad = grad - torch.autograd.grad([att[b].query, att[b].key], states[b], [q, k], retain_graph=True)[0]
            per = grp.sum((delta * grad).sum(-1))
            if b < n:
                per = per + QKFix(att[b], clean_att[b], grp)(pattern)
            out[l] = per.mean(0).detach().numpy()
        return out

    signed = estimate(None)
    np.testing.assert_allclose(est.restored - est.corrupted, signed, atol=1e-6)
    first = np.arange(n)[:, None] + shift
    m = n - first  # downstream blocks of each layer's cells
    dropped = sum(np.abs(estimate(d)) * (first <= d) for d in range(n)) / np.maximum(m - 1, 1)
    np.testing.assert_allclose(est.magnitude, np.where(m >= 2, dropped, np.abs(signed)), atol=1e-6)
    assert np.abs(signed).max() > 1e-3 and not np.allclose(est.magnitude, np.abs(signed), atol=1e-4)


@pytest.mark.parametrize("tower,point,paired", [("lm", "resid_post", False), ("lm", "resid_pre", False),
                                                ("lm", "mlp.out", False), ("lm", "attn.out", True),
                                                ("vision", "resid_post", False), ("vision", "resid_pre", True)])
def test_lm_block_by_block_matches_adapter_path(tiny_adapter, one, tiny_images, metric, monkeypatch, tower, point, paired):
    """The LM called block by block (up to the answer, its last block for the answer's query only) gives the
    estimates of full adapter forwards, GradDrop included."""
    corrupt = tiny_adapter.encode([tiny_images[1]], ["is there a pleural effusion on the left ? answer :"]) if paired else one
    assert atp._causal(tiny_adapter, one, corrupt) is not None
    n = one.input_ids.shape[1] if tower == "lm" else 1 + tiny_adapter.n_patches
    kw = dict(tower=tower, layers=range(tiny_adapter.n_layers(tower)), point=point,
              groups=[[p] for p in range(0, n, 3)] + [[1, 2, 9], [n - 1]], noise=None if paired else noise_for(tiny_adapter, one, tower, 0.5))
    got = atp_sweep(tiny_adapter, one, corrupt, metric, **kw)
    monkeypatch.setattr(atp, "_causal", lambda *args: None)
    want = atp_sweep(tiny_adapter, one, corrupt, metric, **kw)
    scale = np.abs(want.restored - want.corrupted).max()
    assert scale > 1e-4
    np.testing.assert_allclose(got.restored, want.restored, atol=1e-6 * max(scale, 1))
    np.testing.assert_allclose(got.magnitude, want.magnitude, atol=1e-6 * max(scale, 1))
    assert got.clean == pytest.approx(want.clean, abs=1e-6) and got.corrupted == pytest.approx(want.corrupted, abs=1e-6)


def test_lm_block_by_block_refused_when_it_disagrees(tiny_adapter, one, monkeypatch):
    """An LM whose block-by-block answer logits differ from the adapter's keeps full adapter forwards."""
    monkeypatch.setattr(atp, "_checked", WeakKeyDictionary())
    monkeypatch.setattr(CausalLM, "logits", lambda self, h: self.head(self.norm(h)) + 1)
    assert atp._causal(tiny_adapter, one, one) is None


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
