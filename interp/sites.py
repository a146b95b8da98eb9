"""Site names: one grammar across the suite, ``<tower>.<part>[.<index>].<point>``.

Examples: ``vision.embed``, ``vision.blocks.3.resid_post``, ``vision.blocks.3.attn.pattern``,
``projector.out``, ``lm.embed``, ``lm.blocks.7.attn.out``, ``lm.logits``. Globs (``*``, ``?``,
``[..]``) select many: ``lm.blocks.*.resid_post``. Adapters list their valid sites in
execution order; everything here keeps that order, which nnsight needs.
"""

from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass
from typing import Iterable, Sequence

from interp.errors import InterpError

BLOCK_POINTS = ("resid_pre", "attn.pattern", "attn.out", "mlp.out", "resid_post")
_BLOCK = re.compile(r"^(?P<tower>[a-z]+)\.blocks\.(?P<layer>\d+)\.(?P<point>[a-z_.]+)$")


@dataclass(frozen=True)
class Site:
    """A parsed site name."""

    name: str
    tower: str
    layer: int | None
    point: str

    @property
    def is_block(self) -> bool:
        return self.layer is not None


def parse(name: str) -> Site:
    """Split a site name into tower, layer and point (no validation against a model)."""
    m = _BLOCK.match(name)
    if m:
        return Site(name, m["tower"], int(m["layer"]), m["point"])
    tower, _, point = name.partition(".")
    if not tower or not point:
        raise InterpError(f"malformed site name {name!r}: expected <tower>.<part>[.<index>].<point>")
    return Site(name, tower, None, point)


def block_sites(tower: str, n_layers: int, points: Sequence[str] = BLOCK_POINTS) -> list[str]:
    """All block sites of one tower in execution order."""
    return [f"{tower}.blocks.{l}.{p}" for l in range(n_layers) for p in points]


def expand(patterns: str | Iterable[str], valid: Sequence[str]) -> list[str]:
    """Resolve names and globs against ``valid``; result in ``valid``'s (execution) order.

    A pattern that matches nothing is an error naming it and listing the valid sites.
    """
    if isinstance(patterns, str):
        patterns = [p for p in patterns.split(",") if p.strip()]
    chosen: set[str] = set()
    for raw in patterns:
        pat = raw.strip()
        hits = fnmatch.filter(valid, pat)
        if not hits:
            m = _BLOCK.match(pat)
            if m and any(v.startswith(f"{m['tower']}.blocks.") for v in valid):
                n = 1 + max(parse(v).layer or 0 for v in valid if v.startswith(f"{m['tower']}.blocks."))
                if int(m["layer"]) >= n:  # a valid layer with an unknown point is an unknown site
                    raise InterpError(f"layer out of range in site {pat!r}: {m['tower']} has layers 0..{n - 1}")
            raise InterpError(f"unknown site {pat!r}; valid sites: {', '.join(_summarise(valid))}")
        chosen.update(hits)
    if not chosen:
        raise InterpError("no sites given")
    return [v for v in valid if v in chosen]


def _summarise(valid: Sequence[str]) -> list[str]:
    """Collapse block sites to ``tower.blocks.{0..n}.point`` so the error stays one line."""
    top: dict[tuple[str, str], int] = {}
    order: list[str | tuple[str, str]] = []
    for v in valid:
        s = parse(v)
        if s.layer is None:
            order.append(v)
            continue
        key = (s.tower, s.point)
        if key not in top:
            order.append(key)
        top[key] = max(top.get(key, 0), s.layer)
    return [o if isinstance(o, str) else f"{o[0]}.blocks.{{0..{top[o]}}}.{o[1]}" for o in order]
