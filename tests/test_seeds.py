"""Library code leaves the caller's random state alone: seeded builders run on a forked generator."""

from __future__ import annotations

import pytest
import torch

from interp.models.tiny import BUILDERS, build_tiny


def _draw_after(fn) -> float:
    torch.manual_seed(123)
    fn()
    return float(torch.rand(1))


@pytest.mark.parametrize("family", ["llava", "clip", "gemma3", "blip-2", "llava_next"])
def test_builders_do_not_reseed_the_caller(family, tmp_path):
    assert family in BUILDERS
    torch.manual_seed(123)
    expected = float(torch.rand(1))
    assert _draw_after(lambda: build_tiny(family, tmp_path / family)) == expected


def test_scaled_lora_does_not_reseed_the_caller():
    from interp.models.clip import build_clip_organism
    from interp.nast.lora import apply_scaled_lora

    model, _ = build_clip_organism(0)
    torch.manual_seed(123)
    expected = float(torch.rand(1))
    assert _draw_after(lambda: apply_scaled_lora(model, None, 1.0, rank=2, seed=7)) == expected
