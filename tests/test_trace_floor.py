"""Exact sweeps at the FLOP floor (``interp.trace.floor``) against the plain loops and the generic path."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

from interp.trace import floor
from interp.trace.floor import CausalLM
from interp.trace.patching import Noise, metric_fn, restore_sweep
from interp.trace.reference import reference_trace


@pytest.fixture(scope="module")
def metric(tiny_adapter):
    ids = tiny_adapter.tokenizer.convert_tokens_to_ids(["yes", "no"])
    return metric_fn("logit_diff", ids[0], ids[1:])


def generic(monkeypatch, *args, **kwargs):
    """restore_sweep on the generic path (every restored run a full adapter forward)."""
    with monkeypatch.context() as m:
        m.setattr(CausalLM, "of", classmethod(lambda cls, adapter, batch: None))
        return restore_sweep(*args, **kwargs)


def test_floor_path_is_taken(tiny_adapter, one):
    lm = CausalLM.of(tiny_adapter, one)
    assert lm is not None and lm.n == tiny_adapter.n_layers("lm")
    logits, cache = tiny_adapter.run(one, read=["lm.embed", "lm.blocks.*.resid_post"])
    states = [cache["lm.embed"], *cache.stack("lm.blocks.*.resid_post")]
    answer = int(one.answer_index[0])
    expected = tiny_adapter.readout(logits, one)
    assert lm.corrupted(states, one.attention_mask, answer, expected) is not None
    assert lm.corrupted(states, one.attention_mask, answer, expected + 1) is None  # a path that disagrees is refused
    assert lm.config._attn_implementation == "eager"  # SDPA only while the floor path runs
    assert CausalLM.of(tiny_adapter, replace(one, inputs={**one.inputs, "position_ids": torch.arange(one.input_ids.shape[1])[None]})) is None


@pytest.fixture(scope="module")
def lm_cells(tiny_adapter, one, metric):
    """Every LM layer x positions every third, a group of scattered positions and groups at the answer, and
    ROME's loop on them."""
    n = one.input_ids.shape[1]
    kw = dict(tower="lm", layers=range(tiny_adapter.n_layers("lm")), noise=Noise("lm.embed", tuple(one.positions[0].spans["image"]), std=0.8, copies=4, seed=3),
              groups=[[p] for p in range(0, n, 3)] + [[1, 2, 9], [n - 1], [n - 2, n - 1]])
    return kw, reference_trace(tiny_adapter.model, one.model_inputs(), int(one.answer_index[0]), metric, **kw)


@pytest.mark.parametrize("batch_size,waste", [(4, 0.0), (64, 0.25), (1000, 1.0)])
def test_lm_cells_match_rome_loop(tiny_adapter, one, metric, lm_cells, monkeypatch, batch_size, waste):
    """Every LM cell (free last-layer cells and cells after the answer included), however cells share batches."""
    monkeypatch.setattr(floor, "WASTE", waste)
    (kw, (ref, clean, corrupted)), n = lm_cells, one.input_ids.shape[1]
    groups = kw["groups"]
    got = restore_sweep(tiny_adapter, one, one, metric, batch_size=batch_size, **kw)
    np.testing.assert_allclose(got.restored, ref, atol=2e-6)
    assert got.clean == pytest.approx(clean, abs=1e-6) and got.corrupted == pytest.approx(corrupted, abs=1e-6)
    on = np.array([n - 1 in g for g in groups])  # the last block's output restored at the answer: the clean run
    np.testing.assert_allclose(got.restored[-1, on], clean, atol=2e-6)
    np.testing.assert_allclose(got.restored[-1, ~on], corrupted, atol=1e-6)  # ... elsewhere: nothing


@pytest.mark.parametrize("point", ["resid_pre", "resid_post", "attn.out", "mlp.out"])
@pytest.mark.parametrize("window", [1, 3])
def test_points_and_windows_match_generic_path(tiny_adapter, tiny_images, metric, monkeypatch, point, window):
    """Paired inputs, every point and ROME windows: the floor path against full restored forwards."""
    clean = tiny_adapter.encode([tiny_images[0]], ["the costophrenic angles are not sharp . answer :"])
    corrupt = tiny_adapter.encode([tiny_images[1]], ["the costophrenic angles are sharp . . answer :"])
    n = clean.input_ids.shape[1]
    kw = dict(tower="lm", layers=range(tiny_adapter.n_layers("lm")), groups=[[p] for p in range(0, n, 4)] + [[60, 66, n - 1]],
              point=point, window=window, batch_size=16)
    got = restore_sweep(tiny_adapter, clean, corrupt, metric, **kw)
    want = generic(monkeypatch, tiny_adapter, clean, corrupt, metric, **kw)
    np.testing.assert_allclose(got.restored, want.restored, atol=2e-6)
    assert np.ptp(want.restored) > 1e-3


def test_vision_cells_match_generic_path(tiny_adapter, one, metric, monkeypatch):
    """Vision restores: the tower as it is, the LM from its first changed input (CLS at the last layer: none)."""
    noise = Noise("vision.embed", tuple(range(1, 1 + tiny_adapter.n_patches)), std=0.5, copies=3, seed=1)
    kw = dict(tower="vision", layers=range(tiny_adapter.n_layers("vision")), groups=[[p] for p in range(0, 65, 4)] + [[64]],
              noise=noise, batch_size=10)
    got = restore_sweep(tiny_adapter, one, one, metric, **kw)
    want = generic(monkeypatch, tiny_adapter, one, one, metric, **kw)
    np.testing.assert_allclose(got.restored, want.restored, atol=2e-6)
    assert got.restored[-1, 0] == pytest.approx(got.corrupted, abs=1e-6)  # CLS is not an LM input


def test_clean_into_itself(tiny_adapter, one, metric):
    """A clean run restored into itself changes nothing: every cell is the clean metric."""
    got = restore_sweep(tiny_adapter, one, one, metric, tower="lm", layers=[0, 2], groups=[[0], [5], [70]])
    np.testing.assert_allclose(got.restored, got.clean, atol=1e-6)


@pytest.mark.parametrize("family,floored", [("idefics3", True), ("gemma3", False)])
def test_other_families(family, floored, tmp_path, monkeypatch):
    """Idefics3 (a Llama LM) runs at the floor with the generic path's numbers; Gemma 3 (sliding windows,
    image tokens attending both ways) keeps the generic path."""
    import importlib

    from interp.models import load

    adapter = load(getattr(importlib.import_module(f"interp.models.{family}"), f"save_tiny_{family}")(tmp_path, seed=0))
    batch = adapter.encode([np.random.default_rng(0).random((32, 32), dtype=np.float32)], ["is there a effusion ?"])
    assert (CausalLM.of(adapter, batch) is not None) == floored
    n = batch.input_ids.shape[1]
    kw = dict(tower="lm", layers=range(adapter.n_layers("lm")), groups=[[p] for p in range(0, n, 2)],
              noise=Noise("lm.embed", tuple(batch.positions[0].spans["image"]), std=1.0, copies=2, seed=0))
    metric = metric_fn("logprob", 1, [])
    got = restore_sweep(adapter, batch, batch, metric, **kw)
    np.testing.assert_allclose(got.restored, generic(monkeypatch, adapter, batch, batch, metric, **kw).restored, atol=2e-6)
