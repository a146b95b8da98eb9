"""Machine-readable figures of a benchmark run, next to its printed table."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable


def write_figures(path: str, result: dict[str, Any]) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(result, indent=1))
    print(f"\nwrote {path}")


def count_flops(fn: Callable[[], Any]) -> int:
    """FLOPs of the torch ops ``fn`` runs (torch's own per-op formulas). FlopCounterMode's module tracker
    breaks ``autograd.grad`` on leaf inputs (gradient methods), so this dispatch mode counts without it."""
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils.flop_counter import flop_registry

    class Count(TorchDispatchMode):
        total = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            out = func(*args, **kwargs)
            formula = flop_registry.get(func._overloadpacket)
            if formula is not None:
                Count.total += formula(*args, **kwargs, out_val=out)
            return out

    with Count():
        fn()
    return Count.total
