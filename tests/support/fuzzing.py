"""Grammar-aware fuzzing of the service: hypothesis strategies that build near-valid requests at
three layers (the msgpack and JSON grammars of docs/protocol.md, and HTTP/1.1 framing), and the
checks every answer must pass. Used by tests/cross_entropy/test_endpoint_fuzz.py (bounded) and by
scripts/fuzz_service.py (for as long as you like); the shared-memory registration socket's
sessions (`shm_sessions`, `run_shm_session`, at the end) by tests/rails/test_shm_fuzz.py and
scripts/fuzz_service.py --shm.

The invariant: whatever arrives, the server answers it (never a dropped connection unless the
framing itself is broken, and then with uvicorn's 400 first), never with a 5xx, always with the
{"error": {"code", "message"}} body, and stays correct for the next valid request.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import struct
import tempfile
import time
from collections import Counter

import msgpack
import numpy as np
from hypothesis import strategies as st

from clce_wire import options, protocol

PATH = "/v1/cross_entropy"
FIELDS = ["v", *sorted(options.OPTION_NAMES)]
DTYPES = [*protocol.DTYPES, "int8", "float128", "complex64", "", "Float32", "float32\x00"]
ANSWERABLE = {200, 400, 401, 408, 413, 415, 429}

# --- values at the edges of every type msgpack and JSON carry --------------------------------

EDGE_INTS = [0, 1, -1, 127, 128, 255, 256, -32, -33, 2**15, 2**16, 2**31 - 1, 2**31, 2**32, 2**53 + 1,
             2**63 - 1, 2**63, 2**64 - 1, -(2**31), -(2**63), -100]
EDGE_FLOATS = [0.0, -0.0, 1.0, 1e-45, 1e38, 3.5e38, 1e308, float("inf"), float("-inf"), float("nan")]
msgpack_ints = st.one_of(st.sampled_from(EDGE_INTS), st.integers(-(2**63), 2**64 - 1))
json_ints = st.one_of(st.sampled_from(EDGE_INTS + [2**64, -(2**63) - 1, 10**30]),
                      st.integers(-(2**80), 2**80))
floats = st.one_of(st.sampled_from(EDGE_FLOATS), st.floats())


def _shapes():
    dims = st.one_of(st.integers(0, 9), st.sampled_from([0, 2**31, 2**32 + 1, 2**62, 2**63 - 1, 2**63, 2**64 - 1]))
    return st.one_of(st.lists(st.integers(0, 9), max_size=4), st.lists(dims, max_size=protocol.MAX_DIMS + 2))


@st.composite
def msgpack_tensors(draw):
    """A tensor map: plausible (dtype, shape and data agree) or lying in one or more ways."""
    dtype = draw(st.sampled_from(DTYPES))
    if draw(st.booleans()):
        shape = draw(st.lists(st.integers(0, 6), min_size=0, max_size=3))
        n = int(np.prod(shape)) * protocol.DTYPES.get(dtype, 4)
        data = draw(st.binary(min_size=n, max_size=n)) if n <= 4096 else b"\0" * n
    else:
        shape = draw(_shapes())
        data = draw(st.binary(max_size=64))
    t = {"dtype": dtype, "shape": shape, "data": data}
    mutation = draw(st.integers(0, 9))
    if mutation == 0:
        t["extra"] = 1
    elif mutation == 1:
        del t[draw(st.sampled_from(sorted(t)))]
    elif mutation == 2:
        t["shape"] = draw(st.one_of(st.none(), st.text(max_size=3), st.lists(floats, max_size=3)))
    elif mutation == 3:
        t["data"] = draw(st.one_of(st.text(max_size=8), st.lists(st.integers(0, 255), max_size=8)))
    return t


msgpack_scalars = st.one_of(st.none(), st.booleans(), msgpack_ints, floats, st.text(max_size=12),
                            st.binary(max_size=16))
msgpack_values = st.recursive(
    msgpack_scalars,
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=6), inner, max_size=4),
                            msgpack_tensors()),
    max_leaves=12)


def _pack(obj, draw) -> bytes:
    """msgpack of obj, with container and str headers in a randomly chosen (sometimes
    non-minimal) width: the decoder must take every width the format allows."""
    if isinstance(obj, dict):
        n = len(obj)
        width = draw(st.sampled_from(["fix", "16", "32"])) if n < 16 else draw(st.sampled_from(["16", "32"]))
        head = bytes([0x80 | n]) if width == "fix" else (b"\xde" + struct.pack(">H", n) if width == "16"
                                                          else b"\xdf" + struct.pack(">I", n))
        return head + b"".join(_pack(k, draw) + _pack(v, draw) for k, v in obj.items())
    if isinstance(obj, list):
        n = len(obj)
        width = draw(st.sampled_from(["fix", "16", "32"])) if n < 16 else draw(st.sampled_from(["16", "32"]))
        head = bytes([0x90 | n]) if width == "fix" else (b"\xdc" + struct.pack(">H", n) if width == "16"
                                                          else b"\xdd" + struct.pack(">I", n))
        return head + b"".join(_pack(v, draw) for v in obj)
    if isinstance(obj, str):
        raw = obj.encode("utf-8", "surrogatepass")
        n = len(raw)
        width = draw(st.sampled_from(["fix", "8", "16", "32"])) if n < 32 else draw(st.sampled_from(["8", "16", "32"]))
        if width == "8" and n > 255:
            width = "16"
        head = {"fix": lambda: bytes([0xA0 | n]), "8": lambda: b"\xd9" + bytes([n]),
                "16": lambda: b"\xda" + struct.pack(">H", n), "32": lambda: b"\xdb" + struct.pack(">I", n)}[width]()
        return head + raw
    try:
        return msgpack.packb(obj, use_bin_type=True)
    except (OverflowError, ValueError, TypeError):
        return b"\xc0"


@st.composite
def msgpack_requests(draw):
    """A request map whose fields are drawn from the real field names (mostly) with values of
    any type, tensors plausible or lying; packed with varying header widths; sometimes a few
    bytes of it damaged afterwards."""
    msg = {}
    if draw(st.integers(0, 3)):
        msg["input"] = draw(msgpack_tensors())
        msg["target"] = draw(msgpack_tensors())
    for key in draw(st.lists(st.sampled_from(FIELDS + ["bogus", ""]), max_size=5, unique=True)):
        msg[key] = draw(msgpack_values)
    body = bytearray(_pack(msg, draw))
    for _ in range(draw(st.integers(0, 2))):
        if not body:
            break
        pos = draw(st.integers(0, len(body) - 1))
        op = draw(st.sampled_from(["set", "insert", "truncate", "ext"]))
        if op == "set":
            body[pos] = draw(st.integers(0, 255))
        elif op == "insert":
            body[pos:pos] = draw(st.binary(min_size=1, max_size=6))
        elif op == "truncate":
            del body[pos:]
        else:
            body[pos:pos] = draw(st.sampled_from([b"\xd4\x01\x00", b"\xc7\x02\x05ab", b"\xc1"]))
    return bytes(body)


# --- JSON ------------------------------------------------------------------------------------

json_scalars = st.one_of(st.none(), st.booleans(), json_ints,
                         st.floats(allow_nan=False, allow_infinity=False),
                         st.sampled_from(["NaN", "Infinity", "-Infinity", "float32", "int64", "mean", "\\", '"']),
                         st.text(max_size=8))
json_values = st.recursive(json_scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=5), st.dictionaries(st.text(max_size=6), inner, max_size=4)), max_leaves=20)


def nested(depth: int, leaf="0", kind="[") -> str:
    close = {"[": "]", "{": "}"}[kind]
    if kind == "{":
        return '{"a":' * depth + leaf + "}" * depth
    return kind * depth + leaf + close * depth


@st.composite
def json_requests(draw):
    """JSON request text: field names from the protocol, values of any type, tensors in both
    JSON forms with lying shapes, nesting around the depth limit, integers beyond int64;
    sometimes damaged as text."""
    obj: dict = {}
    if draw(st.integers(0, 3)):
        obj["input"] = draw(st.one_of(
            st.lists(st.lists(st.floats(-10, 10), min_size=1, max_size=4), min_size=1, max_size=4),
            st.fixed_dictionaries({"dtype": st.sampled_from(DTYPES), "data": st.lists(json_scalars, max_size=6)},
                                  optional={"shape": _shapes()})))
        obj["target"] = draw(st.one_of(st.lists(json_ints, min_size=1, max_size=4),
                                       st.lists(st.integers(-200, 10), min_size=1, max_size=4)))
    for key in draw(st.lists(st.sampled_from(FIELDS + ["bogus"]), max_size=5, unique=True)):
        obj[key] = draw(json_values)
    text = json.dumps(obj)
    choice = draw(st.integers(0, 5))
    if choice == 0:   # nesting around the limit, at the top or inside a field
        depth = draw(st.sampled_from([protocol.MAX_JSON_DEPTH - 1, protocol.MAX_JSON_DEPTH,
                                      protocol.MAX_JSON_DEPTH + 1, 200, 1000, 5000]))
        inner = nested(depth, kind=draw(st.sampled_from(["[", "{"])))
        key = draw(st.sampled_from(["input", "target", "weight", "bogus"]))
        text = inner if draw(st.booleans()) else text[:-1] + (", " if len(text) > 2 else "") + f'"{key}": {inner}}}'
    elif choice == 1 and text:  # damaged as text
        pos = draw(st.integers(0, len(text) - 1))
        text = text[:pos] + draw(st.sampled_from(["", "[", "]", "{", '"', "\\", "1" * 5000, "\x00", "\ud800"])) \
            + text[pos + draw(st.integers(0, 3)):]
    return text.encode("utf-8", "surrogatepass")


# --- HTTP framing ------------------------------------------------------------------------------

@st.composite
def http_requests(draw, valid_body: bytes):
    """Raw HTTP/1.1 requests: methods, paths, Content-Type and Content-Length variants (missing,
    negative, huge, duplicated, not a number, longer than the body sent), chunked bodies with
    broken chunk sizes, odd Authorization and Expect headers."""
    method = draw(st.sampled_from(["POST", "POST", "POST", "GET", "PUT", "DELETE", "OPTIONS", "HEAD", "PATCH"]))
    path = draw(st.sampled_from([PATH, PATH, PATH + "?x=1", "/v1/cross_entropy/", "/v1/%63ross_entropy",
                                 "/v1/cross_entropy#f", "/" + "a" * 3000, "/v1/status", "/metrics", "/healthz"]))
    body = draw(st.sampled_from([valid_body, b"", b"\x80", b"{}", valid_body[: len(valid_body) // 2]]))
    ctype = draw(st.sampled_from([protocol.MSGPACK, protocol.JSON, "application/msgpack; charset=x",
                                  "APPLICATION/MSGPACK", "text/plain", "", None, "application/json;;;"]))
    headers = [("Host", "x")]
    if ctype is not None:
        headers.append(("Content-Type", ctype))
    framing = draw(st.sampled_from(["length", "length", "none", "chunked", "bad-chunked", "negative",
                                    "huge", "nan", "double", "both"]))
    payload = body
    if framing in ("length", "both"):
        headers.append(("Content-Length", str(len(body))))
    if framing == "negative":
        headers.append(("Content-Length", "-1"))
        payload = b""
    elif framing == "huge":
        headers.append(("Content-Length", str(2**64)))
        payload = b""
    elif framing == "nan":
        headers.append(("Content-Length", "12x"))
    elif framing == "double":
        headers += [("Content-Length", str(len(body))), ("Content-Length", str(len(body) + 1))]
    if framing in ("chunked", "both"):
        headers.append(("Transfer-Encoding", "chunked"))
        payload = (f"{len(body):x}\r\n".encode() + body + b"\r\n0\r\n\r\n") if body else b"0\r\n\r\n"
    elif framing == "bad-chunked":
        headers.append(("Transfer-Encoding", "chunked"))
        payload = draw(st.sampled_from([b"zz\r\nab\r\n0\r\n\r\n", b"ffffffffffffffffff\r\n", b"-1\r\n\r\n",
                                        b"3\r\nabcdef\r\n0\r\n\r\n"]))
    extra = draw(st.lists(st.sampled_from([
        ("Authorization", "Bearer"), ("Authorization", "Bearer " + "k" * 5000), ("Authorization", "Basic \xff"),
        ("Expect", "100-continue"), ("Accept", protocol.MSGPACK), ("Accept", "*/*"), ("X-Request-ID", "a" * 300),
        ("Content-Encoding", "gzip"), ("Connection", "close")]), max_size=3, unique=True))
    if ("Connection", "close") not in extra:
        extra.append(("Connection", "close"))    # one request per connection: read to the close
    head = f"{method} {path} HTTP/1.1\r\n" + "".join(f"{k}: {v}\r\n" for k, v in headers + extra) + "\r\n"
    return head.encode("latin-1", "replace") + payload


def exchange(host: str, port: int, raw: bytes, timeout: float = 30.0) -> tuple[int | None, bytes]:
    """Send raw bytes on a fresh connection and read until the server closes it (the requests
    say Connection: close; one whose body falls short of its Content-Length is answered when
    the server's body timeout strikes). The final status (after any 100 Continue; None when the
    server closed without an answer) and the response bytes."""
    with socket.create_connection((host, port), timeout=timeout) as s:
        try:
            s.sendall(raw)
        except (BrokenPipeError, ConnectionResetError):
            pass   # the server answered and closed early (e.g. 413): read what it said
        out = b""
        while True:
            try:
                chunk = s.recv(65536)
            except (ConnectionResetError, socket.timeout):
                break
            if not chunk:
                break
            out += chunk
    while out.startswith(b"HTTP/1.1 1"):        # interim answers (100 Continue)
        out = out[out.find(b"\r\n\r\n") + 4:] if b"\r\n\r\n" in out else b""
    if not out.startswith(b"HTTP/1.1 "):
        return None, out
    return int(out[9:12]), out


def check_error_body(status: int, ctype: str, content: bytes) -> None:
    """A non-200 answer carries the error body, its code's status being the answer's."""
    media = ctype.split(";")[0].strip()
    body = protocol.decode_message(bytearray(content)) if media == protocol.MSGPACK else json.loads(content)
    assert set(body) >= {"error"} and {"code", "message"} <= set(body["error"]), body
    assert body["error"]["code"] in protocol.ERROR_CODES, body
    assert protocol.ERROR_CODES[body["error"]["code"]][0] == status, (status, body)


# --- the shared-memory registration socket (docs/protocol.md, "Shared memory") -------------------
#
# A session is a list of steps on one real connection: frames (ops and fields from the protocol,
# values at the edges, the map sometimes damaged or its length lying) with 0, 1 or 2 real
# descriptors attached (memfds of every seal set and size, read-only and write-only reopenings,
# hugetlb, a pipe, a file, the session's own socket), sent whole, in pieces, or left unfinished
# (the peer stalls past the frame deadline, or dies), answers read or not. The invariant: every
# whole frame is answered ({"ok": true} or an error frame with a known code), a peer is closed only
# after an error frame says why (or when it left a frame unfinished or its answers unread), and
# the server goes on serving everyone else.

SHM_OPS = ["register", "register", "register", "unregister", "ping", "hello", "nope", ""]
SHM_NAMES = ["r0", "r1", "r2", "a.b-c_d", "", "../x", "x" * 65, None, 7]
_SEAL_BITS = [fcntl.F_SEAL_SHRINK, fcntl.F_SEAL_GROW, fcntl.F_SEAL_WRITE, getattr(fcntl, "F_SEAL_FUTURE_WRITE", 0x10),
              fcntl.F_SEAL_SEAL]
SHM_FD_KINDS = ["memfd", "memfd", "memfd", "memfd", "rdonly", "wronly", "hugetlb", "pipe", "file", "own-socket"]
SHM_SIZES = [0, 1, 4095, 4096, 65536, 1 << 20]


@st.composite
def shm_descriptor(draw):
    kind = draw(st.sampled_from(SHM_FD_KINDS))
    seals = sum(b for b in _SEAL_BITS if draw(st.integers(0, 3)))    # each seal with probability 3/4
    return {"kind": kind, "size": draw(st.sampled_from(SHM_SIZES)), "seals": seals}


@st.composite
def shm_frames(draw):
    op = draw(st.sampled_from(SHM_OPS))
    msg: dict = {"op": op} if draw(st.integers(0, 9)) else {}
    fd = draw(st.lists(shm_descriptor(), max_size=2)) if op == "register" or not draw(st.integers(0, 7)) else []
    if op in ("register", "unregister"):
        msg["name"] = draw(st.sampled_from(SHM_NAMES))
    if op == "register":
        # the size: the memfd's own (usually), or a lie at an edge
        msg["size"] = draw(st.one_of(st.just("actual"), st.just("actual"), st.just("actual+1"),
                                     st.sampled_from([0, -1, 1, 2**63, 2**64 - 1, "4096", None, 1.5])))
    if op == "hello":
        msg["api_key"] = draw(st.sampled_from(["<key>", "<key>", "wrong-key", None, 7]))
    for key in draw(st.lists(st.sampled_from(["extra", "api_key", "size"]), max_size=1)):
        msg.setdefault(key, draw(msgpack_scalars))
    return {"msg": msg, "fds": fd,
            "framing": draw(st.sampled_from(["whole"] * 12 + ["pieces", "stall", "die", "damaged", "long-header",
                                                              "short-length", "not-a-map"])),
            "read": draw(st.integers(0, 7)) > 0}


@st.composite
def shm_sessions(draw):
    """A session on the registration socket: usually a valid hello first, then frames."""
    hello = draw(st.sampled_from(["valid"] * 6 + ["wrong", "none", "skip", "with-fd"]))
    return {"hello": hello, "frames": draw(st.lists(shm_frames(), max_size=6)),
            "end": draw(st.sampled_from(["close", "close", "shutdown", "linger"]))}


def make_descriptor(spec: dict, own_socket: int) -> int:
    """A real descriptor as `spec` describes it (the caller closes it)."""
    kind, size, seals = spec["kind"], spec["size"], spec["seals"]
    if kind == "pipe":
        r, w = os.pipe()
        os.close(w)
        return r
    if kind == "file":
        f = tempfile.TemporaryFile()
        f.write(b"x" * min(size, 4096))
        fd = os.dup(f.fileno())
        f.close()
        return fd
    if kind == "own-socket":
        return os.dup(own_socket)
    flags = os.MFD_ALLOW_SEALING | os.MFD_CLOEXEC | (os.MFD_HUGETLB if kind == "hugetlb" else 0)
    try:
        fd = os.memfd_create("fuzz", flags)
    except OSError:
        fd = os.memfd_create("fuzz", os.MFD_ALLOW_SEALING | os.MFD_CLOEXEC)
    try:
        os.ftruncate(fd, size if kind != "hugetlb" else max(size, 1) + (2 << 20) - 1 & ~((2 << 20) - 1))
    except OSError:
        pass
    try:
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, seals)
    except OSError:
        pass
    if kind in ("rdonly", "wronly"):
        new = os.open(f"/proc/self/fd/{fd}", (os.O_RDONLY if kind == "rdonly" else os.O_WRONLY) | os.O_CLOEXEC)
        os.close(fd)
        fd = new
    return fd


class ShmSessionResult:
    def __init__(self):
        self.frames = 0
        self.answers: Counter = Counter()   # "ok", error codes, "closed", "closed-after-error", ...
        self.findings: list[str] = []


def _read_frame(sock: socket.socket, timeout: float) -> dict | None | str:
    """One answer frame, None at EOF, "timeout" if none came."""
    sock.settimeout(timeout)
    try:
        head = b""
        while len(head) < 4:
            chunk = sock.recv(4 - len(head))
            if not chunk:
                return None
            head += chunk
        (n,) = struct.unpack(">I", head)
        body = b""
        while len(body) < n:
            chunk = sock.recv(n - len(body))
            if not chunk:
                return None
            body += chunk
        return msgpack.unpackb(body, raw=False)
    except socket.timeout:
        return "timeout"
    except (ConnectionResetError, BrokenPipeError):
        return None


def check_shm_answer(reply) -> str | None:
    """The answer's label, or None when it is not a well-formed answer."""
    if not isinstance(reply, dict) or not isinstance(reply.get("ok"), bool):
        return None
    if reply["ok"]:
        return "ok"
    err = reply.get("error")
    if not isinstance(err, dict) or err.get("code") not in protocol.ERROR_CODES or not isinstance(err.get("message"), str):
        return None
    return err["code"]


def run_shm_session(path: str, key: str, session: dict, frame_timeout: float) -> ShmSessionResult:
    """Play `session` on a fresh connection to the socket at `path`; what came back, and findings."""
    from clce_wire.shm import encode_frame

    res = ShmSessionResult()
    wait = frame_timeout + 3.0
    sock = socket.socket(socket.AF_UNIX)
    sock.settimeout(wait)
    try:
        sock.connect(path)
    except OSError as exc:
        res.answers[f"connect:{errno.errorcode.get(exc.errno, exc.errno)}"] += 1
        return res
    broke = False            # an error frame may end the connection from here on
    unread = 0

    def expect(after_whole_frame: bool) -> bool:
        """Read one answer; False when the connection is over."""
        nonlocal broke
        reply = _read_frame(sock, wait)
        if reply == "timeout":
            res.findings.append("no answer to a whole frame" if after_whole_frame else "no answer to a stalled frame")
            return False
        if reply is None:
            res.answers["closed-after-error" if broke else "closed"] += 1
            if not broke:
                res.findings.append("closed without an answer")
            return False
        label = check_shm_answer(reply)
        if label is None:
            res.findings.append(f"malformed answer {reply!r}"[:300])
            return False
        res.answers[label] += 1
        if label != "ok":
            broke = True     # an error may be a rule break: the server may close after it
        return True

    def send(data: bytes, fds: list[int]) -> bool:
        try:
            if fds:
                n = socket.send_fds(sock, [data], fds)
                if n < len(data):
                    sock.sendall(data[n:])
            else:
                sock.sendall(data)
            return True
        except (BrokenPipeError, ConnectionResetError):
            return False
        except socket.timeout:
            res.findings.append("the server stopped reading a peer that reads its answers")
            return False

    try:
        hello = session["hello"]
        if hello != "skip":
            msg = {"op": "hello", "api_key": {"valid": key, "wrong": "wrong-key", "none": None}.get(hello, key)}
            fds = [make_descriptor({"kind": "memfd", "size": 4096, "seals": 6}, sock.fileno())] if hello == "with-fd" else []
            res.frames += 1
            ok = send(encode_frame(msg), fds)
            for fd in fds:
                os.close(fd)
            if not ok or not expect(True):
                return res
        for frame in session["frames"]:
            msg = dict(frame["msg"])
            if msg.get("api_key") == "<key>":
                msg["api_key"] = key
            fds = [make_descriptor(spec, sock.fileno()) for spec in frame["fds"]]
            try:
                actual = os.fstat(fds[0]).st_size if fds else 4096
            except OSError:
                actual = 4096
            if msg.get("size") == "actual":
                msg["size"] = actual
            elif msg.get("size") == "actual+1":
                msg["size"] = actual + 1
            data = encode_frame(msg)
            framing = frame["framing"]
            if framing == "damaged":
                data = data[:4] + bytes(b ^ 0x5A for b in data[4:])
            elif framing == "long-header":
                data = struct.pack(">I", 1 << 24) + data[4:]
            elif framing == "short-length":
                data = struct.pack(">I", max(0, len(data) - 5)) + data[4:]
            elif framing == "not-a-map":
                body = msgpack.packb([1, 2, 3])
                data = struct.pack(">I", len(body)) + body
            res.frames += 1
            try:
                if framing in ("stall", "die"):
                    sent = send(data[: max(1, len(data) // 2)], fds)
                    if framing == "die" or not sent:
                        return res
                    expect(False)              # the frame deadline: answered, then closed
                    return res
                if framing == "pieces":
                    ok = send(data[:3], fds) and send(data[3:], [])
                else:
                    ok = send(data, fds)
            finally:
                for fd in fds:
                    os.close(fd)
            if not ok:     # closed: the answers not read yet must say why (an error frame among them)
                for _ in range(unread + 1):
                    if not expect(True):
                        break
                return res
            if framing == "short-length":
                # the rest of its bytes start a frame of their own: whatever the answers, no hang
                if not expect(True):
                    return res
                broke = True
                continue
            if frame["read"]:
                for _ in range(unread + 1):
                    if not expect(True):
                        return res
                unread = 0
            else:
                unread += 1
        for _ in range(unread):
            if not expect(True):
                return res
        if session["end"] == "shutdown":
            sock.shutdown(socket.SHUT_WR)
            reply = _read_frame(sock, wait)
            if reply not in (None,):
                res.findings.append(f"an answer after the peer said it was done: {reply!r}"[:300])
        elif session["end"] == "linger":
            time.sleep(0.05)
        return res
    finally:
        sock.close()
