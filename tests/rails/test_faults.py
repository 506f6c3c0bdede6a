"""Failures answered by who caused them, on the real app over real HTTP (uvicorn in this process,
so a test can put a failing engine behind a worker):

* an argument error: 4xx with PyTorch's type and message;
* a device failure (pyopencl's out-of-resources, a failed build): 503 device_unavailable with
  Retry-After, and the server goes on serving;
* a server bug (any other exception, a RuntimeError included): 500 with a request id that the
  body and X-Request-ID carry and the log names, never a client's runtime_error.
"""

from __future__ import annotations

import copy
import logging
import threading
import time

import httpx
import numpy as np
import pytest

pytest.importorskip("uvicorn")
import uvicorn  # noqa: E402

import clce_client  # noqa: E402
from clce_client import errors  # noqa: E402
from clce_server.app import build_app  # noqa: E402
from clce_server.config import Settings  # noqa: E402

torch = pytest.importorskip("torch")


class InProcessServer:
    def __init__(self, **settings):
        self.app = build_app(Settings(port=0, warmup=False, **settings))
        config = uvicorn.Config(self.app, host="127.0.0.1", port=0, log_level="warning", lifespan="on")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self):
        self.thread.start()
        deadline = time.monotonic() + 60
        while not (self.server.started and self.app.state.clce.ready.is_set()):
            assert time.monotonic() < deadline, "server did not become ready"
            time.sleep(0.02)
        port = self.server.servers[0].sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        return self

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(30)

    @property
    def state(self):
        return self.app.state.clce


class FailingEngine:
    """The device's engine, except that its method `where` raises `error` on the next `times` calls."""

    def __init__(self, engine, where: str, error: BaseException, times: int = 1):
        self.engine, self.where, self.error, self.left = engine, where, error, times

    def __getattr__(self, name):
        real = getattr(self.engine, name)
        if name != self.where:
            return real

        def failing(*args, **kwargs):
            if self.left:
                self.left -= 1
                # a fresh copy each time: one instance, raised again and again, would keep the
                # frames (and arrays) of the last call in its traceback
                raise copy.copy(self.error)
            return real(*args, **kwargs)
        return failing


@pytest.fixture(scope="module")
def server():
    with InProcessServer(max_batch=1) as srv:
        yield srv


def _inject(server, error, where="run_chunk", times=1):
    index = server.state.devices[0].index
    real = server.state.engines[index]
    server.state.engines[index] = FailingEngine(real, where, error, times)
    return lambda: server.state.engines.__setitem__(index, real)


def _batch(rows=4, classes=7, seed=0):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((rows, classes)).astype(np.float32), rng.integers(0, classes, rows)


def _expected(x, t):
    return torch.nn.functional.cross_entropy(torch.from_numpy(x).double(), torch.from_numpy(t)).item()


def test_a_server_bug_is_500_with_a_request_id_never_a_runtime_error(server, caplog):
    x, t = _batch()
    restore = _inject(server, RuntimeError("the engine's own bug"), where="prepare")
    try:
        with caplog.at_level(logging.ERROR, logger="clce.server"):
            resp = httpx.post(server.url + "/v1/cross_entropy", json={"input": x.tolist(), "target": t.tolist()})
    finally:
        restore()
    assert resp.status_code == 500, resp.text
    err = resp.json()["error"]
    assert err["code"] == "internal" and "the engine's own bug" not in err["message"]
    assert err["request_id"] == resp.headers["x-request-id"] and len(err["request_id"]) >= 12
    assert any(err["request_id"] in r.getMessage() for r in caplog.records)
    # the client raises a server error, not the RuntimeError PyTorch raises for bad arguments
    restore = _inject(server, RuntimeError("again"))
    try:
        with clce_client.Client(server.url, retries=0) as c, pytest.raises(errors.ServerError) as info:
            c.cross_entropy(x, t)
    finally:
        restore()
    assert info.value.status == 500 and not isinstance(info.value, RuntimeError)


@pytest.mark.parametrize("error, where", [
    pytest.param("MEM_OBJECT_ALLOCATION_FAILURE", "prepare", id="out-of-resources"),
    pytest.param("BUILD_PROGRAM_FAILURE", "run_chunk", id="failed-build"),
    pytest.param("OUT_OF_RESOURCES", "finish", id="lost-device"),
])
def test_a_device_failure_is_503_with_retry_after_and_the_server_goes_on(server, error, where):
    import pyopencl as cl

    exc = cl.MemoryError(error) if "MEM" in error else cl.RuntimeError(error)
    x, t = _batch(seed=1)
    restore = _inject(server, exc, where)
    try:
        resp = httpx.post(server.url + "/v1/cross_entropy", json={"input": x.tolist(), "target": t.tolist()})
        assert resp.status_code == 503, resp.text
        assert resp.json()["error"]["code"] == "device_unavailable"
        assert float(resp.headers["retry-after"]) >= 1
        # the very next request, on the same worker, is served
        with clce_client.Client(server.url, retries=0) as c:
            assert float(c.cross_entropy(x, t)) == pytest.approx(_expected(x, t), rel=1e-5)
    finally:
        restore()


def test_argument_errors_keep_pytorchs_type_and_message(server):
    x, t = _batch(seed=2)
    t[1] = 99
    with pytest.raises(IndexError) as ours:
        with clce_client.Client(server.url) as c:
            c.cross_entropy(x, t)
    with pytest.raises(IndexError) as theirs:
        torch.nn.functional.cross_entropy(torch.from_numpy(x), torch.from_numpy(t))
    assert str(ours.value) == str(theirs.value)
    with pytest.raises(RuntimeError) as ours:   # a RuntimeError PyTorch raises is still 400 runtime_error
        with clce_client.Client(server.url) as c:
            c.cross_entropy(x, t % 7, weight=np.ones(3, np.float32))
    assert isinstance(ours.value, errors.ClceRuntimeError) and ours.value.status == 400
