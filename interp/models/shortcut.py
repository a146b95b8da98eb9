"""How far an LVLM organism answers a presence question from a confounder instead of the lesion.

Each fresh test phantom has the finding and a chest tube; it is rendered in four exact
counterfactual variants (finding and tube each kept or removed, same render seed), and the
direct-mode question "is there a {finding} ?" is asked about every variant.
"""

from __future__ import annotations

import numpy as np
import torch

from interp.data.phantom import CONFOUNDERS, FINDINGS, render, sample_spec
from interp.data.vqa import SPLITS, VQADataset, items_for
from interp.errors import InterpError
from interp.models.train import N_PATCHES, normalise

#: the four cells: whether each variant keeps (the finding, the tube)
CELLS = {"present/tube": (True, True), "present/no_tube": (True, False),
         "absent/tube": (False, True), "absent/no_tube": (False, False)}


def shortcut_specs(n_images: int, seed: int, finding: str = "pneumothorax") -> VQADataset:
    """``n_images`` fresh test-split specs that all have ``finding`` and a chest tube (no items)."""
    if n_images < 1:
        raise InterpError(f"n_images must be >= 1, got {n_images}")
    if finding not in FINDINGS:
        raise InterpError(f"unknown finding {finding!r}; valid: {', '.join(FINDINGS)}")
    rng = np.random.default_rng([seed, SPLITS.index("test"), 1])  # not build_vqa's stream: no image shared
    specs = []
    while len(specs) < n_images:
        spec = sample_spec(rng, confounder_rate=1.0, confounded=finding)  # every image with the finding has a tube
        if spec.has(finding):
            specs.append(spec)
    return VQADataset(seed, "test", 64, specs, [])


@torch.no_grad()
def shortcut_table(model, tok, n_images: int = 200, seed: int = 12345, finding: str = "pneumothorax",
                   batch: int = 128) -> dict:
    """p(yes) and accuracy per cell of ``CELLS``, the shortcut effect (p(yes) of absent/tube minus
    absent/no_tube) and, of the images answered "yes" with both present, the shares whose answer each
    removal keeps or flips."""
    tube = CONFOUNDERS[0]
    ds = shortcut_specs(n_images, seed, finding)
    item = next(it for it in items_for(0, "test", ds.specs[0], ("presence",), ("direct",)) if it.finding == finding)
    prompt = [tok.bos_token_id] + [model.config.image_token_id] * N_PATCHES + tok.convert_tokens_to_ids(item.prompt.split())
    yes = tok.convert_tokens_to_ids("yes")
    model.eval()
    p_yes, says_yes = {}, {}
    for cell, (keep_finding, keep_tube) in CELLS.items():
        specs = [s if keep_finding else s.without(finding) for s in ds.specs]
        specs = [s if keep_tube else s.without(tube) for s in specs]
        px = normalise(np.stack([render(s, ds.image_seed(i), ds.image_size).image for i, s in enumerate(specs)]))
        logits = torch.cat([model(input_ids=torch.tensor([prompt] * len(chunk)), pixel_values=chunk).logits[:, -1]
                            for chunk in px.split(batch)])
        p_yes[cell] = logits.softmax(-1)[:, yes].numpy()
        says_yes[cell] = (logits.argmax(-1) == yes).numpy()
    cells = {c: {"p_yes": round(float(p_yes[c].mean()), 4),
                 "acc": round(float((says_yes[c] == c.startswith("present")).mean()), 4), "n": n_images} for c in CELLS}
    hit = says_yes["present/tube"]
    n_hit = int(hit.sum())

    def share(flags: np.ndarray) -> float | None:
        return round(float(flags[hit].mean()), 4) if n_hit else None

    return {
        "finding": finding, "confounder": tube, "split": "test", "seed": seed, "n": n_images,
        "prompt": item.prompt, "cells": cells,
        "shortcut_effect": round(float(p_yes["absent/tube"].mean() - p_yes["absent/no_tube"].mean()), 4),
        "causal": {"n": n_hit,  # images with both answered "yes"; the shares below are of these
                   "lesion_removed_keeps_yes": share(says_yes["absent/tube"]),  # shortcut-causal
                   "tube_removed_flips_to_no": share(~says_yes["present/no_tube"]),
                   "lesion_removed_flips_to_no": share(~says_yes["absent/tube"]),  # lesion-causal
                   # both: the answer follows the tube alone (the shortcut verdict of interp.evaluate.counterfactual)
                   "follows_tube_alone": share(says_yes["absent/tube"] & ~says_yes["present/no_tube"])},
    }


def format_shortcut(t: dict) -> str:
    """The table as text: one line per cell, then the shortcut effect and the causal shares."""
    lines = [f"{t['finding']} presence (direct), {t['n']} test phantoms x 4 counterfactual renders, seed {t['seed']}",
             f"{t['finding'] + ' / ' + t['confounder']:<30}{'p(yes)':>8}{'acc':>8}"]
    lines += [f"{c:<30}{r['p_yes']:>8.3f}{r['acc']:>8.3f}" for c, r in t["cells"].items()]
    c = t["causal"]
    lines.append(f"shortcut effect p(yes | absent, tube) - p(yes | absent, no tube): {t['shortcut_effect']:+.3f}")
    lines.append(f"of {c['n']} present+tube images answered yes: lesion removed keeps yes (shortcut-causal) "
                 f"{c['lesion_removed_keeps_yes']}, tube removed flips to no {c['tube_removed_flips_to_no']}, "
                 f"both (answer follows the tube alone) {c['follows_tube_alone']}, lesion removed flips to no "
                 f"(lesion-causal) {c['lesion_removed_flips_to_no']}")
    return "\n".join(lines)
