"""MedFocus's interventions, the layer sweep and prompting as attribution methods, against independent
references on the organism: deltas by plain HF forwards (occlusion) and a plain forward hook (concept
patches); the sweep against ROME's plain hook loop; prompting against the phantom's own spec."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from interp.attribution import method
from interp.attribution.base import Sample, Scorer
from interp.attribution.medfocus import MedFocus, bounding_box, coverage
from interp.attribution.prompting import Prompting, zone_rows
from interp.attribution.tracing import CausalTrace
from interp.data.catalog import load_dataset
from interp.errors import InterpError
from interp.trace.patching import Noise, metric_fn
from interp.trace.reference import reference_trace

CONCEPTS = ("lung_left", "lung_right", "cardiac_silhouette", "costophrenic_left")


@pytest.fixture(scope="module")
def case():
    """A presence question about a nodule the test phantom has, with its mask and spec."""
    ds = load_dataset("phantom-test:40")
    it = next(i for i in ds.items if i.finding == "nodule" and i.answer == "yes")
    return Sample(ds.image(it.image), it.prompt, it.spans, it.id), ds.phantom(it.image)


def hf_token_logp(model, scorer: Scorer, pixel_values: torch.Tensor, hook=None) -> torch.Tensor:
    """[rows, n] response log-probs by a plain HF forward (optionally with a projector forward hook)."""
    k = len(pixel_values)
    handle = model.model.multi_modal_projector.register_forward_hook(hook, prepend=True) if hook else None
    try:
        with torch.no_grad():
            logits = model(input_ids=scorer.batch.input_ids.expand(k, -1), attention_mask=scorer.batch.attention_mask.expand(k, -1),
                           pixel_values=pixel_values).logits
    finally:
        if handle:
            handle.remove()
    lp = torch.log_softmax(logits[:, scorer.predict_at].double(), -1)
    return lp[:, torch.arange(len(scorer.targets)), scorer.targets]


def test_occlusion_deltas_against_plain_forwards(organism, case, tmp_path):
    sample, _ = case
    mf = MedFocus(organism, concepts=CONCEPTS, cache_dir=str(tmp_path))
    a = mf.attribute(sample, "yes")
    masks, ref = mf.regions(sample.image)
    sc = Scorer(organism, sample, "yes")
    clean = hf_token_logp(organism.model, sc, sc.batch.pixel_values)
    for c, m in masks.items():
        img = np.where(m, 0.0, sample.image).astype(np.float32)
        pv = organism.encode([img], [sample.prompt], [sample.spans], ["yes"]).pixel_values
        want = (clean - hf_token_logp(organism.model, sc, pv)).clamp(min=0).sum()
        assert a.concepts[c] == pytest.approx(float(want), abs=1e-8)
    best = max(a.concepts, key=a.concepts.get)
    assert a.meta["best"] == best and a.region.shape == sample.image.shape
    assert a.meta["whole_image"] == (np.exp(-a.concepts[best]) >= 0.75)
    np.testing.assert_allclose(a.tokens.sum(), a.concepts[best])
    assert a.map[masks[best] & ~np.any([m for c, m in masks.items() if c != best], 0)].min() == pytest.approx(a.concepts[best])
    # keep = 0: no concept is ever causal enough, the whole image comes back
    whole = MedFocus(organism, concepts=CONCEPTS, keep=0.0, cache_dir=str(tmp_path)).attribute(sample, "yes")
    assert whole.meta["whole_image"] and whole.region.all()


def test_concept_patch_against_a_plain_hook(organism, case, tmp_path):
    sample, _ = case
    mf = MedFocus(organism, concepts=CONCEPTS, intervention="patch", values="counterfactual", cache_dir=str(tmp_path))
    a = mf.attribute(sample, "yes")
    masks, ref = mf.regions(sample.image)
    sc = Scorer(organism, sample, "yes")
    refs = mf._reference_values(sc)
    boxes = [sc.positions.boxes[i] for i in sc.image_index]
    clean = hf_token_logp(organism.model, sc, sc.batch.pixel_values)
    for c, m in masks.items():
        keep = torch.as_tensor(coverage(m, boxes) >= 0.5)

        def hook(mod, args, out, keep=keep):
            out = out.clone()
            out[:, keep] = refs[ref][keep]
            return out

        want = (clean - hf_token_logp(organism.model, sc, sc.batch.pixel_values, hook)).clamp(min=0).sum()
        assert a.concepts[c] == pytest.approx(float(want), abs=1e-8)
    assert a.method == "medfocus_patch_counterfactual"


def test_region_helpers_and_bad_settings(organism):
    m = np.zeros((6, 6), bool)
    m[1, 2] = m[3, 4] = True
    assert bounding_box(m).sum() == 9 and bounding_box(m)[1:4, 2:5].all()
    assert coverage(m, [(0, 0, 2, 3), (3, 3, 4, 5), None]).tolist() == [1 / 6, 0.5, 0.0]
    assert zone_rows(np.ones((6, 2), bool), "upper").sum() == 4 and zone_rows(np.ones((6, 2), bool), "lower")[4:].all()
    for kw, msg in [({"intervention": "erase"}, "intervention"), ({"values": "zeros"}, "patch values"),
                    ({"shape": "circle"}, "region shape"), ({"concepts": ("spleen",)}, "not in the atlas"),
                    ({"intervention": "patch", "site": "lm.blocks.0.resid_post"}, "image tokens")]:
        with pytest.raises(InterpError, match=msg):
            MedFocus(organism, **kw)
    with pytest.raises(InterpError, match="unknown attribution method"):
        method("magic", organism)


def test_causal_trace_method_against_rome_loop(organism, case):
    sample, _ = case
    a = CausalTrace(organism, copies=3).attribute(sample, "yes")
    sc = Scorer(organism, sample, "yes")
    vis = organism.vision_positions(sc.batch)[0]
    pos = vis.span("image")
    with torch.no_grad():
        emb = organism.model.model.vision_tower.embeddings(sc.batch.pixel_values)
    noise = Noise("vision.embed", tuple(pos), 3.0 * float(emb[0, pos].std()), 3, 0)
    restored, clean, corrupted = reference_trace(
        organism.model, sc.batch.inputs, int(sc.predict_at[-1]), metric_fn("logprob", int(sc.targets[-1]), []),
        tower="vision", layers=range(organism.n_layers("vision")), groups=[[p] for p in pos], noise=noise)
    np.testing.assert_allclose(np.array(a.meta["effect"]), restored - corrupted, atol=1e-5)
    assert a.map.shape == sample.image.shape and np.ptp(a.map) > 0


def test_prompting_names_the_spec_region(organism, case, tmp_path):
    sample, phantom = case
    f = phantom.spec.get("nodule")
    p = Prompting(organism)
    concept, zone = p.named(sample, "nodule")
    assert concept == f"lung_{f.side}" and zone in ("upper", "middle", "lower")  # zone answers are ~chance (issue 12)
    box = p.attribute(sample, "yes")
    seg = method("prompting_segmentation", organism).attribute(sample, "yes")
    assert box.region.any() and seg.region.any() and box.meta == seg.meta == {"concept": concept, "zone": zone}
    assert (box.map == box.region).all() and seg.method == "prompting_segmentation"
    with pytest.raises(InterpError, match="finding"):
        p.attribute(Sample(sample.image, "question : is there a nodule ? answer :"), "yes")
