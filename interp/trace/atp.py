"""Attribution patching (AtP, Nanda 2022) with the AtP* corrections (Kramár et al. 2024) for restore sweeps.

Every cell (layer, position group) of a tower at once, from one forward of the clean and corrupted runs and
its backward: restoring the clean value h_c of a cell into the corrupted run moves the metric by about
(h_c - h) . dmetric/dh at the corrupted run, per noise copy, averaged over the copies as the exact sweep
averages its metric. AtP*'s corrections:

- **QK fix** (attention saturation): a restored residual state enters the next block's attention as
  the clean run's queries and keys at its positions, so that block's softmax is recomputed exactly and
  its change weighted by dmetric/dpattern; the linear term drops the path through that pattern.
  Residual cells (``resid_pre``/``resid_post``) whose next block is in the same tower.
- **GradDrop** (cancelling paths): the estimate is repeated with the gradient through one downstream
  block's residual contribution dropped; the cell's strength is sum_l |estimate without l| / (m - 1) over
  its m downstream blocks of its tower (|estimate| when m < 2). It ranks cells by magnitude; the signed
  estimate is the QK-fixed one. Each block's input is its own autograd node, so the gradient a block's
  contribution sends back is that input's gradient less the block output's, from the one backward: dropping
  it costs a partial backward through the blocks between it and the cell (none for the cells just below).

With the same input clean and corrupted (causal tracing), one forward holds the clean row and the
noised copies. A causal LM that ``interp.trace.floor`` can call block by block runs that way (the adapter
runs what comes before it): positions up to the answer, its last block for the answer's query only (the
metric reads nothing else), its input computed once when every row shares it (an LM sweep whose noise is
on the LM input, or none).

Attention runs through the family's own eager function, recording queries, keys and patterns; a block
whose recorded pattern is not softmax(q k^T scale + mask) (e.g. soft-capped) gets no QK fix.
"""

from __future__ import annotations

import sys
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator, Mapping, Sequence
from weakref import WeakKeyDictionary

import numpy as np
import torch

from interp.errors import InterpError
from interp.models.adapter import Adapter, Batch, Edit, Metric
from interp.trace.floor import CausalLM, causal_mask, matches
from interp.trace.patching import Noise, SweepResult, check_sweep, same_inputs

RECORD = "interp_record"  # the attention implementation that records (registered with transformers)
PATTERN_TOL = 1e-5
_recorder: dict | None = None  # the active recording: attention module id -> block, and what was recorded
_checked: WeakKeyDictionary = WeakKeyDictionary()  # model -> whether its LM called block by block matches it


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
    pattern: torch.Tensor  # [rows, heads, T, S]: the queries are the last T of the S positions

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


def _gather(x: torch.Tensor, dim: int, index: torch.Tensor) -> torch.Tensor:
    """``x`` at ``index`` along ``dim`` (``x`` itself when ``index`` is every position in order)."""
    if len(index) == x.shape[dim] and torch.equal(index, torch.arange(len(index))):
        return x
    return x.index_select(dim, index)


class _Groups:
    """Position groups as index lists for scatter-sums over their positions."""

    def __init__(self, groups: Sequence[Sequence[int]]) -> None:
        self.members = [list(g) for g in groups]
        self.n = len(groups)
        self.pos = torch.tensor([p for g in groups for p in g], dtype=torch.long)
        self.of = torch.tensor([i for i, g in enumerate(groups) for _ in g], dtype=torch.long)
        self.single = len(self.pos) == self.n  # one position per group: sums are gathers

    def sum(self, x: torch.Tensor) -> torch.Tensor:
        """[..., positions] -> [..., groups]: sums over each group's positions."""
        if self.single:
            return _gather(x, -1, self.pos)
        return x.new_zeros(*x.shape[:-1], self.n).index_add_(-1, self.of, x[..., self.pos])


class QKFix:
    """AtP*'s QK fix at one block: the exact change of its pattern when a group's queries and keys become the
    clean run's (the rest of the corrupted run kept), weighted by a gradient with respect to the pattern.

    A query row i outside group G, pattern a_i, gradient g_i: its keys in G change by x_ij = a_ij (exp(dscore_ij) - 1)
    and the row is renormalised by d_iG = 1 + sum_{j in G} x_ij, which changes sum_j g_ij a_ij by
    sum_{j in G} (g_ij - u_i) x_ij / d_iG, u_i = sum_j g_ij a_ij. The group's own rows are recomputed."""

    def __init__(self, corr: Attention, clean: Attention, groups: _Groups) -> None:
        self.a, self.groups = corr.pattern.detach(), groups
        x = corr.scores(corr.query, clean.key - corr.key).clamp_(max=80).exp_().sub_(1).mul_(self.a)  # [rows, heads, T, S]
        if groups.single:  # x_iG / d_iG
            self.x = groups.sum(x)
            self.x = self.x / (self.x + 1)
        else:
            self.x, self.inv = x, 1 / (groups.sum(x) + 1)
        # the group's own rows (those of its positions that are queries): its queries and keys are the clean run's
        t, s = self.a.shape[2:]
        mine = (groups.pos >= s - t).nonzero()[:, 0]
        self.row, self.of = groups.pos[mine] - (s - t), groups.of[mine]  # [k]: their query rows and groups
        pairs = [(k, q) for k, g in enumerate(self.of.tolist()) for q in groups.members[g]]  # (own row, own key)
        i, p = torch.tensor(pairs, dtype=torch.long).reshape(-1, 2).T
        query = _gather(clean.query, 2, self.row)
        rows = corr.scores(query, corr.key)  # [rows, heads, k, S]
        rows[:, :, i, p] = clean.scores(query, clean.key)[:, :, i, p]
        mask = corr.additive()
        rows += mask if isinstance(mask, float) else _gather(mask, 2, self.row)
        self.rows = rows.softmax(-1).sub_(_gather(self.a, 2, self.row))

    def __call__(self, grad: torch.Tensor) -> torch.Tensor:
        """[rows, groups]: sum over heads and pattern entries of ``grad`` x the pattern's change."""
        g, grp = grad.detach(), self.groups
        u = (g * self.a).sum(-1, keepdim=True)
        if grp.single:
            keys = (grp.sum(g) - u).mul_(self.x)  # [rows, heads, T, groups]
        else:
            keys = grp.sum((g - u).mul_(self.x)).mul_(self.inv)
        own = keys[:, :, self.row, self.of]  # the group's own rows, replaced by:
        queries = (_gather(g, 2, self.row) * self.rows).sum(-1)  # [rows, heads, k]
        return (keys.sum(2) + keys.new_zeros(*keys.shape[:2], grp.n).index_add_(-1, self.of, queries - own)).sum(1)


def _own(x: torch.Tensor) -> torch.Tensor:
    """A block's input as its own autograd node (a view of the previous block's output, which other modules may
    read too; a leaf when nothing before it needs a gradient): its gradient is what that block alone sends back."""
    return x.view_as(x) if x.requires_grad else x.detach().requires_grad_()


def _causal(adapter: Adapter, clean: Batch, corrupt: Batch) -> CausalLM | None:
    """The adapter's LM called block by block (``interp.trace.floor``) where it may be: a causal LM whose answer
    logits that way match the adapter's (checked on the first batch of each model), one answer position."""
    lm = CausalLM.of(adapter, corrupt)
    if lm is None or not torch.equal(clean.answer_index, corrupt.answer_index):
        return None
    if adapter.model not in _checked:
        logits, cache = adapter.run(corrupt, read="lm.embed")
        with torch.no_grad():
            got = lm.logits(_lm_run(lm, cache["lm.embed"], corrupt, [])[0])
        _checked[adapter.model] = matches(got, adapter.readout(logits, corrupt))
    return lm if _checked[adapter.model] else None


def _lm_run(lm: CausalLM, h: torch.Tensor, batch: Batch, read: Sequence[str]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The LM from its input ``h`` [rows, seq, d] block by block, positions up to ``batch``'s answer, the last block
    for the answer's query only: (final answer states [rows, d], {site: value} of LM sites ``read``; the last
    block's hold the answer's row only)."""
    a = int(batch.answer_index[0])
    states = [h[:, : a + 1]]
    mask = causal_mask(batch.attention_mask[0, : a + 1].bool(), 0, h.dtype)
    cos, sin = lm.rope(h, a + 1)
    none = h.new_empty(1, 1, 0, 1)  # no earlier positions
    inner = {s: lm.module(s) for s in read if s.rsplit(".", 1)[-1] not in ("resid_pre", "resid_post")}
    got: dict[str, torch.Tensor] = {}
    hooks = [module.register_forward_hook(lambda m, args, out, s=s, i=i: got.__setitem__(s, out if i is None else out[i]))
             for s, (module, i) in inner.items()]
    try:
        for j in range(lm.n):
            states.append(lm.block(j, states[-1], mask, cos, sin, none, none))
    finally:
        for hook in hooks:
            hook.remove()
    for j in range(lm.n):
        got |= {f"lm.blocks.{j}.resid_pre": states[j], f"lm.blocks.{j}.resid_post": states[j + 1]}
    return states[-1][:, -1], {s: got[s] for s in read}


def _forward(adapter: Adapter, lm: CausalLM | None, tower: str, batch: Batch, rows: int, edit: Mapping[str, Edit],
             read: Sequence[str], grad: bool) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """``rows`` copies of ``batch`` run with ``edit`` (the noise), reading ``tower``'s sites ``read``, each block's
    input its own autograd node (:func:`_own`) when ``grad``: (answer logits [rows, vocab], {site: value}).
    ``lm``: the LM runs block by block (:func:`_lm_run`) after the adapter runs what comes before it."""
    pre = [f"{tower}.blocks.{b}.resid_pre" for b in range(adapter.n_layers(tower))]
    own = dict.fromkeys(pre, _own) if grad else {}
    if lm is None:
        copies = batch.take([0] * rows)
        logits, cache = adapter.run(copies, read=read, edit={**edit, **own}, grad=grad)
        return adapter.readout(logits, copies), dict(cache)
    early = {s: f for s, f in edit.items() if s != "lm.embed"}  # edits before the LM's input
    one = tower == "lm" and not early  # every row has the same LM input: computed once
    copies = batch.take([0] * (1 if one else rows))
    zero = torch.zeros(len(copies), *adapter.site_shape("lm.embed", batch.input_ids.shape[1]), dtype=adapter.model.dtype,
                       device=batch.input_ids.device)  # the LM's blocks are skipped there
    outside = [s for s in read if not s.startswith("lm.")]
    _, cache = adapter.run(copies, read=[*outside, "lm.embed"], edit={**early, **({} if tower == "lm" else own)},
                           skip=dict.fromkeys(adapter.expand_sites("lm.blocks.*.resid_post"), zero), grad=grad and tower != "lm")
    h = cache["lm.embed"].expand(rows, -1, -1) if one else cache["lm.embed"]
    if "lm.embed" in edit:
        h = edit["lm.embed"](h)
    with torch.set_grad_enabled(grad):
        final, sites = _lm_run(lm, _own(h) if grad and tower == "lm" else h, batch,
                               [s for s in read if s.startswith("lm.")])
        logits = lm.logits(final)
    return logits, {**{s: cache[s] for s in outside}, **sites}


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
    first = {l: l + (point != "resid_pre") for l in layers}  # each cell's first downstream block
    lm = _causal(adapter, clean, corrupt) if tower in ("lm", "vision") else None
    if lm is not None and tower == "lm":  # positions after the answer reach nothing the metric reads
        answer = int(corrupt.answer_index[0])
        groups = [[p for p in g if p <= answer] for g in groups]
    grp = _Groups(groups)

    copies = noise.copies if noise else 1
    cells = list(dict.fromkeys(pts[l] for l in layers))
    reads = list(dict.fromkeys([*cells, *pre, *post]))
    with recording(adapter, tower) as seen:
        if same_inputs(clean, corrupt):  # one forward: the clean row, then the corrupted copies
            r0, edit = 1, ({noise.site: noise.behind_clean()} if noise else {})
        else:
            logits, clean_vals = _forward(adapter, lm, tower, clean, 1, {}, cells, grad=False)
            clean_m, clean_att = float(metric(logits)[0]), dict(seen)
            r0, edit = 0, ({noise.site: noise.edit(torch.arange(copies))} if noise else {})
        logits, corr = _forward(adapter, lm, tower, corrupt, r0 + copies, edit, reads, grad=True)
        att = dict(seen)
    values = metric(logits)
    if r0:
        clean_m, clean_vals = float(values[0].detach()), {s: corr[s][:1].detach() for s in cells}
        clean_att = {b: a.take(slice(0, 1)) for b, a in att.items()}
    corrupted_m = float(values[r0:].detach().mean())
    corr_att = {b: a.take(slice(r0, None)) for b, a in att.items()}
    resid = point in ("resid_pre", "resid_post")
    qk = sorted(b for b in {first[l] for l in layers} if resid and b < n and corr_att[b].softmax_ok())
    dropped = [li for li, l in enumerate(layers) if n - first[l] >= 2] if graddrop else []
    dropping = range(min((first[layers[li]] for li in dropped), default=n), n)  # blocks GradDrop drops
    nodes = {s: corr[s] for s in [*cells, *post, *(pre[d] for d in dropping)]}
    nodes |= {f"{x}{b}": getattr(att[b], x) for b in qk for x in ("pattern", "query", "key")}
    seq = corr[pre[0]].shape[1]

    def full(name: str, x: torch.Tensor) -> torch.Tensor:
        """A site's value or gradient over every position (sites holding the answer's row only: 0 elsewhere)."""
        if not name.startswith(f"{tower}.") or x.shape[1] == seq:
            return x
        return torch.cat([x.new_zeros(x.shape[0], seq - 1, *x.shape[2:]), x], 1)

    def grad(output: torch.Tensor, names: Sequence[str], cotangent: torch.Tensor | None) -> dict[str, torch.Tensor]:
        """Gradients of ``output`` (weighted by ``cotangent``) at the nodes ``names``, sites over every position."""
        return {s: full(s, g) for s, g in zip(names, torch.autograd.grad(output, [nodes[s] for s in names], cotangent,
                                                                          retain_graph=True))}

    grads = grad(values[r0:].sum(), list(nodes), None)
    delta = {s: (full(s, clean_vals[s]) - full(s, corr[s][r0:])).detach().double() for s in cells}
    fixes = {b: QKFix(corr_att[b], clean_att[b], grp) for b in qk}

    def via(b: int, g: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """The part of gradients ``g`` at block b's input that flows through its attention pattern (through its
        queries and keys, which only the pattern reads)."""
        return torch.autograd.grad([att[b].query, att[b].key], corr[pre[b]], [g[f"query{b}"], g[f"key{b}"]],
                                   retain_graph=True)[0]

    def estimate(g: Mapping[str, torch.Tensor], qk_fixed: Sequence[int], rows: Sequence[int]) -> np.ndarray:
        """[layers, groups]: the estimate (mean over copies) of the layers at ``rows`` (others 0) from gradients
        ``g``, QK-fixed at the blocks ``qk_fixed`` (their pattern's path taken out of the linear term)."""
        out = np.zeros((len(layers), grp.n))
        for li in rows:
            l, b = layers[li], first[layers[li]]
            linear = g[pts[l]] - via(b, g) if b in qk_fixed else g[pts[l]]
            per = grp.sum((delta[pts[l]] * linear[r0:].double()).sum(-1))
            if b in qk_fixed:
                per = per + fixes[b](g[f"pattern{b}"][r0:])
            out[li] = per.mean(0).detach().numpy()
        return out

    signed = estimate(grads, qk, range(len(layers)))
    magnitude = np.abs(signed)
    if dropped:  # GradDrop: the gradient through block d's residual contribution removed, for each d in turn
        total = np.zeros_like(signed)
        for d in dropping:
            rows = [li for li in dropped if first[layers[li]] <= d]
            below = [b for b in qk if b < d]  # QK-fixed blocks left in the path (block d's own pattern is dropped)
            targets = [*dict.fromkeys(pts[layers[li]] for li in rows), *(f"{x}{b}" for b in below for x in ("pattern", "query", "key"))]
            # block d's input is its own node: its gradient less the output's is what d's contribution sends back
            through = grad(corr[pre[d]], targets, grads[pre[d]] - grads[post[d]])
            total += np.abs(estimate({t: grads[t] - through[t] for t in targets}, below, rows))
        m = np.array([n - first[l] for l in layers])
        magnitude[dropped] = total[dropped] / (m[dropped, None] - 1)
    return SweepResult(corrupted_m + signed, clean_m, corrupted_m, magnitude)
