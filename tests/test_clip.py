"""Dual-encoder adapter (CLIP, SigLIP) against plain forward hooks and HF outputs; patching on the
text tower against a hand loop; the shipped CLIP organism loads and retrieves above chance."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from transformers import CLIPModel, SiglipConfig, SiglipModel

from interp.errors import InterpError
from interp.models.adapter import Adapter, Hook
from interp.models.clip import CLIP_DIR, ClipAdapter, clip_config, clip_processor, clip_tokenizer
from interp.trace.patching import restore_sweep

WORDS = ("there is a no pleural effusion pneumothorax nodule cardiomegaly . the heart size is normal "
         "lungs are fully expanded costophrenic angles sharp").split()
CAPTION = "there is a pleural effusion . the heart size is normal ."
NEGATED = "there is no pleural effusion . the heart size is normal ."
TEXTS = [CAPTION, "there is no pneumothorax .", "there is cardiomegaly . there is a nodule ."]
POINTS = ("resid_pre", "attn.pattern", "attn.out", "mlp.out", "resid_post")
SIZES = dict(d_text=32, n_text=3, d_vision=32, n_vision=2, d_embed=16)
# the biased organism on 120 val phantoms of seed 7 (105 items): gap +0.295, 95% CI [0.190, 0.400]; floor about half
BIASED_N, BIASED_GAP_FLOOR = 120, 0.15


@pytest.fixture(scope="module")
def tok():
    return clip_tokenizer(WORDS)


@pytest.fixture(scope="module")
def clip(tok):
    torch.manual_seed(0)
    model = CLIPModel(clip_config(len(tok), **SIZES))
    model.set_attn_implementation("eager")
    return ClipAdapter(model, clip_processor(tok), "tiny-clip")


@pytest.fixture(scope="module")
def siglip(tok):
    cfg = SiglipConfig(
        text_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         vocab_size=len(tok), max_position_embeddings=24, pad_token_id=0),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                           image_size=64, patch_size=8, num_channels=1),
    )
    torch.manual_seed(1)
    model = SiglipModel(cfg)
    model.set_attn_implementation("eager")
    return ClipAdapter(model, clip_processor(tok), "tiny-siglip")


@pytest.fixture(scope="module")
def images():
    rng = np.random.default_rng(0)
    return [rng.random((64, 64), dtype=np.float32), np.linspace(0, 1, 4096, dtype=np.float32).reshape(64, 64),
            rng.random((80, 80), dtype=np.float32)]


def _plain(adapter: ClipAdapter, batch):
    """Every site from plain forward hooks on the module the site names, plus HF outputs."""
    got: dict[str, torch.Tensor] = {}
    handles = []
    for site, hook in adapter.hooks.items():
        m = adapter.model.get_submodule(hook.module)

        def grab(mod, args, out, site=site, hook=hook):
            v = args[0] if hook.io == "input" else out
            got[site] = (v[hook.index] if hook.index is not None else v).detach().clone()

        handles.append(m.register_forward_hook(grab))
    try:
        with torch.no_grad():
            out = adapter.model(**batch.model_inputs(), output_hidden_states=True, output_attentions=True)
    finally:
        for h in handles:
            h.remove()
    return got, out


@pytest.mark.parametrize("which", ["clip", "siglip"])
def test_sites_equal_plain_hooks_and_hf_outputs(request, which, images):
    adapter = request.getfixturevalue(which)
    batch = adapter.encode(images, TEXTS)
    logits, ours = adapter.run(batch, read=adapter.sites)
    plain, out = _plain(adapter, batch)
    assert list(ours) == adapter.sites
    for site in adapter.sites:
        torch.testing.assert_close(ours[site], plain[site], atol=1e-5, rtol=0, msg=site)
    # independent of our hook choice: HF hidden states, attentions, features and logits
    for tower, res in (("text", out.text_model_output), ("vision", out.vision_model_output)):
        n = adapter.n_layers(tower)
        for l in range(n):
            torch.testing.assert_close(ours[f"{tower}.blocks.{l}.attn.pattern"], res.attentions[l], atol=1e-6, rtol=0)
            if l + 1 < n:  # the last hidden state may carry a final norm
                torch.testing.assert_close(ours[f"{tower}.blocks.{l}.resid_post"], res.hidden_states[l + 1], atol=1e-6, rtol=0)
            torch.testing.assert_close(
                ours[f"{tower}.blocks.{l}.resid_post"],
                ours[f"{tower}.blocks.{l}.resid_pre"] + ours[f"{tower}.blocks.{l}.attn.out"] + ours[f"{tower}.blocks.{l}.mlp.out"],
                atol=1e-5, rtol=0,
            )
    with torch.no_grad():
        text_f = adapter.model.get_text_features(input_ids=batch.input_ids, attention_mask=batch.attention_mask)
        image_f = adapter.model.get_image_features(pixel_values=batch.pixel_values)
    text_f = getattr(text_f, "pooler_output", text_f)
    image_f = getattr(image_f, "pooler_output", image_f)
    torch.testing.assert_close(ours["text.pooled"], text_f, atol=1e-5, rtol=0)
    torch.testing.assert_close(ours["vision.pooled"], image_f, atol=1e-5, rtol=0)
    torch.testing.assert_close(logits, out.logits_per_image, atol=1e-5, rtol=0)
    torch.testing.assert_close(adapter.readout(logits, batch)[:, 0], out.logits_per_image.diagonal(), atol=1e-5, rtol=0)
    assert adapter.readout(logits, batch).shape == (3, 1)
    torch.testing.assert_close(adapter.logit(ours["vision.pooled"], ours["text.pooled"]), out.logits_per_image.diagonal(),
                               atol=1e-4, rtol=0)


@pytest.mark.parametrize("which", ["clip", "siglip"])
def test_site_shapes_and_order(request, which, images):
    adapter = request.getfixturevalue(which)
    batch = adapter.encode(images[:1], [CAPTION])
    _, ours = adapter.run(batch, read=adapter.sites)
    for site in adapter.sites:
        assert tuple(ours[site].shape[1:]) == adapter.site_shape(site, batch.input_ids.shape[1]), site
    # vision runs first in both models; pooled sites close each tower
    assert adapter.sites[0] == "vision.embed" and adapter.sites[-1] == "text.pooled"
    assert adapter.sites.index("vision.pooled") < adapter.sites.index("text.embed")
    assert len(adapter.vision_positions()[0].kinds) == ours["vision.blocks.0.resid_post"].shape[1]
    assert isinstance(adapter, Adapter)


def test_llava_adapter_satisfies_the_protocol(tiny_adapter):
    assert isinstance(tiny_adapter, Adapter)


def test_encode_positions_and_spans(clip, siglip, images):
    cue = NEGATED.index(" no ") + 1
    b = clip.encode(images[:2], [NEGATED, "there is no pneumothorax ."], [{"negation_cue": (cue, cue + 2)}, {}])
    p = b.positions[0]
    assert p.tokens[0] == "<bos>" and p.tokens[p.spans["eot"][0]] == "<eos>"
    assert [p.tokens[i] for i in p.span("negation_cue")] == ["no"]
    assert b.positions[1].kinds[-1] == "pad" and b.attention_mask[1, -1] == 0
    assert b.positions[1].spans["eot"] == [b.positions[1].tokens.index("<eos>")]
    s = siglip.encode(images[:1], [NEGATED])
    assert s.input_ids.shape[1] == siglip.max_len and s.positions[0].spans["eot"] == [siglip.max_len - 1]
    with pytest.raises(InterpError, match="one image per text"):
        clip.encode(images[:2], [CAPTION])
    with pytest.raises(InterpError, match="at most"):
        clip.encode(images[:1], [" ".join(["there"] * 200)])


def test_text_patching_sweep_matches_hand_loop(clip, images):
    """NAST-style paired patching: the negated text's states patched into the caption's run at
    (layer, position); restore_sweep against plain hooks, one forward pass per cell."""
    clean = clip.encode(images[:1], ["there is no pleural effusion ."])  # states come from the negated text
    corrupt = clip.encode(images[:1], ["there is a pleural effusion ."])  # ... into the caption's run
    foil = 1.5
    metric = lambda z: z[:, 0] - foil
    n_pos = clean.input_ids.shape[1]
    groups = [[p] for p in range(n_pos)] + [[2, 3, 4]]
    model = clip.model
    blocks = model.text_model.encoder.layers
    for point, layers in (("resid_post", range(clip.n_layers("text"))), ("attn.out", [1]), ("mlp.out", [2])):
        got = restore_sweep(clip, clean, corrupt, metric, tower="text", layers=layers, groups=groups, point=point,
                            batch_size=4 if point == "resid_post" else 512)
        ref = np.zeros((len(layers), len(groups)))
        for li, l in enumerate(layers):
            module = {"resid_post": blocks[l], "attn.out": blocks[l].self_attn, "mlp.out": blocks[l].mlp}[point]
            store = {}

            def grab(m, a, out):
                store["v"] = (out[0] if isinstance(out, tuple) else out).detach().clone()

            with torch.no_grad():
                h = module.register_forward_hook(grab)
                model(**clean.model_inputs())
                h.remove()
                for gi, g in enumerate(groups):
                    def put(m, a, out, g=g):
                        x = out[0] if isinstance(out, tuple) else out
                        x = x.clone()
                        x[:, g] = store["v"][:, g]
                        return (x, *out[1:]) if isinstance(out, tuple) else x

                    h = module.register_forward_hook(put)
                    ref[li, gi] = float(model(**corrupt.model_inputs()).logits_per_image[0, 0]) - foil
                    h.remove()
        with torch.no_grad():
            base = float(model(**corrupt.model_inputs()).logits_per_image[0, 0]) - foil
            top = float(model(**clean.model_inputs()).logits_per_image[0, 0]) - foil
        assert got.corrupted == pytest.approx(base, abs=1e-5) and got.clean == pytest.approx(top, abs=1e-5)
        np.testing.assert_allclose(got.restored, ref, atol=1e-5, err_msg=point)
        assert np.ptp(ref) > 1e-4
    # patching the whole last block output at every position gives the negated text's logit
    full = restore_sweep(clip, clean, corrupt, metric, tower="text", layers=[clip.n_layers("text") - 1],
                         groups=[list(range(n_pos))])
    assert full.restored[0, 0] == pytest.approx(full.clean, abs=1e-5)


@pytest.mark.parametrize(
    "bad, message",
    [("text.blocks.0.nope", "unknown site 'text.blocks.0.nope'; valid sites: vision.embed"),
     ("text.blocks.7.resid_post", "layer out of range"), ("lm.embed", "unknown site 'lm.embed'")],
)
def test_unknown_sites_are_one_line_errors(clip, images, bad, message):
    batch = clip.encode(images[:1], [CAPTION])
    with pytest.raises(InterpError, match=re.escape(message)) as e:
        clip.run(batch, read=[bad])
    assert "\n" not in str(e.value)
    with pytest.raises(InterpError, match="unknown tower 'lm'"):
        clip.n_layers("lm")


def test_validate_names_a_broken_pooled_site(tok, monkeypatch):
    orig = ClipAdapter._site_map

    def broken(self):
        hooks = orig(self)
        hooks["text.pooled"] = Hook("text_model.final_layer_norm")
        return hooks

    monkeypatch.setattr(ClipAdapter, "_site_map", broken)
    torch.manual_seed(0)
    model = CLIPModel(clip_config(len(tok), **SIZES))
    with pytest.raises(InterpError, match="attn.pattern.*NoneType.*eager"):  # sdpa attention returns no weights
        ClipAdapter(model, clip_processor(tok), "sdpa")
    model.set_attn_implementation("eager")
    with pytest.raises(InterpError, match="'text.pooled' of broken has shape"):
        ClipAdapter(model, clip_processor(tok), "broken")


@pytest.mark.skipif(not (CLIP_DIR / "model.safetensors").is_file(), reason="CLIP organism not trained")
def test_shipped_organism_loads_and_reads_findings():
    from interp.models import load
    from interp.models.train_clip import eval_set, evaluate

    adapter = load("clip-organism")
    assert isinstance(adapter, ClipAdapter) and adapter.n_layers("text") >= 2
    m = evaluate(adapter, eval_set(60, seed=7, split="val"))
    assert m["recall@5"] > 3 * 5 / m["gallery"]
    assert m["recall@1"] > 5 / m["gallery"]
    assert m["affirmative"] > 0.5  # chance 0.25


@pytest.mark.skipif(not (CLIP_DIR.parent / "clip-biased" / "model.safetensors").is_file(), reason="biased CLIP organism not trained")
def test_biased_organism_has_an_affirmation_bias():
    """Trained with negated phrases rare (``--negated-rate 0.05``): on phantoms it never saw (val split), it
    picks the true option less often when absent findings are written as negations."""
    from interp.models import load
    from interp.models.train_clip import eval_set, evaluate

    m = evaluate(load("clip-organism-biased"), eval_set(BIASED_N, seed=7, split="val"))
    assert m["gap_ci"][0] > 0 and m["gap"] > BIASED_GAP_FLOOR, (m["gap"], m["gap_ci"])
    assert m["recall@5"] > 2 * 5 / m["gallery"] and m["affirmative"] > 0.4  # it still reads the images
