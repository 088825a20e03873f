"""A real headless Chromium for the dashboard tests: the system's browser (Debian's `chromium`,
installed by `make browser`) driven by Playwright, since Playwright's own browser download needs
a network the tests must not depend on."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager

from playwright.sync_api import Browser, sync_playwright

from tests.conftest import _require


def chromium_path() -> str | None:
    return os.environ.get("AMID_CHROMIUM") or shutil.which("chromium")


@contextmanager
def chromium() -> Iterator[Browser]:
    path = chromium_path()
    if path is None:
        _require("a Chromium browser (make browser)", FileNotFoundError("chromium"))
    with sync_playwright() as playwright:
        # --no-sandbox: CI runs as root, where Chromium's sandbox refuses to start.
        browser = playwright.chromium.launch(
            executable_path=path, headless=True, args=["--no-sandbox"]
        )
        try:
            yield browser
        finally:
            browser.close()
