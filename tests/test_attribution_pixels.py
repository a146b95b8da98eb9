"""The attribution protocol and its pixel-space baselines, against plain HF forwards (no nnsight, no
Captum) on the organism: teacher forcing, saliency, integrated gradients' completeness, occlusion and
RISE by hand loops; and the map geometry (painting token boxes, mapping model pixels back)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from interp.attribution import pixels as P
from interp.attribution.base import Sample, Scorer, paint, respond, to_image_frame
from interp.data.catalog import load_dataset
from interp.errors import InterpError
from interp.models.adapter import Positions
from interp.models.lvlm import Frame


@pytest.fixture(scope="module")
def sample():
    ds = load_dataset("phantom-test")
    it = next(i for i in ds.items if i.kind == "presence" and i.mode == "direct" and i.answer == "yes")
    return Sample(ds.image(it.image), it.prompt, it.spans, it.id)


def hf_logp(model, scorer: Scorer, pixel_values: torch.Tensor) -> torch.Tensor:
    """Sum of the response's log-probs per row, by a plain HF forward."""
    k = len(pixel_values)
    logits = model(input_ids=scorer.batch.input_ids.expand(k, -1), attention_mask=scorer.batch.attention_mask.expand(k, -1),
                   pixel_values=pixel_values).logits
    lp = torch.log_softmax(logits[:, scorer.predict_at].double(), -1)
    return lp[:, torch.arange(len(scorer.targets)), scorer.targets].sum(-1)


def test_respond_and_teacher_forcing(organism, sample):
    direct = respond(organism, sample)
    assert direct in ("yes", "no")
    sc = Scorer(organism, sample, direct)
    b = organism.encode([sample.image], [sample.prompt], [sample.spans])
    logits, _ = organism.run(b)
    want = torch.log_softmax(organism.readout(logits, b).double(), -1)[0, sc.targets[0]]
    assert torch.allclose(sc.run()[0][0, 0], want, atol=1e-10)
    cot = Sample(sample.image, sample.prompt.replace("answer :", "steps :"), {}, sample.id)
    chain = respond(organism, cot)
    assert "answer :" in chain and chain.split()[-1] in ("yes", "no")
    sc = Scorer(organism, cot, chain)
    assert sc.token_text == chain.split()
    with torch.no_grad():
        assert torch.allclose(sc.run()[0].sum(-1), hf_logp(organism.model, sc, sc.batch.pixel_values), atol=1e-9)


def test_saliency_and_ig_against_plain_autograd(organism, sample):
    sc = Scorer(organism, sample, "yes")
    x = sc.batch.pixel_values.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(hf_logp(organism.model, sc, x).sum(), x)
    got = P.SaliencyMethod(organism).attribute(sample, "yes").map
    np.testing.assert_allclose(got, grad.abs()[0].sum(0).double().numpy(), rtol=1e-5, atol=1e-9)
    ig = P.IntegratedGradientsMethod(organism, n_steps=64).attribute(sample, "yes").map
    with torch.no_grad():
        gap = float(hf_logp(organism.model, sc, sc.batch.pixel_values) - hf_logp(organism.model, sc, P.black(sc)))
    assert ig.sum() == pytest.approx(gap, rel=0.02, abs=1e-3)  # completeness


def test_occlusion_and_rise_against_hand_loops(organism, sample):
    sc = Scorer(organism, sample, "yes")
    x, base = sc.batch.pixel_values, P.black(sc)
    with torch.no_grad():
        clean = hf_logp(organism.model, sc, x)
        want = np.zeros(x.shape[-2:])
        for y in range(0, x.shape[-2], 8):
            for z in range(0, x.shape[-1], 8):
                o = x.clone()
                o[..., y:y + 8, z:z + 8] = base[..., y:y + 8, z:z + 8]
                want[y:y + 8, z:z + 8] = float(clean - hf_logp(organism.model, sc, o))
    np.testing.assert_allclose(P.GridOcclusion(organism).attribute(sample, "yes").map, want, atol=1e-6)
    rise = P.Rise(organism, n_masks=12, batch=5)
    m = rise.masks(*x.shape[-2:])
    with torch.no_grad():
        prob = hf_logp(organism.model, sc, x * m + base * (1 - m)).exp()
    want = (prob[:, None, None] * m[:, 0].double()).sum(0).numpy() / (12 * 0.5)
    np.testing.assert_allclose(rise.attribute(sample, "yes").map, want, rtol=1e-6)


def test_map_geometry():
    # model map 4x4 over a 8x6 input resized to 4x4: pixel (y, x) -> model (y // 2, x * 4 // 6)
    model_map = np.arange(16.0).reshape(4, 4)
    got = to_image_frame(model_map, Frame.resize((8, 6), (4, 4)), (8, 6))
    assert got[0, 0] == 0 and got[7, 5] == 15 and got[2, 3] == model_map[1, 2]
    p = Positions(["image"] * 2, [0, 0], [0, 1], ["a", "b"], boxes=[(0, 0, 2, 3), (1, 1, 3, 3)])
    m = paint(np.array([1.0, 3.0]), p, [0, 1], (3, 3))
    assert m[0, 0] == 1 and m[1, 1] == 2 and m[2, 2] == 3 and m[0, 2] == 1 and m[2, 0] == 0
    with pytest.raises(InterpError, match="single-view"):
        to_image_frame(model_map, object(), (8, 6))


def test_methods_run_and_bad_input(organism, sample):
    for cls in (P.GradientXInput, P.SmoothGrad, P.GradientShapMethod):
        a = cls(organism).attribute(sample, "yes")
        assert a.map.shape == sample.image.shape and np.isfinite(a.map).all() and a.method == cls.name
    with pytest.raises(InterpError, match="does not know"):
        Scorer(organism, sample, "zebra-xyz")
