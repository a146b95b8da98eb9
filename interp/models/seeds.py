"""Seeded model construction that leaves the caller's random state alone."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import ParamSpec, TypeVar

P = ParamSpec("P")
R = TypeVar("R")


def isolated_rng(fn: Callable[P, R]) -> Callable[P, R]:
    """Run ``fn`` on a fork of torch's global CPU generator: the seed it sets and the numbers it draws
    (weight init) do not leak into the caller's random state."""

    @functools.wraps(fn)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        import torch  # here, not at import: light CLI modules decorate their builders with this

        with torch.random.fork_rng(devices=[]):
            return fn(*args, **kwargs)

    return wrapper
