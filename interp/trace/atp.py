"""Attribution patching (AtP, Nanda 2022) with the AtP* corrections (Kramár et al. 2024) for restore sweeps.

Every cell (layer, position group) of a tower at once, from one clean forward, one corrupted forward
and its backward: restoring the clean value h_c of a cell into the corrupted run moves the metric by
about (h_c - h) . dmetric/dh at the corrupted run. AtP*'s corrections:

- **QK fix** (attention saturation): a restored residual state enters the next block's attention as
  the clean run's queries and keys at its positions, so that block's softmax is recomputed exactly and
  its change weighted by dmetric/dpattern; the linear term drops the path through that pattern.
  Residual cells (``resid_pre``/``resid_post``) whose next block is in the same tower.
- **GradDrop** (cancelling paths): the estimate is repeated with the gradient through one downstream
  block's residual contribution dropped (one partial backward per block); the cell's strength is
  sum_l |estimate without l| / (m - 1) over its m downstream blocks of its tower (|estimate| when
  m < 2). It ranks cells by magnitude; the signed estimate is the QK-fixed one.

With the same input clean and corrupted (causal tracing), one forward holds the clean row and the
noised copies.

Attention runs through the family's own eager function, recording queries, keys and patterns; a block
whose recorded pattern is not softmax(q k^T scale + mask) (e.g. soft-capped) gets no QK fix.
"""

from __future__ import annotations

import sys
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator, Mapping, Sequence

import numpy as np
import torch

from interp.errors import InterpError
from interp.models.adapter import Adapter, Batch, Metric
from interp.trace.patching import Noise, SweepResult, check_sweep, same_inputs

RECORD = "interp_record"  # the attention implementation that records (registered with transformers)
PATTERN_TOL = 1e-5
_recorder: dict | None = None  # the active recording: attention module id -> block, and what was recorded


def _attend(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """The family's eager attention, recording query, key, scaling, mask and pattern of recorded blocks."""
    eager = getattr(sys.modules[type(module).__module__], "eager_attention_forward", None)
    if eager is None:
        raise InterpError(f"{type(module).__name__} has no eager attention function: AtP needs one")
    out, weights = eager(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)
    block = _recorder["blocks"].get(id(module)) if _recorder else None
    if block is not None:
        _recorder["seen"][block] = Attention(query, key, scaling, attention_mask, weights)
    return out, weights


def _register() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, eager_mask

    AttentionInterface.register(RECORD, _attend)
    ALL_MASK_ATTENTION_FUNCTIONS.register(RECORD, eager_mask)


@dataclass
class Attention:
    """One block's attention in one run: queries, keys (post-rotary), scale, additive mask, pattern."""

    query: torch.Tensor  # [rows, heads, T, hd]
    key: torch.Tensor  # [rows, kv heads, S, hd]
    scaling: float
    mask: torch.Tensor | None  # additive, [rows or 1, 1, T, >= S]
    pattern: torch.Tensor  # [rows, heads, T, S]

    def scores(self, query: torch.Tensor, key: torch.Tensor) -> torch.Tensor:
        """query . key^T * scale, keys repeated over query heads (grouped-query attention)."""
        key = key.detach().repeat_interleave(query.shape[1] // key.shape[1], 1)
        return (query.detach() @ key.transpose(-1, -2)) * self.scaling

    def additive(self) -> torch.Tensor | float:
        """The additive mask cut to the keys (0 when there is none)."""
        return 0.0 if self.mask is None else self.mask[..., : self.key.shape[2]]

    def take(self, rows: slice) -> Attention:
        """These rows of the run (a mask shared by every row stays)."""
        mask = self.mask if self.mask is None or self.mask.shape[0] == 1 else self.mask[rows]
        return Attention(self.query[rows], self.key[rows], self.scaling, mask, self.pattern[rows])

    def softmax_ok(self) -> bool:
        """Whether the pattern is softmax(scores + mask), as the QK fix recomputes it (checked on the first row)."""
        first = self.take(slice(0, 1))
        want = (first.scores(first.query, first.key) + first.additive()).softmax(-1)
        return torch.allclose(want, first.pattern.detach(), atol=PATTERN_TOL)


@contextmanager
def recording(adapter: Adapter, tower: str) -> Iterator[dict[int, Attention]]:
    """Attention of ``tower``'s blocks through :func:`_attend` while the block is held: block -> :class:`Attention`."""
    global _recorder
    _register()
    modules = {b: adapter.model.get_submodule(adapter.hooks[f"{tower}.blocks.{b}.attn.out"].module)
               for b in range(adapter.n_layers(tower))}
    configs = list({id(m.config): m.config for m in modules.values()}.values())
    old = [c._attn_implementation for c in configs]
    seen: dict[int, Attention] = {}
    _recorder = {"blocks": {id(m): b for b, m in modules.items()}, "seen": seen}
    for c in configs:
        c._attn_implementation = RECORD
    try:
        yield seen
    finally:
        _recorder = None
        for c, o in zip(configs, old):
            c._attn_implementation = o


class _Groups:
    """Position groups as index lists for scatter-sums over their positions."""

    def __init__(self, groups: Sequence[Sequence[int]]) -> None:
        self.n = len(groups)
        self.pos = torch.tensor([p for g in groups for p in g])
        self.of = torch.tensor([i for i, g in enumerate(groups) for _ in g])
        self.single = len(self.pos) == self.n  # one position per group: sums are gathers

    def sum(self, x: torch.Tensor) -> torch.Tensor:
        """[..., positions] -> [..., groups]: sums over each group's positions."""
        if self.single:
            return x if torch.equal(self.pos, torch.arange(x.shape[-1])) else x[..., self.pos]
        return x.new_zeros(*x.shape[:-1], self.n).index_add_(-1, self.of, x[..., self.pos])


class QKFix:
    """AtP*'s QK fix at one block: the exact change of its pattern when a group's queries and keys become the
    clean run's (the rest of the corrupted run kept), weighted by a gradient with respect to the pattern."""

    def __init__(self, corr: Attention, clean: Attention, groups: _Groups) -> None:
        self.a, self.groups = corr.pattern.detach(), groups
        s = corr.scores(corr.query, corr.key)
        # rows outside the group: its keys change, then each row is renormalised
        self.x = self.a * ((corr.scores(corr.query, clean.key) - s).clamp(max=80).exp() - 1)  # [rows, heads, T, S]
        self.d = 1 + groups.sum(self.x)  # [rows, heads, T, groups]
        # the group's own rows: its queries and its keys are the clean run's
        member = torch.zeros(groups.n, s.shape[-1], dtype=torch.bool).index_put_((groups.of, groups.pos), torch.tensor(True))
        query = clean.query[:, :, groups.pos]
        rows = torch.where(member[groups.of], clean.scores(query, clean.key), corr.scores(query, corr.key))
        mask = corr.additive()
        self.rows = (rows + (mask if isinstance(mask, float) else mask[:, :, groups.pos])).softmax(-1) - self.a[:, :, groups.pos]

    def __call__(self, grad: torch.Tensor) -> torch.Tensor:
        """[rows, groups]: sum over heads and pattern entries of ``grad`` x the pattern's change."""
        g, grp = grad.detach(), self.groups
        u = (g * self.a).sum(-1, keepdim=True)
        keys = (u + grp.sum(g * self.x)) / self.d - u  # [rows, heads, T, groups]
        own = keys[:, :, grp.pos, grp.of]  # the group's own rows, replaced by:
        queries = (g[:, :, grp.pos] * self.rows).sum(-1)  # [rows, heads, group positions]
        return (keys.sum(2) + torch.zeros_like(own[..., : grp.n]).index_add_(-1, grp.of, queries - own)).sum(1)


def atp_sweep(
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
    graddrop: bool = True,
) -> SweepResult:
    """AtP* estimates of :func:`interp.trace.patching.restore_sweep` (same arguments, one-layer restores):
    ``restored`` = corrupted + the QK-fixed estimate, ``magnitude`` = the GradDrop strength of each cell
    (``graddrop=False``: |estimate|, from the one backward alone)."""
    n = check_sweep(adapter, clean, corrupt, tower, layers, point)
    if window != 1:
        raise InterpError(f"AtP estimates one-layer restores: --window {window} needs the exact sweep")
    pts = [f"{tower}.blocks.{l}.{point}" for l in range(n)]
    pre = [f"{tower}.blocks.{b}.resid_pre" for b in range(n)]
    post = [f"{tower}.blocks.{b}.resid_post" for b in range(n)]
    resid = point in ("resid_pre", "resid_post")
    shift = int(point == "resid_post")
    first = {l: l + shift if resid else l + 1 for l in layers}  # each cell's first downstream block
    grp = _Groups(groups)

    copies = noise.copies if noise else 1
    cells = list(dict.fromkeys(pts[l] for l in layers))
    reads = list(dict.fromkeys([*cells, *pre, *post]))
    same = same_inputs(clean, corrupt)
    with recording(adapter, tower) as seen:
        if same:  # one forward: the clean row, then the corrupted copies
            base, edit = corrupt.take([0] * (1 + copies)), ({noise.site: noise.behind_clean()} if noise else {})
        else:
            logits, clean_vals = adapter.run(clean, read=cells)
            clean_m, clean_att = float(metric(adapter.readout(logits, clean))[0]), dict(seen)
            base, edit = corrupt.take([0] * copies), ({noise.site: noise.edit(torch.arange(copies))} if noise else {})
        logits, corr = adapter.run(base, read=reads, edit=edit, grad=True)
        att = dict(seen)
    r0 = int(same)  # the corrupted copies' first row
    values = metric(adapter.readout(logits, base))
    if same:
        clean_m, clean_vals = float(values[0].detach()), {s: corr[s][:1].detach() for s in cells}
        clean_att = {b: a.take(slice(0, 1)) for b, a in att.items()}
    corrupted_m = float(values[r0:].detach().mean())
    corr_att = {b: a.take(slice(r0, None)) for b, a in att.items()}
    qk = sorted(b for b in {first[l] for l in layers} if resid and b < n and corr_att[b].softmax_ok())
    nodes = [corr[s] for s in dict.fromkeys([*cells, *post])] + [att[b].pattern for b in qk]
    names = [*dict.fromkeys([*cells, *post]), *(f"pattern{b}" for b in qk)]
    grads = dict(zip(names, torch.autograd.grad(values[r0:].sum(), nodes, retain_graph=True)))
    delta = {s: (clean_vals[s] - corr[s][r0:]).detach().double() for s in cells}

    def via(b: int, cotangent: torch.Tensor) -> torch.Tensor:
        """The part of a gradient at block b's input that flows through its attention pattern."""
        return torch.autograd.grad(att[b].pattern, corr[pre[b]], cotangent, retain_graph=True)[0]

    def estimate(g: Mapping[str, torch.Tensor], v: Mapping[int, torch.Tensor], rows: Sequence[int]) -> np.ndarray:
        """[layers, groups]: the QK-fixed estimate (mean over copies) of the layers at ``rows`` (others 0) from
        gradients ``g`` and pattern paths ``v``."""
        out = np.zeros((len(layers), grp.n))
        for li in rows:
            l, b = layers[li], first[layers[li]]
            grad = (g[pts[l]] - (v[b] if b in v else 0))[r0:].double()
            per = grp.sum((delta[pts[l]] * grad).sum(-1))
            if b in v:
                per = per + fixes[b](g[f"pattern{b}"][r0:])
            out[li] = per.mean(0).detach().numpy()
        return out

    fixes = {b: QKFix(corr_att[b], clean_att[b], grp) for b in qk}
    paths = {b: via(b, grads[f"pattern{b}"]) for b in qk}
    signed = estimate(grads, paths, range(len(layers)))
    drops = np.zeros_like(signed)
    dropped = [li for li, l in enumerate(layers) if n - first[l] >= 2] if graddrop else []  # else |estimate|
    for drop in range(n):  # GradDrop: the gradient through block `drop`'s residual contribution removed
        rows = [li for li in dropped if first[layers[li]] <= drop]
        if not rows:
            continue
        inputs = [i for i, name in enumerate(names) if name not in post[drop:]]
        through = torch.autograd.grad(corr[post[drop]] - corr[pre[drop]], [nodes[i] for i in inputs], grads[post[drop]],
                                      retain_graph=True, allow_unused=True)
        g = dict(grads)
        for i, t in zip(inputs, through):
            if t is not None:
                g[names[i]] = grads[names[i]] - t
        drops += np.abs(estimate(g, {b: via(b, g[f"pattern{b}"]) for b in qk if b <= drop}, rows))
    m = np.array([n - first[l] for l in layers])[:, None]
    magnitude = np.where((m >= 2) & graddrop, drops / np.maximum(m - 1, 1), np.abs(signed))
    return SweepResult(corrupted_m + signed, clean_m, corrupted_m, magnitude)

