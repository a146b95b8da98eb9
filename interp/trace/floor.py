"""Exact restored runs at the FLOP floor of a causal LM: prefix reuse, answer-only evaluation, SDPA.

Restoring positions g at a layer of a causal LM leaves every position before p = min(g) as it was
in the corrupted run: a restored run reuses the corrupted run's keys and values there and runs the
later blocks on positions p..answer only; the last block runs for the answer's query only (its other
positions give only keys and values) and the LM head for that row only; a restore of the last
block's output needs no block at all. Attention goes through SDPA (no pattern is read).

The LM's own decoder layers are called (family code, not a re-implementation), with the cached
prefix passed as their ``past_key_values``; :meth:`CausalLM.of` finds them from the adapter's site
map, and :meth:`CausalLM.corrupted` checks the floor path reproduces the adapter's corrupted run
(else the caller takes the generic path). ``interp.trace.atp`` runs its forwards (with gradients, no
prefix) through :meth:`CausalLM.block` too.
"""

from __future__ import annotations

import sys
from contextlib import contextmanager, nullcontext
from typing import Callable, ContextManager, Iterator, Mapping, Sequence

import torch

from interp.models.adapter import Adapter, Batch, Metric

WASTE = 0.25  # share of a cell's own positions a shared batch may recompute unchanged before them
LM_ROWS = 64  # rows per LM pass of vision restores (cache-sized passes run faster on CPU)
CHECK_TOL = 1e-4  # the floor path's corrupted answer logits must match the adapter's this closely (relative)


class _Prefix:
    """``past_key_values`` of one block call: keys/values of earlier positions [copies, heads, p, head dim]
    (row r's are those of copy r % copies) before the call's own; ``complete``: they hold the call's own
    positions too ([rows, ...], computed with the rest)."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, complete: bool = False) -> None:
        self.keys, self.values, self.complete = keys, values, complete

    def update(self, keys: torch.Tensor, values: torch.Tensor, *args, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
        if self.complete:
            return self.keys, self.values
        return _after(self.keys, keys), _after(self.values, values)


def _after(prefix: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
    """[rows, heads, p + q, head dim]: each row's copy of ``prefix`` (rows cycle through its copies), then ``new``."""
    (copies, heads, p, dim), (rows, _, q, _) = prefix.shape, new.shape
    if not p:
        return new
    out = new.new_empty(rows, heads, p + q, dim)
    out.view(rows // copies, copies, heads, p + q, dim)[:, :, :, :p] = prefix
    out[:, :, p:] = new
    return out


class CausalLM:
    """An adapter's causal LM as decoder layers callable on a span of positions after a cached prefix."""

    def __init__(self, adapter: Adapter, layers: torch.nn.ModuleList, norm: torch.nn.Module, head: torch.nn.Module,
                 rotary: torch.nn.Module) -> None:
        self.adapter, self.layers, self.norm, self.head, self.rotary = adapter, layers, norm, head, rotary
        self.n = len(layers)
        attn = layers[0].self_attn
        self.config = attn.config
        self._rope = sys.modules[type(attn).__module__].apply_rotary_pos_emb

    @classmethod
    def of(cls, adapter: Adapter, batch: Batch) -> CausalLM | None:
        """The adapter's LM if it has the structure the floor path calls (Llama-style decoder layers
        under one root with ``norm`` and ``rotary_emb``, a plain head) and ``batch`` needs nothing the
        LM's own forward derives (explicit or multimodal position ids, token types); else None."""
        hooks = getattr(adapter, "hooks", {})
        if "lm" not in adapter.towers or not {"lm.embed", "lm.logits", "lm.blocks.0.resid_post"} <= set(hooks):
            return None
        if {"position_ids", "token_type_ids"} & set(batch.inputs) or batch.attention_mask.shape[0] != 1:
            return None
        path = hooks["lm.blocks.0.resid_post"].module.rsplit(".", 1)[0]
        root = adapter.model.get_submodule(path.rsplit(".", 1)[0])
        layers = adapter.model.get_submodule(path)
        attn = getattr(layers[0], "self_attn", None)
        cfg = getattr(attn, "config", None)
        if (not all(hasattr(root, a) for a in ("norm", "rotary_emb")) or hooks["lm.logits"].index is not None
                or not all(hasattr(attn, a) for a in ("k_proj", "v_proj", "head_dim"))
                or not hasattr(layers[0], "input_layernorm") or getattr(cfg, "sliding_window", None)
                or getattr(cfg, "final_logit_softcapping", None)
                or "mrope_section" in (getattr(cfg, "rope_parameters", None) or {})):
            return None
        return cls(adapter, layers, root.norm, adapter.model.get_submodule(hooks["lm.logits"].module), root.rotary_emb)

    @contextmanager
    def sdpa(self) -> Iterator[None]:
        """Attention through SDPA while the floor path runs (it reads no attention pattern)."""
        old = self.config._attn_implementation
        self.config._attn_implementation = "sdpa"
        try:
            yield
        finally:
            self.config._attn_implementation = old

    def rope(self, h: torch.Tensor, positions: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Rotary tables (cos, sin) of positions 0..``positions`` - 1 for states like ``h``."""
        return self.rotary(h, torch.arange(positions, device=h.device)[None])

    def block(self, j: int, h: torch.Tensor, mask: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, k: torch.Tensor,
              v: torch.Tensor) -> torch.Tensor:
        """Block ``j`` on states ``h`` [rows, q, d] of positions p.. (``cos``, ``sin``: their rotary tables; ``mask``
        [1, 1, q, p + q]) after earlier positions' keys and values ``k``, ``v`` [copies, kv heads, p, head dim]:
        [rows, q, d]; the last block runs for the last position's query only (the others give keys and values):
        [rows, 1, d]."""
        layer = self.layers[j]
        if j < self.n - 1:
            return _out(layer(h, attention_mask=mask, position_embeddings=(cos, sin), past_key_values=_Prefix(k, v)))
        k_new, v_new = self.kv(j, h, cos, sin)  # the last position's own included: it attends to itself
        return _out(layer(h[:, -1:], attention_mask=mask[:, :, -1:], position_embeddings=(cos[:, -1:], sin[:, -1:]),
                          past_key_values=_Prefix(_after(k, k_new), _after(v, v_new), complete=True)))

    def kv(self, j: int, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys (rotated) and values of block ``j`` for inputs ``h`` [rows, q, d]: [rows, kv heads, q, head dim]."""
        attn = self.layers[j].self_attn
        x = self.layers[j].input_layernorm(h)
        k = attn.k_proj(x).unflatten(-1, (-1, attn.head_dim))
        if hasattr(attn, "k_norm"):
            k = attn.k_norm(k)
        k = k.transpose(1, 2)
        return self._rope(k[:, :1], k, cos, sin)[1], attn.v_proj(x).unflatten(-1, (-1, attn.head_dim)).transpose(1, 2)

    def module(self, site: str) -> tuple[torch.nn.Module, int | None]:
        """The module whose output holds ``site``, and the index of ``site`` in that output (None: all of it)."""
        hook = self.adapter.hooks[site]
        return self.adapter.model.get_submodule(hook.module), hook.index

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """The LM head on final states [rows, d] -> [rows, vocab]."""
        return self.head(self.norm(h))

    def corrupted(self, states: list[torch.Tensor], attention_mask: torch.Tensor, answer: int,
                  expected: torch.Tensor) -> Corrupted | None:
        """The corrupted run as restored runs reuse it (``states``: the LM input then every block's
        output, [copies, seq, d]); None unless it reproduces the adapter's answer logits ``expected``."""
        run = Corrupted(self, states, attention_mask, answer)
        start, p = max(self.n - 2, 0), max(answer - 1, 0)  # a full block after a prefix, then the answer-only one
        rows = len(expected)
        with torch.no_grad(), self.sdpa():
            got = self.logits(run.advance(states[start][:, p : answer + 1].clone(), torch.full((rows,), start), p))
        return run if matches(got, expected) else None


class Corrupted:
    """Per block, the corrupted run's keys and values at every position (one entry per copy), its
    rotary tables and its key mask: what restored runs reuse before their first changed position."""

    def __init__(self, lm: CausalLM, states: list[torch.Tensor], attention_mask: torch.Tensor, answer: int) -> None:
        self.lm, self.states, self.answer = lm, states, answer
        with torch.no_grad():
            self.cos, self.sin = lm.rope(states[0], states[0].shape[1])
            self.kv = [lm.kv(j, states[j], self.cos, self.sin) for j in range(lm.n)]
        self.keys = attention_mask[0, : answer + 1].bool()

    def advance(self, h: torch.Tensor, starts: torch.Tensor, p: int,
                after: Callable[[int, torch.Tensor], None] | None = None,
                edits: Callable[[int, int], ContextManager] | None = None) -> torch.Tensor:
        """Final states at the answer [rows, d] of runs whose states at positions p..answer are ``h``
        [rows, answer + 1 - p, d] (reused as a buffer), row r being at the state before block ``starts[r]``
        (ascending; ``n`` = final) of noise copy r % copies. ``after(s, h)`` edits the states once
        blocks before s ran; ``edits(j, first)`` is held while block j runs on positions first..answer
        (counted from p)."""
        lm, a = self.lm, self.answer
        mask = causal_mask(self.keys, p)
        cos, sin = self.cos[:, p : a + 1], self.sin[:, p : a + 1]
        for j in range(int(starts[0]), lm.n):
            c = int((starts <= j).sum())
            with edits(j, 0 if j < lm.n - 1 else a - p) if edits else nullcontext():
                out = lm.block(j, h[:c], mask, cos, sin, self.kv[j][0][:, :, :p], self.kv[j][1][:, :, :p])
            if j == lm.n - 1:  # the answer's row only
                h[:c, -1] = out[:, 0]
            elif c == len(h):
                h = out
            else:
                h[:c] = out
            if after:
                after(j + 1, h)
        return h[:, -1]


def matches(got: torch.Tensor, expected: torch.Tensor) -> bool:
    """Whether answer logits ``got`` reproduce the adapter's ``expected`` (``CHECK_TOL``, relative to their largest)."""
    scale = float(expected.abs().max()) or 1.0
    return torch.allclose(got, expected.to(got.dtype), atol=CHECK_TOL * scale, rtol=CHECK_TOL)


def causal_mask(keys: torch.Tensor, p: int, dtype: torch.dtype | None = None) -> torch.Tensor:
    """[1, 1, queries p..len(keys) - 1, keys]: causal and not padding (``keys``: which positions are not), boolean, or
    additive in ``dtype`` (0 or its lowest value: eager attention adds it)."""
    q = torch.arange(p, len(keys), device=keys.device)[:, None]
    ok = ((torch.arange(len(keys), device=keys.device)[None] <= q) & keys)[None, None]
    return ok if dtype is None else torch.zeros(ok.shape, dtype=dtype, device=keys.device).masked_fill_(~ok, torch.finfo(dtype).min)


def _out(x: torch.Tensor | tuple) -> torch.Tensor:
    """A decoder layer's hidden states (some families return a tuple)."""
    return x[0] if isinstance(x, tuple) else x


def restore_cells(run: Corrupted, clean: Mapping[str, torch.Tensor], point: str,
                  cells: Sequence[tuple[range, Sequence[int]]], copies: int, metric: Metric,
                  batch_size: int) -> list[torch.Tensor | None]:
    """Per cell (the LM layers it restores, the positions), the metric per noise copy [copies] after
    restoring ``clean[lm.blocks.<l>.<point>]`` [1, seq, d] there into the corrupted run; None for a cell
    whose positions all lie after the answer (nothing it restores reaches the answer).

    Cells whose first positions are close share a batch (and its cached prefix): a batch recomputes
    positions before a cell's own first position, unchanged, up to ``WASTE`` of the cell's own."""
    a, (sub, shift) = run.answer, _point(point)
    out: list[torch.Tensor | None] = [None] * len(cells)
    todo = []  # (cell index, positions up to the answer, window, restored states, first block)
    for i, (win, group) in enumerate(cells):
        g = sorted(x for x in group if x <= a)
        if g:
            states = [] if sub else [l + shift for l in win]
            todo.append((i, g, win, states, win[0] if sub else states[0]))
    todo.sort(key=lambda c: (c[1][0], c[4]))
    for batch in _batches([c[1][0] for c in todo], max(1, batch_size // copies), a):
        chunk = sorted((todo[b] for b in batch), key=lambda c: c[4])
        for (i, *_), v in zip(chunk, _restore_chunk(run, clean, point, chunk, copies, metric)):
            out[i] = v
    return out


def _point(point: str) -> tuple[bool, int]:
    """(whether ``point`` is inside a block (attn.out, mlp.out), 1 if it is a block's output else 0)."""
    return point not in ("resid_pre", "resid_post"), int(point == "resid_post")


def _batches(firsts: Sequence[int], per: int, answer: int) -> list[list[int]]:
    """Cells (indices into ``firsts``, their first changed positions, ascending) batched to share a prefix: at
    most ``per`` a batch, each starting within ``WASTE`` of its own positions after the batch's first."""
    out: list[list[int]] = []
    for i, f in enumerate(firsts):
        if out and len(out[-1]) < per and f - firsts[out[-1][0]] <= WASTE * (answer + 1 - f):
            out[-1].append(i)
        else:
            out.append([i])
    return out


def _restore_chunk(run: Corrupted, clean: Mapping[str, torch.Tensor], point: str, chunk: list[tuple], copies: int,
                   metric: Metric) -> list[torch.Tensor]:
    """One batch of :func:`restore_cells` (cells sorted by first block): the metric per cell [copies]."""
    lm, a = run.lm, run.answer
    p, (sub, shift) = min(g[0] for _, g, *_ in chunk), _point(point)
    rows = [slice(r * copies, (r + 1) * copies) for r in range(len(chunk))]

    def value(s: int, pos: Sequence[int]) -> torch.Tensor:  # the clean value restored at state (resid) / block s
        return clean[f"lm.blocks.{s - shift if not sub else s}.{point}"][0, list(pos)]

    h = torch.cat([run.states[start][:, p : a + 1] for *_, start in chunk])
    for r, (_, g, _, states, start) in zip(rows, chunk):
        if states:
            h[r, [x - p for x in g]] = value(start, g)

    def after(s: int, h: torch.Tensor) -> None:
        for r, (_, g, _, states, start) in zip(rows, chunk):
            if start < s and s in states:
                h[r, [x - p for x in g]] = value(s, g)

    @contextmanager
    def edits(j: int, first: int) -> Iterator[None]:
        hits = [(r, [x for x in g if x - p >= first]) for r, (_, g, win, *_) in zip(rows, chunk) if j in win]
        hits = [(r, g, value(j, g)) for r, g in hits if g]
        if not hits:
            yield
            return
        module, index = lm.module(f"lm.blocks.{j}.{point}")

        def put(m, args, output):
            v = output if index is None else output[index]
            for r, g, vals in hits:
                v[r, [x - p - first for x in g]] = vals

        handle = module.register_forward_hook(put)
        try:
            yield
        finally:
            handle.remove()

    with torch.no_grad(), lm.sdpa():
        final = run.advance(h, torch.tensor([c[4] for c in chunk]).repeat_interleave(copies), p, after, edits if sub else None)
        vals = metric(lm.logits(final))
    return [vals[r] for r in rows]


def lm_values(run: Corrupted, embeds: torch.Tensor, metric: Metric) -> torch.Tensor:
    """The metric [rows] of runs whose LM input is ``embeds`` [rows, seq, d] (cells of one row per noise copy,
    row r of copy r % copies), each cell from the first position where its input differs from the corrupted run's."""
    a, copies = run.answer, len(run.states[0])
    x = embeds[:, : a + 1].unflatten(0, (-1, copies))
    changed = (x != run.states[0][None, :, : a + 1]).any(-1).any(1)  # [cells, positions]
    first = [int(c.nonzero()[0]) if c.any() else a + 1 for c in changed]
    with torch.no_grad(), run.lm.sdpa():
        out = metric(run.lm.logits(run.states[-1][:, a])).repeat(len(first))  # cells that change nothing
        order = sorted((i for i, f in enumerate(first) if f <= a), key=first.__getitem__)
        for batch in _batches([first[i] for i in order], max(1, LM_ROWS // copies), a):
            cells = [order[b] for b in batch]
            p = first[cells[0]]
            final = run.advance(x[cells, :, p:].flatten(0, 1).clone(), torch.zeros(len(cells) * copies, dtype=torch.long), p)
            out.unflatten(0, (-1, copies))[cells] = metric(run.lm.logits(final)).unflatten(0, (-1, copies))
    return out
