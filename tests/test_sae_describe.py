"""Phantom reports read back by the labeller; SAE-Rad descriptions, compiled reports, scores;
the labeller against IU-Xray's MeSH terms (skipped when the torchxrayvision wheel cannot be fetched)."""

from __future__ import annotations

import tarfile
import tempfile
from pathlib import Path

import numpy as np
import pytest

from interp.data.phantom import FINDINGS, sample_spec
from interp.data.phantom_reports import phantom_report, phantom_reports
from interp.data.reports import load_openi_reports, split_sections
from interp.errors import InterpError
from interp.sae.describe import (
    answers_to_text,
    compile_report,
    compile_reports,
    default_detector,
    describe_features,
    label_agreement,
    score_reports,
)


def _specs(n: int, seed: int = 0) -> list:
    """Specs with no, some (independent) and all findings: the findings co-occur."""
    rng = np.random.default_rng(seed)
    return [sample_spec(rng, prevalence=(0.0, 0.5, 1.0)[i % 3], confounder_rate=0.5) for i in range(n)]


def _truth(specs) -> np.ndarray:
    return np.array([[s.has(f) for f in FINDINGS] for s in specs], dtype=int)


# ---------------------------------------------------------------------------------------
# phantom reports


def test_phantom_reports_read_back_exactly():
    specs = _specs(450)
    reports = phantom_reports(specs, seed=3)
    det = default_detector()
    for spec, text in zip(specs, reports):
        status = det.report_status(text)
        for f in FINDINGS:
            want = ("affirmed",) if spec.has(f) else (None, "negated")
            assert status.get(f) in want, (f, spec.has(f), status.get(f), text)
        assert ("tube" in text) == spec.has("chest_tube"), text
        assert set(split_sections(text)) == {"FINDINGS", "IMPRESSION"}
    sentences = {s for t in reports for s, _ in det.sentences(t.replace("FINDINGS:", "").replace("IMPRESSION:", ""))}
    assert len(sentences) > 300  # varied phrasing


def test_phantom_report_deterministic_in_seed():
    spec = _specs(3)[2]  # every finding present
    assert phantom_report(spec, 7) == phantom_report(spec, 7)
    assert len({phantom_report(spec, s) for s in range(20)}) > 10
    assert phantom_reports([spec, spec], seed=1)[1] == phantom_report(spec, (1, 1))


# ---------------------------------------------------------------------------------------
# descriptions


def _effusion_data():
    """30 images; feature 0 fires on the 15 whose reports affirm a pleural effusion, 1 never."""
    rng = np.random.default_rng(0)
    yes = ["Small left pleural effusion.", "There is a moderate right pleural effusion.", "Large left effusion."]
    no = ["No pleural effusion.", "The costophrenic angles are sharp.", "There is no pleural effusion."]
    other = ["Heart size is normal.", "The trachea is midline.", "No pneumothorax."]
    reports, acts = [], np.zeros((30, 2))
    for i in range(30):
        eff = i % 2 == 0
        reports.append(" ".join([(yes if eff else no)[i % 3], other[i % 3]]))
        acts[i, 0] = rng.uniform(0.5, 1.0) if eff else 0.0
    return reports, acts


def test_description_names_the_feature_finding():
    reports, acts = _effusion_data()
    d0, d1 = describe_features(acts, reports)
    assert "effusion" in d0.description.lower()
    assert default_detector().report_status(d0.description) == {"pleural_effusion": "affirmed"}
    assert d0.scores[0] == pytest.approx(1.0) and d0.p_values[0] < 1e-6
    assert d0.n_active == 15 and set(d0.top_images) == set(range(0, 30, 2))
    assert len(d0.sentences) == 1  # the other sentences are as common outside the top images
    assert (d1.description, d1.n_active, d1.top_images) == ("", 0, ())
    assert describe_features(acts, reports, features=[0])[0] == d0  # seeded per feature


def test_descriptions_of_phantom_features():
    rng = np.random.default_rng(1)
    specs = [sample_spec(rng) for _ in range(300)]  # findings independent (see _specs)
    y = _truth(specs)
    acts = y * rng.uniform(0.2, 1.0, y.shape)
    descs = describe_features(acts, phantom_reports(specs), top_k=20)
    for f, d in zip(FINDINGS, descs):
        assert default_detector().report_status(d.description).get(f) == "affirmed", (f, d.description)
    compiled = compile_reports(acts, descs)
    assert score_reports(compiled, y)["micro"]["f1"] == 1.0


def test_describe_rejects_bad_input():
    reports, acts = _effusion_data()
    with pytest.raises(InterpError):
        describe_features(acts[:5], reports)
    with pytest.raises(InterpError):
        describe_features(acts, reports, method="lm")
    with pytest.raises(InterpError):
        describe_features(acts, reports, lm_path="/nowhere")
    with pytest.raises(InterpError):
        describe_features(acts, reports, features=[2])
    with pytest.raises(InterpError):
        describe_features(acts, reports, method="lm", lm_path="/nowhere")


@pytest.mark.parametrize("chat", [False, True])
def test_lm_descriptions_run(tmp_path, chat):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from interp.models.tokenizer import word_tokenizer

    reports, acts = _effusion_data()
    tok = word_tokenizer(" ".join(reports).lower().replace(".", " .").split() + ["group", "a", "b"])
    if chat:
        tok.chat_template = "{% for m in messages %}<bos> {{ m['content'] }}{% endfor %} answer"
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64,
                      pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    LlamaForCausalLM(cfg).save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    d0, d1 = describe_features(acts, reports, method="lm", lm_path=str(tmp_path), max_new_tokens=4)
    assert isinstance(d0.description, str) and d0.method == "lm"
    assert "effusion" in d0.sentences[0].lower()  # the extractive evidence is kept
    assert d1.description == ""


# ---------------------------------------------------------------------------------------
# compiled reports


DESCRIPTIONS = [
    "Small left pleural effusion.",
    "Small left pleural effusion. No pneumothorax.",
    "No pleural effusion.",
    "There is no pneumothorax.",
    "Heart size is normal.",
    "",
]


def test_compile_dedups_and_resolves_contradictions():
    got = compile_report([0, 1, 2, 3, 4, 5], [0.9, 0.8, 0.5, 0.7, 0.1, 1.0], DESCRIPTIONS)
    assert got == "Small left pleural effusion. No pneumothorax. Heart size is normal."
    # the stronger feature wins a contradiction
    assert compile_report([0, 2], [0.4, 0.6], DESCRIPTIONS) == "No pleural effusion."
    assert compile_report([4, 0, 1], [0.3, 0.2, 0.1], DESCRIPTIONS, max_sentences=2) == (
        "Heart size is normal. Small left pleural effusion.")
    assert compile_report([], [], DESCRIPTIONS) == ""
    with pytest.raises(InterpError):
        compile_report([0, 9], [1.0, 1.0], DESCRIPTIONS)
    with pytest.raises(InterpError):
        compile_report([0], [1.0, 2.0], DESCRIPTIONS)


def test_compile_reports_uses_relative_strength():
    acts = np.array([[10.0, 0.0, 0.4, 0, 0, 0], [1.0, 0.0, 0.9, 0, 0, 0], [0, 0, 0, 0, 0, 0.0]])
    # image 1: feature 0 at 1/10 of its max, feature 2 at 0.9/0.9 -> "no effusion" wins
    assert compile_reports(acts, DESCRIPTIONS) == ["Small left pleural effusion.", "No pleural effusion.", ""]


# ---------------------------------------------------------------------------------------
# scores


def test_score_reports_against_hand_computation():
    texts = [
        "Small left pleural effusion. No pneumothorax.",
        "No pleural effusion. Small right pneumothorax.",
        "Possible pleural effusion.",  # uncertain: negative
        "Heart size is normal.",
    ]
    labels = {"pleural_effusion": [1, 0, 1, 0], "pneumothorax": [0, 0, 0, 0]}
    r = score_reports(texts, labels)
    eff, ptx = r["per_finding"]["pleural_effusion"], r["per_finding"]["pneumothorax"]
    assert (eff["tp"], eff["fp"], eff["fn"], eff["tn"], eff["uncertain"]) == (1, 0, 1, 2, 1)
    assert (eff["precision"], eff["recall"], eff["f1"]) == (1.0, 0.5, pytest.approx(2 / 3))
    assert (ptx["tp"], ptx["fp"], ptx["precision"], ptx["recall"], ptx["f1"]) == (0, 1, 0.0, None, 0.0)
    m = r["micro"]
    assert (m["tp"], m["fp"], m["fn"], m["tn"]) == (1, 1, 1, 5) and m["f1"] == 0.5
    assert r["macro"] == {"precision": 0.5, "recall": 0.5, "f1": pytest.approx(1 / 3)}
    assert r["uncertain_counts_as"] == "negative"
    arr = score_reports(texts, np.array([labels["pleural_effusion"], labels["pneumothorax"]]).T,
                        findings=["pleural_effusion", "pneumothorax"])
    assert arr == r


def test_perfect_and_empty_reports():
    specs = _specs(60, seed=2)
    y = _truth(specs)
    perfect = score_reports(phantom_reports(specs), y)
    assert perfect["micro"]["f1"] == 1.0 and all(d["f1"] == 1.0 for d in perfect["per_finding"].values())
    answers = [answers_to_text({f: bool(v) for f, v in zip(FINDINGS, row)}) for row in y]
    assert score_reports(answers, y)["micro"]["f1"] == 1.0
    empty = score_reports([""] * len(specs), y)
    assert empty["micro"]["recall"] == 0.0 and empty["micro"]["precision"] is None
    assert empty["macro"]["recall"] == 0.0 and empty["micro"]["f1"] == 0.0


def test_score_reports_rejects_bad_labels():
    with pytest.raises(InterpError):
        score_reports(["No effusion."], np.array([[2, 0, 0, 0, 0]]))
    with pytest.raises(InterpError):
        score_reports(["No effusion."], np.zeros((2, 5)))
    with pytest.raises(InterpError):
        score_reports(["No effusion."], {"pleural_effusion": [1, 0]})
    with pytest.raises(InterpError):
        score_reports(["No effusion."], {"no_such_finding": [1]})
    with pytest.raises(InterpError):
        answers_to_text({"edema": True})


# ---------------------------------------------------------------------------------------
# the labeller on IU-Xray reports


def _openi_xml(uid: str, findings: str, impression: str, mesh: list[str]) -> str:
    majors = "".join(f"<major>{m}</major>" for m in mesh)
    return (f'<eCitation><uId id="{uid}"/><Abstract><AbstractText Label="FINDINGS">{findings}</AbstractText>'
            f'<AbstractText Label="IMPRESSION">{impression}</AbstractText></Abstract>'
            f"<MeSH>{majors}<automatic>ignored</automatic></MeSH></eCitation>")


def test_label_agreement_on_hand_made_reports(tmp_path):
    rows = [
        ("CXR1", "Heart size normal. No pleural effusion.", "No acute disease.", ["normal"]),
        ("CXR2", "Small left pleural effusion.", "Effusion.", ["Pleural Effusion/left/small"]),
        ("CXR3", "The cardiac silhouette is enlarged.", "Cardiomegaly.", ["Cardiac Shadow/enlarged/mild"]),
        ("CXR4", "Blunted angle.", "Stable.", ["Pleural Effusion/right"]),
        ("CXR5", "Clear.", "Clear.", ["No Indexing"]),
    ]
    for uid, f, i, mesh in rows:
        (tmp_path / f"{uid}.xml").write_text(_openi_xml(uid, f, i, mesh))
    reports = load_openi_reports(tmp_path)
    assert reports[1].mesh == ("Pleural Effusion/left/small",)
    r = label_agreement(reports, findings=["pleural_effusion", "cardiomegaly"])
    assert r["n"] == 4 and r["normal"] == {"n": 1, "no_affirmed": 1.0}
    eff = r["per_finding"]["pleural_effusion"]
    assert (eff["tp"], eff["fn"], eff["fp"]) == (1, 1, 0)
    assert r["per_finding"]["cardiomegaly"]["tp"] == 1  # "Cardiac Shadow/enlarged" means cardiomegaly
    with pytest.raises(InterpError):
        label_agreement(reports, findings=["pleural_thickening"])


def _iu_xray(txv_data: Path) -> Path:
    """IU-Xray XML reports from the wheel's ``NLMCXR_reports.tgz``, extracted once beside its data folder."""
    reports = txv_data.parents[1] / "ecgen-radiology"
    if not reports.is_dir():
        with tempfile.TemporaryDirectory(dir=reports.parent) as tmp, \
                tarfile.open(txv_data / "NLMCXR_reports.tgz") as t:
            t.extractall(tmp, filter="data")
            (Path(tmp) / "ecgen-radiology").rename(reports)
    return reports


def test_labeller_agrees_with_iu_xray_mesh(txv_data):
    reports = load_openi_reports(_iu_xray(txv_data))
    r = label_agreement(reports)
    print(f"\nIU-Xray labeller vs MeSH: n={r['n']} reports; MeSH-normal n={r['normal']['n']}, "
          f"no finding affirmed {r['normal']['no_affirmed']:.3f}")
    for f, d in r["per_finding"].items():
        print(f"  {f}: support {d['support']}, precision {d['precision']:.3f}, recall {d['recall']:.3f}, "
              f"F1 {d['f1']:.3f}, specificity {d['specificity']:.4f}, uncertain {d['uncertain']}")
    print(f"  micro F1 {r['micro']['f1']:.3f}, macro F1 {r['macro']['f1']:.3f}")
    assert len(reports) == 3955 and r["n"] >= 3800 and r["normal"]["n"] >= 1300
    assert r["normal"]["no_affirmed"] >= 0.97
    eff, ptx, card = (r["per_finding"][f] for f in ("pleural_effusion", "pneumothorax", "cardiomegaly"))
    # hedged effusions ("effusion versus thickening", "and/or") are uncertain, which MeSH indexes as present
    assert eff["recall"] >= 0.8 and eff["precision"] >= 0.95
    assert ptx["recall"] >= 0.75 and ptx["precision"] >= 0.75
    assert card["recall"] >= 0.75 and card["precision"] >= 0.9
    assert r["micro"]["f1"] >= 0.85 and all(d["specificity"] >= 0.98 for d in r["per_finding"].values())
