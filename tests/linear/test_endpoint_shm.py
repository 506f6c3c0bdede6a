"""The fused linear cross-entropy over shared memory (docs/protocol.md, "Fused linear
cross-entropy"): every tensor as a region reference, the gradients written into regions, weights
stored as references, against torch's F.cross_entropy(F.linear(h, W, b), y) and bit for bit
against the same request with inline tensors. Then the refusals (a region gone, read-only,
out of bounds, no shared memory), and the request lease: after answered, refused and abandoned
requests the server holds no pooled buffer, pin or reserved byte.

A real server (tests/support/serverproc.py), real PoCL, real memfds registered through
clce_client.shm.Arena; requests are raw msgpack messages (clce_wire.protocol) sent with httpx."""

from __future__ import annotations

import fcntl
import os
import socket
import time
from urllib.parse import urlparse

import httpx
import ml_dtypes
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from clce_wire.shm import recv_frame, ref_map, send_frame
from tests.support.msgpack_http import Shared, body as _body, error as _error, ok as _ok, send as _send
from tests.support.serverproc import ServerProcess, server_fixture

torch = pytest.importorskip("torch")
F = torch.nn.functional

server = server_fixture()          # binds loopback: shared memory on

N, H, V = 96, 32, 200
BF16 = np.dtype(ml_dtypes.bfloat16)
BF16_TOL = dict(atol=1e-2, rtol=1.6e-2)


# ---- helpers -------------------------------------------------------------------------------------


@pytest.fixture()
def shared(server):
    s = Shared(server.url)
    yield s
    s.close()


def _problem(seed: int, dtype=np.float32, shape=(N,), bias=True):
    rng = np.random.default_rng(seed)
    h = rng.standard_normal((*shape, H)).astype(np.float32).astype(dtype)
    W = (rng.standard_normal((V, H)) / H ** 0.5).astype(np.float32).astype(dtype)
    b = (rng.standard_normal(V) * 0.1).astype(np.float32).astype(dtype) if bias else None
    y = rng.integers(0, V, shape)
    return h, W, b, y


def _torch(h, W, y, b=None, class_weight=None, **opts):
    """Loss and the gradients of h, W, b by torch, in float32 (bf16 inputs widened exactly)."""
    t = lambda a: torch.from_numpy(np.asarray(a, np.float32)).requires_grad_()   # noqa: E731
    ht, Wt = t(h), t(W)
    bt = None if b is None else t(b)
    cw = None if class_weight is None else torch.from_numpy(np.asarray(class_weight, np.float32))
    loss = F.cross_entropy(F.linear(ht, Wt, bt).reshape(-1, W.shape[0]), torch.from_numpy(y).reshape(-1), weight=cw,
                           **opts)
    loss.backward()
    return loss.detach(), ht.grad, Wt.grad, None if bt is None else bt.grad


def _close(got, want, dtype) -> None:
    got = torch.from_numpy(np.asarray(got, np.float32))
    torch.testing.assert_close(got, want.float(), **(BF16_TOL if dtype == BF16 else {}))


def _info(url: str) -> dict:
    return httpx.get(url + "/v1/info").json()["shm"]


def _idle(url: str, timeout_s: float = 30.0) -> dict:
    """Wait until the server holds nothing for a request (pool, pins, reservations, open requests);
    stored weights aside (they hold their share of the budget until replaced, evicted or deleted)."""
    deadline = time.monotonic() + timeout_s
    while True:
        shm = _info(url)
        status = httpx.get(url + "/v1/status").json()
        held = {"pool_held_bytes": shm["pool_held_bytes"], "pinned": shm["pinned"],
                "inflight_bytes": status["scheduler"]["inflight_bytes"] - status["scheduler"]["stored_bytes"],
                "inflight_http": status["inflight_http"]}
        if not any(held.values()) or time.monotonic() > deadline:
            return held
        time.sleep(0.05)


# ---- every field by reference, against torch and against inline ----------------------------------

OPTS = dict(label_smoothing=0.05, ignore_index=7)
FIELDS = ("hidden", "target", "weight", "bias", "class_weight")


@pytest.mark.parametrize("dtype", [np.float32, BF16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("by_ref", [*[(f,) for f in FIELDS], FIELDS], ids=[*FIELDS, "all"])
def test_references_and_gradient_regions_equal_inline_and_torch(server, shared, dtype, by_ref):
    h, W, b, y = _problem(1, dtype, shape=(3, 32))
    y[:, ::5] = OPTS["ignore_index"]
    cw = np.random.default_rng(2).uniform(0.5, 1.5, V).astype(np.float32)
    inline = {"v": 1, "hidden": h, "target": y, "weight": W, "bias": b, "class_weight": cw, **OPTS}
    want = _ok(_send(server.url, "POST", "/v1/linear_cross_entropy", inline))
    msg = {**inline, **{f: shared.put(inline[f]) for f in by_ref}}
    gh, msg_gh = shared.empty(h.shape, dtype)
    gw, msg_gw = shared.empty((V, H), np.float32)
    gh[...] = 7                                  # overwritten, not added to
    gw[...] = 7
    msg.update(grad_region=msg_gh["region"], grad_offset=msg_gh["offset"],
               grad_weight_region=msg_gw["region"], grad_weight_offset=msg_gw["offset"])
    got = _ok(_send(server.url, "POST", "/v1/linear_cross_entropy", msg))
    assert got["grad_hidden"] == msg_gh and got["grad_weight"] == msg_gw          # references, no bytes
    assert got["loss"].tobytes() == want["loss"].tobytes()
    assert gh.tobytes() == want["grad_hidden"].tobytes()
    assert gw.tobytes() == want["grad_weight"].tobytes()
    assert got["grad_bias"].tobytes() == want["grad_bias"].tobytes()
    loss, dh, dW, db = _torch(h, W, y, b, cw, **OPTS)
    _close(got["loss"], loss, dtype)
    _close(gh, dh, dtype)
    _close(gw, dW, dtype)
    _close(got["grad_bias"], db, dtype)


@pytest.mark.parametrize("dtype", [np.float32, BF16], ids=["fp32", "bf16"])
def test_region_weight_stored_once_accumulates_and_its_gradient_lands_in_a_region(server, shared, dtype):
    """PUT with the weight and bias as references; k micro-batches accumulate on the server (their
    hidden gradients into a region); the summed weight gradient is taken into a region, once."""
    h0, W, b, _ = _problem(3, dtype)
    put = _ok(_send(server.url, "PUT", "/v1/weights/head",
                    {"v": 1, "weight_version": "7", "weight": shared.put(W), "bias": shared.put(b)}))
    assert put["weight_version"] == "7"
    k, sums = 3, [0, 0, 0]
    for i in range(k):
        h, _, _, y = _problem(10 + i, dtype)
        gh, ref = shared.empty(h.shape, dtype)
        msg = {"v": 1, "hidden": shared.put(h) if i % 2 else h, "target": y, "weight_name": "head",
               "weight_version": "7", "accumulate": True, "grad_region": ref["region"], "grad_offset": ref["offset"]}
        got = _ok(_send(server.url, "POST", "/v1/linear_cross_entropy", msg))
        assert "grad_weight" not in got and got["grad_hidden"] == ref
        loss, dh, dW, db = _torch(h, W, y, b)
        _close(got["loss"], loss, dtype)
        _close(gh, dh, dtype)
        sums = [sums[0] + dW, sums[1] + db, 0]
    gw, ref = shared.empty((V, H), np.float32)
    taken = _ok(_send(server.url, "POST", "/v1/weights/head/grad",
                      {"v": 1, "weight_version": "7", "grad_weight_region": ref["region"],
                       "grad_weight_offset": ref["offset"]}))
    assert taken["micro_batches"] == k and taken["grad_weight"] == ref
    _close(gw, sums[0], dtype)
    _close(taken["grad_bias"], sums[1], dtype)
    again = _ok(_send(server.url, "POST", "/v1/weights/head/grad", {"v": 1, "weight_version": "7"}))
    assert again["micro_batches"] == 0 and "grad_weight" not in again      # taken once
    # the stateless mode with the stored weight: the weight's gradient into a region too
    h, _, _, y = _problem(20, dtype)
    gw2, ref2 = shared.empty((V, H), np.float32)
    got = _ok(_send(server.url, "POST", "/v1/linear_cross_entropy",
                    {"v": 1, "hidden": h, "target": y, "weight_name": "head", "weight_version": "7",
                     "grad_weight_region": ref2["region"], "grad_weight_offset": ref2["offset"]}))
    loss, dh, dW, db = _torch(h, W, y, b)
    assert got["grad_weight"] == ref2
    _close(gw2, dW, dtype)
    _close(got["grad_hidden"], dh, dtype)
    _close(got["grad_bias"], db, dtype)


def test_a_stored_weight_whose_region_is_gone_answers_upload_again_and_a_new_upload_works(server):
    h, W, b, y = _problem(4)
    first = Shared(server.url)
    _ok(_send(server.url, "PUT", "/v1/weights/gone", {"v": 1, "weight_version": "1", "weight": first.put(W),
                                                       "bias": first.put(b)}))
    msg = {"v": 1, "hidden": h, "target": y, "weight_name": "gone", "weight_version": "1"}
    before = _ok(_send(server.url, "POST", "/v1/linear_cross_entropy", msg))
    first.close()                                      # the client's session ends: its regions go
    deadline = time.monotonic() + 10
    while True:
        resp = _send(server.url, "POST", "/v1/linear_cross_entropy", msg)
        if resp.status_code != 200 or time.monotonic() > deadline:
            break
        time.sleep(0.02)
    err = _error(resp, 404, "upload it again")
    assert err["code"] == "weight_not_stored" and "is gone" in err["message"]
    _error(_send(server.url, "POST", "/v1/linear_cross_entropy", msg), 404, "upload it again")   # and stays so
    second = Shared(server.url)
    try:
        _ok(_send(server.url, "PUT", "/v1/weights/gone", {"v": 1, "weight_version": "1", "weight": second.put(W),
                                                           "bias": second.put(b)}))
        after = _ok(_send(server.url, "POST", "/v1/linear_cross_entropy", msg))
        assert after["loss"].tobytes() == before["loss"].tobytes()
        assert after["grad_hidden"].tobytes() == before["grad_hidden"].tobytes()
    finally:
        second.close()


def test_a_region_weight_counts_only_its_gradient_against_the_budget():
    """The tenant's budget fits the accumulators (fp32 (V, H) + float64 (V,)) but not the weight
    with them: inline, the weight is stored (its calls without accumulate fit) and an accumulating
    call is refused (413, naming the budget); a region-backed upload accumulates."""
    Vb, Hb = 2000, 64
    # the accumulators, a call's scratch (its rows rounded up to 64: a (64, V) and an (H, 64) fp32
    # buffer) with room for its body, and half the weight
    budget = Vb * Hb * 4 + Vb * 8 + 64 * (Vb + Hb) * 4 + (1 << 16) + (Vb * Hb * 4) // 2
    with ServerProcess(args=["--tenant-max-inflight-bytes", str(budget)]) as srv:
        rng = np.random.default_rng(5)
        W = rng.standard_normal((Vb, Hb)).astype(np.float32)
        b = rng.standard_normal(Vb).astype(np.float32)
        _ok(_send(srv.url, "PUT", "/v1/weights/w", {"v": 1, "weight_version": "1", "weight": W, "bias": b}))
        h0 = rng.standard_normal((8, Hb)).astype(np.float32)
        _error(_send(srv.url, "POST", "/v1/linear_cross_entropy",
                     {"v": 1, "hidden": h0, "target": rng.integers(0, Vb, 8), "weight_name": "w",
                      "weight_version": "1", "accumulate": True}),
               413, f"over tenant_max_inflight_bytes={budget}")
        shared = Shared(srv.url)
        try:
            _ok(_send(srv.url, "PUT", "/v1/weights/w", {"v": 1, "weight_version": "1", "weight": shared.put(W),
                                                         "bias": shared.put(b)}))
            h = rng.standard_normal((8, Hb)).astype(np.float32)
            y = rng.integers(0, Vb, 8)
            got = _ok(_send(srv.url, "POST", "/v1/linear_cross_entropy",
                            {"v": 1, "hidden": h, "target": y, "weight_name": "w", "weight_version": "1",
                             "accumulate": True}))
            ht = torch.from_numpy(h)
            loss = F.cross_entropy(F.linear(ht, torch.from_numpy(W), torch.from_numpy(b)), torch.from_numpy(y))
            _close(got["loss"], loss, np.float32)
        finally:
            shared.close()


# ---- refusals ------------------------------------------------------------------------------------

class Peer:
    """A raw session on the registration socket: regions the Arena would not make (read-only)."""

    def __init__(self, url: str):
        self.sock = socket.socket(socket.AF_UNIX)
        self.sock.settimeout(10)
        self.sock.connect(_info(url)["socket"])
        assert self.call({"op": "hello", "api_key": None})["ok"]

    def call(self, msg, fd=None) -> dict:
        send_frame(self.sock, msg, fd)
        reply, fds = recv_frame(self.sock)
        for f in fds:
            os.close(f)
        return reply

    def register(self, name: str, data: bytes, read_only: bool = False) -> None:
        """Register `data` in a memfd; sealed against writes (`read_only`), the server maps it read-only."""
        fd = os.memfd_create("t", os.MFD_ALLOW_SEALING | os.MFD_CLOEXEC)
        try:
            os.ftruncate(fd, len(data))
            os.pwrite(fd, data, 0)
            seals = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | (fcntl.F_SEAL_WRITE if read_only else 0)
            fcntl.fcntl(fd, fcntl.F_ADD_SEALS, seals)
            assert self.call({"op": "register", "name": name, "size": len(data)}, fd)["ok"]
        finally:
            os.close(fd)

    def read_only(self, name: str, data: bytes) -> None:
        self.register(name, data, read_only=True)

    def close(self) -> None:
        self.sock.close()


def test_read_only_regions_are_read_in_place_and_refused_for_gradients(server):
    h, W, b, y = _problem(6)
    peer = Peer(server.url)
    try:
        peer.read_only("ro-w", W.tobytes() + b.tobytes())
        peer.read_only("ro-h", h.tobytes())
        w_ref = ref_map("float32", W.shape, "ro-w", 0)
        b_ref = ref_map("float32", b.shape, "ro-w", W.nbytes)
        # a weight in a read-only region is used where it lies, stored or not
        _ok(_send(server.url, "PUT", "/v1/weights/ro", {"v": 1, "weight_version": "1", "weight": w_ref, "bias": b_ref}))
        loss, dh, dW, db = _torch(h, W, y, b)
        for msg in ({"weight": w_ref, "bias": b_ref}, {"weight_name": "ro", "weight_version": "1"}):
            got = _ok(_send(server.url, "POST", "/v1/linear_cross_entropy",
                            {"v": 1, "hidden": ref_map("float32", h.shape, "ro-h", 0), "target": y, **msg}))
            _close(got["loss"], loss, np.float32)
            _close(got["grad_hidden"], dh, np.float32)
        base = {"v": 1, "hidden": h, "target": y, "weight": W}
        _error(_send(server.url, "POST", "/v1/linear_cross_entropy", {**base, "grad_region": "ro-h"}),
               400, "grad_hidden: region 'ro-h' is read-only")
        _error(_send(server.url, "POST", "/v1/linear_cross_entropy", {**base, "grad_weight_region": "ro-w"}),
               400, "grad_weight: region 'ro-w' is read-only")
        # taking an accumulated gradient into a read-only region is refused before it is taken
        _ok(_send(server.url, "POST", "/v1/linear_cross_entropy",
                  {"v": 1, "hidden": h, "target": y, "weight_name": "ro", "weight_version": "1", "accumulate": True}))
        _error(_send(server.url, "POST", "/v1/weights/ro/grad",
                     {"v": 1, "weight_version": "1", "grad_weight_region": "ro-w"}), 400, "read-only")
        taken = _ok(_send(server.url, "POST", "/v1/weights/ro/grad", {"v": 1, "weight_version": "1"}))
        assert taken["micro_batches"] == 1
        _close(taken["grad_weight"], dW, np.float32)
    finally:
        peer.close()


def test_a_region_registered_anew_under_the_same_name_is_not_the_stored_weight(server):
    """The store remembers the registration it checked, not just the name: a new memfd under the
    old name (other bytes, maybe another size) answers upload again."""
    h, W, b, y = _problem(12)
    peer = Peer(server.url)
    try:
        peer.register("same", W.tobytes())
        _ok(_send(server.url, "PUT", "/v1/weights/same", {"v": 1, "weight_version": "1",
                                                           "weight": ref_map("float32", W.shape, "same", 0)}))
        msg = {"v": 1, "hidden": h, "target": y, "weight_name": "same", "weight_version": "1"}
        _ok(_send(server.url, "POST", "/v1/linear_cross_entropy", msg))
        assert peer.call({"op": "unregister", "name": "same"})["ok"]
        peer.register("same", (2 * W).tobytes())
        _error(_send(server.url, "POST", "/v1/linear_cross_entropy", msg), 404, "is gone")
    finally:
        peer.close()


def test_references_out_of_bounds_or_malformed_are_400_not_500(server, shared):
    h, W, b, y = _problem(7)
    w_ref = shared.put(W)
    region, size = w_ref["region"], next(r.size for r in shared.arena._all.values() if r.name == w_ref["region"])
    base = {"v": 1, "hidden": h, "target": y, "weight": w_ref}
    past = lambda shape, dtype="float32": ref_map(dtype, shape, region, size - 8)   # noqa: E731
    cases = [
        ({"hidden": past(h.shape)}, 400, "past the end of region"),
        ({"target": past(y.shape, "int64")}, 400, "past the end of region"),
        ({"weight": past(W.shape)}, 400, "past the end of region"),
        ({"bias": past(b.shape)}, 400, "past the end of region"),
        ({"class_weight": past((V,))}, 400, "past the end of region"),
        ({"hidden": ref_map("float32", h.shape, region, 2)}, 400, "not a multiple of the float32 item size"),
        ({"hidden": {**ref_map("float32", h.shape, region, 0), "extra": 1}}, 400, "exactly the keys"),
        ({"hidden": ref_map("float32", h.shape, "no-such-region", 0)}, 404, "no shared-memory region"),
        ({"hidden": ref_map("float32", h.shape, "../etc", 0)}, 400, "a region name is"),
        ({"grad_region": region, "grad_offset": size - 4}, 400, "past the end of region"),
        ({"grad_region": region, "grad_offset": -1}, 400, "non-negative integer"),
        ({"grad_region": region, "grad_offset": "0"}, 400, "grad_offset: expected an integer"),
        ({"grad_weight_region": region, "grad_weight_offset": size}, 400, "past the end of region"),
        ({"grad_region": region, "want_grad": False}, 400, "need want_grad"),
        ({"grad_region": 5}, 400, "grad_region: expected a string"),
        ({"v": 2}, 400, "unsupported protocol version 2"),
    ]
    for extra, status, match in cases:
        _error(_send(server.url, "POST", "/v1/linear_cross_entropy", {**base, **extra}), status, match)
    _error(_send(server.url, "PUT", "/v1/weights/x", {"v": 1, "weight_version": "1", "weight": past(W.shape)}),
           400, "past the end of region")
    _error(_send(server.url, "POST", "/v1/linear_cross_entropy",
                 {"v": 1, "hidden": h, "target": y, "weight_name": "nope", "weight_version": "1",
                  "weight": w_ref}), 400, "not both")
    _ok(_send(server.url, "PUT", "/v1/weights/acc", {"v": 1, "weight_version": "1", "weight": w_ref}))
    _error(_send(server.url, "POST", "/v1/linear_cross_entropy",
                 {"v": 1, "hidden": h, "target": y, "weight_name": "acc", "weight_version": "1", "accumulate": True,
                  "grad_weight_region": region}), 400, "stateless mode")
    assert _idle(server.url) == {"pool_held_bytes": 0, "pinned": 0, "inflight_bytes": 0, "inflight_http": 0}


def test_the_request_size_limit_bounds_the_body_not_referenced_bytes():
    """As on the loss path: a tensor referenced in shared memory is the client's memory (bounded by
    its shared-memory budget), not a request body; --max-request-bytes bounds what crosses HTTP."""
    with ServerProcess(args=["--max-request-bytes", "65536"]) as srv:
        shared = Shared(srv.url)
        try:
            rng = np.random.default_rng(7)
            h = rng.standard_normal((600, 32)).astype(np.float32)   # 76,800 bytes referenced, a tiny body
            w = rng.standard_normal((5, 32)).astype(np.float32)
            y = rng.integers(0, 5, 600)
            resp = _send(srv.url, "POST", "/v1/linear_cross_entropy",
                         {"v": 1, "hidden": shared.put(h), "target": y, "weight": w})
            import torch

            ref = torch.nn.functional.cross_entropy(torch.from_numpy(h) @ torch.from_numpy(w).T, torch.from_numpy(y))
            assert abs(float(_ok(resp)["loss"]) - float(ref)) < 1e-5
            # a body over the limit is still refused, naming the limit and the way out
            big = rng.standard_normal((600, 32)).astype(np.float32)
            _error(_send(srv.url, "POST", "/v1/linear_cross_entropy", {"v": 1, "hidden": big, "target": y, "weight": w}),
                   413, "--max-request-bytes")
        finally:
            shared.close()


def test_references_need_shared_memory_and_msgpack(server):
    ref = ref_map("float32", (4, H), "r", 0)
    with ServerProcess(args=["--no-allow-shm"]) as srv:
        assert _info(srv.url) == {"enabled": False}
        h, W, b, y = _problem(8)
        for msg in ({"hidden": ref, "target": y[:4], "weight": W}, {"hidden": h, "target": y, "weight": W,
                                                                    "grad_region": "r"}):
            _error(_send(srv.url, "POST", "/v1/linear_cross_entropy", {"v": 1, **msg}), 400,
                   "does not allow shared memory")
        _error(_send(srv.url, "PUT", "/v1/weights/w", {"v": 1, "weight_version": "1", "weight": ref}), 400,
               "does not allow shared memory")
    # the linear routes speak msgpack only: JSON (with references or not) is refused as such
    for method, path in (("POST", "/v1/linear_cross_entropy"), ("PUT", "/v1/weights/w"),
                         ("POST", "/v1/weights/w/grad")):
        r = httpx.request(method, server.url + path, json={"v": 1, "hidden": ref, "target": [0, 1, 2, 3]})
        assert r.status_code == 415 and "application/msgpack" in r.json()["error"]["message"], r.text


# ---- the request lease: nothing held after answered, refused and abandoned requests ---------------

def _abandon(url: str, body: bytes, partial: bool = False) -> None:
    """Send a request and go: once its job runs (the whole body sent), or mid-body (`partial`)."""
    u = urlparse(url)
    with socket.create_connection((u.hostname, u.port)) as sock:
        sock.sendall(b"POST /v1/linear_cross_entropy HTTP/1.1\r\nHost: x\r\nContent-Type: application/msgpack\r\n"
                     + f"Content-Length: {len(body)}\r\n\r\n".encode() + (body[:len(body) // 2] if partial else body))
        deadline = time.monotonic() + 10
        while not partial and time.monotonic() < deadline:
            if httpx.get(url + "/v1/status").json()["scheduler"]["queued_jobs"]:
                break
            time.sleep(0.002)


def _cancelled(srv) -> int:
    """Requests the server recorded as cancelled (its access log)."""
    return srv.log().count('"outcome": "cancelled"')


def test_after_many_requests_of_every_kind_the_server_holds_nothing(server, shared):
    assert _idle(server.url) == {"pool_held_bytes": 0, "pinned": 0, "inflight_bytes": 0, "inflight_http": 0}
    rng = np.random.default_rng(9)
    Vb, Hb, Nb = 8000, 128, 2048          # a pooled hidden gradient (1 MiB) and a job that takes a while
    W = (rng.standard_normal((Vb, Hb)) / Hb ** 0.5).astype(np.float32)
    h = rng.standard_normal((Nb, Hb)).astype(np.float32)
    y = rng.integers(0, Vb, Nb)
    w_ref, h_ref = shared.put(W), shared.put(h)
    gh, gh_ref = shared.empty(h.shape, np.float32)
    _ok(_send(server.url, "PUT", "/v1/weights/big", {"v": 1, "weight_version": "1", "weight": w_ref}))
    inline = {"v": 1, "hidden": h, "target": y, "weight": W}
    by_ref = {"v": 1, "hidden": h_ref, "target": y, "weight_name": "big", "weight_version": "1",
              "grad_region": gh_ref["region"], "grad_offset": gh_ref["offset"]}
    bad_target = {**inline, "target": np.full(Nb, Vb, np.int64)}
    want = _ok(_send(server.url, "POST", "/v1/linear_cross_entropy", inline))
    cancelled = _cancelled(server)
    for i in range(3):
        assert _ok(_send(server.url, "POST", "/v1/linear_cross_entropy", by_ref))["grad_hidden"] == gh_ref
        assert gh.tobytes() == want["grad_hidden"].tobytes()
        _error(_send(server.url, "POST", "/v1/linear_cross_entropy", bad_target), 400, "out of bounds")
        _error(_send(server.url, "POST", "/v1/linear_cross_entropy", {**by_ref, "weight_version": "2"}), 404,
               "upload it again")
        _error(_send(server.url, "POST", "/v1/linear_cross_entropy", {**inline, "hidden": h[:, :7]}), 400,
               "cannot be multiplied")
        _abandon(server.url, _body(inline))                       # the client goes mid-job
        _abandon(server.url, _body(by_ref))
        _abandon(server.url, _body(inline), partial=True)         # ... and mid-body
        _ok(_send(server.url, "POST", "/v1/weights/big/grad", {"v": 1, "weight_version": "1"}))
    held = _idle(server.url)
    assert held == {"pool_held_bytes": 0, "pinned": 0, "inflight_bytes": 0, "inflight_http": 0}, held
    assert _cancelled(server) - cancelled == 9          # every abandon was one, mid-job or mid-body
    assert httpx.get(server.url + "/healthz").status_code == 200


def test_an_accumulating_request_whose_client_goes_still_adds_its_whole_micro_batch(server, shared):
    """Stopped part way, the version's sum would hold part of a micro-batch: the job runs to its
    end, and the gradient taken afterwards is the whole micro-batch's."""
    rng = np.random.default_rng(14)
    Vb, Hb, Nb = 8000, 128, 2048
    W = (rng.standard_normal((Vb, Hb)) / Hb ** 0.5).astype(np.float32)
    h = rng.standard_normal((Nb, Hb)).astype(np.float32)
    y = rng.integers(0, Vb, Nb)
    _ok(_send(server.url, "PUT", "/v1/weights/left", {"v": 1, "weight_version": "1", "weight": shared.put(W)}))
    cancelled = _cancelled(server)
    _abandon(server.url, _body({"v": 1, "hidden": shared.put(h), "target": y, "weight_name": "left",
                                "weight_version": "1", "accumulate": True}))
    assert _idle(server.url) == {"pool_held_bytes": 0, "pinned": 0, "inflight_bytes": 0, "inflight_http": 0}
    assert _cancelled(server) == cancelled                # answered (to nobody), not cancelled
    taken = _ok(_send(server.url, "POST", "/v1/weights/left/grad", {"v": 1, "weight_version": "1"}))
    assert taken["micro_batches"] == 1
    _, _, dW, _ = _torch(h, W, y)
    _close(taken["grad_weight"], dW, np.float32)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.dictionaries(
    st.sampled_from(["hidden", "target", "weight", "bias", "class_weight", "grad_region", "grad_offset",
                     "grad_weight_region", "grad_weight_offset", "weight_name", "weight_version", "accumulate",
                     "want_grad", "reduction", "shift", "v"]),
    st.one_of(st.none(), st.booleans(), st.integers(-2**63, 2**64 - 1), st.text(max_size=8),
              st.sampled_from(["float32", "r", ".."]),
              st.fixed_dictionaries({"dtype": st.sampled_from(["float32", "int64", "bfloat16", "x"]),
                                     "shape": st.lists(st.integers(-2, 1 << 40), max_size=3),
                                     "region": st.text(max_size=4), "offset": st.integers(-8, 2**64 - 1)})),
    max_size=6))
def test_malformed_messages_are_answered_never_500(server, shared, fields):
    h, W, b, y = _problem(11, shape=(4,))
    msg = {"v": 1, "hidden": h, "target": y, "weight": W, **fields}
    if fields.get("grad_region") == "r":
        msg["grad_region"] = shared.put(h)["region"]
    resp = _send(server.url, "POST", "/v1/linear_cross_entropy", msg)
    assert resp.status_code in (200, 400, 404, 413), (resp.status_code, resp.content[:300], fields)
