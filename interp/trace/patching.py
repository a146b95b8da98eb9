"""Causal tracing (ROME, Meng et al. 2022) and activation patching as one batched restore sweep.

A *corrupted* run (the clean input plus Gaussian noise on an embedding span, or a paired input:
negated statement, counterfactual image) is restored site by site with the clean run's states
at (layer, position group); the metric of each restored run is recorded.

Speed: restorations that change nothing (clean and corrupted states already equal, e.g. tokens
before a noised span) are not run. Where the LM is causal (``interp.trace.floor``), LM restores run
at the FLOP floor: the corrupted run's keys and values before the first restored position are
reused, later blocks run on the positions from there to the answer, the last block for the answer's
query only, and a restore of the last block's output needs no block; vision restores run the tower
as it is (blocks before the restored layer skipped) and the LM that way from its first changed input.
Otherwise many restored runs share one forward pass (rows of a batch), blocks before the first
restored layer are not recomputed (nnsight ``skip`` with the corrupted run's outputs) and LM
restores start from the corrupted LM input (no vision tower). ``interp.trace.atp`` estimates the
same cells by attribution patching.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable, Mapping, Sequence

import numpy as np
import torch

from interp.errors import InterpError
from interp.models.adapter import Adapter, Batch, Metric
from interp.trace.floor import CausalLM, lm_values, restore_cells

POINTS = ("resid_pre", "resid_post", "mlp.out", "attn.out")


@dataclass(frozen=True)
class Noise:
    """ROME corruption: N(0, std^2) added at ``site`` (``lm.embed`` or ``vision.embed``) on ``positions``."""

    site: str
    positions: tuple[int, ...]
    std: float
    copies: int = 10
    seed: int = 0

    def sample(self, d: int, dtype: torch.dtype) -> torch.Tensor:
        """[copies, len(positions), d], the same for every restored run (as in ROME)."""
        g = torch.Generator().manual_seed(self.seed)
        return (torch.randn(self.copies, len(self.positions), d, generator=g) * self.std).to(dtype)

    def edit(self, copy_index: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
        """Edit adding copy ``copy_index[r]`` of the noise to row r."""
        pos = torch.tensor(self.positions)

        def add(x: torch.Tensor) -> torch.Tensor:
            x = x.clone()
            x[:, pos] += self.sample(x.shape[-1], x.dtype)[copy_index]
            return x

        return add

    def behind_clean(self) -> Callable[[torch.Tensor], torch.Tensor]:
        """Edit of a batch [clean, copy 0, .., copy k-1]: every copy noised, the first row left clean."""
        add = self.edit(torch.arange(self.copies))
        return lambda x: torch.cat([x[:1], add(x[1:])])


@dataclass
class SweepResult:
    restored: np.ndarray  # [layers, groups]: metric after restoring (layer, group), mean over noise copies
    clean: float
    corrupted: float
    magnitude: np.ndarray | None = None  # [layers, groups]: AtP*'s GradDrop strength |restored - corrupted| (atp_sweep)

    @property
    def effect(self) -> np.ndarray:
        """Normalised indirect effect: 0 = corrupted, 1 = clean."""
        return (self.restored - self.corrupted) / (self.clean - self.corrupted)


def metric_fn(kind: str, answer_id: int, alternative_ids: Sequence[int]) -> Metric:
    """``prob`` / ``logprob`` of the answer token, or ``logit_diff`` = answer minus best alternative."""
    alt = torch.tensor(list(alternative_ids))
    if kind == "prob":
        return lambda z: z.float().softmax(-1)[:, answer_id]
    if kind == "logprob":
        return lambda z: z.float().log_softmax(-1)[:, answer_id]
    if kind == "logit_diff":
        if not len(alt):
            raise InterpError("metric logit_diff needs at least one alternative answer")
        return lambda z: z[:, answer_id].float() - z[:, alt].float().max(-1).values
    raise InterpError(f"unknown metric {kind!r}: choose prob, logprob or logit_diff")


def window_layers(layer: int, window: int, n_layers: int) -> range:
    """ROME's window: ``window`` consecutive layers centred on ``layer``, clipped to the model."""
    return range(max(0, layer - window // 2), min(n_layers, layer - (-window // 2)))


def same_inputs(a: Batch, b: Batch) -> bool:
    """Whether two batches hold the same model inputs (causal tracing: the corrupted run is the clean one plus noise)."""
    return a.inputs.keys() == b.inputs.keys() and all(torch.equal(v, b.inputs[k]) for k, v in a.inputs.items())


def check_sweep(adapter: Adapter, clean: Batch, corrupt: Batch, tower: str, layers: Sequence[int], point: str) -> int:
    """InterpError unless one aligned clean/corrupted pair, a known point and layers of ``tower``; its layer count."""
    if len(clean) != 1 or len(corrupt) != 1:
        raise InterpError("a sweep takes one clean and one corrupted sample")
    if clean.input_ids.shape != corrupt.input_ids.shape:
        raise InterpError(
            f"paired inputs differ in length ({clean.input_ids.shape[1]} vs {corrupt.input_ids.shape[1]} tokens): "
            "patching needs aligned positions"
        )
    if point not in POINTS:
        raise InterpError(f"unknown point {point!r}: choose one of {', '.join(POINTS)}")
    n = adapter.n_layers(tower)
    bad = [l for l in layers if not 0 <= l < n]
    if bad:
        raise InterpError(f"layer out of range: {bad[0]} ({tower} has layers 0..{n - 1})")
    return n


def restore_sweep(
    adapter: Adapter,
    clean: Batch,
    corrupt: Batch,
    metric: Metric,
    *,
    tower: str,
    layers: Sequence[int],
    groups: Sequence[Sequence[int]],
    point: str = "resid_post",
    window: int = 1,
    noise: Noise | None = None,
    batch_size: int = 128,
    clean_states: tuple[float, Mapping[str, torch.Tensor]] | None = None,
) -> SweepResult:
    """Restore clean states at every (layer, position group) of ``tower`` into the corrupted run.

    ``clean`` and ``corrupt`` are one-row batches of equal length (for causal tracing they are
    the same input and ``noise`` corrupts it). Positions index the tower's sequence (the LM's or
    text tower's tokens, or ``adapter.vision_positions`` for ``vision``). ``clean_states`` =
    (clean metric, {site: [1, positions, d]}) gives the clean run's states instead of running
    ``clean`` (e.g. states moved from another text onto these positions).
    """
    n = check_sweep(adapter, clean, corrupt, tower, layers, point)
    post = [f"{tower}.blocks.{j}.resid_post" for j in range(n)]
    pts = [f"{tower}.blocks.{j}.{point}" for j in range(n)]

    def answer_metric(logits: torch.Tensor, rows: Batch) -> torch.Tensor:
        return metric(adapter.readout(logits, rows))

    copies = noise.copies if noise else 1
    base = corrupt.take([0] * copies)
    lm_alone = tower == "lm" and "lm.embed" in adapter.hooks
    lm = CausalLM.of(adapter, corrupt) if tower in ("lm", "vision") else None
    lm_post = [f"lm.blocks.{j}.resid_post" for j in range(lm.n)] if lm else []
    reads = list(dict.fromkeys([*post, *pts, *(["lm.embed", *lm_post] if lm or lm_alone else [])]))
    if clean_states is None and same_inputs(clean, corrupt):  # one forward: the clean row, then the copies
        both = corrupt.take([0] * (1 + copies))
        logits, corr = adapter.run(both, read=reads, edit={noise.site: noise.behind_clean()} if noise else {})
        rows = answer_metric(logits, both)
        clean_m, clean_vals = float(rows[0]), {s: v[:1] for s, v in corr.items()}
        logits, corr, corr_rows = logits[1:], {s: v[1:] for s, v in corr.items()}, rows[1:]
    else:
        if clean_states is None:
            logits, clean_vals = adapter.run(clean, read=pts)
            clean_m = float(answer_metric(logits, clean)[0])
        else:
            clean_m, clean_vals = clean_states
        logits, corr = adapter.run(base, read=reads, edit={noise.site: noise.edit(torch.arange(copies))} if noise else {})
        corr_rows = answer_metric(logits, base)
    corrupted_m = float(corr_rows.mean())
    run = lm.corrupted([corr["lm.embed"], *[corr[s] for s in lm_post]], corrupt.attention_mask,
                       int(corrupt.answer_index[0]), adapter.readout(logits, base)) if lm else None

    restored = np.full((len(layers), len(groups)), corrupted_m, dtype=np.float64)
    wins = [window_layers(layer, window, n) for layer in layers]
    changed = {j: (clean_vals[pts[j]][:1] != corr[pts[j]]).flatten(2).any(-1).any(0).tolist()  # per position
               for j in {j for win in wins for j in win}}
    todo = [[gi for gi, g in enumerate(groups) if any(changed[j][p] for j in win for p in g)] for win in wins]
    if run is not None and tower == "lm":  # at the floor: prefix reuse, answer-only last block
        cells = [(li, gi) for li in range(len(layers)) for gi in todo[li]]
        vals = restore_cells(run, clean_vals, point, [(wins[li], groups[gi]) for li, gi in cells], copies, metric, batch_size)
        for (li, gi), v in zip(cells, vals):
            if v is not None:
                restored[li, gi] += float(((v.double() - corr_rows.double()) / copies).sum())
        return SweepResult(restored, clean_m, corrupted_m)
    if lm_alone:  # restored runs start from the corrupted LM input: no vision tower, no noise edit
        base, noise = replace(base, inputs_embeds=corr["lm.embed"]), None
    per = max(1, batch_size // copies)  # position groups per batch: row r is of noise copy r % copies
    for li, win in enumerate(wins):
        for start in range(0, len(todo[li]), per):
            chunk = [(gi, k) for gi in todo[li][start : start + per] for k in range(copies)]
            copy_idx = torch.tensor([k for _, k in chunk])
            row_idx = torch.tensor([r for r, (gi, _) in enumerate(chunk) for _ in groups[gi]])
            pos_idx = torch.tensor([p for gi, _ in chunk for p in groups[gi]])
            batch = base.take(copy_idx)
            first = win[0]
            skip = {post[j]: corr[post[j]][copy_idx] for j in range(first if point != "resid_post" else first + 1)}
            if point == "resid_post":  # the first restored block is skipped too: its output is known
                skip[post[first]][row_idx, pos_idx] = clean_vals[pts[first]][0, pos_idx]
            edit = {} if noise is None else {noise.site: noise.edit(copy_idx)}
            for j in win[1:] if point == "resid_post" else win:
                edit[pts[j]] = _restore(row_idx, pos_idx, clean_vals[pts[j]][0, pos_idx])
            if run is None:
                logits, _ = adapter.run(batch, edit=edit, skip=skip)
                vals = answer_metric(logits, batch)
            else:  # vision restores: the tower as it is, then the LM at its floor from its input (LM blocks skipped here)
                zero = corr["lm.embed"].new_zeros(len(chunk), *corr["lm.embed"].shape[1:])
                _, c = adapter.run(batch, read="lm.embed", edit=edit, skip={**skip, **dict.fromkeys(lm_post, zero)})
                vals = lm_values(run, c["lm.embed"], metric)
            for (gi, k), v in zip(chunk, vals.double().numpy()):
                restored[li, gi] += (v - corr_rows[k].item()) / copies
    return SweepResult(restored, clean_m, corrupted_m)


def _restore(rows: torch.Tensor, pos: torch.Tensor, values: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    def put(x: torch.Tensor) -> torch.Tensor:
        x[rows, pos] = values
        return x

    return put
