"""Layer sweeps: the exact sweep at its FLOP floor and AtP* against per-cell loops, on the organism and on a
larger random model of the same family (vision 6 x 256 at 224 px, LM 8 x 512), in one run.

    python benchmarks/layer_sweep.py [--samples 2] [--repeats 3] [--large-repeats 1] [--models organism,large]
                                     [--organism organism] [--noise-scale 3] [--second-scale 0.3]
                                     [--json reports/bench/layer_sweep.json]

ROME tracing with the image corrupted (LM tower: noise on the LM's image tokens; vision tower: on the patch
embeddings; 10 noised copies, ``--noise-scale`` x the noised values' std), every layer x every position, per tower:
- loop: ROME's per-cell loop with PyTorch hooks (``interp.trace.reference.reference_trace``), one forward of
  [clean, copies] per cell, on an un-instrumented model;
- nnsight: the same loop with one plain-nnsight trace per cell (nnsight cannot batch LLaVA invokes);
- exact: ``restore_sweep`` (``interp.trace.floor`` on causal LMs: prefix reuse, answer-only last block, SDPA;
  the vision tower as it is); the same numbers as the loop (max |diff| printed);
- atp: ``atp_sweep`` (AtP* with the QK fix and GradDrop: one forward and backward, the LM called block by block
  up to the answer; GradDrop's partial backwards only through the blocks between a dropped block and a cell);
- atp1: the same without GradDrop (the strength is then |estimate|).
One torch thread, timed in process CPU time (time slices other work takes on a shared machine do not
count); each repeat runs every method once, in turn; medians over repeats. FLOPs are counted
(``figures.count_flops``). The FLOP floor is the exact sweep's count with no batch sharing a prefix across
cells (``floor.WASTE = 0``), timed at the loop's own FLOP rate: floor_share = that time / the exact sweep's.
On the larger model the loops time ``--loop-cells`` cells (a forward each) and the exact sweep every
layer at ``--large-positions`` positions (the centres of equal bins: its cost per position falls
linearly towards the answer) over its clean and corrupted runs (timed alone too); both are scaled to
every cell. AtP* runs every cell. Agreement of AtP* with exact patching (organism, samples whose corruption moves p(answer)
by >= 0.1): Spearman of signed effects and of |exact| vs GradDrop strength, top-10 recall; the same at
``--second-scale`` x the std (same samples, not timed): a first-order estimate must meet the exact sweep as the
noise shrinks, so the gap between the two scales is the corruption's nonlinearity. ``--organism``: an alias or
folder of the organism (default: the embedded one).
Last lines (organism): ``lm_speedup_vs_loop``, ``vision_speedup_vs_loop``, ``atp_speedup_vs_exact`` (both
towers) and ``floor_share`` (the lower of the two towers).
"""

from __future__ import annotations

import argparse
import copy
import time
from typing import Callable, Sequence

import numpy as np
import torch
from figures import count_flops, write_figures
from nnsight import NNsight
from transformers import LlavaForConditionalGeneration, LlavaProcessor

from interp.data.catalog import load_dataset
from interp.models import load
from interp.models.llava import LlavaAdapter
from interp.models.organism import CHAT_TEMPLATE, image_processor, organism_config, organism_tokenizer
from interp.models.registry import ALIASES
from interp.report.sweep import agreement
from interp.trace import floor
from interp.trace.atp import atp_sweep
from interp.trace.patching import Metric, Noise, metric_fn, restore_sweep
from interp.trace.reference import reference_trace
from interp.trace.sweep import SweepConfig, noise_std, noised, position_groups, select_pairs

METHODS = ("loop", "nnsight", "exact", "atp", "atp1")  # atp1: AtP with the QK fix, no GradDrop (one backward)
MIN_GAP = 0.1
TRACE = dict(mode="trace", corrupt="image", data="phantom-test")  # ROME tracing, image noised (not the CLI's defaults)


def nnsight_trace(model: NNsight, inputs: dict[str, torch.Tensor], answer: int, metric: Metric, *, tower: str,
                  layers: list[int], groups: list[list[int]], noise: Noise) -> np.ndarray:
    """ROME's loop with one plain-nnsight trace per (layer, group) on [clean, noised x copies]."""
    rows = 1 + noise.copies
    batch = {k: v.expand(rows, *v.shape[1:]).clone() for k, v in inputs.items()}
    pos = list(noise.positions)
    lm = tower == "lm"
    blocks = model.model.language_model.layers if lm else model.model.vision_tower.encoder.layers
    d = model.model.language_model.config.hidden_size if lm else model.model.vision_tower.config.hidden_size
    eps = noise.sample(d, torch.float32)

    def run(layer: int, g: list[int]) -> float:
        with torch.no_grad(), model.trace(**batch):
            h = model.model.language_model.layers[0].input if lm else model.model.vision_tower.embeddings.output
            h[1:, pos] += eps
            out = blocks[layer].output
            out[1:, g] = out[0, g]
            logits = model.output.logits.save()
        return float(metric(logits[:, answer])[1:].mean())

    return np.array([[run(layer, g) for g in groups] for layer in layers])


def large_model(seed: int = 0) -> tuple[LlavaForConditionalGeneration, LlavaProcessor]:
    """A random LLaVA of the organism's family: vision 6 x 256 (224 px, 14 px patches), LM 8 x 512, eager attention."""
    tok = organism_tokenizer()
    cfg = organism_config(len(tok), d_vision=256, n_vision=6, d_lm=512, n_lm=8)
    cfg.vision_config.image_size, cfg.vision_config.patch_size = 224, 14
    cfg.text_config.max_position_embeddings = 512
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(cfg)
    model.set_attn_implementation("eager")
    processor = LlavaProcessor(image_processor=image_processor(224), tokenizer=tok, patch_size=14,
                               vision_feature_select_strategy="default", num_additional_image_tokens=1,
                               chat_template=CHAT_TEMPLATE)
    return model.eval(), processor


def subset(items: list, k: int) -> list:
    """The items at the centres of ``k`` equal bins (all when ``k`` covers them): an exact sweep's cost per
    position falls linearly towards the answer, so the centres average it."""
    return items if k >= len(items) else [items[int((i + 0.5) * len(items) / k)] for i in range(k)]


def bench_model(name: str, adapter, plain: torch.nn.Module, wrapped: NNsight, pairs, args, repeats: int,
                full: bool) -> dict:
    """Time and count every method on every tower of one model over ``pairs`` (``full``: every cell; else the
    subsets, scaled to every cell); per tower: the figures."""
    cfg = SweepConfig(**TRACE, limit=len(pairs))
    batches = [adapter.encode([p.clean_image], [p.item.prompt], [p.item.spans]) for p in pairs]
    timed = (*METHODS, *(() if full else ("fixed",)))  # fixed: the exact sweep's clean and corrupted runs alone
    out = {}
    for tower in ("lm", "vision"):
        sigma = noise_std(adapter, [(b, noised(adapter, tower, b, "image")) for b in batches])
        std = args.noise_scale * sigma
        layers = list(range(adapter.n_layers(tower)))
        jobs: dict[str, list[Callable]] = {m: [] for m in timed}
        cells = dict.fromkeys(timed, 0)
        total, checks = 0, []
        for b, metric, groups, kw in _sweeps(adapter, tower, pairs, batches, cfg, std):
            answer, inputs = int(b.answer_index[0]), b.model_inputs()
            some = groups if full else subset(groups, args.large_positions)
            loop_layers, loop_groups = (layers, groups) if full else (subset(layers, 1), subset(groups, args.loop_cells))
            total += len(layers) * len(groups)
            jobs["loop"].append(lambda kw=kw, m=metric, i=inputs, a=answer, l=loop_layers, g=loop_groups:
                                reference_trace(plain, i, a, m, layers=l, groups=g, **kw))
            jobs["nnsight"].append(lambda kw=kw, m=metric, i=inputs, a=answer, l=loop_layers, g=loop_groups:
                                   nnsight_trace(wrapped, i, a, m, layers=l, groups=g, **kw))
            jobs["exact"].append(lambda kw=kw, m=metric, b=b, g=some: restore_sweep(adapter, b, b, m, layers=layers, groups=g, **kw))
            jobs["atp"].append(lambda kw=kw, m=metric, b=b, g=groups: atp_sweep(adapter, b, b, m, layers=layers, groups=g, **kw))
            jobs["atp1"].append(lambda kw=kw, m=metric, b=b, g=groups:
                                atp_sweep(adapter, b, b, m, layers=layers, groups=g, graddrop=False, **kw))
            if not full:
                jobs["fixed"].append(lambda kw=kw, m=metric, b=b: restore_sweep(adapter, b, b, m, layers=[], groups=[[0]], **kw))
            for m, n in (("loop", len(loop_layers) * len(loop_groups) + 1), ("nnsight", len(loop_layers) * len(loop_groups)),
                         ("exact", len(layers) * len(some)), ("atp", len(layers) * len(groups)),
                         ("atp1", len(layers) * len(groups))):
                cells[m] += n
            checks.append((loop_layers, loop_groups, layers, some))

        def run(m: str) -> list:
            return [fn() for fn in jobs[m]]

        times: dict[str, list[float]] = {m: [] for m in timed}
        results: dict[str, list] = {}
        for _ in range(repeats):
            for m in timed:
                t = time.process_time()
                results[m] = run(m)
                times[m].append(time.process_time() - t)
        flops = {m: float(count_flops(lambda m=m: run(m))) for m in timed}
        old, floor.WASTE = floor.WASTE, 0.0  # the floor: no batch recomputes a position it could have reused
        try:
            flops["floor"] = float(count_flops(lambda: run("exact")))
        finally:
            floor.WASTE = old
        seconds = {m: float(np.median(times[m])) for m in timed}

        def every(m: str, x: dict) -> float:
            """``x[m]`` (time or FLOPs of the cells run) for every cell of the tower: the loop costs one forward
            per cell plus one per sample, nnsight one per cell, the exact sweep its fixed runs plus per cell."""
            if m == "loop":
                return x[m] * (total + len(pairs)) / cells[m]
            if m == "nnsight":
                return x[m] * total / cells[m]
            if m in ("exact", "floor") and not full:
                return x["fixed"] + (x[m] - x["fixed"]) * total / cells["exact"]
            return x[m]

        scaled = {m: every(m, seconds) for m in METHODS}
        counted = {m: every(m, flops) for m in (*METHODS, "floor")}
        rate = flops["loop"] / seconds["loop"]
        row = {"cells": total, "seconds": scaled, "flops": counted, "loop_flops_per_s": rate,
               "floor_share": counted["floor"] / rate / scaled["exact"],
               "speedup_vs_loop": scaled["loop"] / scaled["exact"], "speedup_vs_nnsight": scaled["nnsight"] / scaled["exact"],
               "atp_speedup_vs_exact": scaled["exact"] / scaled["atp"], "atp1_speedup_vs_exact": scaled["exact"] / scaled["atp1"],
               "max_abs_diff_vs_loop": max(_diff(c, results, i) for i, c in enumerate(checks))}
        if full:
            row["agreement"] = _agreement(results["exact"], results["atp"])
            row["agreement_without_graddrop"] = _agreement(results["exact"], results["atp1"])
            if args.second_scale:
                second = [(restore_sweep(adapter, b, b, metric, layers=layers, groups=g, **kw),
                           atp_sweep(adapter, b, b, metric, layers=layers, groups=g, **kw))
                          for b, metric, g, kw in _sweeps(adapter, tower, pairs, batches, cfg, args.second_scale * sigma)]
                row["agreement_at_second_scale"] = {"scale": args.second_scale, **_agreement(*zip(*second), min_gap=0.0)}
        out[tower] = row
        _print_tower(name, tower, row, len(layers))
    return out


def _sweeps(adapter, tower: str, pairs: list, batches: list, cfg: SweepConfig, std: float) -> list[tuple]:
    """Per pair, a sweep of every position group of ``tower`` with noise of ``std``: (batch, metric, groups,
    keywords of ``restore_sweep`` / ``atp_sweep`` but layers and groups)."""
    out = []
    for pair, b in zip(pairs, batches):
        ids = adapter.tokenizer.convert_tokens_to_ids([pair.item.answer, *pair.alternatives])
        site, positions = noised(adapter, tower, b, "image")
        out.append((b, metric_fn("prob", ids[0], ids[1:]), position_groups(adapter, tower, b, cfg)[0],
                    dict(tower=tower, noise=Noise(site, tuple(positions), std, cfg.copies, cfg.seed))))
    return out


def _diff(check: tuple, results: dict, i: int) -> float:
    """Max |exact - loop| (on the cells both ran) and |nnsight - loop| of sample i."""
    loop_layers, loop_groups, layers, groups = check
    exact, (loop, _, _), nn = results["exact"][i], results["loop"][i], results["nnsight"][i]
    both = [(j, groups.index(g)) for j, g in enumerate(loop_groups) if g in groups]
    rows = [layers.index(l) for l in loop_layers]
    gaps = [np.abs(nn - loop).max()] + [np.abs(exact.restored[rows, k] - loop[:, j]).max() for j, k in both]
    return float(max(gaps))


def _agreement(exact: Sequence, atp: Sequence, min_gap: float = MIN_GAP) -> dict:
    """AtP* against exact patching over the samples whose corruption moves the metric by >= ``min_gap``."""
    kept = [(e, a) for e, a in zip(exact, atp) if abs(e.clean - e.corrupted) >= min_gap]
    if not kept:
        return {"samples": 0}
    width = max(e.restored.shape[1] for e, _ in kept)

    def grid(values: np.ndarray) -> np.ndarray:
        return np.pad(values, ((0, 0), (0, width - values.shape[1])), constant_values=np.nan)

    gap = [e.clean - e.corrupted for e, _ in kept]
    return agreement(np.stack([grid((e.restored - e.corrupted) / g) for (e, _), g in zip(kept, gap)]),
                     np.stack([grid((a.restored - a.corrupted) / g) for (_, a), g in zip(kept, gap)]),
                     np.stack([grid(a.magnitude / abs(g)) for (_, a), g in zip(kept, gap)]))


def _print_tower(name: str, tower: str, row: dict, n_layers: int) -> None:
    print(f"\n{name} / {tower}: {row['cells']} cells ({n_layers} layers); loop at {row['loop_flops_per_s'] / 1e9:.1f} GFLOP/s")
    print(f"  {'method':8s} {'seconds':>9s} {'GFLOP':>9s} {'GFLOP/s':>8s} {'x loop (time)':>14s} {'x loop (FLOPs)':>15s}")
    for m in METHODS:
        s, f = row["seconds"][m], row["flops"][m]
        print(f"  {m:8s} {s:9.3f} {f / 1e9:9.2f} {f / s / 1e9:8.1f} {row['seconds']['loop'] / s:14.1f} "
              f"{row['flops']['loop'] / f:15.1f}")
    print(f"  floor {row['flops']['floor'] / 1e9:.2f} GFLOP: floor share {row['floor_share']:.2f}; exact vs nnsight loop "
          f"{row['speedup_vs_nnsight']:.1f}x; AtP* vs exact {row['atp_speedup_vs_exact']:.1f}x "
          f"({row['atp1_speedup_vs_exact']:.1f}x without GradDrop); "
          f"max |diff| vs loop {row['max_abs_diff_vs_loop']:.1e}")
    second = row.get("agreement_at_second_scale", {}).get("scale")
    for key, what in (("agreement", "AtP*"), ("agreement_without_graddrop", "without GradDrop"),
                      ("agreement_at_second_scale", f"AtP* at {second} x the noise")):
        a = row.get(key)
        if a and a["samples"]:
            print(f"  {what} vs exact ({a['samples']} samples): Spearman {a['spearman']:.3f} signed, {a['spearman_strength']:.3f} "
                  f"strength; top-{a['k']} recall {a['top_k_recall']:.2f}; per layer {[round(v, 2) for v in a['per_layer']]}"
                  + (f"; flagged: {'; '.join(a['flags'])}" if a["flags"] else ""))


def organism_pairs(adapter, n: int, scale: float) -> list:
    """The first ``n`` phantom test pairs (ROME tracing, image corrupted at ``scale`` x the std) whose corruption
    moves p(answer) by >= MIN_GAP on both towers, as the sweep CLI keeps them."""
    cfg = SweepConfig(**TRACE, limit=4 * n, noise_scale=scale)
    pairs = select_pairs(load_dataset(cfg.data), cfg)
    batches = [adapter.encode([p.clean_image], [p.item.prompt], [p.item.spans]) for p in pairs]
    stds = {t: cfg.noise_scale * noise_std(adapter, [(b, noised(adapter, t, b, "image")) for b in batches]) for t in ("lm", "vision")}
    kept = []
    for p, b in zip(pairs, batches):
        ids = adapter.tokenizer.convert_tokens_to_ids([p.item.answer, *p.alternatives])
        gaps = []
        for tower, std in stds.items():
            site, pos = noised(adapter, tower, b, "image")
            r = restore_sweep(adapter, b, b, metric_fn("prob", ids[0], ids[1:]), tower=tower, layers=[], groups=[[0]],
                              noise=Noise(site, tuple(pos), std, cfg.copies, cfg.seed))
            gaps.append(abs(r.clean - r.corrupted))
        if min(gaps) >= MIN_GAP:
            kept.append(p)
        if len(kept) == n:
            break
    return kept


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--samples", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--large-repeats", type=int, default=1)
    p.add_argument("--large-positions", type=int, default=2, help="positions the exact sweep times on the larger model")
    p.add_argument("--loop-cells", type=int, default=2, help="cells the loops time on the larger model")
    p.add_argument("--models", default="organism,large")
    p.add_argument("--organism", default="organism", help="alias or folder of the organism")
    p.add_argument("--noise-scale", type=float, default=3.0, help="the noise std in units of the noised values' std")
    p.add_argument("--second-scale", type=float, default=0.3, help="AtP*'s agreement at this scale too (0: not)")
    p.add_argument("--json", default="reports/bench/layer_sweep.json")
    args = p.parse_args()
    torch.set_num_threads(1)
    figures: dict = {"benchmark": "layer_sweep", "threads": 1, "samples": args.samples, "repeats": args.repeats,
                     "organism_model": args.organism, "noise_scale": args.noise_scale}
    adapter = load(args.organism)
    pairs = organism_pairs(adapter, args.samples, args.noise_scale)
    print(f"{len(pairs)} samples, {SweepConfig(**TRACE).copies} noise copies, 1 torch thread, methods interleaved, medians of "
          f"{args.repeats} (organism) / {args.large_repeats} (larger model) repeats")
    for name in args.models.split(","):
        if name == "organism":
            path = ALIASES.get(args.organism, args.organism)
            plain, other = (LlavaForConditionalGeneration.from_pretrained(path, attn_implementation="eager").eval()
                            for _ in range(2))
            figures["organism"] = bench_model("organism", adapter, plain, NNsight(other), pairs, args, args.repeats, True)
        else:
            model, processor = large_model()
            plain, other = copy.deepcopy(model), copy.deepcopy(model)
            big = LlavaAdapter(model, processor, "random-llava-v6x256-lm8x512")
            figures["large"] = bench_model("larger random model (vision 6 x 256 at 224 px, LM 8 x 512)", big, plain,
                                           NNsight(other), pairs, args, args.large_repeats, False)
    write_figures(args.json, figures)
    if "organism" in figures:
        org = figures["organism"]
        exact = sum(org[t]["seconds"]["exact"] for t in org)
        atp = sum(org[t]["seconds"]["atp"] for t in org)
        print(f"atp_without_graddrop_speedup_vs_exact: {exact / sum(org[t]['seconds']['atp1'] for t in org):.1f}")
        print(f"lm_speedup_vs_loop: {org['lm']['speedup_vs_loop']:.1f}")
        print(f"vision_speedup_vs_loop: {org['vision']['speedup_vs_loop']:.1f}")
        print(f"atp_speedup_vs_exact: {exact / atp:.1f}")
        print(f"floor_share: {min(org[t]['floor_share'] for t in org):.2f}")


if __name__ == "__main__":
    main()
