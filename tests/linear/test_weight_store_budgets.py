"""The fused linear cross-entropy's weight store inside the byte budgets: the red team's five
attacks, each against a real server process.

1. Shape lies: a (6Mi, 1) or (8Mi, 1) weight with 1024 rows asks for a 24-32 GiB (chunk, V)
   scratch. Reserved before it exists: 413 naming the budget (stateless, stored, region-backed);
   with budgets above what the host has, the OS's refusal is 503 with Retry-After, never 500.
2. The store as a free-for-all: zero dimensions, wrong dtypes, long names and versions are 400 at
   PUT; every entry is charged at least a floor; a tenant's entries are capped (429).
3. A flush waits for a long accumulating job without freezing the event loop: /healthz keeps its
   latency.
4. Gradients parked in answers nobody reads count against the tenant's budget until sent: the
   tenant is refused (429) before the server holds more than its budget; closing the sockets
   gives everything back.
5. One budget: stored weights and requests in flight share the tenant's budget and the server's
   cap; a full server refuses with 429 and never evicts another tenant's weights.
And a client that goes away leaves nothing: its unflushed accumulation expires (--weight-idle-s),
a returning raw request is told so, and the client library replays what expired.
"""

from __future__ import annotations

import socket
import statistics
import sys
import textwrap
import threading
import time

import httpx
import numpy as np
import pytest
from tests.support.serverproc import ServerProcess  # noqa: E402
from tests.support.msgpack_http import Shared, body as _body, error as _error, ok as _ok, send as _send  # noqa: E402

from clce_wire import protocol  # noqa: E402

torch = pytest.importorskip("torch")
F = torch.nn.functional

MiB = 1 << 20
KEY_A = "sk-alpha-0123456789abcdef"
KEY_B = "sk-bravo-fedcba9876543210"
ADMIN = "sk-admin-5555aaaa5555aaaa"


def status(url: str, key: str | None = None) -> dict:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.get(url + "/v1/status", headers=headers, timeout=30).json()["scheduler"]


def tenant_row(url: str, tenant: str = "default", key: str | None = None) -> dict:
    return status(url, key)["tenants"][tenant]


def rss(srv: ServerProcess) -> int:
    for line in open(f"/proc/{srv.proc.pid}/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def wait_for(predicate, what: str, timeout: float = 60.0):
    end = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        assert time.monotonic() < end, f"timed out waiting for {what}"
        time.sleep(0.02)


def idle(url: str, key: str | None = None) -> dict:
    """Wait until nothing is in flight but stored weights; the scheduler's byte counts then."""
    def settled():
        s = status(url, key)
        return s if s["inflight_bytes"] == s["stored_bytes"] and s["queued_jobs"] == 0 else None
    return wait_for(settled, "requests to finish")


def healthy(url: str) -> None:
    assert httpx.get(url + "/healthz", timeout=10).status_code == 200


# ---- 1. shape lies -------------------------------------------------------------------------------

def _shape_lie(rows_of_weight: int):
    h = np.ones((1024, 1), np.float32)
    y = np.zeros(1024, np.int64)
    W = np.zeros((rows_of_weight, 1), np.float32)       # a 24-32 MiB body, a 24-32 GiB (1024, V) scratch
    return h, y, W


@pytest.mark.parametrize("vocab", [6 << 20, 8 << 20], ids=["6Mi", "8Mi"])
def test_shape_lies_are_413_before_anything_is_allocated(vocab):
    with ServerProcess() as srv:
        h, y, W = _shape_lie(vocab)
        before = rss(srv)
        need = 1024 * vocab * 4
        for how in ("stateless", "stored", "region"):
            if how == "stateless":
                msg = {"v": 1, "hidden": h, "target": y, "weight": W}
            else:
                shared = Shared(srv.url) if how == "region" else None
                part = shared.put(W) if shared else W
                _ok(_send(srv.url, "PUT", f"/v1/weights/lie-{how}", {"v": 1, "weight_version": "1", "weight": part}))
                msg = {"v": 1, "hidden": h, "target": y, "weight_name": f"lie-{how}", "weight_version": "1"}
            err = _error(_send(srv.url, "POST", "/v1/linear_cross_entropy", msg), 413,
                         "over tenant_max_inflight_bytes=1073741824")
            needs = int(err["message"].split(" needs ")[1].split()[0])
            assert needs >= need, (needs, need)      # the whole (chunk, V) scratch, at least
            assert "--tenant-max-inflight-bytes" in err["message"], err
            if how != "stateless":
                assert _send(srv.url, "DELETE", f"/v1/weights/lie-{how}").status_code == 204
            if how == "region":
                shared.close()
        healthy(srv.url)
        s = idle(srv.url)
        assert s["inflight_bytes"] == s["stored_bytes"] == 0
        # nothing of the GiB scratch was ever made: the server grew by about the bodies it read
        grew = rss(srv) - before
        print(f"shape lie {vocab >> 20}Mi: 413 x3, server RSS +{grew / MiB:.1f} MiB, nothing held")
        assert grew < 8 * W.nbytes, (before, rss(srv))


def test_an_allocation_the_os_refuses_is_503_with_retry_after_never_500():
    """Budgets above what the process may map (RLIMIT_AS 6 GiB): the reservation passes, the
    allocation fails, and the answer is 503 with Retry-After; the server goes on serving."""
    big = str(64 << 30)
    srv = ServerProcess(args=["--max-inflight-bytes", big, "--tenant-max-inflight-bytes", big],
                        command=["prlimit", f"--as={6 << 30}", sys.executable, "-m", "clce_server"])
    with srv:
        h, y, W = _shape_lie(6 << 20)
        resp = _send(srv.url, "POST", "/v1/linear_cross_entropy", {"v": 1, "hidden": h, "target": y, "weight": W})
        err = _error(resp, 503, "could not allocate")
        assert "retry later" in err["message"] and int(resp.headers["Retry-After"]) >= 1
        healthy(srv.url)
        s = idle(srv.url)
        assert s["inflight_bytes"] == 0
        # a request that fits still works
        rng = np.random.default_rng(0)
        hs, Ws, ys = rng.standard_normal((8, 4)).astype(np.float32), rng.standard_normal((10, 4)).astype(np.float32), \
            rng.integers(0, 10, 8)
        got = _ok(_send(srv.url, "POST", "/v1/linear_cross_entropy", {"v": 1, "hidden": hs, "target": ys, "weight": Ws}))
        want = F.cross_entropy(F.linear(torch.from_numpy(hs), torch.from_numpy(Ws)), torch.from_numpy(ys))
        torch.testing.assert_close(torch.tensor(float(got["loss"])), want)


# ---- 2. the store is not a free-for-all ----------------------------------------------------------

def test_the_store_refuses_what_the_operation_cannot_use_and_caps_entries():
    with ServerProcess(args=["--max-stored-weights", "16"]) as srv:
        url = srv.url
        put = lambda name, weight, version="1": _send(url, "PUT", f"/v1/weights/{name}",  # noqa: E731
                                                      {"v": 1, "weight_version": version, "weight": weight})
        for shape in ((0, 0), (0, 16), (16, 0)):
            _error(put("w", np.zeros(shape, np.float32)), 400, "needs a weight with rows and columns")
        for dtype in (np.int32, np.float64):
            _error(put("w", np.zeros((4, 4), dtype)), 400, "runs float32, bfloat16 and float16 weights")
        _error(put("w", np.zeros((4, 4), np.float32), version="v" * 257), 400, "weight_version must be 1-256")
        _error(put("a" * 65, np.zeros((4, 4), np.float32)), 400, "a weight name is 1-64 characters")
        # the red team's 3,000 PUTs of (0, 0) weights under 60 KB names, in short: all refused, nothing kept
        base_rss = rss(srv)
        with httpx.Client(timeout=30) as c:
            for i in range(300):
                r = c.put(f"{url}/v1/weights/{'n' * 60_000}{i}", content=_body(
                    {"v": 1, "weight_version": "1", "weight": np.zeros((0, 0), np.float32)}),
                    headers={"Content-Type": protocol.MSGPACK})
                assert r.status_code in (400, 414, 431), r.status_code
        assert status(url)["stored_bytes"] == 0
        grew = rss(srv) - base_rss
        print(f"300 PUTs of (0, 0) weights under 60 KB names: all refused, RSS +{grew / MiB:.1f} MiB, 0 bytes stored")
        assert grew < 16 * MiB
        # entries are charged at least a floor, and capped per tenant
        for i in range(16):
            _ok(put(f"w{i}", np.ones((1, 1), np.float32)))
        stored = status(url)["stored_bytes"]
        assert stored >= 16 * 4096, stored
        err = _error(put("w16", np.ones((1, 1), np.float32)), 429, "has 16 stored weights")
        assert "--max-stored-weights" in err["message"]
        _ok(put("w3", np.ones((1, 1), np.float32), version="2"))     # a new version is no new entry
        for i in range(16):
            assert _send(url, "DELETE", f"/v1/weights/w{i}").status_code == 204
        assert status(url)["stored_bytes"] == 0
        _ok(put("w16", np.ones((1, 1), np.float32)))


# ---- 3. a flush never blocks the event loop ------------------------------------------------------

def _p99(samples: list[float]) -> float:
    return statistics.quantiles(samples, n=100)[98] if len(samples) >= 2 else samples[0]


def test_a_flush_waits_for_a_long_accumulation_without_freezing_the_server():
    Vb, Hb, R = 8192, 512, 8192          # 8 chunks of 1024 rows: seconds of device work
    rng = np.random.default_rng(1)
    W = (rng.standard_normal((Vb, Hb)) / Hb ** 0.5).astype(np.float32)
    hs = [rng.standard_normal((R, Hb)).astype(np.float32) for _ in range(2)]
    ys = [rng.integers(0, Vb, R) for _ in range(2)]
    with ServerProcess() as srv:
        url = srv.url
        _ok(_send(url, "PUT", "/v1/weights/head", {"v": 1, "weight_version": "1", "weight": W}))
        answers: dict[str, httpx.Response] = {}

        def post(key, path, msg):
            answers[key] = _send(url, "POST", path, msg)

        def phase(i: int, flush: bool) -> list[float]:
            """/healthz latencies while micro-batch i accumulates (and, with `flush`, while a flush
            waits for it)."""
            steps = status(url)["devices"][0]["steps"]
            threads = [threading.Thread(target=post, args=(f"acc{i}", "/v1/linear_cross_entropy", {
                "v": 1, "hidden": hs[i], "target": ys[i], "weight_name": "head", "weight_version": "1",
                "accumulate": True}))]
            threads[0].start()
            wait_for(lambda: status(url)["devices"][0]["steps"] > steps, "the job's first chunk")
            if flush:      # the job holds the version's lock now: the flush must wait for it
                threads.append(threading.Thread(target=post, args=("flush", "/v1/weights/head/grad",
                                                                   {"v": 1, "weight_version": "1"})))
                threads[1].start()
            samples = []
            with httpx.Client(timeout=30) as c:
                while any(t.is_alive() for t in threads):
                    t0 = time.perf_counter()
                    assert c.get(url + "/healthz").status_code == 200
                    samples.append(time.perf_counter() - t0)
                    time.sleep(0.01)
            for t in threads:
                t.join()
            return samples

        base = phase(0, flush=False)
        during = phase(1, flush=True)
        for key in ("acc0", "acc1"):
            assert answers[key].status_code == 200, answers[key].content[:300]
        taken = _ok(answers["flush"])
        assert taken["micro_batches"] == 2     # the flush waited for the running micro-batch
        Wt = torch.from_numpy(W).requires_grad_()
        for h, y in zip(hs, ys):
            F.cross_entropy(F.linear(torch.from_numpy(h), Wt), torch.from_numpy(y)).backward()
        torch.testing.assert_close(torch.from_numpy(taken["grad_weight"]), Wt.grad, rtol=1e-4, atol=1e-6)
        p_base, p_during = _p99(base), _p99(during)
        print(f"/healthz p99: {p_base * 1e3:.1f} ms with the job running, {p_during * 1e3:.1f} ms during its "
              f"flush ({len(base)} and {len(during)} samples; ratio {p_during / p_base:.2f}; "
              f"load {open('/proc/loadavg').read().split()[:3]})")
        # the flush used to hold the event loop for the whole job (2.9-5.8 s)
        assert p_during <= max(2 * p_base, 0.25), (p_base, p_during)


# ---- 4. gradients parked in answers nobody reads -------------------------------------------------

def _unread(url: str, path: str, msg: dict) -> socket.socket:
    """Send a request and never read its answer (a tiny receive buffer: the server's send blocks)."""
    host, port = url.removeprefix("http://").split(":")
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    s.connect((host, int(port)))
    body = _body(msg)
    s.sendall(f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: {protocol.MSGPACK}\r\n"
              f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
    return s


def test_flush_answers_nobody_reads_count_against_the_budget_until_sent():
    Vb, Hb = 8192, 1024                 # a 32 MiB gradient: more than the sockets' buffers hold
    budget = 160 * MiB
    rng = np.random.default_rng(2)
    W = (rng.standard_normal((Vb, Hb)) / Hb ** 0.5).astype(np.float32)
    h = rng.standard_normal((64, Hb)).astype(np.float32)
    y = rng.integers(0, Vb, 64)
    with ServerProcess(args=["--tenant-max-inflight-bytes", str(budget)]) as srv:
        url = srv.url
        _ok(_send(url, "PUT", "/v1/weights/head", {"v": 1, "weight_version": "1", "weight": W}))
        stored = status(url)["stored_bytes"]
        base_rss = rss(srv)
        parked, refused = [], None
        for _ in range(9):             # the red team's 9 pairs
            acc = _send(url, "POST", "/v1/linear_cross_entropy", {"v": 1, "hidden": h, "target": y,
                                                                  "weight_name": "head", "weight_version": "1",
                                                                  "accumulate": True})
            if acc.status_code != 200:
                refused = acc
                break
            parked.append(_unread(url, "/v1/weights/head/grad", {"v": 1, "weight_version": "1"}))
            # its gradient stays counted while it waits to be sent
            wait_for(lambda: status(url)["inflight_bytes"] >= stored + len(parked) * W.nbytes, "the parked answer")
            assert tenant_row(url)["inflight_bytes"] <= budget
        assert refused is not None and 2 <= len(parked) <= 4, len(parked)
        err = _error(refused, 429, "over tenant_max_inflight_bytes=167772160")
        assert "tenant-max-inflight-bytes" in err["message"]
        healthy(url)
        for s in parked:
            s.close()
        s = idle(url)
        assert s["inflight_bytes"] == s["stored_bytes"] == stored
        pool = httpx.get(url + "/v1/info").json()["shm"]["pool_held_bytes"]
        grew = rss(srv) - base_rss
        print(f"unread flush answers: {len(parked)} parked ({len(parked) * W.nbytes / MiB:.0f} MiB counted), then 429; "
              f"after closing: RSS +{grew / MiB:.1f} MiB (pool keeps {pool / MiB:.1f} MiB), held = the stored weight")
        assert grew < pool + 16 * MiB, (base_rss, rss(srv), pool)
        _ok(_send(url, "POST", "/v1/linear_cross_entropy", {"v": 1, "hidden": h, "target": y, "weight_name": "head",
                                                            "weight_version": "1", "accumulate": True}))


# ---- 5. one budget per tenant, and one for the server --------------------------------------------

TENANTS = f"""
[admin]
api_key = "{ADMIN}"

[tenants.a]
api_key = "{KEY_A}"
max_inflight_bytes = {56 * MiB}

[tenants.b]
api_key = "{KEY_B}"
max_inflight_bytes = {56 * MiB}
"""


def test_stored_weights_and_requests_share_the_tenant_budget_and_the_server_cap(tmp_path):
    path = tmp_path / "tenants.toml"
    path.write_text(textwrap.dedent(TENANTS))
    rng = np.random.default_rng(3)
    W = rng.standard_normal((24 * MiB // 256, 64)).astype(np.float32)       # 24 MiB
    W_small = rng.standard_normal((8 * MiB // 256, 64)).astype(np.float32)  # 8 MiB
    with ServerProcess(tenants=path, args=["--max-inflight-bytes", str(64 * MiB)]) as srv:
        url = srv.url

        def send(key, method, path, msg=None):
            return httpx.request(method, url + path, content=None if msg is None else _body(msg), timeout=120,
                                 headers={"Authorization": f"Bearer {key}", "Content-Type": protocol.MSGPACK})

        def put(key, name):
            return send(key, "PUT", f"/v1/weights/{name}", {"v": 1, "weight_version": "1", "weight": W})

        highest = {"a": 0, "b": 0, "server": 0}

        def watch():
            s = status(url, ADMIN)
            for t in ("a", "b"):
                highest[t] = max(highest[t], s["tenants"][t]["inflight_bytes"])
            highest["server"] = max(highest["server"], s["inflight_bytes"])

        for name in ("x", "y", "z"):     # 3 x 24 MiB in a 56 MiB budget: the third evicts the first
            _ok(put(KEY_A, name))
            watch()
        assert status(url, ADMIN)["tenants"]["a"]["stored_bytes"] == 2 * (W.nbytes + 4096 + 2)
        gone = send(KEY_A, "POST", "/v1/weights/x/grad", {"v": 1, "weight_version": "1"})
        _error(gone, 404, "upload it again")
        # a's requests in flight share its budget with its weights: a stateless call (an 8 MiB
        # body, an 8 MiB scratch) evicts y, the least recently used
        h = rng.standard_normal((64, 64)).astype(np.float32)
        y = rng.integers(0, W_small.shape[0], 64)
        got = _ok(send(KEY_A, "POST", "/v1/linear_cross_entropy", {"v": 1, "hidden": h, "target": y,
                                                                   "weight": W_small, "want_grad": False}))
        want = F.cross_entropy(F.linear(torch.from_numpy(h), torch.from_numpy(W_small)), torch.from_numpy(y))
        torch.testing.assert_close(torch.tensor(float(got["loss"])), want, rtol=1e-5, atol=1e-5)
        watch()
        a_stored = status(url, ADMIN)["tenants"]["a"]["stored_bytes"]
        assert a_stored == W.nbytes + 4096 + 2
        _error(send(KEY_A, "POST", "/v1/weights/y/grad", {"v": 1, "weight_version": "1"}), 404, "upload it again")
        # b fills the server's cap: refused with 429 naming it, a's weights untouched
        _ok(put(KEY_B, "p"))
        watch()
        err = _error(put(KEY_B, "q"), 429, "bytes in flight or stored (all tenants)")
        assert "over max_inflight_bytes=67108864" in err["message"] and "--max-inflight-bytes" in err["message"]
        assert status(url, ADMIN)["tenants"]["a"]["stored_bytes"] == a_stored
        # b sees its own row only, with what it is charged
        own = status(url, KEY_B)["tenants"]
        assert list(own) == ["b"] and own["b"]["stored_bytes"] >= W.nbytes
        assert highest["a"] <= 56 * MiB and highest["b"] <= 56 * MiB and highest["server"] <= 64 * MiB, highest
        for key, names in ((KEY_A, "xyz"), (KEY_B, "pq")):
            for name in names:
                send(key, "DELETE", f"/v1/weights/{name}")
        s = idle(url, ADMIN)
        assert s["inflight_bytes"] == s["stored_bytes"] == 0


# ---- a client that goes away leaves nothing ------------------------------------------------------

def test_an_unflushed_accumulation_expires_and_its_returning_client_replays_it():
    import clce_client

    with ServerProcess(args=["--weight-idle-s", "1"]) as srv:
        torch.manual_seed(5)
        W = torch.nn.Parameter(torch.randn(300, 32) / 32 ** 0.5)
        W_ref = torch.nn.Parameter(W.detach().clone())
        with clce_client.Client(srv.url, transport="tcp") as client:
            for _ in range(2):
                h, y = torch.randn(64, 32), torch.randint(0, 300, (64,))
                (client.linear_cross_entropy(h, W, y, weight_name="head", accumulate=True) / 2).backward()
                (F.cross_entropy(F.linear(h, W_ref), y) / 2).backward()
            weights = client.weights
            version = weights._pending["head"].version
            # the client goes quiet: its version and accumulation are dropped, with their bytes
            wait_for(lambda: status(srv.url)["stored_bytes"] == 0, "the idle version to expire", timeout=30)
            err = _error(_send(srv.url, "POST", "/v1/weights/head/grad", {"v": 1, "weight_version": version}),
                         404, "no request used it for 1 s")
            assert "upload it again" in err["message"]
            weights.flush()             # it comes back: the 2 expired micro-batches are replayed
            assert weights.replayed == 2
            torch.testing.assert_close(W.grad, W_ref.grad, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("transport", ["tcp", "shm"])
def test_a_loop_of_new_head_tensors_never_fills_the_stores_names(transport):
    """A torch weight without a weight_name is stored under a name of its own tensor object; once
    the tensor is gone, the client deletes it from the server with its next call. A loop that
    makes a new head tensor each step (a sweep, a test grid) stays under --max-stored-weights, with
    no 429 to wait through (retry_budget_s=0 would raise it)."""
    import gc

    import clce_client

    F = torch.nn.functional
    g = torch.Generator().manual_seed(3)
    h, y = torch.randn(64, 16, generator=g), torch.randint(0, 40, (64,), generator=g)
    with ServerProcess(args=["--max-stored-weights", "3"]) as srv, \
            clce_client.Client(srv.url, transport=transport, retry_budget_s=0) as client:
        for _ in range(10):
            w = torch.randn(40, 16, generator=g)
            loss = client.linear_cross_entropy(h, w, y)
            torch.testing.assert_close(loss, F.cross_entropy(h @ w.T, y), rtol=1e-5, atol=1e-6)
            del w
            gc.collect()
        assert tenant_row(srv.url)["stored_bytes"] <= 3 * 8192, tenant_row(srv.url)
