"""The C fast path for small messages gives exactly what protocol's own codec gives: equal values
for every valid message, the same ProtocolError for every invalid one, the same bytes encoded."""

from __future__ import annotations

import msgpack
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from clce_wire import fastpath, protocol
from clce_wire.protocol import ProtocolError, WireTensor

pytest.importorskip("ml_dtypes")

scalars = st.one_of(st.none(), st.booleans(), st.integers(-2**63, 2**64 - 1), st.floats(allow_nan=False),
                    st.text(max_size=8))
DTYPES = ["float32", "float16", "int64", "int32", "uint8", "bfloat16"]


@st.composite
def tensors(draw):
    dtype = draw(st.sampled_from(DTYPES))
    shape = draw(st.lists(st.integers(0, 5), max_size=3))
    n = int(np.prod(shape)) * protocol.DTYPES[dtype]
    return WireTensor(dtype, tuple(shape), draw(st.binary(min_size=n, max_size=n)))


values = st.recursive(st.one_of(scalars, st.lists(scalars, max_size=5), tensors()),
                      lambda inner: st.dictionaries(st.text(max_size=6), inner, max_size=4), max_leaves=12)
messages = st.dictionaries(st.text(max_size=8), values, max_size=6)


def same(a, b):
    if isinstance(a, WireTensor):
        return isinstance(b, WireTensor) and (a.dtype, a.shape, bytes(a.data)) == (b.dtype, b.shape, bytes(b.data))
    if isinstance(a, dict):
        return isinstance(b, dict) and list(a) == list(b) and all(same(a[k], b[k]) for k in a)
    if isinstance(a, list):
        return isinstance(b, list) and len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    if isinstance(a, float) and a != a:   # a damaged byte can make a NaN: equal to a NaN
        return isinstance(b, float) and b != b
    return type(a) is type(b) and a == b


def outcome(fn, body):
    try:
        return "ok", fn(body)
    except ProtocolError as exc:
        return "error", str(exc)


def agree(body: bytes) -> None:
    want, got = outcome(protocol.decode_message, body), outcome(fastpath.decode_small, body)
    assert want[0] == got[0], (want, got)
    assert same(want[1], got[1]) if want[0] == "ok" else want[1] == got[1], (want, got)


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(messages)
def test_valid_messages_decode_and_encode_the_same(msg):
    try:
        body = b"".join(bytes(s) for s in protocol.encode_message(msg))
    except (ProtocolError, TypeError):
        return
    agree(body)
    assert fastpath.encode_small(msg) == body


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(messages, st.data())
def test_near_valid_bodies_get_the_same_answer(msg, data):
    try:
        body = bytearray(b"".join(bytes(s) for s in protocol.encode_message(msg, max_depth=8)))
    except (ProtocolError, TypeError):
        return
    for _ in range(data.draw(st.integers(0, 3))):
        if body:
            body[data.draw(st.integers(0, len(body) - 1))] = data.draw(st.integers(0, 255))
    if data.draw(st.booleans()) and body:
        body = body[: data.draw(st.integers(0, len(body)))]
    agree(bytes(body))


@pytest.mark.parametrize("raw", [
    msgpack.packb({"a": 1, "b": [1, [2]]}),                       # a list inside a list
    b"\x82\xa1a\x01\xa1a\x02",                                     # a duplicate key
    msgpack.packb({"a": b"xx"}),                                   # binary outside a tensor
    msgpack.packb({"a": {"b": {"c": {"d": {"e": 1}}}}}),           # too deep
    msgpack.packb({"a": list(range(600)), "b": list(range(600))}),  # over the item limit in total
    msgpack.packb({"a": msgpack.ExtType(1, b"x")}),                 # ext
    msgpack.packb({"a": 1}) + b"\x00",                             # trailing bytes
    msgpack.packb([1, 2]),                                         # not a map
    msgpack.packb({1: 2}),                                         # a non-str key
])
def test_every_rule_is_kept(raw):
    agree(raw)
    with pytest.raises(ProtocolError):
        fastpath.decode_small(raw)


def test_tensor_data_is_writable():
    x = np.arange(6, dtype=np.float32).reshape(2, 3)
    msg = fastpath.decode_small(fastpath.encode_small({"v": 1, "x": {"t": x}}))
    arr = protocol.decode_tensor(msg["x"]["t"])
    assert arr.flags.writeable and np.array_equal(arr, x)
