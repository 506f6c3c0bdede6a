"""Slow and vanishing clients against the real server: header and body read timeouts, the
connection limit, and clients killed mid-upload or mid-download (no memory kept for them)."""

from __future__ import annotations

import os
import socket
import sys
import threading
import time

import httpx
import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(__file__))
from serverproc import server_fixture  # noqa: E402

import clce_client  # noqa: E402
from clce_wire import protocol  # noqa: E402

psutil = pytest.importorskip("psutil")

HEADER_TIMEOUT, BODY_TIMEOUT, MAX_CONNECTIONS = 1.0, 1.0, 12
server = server_fixture(args=["--header-timeout", str(HEADER_TIMEOUT), "--body-timeout", str(BODY_TIMEOUT),
                              "--max-connections", str(MAX_CONNECTIONS), "--host-pool-bytes", str(64 << 20)])

X = np.random.default_rng(0).standard_normal((4, 7)).astype(np.float32)
T = np.array([0, 6, 3, 1])
BODY = b"".join(bytes(s) for s in protocol.encode_message({"input": X, "target": T, "reduction": "sum"}))


def connect(server) -> socket.socket:
    s = socket.create_connection((server.host, server.port), timeout=10)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return s


def read_all(s: socket.socket) -> bytes:
    """Everything until the server closes the connection."""
    out = b""
    while True:
        try:
            chunk = s.recv(65536)
        except ConnectionResetError:
            return out
        if not chunk:
            return out
        out += chunk


def head(path="/v1/cross_entropy", length=len(BODY)) -> bytes:
    return (f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: {protocol.MSGPACK}\r\n"
            f"Content-Length: {length}\r\n\r\n").encode()


def still_serves(server) -> None:
    with clce_client.Client(server.url, retry_budget_s=0) as c:
        assert c.cross_entropy(X, T, reduction="sum").item() == pytest.approx(
            float(-np.log(np.exp(X) / np.exp(X).sum(1, keepdims=True))[np.arange(4), T].sum()), rel=1e-5)


def test_headers_that_never_finish_are_cut_off(server):
    s = connect(server)
    s.sendall(b"POST /v1/cross_entropy HTTP/1.1\r\nHost: x\r\nContent-")   # and then nothing
    t0 = time.monotonic()
    answer = read_all(s)
    waited = time.monotonic() - t0
    assert answer.startswith(b"HTTP/1.1 408 ") and b"headers not received in time" in answer
    assert HEADER_TIMEOUT * 0.8 <= waited < HEADER_TIMEOUT + 3
    silent = connect(server)           # a connection that never says anything is closed too
    assert read_all(silent).startswith(b"HTTP/1.1 408 ")
    still_serves(server)


def test_slow_headers_on_a_kept_alive_connection_are_cut_off(server):
    s = connect(server)
    s.sendall(head() + BODY)
    first = s.recv(65536)
    assert first.startswith(b"HTTP/1.1 200 ")
    s.sendall(b"POST /v1/cross_entropy HTTP/1.1\r\n")   # the next request stalls in its headers
    assert b"HTTP/1.1 408 " in read_all(s)


def test_a_body_that_stalls_is_cut_off(server):
    s = connect(server)
    s.sendall(head() + BODY[:10])      # promised more, sends no more
    t0 = time.monotonic()
    answer = read_all(s)
    assert answer.startswith(b"HTTP/1.1 408 ") and b"stalled" in answer, answer[:200]
    assert BODY_TIMEOUT * 0.8 <= time.monotonic() - t0 < BODY_TIMEOUT + 3
    still_serves(server)
    assert httpx.get(server.url + "/v1/status", timeout=10).json()["scheduler"]["inflight_bytes"] == 0


def test_a_slow_body_that_keeps_coming_is_served(server):
    s = connect(server)
    s.sendall(head())
    pieces = [BODY[i:i + len(BODY) // 3 + 1] for i in range(0, len(BODY), len(BODY) // 3 + 1)]
    for piece in pieces:
        time.sleep(BODY_TIMEOUT * 0.5)   # each gap below the limit, the whole upload above it
        s.sendall(piece)
    answer = s.recv(65536)
    assert answer.startswith(b"HTTP/1.1 200 "), answer[:200]
    s.close()


def test_connection_limit(server):
    idle = []
    try:
        # a few connections are the test's own; fill up to the limit with idle ones
        for _ in range(MAX_CONNECTIONS):
            idle.append(connect(server))
        time.sleep(0.2)
        extra = connect(server)
        answer = read_all(extra)
        assert answer.startswith(b"HTTP/1.1 503 ") and b"retry-after: 1" in answer.lower()
        assert b"too many connections" in answer
    finally:
        for s in idle:
            s.close()
    time.sleep(0.3)
    still_serves(server)     # the slots came back


def server_rss(server) -> int:
    return psutil.Process(server.proc.pid).memory_info().rss


def big_request(rows=1024, classes=4096):
    x = np.random.default_rng(1).standard_normal((rows, classes)).astype(np.float32)
    t = np.random.default_rng(2).integers(0, classes, rows)
    return b"".join(bytes(s) for s in protocol.encode_message({"input": x, "target": t, "return_grad": True}))


def test_clients_killed_mid_upload_or_mid_download_leave_no_memory_held(server):
    body = big_request()        # 16 MiB up, 16 MiB of gradient down

    def completed():
        with httpx.Client(base_url=server.url, timeout=60) as h:
            assert h.post("/v1/cross_entropy", content=body,
                          headers={"Content-Type": protocol.MSGPACK}).status_code == 200

    def burst(*kinds):
        threads = [threading.Thread(target=f) for f in kinds * 4]
        for t in threads:
            t.start()
        for t in threads:
            t.join()

    for _ in range(2):          # warm, with the same concurrency: pool and allocators settle
        burst(completed, completed)
    time.sleep(0.5)
    baseline = server_rss(server)

    def killed_mid_upload():
        s = connect(server)
        s.sendall(head(length=len(body)) + body[: len(body) // 2])
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        s.close()               # RST: as a killed process's socket goes

    def killed_mid_download():
        s = connect(server)
        s.sendall(head(length=len(body)) + body)
        s.recv(4096)            # the answer has started
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        s.close()

    for _ in range(3):
        burst(killed_mid_upload, killed_mid_download)
    time.sleep(1.0)
    still_serves(server)
    after = server_rss(server)
    assert after <= baseline * 1.10 + (8 << 20), (baseline >> 20, after >> 20)
    # and nothing of theirs is still counted against the in-flight budgets (body reservations)
    st = httpx.get(server.url + "/v1/status", timeout=10).json()["scheduler"]
    assert st["inflight_bytes"] == 0 and st["tenants"]["default"]["inflight_bytes"] == 0, st
