"""Shared-memory transport end to end: parity with TCP and PyTorch, transport selection, hostile
region references, registration attacks, and faults (truncation attempts, a client killed
mid-request). Real server processes, real memfds, real kills."""

from __future__ import annotations

import fcntl
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time

import httpx
import msgpack
import numpy as np
import pytest

from clce_client import Client
from clce_client.errors import NotFound, PayloadTooLarge
from clce_client.shm import SharedMemoryUnavailable
from clce_wire.shm import recv_frame, send_frame
from tests.support.serverproc import REPO, ServerProcess, server_fixture

torch = pytest.importorskip("torch")

KEY_A, KEY_B = "key-a-0123456789", "key-b-0123456789"
CAP = 64 << 20

server = server_fixture()


@pytest.fixture(scope="module")
def tenants_server(tmp_path_factory):
    path = tmp_path_factory.mktemp("shm") / "tenants.toml"
    path.write_text(f'[tenants.a]\napi_key = "{KEY_A}"\n\n[tenants.b]\napi_key = "{KEY_B}"\n')
    with ServerProcess(tenants=path, args=["--allow-shm", "--shm-max-bytes", str(CAP)]) as srv:
        yield srv


def _batch(rng, n, c, dtype=np.float32):
    return rng.standard_normal((n, c)).astype(dtype), rng.integers(0, c, n)


# ---- parity -------------------------------------------------------------------------------------

GRID = [
    dict(reduction="mean"), dict(reduction="sum"), dict(reduction="none"),
    dict(reduction="mean", label_smoothing=0.1), dict(reduction="mean", ignore_index=3),
    dict(reduction="mean", weighted=True), dict(reduction="sum", weighted=True, label_smoothing=0.2),
    dict(reduction="mean", return_lse=True, return_argmax=True, lse_square_scale=1e-3),
    dict(reduction="mean", soft=True), dict(reduction="mean", spatial=True),
]


@pytest.mark.parametrize("case", GRID, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
def test_shm_equals_tcp_and_torch(server, case):
    rng = np.random.default_rng(7)
    case = dict(case)
    n, c = 37, 53
    x, t = _batch(rng, n, c)
    if case.pop("spatial", False):
        x = rng.standard_normal((4, c, 3, 5)).astype(np.float32)
        t = rng.integers(0, c, (4, 3, 5))
    if case.pop("soft", False):
        t = rng.random(x.shape).astype(np.float32)
        t /= t.sum(1, keepdims=True)
    if case.get("ignore_index") is not None:
        t[::4] = case["ignore_index"]
    w = rng.random(c).astype(np.float32) + 0.5 if case.pop("weighted", False) else None
    with Client(server.url, transport="shm", shm_min_bytes=0) as cs, Client(server.url, transport="tcp") as ct:
        a = cs.cross_entropy(x, t, w, return_grad=True, **case)
        b = ct.cross_entropy(x, t, w, return_grad=True, **case)
        assert cs._arena is not None and ct._arena is None
    for key in ("loss", "grad", "lse", "argmax", "z_loss"):
        va, vb = getattr(a, key), getattr(b, key)
        assert (va is None) == (vb is None), key
        if va is not None:
            assert np.asarray(va).tobytes() == np.asarray(vb).tobytes(), key
    assert a.accuracy == b.accuracy
    xt = torch.tensor(x, requires_grad=True)
    ref = torch.nn.functional.cross_entropy(
        xt, torch.tensor(t), None if w is None else torch.tensor(w),
        **{k: v for k, v in case.items() if k in ("reduction", "ignore_index", "label_smoothing")})
    if not case.get("lse_square_scale"):
        np.testing.assert_allclose(np.asarray(a.loss), ref.detach().numpy(), rtol=1e-5, atol=1e-6)
        ref.sum().backward() if case["reduction"] == "none" else ref.backward()
        np.testing.assert_allclose(a.grad, xt.grad.numpy(), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_autograd_through_shm(server, dtype):
    rng = np.random.default_rng(1)
    x, t = _batch(rng, 256, 1000)      # big enough for "auto" to ask the server about shm
    tdt = getattr(torch, dtype)
    with Client(server.url) as c:            # auto: this host, loopback server -> shared memory
        xs = torch.tensor(x).to(tdt).requires_grad_()
        loss = c.cross_entropy(xs, torch.tensor(t))
        loss.backward()
        assert c._arena is not None
    xr = torch.tensor(x).to(tdt).requires_grad_()
    ref = torch.nn.functional.cross_entropy(xr.float(), torch.tensor(t))
    ref.backward()
    with Client(server.url, transport="tcp") as c:
        xt = torch.tensor(x).to(tdt).requires_grad_()
        lt = c.cross_entropy(xt, torch.tensor(t))
        lt.backward()
    assert torch.equal(loss.detach(), lt.detach())
    assert torch.equal(xs.grad, xt.grad)
    torch.testing.assert_close(xs.grad.float(), xr.grad.float(), rtol=2e-2, atol=1e-4)


@pytest.mark.parametrize("shape,smoothing", [((64, 32000), 0.0), ((33, 4099), 0.1), ((1000, 2000), 0.1),
                                            ((4, 19, 8, 2), 0.0)])
def test_inplace_grad_overwrites_logits_born_in_shared_memory(server, shape, smoothing):
    rng = np.random.default_rng(3)
    x = rng.standard_normal(shape).astype(np.float32)
    t = rng.integers(0, shape[1], (shape[0], *shape[2:]))
    with Client(server.url, transport="shm", shm_min_bytes=0) as c, Client(server.url, transport="tcp") as ct:
        ref = ct.cross_entropy(x, t, return_grad=True, label_smoothing=smoothing)
        xs = c.empty(shape, np.float32)
        xs[...] = x
        before = sum(r.size for r in c._arena._all.values())
        r = c.cross_entropy(xs, t, return_grad=True, inplace_grad=True, label_smoothing=smoothing)
        assert np.shares_memory(r.grad, xs)                    # the gradient is the logits' memory
        added = sum(r.size for r in c._arena._all.values()) - before
        assert added < x.nbytes                                # only the targets' region was added
        assert r.loss.tobytes() == ref.loss.tobytes()
        assert r.grad.tobytes() == ref.grad.tobytes()
        # torch logits born in shared memory, autograd, in place
        xt = c.empty(shape, torch.float32)
        xt.copy_(torch.tensor(x))
        xt.requires_grad_()
        loss = c.cross_entropy(xt, torch.tensor(t), inplace_grad=True, label_smoothing=smoothing)
        loss.backward()
        assert loss.item() == float(ref.loss)
        assert xt.grad.numpy().tobytes() == ref.grad.tobytes()


def test_gradient_held_by_caller_is_never_overwritten(server):
    rng = np.random.default_rng(4)
    with Client(server.url, transport="shm", shm_min_bytes=0) as c:
        x1, t1 = _batch(rng, 16, 300)
        g1 = c.cross_entropy(x1, t1, return_grad=True).grad
        keep = g1.copy()
        for _ in range(3):
            x2, t2 = _batch(rng, 16, 300)
            c.cross_entropy(x2, t2, return_grad=True)
        assert np.array_equal(g1, keep)
        del g1
        before = c._arena.stats["regions"]
        for _ in range(5):       # regions are reused once their arrays are gone
            c.cross_entropy(*_batch(rng, 16, 300), return_grad=True)
        assert c._arena.stats["regions"] == before


# ---- selection ----------------------------------------------------------------------------------

def test_selection_auto_env_and_forced(server, monkeypatch):
    with Client(server.url) as c:
        c.cross_entropy(*_batch(np.random.default_rng(0), 4, 5))
        assert c._arena is None                 # small calls do not ask (TCP is as fast)
        c.cross_entropy(*_batch(np.random.default_rng(0), 128, 1000))
        assert c._arena is not None             # a big one does: this host, loopback -> shm
    monkeypatch.setenv("CLCE_TRANSPORT", "tcp")
    with Client(server.url) as c:
        c.cross_entropy(*_batch(np.random.default_rng(0), 128, 1000))
        assert c.transport == "tcp" and c._arena is None
    with pytest.raises(ValueError):
        Client(server.url, transport="carrier-pigeon")


def test_small_calls_over_shm_send_their_tensors_inline(server):
    with Client(server.url, transport="shm") as c, Client(server.url, transport="tcp") as ct:
        x, t = _batch(np.random.default_rng(0), 64, 10)
        a = c.cross_entropy(x, t, return_grad=True)
        assert c._arena is not None and c._arena.stats["regions"] == 0     # nothing registered
        b = ct.cross_entropy(x, t, return_grad=True)
        assert a.loss.tobytes() == b.loss.tobytes() and a.grad.tobytes() == b.grad.tobytes()


def test_server_without_shm_means_tcp_and_shm_fails_clearly():
    with ServerProcess(args=["--no-allow-shm"]) as srv:
        assert httpx.get(srv.url + "/v1/info").json()["shm"] == {"enabled": False}
        with Client(srv.url) as c:
            loss = c.cross_entropy(*_batch(np.random.default_rng(0), 128, 1000))
            assert c._arena is None and np.isfinite(loss)
        with Client(srv.url, transport="shm", shm_min_bytes=0) as c, pytest.raises(SharedMemoryUnavailable, match="allow"):
            c.cross_entropy(*_batch(np.random.default_rng(0), 4, 5))


# ---- hostile references -------------------------------------------------------------------------

def _memfd(size: int, seal: bool = True) -> int:
    fd = os.memfd_create("t", os.MFD_ALLOW_SEALING)
    os.ftruncate(fd, size)
    if seal:
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW)
    return fd


class RawSession:
    def __init__(self, srv, key):
        path = httpx.get(srv.url + "/v1/info").json()["shm"]["socket"]
        self.sock = socket.socket(socket.AF_UNIX)
        self.sock.connect(path)
        self.hello = self.call({"op": "hello", "api_key": key})

    def call(self, msg, fd=None):
        send_frame(self.sock, msg, fd)
        return recv_frame(self.sock)[0]

    def register(self, name, size, seal=True):
        fd = _memfd(size, seal)
        try:
            return self.call({"op": "register", "name": name, "size": size}, fd), fd
        except BaseException:
            os.close(fd)
            raise


def _post(srv, key, msg):
    body = b"".join(bytes(s) for s in __import__("clce_wire.protocol", fromlist=["x"]).encode_message(msg))
    return httpx.post(srv.url + "/v1/cross_entropy", content=body,
                      headers={"Content-Type": "application/msgpack", "Authorization": f"Bearer {key}"})


def _ref(region, shape=(4, 8), dtype="float32", offset=0):
    return {"dtype": dtype, "shape": list(shape), "region": region, "offset": offset}


def test_hostile_references_get_4xx(tenants_server):
    srv = tenants_server
    a, b = RawSession(srv, KEY_A), RawSession(srv, KEY_B)
    assert a.hello["ok"] and a.hello["tenant"] == "a"
    (ok, fd_a) = a.register("mine", 4096)
    assert ok["ok"], ok
    (ok, fd_b) = b.register("theirs", 4096)
    assert ok["ok"], ok
    tgt = np.zeros(4, np.int64)

    def status(inp, **extra):
        return _post(srv, KEY_A, {"input": inp, "target": tgt, **extra})

    good = status(_ref("mine"))
    assert good.status_code == 200, good.text
    cases = {
        "unknown region": (_ref("nope"), 404),
        "another tenant's region": (_ref("theirs"), 404),
        "a path as name": (_ref("../etc/passwd"), 400),
        "past the end": (_ref("mine", offset=4096 - 64), 400),
        "shape past the end": (_ref("mine", shape=(4, 1000)), 400),
        "negative offset": (_ref("mine", offset=-8), 400),
        "overflowing offset": (_ref("mine", offset=2**64 - 4), 400),
        "overflowing shape": (_ref("mine", shape=(2**62, 2**62)), 400),  # torch: storage size overflows
        "negative dim": (_ref("mine", shape=(4, -8)), 400),
        "unknown dtype": (_ref("mine", dtype="complex64"), 400),
        "misaligned offset": (_ref("mine", offset=2), 400),
        "extra key": ({**_ref("mine"), "path": "/dev/mem"}, 400),
    }
    for what, (inp, code) in cases.items():
        r = status(inp)
        assert r.status_code == code, (what, r.status_code, r.text)
    # the gradient's destination is checked the same way
    for what, extra, code in [("grad into another tenant's", {"grad_region": "theirs"}, 404),
                              ("grad past the end", {"grad_region": "mine", "grad_offset": 4000}, 400),
                              ("negative grad offset", {"grad_region": "mine", "grad_offset": -64}, 400)]:
        r = status(_ref("mine"), return_grad=True, **extra)
        assert r.status_code == code, (what, r.status_code, r.text)
    # wrong shape for the target: PyTorch's own argument error
    r = _post(srv, KEY_A, {"input": _ref("mine"), "target": np.zeros(5, np.int64)})
    assert r.status_code == 400
    # tenant b's region is unchanged, and b can still use it
    r = _post(srv, KEY_B, {"input": _ref("theirs"), "target": tgt})
    assert r.status_code == 200
    for fd in (fd_a, fd_b):
        os.close(fd)
    a.sock.close(), b.sock.close()


def test_registration_refuses_what_could_hurt(tenants_server):
    srv = tenants_server
    s = RawSession(srv, KEY_A)
    reply, fd = s.register("unsealed", 4096, seal=False)         # could be truncated under us
    assert not reply["ok"] and "seal" in reply["error"]["message"]
    f = open(__file__, "rb")                                      # not a memfd
    reply = s.call({"op": "register", "name": "file", "size": 10}, f.fileno())
    f.close()
    assert not reply["ok"] and "memfd" in reply["error"]["message"]
    reply, _ = s.register("a/b", 4096)
    assert not reply["ok"]
    reply = s.call({"op": "register", "name": "nofd", "size": 10})
    assert not reply["ok"]
    reply, _ = s.register("huge", CAP + 4096)                     # beyond the tenant's cap
    assert not reply["ok"] and reply["error"]["code"] == "payload_too_large"
    reply, _ = s.register("small", 4096)
    assert reply["ok"]
    reply, _ = s.register("small", 4096)
    assert not reply["ok"]                                        # names are unique per tenant
    bad = socket.socket(socket.AF_UNIX)
    bad.connect(httpx.get(srv.url + "/v1/info").json()["shm"]["socket"])
    send_frame(bad, {"op": "hello", "api_key": "wrong"})
    assert recv_frame(bad)[0]["error"]["code"] == "unauthorized"
    bad.close()
    s.sock.close()
    with Client(srv.url, api_key=KEY_A, transport="shm", shm_min_bytes=0) as c:
        # a batch over the cap goes as row chunks that fit it (tests/cross_entropy/test_lm_scale.py)...
        n = CAP // 4 // 1000 + 1
        res = c.cross_entropy(np.zeros((n, 1000), np.float32), np.zeros(n, np.int64))
        assert abs(float(res) - np.log(1000)) < 1e-5
        # ...and only a sample larger than the cap is refused
        with pytest.raises(PayloadTooLarge, match="shm_max_bytes"):
            c.cross_entropy(np.zeros((1, CAP // 4), np.float32), np.zeros(1, np.int64), return_grad=True)


# ---- faults -------------------------------------------------------------------------------------

def _info(srv):
    return httpx.get(srv.url + "/v1/info").json()["shm"]


def _wait_reclaimed(srv, timeout=10.0):
    deadline = time.monotonic() + timeout
    while True:
        shm = _info(srv)
        if (shm["regions"], shm["pinned"], shm["pool_held_bytes"]) == (0, 0, 0) or time.monotonic() > deadline:
            return shm
        time.sleep(0.1)


def test_truncating_a_region_mid_request_is_impossible_and_the_server_stays_up(server):
    rng = np.random.default_rng(5)
    x, t = _batch(rng, 2048, 8000)
    with Client(server.url, transport="shm", shm_min_bytes=0) as c, Client(server.url, transport="tcp") as ct:
        xs = c.empty(x.shape, np.float32)
        xs[...] = x
        region = next(iter(c._arena._live.values()))
        import threading
        errors = []

        def attack():
            for _ in range(200):
                try:
                    os.ftruncate(region.fd, 0)
                except OSError as exc:
                    errors.append(exc.errno)
                try:   # the client unmapping its own copy does not touch the server's mapping
                    os.ftruncate(region.fd, region.size // 2)
                except OSError as exc:
                    errors.append(exc.errno)
        th = threading.Thread(target=attack)
        th.start()
        r = c.cross_entropy(xs, t, return_grad=True)
        th.join()
        assert errors and set(errors) == {1}                     # EPERM: sealed against shrinking
        ref = ct.cross_entropy(x, t, return_grad=True)
        assert r.loss.tobytes() == ref.loss.tobytes() and r.grad.tobytes() == ref.grad.tobytes()
    assert httpx.get(server.url + "/healthz").status_code == 200
    assert _wait_reclaimed(server)["regions"] == 0


KILLED_CLIENT = textwrap.dedent("""
    import sys, numpy as np
    sys.path.insert(0, {repo!r})
    from clce_client import Client
    c = Client({url!r}, transport="shm", shm_min_bytes=0)
    x = np.random.default_rng(0).standard_normal((4096, 16000)).astype(np.float32)
    t = np.zeros(4096, np.int64)
    c.cross_entropy(x[:2], t[:2])
    print("ready", flush=True)
    while True:
        c.cross_entropy(x, t, return_grad=True)
""")


def test_client_killed_mid_request_leaves_nothing_held(server):
    proc = subprocess.Popen([sys.executable, "-c", KILLED_CLIENT.format(repo=str(REPO), url=server.url)],
                            stdout=subprocess.PIPE, cwd=REPO)
    try:
        assert proc.stdout.readline().strip() == b"ready"
        deadline = time.monotonic() + 30
        pinned = 0
        while not pinned and time.monotonic() < deadline:   # a request in flight (the one seen, not a re-read)
            pinned = _info(server)["pinned"]
        assert pinned > 0, "no request of the client was ever seen in flight"
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    shm = _wait_reclaimed(server, 30)
    assert (shm["regions"], shm["bytes"], shm["pinned"], shm["pool_held_bytes"]) == (0, 0, 0, 0), shm
    assert httpx.get(server.url + "/healthz").status_code == 200
    with Client(server.url, transport="shm", shm_min_bytes=0) as c:                  # and it still serves
        assert np.isfinite(c.cross_entropy(*_batch(np.random.default_rng(0), 4, 5)))


def test_small_messages_cannot_smuggle_fds_or_crash_the_socket(server):
    path = _info(server)["socket"]
    s = socket.socket(socket.AF_UNIX)
    s.connect(path)
    s.sendall(b"\xff\xff\xff\xff")                                 # a frame too long
    assert recv_frame(s)[0]["ok"] is False
    s.close()
    s = socket.socket(socket.AF_UNIX)
    s.connect(path)
    s.sendall(b"\x00\x00\x00\x03abc")                              # not msgpack
    assert recv_frame(s)[0]["ok"] is False
    s.close()
    s = socket.socket(socket.AF_UNIX)
    s.connect(path)
    send_frame(s, {"op": "register", "name": "x", "size": 1})      # no hello first
    assert recv_frame(s)[0]["ok"] is False
    s.close()
    assert httpx.get(server.url + "/healthz").status_code == 200
    assert msgpack
