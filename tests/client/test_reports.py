"""The client says what it does and why (logger "clce", `describe()`), and its errors name the
thing: real servers on loopback ports, real processes killed."""

from __future__ import annotations

import logging
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from tests.support.serverproc import ServerProcess, server_fixture  # noqa: E402

import clce_client  # noqa: E402
from clce_client import errors  # noqa: E402

server = server_fixture()
BIG = (8, 32000)      # 1 MiB: big enough for transport="auto" to ask about shared memory


class Records(logging.Handler):
    """The "clce" logger's records, with the monotonic time each was emitted."""

    def __init__(self):
        super().__init__(logging.DEBUG)
        self.records: list[tuple[float, logging.LogRecord]] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.name == "clce":      # the client's own (an in-process server logs on clce.server)
            self.records.append((time.monotonic(), record))

    def messages(self, level: int = logging.DEBUG) -> list[str]:
        return [r.getMessage() for _, r in self.records if r.levelno >= level]


@pytest.fixture
def records():
    logger = logging.getLogger("clce")
    handler, before = Records(), logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    yield handler
    logger.removeHandler(handler)
    logger.setLevel(before)


def data(shape=BIG, seed=0):
    rng = np.random.default_rng(seed)
    return rng.standard_normal(shape).astype(np.float32), rng.integers(0, shape[1], shape[0])


def test_the_transport_is_logged_once_and_described(server, records):
    with clce_client.Client(server.url) as client:
        d = client.describe()
        assert (d["transport"], d["decided"]) == ("tcp", False) and "not asked yet" in d["reason"]
        client.cross_entropy(*data((4, 10)))           # small: TCP, nothing decided, nothing logged
        assert records.messages() == []
        for seed in range(3):
            client.cross_entropy(*data(seed=seed))
        d = client.describe()
        assert (d["transport"], d["decided"]) == ("shm", True) and Path(d["socket"]).exists()
    said = records.messages(logging.INFO)
    assert said == [f"clce client for {server.url}: shared memory via {d['socket']} "
                    "(the server is on this host and allows shared memory)"]
    with clce_client.Client(server.url, transport="tcp") as client:
        client.cross_entropy(*data())
        client.cross_entropy(*data())
        assert client.describe()["transport"] == "tcp"
    assert records.messages(logging.INFO)[1:] == [
        f"clce client for {server.url}: TCP (transport='tcp' (or CLCE_TRANSPORT=tcp))"]


def test_a_server_that_died_says_why_within_a_second(records):
    """The server answered, then was SIGKILLed: the client waits for it as restarting, and says so
    (WARNING, with the cause) at once, not only when the retry budget is spent."""
    srv = ServerProcess().start()
    try:
        with clce_client.Client(srv.url, retry_budget_s=2) as client:
            client.cross_entropy(*data((4, 10)))
            srv.proc.kill()
            srv.proc.wait(10)
            t0 = time.monotonic()
            with pytest.raises(errors.ConnectError, match="unreachable") as info:
                client.cross_entropy(*data((4, 10)))
            raised = time.monotonic() - t0
    finally:
        srv.cleanup()
    warnings = [(t, r) for t, r in records.records if r.levelno >= logging.WARNING]
    assert warnings, records.messages()
    first_t, first = warnings[0]
    seen = first_t - t0
    assert seen < 1.0, seen
    text = first.getMessage()
    assert text.startswith(srv.url) and "Connection refused" in text, text
    # past `retries`, once: the wait is for a restart, and how long it may last
    assert any("taken to be restarting" in r.getMessage() for _, r in warnings), records.messages()
    assert "Connection refused" in str(info.value)
    print(f"dead server: first WARNING after {seen * 1e3:.0f} ms ({text!r}); raised after {raised:.2f} s")


def test_a_url_never_served_fails_fast_with_its_cause(records):
    from tests.support.serverproc import free_port

    url = f"http://127.0.0.1:{free_port()}"
    t0 = time.monotonic()
    with clce_client.Client(url) as client, pytest.raises(errors.ConnectError) as info:
        client.cross_entropy(*data((4, 10)))
    took = time.monotonic() - t0
    assert took < 2.0 and str(info.value).startswith(f"{url} unreachable") and "Connection refused" in str(info.value)
    first_t, first = records.records[0]
    assert first_t - t0 < 1.0 and first.levelno == logging.WARNING and first.getMessage().startswith(url)
    print(f"never served: WARNING after {(first_t - t0) * 1e3:.0f} ms, raised after {took:.2f} s")


def test_a_404_names_the_url(server):
    with clce_client.Client(server.url + "/v1") as client, pytest.raises(errors.NotFound) as info:
        client.cross_entropy(*data((4, 10)))
    assert str(info.value) == (f"{server.url}/v1/v1/cross_entropy: Not Found (no such endpoint: a clce URL is "
                               "the server's base address, as http://127.0.0.1:8000, without /v1)")


def test_the_admin_key_on_a_compute_call_says_so(tmp_path):
    tenants = tmp_path / "tenants.toml"
    tenants.write_text('[admin]\napi_key = "sk-admin-Rep0rts1"\n\n[tenants.t]\napi_key = "sk-tenant-Rep0rts2"\n')
    with ServerProcess(tenants=tenants) as srv:
        with clce_client.Client(srv.url, api_key="sk-admin-Rep0rts1") as client:
            with pytest.raises(errors.AuthenticationError, match="^this is the admin key; compute calls need a "
                                                                  "tenant key"):
                client.cross_entropy(*data((4, 10)))
            assert client.info()["name"] == "clce"         # where the admin key is right, it works
        with clce_client.Client(srv.url, api_key="sk-wrong-Rep0rts3") as client:
            with pytest.raises(errors.AuthenticationError, match="^missing or invalid API key"):
                client.cross_entropy(*data((4, 10)))
        with clce_client.Client(srv.url, api_key="sk-tenant-Rep0rts2") as client:
            client.cross_entropy(*data((4, 10)))
        assert "sk-admin-Rep0rts1" not in srv.log()


def test_reduction_none_with_a_per_row_grad_output_is_computed(server):
    """(once refused) backward asks the server again for a grad_output that differs per row"""
    torch = pytest.importorskip("torch")
    hidden = torch.randn(6, 16, requires_grad=True)
    weight = torch.randn(40, 16, requires_grad=True)
    target = torch.randint(0, 40, (6,))
    with clce_client.Client(server.url) as client:
        loss = client.linear_cross_entropy(hidden, weight, target, reduction="none")
        (loss * torch.arange(6.0)).sum().backward()
    h2, w2 = hidden.detach().requires_grad_(), weight.detach().requires_grad_()
    (torch.nn.functional.cross_entropy(h2 @ w2.T, target, reduction="none") * torch.arange(6.0)).sum().backward()
    torch.testing.assert_close(hidden.grad, h2.grad)
    torch.testing.assert_close(weight.grad, w2.grad)


def test_no_viewer_page_that_needs_a_cdn(server):
    """/docs and /redoc would load Swagger UI and ReDoc from a CDN (blank offline): not served; the
    schema is."""
    import httpx

    assert httpx.get(server.url + "/docs").status_code == 404
    assert httpx.get(server.url + "/redoc").status_code == 404
    assert "/v1/cross_entropy" in httpx.get(server.url + "/openapi.json").json()["paths"]


@pytest.fixture
def no_device_app():
    """build_app served in this process (as Ray Serve or another ASGI host would) with a device
    selector that matches nothing: it stays up, unready, saying why."""
    import threading

    import httpx
    import uvicorn

    from clce_server.app import build_app
    from clce_server.config import Settings
    from tests.support.serverproc import free_port

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(build_app(Settings(device="no-such-device-anywhere", port=port)),
                                           host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:   # until the devices have failed to open: /readyz says so
        try:
            if httpx.get(url + "/readyz", timeout=2).json()["error"]["code"] == "device_unavailable":
                break
        except (httpx.HTTPError, KeyError, ValueError):
            pass
        time.sleep(0.05)
    else:
        raise AssertionError("the server never reported its failed devices")
    yield url
    server.should_exit = True
    thread.join(10)


def test_a_device_that_never_opened_fails_at_once_with_its_cause(no_device_app, records):
    t0 = time.monotonic()
    with clce_client.Client(no_device_app, retry_budget_s=30) as client:
        with pytest.raises(errors.ServiceUnavailable) as info:
            client.cross_entropy(*data((4, 10)))
    took = time.monotonic() - t0
    assert took < 1.0, took
    assert info.value.code == "device_unavailable" and info.value.retry_after is None
    assert str(info.value).startswith("OpenCL initialisation failed, so this server will never be ready: "
                                      "no OpenCL device matches ['no-such-device-anywhere']")
    assert records.messages() == []          # not retried
    import subprocess

    out = subprocess.run([sys.executable, "-m", "clce_client.cli", "check", no_device_app], capture_output=True,
                         text=True, timeout=30)
    assert out.returncode == 1
    assert f"clce check: {no_device_app} is not ready: OpenCL initialisation failed" in out.stderr


def test_the_async_client_reports_the_same(server, records):
    import asyncio

    async def run():
        async with clce_client.AsyncClient(server.url) as client:
            await client.cross_entropy(*data())
            await client.cross_entropy(*data(seed=1))
            return client.describe()

    d = asyncio.run(run())
    assert d["transport"] == "shm"
    assert records.messages(logging.INFO) == [f"clce client for {server.url}: shared memory via {d['socket']} "
                                              "(the server is on this host and allows shared memory)"]
