"""Contract checks every family's tests run on its tiny checkpoint.

The reference for site values is plain PyTorch forward hooks on the same modules (pre-hooks for
inputs, ``prepend=True`` as shared/NOTES.md explains), independent of nnsight.
"""

from __future__ import annotations

import numpy as np
import torch

from interp.models.adapter import Batch


def plain_hook_reads(adapter, batch: Batch) -> dict[str, torch.Tensor]:
    """Every site's value from plain forward hooks on one HF forward of ``batch``."""
    got: dict[str, torch.Tensor] = {}
    handles = []
    for site, hook in adapter.hooks.items():
        module = adapter.model.get_submodule(hook.module)
        if hook.io == "input":
            def pre(_m, args, kwargs, site=site):
                got[site] = (args[0] if args else kwargs.get("hidden_states", next(iter(kwargs.values())))).detach().clone()
            handles.append(module.register_forward_pre_hook(pre, with_kwargs=True, prepend=True))
        else:
            def post(_m, _args, out, site=site, index=hook.index):
                got[site] = (out if index is None else out[index]).detach().clone()
            handles.append(module.register_forward_hook(post, prepend=True))
    try:
        with torch.no_grad():
            adapter.model(**batch.model_inputs())
    finally:
        for h in handles:
            h.remove()
    return got


def hooked_logits(adapter, batch: Batch, module: str, fn) -> torch.Tensor:
    """Logits of a plain HF forward with a plain forward hook (prepended) applying ``fn`` to ``module``'s output."""
    h = adapter.model.get_submodule(module).register_forward_hook(lambda m, a, out: fn(out), prepend=True)
    try:
        with torch.no_grad():
            return adapter.model(**batch.model_inputs()).logits
    finally:
        h.remove()


def check_sites_against_hooks(adapter, batch: Batch, atol: float = 1e-5) -> None:
    """Every site read through the adapter equals the plain-hook read within ``atol``."""
    _, ours = adapter.run(batch, read=adapter.sites)
    ref = plain_hook_reads(adapter, batch)
    assert set(ref) == set(adapter.sites)
    for site in adapter.sites:
        assert ours[site].shape == ref[site].shape, site
        torch.testing.assert_close(ours[site], ref[site], atol=atol, rtol=0, msg=site)


def check_positions(adapter, batch: Batch, images: list[np.ndarray]) -> None:
    """Typed positions: one per token; image tokens (and only they) carry boxes inside the input image
    (query tokens none); the ``image`` span lists the image/query tokens."""
    for row, (p, ids, img) in enumerate(zip(batch.positions, batch.input_ids, images)):
        assert len(p) == len(ids) == len(p.boxes) == len(p.groups)
        h, w = img.shape[:2]
        for k, box in zip(p.kinds, p.boxes):
            if k == "image":
                y0, x0, y1, x1 = box
                assert 0 <= y0 < y1 <= h + 1e-6 and 0 <= x0 < x1 <= w + 1e-6, box
            else:
                assert box is None or k == "special", (k, box)
        assert p.spans["image"] == [i for i, k in enumerate(p.kinds) if k in ("image", "query")]
        assert p.kinds[batch.answer_index[row]] != "pad"


def check_cache_api(adapter, batch: Batch) -> None:
    """Globs, (point, layer) indexing, layer stacking, span selection and gradient reads."""
    _, cache = adapter.run(batch, read="lm.blocks.*.resid_post")
    n = adapter.n_layers("lm")
    assert list(cache) == [f"lm.blocks.{l}.resid_post" for l in range(n)]
    assert torch.equal(cache["resid_post", n - 1, "lm"], cache[f"lm.blocks.{n - 1}.resid_post"])
    assert cache.stack("lm.blocks.*.resid_post").shape[0] == n
    assert [v.shape[0] for v in cache.select("lm.blocks.0.resid_post", "image")] == [len(p.spans["image"]) for p in batch.positions]
    target = int(adapter.readout(adapter.run(batch)[0], batch)[0].argmax())
    _, g = adapter.run(batch, read=["lm.blocks.0.resid_post"], backward=lambda z: z[:, target])
    assert g.grads["lm.blocks.0.resid_post"].shape == cache["lm.blocks.0.resid_post"].shape
    assert g.grads["lm.blocks.0.resid_post"].abs().sum() > 0
