"""One error type for bad input: CLIs print its message on one line and exit with code 2."""

from __future__ import annotations


class InterpError(ValueError):
    """Bad input named in one line (unknown site, wrong shape, unreadable image, ...)."""

    exit_code = 2
