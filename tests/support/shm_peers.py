"""A server with shared memory allowed and a tenants file, and raw peers of its registration socket
(tests/rails/test_shm_hostile.py, tests/rails/test_shm_fuzz.py): memfds, frames, a bystander tenant
whose own session must stay intact, and the server's descriptor count read from /proc."""

from __future__ import annotations

import fcntl
import os
import re
import socket
import time
from pathlib import Path

import httpx
import numpy as np

from clce_wire import protocol
from clce_wire.shm import recv_frame, send_frame
from tests.support.serverproc import ServerProcess


MiB = 1 << 20


KEYS = {"a": "sk-a-Hst1Qw8Er5Ty", "b": "sk-b-Hst2Ui7Op4As"}


ADMIN_KEY = "sk-admin-Hst3Df6Gh9Jk"


CAP = 64 * MiB


X = np.random.default_rng(0).standard_normal((4, 8)).astype(np.float32)


T = np.array([1, 0, 7, 3])


EXPECTED = float(-(X[np.arange(4), T] - np.log(np.exp(X.astype(np.float64)).sum(1))).mean())


def tenants_file(tmp: Path) -> Path:
    path = tmp / "tenants.toml"
    path.write_text(f'[admin]\napi_key = "{ADMIN_KEY}"\n\n'
                    + "".join(f'[tenants.{n}]\napi_key = "{k}"\n\n' for n, k in KEYS.items()))
    return path


def bearer(key):
    return {"Authorization": f"Bearer {key}"}


def shm_server(tmp: Path, *extra: str) -> ServerProcess:
    return ServerProcess(tenants=tenants_file(tmp), args=[
        "--allow-shm", "--shm-max-bytes", str(CAP), "--shm-hello-timeout", "1", "--shm-frame-timeout", "1",
        "--shm-max-connections", "48", "--shm-max-connections-per-uid", "16", *extra])


def info(srv, key=None) -> dict:
    r = httpx.get(srv.url + "/v1/info", headers=bearer(key) if key else {}, timeout=10)
    assert r.status_code == 200, r.text
    return r.json()


_PATHS: dict[int, str] = {}


def socket_path(srv) -> str:
    if srv.proc.pid not in _PATHS:
        _PATHS[srv.proc.pid] = info(srv)["shm"]["socket"]
    return _PATHS[srv.proc.pid]


def server_fds(srv) -> int:
    return len(os.listdir(f"/proc/{srv.proc.pid}/fd"))


def server_threads(srv) -> int:
    status = Path(f"/proc/{srv.proc.pid}/status").read_text()
    return int(re.search(r"^Threads:\s+(\d+)", status, re.M).group(1))


def memfd(size: int, seals: int = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW, data: bytes = b"") -> int:
    fd = os.memfd_create("t", os.MFD_ALLOW_SEALING | os.MFD_CLOEXEC)
    os.ftruncate(fd, size)
    if data:
        os.pwrite(fd, data, 0)
    if seals:
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, seals)
    return fd


class Peer:
    """A raw connection to the registration socket."""

    def __init__(self, srv, key=None, hello=True, timeout=10.0):
        self.sock = socket.socket(socket.AF_UNIX)
        self.sock.settimeout(timeout)
        self.sock.connect(socket_path(srv))
        self.hello = self.call({"op": "hello", "api_key": key}) if hello else None

    def call(self, msg, fd=None):
        send_frame(self.sock, msg, fd)
        reply, fds = recv_frame(self.sock)
        for f in fds:
            os.close(f)
        return reply

    def register(self, name, fd, size=None):
        try:
            return self.call({"op": "register", "name": name, "size": os.fstat(fd).st_size if size is None else size}, fd)
        finally:
            os.close(fd)

    def closed_by_server(self) -> bool:
        """Whether the server closed this connection (EOF after any answers)."""
        try:
            while True:
                if not self.sock.recv(65536):
                    return True
        except (ConnectionResetError, BrokenPipeError):
            return True
        except socket.timeout:
            return False

    def close(self):
        self.sock.close()


def loss_over(srv, key, region, shape=(4, 8), **extra) -> httpx.Response:
    ref = {"dtype": "float32", "shape": list(shape), "region": region, "offset": 0}
    body = b"".join(bytes(s) for s in protocol.encode_message({"input": ref, "target": T, **extra}))
    return httpx.post(srv.url + "/v1/cross_entropy", content=body, timeout=30,
                      headers={"Content-Type": protocol.MSGPACK, **bearer(key)})


def error_of(resp: httpx.Response) -> dict:
    return protocol.decode_message(bytearray(resp.content))["error"]


def assert_exact(resp: httpx.Response) -> None:
    assert resp.status_code == 200, resp.text
    loss = float(protocol.decode_tensor(protocol.decode_message(bytearray(resp.content))["loss"]))
    assert abs(loss - EXPECTED) <= 1e-5 * abs(EXPECTED), (loss, EXPECTED)


class Bystander:
    """Tenant b, minding its own business: one session, one region with X in it."""

    def __init__(self, srv, name="b-own"):
        self.srv, self.name = srv, name
        self.peer = Peer(srv, KEYS["b"])
        assert self.peer.hello["ok"], self.peer.hello
        reply = self.peer.register(name, memfd(X.nbytes, data=X.tobytes()))
        assert reply["ok"], reply

    def check(self) -> None:
        assert self.peer.call({"op": "ping"}) == {"ok": True}
        assert_exact(loss_over(self.srv, KEYS["b"], self.name))
        assert info(self.srv, KEYS["b"])["shm"]["regions"] == 1

    def close(self):
        self.peer.close()


def wait_for(pred, timeout=10.0, what="condition"):
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def registration_alive(srv, key=KEYS["a"]) -> None:
    p = Peer(srv, key)
    try:
        assert p.hello["ok"], p.hello
        reply = p.register("alive-check", memfd(X.nbytes, data=X.tobytes()))
        assert reply["ok"], reply
        assert_exact(loss_over(srv, key, "alive-check"))
    finally:
        p.close()


def http_connections(srv) -> int:
    """The HTTP connections the server holds open (its descriptors for TCP sockets on its port that
    are not the listening one), read from /proc."""
    port = int(srv.url.rsplit(":", 1)[1])
    inodes = set()
    for fd in os.listdir(f"/proc/{srv.proc.pid}/fd"):
        try:
            target = os.readlink(f"/proc/{srv.proc.pid}/fd/{fd}")
        except OSError:                   # closed meanwhile
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    count = 0
    for table in ("tcp", "tcp6"):
        path = Path(f"/proc/{srv.proc.pid}/net/{table}")
        if not path.exists():
            continue
        for line in path.read_text().splitlines()[1:]:
            fields = line.split()
            local_port, state, inode = int(fields[1].rsplit(":", 1)[1], 16), fields[3], fields[9]
            if local_port == port and state != "0A" and inode in inodes:     # 0A: LISTEN
                count += 1
    return count


def steady_fds(srv) -> int:
    """The server's descriptor count once HTTP connections of earlier calls have closed (their
    sockets gone from the server's descriptors: the state, not a pause)."""
    wait_for(lambda: http_connections(srv) == 0, what="the server to close earlier HTTP connections")
    return server_fds(srv)
