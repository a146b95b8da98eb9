"""Browser tests' shared parts: Debian's chromium driven by Playwright (its own browser download does not
work here), a page recording console errors and requests that leave localhost, a local server, and the
non-blank screenshot check. Skips without chromium or Playwright, unless ``INTERP_REQUIRE_BROWSER`` (CI)."""

from __future__ import annotations

import importlib.util
import io
import os
import shutil
import subprocess
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import numpy as np
import pytest

FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync"]


def chromium() -> str:
    """The chromium executable; skips (fails in CI) when it or Playwright is missing."""
    browser = os.environ.get("CHROMIUM") or shutil.which("chromium")
    if not browser or importlib.util.find_spec("playwright") is None:
        if os.environ.get("INTERP_REQUIRE_BROWSER"):
            pytest.fail("no chromium or playwright, and INTERP_REQUIRE_BROWSER is set (CI)")
        pytest.skip("no chromium or playwright")
    return browser


def headless(profile: Path, *args: str) -> str:
    """Run chromium headless on its own profile folder with ``args`` (e.g. ``--dump-dom URL``); its stdout."""
    return subprocess.run([chromium(), *FLAGS, f"--user-data-dir={profile}", "--virtual-time-budget=10000", *args],
                          check=True, capture_output=True, text=True, timeout=180).stdout


@dataclass
class Watched:
    """A Playwright page and what it reported: console errors and page errors, requests off localhost."""

    page: Any
    errors: list[str] = field(default_factory=list)
    outside: list[str] = field(default_factory=list)

    def check(self) -> None:
        assert not self.errors, self.errors
        assert not self.outside, self.outside

    def screenshot_is_not_blank(self) -> None:
        from PIL import Image

        shot = np.asarray(Image.open(io.BytesIO(self.page.screenshot())).convert("RGB"))
        assert len(np.unique(shot.reshape(-1, 3), axis=0)) > 1


@contextmanager
def page(width: int = 1200, height: int = 900) -> Iterator[Watched]:
    """A fresh headless chromium page, watched."""
    from playwright.sync_api import sync_playwright

    executable = chromium()
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=executable, args=FLAGS)
        try:
            watched = Watched(browser.new_page(viewport={"width": width, "height": height}))
            watched.page.on("console", lambda m: m.type == "error" and watched.errors.append(m.text))
            watched.page.on("pageerror", lambda e: watched.errors.append(str(e)))
            watched.page.on("request", lambda r: urlparse(r.url).hostname not in ("127.0.0.1", "localhost")
                            and watched.outside.append(r.url))
            yield watched
        finally:
            browser.close()


@contextmanager
def serve(app: Callable) -> Iterator[str]:
    """A WSGI app served on 127.0.0.1 (a free port) in a thread; yields its URL."""
    from werkzeug.serving import make_server

    server = make_server("127.0.0.1", 0, app, threaded=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_port}/"
    finally:
        server.shutdown()


def files_app(folder: str) -> Callable:
    """A WSGI app serving the files of ``folder``."""
    from werkzeug.exceptions import NotFound
    from werkzeug.middleware.shared_data import SharedDataMiddleware

    return SharedDataMiddleware(NotFound(), {"/": folder})
