"""Debian's Chromium driven by Playwright, for the status page's tests (tests/rails/test_status_page*.py).
Importing this module skips the importing test module where Playwright or Chromium is missing."""

from __future__ import annotations

import os
import shutil

import pytest


def _chromium() -> str | None:
    """Debian's Chromium (apt-get install chromium), or CLCE_CHROMIUM."""
    for cand in (os.environ.get("CLCE_CHROMIUM"), "/usr/bin/chromium", shutil.which("chromium")):
        if cand and os.path.isfile(cand) and os.access(cand, os.X_OK):
            return cand
    return None


CHROMIUM = _chromium()


CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install playwright)")
if CHROMIUM is None:
    pytest.skip("no Chromium at /usr/bin/chromium (apt-get install -y chromium; or set CLCE_CHROMIUM)",
                allow_module_level=True)
