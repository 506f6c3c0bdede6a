"""The status page with a tenants file, in a real browser: opened as #key=..., a tenant's key
shows its own row only, and the key leaves the address bar."""

from __future__ import annotations

import numpy as np
import pytest

import clce_client
from tests.support.browser import CHROMIUM, CHROMIUM_ARGS, sync_api  # (skips without a browser)
from tests.support.tenant_server import ADMIN_KEY, KEYS, server  # noqa: F401  (fixture)

pytestmark = pytest.mark.timeout(180)


def test_a_tenants_page_shows_its_own_row(server):
    x = np.random.default_rng(0).standard_normal((4, 5)).astype(np.float32)
    for key in KEYS.values():   # both tenants have had traffic
        with clce_client.Client(server.url, api_key=key) as c:
            c.cross_entropy(x, np.array([0, 1, 2, 3]))
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        try:
            page = browser.new_page()
            errors: list[str] = []
            page.on("pageerror", lambda exc: errors.append(str(exc)))
            page.goto(server.url + "/#key=" + KEYS["alpha"], wait_until="load")
            page.wait_for_selector("tr[data-tenant='alpha']", timeout=15000)
            page.wait_for_timeout(1500)   # a few polls
            assert page.query_selector("tr[data-tenant='beta']") is None
            assert "beta" not in page.inner_text("#tenants")
            assert KEYS["alpha"] not in page.url
            admin = browser.new_page()
            admin.goto(server.url + "/#key=" + ADMIN_KEY, wait_until="load")
            admin.wait_for_selector("tr[data-tenant='beta']", timeout=15000)
            assert admin.query_selector("tr[data-tenant='alpha']") is not None
            assert not errors, errors
        finally:
            browser.close()
