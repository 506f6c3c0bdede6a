"""One client core (httpx-style): `Client` and `AsyncClient` share one constructor and every step
that does no I/O; the async client keeps blocking work off its event loop; empty() asks the server
about shared memory in both; a failed pipelined chunk stops the others before the error is raised.
Against a real server."""

from __future__ import annotations

import asyncio
import inspect
import threading
import time

import numpy as np
import pytest

import clce_client
from clce_client import client as client_mod
from clce_client import pipeline as pipeline_mod
from clce_client import shm as shm_mod
from clce_client.client import AsyncClient, Client, _BaseClient
from tests.support.serverproc import server_fixture

torch = pytest.importorskip("torch")

server = server_fixture()


def batch(n=512, c=1000, seed=0):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((n, c)).astype(np.float32), rng.integers(0, c, n)


# ---- one core -------------------------------------------------------------------------------------

def test_one_constructor_and_the_subclasses_only_do_io():
    assert Client.__init__ is AsyncClient.__init__ is _BaseClient.__init__
    assert "max_cached_bytes" in inspect.signature(Client).parameters
    # the I/O-free steps are the base's; the sending, sleeping and locking are the subclasses'
    for name in ("_prepare", "_cross_entropy_flow", "_empty_flow", "_shm_choice", "_move_arena", "_finish"):
        assert name in vars(_BaseClient) and name not in vars(Client) and name not in vars(AsyncClient)
    for name in ("_request", "_once", "_send_chunks", "_shm_ready", "_renew_arena", "_run"):
        assert name not in vars(_BaseClient) and name in vars(Client) and name in vars(AsyncClient)
    for cls in (Client, AsyncClient):       # the same validation, once
        with pytest.raises(ValueError, match="transport"):
            cls("http://127.0.0.1:9", transport="pigeon")
        with pytest.raises(ValueError, match="connections"):
            cls("http://127.0.0.1:9", connections=0)


@pytest.mark.parametrize("transport", ["tcp", "pipelined", "shm"])
def test_sync_and_async_give_the_same_bits(server, transport, monkeypatch):
    kw = dict(transport="shm", shm_min_bytes=0) if transport == "shm" else dict(transport="tcp")
    if transport == "pipelined":
        monkeypatch.setattr(pipeline_mod, "MIN_BYTES", 0)
        kw["pipeline_bytes"] = 256 << 10
    x, t = batch()
    with Client(server.url, **kw) as c:
        a = c.cross_entropy(x, t, return_grad=True, return_lse=True, label_smoothing=0.1)

    async def main():
        async with AsyncClient(server.url, **kw) as ac:
            return await ac.cross_entropy(x, t, return_grad=True, return_lse=True, label_smoothing=0.1)

    b = asyncio.run(main())
    for key in ("loss", "grad", "lse"):
        assert np.asarray(getattr(a, key)).tobytes() == np.asarray(getattr(b, key)).tobytes(), key
    assert a.server_timing.get("kernel", 0) > 0 and b.server_timing.get("kernel", 0) > 0
    ref = torch.tensor(x, requires_grad=True)
    loss = torch.nn.functional.cross_entropy(ref, torch.tensor(t), label_smoothing=0.1)
    loss.backward()
    np.testing.assert_allclose(a.loss, loss.item(), rtol=1e-5)
    np.testing.assert_allclose(a.grad, ref.grad.numpy(), rtol=1e-4, atol=1e-7)


# ---- the async client's blocking work runs in threads ---------------------------------------------

def test_async_registration_and_copies_stay_off_the_event_loop(server, monkeypatch):
    """The Unix-socket calls (hello, register) and the copy of the input into shared memory are
    recorded with the thread they ran on: none is the event loop's."""
    threads: dict[str, set[int]] = {"socket": set(), "copy": set()}
    real_call, real_placement = shm_mod._Session.call, shm_mod.Placement.__init__

    def call(self, *a, **k):
        threads["socket"].add(threading.get_ident())
        return real_call(self, *a, **k)

    def placement(self, *a, **k):
        threads["copy"].add(threading.get_ident())
        return real_placement(self, *a, **k)

    monkeypatch.setattr(shm_mod._Session, "call", call)
    monkeypatch.setattr(shm_mod.Placement, "__init__", placement)
    hello = shm_mod._Session.__init__
    monkeypatch.setattr(shm_mod._Session, "__init__",
                        lambda self, *a, **k: (threads["socket"].add(threading.get_ident()), hello(self, *a, **k))[1])
    x, t = batch(1024, 2000)

    async def main():
        loop_thread = threading.get_ident()
        async with AsyncClient(server.url) as ac:             # auto: this host -> shared memory
            r = await ac.cross_entropy(x, t, return_grad=True)
            xs = await ac.empty(x.shape, np.float32)
            xs[...] = x
            r2 = await ac.cross_entropy(xs, t, return_grad=True, inplace_grad=True)
            assert ac._arena is not None
        return loop_thread, r, r2

    loop_thread, r, r2 = asyncio.run(main())
    assert threads["socket"] and threads["copy"]
    assert loop_thread not in threads["socket"] | threads["copy"], threads
    assert r.loss.tobytes() == r2.loss.tobytes() and r.grad.tobytes() == r2.grad.tobytes()


# ---- empty() asks the server in both clients -------------------------------------------------------

def test_async_empty_probes_like_the_sync_one(server):
    """Before any call, empty() asks the server: on this host it gives shared memory, so
    inplace_grad=True writes the gradient into the caller's logits (it used to give ordinary
    memory, and the gradient went into a copy)."""
    x, t = batch(64, 300)

    async def main():
        async with AsyncClient(server.url) as ac:
            xs = await ac.empty(x.shape, np.float32)
            assert ac._arena is not None and ac._arena.locate(xs.ctypes.data, xs.nbytes) is not None
            xs[...] = x
            r = await ac.cross_entropy(xs, t, return_grad=True, inplace_grad=True)
            xt = await ac.empty((4, 5), torch.float32)
            return xs, r, xt

    xs, r, xt = asyncio.run(main())
    assert np.shares_memory(r.grad, xs)
    with Client(server.url) as c:
        ys = c.empty(x.shape, np.float32)
        assert c._arena is not None and c._arena.locate(ys.ctypes.data, ys.nbytes) is not None
    with Client(server.url, transport="tcp") as c:
        ref = c.cross_entropy(x, t, return_grad=True)
    assert r.grad.tobytes() == ref.grad.tobytes() and r.loss.tobytes() == ref.loss.tobytes()
    assert isinstance(xt, torch.Tensor) and xt.shape == (4, 5)


# ---- a failed pipelined chunk stops the others -----------------------------------------------------

CHUNKS = 16


def _pipelined_failure(monkeypatch):
    """A batch of CHUNKS row chunks whose first chunk the server refuses (a target out of range),
    and a record of every write into a chunk's gradient rows, with its time."""
    monkeypatch.setattr(pipeline_mod, "MIN_BYTES", 0)
    x, t = batch(64 * CHUNKS, 4000)
    t[3] = 4000                                     # in chunk 0: IndexError from the server
    writes: list[float] = []
    real_add = client_mod._SplitReader.add

    def add(self, chunk):
        real_add(self, chunk)
        if self.split is not None:
            writes.append(time.monotonic())

    monkeypatch.setattr(client_mod._SplitReader, "add", add)
    return x, t, writes


def _requests_in_flight(monkeypatch, cls):
    """A count of `cls._request` calls (a chunk being sent or received) that have not returned."""
    active, lock, real = [0], threading.Lock(), cls._request

    def enter(delta):
        with lock:
            active[0] += delta

    if inspect.iscoroutinefunction(real):
        async def request(self, *args, **kwargs):
            enter(1)
            try:
                return await real(self, *args, **kwargs)
            finally:
                enter(-1)
    else:
        def request(self, *args, **kwargs):
            enter(1)
            try:
                return real(self, *args, **kwargs)
            finally:
                enter(-1)
    monkeypatch.setattr(cls, "_request", request)
    return active


def _assert_stopped(writes, raised_at, started, in_flight_at_raise):
    # no chunk was still being sent or received when the error was raised: nothing can write into
    # the gradient afterwards (the state itself, not a wait for late writes that might come)
    assert in_flight_at_raise == 0, f"{in_flight_at_raise} chunk(s) still running when the error was raised"
    assert all(w <= raised_at for w in writes), "a chunk wrote into the gradient after the error"
    # and the others were cancelled, not run to the end: far fewer than the 15 good chunks answered
    assert started[0] < CHUNKS


def test_a_failed_chunk_cancels_the_others_before_raising(server, monkeypatch):
    x, t, writes = _pipelined_failure(monkeypatch)
    started = [0]
    real_take = client_mod._ChunkRun.take

    def take(self):
        job = real_take(self)
        started[0] += job is not None
        return job

    monkeypatch.setattr(client_mod._ChunkRun, "take", take)
    in_flight = _requests_in_flight(monkeypatch, Client)
    with Client(server.url, transport="tcp", pipeline_bytes=64 * 4000 * 4, connections=4) as c:
        with pytest.raises(IndexError, match="out of bounds"):
            try:
                c.cross_entropy(x, t, return_grad=True)
            finally:
                raised_at, in_flight_at_raise = time.monotonic(), in_flight[0]
        _assert_stopped(writes, raised_at, started, in_flight_at_raise)
        # the client is still good: the same batch with valid targets
        t[3] = 0
        r = c.cross_entropy(x, t, return_grad=True)
    with Client(server.url, transport="tcp", pipeline_bytes=0) as c:
        ref = c.cross_entropy(x, t, return_grad=True)
    assert r.loss.tobytes() == ref.loss.tobytes() and r.grad.tobytes() == ref.grad.tobytes()


def test_a_failed_chunk_cancels_the_others_before_raising_async(server, monkeypatch):
    x, t, writes = _pipelined_failure(monkeypatch)
    started = [0]
    real_take = client_mod._ChunkRun.take

    def take(self):
        job = real_take(self)
        started[0] += job is not None
        return job

    monkeypatch.setattr(client_mod._ChunkRun, "take", take)
    in_flight = _requests_in_flight(monkeypatch, AsyncClient)

    async def main():
        async with AsyncClient(server.url, transport="tcp", pipeline_bytes=64 * 4000 * 4, connections=4) as ac:
            with pytest.raises(IndexError, match="out of bounds"):
                try:
                    await ac.cross_entropy(x, t, return_grad=True)
                finally:
                    raised_at, in_flight_at_raise = time.monotonic(), in_flight[0]
            return raised_at, in_flight_at_raise

    raised_at, in_flight_at_raise = asyncio.run(main())
    _assert_stopped(writes, raised_at, started, in_flight_at_raise)


def test_the_error_is_clce_s_and_names_the_chunk_s_problem(server, monkeypatch):
    """What the caller gets from a refused chunk is the server's error, as for one request."""
    x, t, _ = _pipelined_failure(monkeypatch)
    with Client(server.url, transport="tcp", pipeline_bytes=64 * 4000 * 4) as c, \
            Client(server.url, transport="tcp", pipeline_bytes=0) as one:
        with pytest.raises(clce_client.ClceIndexError) as chunked:
            c.cross_entropy(x, t, return_grad=True)
        with pytest.raises(clce_client.ClceIndexError) as single:
            one.cross_entropy(x, t, return_grad=True)
    assert str(chunked.value) == str(single.value)


def test_threads_sharing_one_shm_client_never_see_a_false_restart(server):
    """A registration answer arriving while another thread checks whether the socket closed is not
    a restart: 8 threads calling one client with sizes that keep registering new regions all get
    their losses (before the check took the session's lock, some got ArenaLost('the server
    restarted') from a server that never stopped)."""
    import torch
    import torch.nn.functional as F

    client = Client(server.url, transport="shm", shm_min_bytes=0)
    errors, checked = [], []

    def work(seed: int) -> None:
        rng = np.random.default_rng(seed)
        for _ in range(30):
            rows = int(rng.integers(1, 64)) * 16
            x = rng.standard_normal((rows, 1000)).astype(np.float32)
            t = rng.integers(0, 1000, rows)
            try:
                loss = client.cross_entropy(x, t)
            except Exception as exc:      # what this test counts
                errors.append(repr(exc))
                continue
            want = F.cross_entropy(torch.from_numpy(x), torch.from_numpy(t)).item()
            checked.append(abs(float(loss) - want) <= 1e-5 * abs(want))

    threads = [threading.Thread(target=work, args=(seed,)) for seed in range(8)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(120)
    client.close()
    assert not errors, errors[:3]
    assert len(checked) == 8 * 30 and all(checked)
