"""Grammar-aware fuzzing of the service: hypothesis strategies that build near-valid requests at
three layers (the msgpack and JSON grammars of docs/protocol.md, and HTTP/1.1 framing), and the
checks every answer must pass. Used by tests/test_service_fuzz.py (bounded) and by
scripts/fuzz_service.py (for as long as you like).

The invariant: whatever arrives, the server answers it (never a dropped connection unless the
framing itself is broken, and then with uvicorn's 400 first), never with a 5xx, always with the
{"error": {"code", "message"}} body, and stays correct for the next valid request.
"""

from __future__ import annotations

import json
import socket
import struct

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
