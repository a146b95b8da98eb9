"""Phantom renderer against its own ground truth; image loading."""

import json
from dataclasses import replace

import numpy as np
import pytest

from interp.data import (
    CONCEPTS,
    FINDINGS,
    SEVERITIES,
    Finding,
    PhantomSpec,
    load_image,
    render,
    sample_spec,
)
from interp.errors import InterpError

FORCED = {
    "pleural_effusion": [Finding("pleural_effusion", s, "lower", v) for s in ("left", "right") for v in SEVERITIES],
    "pneumothorax": [Finding("pneumothorax", s, "upper", v) for s in ("left", "right") for v in SEVERITIES],
    "consolidation": [Finding("consolidation", s, z, "moderate") for s in ("left", "right") for z in ("upper", "middle", "lower")],
    "nodule": [Finding("nodule", s, z, v) for s, z, v in [("left", "upper", "small"), ("right", "middle", "small"), ("left", "lower", "large")]],
    "cardiomegaly": [Finding("cardiomegaly", None, None, v) for v in SEVERITIES],
}


def _with(spec: PhantomSpec, f: Finding) -> PhantomSpec:
    """`spec` with `f` replacing any instance of the same finding."""
    return replace(spec, findings=spec.without(f.name).findings + (f,))


@pytest.fixture(scope="module")
def specs():
    rng = np.random.default_rng(7)
    return [sample_spec(rng, prevalence=0.6, confounder_rate=0.5) for _ in range(6)]


@pytest.mark.parametrize("name", FINDINGS)
def test_counterfactual_is_exact_outside_the_mask(specs, name):
    for i, f in enumerate(FORCED[name]):
        spec = _with(specs[i % len(specs)], f)
        ph, cf = render(spec, seed=i), render(spec.without(name), seed=i)
        m = ph.finding_masks[name]
        assert m.any()
        assert np.array_equal(ph.image[~m], cf.image[~m]), f"{f} leaks outside its mask"
        diff = np.abs(ph.image - cf.image)[m]
        assert (diff > 0).mean() > 0.9, f"{f}: mask pixels that do not change"
        assert diff.mean() > 0.08, f"{f} is faint: mean change {diff.mean():.3f}"
        assert name not in cf.finding_masks


def test_chest_tube_counterfactual(specs):
    spec = replace(specs[0], confounders=("chest_tube",))
    ph, cf = render(spec, 3), render(spec.without("chest_tube"), 3)
    m = ph.confounder_masks["chest_tube"]
    assert m.sum() > 20 and np.array_equal(ph.image[~m], cf.image[~m])
    assert not cf.confounder_masks


def test_determinism_and_value_range(specs):
    a, b, c = render(specs[1], 5), render(specs[1], 5), render(specs[1], 6)
    assert np.array_equal(a.image, b.image)
    assert not np.array_equal(a.image, c.image)
    assert a.image.dtype == np.float32 and a.image.shape == (64, 64)
    assert 0.0 <= a.image.min() and a.image.max() <= 1.0
    assert render(specs[1], 5, size=96).image.shape == (96, 96)


def test_masks_nonempty_and_inside_body(specs):
    for i, spec in enumerate(specs):
        ph = render(spec, i)
        assert set(ph.concept_masks) == set(CONCEPTS)
        body = ph.concept_masks["body"]
        for name, m in {**ph.concept_masks, **ph.finding_masks}.items():
            assert m.dtype == bool and m.any(), name
            assert not (m & ~body).any(), f"{name} outside the body"


def test_laterality_convention_patient_left_is_image_right(specs):
    w = 64
    for i, spec in enumerate(specs):
        for side in ("left", "right"):
            ph = render(_with(spec, Finding("pleural_effusion", side, "lower", "large")), i)
            cols = np.nonzero(ph.finding_masks["pleural_effusion"])[1]
            assert (cols >= w / 2).all() if side == "left" else (cols < w / 2).all()
            lung = np.nonzero(ph.concept_masks[f"lung_{side}"])[1]
            assert (lung.mean() > w / 2) == (side == "left")


def test_nodule_lies_in_its_zone(specs):
    for i, spec in enumerate(specs):
        for z in ("upper", "middle", "lower"):
            f = Finding("nodule", "right", z, "small")
            ph = render(_with(spec, f), i)
            m = ph.finding_masks["nodule"]
            assert (m & ph.concept_masks[f"lung_right_{z}"]).sum() > 0.5 * m.sum(), z


def _ctr(ph) -> float:
    heart = np.nonzero(ph.concept_masks["heart"])[1]
    lungs = np.nonzero(ph.concept_masks["lung_left"] | ph.concept_masks["lung_right"])[1]
    return (heart.max() - heart.min() + 1) / (lungs.max() - lungs.min() + 1)


def test_cardiomegaly_enlarges_the_heart(specs):
    for i, spec in enumerate(specs):
        normal = render(spec.without("cardiomegaly"), i)
        big = render(_with(spec, Finding("cardiomegaly", None, None, "small")), i)
        assert _ctr(normal) < 0.52 and _ctr(big) > 0.55, (_ctr(normal), _ctr(big))


@pytest.mark.parametrize("rate", [0.1, 0.5, 0.9])
def test_confounder_rate(rate):
    rng = np.random.default_rng(1)
    s = [sample_spec(rng, 0.5, rate) for _ in range(2000)]
    eff = np.array([x.has("pleural_effusion") for x in s])
    tube = np.array([x.has("chest_tube") for x in s])
    assert abs(tube[eff].mean() - rate) < 0.05 and abs(tube[~eff].mean() - (1 - rate)) < 0.05
    assert not any(x.confounders for x in [sample_spec(rng) for _ in range(50)])


def test_prevalence_and_spec_round_trip():
    rng = np.random.default_rng(2)
    s = [sample_spec(rng, 0.3, 0.7) for _ in range(500)]
    assert abs(np.mean([x.has("nodule") for x in s]) - 0.3) < 0.06
    for x in s[:50]:
        assert PhantomSpec.from_dict(json.loads(json.dumps(x.to_dict()))) == x


def test_bad_input_is_an_interp_error():
    with pytest.raises(InterpError, match="unknown finding"):
        Finding("edema", "left", "lower", "small")
    with pytest.raises(InterpError):
        Finding("pleural_effusion", "left", "upper", "small")  # effusion lives at the base
    with pytest.raises(InterpError):
        Finding("cardiomegaly", "left", None, "small")
    with pytest.raises(InterpError, match="unknown finding"):
        sample_spec(np.random.default_rng(0)).without("tumour")
    with pytest.raises(InterpError, match="malformed"):
        PhantomSpec.from_dict({"findings": []})


def test_load_image_png_dicom_and_errors(tmp_path):
    from PIL import Image

    arr = (np.arange(64 * 32).reshape(32, 64) % 251).astype(np.uint8)
    Image.fromarray(arr).save(tmp_path / "x.png")
    img = load_image(tmp_path / "x.png")
    assert img.dtype == np.float32 and img.shape == (32, 64) and img.min() == 0 and img.max() == 1
    assert np.array_equal(np.argsort(img.ravel(), kind="stable"), np.argsort(arr.ravel(), kind="stable"))

    (tmp_path / "notes.png").write_text("not an image")
    with pytest.raises(InterpError, match="unreadable image"):
        load_image(tmp_path / "notes.png")
    with pytest.raises(InterpError, match="unreadable image"):
        load_image(tmp_path / "missing.dcm")


def test_load_dicom_monochrome1_is_inverted(tmp_path):
    pydicom = pytest.importorskip("pydicom")
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1"
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    px = np.array([[0, 100], [200, 300]], np.uint16)
    ds.Rows, ds.Columns = px.shape
    ds.SamplesPerPixel, ds.BitsAllocated, ds.BitsStored, ds.HighBit = 1, 16, 16, 15
    ds.PixelRepresentation = 0
    ds.RescaleSlope, ds.RescaleIntercept = 2, -10
    ds.PixelData = px.tobytes()
    for photometric, expect in [("MONOCHROME2", [[0, 1 / 3], [2 / 3, 1]]), ("MONOCHROME1", [[1, 2 / 3], [1 / 3, 0]])]:
        ds.PhotometricInterpretation = photometric
        path = tmp_path / f"{photometric}.dcm"
        pydicom.dcmwrite(path, ds, enforce_file_format=True)
        np.testing.assert_allclose(load_image(path), expect, atol=1e-6)
