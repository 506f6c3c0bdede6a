"""The decoders against hostile bodies, without a server: every finding of the fuzzers is a
regression test here (and end to end in tests/cross_entropy/test_endpoint_fuzz.py). Values PyTorch refuses are refused
with PyTorch's exception type and message, checked against the installed torch."""

from __future__ import annotations

import json

import msgpack
import numpy as np
import pytest

from clce_wire import options, protocol
from clce_wire.protocol import ProtocolError, RefusedArgument

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

torch = pytest.importorskip("torch")

X = np.zeros((3, 5), np.float32)
T = np.array([1, 2, 3])


def torch_refusal(fn):
    with pytest.raises(Exception) as info:
        fn()
    return type(info.value), str(info.value).split("\n")[0]


def wire(arr):
    return {"dtype": arr.dtype.name, "shape": list(arr.shape), "data": arr.tobytes()}


def decode(msg):
    return options.parse_request(protocol.decode_message(msgpack.packb(msg, use_bin_type=True)))


# --- findings: shapes whose size overflows ----------------------------------------------------

@pytest.mark.parametrize("shape, dtype", [
    ([2**63 - 1, 2**63 - 1, 0], "float32"),   # issue 11: numpy's "array is too big" was a 500
    ([2**62, 4, 0], "int64"),               # a zero dimension after an overflow does not help
    ([2**62, 2], "float32"),
    ([2**60, 4], "float32"),                  # the elements fit, the bytes do not
])  # fmt: skip
def test_overflowing_shape_is_refused_like_torch(shape, dtype):
    kind, message = torch_refusal(lambda: torch.empty(shape, dtype=getattr(torch, dtype)))
    for body in ({"input": {"dtype": dtype, "shape": shape, "data": b""}, "target": wire(T)},
                 {"input": wire(X), "target": {"dtype": dtype, "shape": shape, "data": b""}}):
        with pytest.raises(RefusedArgument) as info:
            decode(body)
        assert type(info.value.error) is kind and str(info.value) == message
        assert info.value.code == protocol.code_for_exception(kind(message))
    js = {"input": {"dtype": dtype, "data": [], "shape": shape}, "target": [1]}
    with pytest.raises(RefusedArgument) as info:
        options.parse_request(protocol.loads_json(json.dumps(js)), json=True)
    assert str(info.value) == message


def test_big_empty_shapes_torch_accepts_are_not_server_errors():
    # torch makes these; numpy's cap is lower: a clean 400, never numpy's ValueError escaping
    torch.empty((2**60, 8, 0))
    for shape in ([2**60, 8, 0], [2**61, 2, 0], [0, 2**62]):
        try:
            decode({"input": {"dtype": "uint8", "shape": shape, "data": b""}, "target": wire(T)})
        except ProtocolError:
            pass


def test_dimension_beyond_int64_is_a_protocol_error():
    with pytest.raises(ProtocolError, match="64-bit"):
        decode({"input": {"dtype": "float32", "shape": [2**64 - 1, 0], "data": b""}, "target": wire(T)})


# --- findings: integers PyTorch cannot hold ---------------------------------------------------

@pytest.mark.parametrize("value", [2**63, 2**64 - 1, -(2**63) - 1, 2**70])
def test_ignore_index_beyond_int64_is_refused_like_torch(value):
    x, t = torch.zeros(3, 5), torch.tensor([1, 2, 3])
    kind, message = torch_refusal(lambda: torch.nn.functional.cross_entropy(x, t, ignore_index=value))
    if -(2**63) <= value < 2**64:   # msgpack carries up to uint64 and down to int64
        with pytest.raises(RefusedArgument) as info:
            decode({"input": wire(X), "target": wire(T), "ignore_index": value})
        assert type(info.value.error) is kind and str(info.value) == message
        assert info.value.code == "value_error"
    with pytest.raises(RefusedArgument) as info:
        options.parse_request({"input": [[0.0]], "target": [0], "ignore_index": value}, json=True)
    assert type(info.value.error) is kind and str(info.value) == message


def test_int64_bounds_themselves_are_accepted():
    for value in (2**63 - 1, -(2**63)):
        assert decode({"input": wire(X), "target": wire(T), "ignore_index": value})["ignore_index"] == value


def test_float_option_from_an_int_no_double_holds_is_refused_like_torch():
    x, t = torch.zeros(3, 5), torch.tensor([1, 2, 3])
    kind, message = torch_refusal(lambda: torch.nn.functional.cross_entropy(x, t, label_smoothing=10**400))
    with pytest.raises(RefusedArgument) as info:
        options.parse_request({"input": [[0.0]], "target": [0], "label_smoothing": 10**400}, json=True)
    assert type(info.value.error) is kind is OverflowError and str(info.value) == message
    assert info.value.code == "overflow_error"


# --- findings: JSON nesting, digits, encodings ------------------------------------------------

@pytest.mark.parametrize("body", [
    b"[" * 1000 + b"]" * 1000,                 # issue 11: RecursionError was a 500
    b'{"input":' + b"[" * 100000,              # truncated, and deep
    b'{"a":' * 5000 + b"1" + b"}" * 5000,
    b'{"input": [[1.0]], "target": ' + b"[" * 19 + b"0" + b"]" * 19 + b"}",
])  # fmt: skip
def test_deep_json_is_a_protocol_error(body):
    with pytest.raises(ProtocolError, match="nested deeper than"):
        protocol.loads_json(body)


@pytest.mark.parametrize("body", [b"1" * 5000, b"\xff\xfe", b"", b"[1,]", b'{"a" 1}', b"\x00"])
def test_invalid_json_is_a_protocol_error(body):
    with pytest.raises(ProtocolError):
        protocol.loads_json(body)


def test_loads_json_allows_a_request_at_the_depth_limit():
    x = np.zeros((1,) * protocol.MAX_DIMS, np.float32).tolist()
    msg = protocol.loads_json(json.dumps({"input": {"dtype": "float32", "data": x}, "target": [0]}))
    assert protocol.json_depth(json.dumps(msg).encode()) == protocol.MAX_JSON_DEPTH


def _reference_depth(text: str) -> int:
    depth = deepest = 0
    in_string = escaped = False
    for ch in text:
        if in_string:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                in_string = False
        elif ch == '"':
            in_string = True
        elif ch in "[{":
            depth += 1
            deepest = max(deepest, depth)
        elif ch in "]}":
            depth -= 1
    return deepest


TRICKY = st.text(alphabet='[]{}"\\ab', max_size=8)
JSON_VALUES = st.recursive(st.one_of(st.none(), st.integers(), TRICKY),
                           lambda inner: st.lists(inner, max_size=4) | st.dictionaries(TRICKY, inner, max_size=3),
                           max_leaves=25)


@settings(max_examples=300, deadline=None, derandomize=True, database=None)
@given(value=JSON_VALUES, chunk=st.sampled_from([1, 2, 3, 5, 64, 1 << 22]))
def test_json_depth_matches_a_reference_scanner(value, chunk):
    """The vectorised scan agrees with a character-by-character one, also when brackets,
    quotes and runs of backslashes straddle its chunk boundaries."""
    text = json.dumps(value)
    assert protocol.json_depth(text.encode(), chunk_bytes=chunk) == _reference_depth(text)


def test_error_body_survives_a_lone_surrogate():
    """torch quotes a bad reduction back; from JSON it may hold a lone surrogate ("\\ud800"),
    which no UTF-8 error body can carry: it is escaped, not a 500."""
    body = protocol.error_body("value_error", "\ud800 is not a valid value for reduction")
    assert body["error"]["message"] == "\\ud800 is not a valid value for reduction"
    json.dumps(body, ensure_ascii=False).encode("utf-8")
    msgpack.packb(body)
