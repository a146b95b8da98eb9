"""NAST: negation tracing (CTE vs an independent hand loop), alphas (both rules), scaled LoRA gradients,
training, one config for every entry point, the study's statistics, and one CLIP evaluation path.

Runs against a random-init tiny ``CLIPModel`` (seeded) behind ``interp.models.clip.ClipAdapter``; the
evaluation-path test uses the shipped biased CLIP organism.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from interp.errors import InterpError
from interp.models.clip import CLIP_DIR, ClipAdapter, clip_processor, clip_tokenizer
from interp.nast import cte as C
from interp.nast.lora import apply_scaled_lora

WORDS = ["there", "is", "a", "no", "not", "the", "pleural", "effusion", "nodule", "pneumothorax", "cardiomegaly", "consolidation", "on", "left", "right", ".", "lungs", "are", "clear", "large", "small", "in", "upper", "lower", "middle", "zone", "heart", "size", "normal", "costophrenic", "angles", "sharp", "fully", "expanded", "well", "aerated", "lung", "fields", "of", "nodules"]


def tiny_clip(seed: int = 0, layers: int = 3):
    from transformers import CLIPConfig, CLIPModel

    from interp.models.tokenizer import word_tokenizer

    tok = word_tokenizer(WORDS)
    cfg = CLIPConfig(
        text_config=dict(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                         num_attention_heads=4, max_position_embeddings=64, bos_token_id=2, eos_token_id=3, pad_token_id=0),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                           image_size=32, patch_size=8, num_channels=1),
        projection_dim=16,
    )
    torch.manual_seed(seed)
    model = CLIPModel(cfg).eval()
    model.set_attn_implementation("eager")
    with torch.no_grad():  # a sharper logit scale than the init's, as after training
        model.logit_scale.fill_(np.log(30.0))
    return model, tok


@pytest.fixture(scope="module")
def clip_adapter():
    """ClipAdapter over the tiny CLIP, in float64: CTE divides by a small margin."""
    model, _ = tiny_clip()
    adapter = ClipAdapter(model, clip_processor(clip_tokenizer(WORDS), 32), model_id="tiny-clip")
    adapter.model.double()  # after its float32 load check; in place, so the hooks stay
    return adapter


def _image(seed):
    return np.random.default_rng(seed).random((32, 32), dtype=np.float32)


def _pair(positive="there is a pleural effusion .", negated="there is no pleural effusion .", seed=0):
    f = "pleural effusion" if "pleural" in positive else positive.split()[1]
    return C.NegationPair(_image(seed), positive, negated, {"finding": (positive.index(f), positive.index(f) + len(f))},
                          {"finding": (negated.index(f), negated.index(f) + len(f))}, True, f"p{seed}")


def hand_cte(model, tok, pair, pixels):
    """Independent loop: for each hidden state l (0 = embeddings) and position p, one forward of
    the positive text with a plain forward hook writing the negated text's state at (l, p)."""
    def ids(text):
        return torch.tensor([[tok.bos_token_id, *tok(text, add_special_tokens=False)["input_ids"], tok.eos_token_id]])

    px = pixels([pair.image])
    ip, ineg = ids(pair.positive), ids(pair.negated)
    mods = [model.text_model.embeddings, *model.text_model.encoder.layers]
    states = {}
    hs = [m.register_forward_hook(lambda m, i, o, k=k: states.__setitem__(k, o.clone())) for k, m in enumerate(mods)]
    with torch.no_grad():
        neg_logit = model(input_ids=ineg, pixel_values=px).logits_per_image[0, 0].double()
    for h in hs:
        h.remove()
    with torch.no_grad():
        pos_logit = model(input_ids=ip, pixel_values=px).logits_per_image[0, 0].double()
    s = pos_logit - neg_logit
    out = np.zeros((len(mods), ip.shape[1]))
    for l, m in enumerate(mods):
        for p in range(ip.shape[1]):
            def patch(mod, i, o, p=p, l=l):
                o = o.clone()
                o[0, p] = states[l][0, p]
                return o
            h = m.register_forward_hook(patch)
            with torch.no_grad():
                z = model(input_ids=ip, pixel_values=px).logits_per_image[0, 0].double()
            h.remove()
            out[l, p] = float((z - neg_logit) / s)
    return out


def test_roles_of_phantom_texts(clip_adapter):
    b, pr, nr = C._encode_pair(clip_adapter, _pair())
    assert nr == ["SOT", "there", "is/are", "negator", "subject_first", "subject_rest", ".", "EOT"]
    assert C.role_map(pr, nr)["negator"] == ([3], [3])
    # unaligned: roles map in order, negator has no counterpart
    b, pr, nr = C._encode_pair(clip_adapter, _pair("the nodule is large .", "the nodule is not large ."))
    m = C.role_map(pr, nr)
    assert "negator" not in m and m["."] == ([5], [6]) and m["subject_first"] == ([2], [2])
    with pytest.raises(InterpError, match="no negation cue"):
        C.role_map(pr, pr)


def test_cte_matches_hand_loop(clip_adapter):
    pair = _pair()
    got, margin = C.trace_pair(clip_adapter, pair)
    want = hand_cte(clip_adapter.model, clip_adapter.tokenizer, pair, clip_adapter.pixels)
    # aligned phantom pair: one position per role, in order
    for k, role in enumerate(["SOT", "there", "is/are", "negator", "subject_first", "subject_rest", ".", "EOT"]):
        np.testing.assert_allclose(got[:, C.ROLES.index(role)], want[:, k], atol=1e-5, rtol=0)
    assert np.allclose(got[:, :3], 1.0)  # causal mask: positions before the negator carry nothing
    assert abs(got[0, C.ROLES.index("negator")]) < 1e-6 and abs(got[-1, C.ROLES.index("EOT")]) < 1e-6


def test_negation_trace_result_ci_and_unaligned(clip_adapter):
    pairs = [_pair(seed=s) for s in range(3)] + [_pair("the nodule is large .", "the nodule is not large .", seed=9)]
    res = C.negation_trace(clip_adapter, pairs)
    assert res.values.shape == (4, 4, len(C.ROLES))
    assert np.isnan(res.values[3, :, C.ROLES.index("negator")]).all()
    lo, hi = res.ci(n_boot=200)
    m = res.mean()
    ok = np.isfinite(m)
    assert (lo[ok] <= m[ok] + 1e-12).all() and (m[ok] <= hi[ok] + 1e-12).all()
    noise = C.negation_trace(clip_adapter, pairs[:2], mode="noise", copies=3)
    assert np.isnan(noise.values[:, 0]).all() and np.isfinite(noise.values[:, 1:, C.ROLES.index("EOT")]).all()


def test_alphas_minmax_exact_and_length():
    np.testing.assert_array_equal(C.minmax([2.0, 4.0, 3.0, 6.0]), [0.0, 0.5, 0.25, 1.0])
    # profile index 0 = embeddings, dropped; blocks normalised among themselves
    np.testing.assert_array_equal(C.alphas_from_profile([9.0, 1.0, 3.0, 2.0], 3), [0.0, 1.0, 0.5])
    np.testing.assert_array_equal(C.minmax([1.0, 1.0]), [1.0, 1.0])
    with pytest.raises(InterpError, match="length 2, but the text encoder has 3 layers"):
        C.check_alphas([0.1, 0.2], 3)
    assert C.spearman([1, 2, 3], [10, 20, 30]) == pytest.approx(1.0)
    assert C.spearman([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)


def _grads(model, tok, alphas, beta):
    m = __import__("copy").deepcopy(model)
    lora = apply_scaled_lora(m, alphas, beta, rank=2, seed=0)
    with torch.no_grad():  # non-zero B so that A receives gradients too
        for ps in lora.params.values():
            for n, p in ps:
                if "lora_B" in n:
                    p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(len(n))) * 0.1)
    ids = torch.tensor([[2, *tok("there is no pleural effusion .", add_special_tokens=False)["input_ids"], 3]] * 2)
    px = torch.randn(2, 1, 32, 32, generator=torch.Generator().manual_seed(1))
    out = m(input_ids=ids, pixel_values=px)
    out.logits_per_image.sum().backward()
    return lora, {n: p.grad.clone() for ps in lora.params.values() for n, p in ps}


def test_lora_gradients_scaled_by_alpha_beta(clip_adapter):
    model, tok = clip_adapter.model, clip_adapter.tokenizer
    alphas, beta = np.array([0.25, 1.0, 0.5]), 2.0
    _, base = _grads(model, tok, None, beta)
    lora, scaled = _grads(model, tok, alphas, beta)
    assert set(base) == set(scaled) and len(base) == 3 * 6 * 2
    for name, g in scaled.items():
        _, l = __import__("interp.nast.lora", fromlist=["layer_of"]).layer_of(name)
        assert g.abs().sum() > 0
        torch.testing.assert_close(g, base[name] * alphas[l] ** beta, rtol=1e-5, atol=1e-7)
    with pytest.raises(InterpError, match="alphas have length 2"):
        apply_scaled_lora(__import__("copy").deepcopy(model), [0.5, 1.0], 1.0)


def test_tiny_training_deterministic(clip_adapter):
    from interp.nast.train import NastConfig, train_run

    cfg = NastConfig(method="nast", beta=1.0, steps=3, batch_size=4, n_train=8, n_eval=8, rank=2, seed=3)
    a = train_run(clip_adapter, cfg, alphas=np.array([0.2, 1.0, 0.0]), evaluate_after=False)
    b = train_run(clip_adapter, cfg, alphas=np.array([0.2, 1.0, 0.0]), evaluate_after=False)
    assert a.losses == b.losses and np.array_equal(a.delta_norms, b.delta_norms)
    assert a.delta_norms[2] == 0.0 and a.delta_norms[1] > 0  # alpha 0: that block never moves


def test_trace_store_roundtrip(clip_adapter, tmp_path):
    """trace_seeds -> write_trace -> open_store gives back every number of the run; alphas load from it."""
    from interp.store import open_store

    results, pooled, stab, alphas = C.trace_seeds(clip_adapter, [0, 1], 2, limit=2, min_margin=0.0)
    url = C.write_trace(str(tmp_path / "cte.zarr"), clip_adapter, results, pooled, stab, alphas)
    tree = open_store(url)
    nast = tree["nast"]
    assert tree["sample"].values.tolist() == pooled.ids and nast["seed"].values.tolist() == [0, 0, 1, 1]
    assert tree["prompt"].values.tolist() == [p.negated for p in pooled.pairs]
    assert tree.attrs["dataset"]["ref"] == "phantom-claims" and tree.attrs["dataset"]["seeds"] == [0, 1]
    assert nast["role"].values.tolist() == list(C.ROLES) and nast["layer"].values.tolist() == [0, 1, 2, 3]
    np.testing.assert_array_equal(nast["cte"], pooled.values)
    np.testing.assert_array_equal(nast["margin"], pooled.margin)
    np.testing.assert_allclose(nast["cte"].sel(layer=0, role="negator"), 0.0, atol=1e-9)
    np.testing.assert_allclose(nast["cte"].sel(layer=0, role="SOT"), 1.0, atol=1e-9)
    lo, hi = pooled.ci()
    for name, want in [("cte_mean", pooled.mean()), ("cte_ci_low", lo), ("cte_ci_high", hi), ("profile", pooled.profile())]:
        np.testing.assert_array_equal(nast[name], want)
    np.testing.assert_array_equal(nast["alpha"], [np.nan, *alphas])
    for seed, r in zip(nast.attrs["per_seed"], results):
        np.testing.assert_array_equal(np.array(seed["cte_mean"], float), r.mean())
        np.testing.assert_array_equal(np.array(seed["profile"], float), r.profile())
    np.testing.assert_allclose(np.array(nast.attrs["stability"]["mean"], float), stab["mean"], equal_nan=True)
    np.testing.assert_array_equal(C.load_alphas(url, 3), alphas)


def test_load_alphas_json(tmp_path):
    path = tmp_path / "alphas.json"
    path.write_text("[0.5, 1, 0]")
    np.testing.assert_array_equal(C.load_alphas(str(path), 3), [0.5, 1.0, 0.0])
    for text, match in [('["0.5", "1", "0"]', "must hold a JSON list of numbers"),
                        ('{"alphas": [0.5, 1, 0]}', "must hold a JSON list of numbers"),
                        ("[0.5, 1]", "length 2, but the text encoder has 3 layers"), ("[0.5, 1", "cannot read alphas")]:
        path.write_text(text)
        with pytest.raises(InterpError, match=match):
            C.load_alphas(str(path), 3)
    with pytest.raises(InterpError, match="no store"):
        C.load_alphas(str(tmp_path / "missing.zarr"), 3)


def test_cli_train_rejects_bad_alphas(tmp_path, capsys):
    from interp.nast.__main__ import main

    path = tmp_path / "alphas.json"
    path.write_text('["a", "b"]')
    assert main(["train", "--method", "nast", "--alphas", str(path)]) == 2
    last = capsys.readouterr().err.splitlines()[-1]  # after the weights' progress bar
    assert last.startswith("error: ") and "must hold a JSON list of numbers" in last


def test_alpha_rules_state_and_block():
    """state: min-max of the max-over-roles effect at each block's output; block: of the EOT effect each block adds."""
    eot = np.array([1.0, 0.46, 0.25, 0.07, 0.0])  # CTE at EOT per hidden state (the README's organism)
    values = np.full((2, 5, len(C.ROLES)), np.nan)
    values[:, :, C.ROLES.index("EOT")] = eot
    values[:, :, C.ROLES.index("negator")] = [0.0, 0.1, 0.2, 0.2, 0.3]
    r = C.CTEResult(values, np.ones(2), "nast")
    np.testing.assert_allclose(C.alphas_from_cte(r, "max", "state"), C.minmax([0.9, 0.8, 0.93, 1.0]))
    np.testing.assert_allclose(C.alphas_from_cte(r, rule="block"), C.minmax([0.54, 0.21, 0.18, 0.07]))
    with pytest.raises(InterpError, match="unknown alpha rule 'x': choose state, block"):
        C.alphas_from_cte(r, rule="x")


def test_every_entry_point_reads_one_config():
    """trace, train and study parse to the config dataclasses' defaults; experiments/nast_clip.py is the study."""
    from interp.nast.__main__ import parser
    from interp.nast.config import NastConfig, StudyConfig, TraceConfig, settings

    p = parser()
    assert settings(TraceConfig, p.parse_args(["trace"])) == TraceConfig()
    assert settings(NastConfig, p.parse_args(["train"])) == NastConfig()
    s = p.parse_args(["study", "--betas", "1,2", "--seeds", "4,5", "--steps", "7", "--limit", "3"])
    assert settings(StudyConfig, s) == StudyConfig(seeds=[4, 5], betas=[1.0, 2.0])
    assert settings(NastConfig, s) == NastConfig(steps=7)
    assert settings(TraceConfig, s) == TraceConfig(seeds=[4, 5], limit=3)
    with pytest.raises(InterpError, match="--betas: must be comma-separated numbers >= 0"):
        p.parse_args(["study", "--betas", "1,-2"])


def test_study_tables_and_paired_comparison():
    from interp.nast.study import conclude, paired, table

    def runs(gaps, r1):
        return [dict.fromkeys(("negated", "affirmative", "claims", "recall@5"), 0.5) | {"gap": g, "recall@1": r}
                for g, r in zip(gaps, r1)]

    data = {"uniform": runs([0.10, 0.12, 0.08], [0.2, 0.2, 0.2]), "nast b=1": runs([0.02, 0.03, -0.01], [0.2, 0.21, 0.19])}
    t = table(data)
    assert t["uniform"]["gap"]["mean"] == pytest.approx(0.1) and t["uniform"]["gap"]["sd"] == pytest.approx(0.02)
    c = paired(data, "nast b=1")
    assert c["abs_gap"]["mean"] == pytest.approx(-8.0) and c["abs_gap"]["ci"][1] < 0 and c["recall@1"]["mean"] == pytest.approx(0)
    assert "NAST beats uniform LoRA" in conclude({"nast b=1": c})
    worse = paired({"uniform": data["nast b=1"], "nast b=1": data["uniform"]}, "nast b=1")
    assert "does not beat" in conclude({"nast b=1": worse})


@pytest.mark.skipif(not (CLIP_DIR.parent / "clip-biased" / "model.safetensors").is_file(), reason="biased CLIP organism not trained")
def test_one_clip_evaluation_path(capsys):
    """``train_clip --eval-only`` and a NAST ``base`` run score through one function on one set: identical numbers."""
    from interp.models import load
    from interp.models.train_clip import eval_set, evaluate, format_table, main
    from interp.nast.train import NastConfig, train_run

    adapter = load("clip-organism-biased")
    direct = evaluate(adapter, eval_set(48, seed=1))
    assert train_run(adapter, NastConfig(method="base", n_eval=48, eval_seed=1)).metrics == direct
    assert main(["--eval-only", "--model", "clip-organism-biased", "--eval-images", "48"]) == 0
    assert format_table(direct) in capsys.readouterr().out


def test_experiment_script_is_the_study():
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).parents[1] / "experiments" / "nast_clip.py"
    res = subprocess.run([sys.executable, str(script), "--help"], capture_output=True, text=True, check=True)
    assert res.stdout.startswith("usage: python -m interp.nast study") and "--betas" in res.stdout
