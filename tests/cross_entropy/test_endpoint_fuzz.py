"""Fuzzing the real server's request parsing: whatever the body, the answer is never 5xx, the
connection is never dropped, errors come in the {"error": {"code", "message"}} body, and a valid
request right afterwards is still answered correctly.

Bodies: random bytes; valid msgpack requests with flipped, inserted and deleted bytes; changed
length headers (including huge claimed sizes); changed dtype strings and shapes; random JSON values
and JSON objects with the request's field names. And the grammar-aware strategies of
tests/support/fuzzing.py (msgpack built structurally with every header width, JSON nested around the
limit, raw HTTP framing), which scripts/fuzz_service.py runs for longer.
"""

from __future__ import annotations

import json
import struct

import httpx
import msgpack
import numpy as np
import pytest
from tests.support import fuzzing  # noqa: E402
from tests.support.serverproc import server_fixture  # noqa: E402

import clce_client  # noqa: E402
from clce_wire import options, protocol  # noqa: E402

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

torch = pytest.importorskip("torch")

# short read timeouts: a raw request whose body falls short of its Content-Length is answered soon
server = server_fixture(args=["--body-timeout", "0.5", "--header-timeout", "5"])

FUZZ = settings(max_examples=40, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                       HealthCheck.data_too_large])

# one small valid request, and its exact answer from torch
RNG = np.random.default_rng(0)
X = RNG.standard_normal((3, 5)).astype(np.float32)
T = np.array([4, 0, 2], dtype=np.int64)
VALID_MSG = {"v": 1, "input": protocol.encode_tensor(X), "target": protocol.encode_tensor(T),
             "reduction": "sum", "return_grad": True, "ignore_index": -100, "label_smoothing": 0.0}
VALID_BODY = b"".join(bytes(s) for s in protocol.encode_message(VALID_MSG))
_xt = torch.from_numpy(X).double().requires_grad_()
_loss = torch.nn.functional.cross_entropy(_xt, torch.from_numpy(T), reduction="sum")
_loss.backward()
EXPECTED_LOSS, EXPECTED_GRAD = float(_loss.detach()), _xt.grad.numpy()


@pytest.fixture(scope="module")
def http(server):
    # one keep-alive connection for everything: a dropped connection would show as an error
    with httpx.Client(base_url=server.url, timeout=60,
                      limits=httpx.Limits(max_connections=1, max_keepalive_connections=1)) as h:
        yield h


def check_answer(resp: httpx.Response) -> None:
    assert resp.status_code < 500, (resp.status_code, resp.content[:300])
    assert resp.status_code in (200, 400, 413, 415), (resp.status_code, resp.content[:300])
    if resp.status_code == 200:
        return
    ctype = resp.headers["content-type"].split(";")[0]
    body = protocol.decode_message(bytearray(resp.content)) if ctype == protocol.MSGPACK else resp.json()
    assert set(body) == {"error"} and set(body["error"]) == {"code", "message"}, body
    assert body["error"]["code"] in protocol.ERROR_CODES
    assert protocol.ERROR_CODES[body["error"]["code"]][0] == resp.status_code


def check_still_correct(h: httpx.Client) -> None:
    resp = h.post("/v1/cross_entropy", content=VALID_BODY, headers={"Content-Type": protocol.MSGPACK})
    assert resp.status_code == 200, resp.content[:300]
    msg = protocol.decode_message(bytearray(resp.content))
    loss = protocol.decode_tensor(msg["loss"])
    grad = protocol.decode_tensor(msg["grad"])
    np.testing.assert_allclose(loss, EXPECTED_LOSS, rtol=1e-5)
    np.testing.assert_allclose(grad, EXPECTED_GRAD, rtol=1e-5, atol=1e-6)


def post(h: httpx.Client, body: bytes, ctype: str) -> httpx.Response:
    resp = h.post("/v1/cross_entropy", content=body, headers={"Content-Type": ctype})
    check_answer(resp)
    return resp


# ---------------------------------------------------------------------------------------------

@FUZZ
@given(body=st.binary(max_size=512), ctype=st.sampled_from([protocol.MSGPACK, protocol.JSON]))
def test_random_bytes(http, body, ctype):
    post(http, body, ctype)
    check_still_correct(http)


@st.composite
def mutated_msgpack(draw):
    body = bytearray(VALID_BODY)
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["flip", "set", "insert", "delete", "truncate", "length", "huge"]))
        if not body:
            body = bytearray(b"\x80")
        pos = draw(st.integers(0, len(body) - 1))
        if op == "flip":
            body[pos] ^= 1 << draw(st.integers(0, 7))
        elif op == "set":
            body[pos] = draw(st.integers(0, 255))
        elif op == "insert":
            body[pos:pos] = draw(st.binary(min_size=1, max_size=8))
        elif op == "delete":
            del body[pos:pos + draw(st.integers(1, 8))]
        elif op == "truncate":
            del body[pos:]
        elif op == "length":
            # rewrite a bin/str/array/map length header somewhere in the message
            heads = [i for i, b in enumerate(body) if b in (0xC4, 0xC5, 0xC6, 0xDC, 0xDD, 0xDE, 0xDF, 0xD9)]
            if heads:
                i = draw(st.sampled_from(heads))
                width = {0xC4: 1, 0xD9: 1, 0xC5: 2, 0xDC: 2, 0xDE: 2}.get(body[i], 4)
                n = draw(st.integers(0, (1 << (8 * width)) - 1))
                body[i + 1:i + 1 + width] = n.to_bytes(width, "big")
        else:  # huge claimed sizes: a bin32 / array32 / map32 header that promises ~4 GiB
            kind = draw(st.sampled_from([b"\xc6", b"\xdd", b"\xdf", b"\xdb"]))
            body[pos:pos] = kind + struct.pack(">I", draw(st.sampled_from([0xFFFFFFFF, 0x7FFFFFFF, 1 << 30])))
    return bytes(body)


@FUZZ
@given(body=mutated_msgpack())
def test_mutated_msgpack(http, body):
    post(http, body, protocol.MSGPACK)
    check_still_correct(http)


DTYPE_NAMES = ["float32", "float64", "float16", "bfloat16", "int64", "int32", "int16", "uint8", "bool",
               "int8", "float128", "complex64", "", "Float32", "float32\x00"]


@st.composite
def structured_msgpack(draw):
    """Well-formed msgpack whose tensors lie: dtype vs data length, shapes, huge dims, odd fields."""

    def tensor(arr):
        dtype = draw(st.sampled_from([arr.dtype.name, *DTYPE_NAMES]))
        shape = list(arr.shape)
        choice = draw(st.sampled_from(["keep", "random", "huge", "zero", "extra-dim", "negative"]))
        if choice == "random":
            shape = draw(st.lists(st.integers(0, 64), max_size=5))
        elif choice == "huge":
            shape = [draw(st.sampled_from([2**31, 2**32 + 1, 2**62, 2**63 - 1])), *shape[1:]]
        elif choice == "zero":
            shape = [0, *shape[1:]]
        elif choice == "extra-dim":
            shape = shape + [1] * draw(st.integers(1, 16))
        elif choice == "negative":
            shape = [-1, *shape[1:]]
        data = arr.tobytes()
        if draw(st.booleans()):
            data = data[: draw(st.integers(0, len(data)))] + draw(st.binary(max_size=16))
        t = {"dtype": dtype, "shape": shape, "data": data}
        if draw(st.integers(0, 9)) == 0:
            t["extra"] = 1
        return t

    msg = {"input": tensor(X), "target": tensor(T)}
    if draw(st.booleans()):
        msg["weight"] = tensor(np.ones(5, np.float32))
    extras = {
        "v": st.sampled_from([0, 1, 2, -1, 2**64 - 1, "1", None]),
        "ignore_index": st.one_of(st.integers(-(2**63), 2**63 - 1), st.floats(), st.none()),
        "reduction": st.sampled_from(["mean", "sum", "none", "avg", "", 1, None]),
        "label_smoothing": st.one_of(st.floats(allow_nan=True), st.integers(-5, 5), st.text(max_size=3)),
        "return_grad": st.one_of(st.booleans(), st.integers(0, 1)),
        "grad_dtype": st.sampled_from([None, *DTYPE_NAMES]),
        "return_lse": st.booleans(),
        "return_argmax": st.booleans(),
        "lse_square_scale": st.one_of(st.floats(allow_nan=True), st.integers(-3, 3)),
        "softcap": st.one_of(st.none(), st.floats(allow_nan=True), st.integers(-3, 30)),
        "deadline_ms": st.one_of(st.none(), st.floats(allow_nan=True), st.integers(-5, 10**6)),
        "bogus": st.integers(),
    }
    for key in draw(st.lists(st.sampled_from(sorted(extras)), max_size=4, unique=True)):
        msg[key] = draw(extras[key])
    return msgpack.packb(msg, use_bin_type=True)


@FUZZ
@given(body=structured_msgpack())
def test_lying_tensors_and_fields(http, body):
    post(http, body, protocol.MSGPACK)
    check_still_correct(http)


JSON_SCALARS = st.one_of(st.none(), st.booleans(), st.integers(-(2**70), 2**70),
                         st.floats(allow_nan=False, allow_infinity=False),
                         st.sampled_from(["NaN", "Infinity", "-Infinity", "float32", "int64", "mean"]),
                         st.text(max_size=8))
JSON_VALUES = st.recursive(JSON_SCALARS, lambda inner: st.one_of(
    st.lists(inner, max_size=6), st.dictionaries(st.text(max_size=8), inner, max_size=5)), max_leaves=30)
FIELD_NAMES = ["v", *options.OPTION_NAMES, "dtype", "shape", "data"]


@st.composite
def json_requests(draw):
    if draw(st.integers(0, 3)) == 0:
        return json.dumps(draw(JSON_VALUES)).encode()
    keys = draw(st.lists(st.sampled_from(FIELD_NAMES), max_size=7, unique=True))
    obj = {k: draw(JSON_VALUES) for k in keys}
    # often keep the tensors plausible, so the checks behind the parser get exercised too
    if draw(st.booleans()):
        obj.setdefault("input", draw(st.one_of(
            st.lists(st.lists(st.floats(-10, 10), min_size=1, max_size=4), min_size=1, max_size=4),
            st.fixed_dictionaries({"dtype": st.sampled_from(DTYPE_NAMES),
                                   "data": st.lists(st.floats(-10, 10), max_size=8)},
                                  optional={"shape": st.lists(st.integers(-1, 2**40), max_size=3)}))))
        obj.setdefault("target", draw(st.lists(st.integers(-200, 10), min_size=1, max_size=4)))
    return json.dumps(obj).encode()


@FUZZ
@given(body=json_requests())
def test_random_json(http, body):
    post(http, body, protocol.JSON)
    check_still_correct(http)


@FUZZ
@given(data=st.data())
def test_valid_json_requests_match_torch(http, data):
    """The other side of the fuzz: random *valid* JSON requests are answered like torch."""
    n = data.draw(st.integers(1, 5))
    c = data.draw(st.integers(1, 6))
    values = st.floats(-20, 20, allow_nan=False, width=32)
    x = np.array(data.draw(st.lists(st.lists(values, min_size=c, max_size=c), min_size=n, max_size=n)),
                 dtype=np.float32)
    ignore_index = data.draw(st.sampled_from([-100, -1, 0]))
    t = np.array(data.draw(st.lists(st.integers(0, c - 1) | st.just(ignore_index), min_size=n, max_size=n)))
    reduction = data.draw(st.sampled_from(["mean", "sum", "none"]))
    ls = data.draw(st.sampled_from([0.0, 0.1, 1.0]))
    resp = post(http, json.dumps({"input": x.tolist(), "target": t.tolist(), "ignore_index": ignore_index,
                                  "reduction": reduction, "label_smoothing": ls,
                                  "return_grad": True}).encode(), protocol.JSON)
    xt = torch.from_numpy(x).double().requires_grad_()
    try:
        ref = torch.nn.functional.cross_entropy(xt, torch.from_numpy(t), ignore_index=ignore_index,
                                                reduction=reduction, label_smoothing=ls)
    except (IndexError, RuntimeError, ValueError) as exc:
        assert resp.status_code == 400
        assert resp.json()["error"]["message"] == str(exc)
        return
    ref.sum().backward()
    assert resp.status_code == 200, resp.text
    body = resp.json()

    loss = np.array(body["loss"], dtype=object)
    loss = np.vectorize(lambda v: float(v))(loss).astype(np.float64) if loss.size else loss.astype(np.float64)
    grad = np.vectorize(lambda v: float(v))(np.array(body["grad"], dtype=object)).astype(np.float64)
    np.testing.assert_allclose(loss, ref.detach().numpy(), rtol=2e-5, atol=2e-5)
    np.testing.assert_allclose(grad, xt.grad.numpy(), rtol=2e-5, atol=2e-6)


# --- grammar-aware (tests/support/fuzzing.py) ---------------------------------------------------------

@FUZZ
@given(body=fuzzing.msgpack_requests())
def test_grammar_aware_msgpack(http, body):
    post(http, body, protocol.MSGPACK)
    check_still_correct(http)


@settings(FUZZ, max_examples=30)
@given(raw=fuzzing.http_requests(VALID_BODY))
def test_http_framing(server, http, raw):
    """Raw HTTP/1.1 with broken framing: an answer below 500 every time, never a silent close."""
    status, out = fuzzing.exchange(server.host, server.port, raw)
    assert status is not None and status < 500, (status, out[:300])
    check_still_correct(http)


@FUZZ
@given(body=fuzzing.json_requests())
def test_grammar_aware_json(http, body):
    post(http, body, protocol.JSON)
    check_still_correct(http)


# --- every finding of the fuzzers, end to end (tests/wire/test_decode_hostile.py has them unit-level) --

def _torch_error(fn):
    with pytest.raises(Exception) as info:
        fn()
    return type(info.value), str(info.value).split("\n")[0]


def _msgpack(msg):
    return msgpack.packb(msg, use_bin_type=True)


def _wire(arr):
    return {"dtype": arr.dtype.name, "shape": list(arr.shape), "data": arr.tobytes()}


@pytest.mark.parametrize("body, code", [
    (b"[" * 1000 + b"]" * 1000, "bad_request"),                       # issue 11: RecursionError, 500
    (b'{"input": [[1.0]], "target": [0], "weight": ' + b"[" * 5000 + b"]" * 5000 + b"}", "bad_request"),
    (b'{"input": [[1.0]], "target": [' + b"1" * 5000 + b"]}", "bad_request"),   # Python's int digit limit
    # a lone surrogate, quoted back in torch's message, broke the error body's UTF-8: a 500
    (b'{"input": [[1.0]], "target": [0], "reduction": "\\ud800"}', "value_error"),
])  # fmt: skip
def test_finding_json_bodies_are_answered_400(http, body, code):
    resp = post(http, body, protocol.JSON)
    assert resp.status_code == 400 and resp.json()["error"]["code"] == code, resp.text
    check_still_correct(http)


def test_finding_a_shape_whose_size_overflows_is_refused_like_torch(http):
    """issue 11: numpy's 'array is too big' for [2**63-1, 2**63-1, 0] was a 500."""
    shape = [2**63 - 1, 2**63 - 1, 0]
    kind, message = _torch_error(lambda: torch.empty(shape))
    for msg in ({"input": {"dtype": "float32", "shape": shape, "data": b""}, "target": _wire(T)},
                {"input": _wire(X), "target": {"dtype": "int64", "shape": shape, "data": b""}}):
        resp = post(http, _msgpack(msg), protocol.MSGPACK)
        err = protocol.decode_message(bytearray(resp.content))["error"]
        assert resp.status_code == 400 and err["code"] == protocol.code_for_exception(kind(message))
        assert err["message"] == message
    check_still_correct(http)


def test_finding_integers_torch_cannot_hold_are_refused_like_torch(server):
    x, t = torch.from_numpy(X), torch.from_numpy(T)
    with clce_client.Client(server.url, retry_budget_s=0) as c:
        kind, message = _torch_error(lambda: torch.nn.functional.cross_entropy(x, t, ignore_index=2**63))
        with pytest.raises(kind, match=f"^{message}$"):
            c.cross_entropy(X, T, ignore_index=2**63)      # msgpack's uint64
    kind, message = _torch_error(lambda: torch.nn.functional.cross_entropy(x, t, label_smoothing=10**400))
    resp = httpx.post(server.url + "/v1/cross_entropy", timeout=30, headers={"Content-Type": protocol.JSON},
                      content=json.dumps({"input": X.tolist(), "target": T.tolist(), "label_smoothing": 10**400}))
    assert resp.status_code == 400 and resp.json()["error"] == {"code": "overflow_error", "message": message}
    assert kind is OverflowError
    resp = httpx.post(server.url + "/v1/cross_entropy", timeout=30, headers={"Content-Type": protocol.JSON},
                      content=json.dumps({"input": X.tolist(), "target": T.tolist(), "ignore_index": -(2**70)}))
    assert resp.status_code == 400 and resp.json()["error"] == {
        "code": "value_error", "message": "Overflow when unpacking long long"}
