"""Idefics3 family (and SmolVLM, same module) on tiny random-weight checkpoints built offline.

Images are split into 32 px tiles + a global view: the (16, 64) image gives 1 x 2 tiles + global (3 views),
the (40, 50) one 2 x 2 tiles + global (5 views); 4 LM tokens per view (patch 8, pixel shuffle 2).
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

from family_checks import check_cache_api, check_positions, check_sites_against_hooks
from interp.errors import InterpError
from interp.models import load
from interp.models.idefics3 import Idefics3Adapter, SmolVLMAdapter, save_tiny_idefics3

IMAGES = [np.full((16, 64), 0.3, np.float32), np.full((40, 50), 0.7, np.float32)]
PROMPTS = ["is there a effusion ?", "is there a pleural effusion on the left lung ?"]


@pytest.fixture(scope="module")
def path(tmp_path_factory):
    return save_tiny_idefics3(tmp_path_factory.mktemp("idefics3"), seed=0)


@pytest.fixture(scope="module")
def adapter(path):
    a = load(path)
    assert isinstance(a, Idefics3Adapter) and a.name == "idefics3"
    return a


@pytest.fixture(scope="module")
def nosplit(path):
    """The same checkpoint with image splitting off: one 32 px global view per image."""
    a = load(path)
    a.image_processor.do_image_splitting = False
    return a


@pytest.fixture(scope="module")
def batch(adapter):
    return adapter.encode(IMAGES, PROMPTS)


def test_contract_checks(adapter, batch):
    assert adapter.views(batch) == [(0, "tile 0,0"), (0, "tile 0,1"), (0, "global"),
                                    (1, "tile 0,0"), (1, "tile 0,1"), (1, "tile 1,0"), (1, "tile 1,1"), (1, "global")]
    check_sites_against_hooks(adapter, batch)
    check_positions(adapter, batch, IMAGES)
    check_cache_api(adapter, batch)
    _, cache = adapter.run(batch, read="vision.embed,projector.out")
    assert cache["vision.embed"].shape == (8, 16, 32) and cache["projector.out"].shape == (8, 4, 32)
    assert [len(p.spans["image"]) for p in batch.positions] == [12, 20]
    assert len(adapter.vision_positions(batch)) == 8


def test_contract_checks_without_splitting(nosplit):
    b = nosplit.encode(IMAGES, PROMPTS)
    check_sites_against_hooks(nosplit, b)
    check_positions(nosplit, b, IMAGES)
    check_cache_api(nosplit, b)
    assert nosplit.views(b) == [(0, "global"), (1, "global")]
    p = b.positions[0]
    assert [p.groups[i] for i in p.spans["image"]] == ["global"] * 4
    assert [(p.rows[i], p.cols[i], p.boxes[i]) for i in p.spans["image"]] == [
        (0, 0, (0.0, 0.0, 8.0, 32.0)), (0, 1, (0.0, 32.0, 8.0, 64.0)),
        (1, 0, (8.0, 0.0, 16.0, 32.0)), (1, 1, (8.0, 32.0, 16.0, 64.0))]


def test_tokens_and_tile_boxes(adapter, batch):
    """The template in Idefics3's style, the processor's image expansion, and each tile's boxes."""
    p = batch.positions[0]
    n = p.kinds.index("pad")
    img = ["<image>"] * 4
    assert p.tokens[:n] == ["<bos>", "User:", "<fake_token_around_image>", "<row_1_col_1>", *img,
                            "<fake_token_around_image>", "<row_1_col_2>", *img, "<fake_token_around_image>",
                            "<global-img>", *img, "<fake_token_around_image>", "is", "there", "a", "effusion", "?",
                            "<end_of_utterance>", "Assistant:"]
    assert [k for k in p.kinds[:n]].count("image") == 12
    # (16, 64) -> (32, 64) model pixels: tile 0,1 covers input columns 32..64, each token 16 px -> 8 rows x 16 cols
    tile = [(p.rows[i], p.cols[i], p.boxes[i]) for i in p.spans["image"] if p.groups[i] == "tile 0,1"]
    assert tile == [(0, 0, (0.0, 32.0, 8.0, 48.0)), (0, 1, (0.0, 48.0, 8.0, 64.0)),
                    (1, 0, (8.0, 32.0, 16.0, 48.0)), (1, 1, (8.0, 48.0, 16.0, 64.0))]


def _ramps(shape):
    h, w = shape
    y, x = np.mgrid[:h, :w].astype(np.float32)
    return [0.1 + 0.8 * (x + 0.5) / w, 0.1 + 0.8 * (y + 0.5) / h]


@pytest.mark.parametrize("split", [True, False])
def test_boxes_match_pixels(adapter, nosplit, split):
    """Each LM token's (and vision patch's) box centre, on x and y intensity ramps, predicts the mean of
    the model pixels that token sees: the boxes follow the processor's resize and tiling."""
    a = adapter if split else nosplit
    images = [r for s in [(16, 64), (40, 50), (64, 24)] for r in _ramps(s)]
    b = a.encode(images, ["a"] * len(images))
    ip = a.image_processor
    pv = b.pixel_values[..., 0, :, :] * ip.image_std[0] + ip.image_mean[0]  # [rows, views, 32, 32] grey again
    views = a.views(b)
    checked = 0
    for row, (p, img) in enumerate(zip(b.positions, images)):
        groups = [g for g, _ in b.frames[row].views]
        axis = 1 if row % 2 == 0 else 0  # x ramp, y ramp
        size = img.shape[axis]
        for i in p.spans["image"]:
            r, c, box = p.rows[i], p.cols[i], p.boxes[i]
            cell = pv[row, groups.index(p.groups[i]), 16 * r:16 * (r + 1), 16 * c:16 * (c + 1)]
            centre = (box[axis] + box[axis + 2]) / 2
            assert abs(float(cell.mean()) - (0.1 + 0.8 * centre / size)) < 0.03, (row, p.groups[i], r, c, box)
            checked += 1
    for v, ((row, group), vp) in enumerate(zip(views, a.vision_positions(b))):
        axis, size = (1 if row % 2 == 0 else 0), images[row].shape[1 if row % 2 == 0 else 0]
        assert set(vp.groups) == {group}
        for r, c, box in zip(vp.rows, vp.cols, vp.boxes):
            vi = [g for g, _ in b.frames[row].views].index(group)
            cell = pv[row, vi, 8 * r:8 * (r + 1), 8 * c:8 * (c + 1)]
            assert abs(float(cell.mean()) - (0.1 + 0.8 * (box[axis] + box[axis + 2]) / 2 / size)) < 0.04, (row, group, r, c)
    assert checked == (4 * (3 + 5 + 3) * 2 if split else 4 * 6)


def test_encode_equals_processor(adapter, path, batch):
    from transformers import AutoProcessor

    proc = AutoProcessor.from_pretrained(path, backend="pil")
    proc.tokenizer.padding_side = "right"
    texts = [proc.apply_chat_template([{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": t}]}],
                                      add_generation_prompt=True, tokenize=False) for t in PROMPTS]
    assert texts[0] == "<bos>User:<image>is there a effusion ?<end_of_utterance>\nAssistant:"
    rgb = [np.repeat(i[..., None], 3, -1) for i in IMAGES]
    enc = proc(images=rgb, text=texts, return_tensors="pt", padding=True, do_rescale=False,
               input_data_format="channels_last")
    ref = {k: v for k, v in enc.items() if isinstance(v, torch.Tensor)}
    assert set(ref) == set(batch.inputs) == {"input_ids", "attention_mask", "pixel_values", "pixel_attention_mask"}
    for k in ref:
        assert torch.equal(ref[k], batch.inputs[k]), k
    assert batch.pixel_values.shape == (2, 5, 3, 32, 32)
    assert not batch.pixel_values[0, 3:].any() and batch.pixel_values[1].flatten(1).ne(0).any(1).all()


def test_inputs_embeds_reproduce_logits(adapter, batch):
    logits, clean = adapter.run(batch, read="lm.embed,lm.blocks.*.resid_post")
    lm_only = replace(batch, inputs_embeds=clean["lm.embed"])
    assert "pixel_values" not in lm_only.model_inputs() and "pixel_attention_mask" not in lm_only.model_inputs()
    again, cache = adapter.run(lm_only, read="lm.blocks.*.resid_post")
    torch.testing.assert_close(again, logits, atol=1e-5, rtol=0)
    for site in cache:
        torch.testing.assert_close(cache[site], clean[site], atol=1e-5, rtol=0)
    with pytest.raises(InterpError, match="inputs_embeds"):
        adapter.run(lm_only, read="projector.out")
    two = lm_only.take([1, 1])  # rows of an embeds batch
    torch.testing.assert_close(adapter.run(two)[0][0], logits[1], atol=1e-5, rtol=0)


def test_edit_lm_embed_matches_reference(adapter, batch):
    logits, clean = adapter.run(batch, read="lm.embed")
    delta = torch.zeros_like(clean["lm.embed"])
    j = batch.positions[1].spans["image"][7]
    delta[1, j] = torch.linspace(-2, 2, delta.shape[-1])
    edited, _ = adapter.run(batch, edit={"lm.embed": lambda x: x + delta})
    with torch.no_grad():
        ref = adapter.model(inputs_embeds=clean["lm.embed"] + delta, attention_mask=batch.attention_mask).logits
    torch.testing.assert_close(edited, ref, atol=1e-5, rtol=0)
    assert (edited[1] - logits[1]).abs().max() > 1e-3
    torch.testing.assert_close(edited[0], logits[0], atol=1e-6, rtol=0)  # other row untouched
    torch.testing.assert_close(edited[1, :j], logits[1, :j], atol=1e-6, rtol=0)  # causal


def test_edit_projector_lands_on_its_lm_token(adapter, batch):
    """Replacing connector token k of the view (row 1, tile 0,1) changes exactly the LM token that
    positions say is that view's cell (k // 2, k % 2), and logits as the hand-merged inputs_embeds do."""
    logits, clean = adapter.run(batch, read="projector.out,lm.embed")
    v, k = adapter.views(batch).index((1, "tile 0,1")), 2
    new = torch.linspace(-1, 1, clean["projector.out"].shape[-1])
    out, cache = adapter.run(batch, read="lm.embed", edit={"projector.out": lambda x: torch.cat(
        [x[:v], torch.cat([x[v, :k], new[None], x[v, k + 1:]])[None], x[v + 1:]])})
    p = batch.positions[1]
    (j,) = [i for i in p.spans["image"] if (p.groups[i], p.rows[i], p.cols[i]) == ("tile 0,1", 1, 0)]
    changed = (cache["lm.embed"] - clean["lm.embed"]).abs().amax(-1).nonzero().tolist()
    assert changed == [[1, j]]
    torch.testing.assert_close(cache["lm.embed"][1, j], new, atol=0, rtol=0)
    ref_embeds = clean["lm.embed"].clone()
    ref_embeds[1, j] = new
    with torch.no_grad():
        ref = adapter.model(inputs_embeds=ref_embeds, attention_mask=batch.attention_mask).logits
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)
    assert (out - logits).abs().max() > 1e-3


def test_pixel_shuffle_layout(adapter, batch):
    """A patch's change reaches only the connector token whose 2 x 2 block holds it, and that LM token's
    box contains the patch's box."""
    _, clean = adapter.run(batch, read="projector.out")
    vp, views = adapter.vision_positions(batch), adapter.views(batch)
    last = f"vision.blocks.{adapter.n_layers('vision') - 1}.resid_post"
    for v, patch in [(1, 6), (4, 13), (7, 9)]:
        def bump(x, v=v, patch=patch):
            x = x.clone()
            x[v, patch] += 3.0
            return x
        _, cache = adapter.run(batch, read="projector.out", edit={last: bump})
        changed = (cache["projector.out"] - clean["projector.out"]).abs().amax(-1).nonzero().tolist()
        r, c = vp[v].rows[patch], vp[v].cols[patch]
        assert changed == [[v, (r // 2) * 2 + c // 2]]
        row, group = views[v]
        p = batch.positions[row]
        (j,) = [i for i in p.spans["image"] if (p.groups[i], p.rows[i], p.cols[i]) == (group, r // 2, c // 2)]
        (y0, x0, y1, x1), (Y0, X0, Y1, X1) = vp[v].boxes[patch], p.boxes[j]
        assert Y0 <= y0 < y1 <= Y1 and X0 <= x0 < x1 <= X1


def test_refuses_all_zero_view(adapter):
    ip = adapter.image_processor
    mean, std = ip.image_mean, ip.image_std
    try:  # a uniform image at the processor's mean (8-bit after PIL) normalises to zeros: the model would drop it
        ip.image_mean, ip.image_std = [128 / 255] * 3, [0.5] * 3
        with pytest.raises(InterpError, match="dropped by the model as padding"):
            adapter.encode([np.full((32, 32), 128 / 255, np.float32)], ["a"])
    finally:
        ip.image_mean, ip.image_std = mean, std


def test_transformer_lens_agrees(path, adapter, batch):
    from transformer_lens.model_bridge import TransformerBridge

    bridge = TransformerBridge.boot_transformers(str(path), device="cpu")
    logits, tl = bridge.run_with_cache(batch.input_ids, attention_mask=batch.attention_mask,
                                       pixel_values=batch.pixel_values,
                                       pixel_attention_mask=batch.inputs["pixel_attention_mask"])
    ours_logits, ours = adapter.run(batch, read=adapter.sites)
    torch.testing.assert_close(logits, ours_logits, atol=1e-5, rtol=0)
    pairs = {"projector.out": "vision_projector.hook_out", "vision.embed": "vision_encoder.embeddings.hook_out"}
    for l in range(adapter.n_layers("lm")):
        pairs[f"lm.blocks.{l}.resid_pre"] = f"blocks.{l}.hook_in"
        pairs[f"lm.blocks.{l}.resid_post"] = f"blocks.{l}.hook_out"
    for l in range(adapter.n_layers("vision")):
        pairs[f"vision.blocks.{l}.resid_pre"] = f"vision_encoder.encoder_layers.{l}.hook_in"
        pairs[f"vision.blocks.{l}.resid_post"] = f"vision_encoder.encoder_layers.{l}.hook_out"
    for ours_site, tl_hook in pairs.items():
        torch.testing.assert_close(ours[ours_site], tl[tl_hook], atol=1e-5, rtol=0, msg=ours_site)


def test_smolvlm(tmp_path):
    """SmolVLM: same adapter code over SmolVLM's module tree (tiny checkpoint with an Idefics3Processor)."""
    a = load(save_tiny_idefics3(tmp_path, seed=1, kind="smolvlm"))
    assert isinstance(a, SmolVLMAdapter) and type(a.model).__name__ == "SmolVLMForConditionalGeneration"
    b = a.encode(IMAGES, PROMPTS)
    check_sites_against_hooks(a, b)
    check_positions(a, b, IMAGES)
