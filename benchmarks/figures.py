"""Machine-readable figures of a benchmark run, next to its printed table."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def write_figures(path: str, result: dict[str, Any]) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(result, indent=1))
    print(f"\nwrote {path}")
