"""LlavaAdapter sites against independent references.

References, each written here without the adapter's site map:
- plain PyTorch forward (pre-)hooks on the HF modules, plus identities that tie a site to
  *other* modules (attn.out = o_proj output, pattern @ v = o_proj input, resid_post =
  resid_pre + attn.out + mlp.out, lm.embed = token embeddings with projector rows scattered in);
- TransformerLens' TransformerBridge on the same saved checkpoint;
- hand-built inputs (inputs_embeds) for edits on projector.out and lm.embed.
"""

from __future__ import annotations

from dataclasses import replace
import copy
import re
import shutil

import pytest
import torch

from interp import sites as S
from interp.errors import InterpError
from interp.models import Hook, load
from interp.models.llava import LlavaAdapter
from interp.models.organism import organism_processor
from interp.models.adapter import weight_hash

ATOL = 1e-5
PROMPTS = ["is there a pleural effusion on the left ?", "left lung", "is there a nodule on the right lung ? answer :"]
SPANS = [{"finding": (11, 27), "side": (35, 39)}, {}, {"finding": (9, 19)}]
N_VIS, N_LM, N_PATCH, GRID = 2, 4, 64, 8


# --- fixtures ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def batch(tiny_adapter, tiny_images):
    return tiny_adapter.encode(tiny_images, PROMPTS, SPANS)


@pytest.fixture(scope="module")
def ours(tiny_adapter, batch):
    """(logits, {site: value}) for every site in one run."""
    return tiny_adapter.run(batch, read=tiny_adapter.sites)


def capture(model, inputs) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Plain-hook reference: values keyed by site name (same module) or ``<site>@<module>`` (another one)."""
    got: dict[str, torch.Tensor] = {}
    handles = []

    def out(module, key, index=None):
        def f(mod, args, output):
            got[key] = (output if index is None else output[index]).detach().clone()

        handles.append(model.get_submodule(module).register_forward_hook(f))

    def inp(module, key):
        def f(mod, args, kwargs):
            got[key] = (args[0] if args else next(iter(kwargs.values()))).detach().clone()

        handles.append(model.get_submodule(module).register_forward_pre_hook(f, with_kwargs=True))

    vt = "model.vision_tower"
    out(f"{vt}.embeddings", "vision.embed")
    out(f"{vt}.pre_layrnorm", "vision.blocks.0.resid_pre@pre_layrnorm")
    for tower, root, n, o, down in (
        ("vision", f"{vt}.encoder.layers", N_VIS, "out_proj", "fc2"),
        ("lm", "model.language_model.layers", N_LM, "o_proj", "down_proj"),
    ):
        for l in range(n):
            layer, site = f"{root}.{l}", f"{tower}.blocks.{l}"
            inp(layer, f"{site}.resid_pre")
            out(f"{layer}.self_attn", f"{site}.attn.out", 0)
            out(f"{layer}.self_attn", f"{site}.attn.pattern", 1)
            out(f"{layer}.self_attn.{o}", f"{site}.attn.out@{o}")
            inp(f"{layer}.self_attn.{o}", f"{site}.attn.z@{o}")
            out(f"{layer}.self_attn.v_proj", f"{site}.attn.v@v_proj")
            out(f"{layer}.mlp", f"{site}.mlp.out")
            out(f"{layer}.mlp.{down}", f"{site}.mlp.out@{down}")
            out(layer, f"{site}.resid_post")
    inp("model.multi_modal_projector", "projector.in")
    out("model.multi_modal_projector", "projector.out")
    out("model.multi_modal_projector.linear_2", "projector.out@linear_2")
    out("model.language_model.embed_tokens", "lm.tokens@embed_tokens")
    inp("model.language_model.layers.0", "lm.embed")
    out("lm_head", "lm.logits")
    try:
        with torch.no_grad():
            logits = model(**inputs).logits
    finally:
        for h in handles:
            h.remove()
    return logits, got


@pytest.fixture(scope="module")
def ref(tiny_parts, batch):
    return capture(tiny_parts[0], batch.model_inputs())


def close(a: torch.Tensor, b: torch.Tensor, what: str, atol: float = ATOL) -> None:
    assert a.shape == b.shape, f"{what}: shape {tuple(a.shape)} != {tuple(b.shape)}"
    err = (a.detach().float() - b.detach().float()).abs().max().item()
    assert err <= atol, f"{what}: max abs diff {err:.3g} > {atol}"


def clean_logits(model, batch) -> torch.Tensor:
    with torch.no_grad():
        return model(**batch.model_inputs()).logits


# --- 1. sites vs plain hooks ---------------------------------------------------------------
def test_batch_is_right_padded_with_distinct_lengths(batch):
    lengths = batch.attention_mask.sum(1).tolist()
    assert len(set(lengths)) == 3 and max(lengths) == batch.input_ids.shape[1]
    for row, n in zip(batch.attention_mask, lengths):
        assert row[:n].all() and not row[n:].any()  # right padding
    assert not torch.equal(batch.pixel_values[0], batch.pixel_values[1])


def test_every_site_equals_a_plain_hook_on_the_same_module(tiny_adapter, ours, ref):
    logits, cache = ours
    ref_logits, got = ref
    assert set(cache) == set(tiny_adapter.sites)
    for site in tiny_adapter.sites:
        close(cache[site], got[site], site)
    close(logits, ref_logits, "logits")


def test_sites_agree_with_independent_modules(ours, ref, batch, tiny_parts):
    """Ties each site to modules the adapter's map does not name."""
    _, c = ours
    _, g = ref
    model, _ = tiny_parts
    close(c["vision.blocks.0.resid_pre"], g["vision.blocks.0.resid_pre@pre_layrnorm"], "vision resid_pre 0 = pre-LN(embed)")
    for tower, n, o, down in (("vision", N_VIS, "out_proj", "fc2"), ("lm", N_LM, "o_proj", "down_proj")):
        heads = 4
        for l in range(n):
            s = f"{tower}.blocks.{l}"
            close(c[f"{s}.attn.out"], g[f"{s}.attn.out@{o}"], f"{s}.attn.out = {o} output")
            close(c[f"{s}.mlp.out"], g[f"{s}.mlp.out@{down}"], f"{s}.mlp.out = {down} output")
            close(c[f"{s}.resid_post"], c[f"{s}.resid_pre"] + c[f"{s}.attn.out"] + c[f"{s}.mlp.out"], f"{s} residual sum")
            if l:
                close(c[f"{s}.resid_pre"], c[f"{tower}.blocks.{l - 1}.resid_post"], f"{s}.resid_pre = previous resid_post", 0)
            # the pattern is the one attention used: pattern @ v is o_proj's input
            p, v = c[f"{s}.attn.pattern"], g[f"{s}.attn.v@v_proj"]
            b, t, d = v.shape
            z = (p @ v.view(b, t, heads, d // heads).transpose(1, 2)).transpose(1, 2).reshape(b, t, d)
            close(z, g[f"{s}.attn.z@{o}"], f"{s}.attn.pattern @ v = {o} input")
            close(p.sum(-1), torch.ones_like(p.sum(-1)), f"{s}.attn.pattern rows sum to 1")
            if tower == "lm":  # causal, and right pads never attended to
                assert (p.triu(1) == 0).all(), f"{s}.attn.pattern not causal"
                for i in range(b):
                    real = batch.attention_mask[i].bool()
                    assert (p[i][:, real][:, :, ~real] == 0).all(), f"{s}: row {i} attends to pads"
    # projector reads the last vision block without CLS; lm.embed = tokens with projector rows scattered in
    close(g["projector.in"], c[f"vision.blocks.{N_VIS - 1}.resid_post"][:, 1:], "projector input = last vision resid_post[1:]")
    close(c["projector.out"], g["projector.out@linear_2"], "projector.out = linear_2 output")
    with torch.no_grad():
        emb = model.model.language_model.embed_tokens(batch.input_ids)
    is_img = batch.input_ids == model.config.image_token_id
    emb[is_img] = c["projector.out"].reshape(-1, c["projector.out"].shape[-1])
    close(c["lm.embed"], emb, "lm.embed = token embeddings + projector rows at <image> positions")
    close(c["lm.blocks.0.resid_pre"], c["lm.embed"], "lm.embed = lm.blocks.0.resid_pre", 0)
    with torch.no_grad():
        lg = model.lm_head(model.model.language_model.norm(c[f"lm.blocks.{N_LM - 1}.resid_post"]))
    close(c["lm.logits"], lg, "lm.logits = lm_head(norm(last resid_post))")


def test_right_padding_does_not_leak(tiny_adapter, tiny_images, ours, batch):
    """Each row alone (no padding) gives the batched values at its real positions."""
    logits, cache = ours
    for i in (0, 1):
        n = int(batch.attention_mask[i].sum())
        alone = tiny_adapter.encode([tiny_images[i]], [PROMPTS[i]])
        assert alone.input_ids.shape[1] == n
        lg, c = tiny_adapter.run(alone, read=["lm.blocks.2.resid_post"])
        close(lg[0], logits[i, :n], f"row {i} logits")
        close(c["lm.blocks.2.resid_post"][0], cache["lm.blocks.2.resid_post"][i, :n], f"row {i} resid")


# --- 2. TransformerLens --------------------------------------------------------------------
# Hook-name map found by printing bridge.run_with_cache(...)'s cache keys (TL 3.9):
TL_MAP = {
    "vision.embed": "vision_encoder.hook_vision_embed",
    **{f"vision.blocks.{l}.resid_pre": f"vision_encoder.encoder_layers.{l}.hook_in" for l in range(N_VIS)},
    **{f"vision.blocks.{l}.resid_post": f"vision_encoder.encoder_layers.{l}.hook_out" for l in range(N_VIS)},
    "projector.out": "vision_projector.hook_out",
    "lm.embed": "blocks.0.hook_resid_pre",
    **{
        f"lm.blocks.{l}.{ours}": f"blocks.{l}.{tl}"
        for l in range(N_LM)
        for ours, tl in (
            ("resid_pre", "hook_resid_pre"),
            ("attn.pattern", "attn.hook_pattern"),
            ("attn.out", "hook_attn_out"),
            ("mlp.out", "hook_mlp_out"),
            ("resid_post", "hook_resid_post"),
        )
    },
    "lm.logits": "hook_unembed",
}


@pytest.fixture(scope="module")
def bridge(tiny_model_dir):
    try:
        from transformer_lens.model_bridge import TransformerBridge
        from transformer_lens.model_bridge.generalized_components.normalization import NormalizationBridge
    except ImportError as e:
        pytest.skip(f"TransformerLens bridge not importable: {e}")
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # CLIP layer hook aliases that TL does not resolve
        try:
            br = TransformerBridge.boot_transformers(str(tiny_model_dir), device="cpu")
        except Exception as e:  # noqa: BLE001
            pytest.skip(f"TransformerBridge cannot boot the tiny LLaVA: {type(e).__name__}: {e}")
    # TL 3.9 recomputes the CLIP pre-LayerNorm from scratch with the *LM's* eps (1e-6, not the
    # LayerNorm's 1e-5): ~8e-4 off at vision resid_pre. Its documented native path runs HF's own
    # norm when hooks only observe, which leaves TL's hook placement as the thing compared.
    for mod in br.modules():
        if isinstance(mod, NormalizationBridge):
            mod.use_native_layernorm_autograd = True
    return br


def test_sites_match_transformerlens(bridge, ours, batch):
    logits, cache = ours
    with torch.no_grad():
        tl_logits, tl = bridge.run_with_cache(batch.input_ids, pixel_values=batch.pixel_values, attention_mask=batch.attention_mask)
    missing = [h for h in TL_MAP.values() if h not in tl]
    assert not missing, f"TL hooks not found: {missing}; have e.g. {list(tl.keys())[:20]}"
    for site, hook in TL_MAP.items():
        close(cache[site], tl[hook], f"{site} vs TL {hook}")
    close(logits, tl_logits, "logits vs TL")


def test_patching_matches_transformerlens(bridge, tiny_adapter, batch):
    pos = 66

    def zero(x, hook=None):
        x = x.clone()
        x[:, pos] = 0
        return x

    ours, _ = tiny_adapter.run(batch, edit={"lm.blocks.1.resid_post": zero})
    with torch.no_grad():
        theirs = bridge.run_with_hooks(
            batch.input_ids, pixel_values=batch.pixel_values, attention_mask=batch.attention_mask,
            fwd_hooks=[("blocks.1.hook_resid_post", zero)],
        )
    close(ours, theirs, "patched logits vs TL run_with_hooks")


# --- 3. edits, skip, inputs_embeds ----------------------------------------------------------
def test_edit_is_causal_and_equals_a_plain_hook(tiny_adapter, tiny_parts, batch, ours):
    model, _ = tiny_parts
    clean = ours[0]
    pos = 66  # a text position inside every row

    def zero(x):
        x = x.clone()
        x[:, pos] = 0
        return x

    edited, c = tiny_adapter.run(batch, read=["lm.blocks.1.resid_post"], edit={"lm.blocks.1.resid_post": zero})
    assert (c["lm.blocks.1.resid_post"][:, pos] == 0).all()  # reads see the edited value
    close(edited[:, :pos], clean[:, :pos], "logits before the edited position", 1e-6)
    for i, n in enumerate(batch.attention_mask.sum(1).tolist()):
        diff = (edited[i, pos:n] - clean[i, pos:n]).abs().amax(-1)
        assert (diff > 1e-4).all(), f"row {i}: some position >= {pos} unchanged by the edit: {diff}"
    h = model.model.language_model.layers[1].register_forward_hook(lambda m, a, o: zero(o))
    try:
        ref = clean_logits(model, batch)
    finally:
        h.remove()
    close(edited, ref, "edit vs plain forward hook")


def test_in_place_and_tuple_element_edits_equal_plain_hooks(tiny_adapter, tiny_parts, batch):
    model, _ = tiny_parts
    # in place on a module output
    lg, _ = tiny_adapter.run(batch, edit={"lm.blocks.2.mlp.out": lambda x: x.mul_(3.0)})
    h = model.model.language_model.layers[2].mlp.register_forward_hook(lambda m, a, o: o * 3.0)
    try:
        ref = clean_logits(model, batch)
    finally:
        h.remove()
    close(lg, ref, "in-place mlp.out edit")
    # attn.out is element 0 of self_attn's tuple output
    lg, _ = tiny_adapter.run(batch, edit={"vision.blocks.1.attn.out": lambda x: -x})
    h = model.model.vision_tower.encoder.layers[1].self_attn.out_proj.register_forward_hook(lambda m, a, o: -o)
    try:
        ref = clean_logits(model, batch)
    finally:
        h.remove()
    close(lg, ref, "attn.out edit")
    # an input site (vision resid_pre)
    lg, _ = tiny_adapter.run(batch, edit={"vision.blocks.1.resid_pre": lambda x: x + 0.5})
    h = model.model.vision_tower.encoder.layers[1].register_forward_pre_hook(lambda m, a: (a[0] + 0.5, *a[1:]))
    try:
        ref = clean_logits(model, batch)
    finally:
        h.remove()
    close(lg, ref, "resid_pre (input) edit")


def test_attn_pattern_edits_are_refused(tiny_adapter, batch):
    # HF returns the weights after using them: an edit would silently change nothing
    with pytest.raises(InterpError, match=re.escape("'lm.blocks.1.attn.pattern'")):
        tiny_adapter.run(batch, edit={"lm.blocks.1.attn.pattern": torch.zeros_like})


def test_projector_and_embed_edits_equal_feeding_modified_embeddings(tiny_adapter, tiny_parts, batch, ours):
    model, _ = tiny_parts
    _, c = ours
    mod = lambda x: 2.0 * x + 0.1  # noqa: E731
    lg, _ = tiny_adapter.run(batch, edit={"projector.out": mod})
    with torch.no_grad():
        emb = model.model.language_model.embed_tokens(batch.input_ids)
        is_img = batch.input_ids == model.config.image_token_id
        emb[is_img] = mod(c["projector.out"]).reshape(-1, emb.shape[-1])
        ref = model(inputs_embeds=emb, attention_mask=batch.attention_mask).logits
    close(lg, ref, "projector.out edit vs modified image features")
    lg2, _ = tiny_adapter.run(batch, edit={"lm.embed": lambda x: x.mul_(0.5)})
    with torch.no_grad():
        ref2 = model(inputs_embeds=c["lm.embed"] * 0.5, attention_mask=batch.attention_mask).logits
    close(lg2, ref2, "lm.embed edit vs modified inputs_embeds")


def test_skip_with_clean_outputs_is_identical_and_really_skips(tiny_adapter, tiny_parts, batch, ours):
    model, _ = tiny_parts
    clean, c = ours
    names = ["vision.blocks.0.resid_post", *[f"lm.blocks.{l}.resid_post" for l in range(3)]]
    calls = []
    layers = [model.model.vision_tower.encoder.layers[0], *model.model.language_model.layers[:3]]
    hs = [m.self_attn.register_forward_pre_hook(lambda m, a, i=i: calls.append(i)) for i, m in enumerate(layers)]
    try:
        lg, _ = tiny_adapter.run(batch, skip={n: c[n] for n in names})
    finally:
        for h in hs:
            h.remove()
    assert calls == [], f"skipped blocks ran: {calls}"
    close(lg, clean, "skip with clean outputs", 0)
    # a different value: equals a plain hook replacing that block's output
    value = c["lm.blocks.1.resid_post"] * 0.7
    lg, _ = tiny_adapter.run(batch, skip={"lm.blocks.1.resid_post": value})
    h = model.model.language_model.layers[1].register_forward_hook(lambda m, a, o: value)
    try:
        ref = clean_logits(model, batch)
    finally:
        h.remove()
    close(lg, ref, "skip with another value vs plain hook")
    assert (lg - clean).abs().max() > 1e-3
    with pytest.raises(InterpError, match="lm.blocks.1.mlp.out"):
        tiny_adapter.run(batch, skip={"lm.blocks.1.mlp.out": value})


def test_inputs_embeds_batch_reproduces_logits(tiny_adapter, batch, ours):
    clean, c = ours
    emb_batch = replace(batch, inputs_embeds=c["lm.embed"])
    lg, c2 = tiny_adapter.run(emb_batch, read=["lm.blocks.3.resid_post"])
    close(lg, clean, "logits from inputs_embeds")
    close(c2["lm.blocks.3.resid_post"], c["lm.blocks.3.resid_post"], "resid from inputs_embeds")
    assert emb_batch.take([2, 0]).inputs_embeds.shape[0] == 2
    with pytest.raises(InterpError, match="inputs_embeds"):
        tiny_adapter.run(emb_batch, read=["projector.out"])


# --- 4. grammar, errors, load, positions ----------------------------------------------------
@pytest.mark.parametrize("bad", ["lm.blocks.0.bogus", "vision.pooled", "text.blocks.0.resid_post", "lm.blocks.x.resid_post"])
def test_unknown_site_is_one_line_naming_it_and_listing_valid(tiny_adapter, batch, bad):
    for call in (
        lambda: tiny_adapter.run(batch, read=[bad]),
        lambda: tiny_adapter.run(batch, edit={bad: lambda x: x}),
        lambda: tiny_adapter.expand_sites(bad),
        lambda: tiny_adapter.site_shape(bad, 10),
    ):
        with pytest.raises(InterpError) as e:
            call()
        msg = str(e.value)
        assert "\n" not in msg and f"unknown site {bad!r}" in msg
        assert "valid sites:" in msg and "lm.blocks.{0..3}.resid_post" in msg and "vision.blocks.{0..1}.attn.out" in msg
        assert "projector.out" in msg and "lm.logits" in msg


@pytest.mark.parametrize("bad, top", [("lm.blocks.4.resid_post", 3), ("vision.blocks.2.mlp.out", 1), ("lm.blocks.17.attn.out", 3)])
def test_layer_out_of_range(tiny_adapter, batch, bad, top):
    with pytest.raises(InterpError, match=re.escape(f"layer out of range in site {bad!r}") + f".*0..{top}$"):
        tiny_adapter.run(batch, read=[bad])


@pytest.mark.parametrize("bad", ["lm", "resid_post", ".out", "lm."])
def test_malformed_names(tiny_adapter, batch, bad):
    with pytest.raises(InterpError, match=re.escape(repr(bad))):
        tiny_adapter.run(batch, read=[bad])
    with pytest.raises(InterpError, match="malformed site name " + re.escape(repr(bad))):
        S.parse(bad)


def test_globs_expand_in_execution_order(tiny_adapter, tiny_parts, batch):
    a = tiny_adapter
    assert a.expand_sites("lm.blocks.*.resid_post") == [f"lm.blocks.{l}.resid_post" for l in range(N_LM)]
    assert a.expand_sites(["lm.logits", "vision.blocks.?.attn.out", "projector.out"]) == [
        "vision.blocks.0.attn.out", "vision.blocks.1.attn.out", "projector.out", "lm.logits"]
    assert a.expand_sites("lm.logits, vision.embed") == ["vision.embed", "lm.logits"]
    assert a.expand_sites("*") == a.sites
    # a.sites is the real execution order: each site's hook fires no earlier than the previous one's
    model, _ = tiny_parts
    events: list[tuple[str, str]] = []
    hs = []
    for mod in dict.fromkeys(h.module for h in a.hooks.values()):
        m = model.get_submodule(mod)
        hs.append(m.register_forward_pre_hook(lambda m, x, mod=mod: events.append((mod, "input"))))
        hs.append(m.register_forward_hook(lambda m, x, y, mod=mod: events.append((mod, "output"))))
    try:
        clean_logits(model, batch)
    finally:
        for h in hs:
            h.remove()
    when = [events.index((a.hooks[s].module, a.hooks[s].io)) for s in a.sites]
    assert when == sorted(when), [s for s, w, nxt in zip(a.sites, when, when[1:]) if nxt < w]
    # reads given in reverse order still run (the adapter orders them)
    _, c = a.run(batch, read=list(reversed(a.expand_sites("*.resid_post"))))
    assert set(c) == set(a.expand_sites("*.resid_post"))


def test_site_shapes(tiny_adapter, ours, batch):
    _, c = ours
    for site in tiny_adapter.sites:
        assert tuple(c[site].shape) == (len(batch), *tiny_adapter.site_shape(site, batch.input_ids.shape[1])), site


def test_load_missing_weights(tiny_model_dir, tmp_path):
    empty = tmp_path / "no_weights"
    shutil.copytree(tiny_model_dir, empty, ignore=shutil.ignore_patterns("*.safetensors"))
    with pytest.raises(InterpError, match=r"^missing weights: .*no_weights"):
        load(empty)


def test_load_reproduces_in_memory_model(tiny_model_dir, tiny_adapter, tiny_parts, tiny_images, ours, batch):
    loaded = load(tiny_model_dir)
    assert loaded.weight_hash == tiny_adapter.weight_hash
    b2 = loaded.encode(tiny_images, PROMPTS, SPANS)
    assert torch.equal(b2.input_ids, batch.input_ids) and torch.equal(b2.pixel_values, batch.pixel_values)
    assert [p.spans for p in b2.positions] == [p.spans for p in batch.positions]
    lg, _ = loaded.run(b2)
    assert torch.equal(lg, ours[0])
    other = copy.deepcopy(tiny_parts[0])
    with torch.no_grad():
        other.lm_head.weight[0, 0] += 1e-3
    assert weight_hash(other) != tiny_adapter.weight_hash


def test_image_positions_carry_row_col(tiny_adapter, batch):
    img_id = tiny_adapter.config.image_token_id
    for p, ids in zip(batch.positions, batch.input_ids):
        assert p.kinds[0] == "special" and p.tokens[0] == "<bos>"
        assert p.spans["image"] == list(range(1, 1 + N_PATCH))
        for i in range(N_PATCH):
            assert p.kinds[1 + i] == "image" and ids[1 + i] == img_id and p.tokens[1 + i] == "<image>"
            assert (p.rows[1 + i], p.cols[1 + i]) == divmod(i, GRID)
    vp = tiny_adapter.vision_positions()[0]
    assert vp.kinds[0] == "special" and (vp.rows[1 + 13], vp.cols[1 + 13]) == divmod(13, GRID)


def test_row_col_match_what_the_model_sees(tiny_adapter, tiny_images):
    """Pixels of patch (r, c) reach vision.embed only at the vision position typed (r, c), and that
    position of the last vision block reaches projector.out / lm.embed only at the LM position typed (r, c)."""
    r, col, ps = 2, 5, 8
    img = tiny_images[0].copy()
    img[r * ps:(r + 1) * ps, col * ps:(col + 1) * ps] += 0.3
    b = tiny_adapter.encode([tiny_images[0], img], PROMPTS[:1] * 2)
    vp, p = tiny_adapter.vision_positions()[0], b.positions[0]
    vis_pos = [i for i in range(len(vp.kinds)) if (vp.rows[i], vp.cols[i]) == (r, col)]
    lm_pos = [i for i in range(len(p.kinds)) if p.kinds[i] == "image" and (p.rows[i], p.cols[i]) == (r, col)]

    def changed(x, y):
        return ((x - y).abs().amax(-1) > 1e-6).nonzero().flatten().tolist()

    _, c = tiny_adapter.run(b, read=["vision.embed"])
    assert changed(c["vision.embed"][0], c["vision.embed"][1]) == vis_pos

    def bump(x):
        x = x.clone()
        x[1, vis_pos] += 1.0
        return x

    _, c = tiny_adapter.run(b.take([0, 0]), read=["projector.out", "lm.embed"], edit={f"vision.blocks.{N_VIS - 1}.resid_post": bump})
    assert changed(c["projector.out"][0], c["projector.out"][1]) == [vis_pos[0] - 1]  # CLS dropped
    assert changed(c["lm.embed"][0], c["lm.embed"][1]) == lm_pos


def test_named_spans_and_pads(tiny_adapter, batch):
    p0, p1, p2 = batch.positions
    assert [p0.tokens[i] for i in p0.span("finding")] == ["pleural", "effusion"]
    assert [p0.tokens[i] for i in p0.span("side")] == ["left"]
    assert [p2.tokens[i] for i in p2.span("finding")] == ["a", "nodule", "on"]  # (9, 19) ends inside "on"
    with pytest.raises(InterpError, match="'finding'"):
        p1.span("finding")
    width = batch.input_ids.shape[1]
    for p, ids, mask, prompt in zip(batch.positions, batch.input_ids, batch.attention_mask, PROMPTS):
        n = 1 + N_PATCH + len(prompt.split())
        assert len(p.kinds) == len(p.tokens) == len(p.rows) == width and int(mask.sum()) == n
        assert p.tokens[1 + N_PATCH:n] == prompt.split() and set(p.kinds[1 + N_PATCH:n]) == {"text"}
        assert set(p.kinds[n:]) <= {"pad"} and set(p.tokens[n:]) <= {"<pad>"} and (ids[n:] == tiny_adapter.tokenizer.pad_token_id).all()
        assert set(p.rows[n:]) <= {-1} and not mask[n:].any()
    assert batch.answer_index.tolist() == [int(m.sum()) - 1 for m in batch.attention_mask]


# --- 5. load-time validation --------------------------------------------------------------
def broken(monkeypatch, tiny_parts, change):
    orig = LlavaAdapter._site_map

    def site_map(self):
        hooks = orig(self)
        change(hooks)
        return hooks

    monkeypatch.setattr(LlavaAdapter, "_site_map", site_map)

    return LlavaAdapter(tiny_parts[0], organism_processor(tiny_parts[1]), "broken")


@pytest.mark.parametrize(
    "site, hook, message",
    [
        ("lm.blocks.2.resid_pre", Hook("model.language_model.layers.1", "input"), "not block 1's resid_post"),
        ("lm.blocks.1.mlp.out", Hook("model.language_model.layers.1.mlp.gate_proj"), "has shape"),
        ("lm.blocks.0.attn.pattern", Hook("model.language_model.layers.0.self_attn", "output", 0), "has shape"),
    ],
)
def test_validate_names_the_broken_site(monkeypatch, tiny_parts, site, hook, message):
    with pytest.raises(InterpError, match=re.escape(repr(site)) + ".*" + re.escape(message)):
        broken(monkeypatch, tiny_parts, lambda h: h.__setitem__(site, hook))


def test_validate_reports_a_map_that_cannot_run(monkeypatch, tiny_parts):
    with pytest.raises(InterpError, match="site map of broken does not run"):
        broken(monkeypatch, tiny_parts, lambda h: h.__setitem__("lm.blocks.1.mlp.out", Hook("model.language_model.layers.1.mlp.nope")))
