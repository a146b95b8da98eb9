"""Token-space baselines in the LM decoder (attention, Grad-CAM, CP-LRP) against independent references.

References: the attention methods recomputed from a plain HF forward (``output_attentions=True``, gradients
by ``torch.autograd.grad`` on the returned weights); Grad-CAM against Captum's ``LayerGradCam`` on the same
activations laid out as a [1, d, rows, cols] map; CP-LRP's conservation, and its rule-free run against
hand autograd at the first block's input.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from captum.attr import LayerGradCam

from interp.attribution.attention import (AttentionHead, AttentionRelevance, AttentionRollout,
                                          GradientWeightedAttention)
from interp.attribution.base import Sample, Scorer, paint
from interp.attribution.gradcam import GradCam, GradCamPlusPlus
from interp.attribution.lrp import RULES, CPLRP
from interp.errors import InterpError

METHODS = [AttentionHead, AttentionRollout, AttentionRelevance, GradientWeightedAttention, GradCam, GradCamPlusPlus, CPLRP]
NODULE_IMAGES = 10


@pytest.fixture(scope="module")
def organism():
    from interp.models import load

    return load("organism")


@pytest.fixture(scope="module")
def nodule_prompt():
    """(prompt, spans) of the direct question about a nodule."""
    from interp.data.catalog import load_dataset

    it = next(i for i in load_dataset("phantom-test").items if i.kind == "presence" and i.mode == "direct" and i.finding == "nodule")
    return it.prompt, it.spans


@pytest.fixture(scope="module")
def nodules(nodule_prompt):
    """(sample, nodule mask) for the first NODULE_IMAGES test phantoms with a nodule."""
    from interp.data.catalog import load_dataset

    ds = load_dataset(f"phantom-test:{4 * NODULE_IMAGES}")
    phantoms = [p for p in map(ds.phantom, range(len(ds.specs))) if "nodule" in p.finding_masks][:NODULE_IMAGES]
    return [(Sample(p.image, *nodule_prompt, id=f"test:{i}"), p.finding_masks["nodule"]) for i, p in enumerate(phantoms)]


@pytest.fixture(scope="module")
def scorer(organism, nodules):
    return Scorer(organism, nodules[0][0], "yes")


@pytest.fixture(scope="module")
def plain(organism, scorer):
    """Plain HF forward of the scorer's batch: (score, attentions [layers][heads, seq, seq], their
    gradients, first block's input [seq, d], its gradient), all double."""
    model = organism.model
    got = {}

    def keep(module, args, kwargs) -> None:
        got["x"] = args[0] if args else kwargs["hidden_states"]

    handle = model.model.language_model.layers[0].register_forward_pre_hook(keep, with_kwargs=True)
    try:
        with torch.enable_grad():
            out = model(**scorer.batch.model_inputs(), output_attentions=True)
    finally:
        handle.remove()
    logp = out.logits[0, scorer.predict_at].double().log_softmax(-1)
    score = logp[torch.arange(len(scorer.targets)), scorer.targets].sum()
    *grads, gx = torch.autograd.grad(score, [*out.attentions, got["x"]])
    return (float(score.detach()), [a[0].detach().double() for a in out.attentions], [g[0].double() for g in grads],
            got["x"][0].detach().double(), gx[0].double())


def by_hand(scorer, m: torch.Tensor) -> np.ndarray:
    """A [seq, seq] map's image-key columns averaged over the response-predicting rows, painted."""
    rows = m[scorer.predict_at][:, scorer.image_index].mean(0)
    return paint(rows, scorer.positions, scorer.image_index, scorer.sample.image.shape[:2])


# --- every method, two models --------------------------------------------------------------
@pytest.mark.parametrize("cls", METHODS, ids=lambda c: c.name)
def test_methods_give_finite_maps_in_the_image_frame(cls, organism, tiny_adapter, tiny_images, nodules):
    """Finite maps in the image frame, not constant on every image (a map can be on one: Grad-CAM++'s
    ReLU(A w) is zero everywhere on the organism's first nodule image, every token's A w being negative)."""
    sample = nodules[0][0]
    runs = [(organism, n, None) for n, _ in nodules[:3]] + [(tiny_adapter, Sample(tiny_images[2], sample.prompt), "yes")]
    spread = {}
    for adapter, s, target in runs:
        at = cls(adapter).attribute(s, target)
        assert at.method == cls.name and at.map.shape == s.image.shape[:2] and np.isfinite(at.map).all()
        spread[adapter is organism] = max(spread.get(adapter is organism, 0.0), float(np.ptp(at.map)))
    assert min(spread.values()) > 0, f"{cls.name} gave constant maps: {spread}"


def test_bad_settings_raise_one_line(organism, scorer):
    for make in (lambda: AttentionHead(organism, layer=9), lambda: GradientWeightedAttention(organism, layer=-9),
                 lambda: GradCam(organism, "lm.blocks.0.attn.pattern"), lambda: GradCam(organism, "lm.blocks.*.resid_post"),
                 lambda: GradCam(organism, "vision.blocks.0.resid_post"), lambda: CPLRP(organism, "lm.blocks.0.resid_pre"),
                 lambda: CPLRP(organism, detach=["softmax"]), lambda: AttentionHead(organism, head=7)._attribute(scorer)):
        with pytest.raises(InterpError) as e:
            make()
        assert "\n" not in str(e.value)


# --- attention against a plain HF forward -------------------------------------------------
def test_attention_head_by_hand(organism, scorer, plain):
    _, attn, *_ = plain
    last = attn[-1]
    per_head = last[:, scorer.predict_at][:, :, scorer.image_index].mean(1)
    head = int(per_head.sum(-1).argmax())
    at = AttentionHead(organism)._attribute(scorer)
    assert at.meta == {"layer": len(attn) - 1, "head": head}
    np.testing.assert_allclose(at.map, by_hand(scorer, last[head]), atol=1e-7)
    np.testing.assert_allclose(AttentionHead(organism, layer=0, head=2)._attribute(scorer).map, by_hand(scorer, attn[0][2]), atol=1e-7)


def test_rollout_by_hand(organism, scorer, plain):
    """Abnar & Zuidema's form: 0.5 A + 0.5 I (A's rows sum to 1), rolled out from the first layer."""
    _, attn, *_ = plain
    rollout = torch.eye(attn[0].shape[-1], dtype=torch.double)
    for a in attn:
        rollout = (0.5 * a.mean(0) + 0.5 * torch.eye(len(rollout), dtype=torch.double)) @ rollout
    np.testing.assert_allclose(AttentionRollout(organism)._attribute(scorer).map, by_hand(scorer, rollout), atol=1e-7)


def test_relevance_and_gradient_weighted_attention_by_hand(organism, scorer, plain):
    """Chefer et al. 2021, eq. 5-6: Abar = E_h[(grad A * A)^+], R += Abar @ R, with gradients of the plain forward."""
    _, attn, grads, *_ = plain
    relevance = torch.eye(attn[0].shape[-1], dtype=torch.double)
    for a, g in zip(attn, grads):
        abar = torch.stack([(g[h] * a[h]).clamp(min=0) for h in range(len(a))]).mean(0)
        relevance = relevance + abar @ relevance
    np.testing.assert_allclose(AttentionRelevance(organism)._attribute(scorer).map, by_hand(scorer, relevance), atol=1e-9)
    np.testing.assert_allclose(GradientWeightedAttention(organism)._attribute(scorer).map, by_hand(scorer, abar), atol=1e-9)
    assert np.abs(by_hand(scorer, abar)).max() > 1e-6  # not trivially zero


# --- Grad-CAM against Captum ----------------------------------------------------------------
def test_grad_cam_matches_captum(organism, scorer):
    """Captum's LayerGradCam on the image-token activations laid out as [1, d, rows, cols] behind an
    identity layer, fed back into the LM by an edit of the same site."""
    method = GradCam(organism)
    site, index, pos = method.site, scorer.image_index, scorer.positions
    r, c = [pos.rows[i] for i in index], [pos.cols[i] for i in index]
    _, cache = scorer.run(read=[site])
    acts = cache[site][0, index]  # [n_img, d]
    grid = torch.zeros(1, acts.shape[1], max(r) + 1, max(c) + 1)
    grid[0, :, r, c] = acts.T
    layer = torch.nn.Identity()

    def forward(x: torch.Tensor) -> torch.Tensor:
        tokens = layer(x)[0, :, r, c].T

        def put(v: torch.Tensor) -> torch.Tensor:
            v = v.clone()
            v[0, index] = tokens
            return v

        logp, _ = scorer.run(edit={site: put}, grad=True)
        return logp.sum(-1)

    cam = LayerGradCam(forward, layer).attribute(grid, relu_attributions=True)[0, 0, r, c]
    ours = method._attribute(scorer).map
    # not an all-zero map; the organism is confident (log p ~ -0.01, v2 more so): small gradients (max ~7e-6),
    # compared relative to the map's scale
    assert ours.max() > 1e-7 and ours.std() > 1e-3 * ours.max()
    np.testing.assert_allclose(ours / ours.max(), paint(cam, pos, index, scorer.sample.image.shape[:2]) / ours.max(), atol=1e-6)
    assert not np.allclose(GradCamPlusPlus(organism)._attribute(scorer).map / ours.max(), ours / ours.max())


# --- CP-LRP ---------------------------------------------------------------------------------
def entropy(adapter, scorer) -> float:
    """Summed entropy of the predicted distributions at the response-predicting positions."""
    logits, _ = adapter.run(scorer.batch)
    lp = logits[0, scorer.predict_at].double().log_softmax(-1)
    return float(-(lp.exp() * lp).sum())


@pytest.mark.parametrize("which", ["organism", "tiny"])
def test_lrp_is_conservative(which, organism, tiny_adapter, tiny_images, scorer):
    """With all rules the bias-free decoder is linear in its input embeddings, so the relevance over all
    positions is sum_t (z_t - E_p[z]) = score + sum_t H(p_t) (log-softmax's gradient x input). Measured
    residual ~1e-8 (float32 round-off of a 64-128-d, 3-4-layer forward); 1e-6 leaves 100x headroom while
    every single missing rule breaks it by > 1e-3."""
    adapter, s = (organism, scorer) if which == "organism" else (tiny_adapter, Scorer(tiny_adapter, Sample(tiny_images[0], "is there a nodule ?"), "yes"))
    h = entropy(adapter, s)
    score, rel = CPLRP(adapter).relevance(s)
    print(f"\n{which}: score {score:.5f}  relevance sum {float(rel.sum()):.5f}  score + entropy {score + h:.5f}")
    assert abs(float(rel.sum()) - (score + h)) < 1e-6
    for rule in RULES:
        _, partial = CPLRP(adapter, detach=[r for r in RULES if r != rule]).relevance(s)
        assert abs(float(partial.sum()) - (score + h)) > 1e-3, f"conserved without the {rule} rule"


def test_lrp_without_rules_is_gradient_x_input(organism, scorer, plain):
    score, _, _, x, gx = plain
    got_score, rel = CPLRP(organism, detach=()).relevance(scorer)
    assert got_score == pytest.approx(score, abs=1e-9)
    np.testing.assert_allclose(rel.numpy(), (x * gx).sum(-1).numpy(), atol=1e-9)


def test_lrp_at_projector_equals_image_rows_of_the_embeddings(organism, scorer):
    a, b = CPLRP(organism)._attribute(scorer), CPLRP(organism, "projector.out")._attribute(scorer)
    np.testing.assert_allclose(a.map, b.map, atol=1e-9)
    _, rel = CPLRP(organism).relevance(scorer)
    assert a.meta["relevance_sum"] == pytest.approx(float(rel.sum()))
