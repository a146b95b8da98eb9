"""The sweep's corruptions against hand computations: counterfactual and normal-phantom pairs, noise on the
thorax only, the calibrated noise scale, stratified keeping; the default sweep's samples per finding; the
figures it prints and writes."""

from __future__ import annotations

import json
import math
from collections import Counter

import numpy as np
import pytest
import torch

from interp.data.catalog import load_dataset
from interp.data.phantom import FINDINGS, PhantomSpec, render
from interp.data.vqa import build_vqa
from interp.models import load
from interp.trace.__main__ import main, parse_args
from interp.trace.config import SweepConfig
from interp.trace.patching import Noise
from interp.trace.sweep import calibrate, plan_sweep, read_sweep, select_pairs, stratified

DATA = "phantom-test:20"


@pytest.fixture(scope="module")
def organism():
    """The shipped LVLM organism (whatever weights ship: these tests hold for any)."""
    return load("organism")


@pytest.fixture(scope="module")
def data():
    return load_dataset(DATA)


def plain_prob(adapter, image: np.ndarray, item) -> float:
    """p(answer) from a plain HF forward of ``image`` with the item's prompt (no adapter run, no hooks)."""
    batch = adapter.encode([image], [item.prompt], [item.spans])
    with torch.no_grad():
        logits = adapter.model(**batch.model_inputs()).logits[0, int(batch.answer_index[0])]
    return float(logits.float().softmax(-1)[adapter.tokenizer.convert_tokens_to_ids(item.answer)])


def test_counterfactual_is_the_phantom_without_the_finding(organism, data):
    cfg = SweepConfig(data=DATA, mode="patch", corrupt="counterfactual", limit=2)
    pairs = select_pairs(data, cfg)
    plan = plan_sweep(organism, pairs, cfg)
    for i in plan.kept:
        p = pairs[i]
        it = p.item
        edited = render(data.specs[it.image].without(it.finding), data.image_seed(it.image), data.image_size).image
        np.testing.assert_array_equal(p.corrupt_image, edited)
        assert not np.array_equal(p.corrupt_image, p.clean_image)
        for tower in ("vision", "lm"):
            r = plan.run(i, tower, [], [[0]])
            assert r.corrupted == pytest.approx(plain_prob(organism, edited, it), abs=1e-5)
            assert r.clean == pytest.approx(plain_prob(organism, p.clean_image, it), abs=1e-5)


def test_normal_is_another_patients_normal_phantom(data):
    pairs = select_pairs(data, SweepConfig(data=DATA, corrupt="normal", limit=2))
    for p in pairs:
        j = (p.item.image + 1) % len(data.specs)
        other = render(PhantomSpec(data.specs[j].anatomy), data.image_seed(j), data.image_size).image
        np.testing.assert_array_equal(p.corrupt_image, other)
        # the images differ at (nearly) every 8 x 8 patch: where the effect lands is not implied by construction
        diff = (p.corrupt_image != p.clean_image).reshape(8, 8, 8, 8).any((1, 3))
        assert diff.mean() > 0.9


@pytest.mark.parametrize("tower", ["vision", "lm"])
def test_thorax_noise_touches_only_the_thorax_patches(organism, data, tower):
    cfg = SweepConfig(data=DATA, mode="trace", corrupt="thorax", limit=1, copies=2, min_gap=0.0)
    pairs = select_pairs(data, cfg)
    plan = plan_sweep(organism, pairs, cfg)
    i = plan.kept[0]
    it = pairs[i].item
    cm = render(PhantomSpec(data.specs[it.image].anatomy), data.image_seed(it.image), data.image_size).concept_masks
    thorax = cm["lung_left"] | cm["lung_right"] | cm["heart"] | cm["mediastinum"]
    clean = plan.encoded[i][0]
    where = organism.vision_positions(clean)[0] if tower == "vision" else clean.positions[0]
    image = [p for p, k in enumerate(where.kinds) if k == "image"]

    def touches(box) -> bool:
        y0, x0, y1, x1 = box
        return bool(thorax[math.floor(y0):math.ceil(y1), math.floor(x0):math.ceil(x1)].any())

    expected = {p for p in image if touches(where.boxes[p])}
    assert 0 < len(expected) < len(image)
    site, positions = plan.noised(i, tower)
    assert set(positions) == expected
    # through the model: the corrupted run's embeddings differ from the clean run's on exactly those positions
    noise = Noise(site, tuple(positions), plan.scales[tower] * plan.sigma[tower], copies=2, seed=0)
    _, got = organism.run(clean.take([0, 0]), read=[site], edit={site: noise.edit(torch.arange(2))})
    _, ref = organism.run(clean, read=[site])
    changed = (got[site] != ref[site]).any(-1).any(0)
    assert set(np.flatnonzero(changed.numpy())) == expected


def test_calibrated_scale_is_the_smallest_grid_value_meeting_the_rule():
    grid = (1.0, 2.0, 3.0, 4.0, 6.0)
    moves_from = {0: 1.0, 1: 2.0, 2: 4.0, 3: 99.0, 4: 3.0, 5: 3.0, 6: 3.0, 7: 3.0}  # sample -> smallest scale moving it
    samples = {"a": [0, 1, 2, 3], "b": [4, 5, 6, 7]}
    calls = []

    def gap(i: int, scale: float) -> float:
        calls.append(scale)
        return 0.5 if scale >= moves_from[i] else 0.01

    got = calibrate(gap, samples, min_gap=0.1, grid=grid, share=0.75)
    # by hand: a needs 3 of 4 moved (scale >= 4), b all of them (>= 3)
    by_hand = min(s for s in grid if all(np.mean([s >= moves_from[i] for i in idx]) >= 0.75 for idx in samples.values()))
    assert got["scale"] == by_hand == 4.0 and got["met"]
    assert got["grid"] == [1.0, 2.0, 3.0, 4.0] and max(calls) == 4.0  # stops at the first scale meeting the rule
    assert got["moved"] == {"a": [0.25, 0.5, 0.5, 0.75], "b": [0.0, 0.0, 1.0, 1.0]}
    # a finding no scale moves: the rule is not met; the scale moving the others most, smallest first
    samples["c"] = [3]
    got = calibrate(gap, samples, min_gap=0.1, grid=grid, share=0.75)
    assert not got["met"] and got["scale"] == 4.0 and got["grid"] == list(grid)


def test_stratified_round_robin_with_a_quota_per_finding():
    findings = ["a", "a", "a", "a", "b", "b", "c"]
    fails = {1, 5}
    kept, checked = stratified(findings, lambda i: i not in fails, limit=6)
    # quota ceil(6 / 3) = 2 each; round 1: a0 b4 c6; round 2: a (1 fails) a2, b (5 fails, none left), c none left
    assert kept == [0, 4, 6, 2] and checked == 6
    assert stratified(findings, lambda i: True, limit=2) == ([0, 4], 2)


def test_default_sweep_keeps_five_of_every_finding(organism):
    cfg = SweepConfig()
    plan = plan_sweep(organism, select_pairs(load_dataset(cfg.data_for(lvlm=True)), cfg), cfg)
    counts = Counter(plan.candidates[i].item.finding for i in plan.kept)
    assert set(counts) == set(FINDINGS) and min(counts.values()) >= 5, counts
    assert (cfg.mode, cfg.corrupt) == ("patch", "normal") == (parse_args([]).mode, parse_args([]).corrupt)


@pytest.mark.parametrize("args,circular", [
    (["--corrupt", "normal"], False),
    (["--corrupt", "counterfactual"], True),
    # the LM tower only: noise on the vision tower's input moves none of these answers at any scale of the grid
    (["--mode", "trace", "--corrupt", "thorax", "--noise-scale", "auto", "--copies", "2", "--sites",
      "lm.blocks.0.resid_post"], False),
])
def test_summary_printed_and_written(tmp_path, capsys, args, circular):
    out = tmp_path / "o"
    assert main(["--data", DATA, "--limit", "5", "--sites", "vision.blocks.0.resid_post,lm.blocks.0.resid_post",
                 "--out", str(out), *args]) == 0
    printed = capsys.readouterr().out
    summary = json.loads((out / "summary.json").read_text())
    towers = read_sweep(str(out / "sweep.zarr"))
    for name, s in summary.items():
        ds = towers[name]
        assert s["per_finding"] == dict(Counter(ds["finding"].values.tolist()))
        assert f"samples per finding: {', '.join(f'{f} {n}' for f, n in s['per_finding'].items())}" in printed
        score = s["ground_truth"]
        assert score["low"][0] <= score["ratio"][0] <= score["high"][0]
        assert f"layer 0: {score['ratio'][0]:.1f}x [{score['low'][0]:.1f}, {score['high'][0]:.1f}]" in printed
        assert s["circular"] is circular and s["localisation"] in printed
        assert set(s["ground_truth_by_finding"]) == set(s["per_finding"])
        # the score counts the noised region's image patches only: chance = finding patches / region patches there
        patch = (ds["kind"] == "image") & (ds["row"] >= 0)
        region = patch & ds["region"]
        assert score["expected"] == pytest.approx(float((region & (ds["mask_fraction"] > 0)).sum() / region.sum()))
        if "thorax" in args:
            assert 0 < int(region.sum()) < int(patch.sum())
            c = s["calibration"]
            assert c["scale"] == s["noise_scale"] and set(c["moved"]) <= set(FINDINGS)
        else:
            assert bool((region == patch).all())


@pytest.mark.parametrize("argv,mode,corrupt", [
    ([], "patch", "normal"),
    (["--corrupt", "counterfactual"], "patch", "counterfactual"),
    (["--corrupt", "thorax"], "trace", "thorax"),
    (["--copies", "2"], "trace", "image"),  # a noise setting means noise
    (["--noise-scale", "auto"], "trace", "image"),
    (["--image", "x.png", "--prompt", "is there a nodule ?"], "trace", "image"),
    (["--mode", "nast"], "nast", "negation"),
])
def test_mode_follows_the_command_line(argv, mode, corrupt):
    cfg = parse_args(argv)
    assert (cfg.mode, cfg.corrupt) == (mode, corrupt)


@pytest.mark.parametrize("argv,lvlm,data", [
    ([], True, "phantom-test:200"),
    (["--mode", "patch", "--corrupt", "negation"], True, "phantom-test"),  # needs negated/positive statements
    (["--corrupt", "negation_cue"], True, "phantom-test"),
    ([], False, "phantom-test"),
    (["--data", "phantom-val"], True, "phantom-val"),
])
def test_default_data_has_the_items_the_corruption_needs(argv, lvlm, data):
    from interp.data.catalog import load_dataset
    from interp.trace.sweep import select_pairs

    cfg = parse_args(argv)
    assert cfg.data_for(lvlm) == data
    if data.startswith("phantom-test"):
        assert select_pairs(load_dataset(data), cfg, lvlm)


@pytest.mark.parametrize("args,message", [
    (["--mode", "patch", "--noise-scale", "auto"], "--noise-scale does not apply to --mode patch"),
    (["--corrupt", "normal", "--copies", "2"], "--copies does not apply to --mode patch"),
    (["--mode", "patch", "--corrupt", "thorax"], "--corrupt 'thorax' does not go with --mode patch"),
    (["--mode", "trace", "--corrupt", "normal"], "--corrupt 'normal' does not go with --mode trace"),
    (["--mode", "trace", "--noise-scale", "loud"], "--noise-scale: must be a finite number > 0, got 'loud'"),
    (["--data", "ONE"], "--corrupt normal takes another patient's phantom"),
])
def test_cli_bad_corruption_is_one_line(tmp_path, capsys, args, message):
    one = build_vqa(1, seed=0, split="test").save(tmp_path / "one.json")
    out = tmp_path / "o"
    args = [str(one) if a == "ONE" else a for a in args]
    assert main(["--layer-sweep", "--out", str(out), *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], err
    assert not out.exists()
