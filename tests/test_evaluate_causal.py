"""The counterfactual filter (edits exact on phantoms, classification of lesion- and shortcut-causal
samples) and the evaluation run end to end on a few phantoms."""

from __future__ import annotations

import json

import numpy as np
import pytest

from interp.data.phantom import Anatomy, Finding, PhantomSpec, render
from interp.errors import InterpError
from interp.evaluate import counterfactual as cf
from interp.evaluate import experiment as E


@pytest.fixture(scope="module")
def phantom():
    spec = PhantomSpec(Anatomy(), (Finding("nodule", "left", "middle", "large"), Finding("cardiomegaly", None, None, "large")),
                       ("chest_tube",))
    return render(spec, 11)


def test_phantom_edits_are_exact(phantom):
    edits = cf.phantom_edits(phantom, "nodule", 11, 64)
    region = cf.region_of(phantom.finding_masks["nodule"])
    changed = edits["finding_removed"] != phantom.image
    assert changed.any() and not changed[~phantom.finding_masks["nodule"]].any()  # only the finding's pixels move
    for k in ("background_no_finding", "background_normal"):
        assert (edits[k][region] == phantom.image[region]).all() and (edits[k][~region] != phantom.image[~region]).mean() > 0.5
    both = edits[cf.CONFOUNDER_EDIT] != edits["finding_removed"]  # the tube's pixels, and only them, differ
    assert both.any() and not both[~phantom.confounder_masks["chest_tube"]].any()
    with pytest.raises(InterpError, match="no pneumothorax"):
        cf.phantom_edits(phantom, "pneumothorax", 11, 64)


def test_judge_classifies_samples(phantom):
    edits = cf.phantom_edits(phantom, "nodule", 11, 64)
    finding, tube = phantom.finding_masks["nodule"], cf.confounder_mask(phantom)
    ids = {id(v): k for k, v in {"original": phantom.image, **edits}.items()}

    def answers(table):
        return lambda img: table[ids[id(img)]]

    lesion = {"original": "yes", "finding_removed": "no", "background_no_finding": "yes", "background_normal": "yes",
              cf.CONFOUNDER_EDIT: "no"}
    v = cf.judge(answers(lesion), phantom.image, edits, finding, tube)
    assert v.kept and v.kind == "lesion" and v.region is finding
    shortcut = {**lesion, "finding_removed": "yes", cf.CONFOUNDER_EDIT: "no"}
    v = cf.judge(answers(shortcut), phantom.image, edits, finding, tube)
    assert v.kind == "shortcut" and v.region is tube and not v.kept
    for k in ("original", "background_normal"):
        assert cf.judge(answers({**lesion, k: "no"}), phantom.image, edits, finding, tube).kind == "rejected"


def test_real_image_edits(tmp_path):
    img = np.random.default_rng(0).random((40, 30)).astype(np.float32)
    region = np.zeros((40, 30), bool)
    region[10:20, 5:15] = True
    e = cf.blur_edits(img, region)
    assert (e["finding_removed"][~region] == img[~region]).all() and (e["background_normal"][region] == img[region]).all()
    with pytest.raises(InterpError, match="non-empty mask"):
        cf.blur_edits(img, np.zeros((40, 30), bool))
    with pytest.raises(InterpError, match="no finding_removed image"):
        cf.folder_edits(tmp_path, "case1")


def test_experiment_end_to_end(organism, tmp_path):
    result = E.run({"organism": organism}, ["occlusion", "saliency"], n_images=24, modes=["direct"], per_finding=1,
                   progress=False)
    v = result["verified"]["organism"]
    assert v["candidates"] == v["lesion"] + v["shortcut"] + v["rejected"] >= 4 and v["lesion"] >= 1
    assert len(result["rows"]) == 2 * (v["lesion"] + v["shortcut"])
    for row in result["summary"]:
        assert row["n"] == sum(r["method"] == row["method"] and r["kind"] == row["kind"] for r in result["rows"])
        assert 0 <= row["pointing"]["mean"] <= 1 and row["pointing"]["lo"] <= row["pointing"]["mean"] <= row["pointing"]["hi"]
    out = E.write(result, tmp_path / "medfocus")
    assert json.loads((out / "results.json").read_text())["verified"] == result["verified"]
    assert "| organism | lesion | direct | occlusion |" in (out / "table.md").read_text()
    from interp.report.attribution import write_evaluation_report

    img = np.zeros((64, 64))
    ex = [{"title": f"<script>alert({i})</script>", "image": img, "region": img > 0, "maps": {"occlusion": img + i}}
          for i in range(2)]
    page = write_evaluation_report(result, ex, out / "report.html").read_text()
    assert "<script>alert" not in page and "&lt;script&gt;alert(0)" in page
    assert page.count("Plotly.newPlot") == 2 and page.count("plotly.js v") == 1  # plotly.js embedded once


def test_a_real_lvlm_is_asked_the_published_question(tiny_model_dir, tmp_path, capsys):
    """Any checkpoint runs through the same command, asked the published question (a random model answers
    nonsense, so every candidate is rejected and the table is empty - but nothing breaks)."""
    from interp.evaluate.__main__ import main

    assert main(["--organisms", str(tiny_model_dir), "--methods", "saliency", "--modes", "direct", "--n-images", "8",
                 "--per-finding", "1", "--out", str(tmp_path / "ev"), "--no-progress"]) == 0
    result = json.loads((tmp_path / "ev" / "results.json").read_text())
    assert result["verified"][str(tiny_model_dir)]["candidates"] >= 1 and result["rows"] == []
    sample = E.asked(E.build_vqa(4, 0, "test", kinds=["presence"], modes=["cot"]).items[0], E.QUESTION)
    assert sample.prompt.startswith("Is there evidence of ") and sample.prompt.endswith("then answer yes or no.")
