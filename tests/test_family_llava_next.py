"""LLaVA-NeXT family (``interp.models.llava_next``) on its tiny checkpoint, loaded by path like a hub checkpoint.

References: plain forward hooks (tests/family_checks.py), the processor called directly, the pixels the
processor wrote into each view (for the boxes), the projector's own rows (for the LM token layout),
plain forward hooks doing the same edits, and TransformerLens' TransformerBridge on the same folder.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

from family_checks import check_cache_api, check_positions, check_sites_against_hooks, hooked_logits
from interp.errors import InterpError
from interp.models import load
from interp.models.llava_next import LlavaNextAdapter, save_tiny_llava_next
from interp.models.registry import FAMILIES
from interp.models.tiny import BUILDERS

PROMPTS = ["is there a pleural effusion on the left lung ?", "left lung"]
SPANS = [{"finding": (11, 26)}, {}]
SIZES = [(40, 36), (24, 60)]  # 64 x 64 canvas (2 x 2 tiles) and 32 x 64 (1 x 2 tiles, padded top and bottom)
VIEWS = [5, 3]
GROUPS = ["base", "tile 0,0", "tile 0,1", "tile 1,0", "tile 1,1", "base", "tile 0,0", "tile 0,1"]


@pytest.fixture(scope="module")
def path(tmp_path_factory):
    return save_tiny_llava_next(tmp_path_factory.mktemp("llava_next") / "ckpt", seed=0)


@pytest.fixture(scope="module")
def adapter(path):
    return load(path)


@pytest.fixture(scope="module")
def images():
    """Grey images: dark, with a bright block (for the box check) at a known place."""
    out = []
    for h, w in SIZES:
        a = np.full((h, w), 0.1, np.float32)
        a[h // 4 : h // 2, w // 3 : 2 * w // 3] = 0.9
        out.append(a)
    return out


@pytest.fixture(scope="module")
def batch(adapter, images):
    return adapter.encode(images, PROMPTS, SPANS)


@pytest.fixture(scope="module")
def clean(adapter, batch):
    return adapter.run(batch, read=["projector.out", "lm.embed", "lm.blocks.0.resid_pre", "lm.blocks.1.resid_post"])


def close(a, b, what, atol=1e-5):
    torch.testing.assert_close(a, b, atol=atol, rtol=0, msg=what)


def test_registered_and_loaded_by_path(adapter):
    assert isinstance(adapter, LlavaNextAdapter)
    assert FAMILIES["llava_next"] == "interp.models.llava_next:LlavaNextAdapter" and "llava_next" in BUILDERS
    assert adapter.towers == ("vision", "lm") and adapter.n_layers("vision") == adapter.n_layers("lm") == 2


def test_sites_against_plain_hooks(adapter, batch):
    check_sites_against_hooks(adapter, batch)


def test_inputs_and_site_shapes(adapter, batch):
    """pixel_values [b, views, c, h, w] and image_sizes ride in the batch; vision sites run on every real
    view of every row, concatenated ([5 + 3, 1 + 16, d]); LM sites are [b, seq, ...]."""
    assert batch.pixel_values.shape == (2, max(VIEWS), 3, 32, 32)
    assert batch.inputs["image_sizes"].tolist() == [list(s) for s in SIZES]
    _, c = adapter.run(batch, read=adapter.sites)
    seq = batch.input_ids.shape[1]
    for site in adapter.sites:
        lead = sum(VIEWS) if site.split(".")[0] in ("vision", "projector") else 2
        assert c[site].shape == (lead, *adapter.site_shape(site, seq)), site


def test_positions(adapter, batch, images):
    check_positions(adapter, batch, images)
    for p, (h, w), n_rows in zip(batch.positions, SIZES, [8, 4]):
        img = p.spans["image"]
        groups = [p.groups[i] for i in img]
        assert groups[:16] == ["base"] * 16 and groups.count("newline") == n_rows
        assert len(img) == 16 + n_rows * (8 + 1)  # base + unpadded canvas rows of 8 cells + a newline each
        assert all(p.kinds[i] == "query" and p.boxes[i] is None for i in img if p.groups[i] == "newline")
        assert p.boxes[img[0]] == (0.0, 0.0, h / 4, w / 4) and p.boxes[img[15]] == (3 * h / 4, 3 * w / 4, h, w)
    assert [batch.positions[0].tokens[i] for i in batch.positions[0].spans["finding"]] == ["pleural", "effusion"]
    vps = adapter.vision_positions(batch)
    assert [v.groups[1] for v in vps] == GROUPS and all(len(v) == 17 and v.kinds[0] == "special" for v in vps)


def test_boxes_cover_the_pixels_the_processor_put_there(adapter, batch, images):
    """Each view patch's mean brightness in pixel_values is what its box predicts from the input image
    (0.1 + 0.8 x the box's share of the bright block; 0 for padding): the boxes follow the any-res
    resize + centred pad + tiling. (A box shifted by the padding offset, ~2 input pixels, errs by 0.3.)"""
    ip = adapter.image_processor
    vps, v, errors = adapter.vision_positions(batch), 0, []
    for row, ((h, w), n) in enumerate(zip(SIZES, VIEWS)):
        by0, by1, bx0, bx1 = h // 4, h // 2, w // 3, 2 * w // 3
        for view in range(n):
            px = batch.pixel_values[row, view, 0] * ip.image_std[0] + ip.image_mean[0]
            p = vps[v]
            for i in p.spans["image"]:
                y0, x0, y1, x1 = p.boxes[i]
                val = float(px[p.rows[i] * 8 : p.rows[i] * 8 + 8, p.cols[i] * 8 : p.cols[i] * 8 + 8].mean())
                area = max(0.0, y1 - y0) * max(0.0, x1 - x0)
                inside = max(0.0, min(y1, by1) - max(y0, by0)) * max(0.0, min(x1, bx1) - max(x0, bx0))
                errors.append(abs(val - (0.1 + 0.8 * inside / area if area else 0.0)))
            v += 1
    assert v == len(vps) == sum(VIEWS) and len(errors) == 16 * sum(VIEWS)
    assert max(errors) < 0.06, max(errors)  # bicubic blur and patches half in the padding stay within 0.04


def test_lm_image_tokens_are_the_projector_rows_image_regions_names(adapter, batch, clean):
    """Independent of image_regions' own arithmetic: each LM image token's lm.embed is the projector row of
    the view and patch its (group, row, col) name; newline tokens are the model's image_newline."""
    _, c = clean
    proj, emb, newline = c["projector.out"], c["lm.embed"], adapter.model.model.image_newline
    first = 0
    for row, (p, n) in enumerate(zip(batch.positions, VIEWS)):
        tiles_w = [2, 2][row]
        for i in p.spans["image"]:
            g, r, col = p.groups[i], p.rows[i], p.cols[i]
            if g == "newline":
                want = newline
            elif g == "base":
                want = proj[first, r * 4 + col]
            else:
                tr, tc = map(int, g.split()[1].split(","))
                assert (tr, tc) == (r // 4, col // 4)
                want = proj[first + 1 + tr * tiles_w + tc, (r % 4) * 4 + col % 4]
            close(emb[row, i], want.to(emb.dtype), f"row {row} token {i} ({g} {r},{col})")
        first += n


def test_cache_api(adapter, batch):
    check_cache_api(adapter, batch)
    assert adapter.vision_batched is False  # vision sites are per view: sweeps and caches must not take them as rows
    _, c = adapter.run(batch, read="vision.blocks.1.resid_post,lm.blocks.0.resid_post")
    assert c["vision.blocks.1.resid_post"].shape[0] == len(adapter.vision_positions(batch)) == sum(VIEWS)


def test_encode_equals_processor(adapter, batch, images):
    rgb = [np.repeat(i[..., None], 3, axis=-1) for i in images]
    texts = [adapter.template(p) for p in PROMPTS]
    assert texts[1] == "<bos>USER: <image>\nleft lung ASSISTANT:"
    ref = adapter.processor(images=rgb, text=texts, return_tensors="pt", padding=True, do_rescale=False,
                            input_data_format="channels_last")
    assert set(batch.inputs) == {"input_ids", "attention_mask", "pixel_values", "image_sizes"}
    for k in batch.inputs:
        assert torch.equal(batch.inputs[k], ref[k]), k


def test_take_carries_views_and_sizes(adapter, batch, clean):
    logits, _ = clean
    lg, _ = adapter.run(batch.take([1, 0]))
    close(lg, logits[[1, 0]], "logits of swapped rows")
    lg1, _ = adapter.run(batch.take([1]))
    n = int(batch.attention_mask[1].sum())
    close(lg1[0, :n], logits[1, :n], "row 1 alone")


def test_inputs_embeds_reproduces_logits(adapter, batch, clean):
    logits, c = clean
    eb = replace(batch, inputs_embeds=c["lm.embed"])
    lg, c2 = adapter.run(eb, read=["lm.blocks.1.resid_post"])
    close(lg, logits, "logits from inputs_embeds")
    close(c2["lm.blocks.1.resid_post"], c["lm.blocks.1.resid_post"], "resid from inputs_embeds")
    with pytest.raises(InterpError, match="inputs_embeds"):
        adapter.run(eb, read="projector.out")


@pytest.mark.parametrize("site,module", [
    ("projector.out", "model.multi_modal_projector"),
    ("vision.blocks.0.resid_post", "model.vision_tower.encoder.layers.0"),
])
def test_edit_matches_plain_hook(adapter, batch, clean, site, module):
    logits, _ = clean

    def edit(x):  # view 1 (row 0's first tile) zeroed, patch 3 of every view pushed along a direction
        x = x.clone()
        x[1] = 0
        x[:, 3] += torch.linspace(-2, 2, x.shape[-1])
        return x

    ours, _ = adapter.run(batch, edit={site: edit})
    ref = hooked_logits(adapter, batch, module, edit)
    close(ours, ref, f"edit at {site}")
    assert not torch.allclose(ours, logits, atol=1e-3), "the edit did nothing"


def test_transformer_lens_bridge_agrees(adapter, batch, path):
    """TransformerLens 3.9 loads the folder; its LM and vision block values match ours within 1e-5.
    (Its CLIP-vision LayerNorms take the LM's norm eps: the tiny Llama uses rms_norm_eps = 1e-5, the CLIP
    value, as real LLaVA-1.6 checkpoints do; with Llama's default 1e-6 the bridge's vision values drift.)"""
    bridge_mod = pytest.importorskip("transformer_lens.model_bridge")
    bridge = bridge_mod.TransformerBridge.boot_transformers(str(path), device="cpu")
    with torch.no_grad():
        out, tl = bridge.run_with_cache(batch.input_ids, pixel_values=batch.pixel_values,
                                        image_sizes=batch.inputs["image_sizes"], attention_mask=batch.attention_mask)
    logits, ours = adapter.run(batch, read="lm.blocks.*.resid_pre,lm.blocks.*.resid_post,vision.blocks.*.resid_post")
    close(out, logits, "TL logits")
    for l in range(2):
        close(tl[f"blocks.{l}.hook_in"], ours[f"lm.blocks.{l}.resid_pre"], f"TL blocks.{l}.hook_in")
        close(tl[f"blocks.{l}.hook_out"], ours[f"lm.blocks.{l}.resid_post"], f"TL blocks.{l}.hook_out")
        close(tl[f"vision_encoder.encoder_layers.{l}.hook_out"], ours[f"vision.blocks.{l}.resid_post"],
              f"TL vision layer {l}")
