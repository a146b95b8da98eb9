"""BLIP-2 family (``interp.models.blip2``) on its tiny checkpoint, loaded by path like a hub checkpoint.

References: plain forward hooks (tests/family_checks.py), the processor called directly, a hand-built
LM input (token embeddings with the projected queries scattered in), and plain forward hooks doing
the same edits. TransformerLens 3.9 cannot load BLIP-2 (``boot_transformers``: "Could not determine
supported architecture from config ... Model type: blip-2"), so there is no TransformerLens test.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

from family_checks import check_cache_api, check_positions, check_sites_against_hooks, hooked_logits
from interp.errors import InterpError
from interp.models import load
from interp.models.blip2 import Blip2Adapter, save_tiny_blip2
from interp.models.registry import FAMILIES
from interp.models.tiny import BUILDERS

PROMPTS = ["is there a pleural effusion on the left lung ?", "left lung"]
SPANS = [{"finding": (11, 26)}, {}]
SIZES = [(40, 36), (48, 64)]  # neither is the model's 32 x 32: both rows take the processor's resize
Q = 4


@pytest.fixture(scope="module")
def adapter(tmp_path_factory):
    path = save_tiny_blip2(tmp_path_factory.mktemp("blip2") / "ckpt", seed=0)
    return load(path)


@pytest.fixture(scope="module")
def images():
    rng = np.random.default_rng(1)
    return [rng.random(s, dtype=np.float32) for s in SIZES]


@pytest.fixture(scope="module")
def batch(adapter, images):
    return adapter.encode(images, PROMPTS, SPANS)


@pytest.fixture(scope="module")
def clean(adapter, batch):
    return adapter.run(batch, read=["projector.out", "lm.embed", "lm.blocks.1.resid_post"])


def close(a, b, what, atol=1e-5):
    torch.testing.assert_close(a, b, atol=atol, rtol=0, msg=what)


def test_registered_and_loaded_by_path(adapter):
    assert isinstance(adapter, Blip2Adapter)
    assert FAMILIES["blip-2"] == "interp.models.blip2:Blip2Adapter" and "blip-2" in BUILDERS
    assert adapter.towers == ("vision", "qformer", "lm")
    assert [adapter.n_layers(t) for t in adapter.towers] == [2, 2, 2]
    # execution order: vision, Q-Former (cross-attention on layer 0 only), projector, LM
    s = adapter.sites
    assert s.index("vision.blocks.1.resid_post") < s.index("qformer.embed") < s.index("qformer.blocks.0.xattn.pattern") \
        < s.index("qformer.blocks.1.resid_post") < s.index("projector.out") < s.index("lm.embed") < s.index("lm.logits")
    assert "qformer.blocks.1.xattn.pattern" not in s and "lm.blocks.0.mlp.out" not in s  # OPT: no MLP module output


def test_sites_against_plain_hooks(adapter, batch):
    check_sites_against_hooks(adapter, batch)


def test_site_shapes_have_batch_rows(adapter, batch):
    """Every site is [rows, ...] (validate() uses one row, so a flattened [rows * seq, d] hook passes it)."""
    _, c = adapter.run(batch, read=adapter.sites)
    for site in adapter.sites:
        assert c[site].shape[0] == len(batch), site
        assert tuple(c[site].shape[1:]) == adapter.site_shape(site, batch.input_ids.shape[1]), site
    assert c["qformer.blocks.0.xattn.pattern"].shape == (2, 2, Q, 17)


def test_positions(adapter, batch, images):
    check_positions(adapter, batch, images)
    for p in batch.positions:  # the processor puts the queries first, before the prompt
        assert p.kinds[:Q] == ["query"] * Q and p.spans["image"] == list(range(Q))
        assert p.boxes[:Q] == [None] * Q and p.groups[:Q] == ["query"] * Q and "image" not in p.kinds
    assert batch.positions[1].kinds[-1] == "pad"
    assert [batch.positions[0].tokens[i] for i in batch.positions[0].spans["finding"]] == ["pleural", "effusion"]
    # the vision tower's grid: CLS + 4 x 4 patches, boxes in each input image's pixels
    for vp, (h, w) in zip(adapter.vision_positions(batch), SIZES):
        assert len(vp) == 17 and vp.kinds[0] == "special" and vp.kinds[1:] == ["image"] * 16
        assert vp.boxes[1] == (0.0, 0.0, h / 4, w / 4) and vp.boxes[16] == (3 * h / 4, 3 * w / 4, h, w)
        assert (vp.rows[16], vp.cols[16]) == (3, 3)


def test_cache_api(adapter, batch):
    check_cache_api(adapter, batch)
    _, c = adapter.run(batch, read="qformer.blocks.*.resid_post,lm.blocks.0.resid_post")
    assert c.stack("qformer.blocks.*.resid_post").shape == (2, 2, Q, 32)
    with pytest.raises(KeyError):
        c["resid_post", 0]  # qformer and lm both have it: name the tower
    assert torch.equal(c["resid_post", 1, "qformer"], c["qformer.blocks.1.resid_post"])


def test_encode_equals_processor(adapter, batch, images):
    proc = adapter.processor
    rgb = [np.repeat(i[..., None], 3, axis=-1) for i in images]
    ref = proc(images=rgb, text=PROMPTS, return_tensors="pt", padding=True, do_rescale=False,
               input_data_format="channels_last")
    assert set(batch.inputs) == {"input_ids", "attention_mask", "pixel_values"}
    for k in batch.inputs:
        assert torch.equal(batch.inputs[k], ref[k]), k
    assert (batch.input_ids[:, :Q] == adapter.config.image_token_id).all()
    assert (batch.input_ids[:, Q:] != adapter.config.image_token_id).all()


def test_lm_embed_is_hand_built_lm_input(adapter, batch, clean):
    """lm.embed = token embeddings with projector.out's rows in place of the image tokens."""
    _, c = clean
    emb = adapter.model.get_input_embeddings()(batch.input_ids).detach().clone()
    emb[:, :Q] = c["projector.out"]
    close(c["lm.embed"], emb, "lm.embed")


def test_inputs_embeds_reproduces_logits(adapter, batch, clean):
    logits, c = clean
    eb = replace(batch, inputs_embeds=c["lm.embed"])
    lg, c2 = adapter.run(eb, read=["lm.embed", "lm.blocks.1.resid_post"])
    close(lg, logits, "logits from inputs_embeds")
    close(c2["lm.blocks.1.resid_post"], c["lm.blocks.1.resid_post"], "resid from inputs_embeds")
    assert torch.equal(c2["lm.embed"], c["lm.embed"])
    lg2, _ = adapter.run(replace(batch, inputs_embeds=c["lm.embed"] * 0.5))
    assert not torch.allclose(lg2, logits, atol=1e-3)  # the embeddings are what the LM runs on
    assert eb.take([1, 0]).inputs_embeds.shape[0] == 2
    with pytest.raises(InterpError, match="inputs_embeds"):
        adapter.run(eb, read="qformer.blocks.0.resid_post")


@pytest.mark.parametrize("site,module", [
    ("projector.out", "language_projection"),
    ("qformer.blocks.0.xattn.out", "qformer.encoder.layer.0.crossattention.output.dense"),
    ("qformer.blocks.1.resid_post", "qformer.encoder.layer.1"),
])
def test_edit_matches_plain_hook(adapter, batch, clean, site, module):
    logits, _ = clean
    direction = torch.linspace(-1, 1, 32)

    def edit(x):  # query 1 pushed along a direction, query 2 zeroed
        x = x.clone()
        x[:, 1] += 3 * direction
        x[:, 2] = 0
        return x

    ours, _ = adapter.run(batch, edit={site: edit})
    ref = hooked_logits(adapter, batch, module, edit)
    close(ours, ref, f"edit at {site}")
    assert not torch.allclose(ours, logits, atol=1e-3), "the edit did nothing"


def test_gradient_reads_reach_the_qformer(adapter, batch):
    target = 5
    _, g = adapter.run(batch, read=["qformer.blocks.0.resid_post", "vision.blocks.1.resid_post"],
                       backward=lambda z: z[:, target])
    assert g.grads["qformer.blocks.0.resid_post"].abs().sum() > 0
    assert g.grads["vision.blocks.1.resid_post"].abs().sum() > 0
