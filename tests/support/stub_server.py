"""A stand-in clce server for client tests that need no OpenCL (tests/client/): a small threaded
HTTP server on a loopback port that speaks the real wire format and computes the answer with torch
itself, so what the client returns can be compared with torch.nn.functional.cross_entropy exactly.
Its `respond` can be replaced to answer with canned errors; `requests` records what it was sent.

Fixtures: `server` (a running Stub) and `closed_url` (a loopback URL nothing listens on); import
them into a test module to use them.
"""

from __future__ import annotations

import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import msgpack
import numpy as np
import pytest

from clce_wire.options import parse_request
from clce_wire.protocol import (
    ERROR_CODES,
    MSGPACK,
    code_for_exception,
    decode_message,
    encode_message,
    error_body,
    format_server_timing,
)

torch = pytest.importorskip("torch")
F = torch.nn.functional
ml_dtypes = pytest.importorskip("ml_dtypes")


TIMING = {"decode": 0.5, "queue": 1.25, "kernel": 2.0, "total": 4.0}


def to_torch(arr: np.ndarray):
    if arr.dtype == ml_dtypes.bfloat16:
        return torch.from_numpy(arr.astype(np.float32)).to(torch.bfloat16)  # exact
    return torch.from_numpy(np.array(arr))


def to_numpy(t) -> np.ndarray:
    t = t.detach()
    if t.dtype == torch.bfloat16:
        return t.float().numpy().astype(ml_dtypes.bfloat16)  # exact
    return t.numpy()


def compute(req: dict) -> dict:
    """What a clce server answers, computed with torch."""
    x = to_torch(req["input"]).requires_grad_(req["return_grad"])
    weight = None if req["weight"] is None else to_torch(req["weight"])
    loss = F.cross_entropy(
        x, to_torch(req["target"]), weight=weight, ignore_index=req["ignore_index"],
        reduction=req["reduction"], label_smoothing=req["label_smoothing"],
    )  # fmt: skip
    out = {"v": 1, "loss": to_numpy(loss)}
    class_dim = 1 if x.dim() > 1 else 0
    if req["return_grad"]:
        (grad,) = torch.autograd.grad(loss, x, torch.ones_like(loss))
        out["grad"] = to_numpy(grad)
    if req["return_lse"]:
        out["lse"] = to_numpy(torch.logsumexp(x.detach().float(), dim=class_dim))
    if req["return_argmax"]:
        argmax = x.detach().argmax(dim=class_dim)
        out["argmax"] = argmax.numpy()
        out["accuracy"] = float((argmax == to_torch(req["target"])).float().mean())
    return out


class Stub(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self):
        super().__init__(("127.0.0.1", 0), Handler)
        self.requests: list[dict] = []
        self.respond = self.cross_entropy
        self.url = f"http://127.0.0.1:{self.server_address[1]}"

    def cross_entropy(self, req: dict):
        if req["path"] in ("/healthz", "/readyz"):
            return 200, {"content-type": "application/json"}, b'{"ok": true}'
        if req["path"] == "/v1/info":
            return 200, {"content-type": "application/json"}, b'{"version": "test"}'
        try:
            out = compute(parse_request(decode_message(req["body"])))
        except Exception as exc:
            code = code_for_exception(exc)
            body = msgpack.packb(error_body(code, str(exc)))
            return ERROR_CODES[code][0], {"content-type": MSGPACK}, body
        headers = {"content-type": MSGPACK, "server-timing": format_server_timing(TIMING)}
        return 200, headers, b"".join(encode_message(out))


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, like a real server

    def log_message(self, *args):
        pass

    def _read_body(self) -> tuple[bytes, bool]:
        if self.headers.get("transfer-encoding", "").lower() == "chunked":
            body = bytearray()
            while True:
                size = int(self.rfile.readline().strip(), 16)
                if size == 0:
                    self.rfile.readline()
                    return bytes(body), True
                body += self.rfile.read(size)
                self.rfile.readline()
        return self.rfile.read(int(self.headers.get("content-length", 0))), False

    def _handle(self):
        body, chunked = self._read_body()
        req = {
            "method": self.command,
            "path": self.path,
            "headers": {k.lower(): v for k, v in self.headers.items()},
            "body": body,
            "chunked": chunked,
        }
        self.server.requests.append(req)
        status, headers, payload = self.server.respond(req)
        self.send_response(status)
        for k, v in headers.items():
            self.send_header(k, v)
        self.send_header("content-length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    do_GET = do_POST = _handle


@pytest.fixture
def server():
    srv = Stub()
    thread = threading.Thread(target=srv.serve_forever, args=(0.02,), daemon=True)
    thread.start()
    yield srv
    srv.shutdown()
    srv.server_close()


@pytest.fixture
def closed_url():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}"  # nothing listens here any more


def logits(n=8, c=5, dtype=np.float32, seed=0):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((n, c)).astype(dtype), rng.integers(0, c, size=n)
