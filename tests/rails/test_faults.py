"""Failures answered by who caused them, on the real app over real HTTP (uvicorn in this process,
so a test can put a failing engine behind a worker):

* an argument error: 4xx with PyTorch's type and message;
* a device failure (pyopencl's out-of-resources, a failed build): 503 device_unavailable with
  Retry-After, and the server goes on serving;
* a server bug (any other exception, a RuntimeError included): 500 with a request id that the
  body and X-Request-ID carry and the log names, never a client's runtime_error.
"""

from __future__ import annotations

import logging

import httpx
import numpy as np
import pytest

import clce_client
from clce_client import errors
from tests.support.inprocess import InProcessServer, inject

torch = pytest.importorskip("torch")


@pytest.fixture(scope="module")
def server():
    with InProcessServer(max_batch=1) as srv:
        yield srv


def _batch(rows=4, classes=7, seed=0):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((rows, classes)).astype(np.float32), rng.integers(0, classes, rows)


def _expected(x, t):
    return torch.nn.functional.cross_entropy(torch.from_numpy(x).double(), torch.from_numpy(t)).item()


def test_a_server_bug_is_500_with_a_request_id_never_a_runtime_error(server, caplog):
    x, t = _batch()
    restore = inject(server, RuntimeError("the engine's own bug"), where="prepare")
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
    restore = inject(server, RuntimeError("again"))
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
    restore = inject(server, exc, where)
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
