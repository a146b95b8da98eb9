"""What every ``python -m interp...`` command shares: one error path, ``--debug``, and input checks
that run before any work starts.

``run(parse, work, argv)`` parses, then runs ``work``; bad input (``InterpError``, a bad option value)
prints ``error: <message>`` on one line and exits 2, Ctrl-C prints one line and exits 130, anything
else prints one line naming it and exits 2; ``--debug`` re-raises for the traceback. The option types
(``positive_int``, ``fraction``, ``torch_device``, ``out_dir``...) are argparse ``type=`` functions, also
callable on values that do not come from the command line. This module imports nothing heavy: a
command's ``--help`` answers before torch loads.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import NoReturn, TypeVar

from interp.errors import InterpError

T = TypeVar("T")
RESUME_HINT = "rerun the same command to resume"


class Parser(argparse.ArgumentParser):
    """An ArgumentParser with ``--debug`` whose usage errors are one ``InterpError`` line (exit 2 through
    ``run``); its subparsers are Parsers too."""

    def __init__(self, prog: str, description: str | None = None, **kw) -> None:
        kw.setdefault("formatter_class", argparse.RawDescriptionHelpFormatter)
        super().__init__(prog=prog, description=description, **kw)
        # read by ``run`` from the command line, so it never lands among a command's settings
        self.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                          help="show the traceback of an unexpected error")

    def error(self, message: str) -> NoReturn:
        raise InterpError(f"{message} (see {self.prog} --help)")


def run(parse: Callable[[list[str]], T], work: Callable[[T], int | None], argv: Sequence[str] | None = None,
        resumable: Callable[[T], bool] = lambda _: False) -> int:
    """Parse ``argv`` (default: the command line) and run ``work`` on the result; returns the exit code.
    ``resumable`` says whether an interrupted run of these settings resumes when rerun."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    args = None
    try:
        args = parse([a for a in argv if a != "--debug"])
        quiet_hf()
        return work(args) or 0
    except KeyboardInterrupt:
        if debug:
            raise
        resume = args is not None and resumable(args)
        _say("interrupted" + (f": {RESUME_HINT}" if resume else ""))
        return 130
    except (InterpError, argparse.ArgumentTypeError) as e:
        if debug:
            raise
        _say(f"error: {e}")
        return getattr(e, "exit_code", 2)
    except Exception as e:
        if debug:
            raise
        _say(f"error: unexpected {type(e).__name__}: {e} (rerun with --debug for the traceback)")
        return 2


def not_applicable(names: Sequence[str], context: str) -> None:
    """InterpError naming the settings ``names`` (as flags) that were given where they do not apply."""
    if names:
        flags = ", ".join(f"--{n.replace('_', '-')}" for n in names)
        raise InterpError(f"{flags} {'does' if len(names) == 1 else 'do'} not apply {context}")


def _say(line: str) -> None:
    print(" ".join(line.splitlines()), file=sys.stderr)


def quiet_hf() -> None:
    """No Hugging Face progress bars (weight loading, downloads): stderr keeps our own bars and errors."""
    os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"  # read when huggingface_hub is first imported
    if "transformers" in sys.modules:  # already imported (an in-process caller)
        from transformers.utils import logging

        logging.disable_progress_bar()


# ---------------------------------------------------------------------------------------
# option types: argparse ``type=`` functions raising ArgumentTypeError with the reason


def _number(cast: Callable[[str], T], value: str, ok: Callable[[T], bool], want: str) -> T:
    try:
        x = cast(value)
    except ValueError:
        x = None
    if x is None or not ok(x):
        raise argparse.ArgumentTypeError(f"must be {want}, got {value!r}")
    return x


def positive_int(value: str) -> int:
    return _number(int, value, lambda x: x >= 1, "an integer >= 1")


def non_negative_int(value: str) -> int:
    return _number(int, value, lambda x: x >= 0, "an integer >= 0")


def positive_float(value: str) -> float:
    return _number(float, value, lambda x: math.isfinite(x) and x > 0, "a finite number > 0")


def non_negative_float(value: str) -> float:
    return _number(float, value, lambda x: math.isfinite(x) and x >= 0, "a finite number >= 0")


def fraction(value: str) -> float:
    return _number(float, value, lambda x: 0 <= x <= 1, "a number in [0, 1]")


def int_list(value: str) -> list[int]:
    """Comma-separated integers >= 0 (seeds), at least one."""
    parts = [p.strip() for p in value.split(",")]
    if not all(p.isdigit() for p in parts):
        raise argparse.ArgumentTypeError(f"must be comma-separated integers >= 0 (e.g. 0,1,2), got {value!r}")
    return [int(p) for p in parts]


def torch_device(value: str) -> str:
    """A torch device this machine has: ``cpu``, ``cuda``, ``cuda:<i>`` below the GPU count, ``mps``."""
    if value == "cpu":
        return value
    import torch

    try:
        d = torch.device(value)
    except RuntimeError:
        d = None
    if d is None or d.type not in ("cpu", "cuda", "mps"):
        raise argparse.ArgumentTypeError(f"unknown device {value!r}: use cpu, cuda, cuda:<index> or mps")
    if d.type == "cuda":
        if torch.version.cuda is None:
            raise argparse.ArgumentTypeError(f"{value}: this torch build has no CUDA (use --device cpu)")
        n = torch.cuda.device_count()
        if n == 0:
            raise argparse.ArgumentTypeError(f"{value}: no CUDA GPU is visible (use --device cpu)")
        if d.index is not None and d.index >= n:
            raise argparse.ArgumentTypeError(f"{value}: this machine has {n} CUDA GPU(s), cuda:0 to cuda:{n - 1}")
    if d.type == "mps" and not torch.backends.mps.is_available():
        raise argparse.ArgumentTypeError(f"{value}: MPS is not available here (use --device cpu)")
    return value


def out_dir(value: str) -> str:
    """A local folder this process can create or write into (checked, nothing made)."""
    _writable(Path(value), folder=True)
    return value


def out_file(value: str) -> str:
    """A local file this process can create or overwrite (checked, nothing made)."""
    _writable(Path(value), folder=False)
    return value


def out_store(value: str) -> str:
    """A results store: a local folder (see ``out_dir``) or an fsspec URL whose protocol is usable here."""
    if "://" not in value:
        return out_dir(value)
    from interp.store.layout import check_url

    try:
        check_url(value)
    except InterpError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return value


def _writable(path: Path, folder: bool) -> None:
    if path.is_dir() and not folder:
        raise argparse.ArgumentTypeError(f"{path} is a folder, not a file")
    if path.exists() and not path.is_dir() and folder:
        raise argparse.ArgumentTypeError(f"{path} is a file, not a folder")
    existing = next(p for p in (path, *path.parents) if p.exists())
    if existing != path and not existing.is_dir():
        raise argparse.ArgumentTypeError(f"{path} lies under {existing}, which is a file")
    if not os.access(existing, os.W_OK | (os.X_OK if existing.is_dir() else 0)):
        raise argparse.ArgumentTypeError(f"cannot write {path}: {existing} is not writable")
