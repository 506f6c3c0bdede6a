"""The status page (GET /, clce_server/static/index.html) in a real headless browser.

Starts the real server (`python -m clce_server`), opens the page in Debian's Chromium driven by
Playwright, sends loss requests meanwhile and checks that the page shows the device, the tenant
and non-zero figures. Needs `pip install playwright` and `apt-get install chromium`; Playwright's
own browser download (`playwright install`) is not used.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest

from clce_client import Client
from tests.support.browser import CHROMIUM, CHROMIUM_ARGS, sync_api

REPO = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.timeout(180)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server():
    port = _free_port()
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    for k in ("CLCE_TENANTS", "CLCE_DEVICE", "CLCE_HOST", "CLCE_PORT"):
        env.pop(k, None)
    proc = subprocess.Popen([sys.executable, "-m", "clce_server", "--port", str(port), "--log-level", "warning"],
                            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            if proc.poll() is not None:
                out = proc.stdout.read().decode(errors="replace") if proc.stdout else ""
                pytest.fail(f"server exited with {proc.returncode}:\n{out[-4000:]}")
            try:
                if httpx.get(url + "/readyz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                pytest.fail("server not ready within 120 s")
            time.sleep(0.2)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=CHROMIUM,
                               args=CHROMIUM_ARGS, headless=True)
        try:
            yield b
        finally:
            b.close()


def _num(text: str) -> float:
    """The page's formatted figure ("1.2k", "37", "—") as a number (nan when missing)."""
    t = text.strip().replace(",", "")
    mult = {"k": 1e3, "M": 1e6, "G": 1e9}.get(t[-1:], 1) if t else 1
    try:
        return float(t[:-1] if mult != 1 else t) * mult
    except ValueError:
        return float("nan")


def test_status_page_shows_live_state(server, browser, tmp_path):
    info = httpx.get(server + "/v1/info", timeout=10).json()
    device_name = info["devices"][0]["name"]
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    external: list[str] = []
    page.on("request", lambda req: None if req.url.startswith(server) else external.append(req.url))
    page.goto(server + "/", wait_until="load")

    # the page's first poll: ready, version, instance, device, the tenant (before any request)
    page.wait_for_function("document.getElementById('ready').textContent === 'ready'", timeout=15000)
    assert page.text_content("#version") == info["version"]
    assert page.text_content("#instance-id") == info["instance_id"]
    page.wait_for_selector(".device-name", timeout=10000)
    assert device_name in page.inner_text("#devices")
    page.wait_for_selector("tr[data-tenant='default']", timeout=10000)

    # traffic (in a thread) while the page polls: throughput and the completed count must move
    rng = np.random.default_rng(0)
    x = rng.standard_normal((256, 1000)).astype(np.float32)
    t = rng.integers(0, 1000, size=256)
    stop = threading.Event()
    sent: list[int] = []
    failures: list[BaseException] = []

    def traffic() -> None:
        try:
            with Client(server) as client:
                deadline = time.monotonic() + 30
                while not stop.is_set() and time.monotonic() < deadline:
                    res = client.cross_entropy(x, t, return_grad=True)
                    assert np.isfinite(res.loss) and res.grad.shape == x.shape
                    sent.append(1)
                    time.sleep(0.01)
        except BaseException as exc:  # reported by the main thread
            failures.append(exc)

    worker = threading.Thread(target=traffic, daemon=True)
    worker.start()
    try:
        page.wait_for_function(
            "parseFloat(document.getElementById('rate-req').textContent) > 0 && "
            "parseFloat(document.getElementById('rate-rows').textContent) > 0", timeout=20000)
        page.wait_for_function(
            "parseFloat(document.querySelector(\"tr[data-tenant='default'] .completed\").textContent) > 0",
            timeout=10000)
        page.screenshot(path=str(tmp_path / "busy.png"), full_page=True)
    finally:
        stop.set()
        worker.join(30)
    assert not failures, failures
    assert sent
    completed = _num(page.text_content("tr[data-tenant='default'] .completed"))
    assert 0 < completed <= len(sent)   # the warm-up does not go through the scheduler
    assert _num(page.text_content("#stat-completed")) > 0
    assert "default" in page.inner_text("#tenants")
    assert not errors, errors
    assert not external, f"the page fetched outside resources: {external}"

    shot = tmp_path / "busy.png"
    data = shot.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
    if os.environ.get("CLCE_STATUS_SCREENSHOT"):
        shutil.copy(shot, os.environ["CLCE_STATUS_SCREENSHOT"])
    page.close()
