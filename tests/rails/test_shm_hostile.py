"""A hostile neighbour on the server's host, against the shared-memory registration socket and what
tenants can learn (issue 18). Every attack runs for real: a real server (tests/support/serverproc.py), real
Unix sockets and memfds, attacker processes of their own (some under another uid, `nobody`, via
the system Python, which that uid can run), killed with SIGKILL, and RLIMIT_NOFILE lowered in the
running server (prlimit) to reach EMFILE.

After each attack: no answer of 500, the other tenant's session and regions intact (a request
over them still answers exactly), nothing held that the attacker had, and registration alive.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import resource
import signal
import socket
import stat
import struct
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import httpx
import msgpack
import pytest

from clce_wire import protocol
from clce_wire.shm import recv_frame, send_frame
from tests.support.serverproc import REPO, ServerProcess, ServerStartError
from tests.support.shm_peers import (ADMIN_KEY, CAP, KEYS, MiB, T, X, Bystander, Peer, assert_exact, bearer, error_of,
                                     info, loss_over, memfd, registration_alive, server_fds, server_threads,
                                     shm_server, socket_path, steady_fds, tenants_file, wait_for)

pytestmark = pytest.mark.timeout(300)

NOBODY = 65534
SYSTEM_PYTHON = "/usr/bin/python3"     # runnable by `nobody` (the venv lives under /root)
can_switch_uid = pytest.mark.skipif(os.geteuid() != 0 or not os.access(SYSTEM_PYTHON, os.X_OK),
                                    reason="needs root (to run an attacker as another uid) and /usr/bin/python3")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    # nobody (65534) may connect: the socket is then 0666 and SO_PEERCRED the gate
    with shm_server(tmp_path_factory.mktemp("hostile"), "--shm-allowed-uids", f"0,{NOBODY}") as srv:
        yield srv


def quiet(srv, key) -> None:
    """Every region of tenant `key` reclaimed."""
    wait_for(lambda: info(srv, key)["shm"]["regions"] == 0, what="the tenant's regions to be reclaimed")


# ---- 1. idle connections from anyone on the host -------------------------------------------------

IDLE_FLOOD = textwrap.dedent("""
    import json, socket, struct, sys
    path, n = sys.argv[1], int(sys.argv[2])
    socks = []
    for _ in range(n):
        s = socket.socket(socket.AF_UNIX)
        s.connect(path)              # blocking: waits while the backlog is full
        s.settimeout(5)
        socks.append(s)
    print("open", len(socks), flush=True)
    sys.stdin.readline()
    codes = {}
    for s in socks:
        try:
            head = s.recv(4, socket.MSG_WAITALL)
            body = s.recv(struct.unpack(">I", head)[0], socket.MSG_WAITALL) if len(head) == 4 else b""
            code = "frame" if body else "closed"
            if b"queue_full" in body: code = "queue_full"
            if b"unauthorized" in body: code = "unauthorized"
        except OSError as exc:
            code = type(exc).__name__
        codes[code] = codes.get(code, 0) + 1
    print(json.dumps(codes), flush=True)
""")


@can_switch_uid
def test_a_thousand_idle_connections_from_another_uid_cost_no_threads_and_block_nobody(server):
    bystander = Bystander(server)
    threads, fds = server_threads(server), server_fds(server)
    refusals = info(server, ADMIN_KEY)["shm"]["refusals"]
    flood = subprocess.Popen([SYSTEM_PYTHON, "-c", IDLE_FLOOD, socket_path(server), "1000"], user=NOBODY,
                             group=NOBODY, extra_groups=[], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert flood.stdout.readline().split() == ["open", "1000"]
        wait_for(lambda: info(server, ADMIN_KEY)["shm"]["refusals"] >= refusals + 984, what="the flood refused")
        # during the flood: no thread per peer, descriptors bounded by the per-uid limit (16)
        assert server_threads(server) <= threads + 1
        assert server_fds(server) <= fds + 16 + 2
        registration_alive(server)           # another uid's tenant registers and computes meanwhile
        bystander.check()
        # past the hello deadline (1 s): the 16 admitted have been told they never said hello
        wait_for(lambda: info(server, ADMIN_KEY)["shm"]["refusals"] >= refusals + 1000,
                 what="the admitted peers told they never said hello")
        flood.stdin.write("go\n")
        flood.stdin.flush()
        codes = json.loads(flood.stdout.readline())
    finally:
        flood.kill()
        flood.wait()
    # 16 admitted, each told after its second that it never said hello; the rest refused at once
    assert codes == {"unauthorized": 16, "queue_full": 984}, codes
    wait_for(lambda: server_fds(server) <= fds, what="the flood's descriptors to be closed")
    bystander.check()
    log = server.log()
    assert "refused a connection of uid=65534" in log and "no hello within 1 s" in log
    bystander.close()
    quiet(server, KEYS["b"])


@can_switch_uid
def test_a_uid_off_the_allow_list_is_told_so(tmp_path):
    with shm_server(tmp_path, "--shm-allowed-uids", "0") as srv:
        path = socket_path(srv)
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o666       # the allow-list is the gate
        probe = textwrap.dedent("""
            import socket, struct, sys
            s = socket.socket(socket.AF_UNIX); s.settimeout(10); s.connect(sys.argv[1])
            head = s.recv(4, socket.MSG_WAITALL)
            print(s.recv(struct.unpack(">I", head)[0], socket.MSG_WAITALL).decode("latin-1"))
        """)
        out = subprocess.run([SYSTEM_PYTHON, "-c", probe, path], user=NOBODY, group=NOBODY, extra_groups=[],
                             capture_output=True, text=True, timeout=30).stdout
        assert "unauthorized" in out and "uid 65534 may not use this socket" in out, out
        registration_alive(srv)
        assert "refused a connection of uid=65534" in srv.log()


# ---- 2. the accept loop survives EMFILE; and refuses before the process's limit -------------------

def test_emfile_at_accept_is_survived_and_the_limit_is_answered_before_it(tmp_path):
    with shm_server(tmp_path) as srv:
        bystander = Bystander(srv)
        pid = srv.proc.pid
        socket_path(srv)                      # asked over HTTP now: HTTP cannot accept under EMFILE
        soft, hard = resource.prlimit(pid, resource.RLIMIT_NOFILE)
        baseline = server_fds(srv)
        try:
            # below the descriptors already open: accept() fails with EMFILE
            resource.prlimit(pid, resource.RLIMIT_NOFILE, (8, hard))
            stuck = Peer(srv, hello=False, timeout=15)
            send_frame(stuck.sock, {"op": "hello", "api_key": KEYS["a"]})
            wait_for(lambda: "Too many open files" in srv.log(), what="the EMFILE log line")
            time.sleep(0.5)
        finally:
            resource.prlimit(pid, resource.RLIMIT_NOFILE, (soft, hard))
        # once descriptors are back, the waiting peer is served (or was told why it was not)
        reply, _ = recv_frame(stuck.sock)
        assert reply["ok"] or (reply["error"]["code"] == "queue_full" and "descriptors" in reply["error"]["message"]), reply
        stuck.close()
        registration_alive(srv)
        bystander.check()
        assert "accept failed" in srv.log()

        # a limit close above what is open: refusals answered well before EMFILE
        wait_for(lambda: server_fds(srv) <= baseline, what="descriptors back to the baseline")
        resource.prlimit(pid, resource.RLIMIT_NOFILE, (server_fds(srv) + 48, hard))
        try:
            greedy = Peer(srv, KEYS["a"])
            replies = [greedy.register(f"g{i}", memfd(4096)) for i in range(48)]
            refused = [r for r in replies if not r["ok"]]
            assert refused and all(r["error"]["code"] == "queue_full" and "descriptor limit" in r["error"]["message"]
                                   for r in refused), refused[:2]
            assert greedy.call({"op": "ping"}) == {"ok": True}     # refused, not dropped
            bystander.check()                                       # the neighbour is untouched
            greedy.close()
            quiet(srv, KEYS["a"])
        finally:
            resource.prlimit(pid, resource.RLIMIT_NOFILE, (soft, hard))
        registration_alive(srv)
        log = srv.log()
        assert "near its descriptor limit" in log
        assert log.count("Too many open files") == log[:log.find("near its descriptor limit")].count("Too many open files")
        bystander.close()


# ---- 3. a client that dies inside a frame with descriptors attached --------------------------------

DIES_MID_FRAME = textwrap.dedent("""
    import os, socket, struct, sys, fcntl, time
    sys.path.insert(0, {repo!r})
    from clce_wire.shm import send_frame, recv_frame
    s = socket.socket(socket.AF_UNIX); s.connect({path!r})
    send_frame(s, {{"op": "hello", "api_key": {key!r}}}); assert recv_frame(s)[0]["ok"]
    fd = os.memfd_create("big", os.MFD_ALLOW_SEALING); os.ftruncate(fd, {size})
    fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW)
    send_frame(s, {{"op": "register", "name": "held", "size": {size}}}, fd); assert recv_frame(s)[0]["ok"]
    # part of a frame, with this very socket attached: held by the server, it would keep the
    # connection open after this process dies
    socket.send_fds(s, [struct.pack(">I", 200) + b"\\x83"], [s.fileno()])
    print("sent", flush=True)
    time.sleep(600)
""")


def test_a_client_killed_inside_a_frame_with_descriptors_is_reclaimed(server):
    bystander = Bystander(server)
    fds = server_fds(server)
    size = CAP - 4 * MiB
    proc = subprocess.Popen([sys.executable, "-c", DIES_MID_FRAME.format(repo=str(REPO), path=socket_path(server),
                                                                         key=KEYS["a"], size=size)],
                            stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "sent"
        assert info(server, KEYS["a"])["shm"]["bytes"] == size
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    quiet(server, KEYS["a"])                     # within the frame deadline (1 s)
    assert info(server, KEYS["a"])["shm"]["bytes"] == 0
    p = Peer(server, KEYS["a"])                  # the tenant's cap is free again
    assert p.register("again", memfd(size))["ok"]
    p.close()
    quiet(server, KEYS["a"])
    wait_for(lambda: server_fds(server) <= fds, what="every descriptor of the dead client closed")
    bystander.check()
    assert "a frame did not arrive whole within 1 s" in server.log()
    bystander.close()
    quiet(server, KEYS["b"])


# ---- 4. what is held is what is charged; one descriptor per region ---------------------------------

def test_the_real_size_is_charged_and_a_declared_size_that_differs_is_refused(server):
    p = Peer(server, KEYS["a"])
    big = memfd(128 * MiB, data=b"x" * 4096)
    reply = p.register("small-lie", os.dup(big), size=4096)
    assert reply["error"]["code"] == "bad_request" and f"holds {128 * MiB} bytes, not the 4096" in reply["error"]["message"]
    reply = p.register("honest-but-big", big)                                # beyond the tenant's cap
    assert reply["error"]["code"] == "payload_too_large", reply
    reply = p.register("may-grow", memfd(4096, seals=fcntl.F_SEAL_SHRINK))   # could grow once charged
    assert reply["error"]["code"] == "bad_request" and "growing" in reply["error"]["message"]
    assert p.register("honest", memfd(8192))["ok"]
    shm = info(server, KEYS["a"])["shm"]
    assert (shm["scope"], shm["regions"], shm["bytes"]) == ("tenant", 1, 8192)
    p.close()
    quiet(server, KEYS["a"])


def test_each_region_costs_one_descriptor_and_all_come_back(server):
    fds = steady_fds(server)
    p = Peer(server, KEYS["a"])
    for i in range(40):
        assert p.register(f"r{i}", memfd(4096))["ok"]
    assert server_fds(server) - fds == 40 + 1            # the regions' mappings, and the connection
    assert info(server, ADMIN_KEY)["shm"]["descriptors"] >= 41
    p.close()
    quiet(server, KEYS["a"])
    wait_for(lambda: server_fds(server) <= fds, what="every region's descriptor closed")


def test_caps_across_tenants_are_answered(tmp_path):
    with shm_server(tmp_path, "--shm-max-total-bytes", str(96 * MiB), "--shm-max-regions", "3") as srv:
        a, b = Peer(srv, KEYS["a"]), Peer(srv, KEYS["b"])
        assert a.register("a1", memfd(60 * MiB))["ok"]
        reply = b.register("b1", memfd(60 * MiB))               # within b's cap, beyond the server's
        assert reply["error"]["code"] == "queue_full" and "for all tenants" in reply["error"]["message"]
        assert b.register("b2", memfd(4096))["ok"] and a.register("a2", memfd(4096))["ok"]
        reply = b.register("b3", memfd(4096))                   # the fourth region on the server
        assert reply["error"]["code"] == "queue_full" and "regions" in reply["error"]["message"]
        shm = info(srv, ADMIN_KEY)["shm"]
        assert (shm["scope"], shm["regions"], shm["bytes"], shm["tenants"]) == ("server", 3, 60 * MiB + 8192, 2)
        a.close(), b.close()
        wait_for(lambda: info(srv, ADMIN_KEY)["shm"]["regions"] == 0, what="reclaim")


# ---- 5. every registration answered: seal sets, read-only descriptors, hugetlb ---------------------

def _pipe_read_end() -> int:
    r, w = os.pipe()
    os.close(w)
    return r


def _reopen(fd: int, flags: int) -> int:
    new = os.open(f"/proc/self/fd/{fd}", flags | os.O_CLOEXEC)
    os.close(fd)
    return new


def test_seal_sets_read_only_and_hugetlb_memfds_are_answered_and_the_session_survives(server):
    p = Peer(server, KEYS["a"])
    assert p.register("base", memfd(X.nbytes, data=X.tobytes()))["ok"]
    sg = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW
    future_write = getattr(fcntl, "F_SEAL_FUTURE_WRITE", 0x10)
    read_only = {
        "sealed-write": memfd(X.nbytes, sg | fcntl.F_SEAL_WRITE, X.tobytes()),
        "sealed-future-write": memfd(X.nbytes, sg | future_write, X.tobytes()),
        "reopened-read-only": _reopen(memfd(X.nbytes, data=X.tobytes()), os.O_RDONLY),
    }
    for name, fd in read_only.items():
        assert p.register(name, fd)["ok"], name
        assert_exact(loss_over(server, KEYS["a"], name))                         # read where it lies
        r = loss_over(server, KEYS["a"], "base", return_grad=True, grad_region=name)
        assert r.status_code == 400 and "read-only" in error_of(r)["message"], (name, r.content)
    refused = {
        "shrink-and-write-only": (memfd(X.nbytes, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_WRITE), "growing"),
        "reopened-write-only": (_reopen(memfd(X.nbytes), os.O_WRONLY), "write-only"),
        "a-pipe": (_pipe_read_end(), "memfd"),
        "its-own-socket": (os.dup(p.sock.fileno()), "memfd"),
    }
    try:
        huge = os.memfd_create("huge", os.MFD_ALLOW_SEALING | os.MFD_HUGETLB | os.MFD_CLOEXEC)
        os.ftruncate(huge, 2 * MiB)
        fcntl.fcntl(huge, fcntl.F_ADD_SEALS, sg)
    except OSError:
        huge = None                              # no hugetlbfs here: nothing to send
    if huge is not None:
        reply = p.register("hugetlb", huge)
        assert reply["ok"] or "huge pages" in reply["error"]["message"], reply
    for name, (fd, why) in refused.items():
        reply = p.register(name, fd, size=X.nbytes)
        assert reply["ok"] is False and why in reply["error"]["message"], (name, reply)
        assert reply["error"]["code"] in protocol.ERROR_CODES
    assert p.call({"op": "ping"}) == {"ok": True}                    # the session is intact
    assert_exact(loss_over(server, KEYS["a"], "base"))
    log = server.log()
    for name in refused:                                               # and every refusal logged
        assert re.search(r"refused register: bad_request: .*", log)
    assert log.count("refused register") >= len(refused)
    p.close()
    quiet(server, KEYS["a"])


# ---- 6. references get the shape checks inline tensors get -----------------------------------------

def test_zero_size_references_with_huge_dimensions_get_the_inline_answer(server):
    p = Peer(server, KEYS["a"])
    assert p.register("z", memfd(4096))["ok"]

    def post(inp, tgt):   # packed by hand: the client's encoder refuses such shapes before they leave
        body = msgpack.packb({"input": inp, "target": tgt}, use_bin_type=True)
        return httpx.post(server.url + "/v1/cross_entropy", content=body, timeout=30,
                          headers={"Content-Type": protocol.MSGPACK, **bearer(KEYS["a"])})

    def ref(shape, dtype="float32"):
        return {"dtype": dtype, "shape": shape, "region": "z", "offset": 0}

    def inline(shape, dtype="float32"):
        return {"dtype": dtype, "shape": shape, "data": b""}

    cases = [([0, 2**64 - 1], [0], "input"), ([2**63, 0], [2**63], "input"), ([0, 4], [2**63 - 1, 0], "target"),
             ([0, 2**61], [0], "input"), ([2**62, 4, 0], [0], "input")]
    for x_shape, t_shape, which in cases:
        tgt_inline = inline(t_shape, "int64")
        by_ref = post(ref(x_shape), tgt_inline) if which == "input" else post(inline(x_shape), ref(t_shape, "int64"))
        by_value = post(inline(x_shape), tgt_inline)
        assert 400 <= by_ref.status_code < 500, (x_shape, t_shape, by_ref.status_code, by_ref.content)
        assert by_ref.status_code == by_value.status_code, (x_shape, by_ref.content, by_value.content)
        assert error_of(by_ref)["code"] == error_of(by_value)["code"], (x_shape, t_shape)
    p.close()
    quiet(server, KEYS["a"])


# ---- 7. rule breakers: answered, logged, closed; their regions reclaimed, nobody else's touched ----

def test_rule_breakers_are_answered_logged_closed_and_reclaimed(server):
    bystander = Bystander(server)

    def breaker(hello=True):
        p = Peer(server, KEYS["a"] if hello else None, hello=hello)
        if hello:
            assert p.register("mine", memfd(4096))["ok"]
        return p

    def answered_then_closed(p, code, fragment):
        reply, _ = recv_frame(p.sock)
        assert reply["ok"] is False and reply["error"]["code"] == code and fragment in reply["error"]["message"], reply
        assert p.closed_by_server()
        p.close()
        quiet(server, KEYS["a"])

    p = breaker()
    p.sock.sendall(struct.pack(">I", 1 << 20))
    answered_then_closed(p, "bad_request", "exceeds")
    p = breaker()
    p.sock.sendall(struct.pack(">I", 3) + b"\xc1\xc1\xc1")
    answered_then_closed(p, "bad_request", "undecodable")
    p = breaker()
    a, b = memfd(4096), memfd(4096)
    socket.send_fds(p.sock, [struct.pack(">I", 1) + b"\x80"], [a, b])
    os.close(a), os.close(b)
    answered_then_closed(p, "bad_request", "at most one descriptor")
    p = breaker(hello=False)
    send_frame(p.sock, {"op": "register", "name": "x", "size": 1})
    answered_then_closed(p, "bad_request", "first frame must be")
    p = breaker(hello=False)
    send_frame(p.sock, {"op": "hello", "api_key": "sk-wrong-0000000000"})
    answered_then_closed(p, "unauthorized", "API key")
    p = breaker()                                    # a frame dripped a byte at a time
    for byte in struct.pack(">I", 20)[:3]:
        p.sock.sendall(bytes([byte]))
        time.sleep(0.4)
    answered_then_closed(p, "bad_request", "did not arrive whole")
    p = breaker()                                    # pings, never reading the answers
    refusals = info(server, ADMIN_KEY)["shm"]["refusals"]
    p.sock.setblocking(False)
    ping = struct.pack(">I", 9) + b"\x81\xa2op\xa4ping"
    sent = 0
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            sent += p.sock.send(ping * 64)
        except BlockingIOError:
            break
    # past the write deadline for its answers: refused (and closed) before this test reads a byte
    wait_for(lambda: info(server, ADMIN_KEY)["shm"]["refusals"] > refusals, what="the unread answers refused")
    p.sock.settimeout(10)
    assert p.closed_by_server()
    p.close()
    quiet(server, KEYS["a"])
    bystander.check()
    log = server.log()
    assert "answers were not read in time" in log and "did not arrive whole" in log and "; disconnected" in log
    registration_alive(server)
    bystander.close()
    quiet(server, KEYS["b"])


# ---- 8. tenants learn nothing of each other ----------------------------------------------------------

def test_info_status_and_request_ids_tell_a_tenant_nothing_of_the_others(server):
    public = info(server)
    assert set(public) == {"name", "version", "protocol", "auth_required", "ready", "shm"}, public
    assert set(public["shm"]) == {"enabled", "host_id", "socket"}
    assert httpx.get(server.url + "/v1/info", headers=bearer("sk-wrong-0000000000")).status_code == 401
    b = Peer(server, KEYS["b"])
    assert b.register("b-secret", memfd(3 * MiB))["ok"]
    mine = info(server, KEYS["a"])
    assert mine["shm"]["scope"] == "tenant" and (mine["shm"]["regions"], mine["shm"]["bytes"]) == (0, 0)
    assert mine["devices"] and mine["limits"]
    assert "pool_held_bytes" not in mine["shm"] and "descriptors" not in mine["shm"]
    theirs = info(server, KEYS["b"])["shm"]
    assert (theirs["regions"], theirs["bytes"]) == (1, 3 * MiB)
    admin = info(server, ADMIN_KEY)["shm"]
    assert admin["scope"] == "server" and admin["bytes"] >= 3 * MiB and "pool_held_bytes" in admin
    b.close()
    quiet(server, KEYS["b"])

    st = httpx.get(server.url + "/v1/status", headers=bearer(KEYS["a"])).json()
    assert "inflight_http" not in st and "inflight_bytes" not in st["scheduler"]
    assert all(set(d) == {"name", "backlogged_tenants"} for d in st["scheduler"]["devices"]), st
    full = httpx.get(server.url + "/v1/status", headers=bearer(ADMIN_KEY)).json()
    assert "inflight_http" in full and all("steps" in d and "busy_s" in d for d in full["scheduler"]["devices"])

    ids = []
    body = b"".join(bytes(s) for s in protocol.encode_message({"input": X, "target": T}))
    for i in range(40):
        key = KEYS["a"] if i % 2 else KEYS["b"]
        for k in (key, "sk-wrong-0000000000"):          # a 401 carries an id too
            r = httpx.post(server.url + "/v1/cross_entropy", content=body, timeout=30,
                           headers={"Content-Type": protocol.MSGPACK, **bearer(k)})
            ids.append(r.headers["x-request-id"])
    assert len(set(ids)) == len(ids) and all(re.fullmatch(r"[0-9a-f]{16}", i) for i in ids), ids[:4]
    steps = {int(b, 16) - int(a, 16) for a, b in zip(ids, ids[1:])}
    assert len(steps) == len(ids) - 1                    # no counter: consecutive ids are unrelated


# ---- 9. the socket's path and mode ---------------------------------------------------------------------

def _starts(tmp_path, path) -> str:
    """The server's log when it refuses to start with --shm-socket path."""
    srv = ServerProcess(tenants=tenants_file(tmp_path), args=["--allow-shm", "--shm-socket", str(path)],
                        ready_timeout=60)
    with pytest.raises(ServerStartError) as err:
        srv.start()
    srv.cleanup()
    return str(err.value)


def test_an_existing_path_that_is_not_a_stale_socket_is_never_replaced(tmp_path):
    precious = tmp_path / "precious.txt"
    precious.write_text("keep me")
    assert "exists and is not a socket" in _starts(tmp_path, precious)
    assert precious.read_text() == "keep me"
    link = tmp_path / "link.sock"
    link.symlink_to(precious)
    assert "exists and is not a socket" in _starts(tmp_path, link)
    assert link.is_symlink() and precious.read_text() == "keep me"
    live = tmp_path / "live.sock"
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(str(live))
    listener.listen(1)
    assert "another process is listening" in _starts(tmp_path, live)
    listener.close()


@can_switch_uid
def test_a_stale_socket_is_replaced_0660_with_the_configured_group(tmp_path):
    shared = Path(tempfile_dir())
    path = shared / "shm.sock"
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(str(path))
    stale.close()                                      # a dead server's socket: nobody listens
    with ServerProcess(tenants=tenants_file(tmp_path), args=["--allow-shm", "--shm-socket", str(path),
                                                             "--shm-socket-group", "nogroup"]) as srv:
        st = os.stat(path)
        assert stat.S_ISSOCK(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o660 and st.st_gid == NOBODY
        hello = textwrap.dedent("""
            import socket, struct, sys
            s = socket.socket(socket.AF_UNIX); s.settimeout(10)
            try:
                s.connect(sys.argv[1])
            except OSError as exc:
                print(type(exc).__name__); raise SystemExit
            s.sendall(struct.pack(">I", 19) + b"\\x82\\xa2op\\xa5hello\\xa7api_key\\xc0")
            head = s.recv(4, socket.MSG_WAITALL)
            print(s.recv(struct.unpack(">I", head)[0], socket.MSG_WAITALL).decode("latin-1"))
        """)
        member = subprocess.run([SYSTEM_PYTHON, "-c", hello, str(path)], user=NOBODY, group=NOBODY,
                                extra_groups=[], capture_output=True, text=True, timeout=30)
        assert "unauthorized" in member.stdout, member          # reaches the socket; no key, no session
        outsider = subprocess.run([SYSTEM_PYTHON, "-c", hello, str(path)], user=NOBODY, group=1,
                                  extra_groups=[], capture_output=True, text=True, timeout=30)
        assert outsider.stdout.strip() == "PermissionError", outsider   # not in the group: no connect
        registration_alive(srv)


def tempfile_dir() -> str:
    import tempfile

    d = tempfile.mkdtemp(prefix="clce-test-shm-")
    os.chmod(d, 0o711)
    return d
