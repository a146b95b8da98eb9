"""VQA items and statements: templates, spans, answers against the spec, persistence."""

import json

import numpy as np
import pytest

from interp.data import ALL_KINDS, CHAIN_END, FINDINGS, VQADataset, build_vqa, split_target, vocabulary
from interp.data.vqa import AFFIRMATIVE, FINDING_WORDS
from interp.errors import InterpError


@pytest.fixture(scope="module")
def ds():
    return build_vqa(40, seed=3, confounder_rate=0.8)


def test_items_cover_every_applicable_question(ds):
    assert len(ds.specs) == 40 and len(ds) == len(ds.items)
    for i, spec in enumerate(ds.specs):
        items = [it for it in ds.items if it.image == i]
        n_side = sum(f.side is not None for f in spec.findings)
        n_zone = sum(f.name in ("consolidation", "nodule") for f in spec.findings)
        assert len(items) == 2 * (4 * len(FINDINGS) + n_side + n_zone)
    assert len({it.id for it in ds.items}) == len(ds)


def test_answers_match_the_spec(ds):
    for it in ds.items:
        spec = ds.specs[it.image]
        present = spec.has(it.finding)
        f = spec.get(it.finding)
        expect = {
            "presence": "yes" if present else "no",
            "laterality": f and f.side,
            "zone": f and f.zone,
            "negated": "false" if present else "true",
            "positive": "true" if present else "false",
            "affirmative": "false" if present else "true",
        }[it.kind]
        assert it.answer == expect, it
        assert split_target(it.target) == it.answer
        if it.mode == "direct":
            assert it.prompt.endswith(" answer :") and it.target == it.answer
        else:
            assert it.prompt.endswith(" steps :") and it.target.endswith(f"{CHAIN_END} {it.answer}")
            assert it.target.startswith("look at ")


def test_cot_chain_describes_this_image(ds):
    for it in ds.filter(kinds="laterality", modes="cot").items:
        assert f" {it.answer} " in it.target.split(CHAIN_END)[0]
    absent = [it for it in ds.filter(kinds="presence", modes="cot").items if it.answer == "no"]
    assert absent and all(" left " not in it.target and " right " not in it.target for it in absent)


def test_exact_prompts():
    ds = build_vqa(1, 0)
    by = {(it.kind, it.finding, it.mode): it.prompt for it in ds.items}
    assert by["presence", "pleural_effusion", "direct"] == "question : is there a pleural effusion ? answer :"
    assert by["negated", "nodule", "direct"] == "statement : there is no nodule . true or false ? answer :"
    assert by["positive", "nodule", "cot"] == "statement : there is a nodule . true or false ? steps :"
    assert by["affirmative", "cardiomegaly", "direct"] == (
        "statement : the heart size is normal . true or false ? answer :")


def test_spans_point_at_the_right_text(ds):
    for it in ds.items:
        s = it.spans
        text = lambda k: it.prompt[slice(*s[k])]  # noqa: E731
        assert text("answer") == ":" and s["answer"][1] == len(it.prompt)
        words = AFFIRMATIVE[it.finding] if it.kind == "affirmative" else FINDING_WORDS[it.finding]
        assert text("finding") == words
        body = it.prompt.split(" : ", 1)[1].rsplit(" ", 2)[0]
        assert text("question") == body
        assert ("negation_cue" in s) == (it.kind == "negated")
        if it.kind == "negated":
            assert text("negation_cue") == "no"


def test_negated_and_positive_are_minimal_pairs(ds):
    by = {(it.image, it.kind, it.finding, it.mode): it for it in ds.items}
    for (i, kind, f, mode), neg in by.items():
        if kind != "negated":
            continue
        pos = by[i, "positive", f, mode]
        a, b = neg.prompt.split(), pos.prompt.split()
        diff = [(x, y) for x, y in zip(a, b) if x != y]
        assert len(a) == len(b) and diff == [("no", "a")]
        assert neg.answer != pos.answer
    for text in AFFIRMATIVE.values():
        assert not {"no", "not", "without"} & set(text.split())


def test_vocabulary_covers_every_text(ds):
    vocab = vocabulary()
    assert vocab == sorted(set(vocab)) == vocabulary()
    for it in build_vqa(60, 9, "test", confounder_rate=0.5).items + ds.items:
        assert set(it.prompt.split()) | set(it.target.split()) <= set(vocab), it
        assert it.prompt == it.prompt.lower() and "  " not in it.prompt + it.target


def test_presence_balance_at_prevalence_half():
    items = build_vqa(300, 1, kinds=["presence"], modes=["direct"]).items
    yes = np.mean([it.answer == "yes" for it in items])
    assert 0.45 < yes < 0.55


def test_splits_seeds_and_hash():
    a, b = build_vqa(20, 5, "train"), build_vqa(20, 5, "train")
    assert a.hash == b.hash and a.name == b.name
    assert build_vqa(20, 6, "train").hash != a.hash
    val = build_vqa(20, 5, "val")
    assert not {a.image_seed(i) for i in range(20)} & {val.image_seed(i) for i in range(20)}
    assert [s.to_dict() for s in val.specs] != [s.to_dict() for s in a.specs]
    assert np.array_equal(a.image(3), b.image(3))
    assert a.phantom(3).image.shape == (64, 64)
    with pytest.raises(InterpError):
        a.phantom(20)


def test_save_load_round_trip(ds, tmp_path):
    path = ds.save(tmp_path / "d" / "vqa.json")
    back = VQADataset.load(path)
    assert back.hash == ds.hash and back.items == ds.items and back.specs == ds.specs
    assert np.array_equal(back.image(7), ds.image(7))


def test_load_errors(ds, tmp_path):
    with pytest.raises(InterpError, match="cannot load"):
        VQADataset.load(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(InterpError, match="cannot load"):
        VQADataset.load(tmp_path / "bad.json")
    d = json.loads(ds.save(tmp_path / "ok.json").read_text())
    d["items"][0]["answer"] = "maybe"
    (tmp_path / "tampered.json").write_text(json.dumps(d))
    with pytest.raises(InterpError, match="hash mismatch"):
        VQADataset.load(tmp_path / "tampered.json")


def test_filter_and_bad_arguments(ds):
    sub = ds.filter(kinds=["negated", "affirmative"], modes="direct", findings=["nodule"])
    assert len(sub) == 2 * len(ds.specs) and sub.specs is ds.specs
    assert {(it.kind, it.mode, it.finding) for it in sub.items} == {
        ("negated", "direct", "nodule"), ("affirmative", "direct", "nodule")}
    with pytest.raises(InterpError, match="unknown kinds"):
        ds.filter(kinds=["severity"])
    with pytest.raises(InterpError, match="empty data set"):
        build_vqa(0, 1)
    with pytest.raises(InterpError, match="unknown split"):
        build_vqa(2, 1, "dev")
    assert set(ALL_KINDS) == {it.kind for it in ds.items}


def test_split_target():
    assert split_target("look at the heart . the heart is enlarged . answer : yes") == "yes"
    assert split_target(" no ") == "no"
    with pytest.raises(InterpError):
        split_target("look at the heart . answer :")
