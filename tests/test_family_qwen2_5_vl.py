"""Qwen2.5-VL family on its tiny checkpoint: sites vs plain hooks, positions, cache API, processor
parity, M-RoPE position ids with ``inputs_embeds``, edits at ``lm.embed``, vision-tower order.

TransformerLens 3.9 cannot serve as a reference here: its Qwen2.5-VL adapter requires torchvision.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from family_checks import check_cache_api, check_positions, check_sites_against_hooks

from interp.models import load
from dataclasses import replace

from interp.models.qwen2_5_vl import Qwen25VLAdapter, save_tiny_qwen2_5_vl

PROMPTS = ["is there a pleural effusion on the left lung ?", "nodule ?"]


@pytest.fixture(scope="module")
def adapter(tmp_path_factory):
    path = save_tiny_qwen2_5_vl(tmp_path_factory.mktemp("tiny-qwen2_5_vl"))
    a = load(path)
    assert isinstance(a, Qwen25VLAdapter)
    return a


@pytest.fixture(scope="module")
def images():
    rng = np.random.default_rng(1)
    # 56 x 56 keeps its size (16 patches, 4 LM tokens); 40 x 70 is smart-resized to 56 x 84 (24 patches, 6 tokens)
    return [rng.random((56, 56), dtype=np.float32), rng.random((40, 70), dtype=np.float32)]


@pytest.fixture(scope="module")
def batch(adapter, images):
    return adapter.encode(images, PROMPTS)


def test_sites_match_plain_hooks(adapter, batch):
    check_sites_against_hooks(adapter, batch)


def test_positions(adapter, batch, images):
    check_positions(adapter, batch, images)
    assert batch.ragged == {"pixel_values": [16, 24]}
    assert [len(p.spans["image"]) for p in batch.positions] == [4, 6]
    p0, p1 = batch.positions
    # 56 x 56 is not resized: each LM image token is a 28 x 28 merged cell, row-major
    assert [p0.boxes[i] for i in p0.spans["image"]] == [(0.0, 0.0, 28.0, 28.0), (0.0, 28.0, 28.0, 56.0),
                                                        (28.0, 0.0, 56.0, 28.0), (28.0, 28.0, 56.0, 56.0)]
    assert {p0.groups[i] for i in p0.spans["image"]} == {"merged 2x2"}
    # 40 x 70 -> 56 x 84: 2 x 3 merged cells of 20 x 23.33 input pixels
    np.testing.assert_allclose([p1.boxes[i] for i in p1.spans["image"]][-1], (20.0, 140 / 3, 40.0, 70.0))
    assert [(p1.rows[i], p1.cols[i]) for i in p1.spans["image"]] == [(0, 0), (0, 1), (0, 2), (1, 0), (1, 1), (1, 2)]


def test_cache_api(adapter, batch):
    check_cache_api(adapter, batch)


def test_encode_matches_processor(adapter):
    """One processor call on the same templated texts and images gives the same inputs (both images keep
    their size, so the rows share processor arguments); a resized row equals its own processor call."""
    rng = np.random.default_rng(2)
    imgs = [rng.random((56, 56), dtype=np.float32), rng.random((56, 84), dtype=np.float32)]
    b = adapter.encode(imgs, PROMPTS)
    rgb = [np.repeat(i[..., None], 3, -1) for i in imgs]
    texts = [adapter.template(p) for p in PROMPTS]
    tok = adapter.tokenizer
    side, tok.padding_side = tok.padding_side, "right"
    try:
        ref = adapter.processor(images=rgb, text=texts, return_tensors="pt", padding=True, do_rescale=False,
                                input_data_format="channels_last", do_resize=False)
        resized = adapter.processor(images=[np.repeat(np.full((40, 70), 0.25, np.float32)[..., None], 3, -1)],
                                    text=texts[:1], return_tensors="pt", do_rescale=False,
                                    input_data_format="channels_last")
    finally:
        tok.padding_side = side
    for k in ("input_ids", "attention_mask", "pixel_values", "image_grid_thw"):
        assert torch.equal(b.inputs[k], ref[k]), k
    assert b.inputs["image_grid_thw"].tolist() == [[1, 4, 4], [1, 4, 6]]
    # without a resize the pixels are the normalised input, patchified: first patch = top-left 14 x 14
    ip = adapter.image_processor
    first = (imgs[0][:14, :14] - ip.image_mean[0]) / ip.image_std[0]
    np.testing.assert_allclose(b.inputs["pixel_values"][0].reshape(3, 2, 14, 14)[0, 0].numpy(), first, atol=1e-6)
    one = adapter.encode([np.full((40, 70), 0.25, np.float32)], PROMPTS[:1])
    for k in ("input_ids", "pixel_values", "image_grid_thw"):
        assert torch.equal(one.inputs[k], resized[k]), k


def test_mrope_position_ids(adapter, batch):
    """The stored position ids are the model's own: a plain forward that computes them gives our logits;
    a run from ``inputs_embeds`` with them reproduces the logits, one without them does not."""
    logits, cache = adapter.run(batch, read="lm.embed")
    pos = batch.inputs["position_ids"]
    assert pos.shape == (3, 2, batch.input_ids.shape[1])
    p = batch.positions[1]
    img = p.spans["image"]
    # image tokens: same temporal id, height/width ids on the 2 x 3 merged grid, offset by the text before
    assert pos[0, 1, img].tolist() == [img[0]] * 6
    assert (pos[1, 1, img] - img[0]).tolist() == [0, 0, 0, 1, 1, 1]
    assert (pos[2, 1, img] - img[0]).tolist() == [0, 1, 2, 0, 1, 2]
    with torch.no_grad():
        own = adapter.model(**{k: v for k, v in batch.inputs.items() if k != "position_ids"}).logits
    torch.testing.assert_close(logits, own, atol=1e-5, rtol=0)
    emb = replace(batch, inputs_embeds=cache["lm.embed"])
    assert "pixel_values" not in emb.model_inputs() and "position_ids" in emb.model_inputs()
    again, _ = adapter.run(emb)
    torch.testing.assert_close(again, logits, atol=1e-5, rtol=0)
    adapter.model.model.rope_deltas = None  # no state left from earlier calls: 1-D positions are used
    plain = {k: v for k, v in emb.model_inputs().items() if k != "position_ids"}
    with torch.no_grad():
        wrong = adapter.model(**plain).logits
    mask = batch.attention_mask.bool()
    assert (wrong - logits)[mask].abs().max() > 1e-3


def test_lm_embed_edit_matches_modified_inputs_embeds(adapter, batch):
    """An edit at ``lm.embed`` equals an HF forward from hand-built, hand-modified ``inputs_embeds``."""
    model = adapter.model
    delta = torch.randn(model.config.text_config.hidden_size, generator=torch.Generator().manual_seed(3))
    at = batch.positions[0].spans["image"][1]

    def edit(x):
        x = x.clone()
        x[0, at] += delta
        return x

    logits, _ = adapter.run(batch, edit={"lm.embed": edit})
    with torch.no_grad():
        embeds = model.get_input_embeddings()(batch.input_ids)
        feats = torch.cat(model.model.get_image_features(batch.pixel_values, batch.inputs["image_grid_thw"]).pooler_output)
        embeds = embeds.masked_scatter((batch.input_ids == model.config.image_token_id)[..., None], feats)
        embeds[0, at] += delta
        ref = model(inputs_embeds=embeds, attention_mask=batch.attention_mask,
                    position_ids=batch.inputs["position_ids"]).logits
    torch.testing.assert_close(logits, ref, atol=1e-5, rtol=0)
    clean, _ = adapter.run(batch)
    assert (logits[0, at:] - clean[0, at:]).abs().max() > 1e-2  # the edit matters downstream
    torch.testing.assert_close(logits[1], clean[1], atol=1e-6, rtol=0)  # and only in its row
    torch.testing.assert_close(logits[0, :at], clean[0, :at], atol=1e-6, rtol=0)  # causal


def test_vision_positions_follow_the_tower(adapter, batch):
    """``vision_positions`` name each packed vision token: ``vision.embed`` token k is the patch embedding
    of the processor's patch at (rows[k], cols[k]); ``projector.out`` cells (window order) land on the LM
    image tokens (row-major) at ``lm.embed``."""
    _, cache = adapter.run(batch, read=["vision.embed", "projector.out", "lm.embed"])
    vps = adapter.vision_positions(batch)
    assert [len(p) for p in vps] == batch.ragged["pixel_values"]
    assert vps[1].groups[0] == "window 0" and vps[1].groups[-1] == "window 1"  # 2 x 3 cells: two windows
    with torch.no_grad():
        patches = adapter.model.model.visual.patch_embed(batch.pixel_values)
    m, offset, cell_offset = adapter.merge, 0, 0
    for row, vp in enumerate(vps):
        gw = int(batch.inputs["image_grid_thw"][row, 2])
        idx = [((r // m) * (gw // m) + c // m) * m * m + (r % m) * m + c % m for r, c in zip(vp.rows, vp.cols)]
        assert sorted(idx) == list(range(len(vp)))
        torch.testing.assert_close(cache["vision.embed"][offset:offset + len(vp)], patches[offset:offset + len(vp)][idx],
                                   atol=1e-6, rtol=0)
        cells = [idx[k] // (m * m) for k in range(0, len(vp), m * m)]  # window order -> row-major cell index
        lm_image = cache["lm.embed"][row, batch.positions[row].spans["image"]]
        n = len(cells)
        torch.testing.assert_close(lm_image[cells], cache["projector.out"][cell_offset:cell_offset + n], atol=1e-6, rtol=0)
        offset, cell_offset = offset + len(vp), cell_offset + n
    assert cells != sorted(cells)  # the 2 x 3 image really is window-permuted


def test_take_keeps_rows(adapter, batch):
    """Taking rows re-slices ragged pixels and the batch dimension (1) of the M-RoPE position ids."""
    logits, _ = adapter.run(batch)
    swapped = batch.take([1, 0, 1])
    assert swapped.inputs["position_ids"].shape[:2] == (3, 3)
    out, _ = adapter.run(swapped)
    torch.testing.assert_close(out, logits[[1, 0, 1]], atol=1e-5, rtol=0)


def test_inputs_embeds_refuse_vision_sites(adapter, batch):
    from interp.errors import InterpError

    _, cache = adapter.run(batch, read="lm.embed")
    emb = replace(batch, inputs_embeds=cache["lm.embed"])
    with pytest.raises(InterpError, match="inputs_embeds"):
        adapter.run(emb, read="projector.out")


def test_registered():
    from interp.models.registry import FAMILIES
    from interp.models.tiny import BUILDERS

    assert FAMILIES["qwen2_5_vl"] == "interp.models.qwen2_5_vl:Qwen25VLAdapter" and "qwen2_5_vl" in BUILDERS
    assert Qwen25VLAdapter.vision_batched is False  # packed vision sites: sweeps and caches skip the tower
