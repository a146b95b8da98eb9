"""Where the LVLM organism's zone answers go wrong: direct-mode zone accuracy by how far the finding's
centre (its mask's centroid row) lies from the nearest boundary of its zone, in the phantom's
normalised height units (the lung spans ~0.5; a patch is 0.125).

    python experiments/zone_errors.py                 # -> reports/zone_errors.json
    python experiments/zone_errors.py --model organism-v1 --images 200

Ground truth is the phantom: the spec's zone, the rendered mask and the patient's own zone rows
(``_Geometry.zone_rows``, the same rows the zone concept masks are cut at).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from interp.data.phantom import _Geometry
from interp.data.vqa import build_vqa
from interp.models import load
from interp.models.train import N_PATCHES, normalise

BINS = (0.0, 0.02, 0.04, 0.06, 0.1, np.inf)


def boundary_distance(spec, finding, mask: np.ndarray) -> float:
    """Distance of the mask's centroid row from the nearest inner boundary of the finding's zone
    (negative: outside its zone)."""
    g = _Geometry(spec.anatomy, mask.shape[0])
    v = float(g.v[mask].mean())
    _, z1, z2, _ = g.zone_rows(finding.side)
    lo, hi = {"upper": (-np.inf, z1), "middle": (z1, z2), "lower": (z2, np.inf)}[finding.zone]
    return min(v - lo, hi - v)


@torch.no_grad()
def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="organism")
    p.add_argument("--images", type=int, default=400, help="test phantoms (seed --seed)")
    p.add_argument("--seed", type=int, default=12345)
    p.add_argument("--out", default="reports/zone_errors.json")
    a = p.parse_args()
    torch.set_num_threads(1)
    adapter = load(a.model, kind="lvlm")
    model, tok = adapter.model, adapter.tokenizer
    ds = build_vqa(a.images, a.seed, "test", kinds=("zone",), modes=("direct",))
    vocab = tok.get_vocab()
    rows = []
    for b in range(0, len(ds.items), 64):
        chunk = ds.items[b:b + 64]
        ids = torch.tensor([[tok.bos_token_id] + [model.config.image_token_id] * N_PATCHES
                            + [vocab[w] for w in it.prompt.split()] for it in chunk])
        pix = normalise(np.stack([ds.image(it.image) for it in chunk]))
        pred = tok.convert_ids_to_tokens(model(input_ids=ids, pixel_values=pix).logits[:, -1].argmax(-1).tolist())
        for it, word in zip(chunk, pred):
            spec = ds.specs[it.image]
            f = spec.get(it.finding)
            rows.append((word == it.answer, boundary_distance(spec, f, ds.phantom(it.image).finding_masks[f.name])))
    ok, dist = np.array([r[0] for r in rows]), np.array([r[1] for r in rows])
    bins = []
    for lo, hi in zip((-np.inf, *BINS[:-1]), BINS):
        sel = (dist >= lo) & (dist < hi)
        bins.append({"from": float(lo) if np.isfinite(lo) else None, "to": float(hi) if np.isfinite(hi) else None,
                     "n": int(sel.sum()), "accuracy": float(ok[sel].mean()) if sel.any() else None})
    result = {"model": a.model, "images": a.images, "seed": a.seed, "questions": len(rows),
              "accuracy": float(ok.mean()), "by_boundary_distance": bins}
    print(f"{a.model}: zone (direct) accuracy {ok.mean():.3f} on {len(rows)} questions ({a.images} test phantoms)")
    for b in bins:
        if b["n"]:
            lo, hi = ("-inf" if b["from"] is None else b["from"]), ("inf" if b["to"] is None else b["to"])
            print(f"  centre {lo} to {hi} from its zone's nearest boundary (< 0: outside it): n {b['n']:>3}, "
                  f"accuracy {b['accuracy']:.3f}")
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(result, indent=1))
    print(f"figures: {a.out}")


if __name__ == "__main__":
    main()
