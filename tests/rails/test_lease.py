"""The request lease: one owner for what a loss request holds (its byte reservation, pooled body
and gradient, shared-memory pins), given back once on every path.

On the real app over real HTTP (uvicorn in this process, tests/support/inprocess.py, so that a test can
put a failing or a held engine behind the worker), each failure path (decode, schedule, a client
that leaves (499), encode, a device fault) must leave 0 bytes pooled, pinned or reserved. A job
still computing into a request's buffers keeps them until it ends, even after its client left.
"""

from __future__ import annotations

import socket
import weakref
import threading
import time
from urllib.parse import urlparse

import httpx
import numpy as np
import pytest

from clce_wire import options, protocol
from clce_server.rails.hostmem import HostPool
from clce_server.rails.lease import LeaseClosed, RequestLease
from clce_server.rails.recording import RequestRecord

from tests.support.inprocess import FailingEngine, InProcessServer, assert_all_given_back, inject, wait_for

torch = pytest.importorskip("torch")

ROWS, CLASSES = 256, 1024          # 1 MiB of float32 logits: pooled, and watched for disconnects


def _batch(seed=0, rows=ROWS, classes=CLASSES):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((rows, classes)).astype(np.float32), rng.integers(0, classes, rows)


def _body(x, t, **opts) -> bytes:
    msg = options.request_message({"input": x, "target": t, "return_grad": True, **opts})
    return b"".join(bytes(s) for s in protocol.encode_message(msg))


def _post(url, body: bytes) -> httpx.Response:
    return httpx.post(url + "/v1/cross_entropy", content=body, timeout=60,
                      headers={"Content-Type": protocol.MSGPACK})


def _code(resp: httpx.Response) -> str:
    """The error code of an answer (in the request's format: msgpack)."""
    return protocol.decode_message(bytearray(resp.content))["error"]["code"]


@pytest.fixture(scope="module")
def server():
    with InProcessServer(max_batch=1) as srv:
        yield srv


# ---- the lease and the pool alone ----------------------------------------------------------------

def test_a_lease_closes_once_and_gives_back_what_it_took():
    pool = HostPool()
    lease = RequestLease(RequestRecord("r-1"), pool)
    body = lease.buffer(3 << 20)
    grad = lease.array((512, 1024), np.float32)
    assert pool.held_bytes() >= body.nbytes + grad.nbytes
    lease.close()
    assert pool.held_bytes() == 0 and pool.cached_bytes() >= 4 << 20
    with pytest.raises(LeaseClosed):
        lease.close()
    with pytest.raises(LeaseClosed):
        lease.buffer(10)


# ---- every path of a request over HTTP -------------------------------------------------------------

def test_an_answered_request_gives_everything_back(server):
    x, t = _batch()
    resp = _post(server.url, _body(x, t))
    assert resp.status_code == 200, resp.text
    msg = protocol.decode_message(bytearray(resp.content))
    xr = torch.from_numpy(x.astype(np.float64)).requires_grad_(True)
    ref = torch.nn.functional.cross_entropy(xr, torch.from_numpy(t))
    ref.backward()
    assert float(protocol.decode_tensor(msg["loss"])) == pytest.approx(ref.item(), rel=1e-5)
    np.testing.assert_allclose(protocol.decode_tensor(msg["grad"]), xr.grad.numpy(), rtol=1e-4, atol=1e-8)
    assert_all_given_back(server.state)
    # the buffers went back to the pool, not to the OS: the next request reuses their pages
    assert server.state.pool.cached_bytes() >= x.nbytes


def test_a_body_that_does_not_decode_gives_everything_back(server):
    body = bytearray(_body(*_batch(1)))
    body[:1] = b"\xc1"                   # msgpack's never-used byte: not a message
    resp = _post(server.url, bytes(body))
    assert resp.status_code == 400 and _code(resp) == "bad_request", resp.text
    assert_all_given_back(server.state)


@pytest.mark.parametrize("case", ["argument", "deadline"])
def test_a_request_failing_in_the_scheduler_gives_everything_back(server, case):
    x, t = _batch(2)
    if case == "argument":
        t[3] = CLASSES + 5                   # PyTorch's IndexError, raised by the job on its device
        resp = _post(server.url, _body(x, t))
        assert resp.status_code == 400 and _code(resp) == "index_error", resp.text
    else:
        release = threading.Event()
        restore = _hold_engine(server, release)
        try:
            blocker = threading.Thread(target=_post, args=(server.url, _body(*_batch(3))))
            blocker.start()                  # keeps the one device worker busy
            resp = _post(server.url, _body(x, t, deadline_ms=50.0))
        finally:
            release.set()
            restore()
        blocker.join(60)
        assert resp.status_code == 504 and _code(resp) == "deadline_exceeded", resp.text
    assert_all_given_back(server.state)


def test_a_device_fault_gives_everything_back(server):
    import pyopencl as cl

    restore = inject(server, cl.MemoryError("MEM_OBJECT_ALLOCATION_FAILURE"), where="run_chunk")
    try:
        resp = _post(server.url, _body(*_batch(4)))
    finally:
        restore()
    assert resp.status_code == 503 and _code(resp) == "device_unavailable", resp.text
    assert_all_given_back(server.state)


def test_an_answer_that_fails_to_encode_gives_everything_back(server):
    restore = _wrap_finish(server, lambda res: setattr(res, "loss", object()) or res)   # not a wire value
    try:
        resp = _post(server.url, _body(*_batch(5)))
    finally:
        restore()
    assert resp.status_code == 500 and _code(resp) == "internal", resp.text
    assert_all_given_back(server.state)


def test_a_client_that_leaves_mid_job_gets_its_buffers_back_only_when_the_job_ends(server):
    """499: the endpoint returns at once, but the device is still writing the gradient into the
    request's pooled buffer. The buffers go back when the job ends, not before (the pool would
    hand them to the next request while a kernel writes into them)."""
    state = server.state
    release, started = threading.Event(), threading.Event()
    restore = _hold_engine(server, release, started)
    try:
        url = urlparse(server.url)
        body = _body(*_batch(6))
        with socket.create_connection((url.hostname, url.port)) as sock:
            sock.sendall(b"POST /v1/cross_entropy HTTP/1.1\r\nHost: x\r\nContent-Type: application/msgpack\r\n"
                         + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
            # on the device, not just queued: a job the client leaves before it starts gives its
            # buffers back at once (nothing writes into them), which is not what this test is about
            wait_for(started.is_set, "the job to start on the device")
        # the client is gone: the endpoint answers nobody and closes the lease ...
        wait_for(lambda: state.inflight_http == 0, "the endpoint to give up on the request")
        # ... while the job still holds the body and the gradient
        assert state.pool.held_bytes() >= 2 * ROWS * CLASSES * 4
        release.set()
        assert_all_given_back(state)
    finally:
        release.set()
        restore()


# ---- engines that hold or alter a job, behind the real worker -------------------------------------

def _hold_engine(server, release: threading.Event, entered: threading.Event | None = None):
    """The device's engine, except that each chunk waits for `release` first (and sets `entered`
    when one is waiting: the job has started on the device)."""
    index = server.state.devices[0].index
    real = server.state.engines[index]

    def held_chunk(*args, **kwargs):
        if entered is not None:
            entered.set()
        assert release.wait(60), "the test never released the held job"
        return real.run_chunk(*args, **kwargs)

    held = FailingEngine(real, "none", RuntimeError(), 0)
    held.run_chunk = held_chunk
    server.state.engines[index] = held
    return lambda: server.state.engines.__setitem__(index, real)


def _wrap_finish(server, alter):
    index = server.state.devices[0].index
    real = server.state.engines[index]
    wrapped = FailingEngine(real, "none", RuntimeError(), 0)
    wrapped.finish = lambda prep: alter(real.finish(prep))
    server.state.engines[index] = wrapped
    return lambda: server.state.engines.__setitem__(index, real)


# ---- build_app is the whole server ------------------------------------------------------------

def test_build_app_brings_the_pool_size_the_metrics_listener_and_the_body_timeout():
    """Served by a bare uvicorn (no clce_server.__main__): what build_app returns sizes its pool
    from the settings, opens the private metrics listener and cuts off a stalled body."""
    from tests.support.serverproc import free_port

    metrics_port = free_port()
    with InProcessServer(host_pool_bytes=8 << 20, metrics_bind=f"127.0.0.1:{metrics_port}",
                         body_timeout_s=0.5) as srv:
        assert srv.state.pool.max_cached_bytes == 8 << 20
        scraped = httpx.get(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10)
        assert scraped.status_code == 200 and "clce_build_info" in scraped.text
        url = urlparse(srv.url)
        with socket.create_connection((url.hostname, url.port), timeout=30) as sock:
            sock.sendall(b"POST /v1/cross_entropy HTTP/1.1\r\nHost: x\r\nContent-Type: application/msgpack\r\n"
                         b"Content-Length: 1000\r\n\r\n" + b"\x80" * 10)   # and then nothing
            answer = sock.recv(65536)
        assert answer.startswith(b"HTTP/1.1 408 "), answer[:200]
        assert_all_given_back(srv.state)
    # the lifespan closed the listener with the app
    with pytest.raises(httpx.TransportError):
        httpx.get(f"http://127.0.0.1:{metrics_port}/metrics", timeout=2)


# ---- nothing left to the collector ---------------------------------------------------------------

class WatchedPool(HostPool):
    """The server's pool, keeping a weak reference to every buffer it hands out."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.handed_out: list = []

    def backing(self, nbytes):
        buf = super().backing(nbytes)
        self.handed_out.append(weakref.ref(buf))
        return buf


@pytest.mark.parametrize("case", ["answered", "argument_error", "device_fault", "bad_body"])
def test_a_request_s_buffers_are_freed_without_the_garbage_collector(server, case):
    """With the collector off and a pool that keeps nothing, every buffer of a request, answered or
    failed, is gone once the request is over: no reference cycle holds it (its memory would stay
    mapped until a collection ran)."""
    import gc

    import pyopencl as cl

    state = server.state
    pool, state.pool = state.pool, WatchedPool(max_cached_bytes=0)
    x, t = _batch(7)
    body = _body(x, t)
    restore = lambda: None   # noqa: E731
    if case == "argument_error":
        t[0] = CLASSES
        body = _body(x, t)
    elif case == "device_fault":
        restore = inject(server, cl.MemoryError("MEM_OBJECT_ALLOCATION_FAILURE"), where="run_chunk")
    elif case == "bad_body":
        body = b"\xc1" + body[1:]
    gc.collect()
    gc.disable()
    try:
        resp = _post(server.url, body)
        assert_all_given_back(state)
        # the endpoint's last frames unwind a moment after the lease is closed; a cycle never would
        deadline = time.monotonic() + 10
        while (alive := [r for r in state.pool.handed_out if r() is not None]) and time.monotonic() < deadline:
            time.sleep(0.01)
    finally:
        gc.enable()
        restore()
        watched, state.pool = state.pool, pool
    assert resp.status_code == {"answered": 200, "argument_error": 400, "device_fault": 503, "bad_body": 400}[case]
    assert len(watched.handed_out) >= 1 and alive == [], f"{len(alive)} buffer(s) still referenced"
