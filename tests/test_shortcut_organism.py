"""The shortcut organism (trained with a chest tube alongside pneumothorax) answers from the tube more than
the default organism does; the confounder parameter leaves every default data set as it was."""

from __future__ import annotations

import numpy as np
import pytest

from interp.data.phantom import sample_spec
from interp.data.vqa import build_vqa
from interp.errors import InterpError
from interp.models.registry import ALIASES

TEST_SEED = 20261124  # not the seed metrics.json reports: fresh test phantoms


@pytest.fixture(scope="module")
def tables():
    if not (ALIASES["organism-shortcut"] / "config.json").is_file():
        pytest.skip("no shipped shortcut organism: see TRAIN_HINT['organism-shortcut']")
    from interp.models import load
    from interp.models.shortcut import shortcut_table

    out = {}
    for alias in ("organism", "organism-shortcut"):
        adapter = load(alias, kind="lvlm")
        out[alias] = shortcut_table(adapter.model, adapter.tokenizer, 60, TEST_SEED)
    return out


def test_shortcut_organism_answers_from_the_tube(tables):
    base, short = tables["organism"], tables["organism-shortcut"]
    # measured at this seed (60 phantoms): shortcut effect 0.385 vs 0.154, lesion removed keeps yes 0.41 vs 0.14
    # (the default never saw a tube: its share is presumably the tube taken for a pleural line, not a learned shortcut)
    assert short["shortcut_effect"] - base["shortcut_effect"] >= 0.12, (short["shortcut_effect"], base["shortcut_effect"])
    assert short["causal"]["lesion_removed_keeps_yes"] >= 0.25, short["causal"]
    # without a tube it still sees the pneumothorax (0.87), and clean negatives stay "no" (1.0)
    assert short["cells"]["present/no_tube"]["acc"] >= 0.75 and short["cells"]["absent/no_tube"]["acc"] >= 0.95


@pytest.mark.parametrize("rate", [0.9, 0.98])
def test_confounded_finding_sets_the_co_occurrence(rate):
    rng = np.random.default_rng(4)
    specs = [sample_spec(rng, 0.5, rate, confounded="pneumothorax") for _ in range(3000)]
    ptx = np.array([s.has("pneumothorax") for s in specs])
    tube = np.array([s.has("chest_tube") for s in specs])
    for got, want, n in ((tube[ptx].mean(), rate, ptx.sum()), (tube[~ptx].mean(), 1 - rate, (~ptx).sum())):
        assert abs(got - want) <= 5 * np.sqrt(want * (1 - want) / n) + 1e-9, (got, want, n)
    with pytest.raises(InterpError, match="unknown confounded finding"):
        sample_spec(rng, 0.5, rate, confounded="edema")


def test_default_confounded_data_sets_are_unchanged():
    # hashes computed before `confounded` existed
    assert build_vqa(40, seed=3, confounder_rate=0.8).hash == \
        "b951e1ac37321d87503bbd2d891bae73a1e80892176e204fe2ec47f2362537fe"
    default = build_vqa(20, 0, "test", confounder_rate=0.9, confounded="pleural_effusion")
    assert default.hash == "8abeb1270b9020468c020021217e8c599d9d368fb94f6c52bc7e3304a920453d"
    assert "confounded" not in default.config
    # another confounded finding moves only the tubes: the same draws otherwise
    moved = build_vqa(20, 0, "test", confounder_rate=0.9, confounded="pneumothorax")
    assert moved.config["confounded"] == "pneumothorax"
    assert [s.without("chest_tube") for s in moved.specs] == [s.without("chest_tube") for s in default.specs]
    assert [s.confounders for s in moved.specs] != [s.confounders for s in default.specs]


def test_train_cli_sets_the_confounder(tmp_path):
    from interp.models.registry import TRAIN_HINT
    from interp.models.train_cli import config, main, parser

    cfg = config(parser().parse_args(["--set", "confounder_rate=0.9", "--set", "confounded=pneumothorax",
                                      "--set", "minutes=none", "--set", "lr=1e-3"]))
    assert (cfg.confounder_rate, cfg.confounded, cfg.minutes, cfg.lr) == (0.9, "pneumothorax", None, 1e-3)
    assert config(parser().parse_args(["--confounder-rate", "1", "--confounded", "pneumothorax"])).confounder_rate == 1.0
    for bad in (["--set", "confounded=edema"], ["--set", "confounder_rate=2"], ["--set", "steps=none"]):
        assert main(["--out", str(tmp_path), *bad]) == 2  # checked before any training
    assert "--confounded pneumothorax" in TRAIN_HINT["organism-shortcut"]
