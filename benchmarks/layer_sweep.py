"""Default layer sweep vs the plain per-(layer, position) loop (ROME's causal_trace), in one run.

    python benchmarks/layer_sweep.py [--model organism] [--limit 2] [--towers lm,vision]

Both compute the same numbers (the max difference is printed); the loop runs one forward per
(layer, position) on [clean, 10 noised copies] with PyTorch hooks on a separately loaded,
un-instrumented copy of the model. TransformerLens's ``patching`` helpers are not timed: they
take token inputs only and cannot pass the LLaVA bridge its ``pixel_values``.
The last line is ``speedup_vs_loop: <x>`` (total loop time / total sweep time).
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from transformers import LlavaForConditionalGeneration

from interp.data.catalog import load_dataset
from interp.models import load
from interp.models.organism import LVLM_DIR
from interp.trace.patching import Noise, metric_fn, restore_sweep
from interp.trace.reference import reference_trace
from interp.trace.sweep import SweepConfig, noise_std, noised, position_groups, select_pairs


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="organism")
    p.add_argument("--limit", type=int, default=2, help="samples (default 2)")
    p.add_argument("--towers", default="lm,vision")
    args = p.parse_args()
    torch.set_num_threads(2)
    cfg = SweepConfig(model=args.model, limit=args.limit)
    adapter = load(cfg.model)
    plain = LlavaForConditionalGeneration.from_pretrained(
        LVLM_DIR if cfg.model == "organism" else cfg.model, attn_implementation="eager").eval()
    data = load_dataset(cfg.data)
    pairs = select_pairs(data, cfg)[: cfg.limit]
    batches = [adapter.encode([p.clean_image], [p.item.prompt], [p.item.spans]) for p in pairs]
    tok = adapter.tokenizer
    totals = {"sweep": 0.0, "loop": 0.0}
    print(f"model {adapter.model_id} ({adapter.weight_hash}), {len(pairs)} samples, {cfg.copies} noise copies, "
          f"torch threads {torch.get_num_threads()}")
    for tower in args.towers.split(","):
        std = cfg.noise_scale * noise_std(adapter, [(b, noised(adapter, tower, b, "image")) for b in batches])
        layers = list(range(adapter.n_layers(tower)))
        t_sweep = t_loop = diff = 0.0
        for pair, b in zip(pairs, batches):
            ids = tok.convert_tokens_to_ids([pair.item.answer, *pair.alternatives])
            metric = metric_fn(cfg.metric or "prob", ids[0], ids[1:])
            site, positions = noised(adapter, tower, b, "image")
            noise = Noise(site, tuple(positions), std, cfg.copies, cfg.seed)
            groups, _ = position_groups(adapter, tower, b, cfg)
            t = time.perf_counter()
            fast = restore_sweep(adapter, b, b, metric, tower=tower, layers=layers, groups=groups, noise=noise,
                                 batch_size=cfg.batch_size)
            t_sweep += time.perf_counter() - t
            t = time.perf_counter()
            slow, _, _ = reference_trace(plain, b.model_inputs(), int(b.answer_index[0]), metric, tower=tower,
                                         layers=layers, groups=groups, noise=noise)
            t_loop += time.perf_counter() - t
            diff = max(diff, float(np.abs(fast.restored - slow).max()))
        totals["sweep"] += t_sweep
        totals["loop"] += t_loop
        print(f"{tower:>6}: {len(layers)} layers x {len(groups)} positions  sweep {t_sweep:7.2f} s  "
              f"loop {t_loop:7.2f} s  ratio {t_loop / t_sweep:5.1f}x  max |diff| {diff:.1e}")
    print(f"speedup_vs_loop: {totals['loop'] / totals['sweep']:.1f}")


if __name__ == "__main__":
    main()
