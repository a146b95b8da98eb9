"""Gemma 3 family (``interp.models.gemma3``) on its tiny random-weight checkpoint, loaded by path.

References: plain forward hooks (family_checks), the processor called directly, a hand-computed
projector (SigLIP post-norm -> k x k average pool -> RMSNorm -> matmul), and TransformerLens's
TransformerBridge on the same folder.
"""

from __future__ import annotations

import warnings
from dataclasses import replace

import numpy as np
import pytest
import torch

from interp.models import load
from interp.models.gemma3 import save_tiny_gemma3
from tests.family_checks import check_cache_api, check_positions, check_sites_against_hooks

IMAGES = [np.full((32, 32), 0.5, np.float32), np.linspace(0, 1, 48 * 40, dtype=np.float32).reshape(48, 40)]
PROMPTS = ["is there a nodule ?", "is there a pleural effusion on the left lung ?"]


def close(a, b, msg, atol=1e-5):
    torch.testing.assert_close(a, b, atol=atol, rtol=0, msg=msg)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return save_tiny_gemma3(tmp_path_factory.mktemp("tiny_gemma3"), seed=0)


@pytest.fixture(scope="module")
def adapter(ckpt):
    return load(ckpt)


@pytest.fixture(scope="module")
def batch(adapter):
    return adapter.encode(IMAGES, PROMPTS)


@pytest.fixture(scope="module")
def clean(adapter, batch):
    return adapter.run(batch, read=adapter.sites)


# --- contract checks ----------------------------------------------------------------------
def test_loads_as_gemma3(adapter, ckpt):
    assert type(adapter).__name__ == "Gemma3Adapter"
    assert adapter.model.config.model_type == "gemma3" and adapter.n_layers("vision") == adapter.n_layers("lm") == 2
    assert sum(f.stat().st_size for f in ckpt.iterdir()) < 2_000_000


def test_sites_against_hooks(adapter, batch):
    check_sites_against_hooks(adapter, batch)


def test_positions(adapter, batch):
    check_positions(adapter, batch, IMAGES)


def test_cache_api(adapter, batch):
    check_cache_api(adapter, batch)


# --- inputs and positions -------------------------------------------------------------------
def test_encode_equals_the_processor(adapter, batch, ckpt):
    """Each row equals the checkpoint's own processor (loaded afresh) called on that row alone, one
    image per sample as HF batches Gemma 3; the same-size image skips the resize."""
    from transformers import AutoProcessor

    proc = AutoProcessor.from_pretrained(ckpt, backend="pil")
    texts = [adapter.template(p) for p in PROMPTS]
    assert texts[0] == "<bos><start_of_turn>user\n<start_of_image>is there a nodule ?<end_of_turn>\n<start_of_turn>model\n"
    assert set(batch.inputs) == {"input_ids", "attention_mask", "pixel_values", "token_type_ids"}
    for row, (img, text) in enumerate(zip(IMAGES, texts)):
        same = {"do_resize": False} if img.shape == (32, 32) else {}
        ref = proc(images=[[np.repeat(img[..., None], 3, -1)]], text=[text], return_tensors="pt", do_rescale=False,
                   input_data_format="channels_last", **same)
        n = ref["input_ids"].shape[1]
        assert int(batch.attention_mask[row].sum()) == n
        for k in ("input_ids", "attention_mask", "token_type_ids"):
            assert torch.equal(batch.inputs[k][row, :n], ref[k][0]), k
        assert (batch.input_ids[row, n:] == proc.tokenizer.pad_token_id).all()
        assert torch.equal(batch.pixel_values[row], ref["pixel_values"][0])
    # the same-size image: pixels are exactly (x - 0.5) / 0.5, no 8-bit quantisation by a resize
    close(batch.pixel_values[0], torch.zeros(3, 32, 32), "identity resize", 0)


def test_rows_do_not_depend_on_their_batch(adapter):
    """Two same-size rows go to the processor in one call (nested one image per sample) and each
    row's inputs and logits equal those of the row encoded alone."""
    imgs = [IMAGES[1], IMAGES[1][::-1].copy()]
    both = adapter.encode(imgs, PROMPTS[::-1])
    logits = adapter.run(both)[0]
    for row in range(2):
        alone = adapter.encode([imgs[row]], [PROMPTS[::-1][row]])
        n = alone.input_ids.shape[1]
        assert torch.equal(both.input_ids[row, :n], alone.input_ids[0])
        assert torch.equal(both.pixel_values[row], alone.pixel_values[0])
        close(logits[row, :n], adapter.run(alone)[0][0], f"row {row} alone")


def test_token_kinds_regions_and_token_type_ids(adapter, batch):
    tok = adapter.tokenizer
    for row, p in enumerate(batch.positions):
        ids = batch.input_ids[row].tolist()
        soft = [i for i, t in enumerate(ids) if t == tok.image_token_id]
        assert p.spans["image"] == soft and len(soft) == 4
        assert p.kinds[soft[0] - 1] == p.kinds[soft[-1] + 1] == "special"  # <start_of_image> ... <end_of_image>
        assert p.tokens[soft[0] - 1] == "<start_of_image>" and p.tokens[soft[-1] + 1] == "<end_of_image>"
        assert all(p.kinds[i] == "special" for i, t in enumerate(p.tokens) if t in ("<start_of_turn>", "<end_of_turn>", "<bos>"))
        assert batch.inputs["token_type_ids"][row].tolist() == [int(i in soft) for i in range(len(ids))]
        assert [(p.rows[i], p.cols[i]) for i in soft] == [(0, 0), (0, 1), (1, 0), (1, 1)]
        assert {p.groups[i] for i in soft} == {"pooled 2x2"}
    # row 1: 48 x 40 input resized to 32 x 32; a pooled token covers 16 x 16 model px = 24 x 20 input px
    p = batch.positions[1]
    assert [p.boxes[i] for i in p.spans["image"]] == [(0, 0, 24, 20), (0, 20, 24, 40), (24, 0, 48, 20), (24, 20, 48, 40)]
    vp = adapter.vision_positions(batch)
    assert [len(v) for v in vp] == [16, 16] and vp[1].kinds == ["image"] * 16  # no CLS
    assert vp[1].boxes[5] == (12.0, 10.0, 24.0, 20.0) and (vp[1].rows[5], vp[1].cols[5]) == (1, 1)


def test_projector_is_the_average_of_each_tokens_patches(adapter, batch, clean):
    """Hand-computed projector from the last vision block: the pooled token (r, c) averages exactly the
    SigLIP patches whose vision positions fall in block (r, c), which is what image_regions claims."""
    _, cache = clean
    proj = adapter.model.model.multi_modal_projector
    x = adapter.model.model.vision_tower.post_layernorm(cache["vision.blocks.1.resid_post"])
    vp, k = adapter.vision_positions(batch)[0], adapter.kernel
    for row in range(len(batch)):
        p = batch.positions[row]
        for j, i in enumerate(p.spans["image"]):
            sel = [n for n in range(16) if vp.rows[n] // k == p.rows[i] and vp.cols[n] // k == p.cols[i]]
            want = proj.mm_soft_emb_norm(x[row, sel].mean(0)) @ proj.mm_input_projection_weight
            close(cache["projector.out"][row, j], want, f"row {row} token {j}")
            close(cache["lm.embed"][row, i], want, f"merged row {row} token {j}")


def test_lm_branches_add_up_to_the_residual(adapter, clean):
    _, c = clean
    for l in range(2):
        close(c[f"lm.blocks.{l}.resid_pre"] + c[f"lm.blocks.{l}.attn.out"] + c[f"lm.blocks.{l}.mlp.out"],
              c[f"lm.blocks.{l}.resid_post"], f"layer {l}")


# --- runs ----------------------------------------------------------------------------------
def test_inputs_embeds_reproduce_the_logits(adapter, batch, clean):
    logits, cache = clean
    emb = replace(batch, inputs_embeds=cache["lm.embed"])
    again, c2 = adapter.run(emb, read=["lm.blocks.1.resid_post"])
    close(again, logits, "logits from inputs_embeds")
    close(c2["lm.blocks.1.resid_post"], cache["lm.blocks.1.resid_post"], "resid from inputs_embeds")
    # token_type_ids matter (bidirectional attention among image tokens) and are what carries it
    causal = replace(emb, inputs={k: v for k, v in batch.inputs.items() if k != "token_type_ids"})
    img = batch.positions[0].spans["image"][0]
    assert (adapter.run(causal)[0][0, img] - logits[0, img]).abs().max() > 1e-3


def test_projector_edit_equals_a_plain_hook(adapter, batch, clean):
    logits, _ = clean

    def zero(x):
        x = x.clone()
        x[0, 1] = 0  # row 0, pooled token (0, 1)
        return x

    ours, c = adapter.run(batch, read=["lm.embed"], edit={"projector.out": zero})
    handle = adapter.model.model.multi_modal_projector.register_forward_hook(lambda m, a, out: zero(out), prepend=True)
    try:
        with torch.no_grad():
            ref = adapter.model(**batch.model_inputs()).logits
    finally:
        handle.remove()
    close(ours, ref, "edited logits vs plain hook", 1e-6)
    at = batch.positions[0].spans["image"][1]
    assert (c["lm.embed"][0, at] == 0).all()
    assert (ours[0] - logits[0]).abs().max() > 1e-3  # the edit changes row 0 ...
    close(ours[1], logits[1], "row 1 untouched", 1e-6)  # ... and only row 0
    close(ours[0, :at - 2], logits[0, :at - 2], "before the image block", 1e-6)  # causal before the image


# --- TransformerLens -----------------------------------------------------------------------
TL_MAP = {
    "vision.embed": "vision_encoder.embeddings.hook_out",
    **{f"vision.blocks.{l}.{p}": f"vision_encoder.encoder_layers.{l}.{h}" for l in range(2) for p, h in (
        ("resid_pre", "hook_in"), ("attn.pattern", "attn.hook_pattern"), ("attn.out", "attn.hook_out"),
        ("mlp.out", "mlp.hook_out"), ("resid_post", "hook_out"))},
    "projector.out": "vision_projector.hook_out",
    "lm.embed": "blocks.0.hook_in",
    **{f"lm.blocks.{l}.{p}": f"blocks.{l}.{h}" for l in range(2) for p, h in (
        ("resid_pre", "hook_resid_pre"), ("attn.pattern", "attn.hook_pattern"), ("attn.out", "hook_attn_out"),
        ("mlp.out", "hook_mlp_out"), ("resid_post", "hook_resid_post"))},
}


@pytest.fixture(scope="module")
def bridge(ckpt):
    try:
        from transformer_lens.model_bridge import TransformerBridge
        from transformer_lens.model_bridge.generalized_components.normalization import NormalizationBridge
    except ImportError as e:
        pytest.skip(f"TransformerLens bridge not importable: {e}")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        br = TransformerBridge.boot_transformers(str(ckpt), device="cpu")
    # TL 3.9 recomputes norms itself, and gets SigLIP's LayerNorm wrong inside Gemma 3 (vision
    # attn.out off by ~4); its native path runs HF's own norms, leaving TL's hook placement compared.
    for mod in br.modules():
        if isinstance(mod, NormalizationBridge):
            mod.use_native_layernorm_autograd = True
    return br


def tl_inputs(batch):
    return dict(pixel_values=batch.pixel_values, attention_mask=batch.attention_mask,
                token_type_ids=batch.inputs["token_type_ids"])


def test_sites_match_transformerlens(bridge, batch, clean):
    logits, cache = clean
    with torch.no_grad():
        tl_logits, tl = bridge.run_with_cache(batch.input_ids, **tl_inputs(batch))
    missing = [h for h in TL_MAP.values() if h not in tl]
    assert not missing, f"TL hooks not found: {missing}"
    for site, hook in TL_MAP.items():
        close(cache[site], tl[hook], f"{site} vs TL {hook}")
    close(logits, tl_logits, "logits vs TL")


def test_projector_patch_matches_transformerlens(bridge, adapter, batch):
    def zero(x, hook=None):
        x = x.clone()
        x[:, 2] = 0
        return x

    ours, _ = adapter.run(batch, edit={"projector.out": zero})
    with torch.no_grad():
        theirs = bridge.run_with_hooks(batch.input_ids, **tl_inputs(batch), fwd_hooks=[("vision_projector.hook_out", zero)])
    close(ours, theirs, "patched logits vs TL run_with_hooks")
