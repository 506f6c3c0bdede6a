"""The wire format (clce_client.protocol), checked against msgpack itself as the reference."""

from __future__ import annotations

import math
import struct

import msgpack
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from clce_client import errors
from clce_wire.options import OPTION_NAMES, OPTIONS, REQUIRED, parse_request
from clce_wire.protocol import (
    DTYPES,
    ERROR_CODES,
    MAX_DIMS,
    PROTOCOL_VERSION,
    ProtocolError,
    WireTensor,
    code_for_exception,
    decode_message,
    decode_tensor,
    dtype_name,
    encode_message,
    encode_tensor,
    error_body,
    format_server_timing,
    message_nbytes,
    message_to_json,
    parse_server_timing,
    tensor_from_json,
    tensor_to_json,
)

ml_dtypes = pytest.importorskip("ml_dtypes")

NUMPY = {
    "float32": np.float32,
    "float64": np.float64,
    "float16": np.float16,
    "bfloat16": ml_dtypes.bfloat16,
    "int64": np.int64,
    "int32": np.int32,
    "int16": np.int16,
    "uint8": np.uint8,
    "bool": np.bool_,
}
SHAPES = [(), (0,), (3, 0, 2), (1,), (5,), (2, 3), (2, 3, 4), (1,) * MAX_DIMS]


def sample(dtype: str, shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    if dtype == "bool":
        out = rng.random(shape) < 0.5
    elif dtype in ("uint8", "int16", "int32", "int64"):
        info = np.iinfo(NUMPY[dtype])
        out = rng.integers(info.min, info.max, size=shape, dtype=NUMPY[dtype], endpoint=True)
    else:
        out = (rng.standard_normal(shape) * 100).astype(NUMPY[dtype])
    return np.asarray(out)  # 0-d draws come back as numpy scalars


def as_reference(obj):
    """The same content with tensors spelled as plain msgpack maps, for msgpack.packb."""
    if isinstance(obj, np.ndarray):
        arr = np.ascontiguousarray(obj)
        return {
            "dtype": dtype_name(arr.dtype),
            "shape": list(arr.shape),
            "data": arr.astype(arr.dtype.newbyteorder("<")).tobytes(),
        }
    if isinstance(obj, dict):
        return {k: as_reference(v) for k, v in obj.items()}
    return obj


def roundtrip(msg: dict) -> dict:
    return decode_message(bytearray(b"".join(encode_message(msg))))


# --- tensors --------------------------------------------------------------------------------


def test_dtype_table_is_the_documented_one():
    assert list(DTYPES) == [
        "float32", "float64", "float16", "bfloat16", "int64", "int32", "int16", "uint8", "bool"
    ]  # fmt: skip
    for name, itemsize in DTYPES.items():
        assert np.dtype(NUMPY[name]).itemsize == itemsize
        assert dtype_name(NUMPY[name]) == name


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_tensor_roundtrip_every_dtype_and_shape(dtype, shape):
    arr = sample(dtype, shape)
    out = roundtrip({"t": arr})["t"]
    assert out == WireTensor(dtype, shape, out.data)
    back = decode_tensor(out, name="t")
    assert back.dtype == np.dtype(NUMPY[dtype]) and back.shape == shape
    assert back.tobytes() == arr.tobytes()


def test_encode_tensor_is_zero_copy_for_contiguous_arrays():
    arr = np.arange(12, dtype=np.float32).reshape(3, 4)
    wt = encode_tensor(arr)
    assert wt.dtype == "float32" and wt.shape == (3, 4)
    assert np.shares_memory(np.frombuffer(wt.data, np.uint8), arr)
    segments = encode_message({"x": arr})
    assert any(
        isinstance(s, memoryview) and np.shares_memory(np.frombuffer(s, np.uint8), arr)
        for s in segments
    )


def test_encode_tensor_normalises_layout_and_byte_order():
    arr = np.arange(12, dtype=np.int32).reshape(3, 4)
    wt = encode_tensor(arr.T)  # Fortran order: must become C order
    assert wt.shape == (4, 3)
    assert bytes(wt.data) == np.ascontiguousarray(arr.T).tobytes()
    big = np.arange(5, dtype=">f8")
    wt = encode_tensor(big)
    assert wt.dtype == "float64"
    assert bytes(wt.data) == struct.pack("<5d", *range(5))


def test_encode_tensor_rejects_unsupported_dtypes():
    for bad in (np.array([1 + 2j]), np.array(["a"]), np.array([object()]), np.zeros(2, np.uint16)):
        with pytest.raises(TypeError, match="does not support dtype"):
            encode_tensor(bad)


def test_decode_is_zero_copy_and_writable_over_a_bytearray():
    arr = np.arange(1000, dtype=np.float32).reshape(10, 100)
    body = bytearray(b"".join(encode_message({"v": 1, "grad": arr})))
    out = decode_tensor(decode_message(body)["grad"], name="grad")
    np.testing.assert_array_equal(out, arr)
    assert np.shares_memory(out, np.frombuffer(body, np.uint8))
    base = np.frombuffer(body, np.uint8).ctypes.data
    assert base <= out.ctypes.data and out.ctypes.data + out.nbytes <= base + len(body)
    assert out.flags.writeable
    out[0, 0] = 42.0  # writes through to the body
    assert decode_tensor(decode_message(body)["grad"])[0, 0] == 42.0
    # over immutable bytes the array is read-only rather than a copy
    ro = decode_tensor(decode_message(bytes(body))["grad"])
    assert not ro.flags.writeable


@pytest.mark.parametrize(
    "wt, message",
    [
        (WireTensor("float32", (2, 3), b"\0" * 12),
         "input: 12 bytes of data for shape [2, 3] float32 needs 24"),
        (WireTensor("complex64", (1,), b"\0" * 8), "input: unknown dtype 'complex64'"),
        (WireTensor("float32", (-1,), b""), "input: shape [-1] must hold non-negative"),
        (WireTensor("float32", (1.0,), b"\0" * 4), "input: shape [1.0] must hold"),
        (WireTensor("float32", (True,), b"\0" * 4), "input: shape [True] must hold"),
        (WireTensor("float32", "12", b"\0" * 4), "input: shape must be a list"),
        (WireTensor("uint8", (1,) * 17, b"\0"), "input: 17 dimensions; at most 16"),
        (WireTensor("int64", (2**29, 2**30), b""), "needs 4611686018427387904"),
    ],
)  # fmt: skip
def test_decode_tensor_validation_names_the_field(wt, message):
    with pytest.raises(ProtocolError) as info:
        decode_tensor(wt, name="input")
    assert str(info.value).startswith("input: ")
    assert message in str(info.value)
    assert info.value.code == "bad_request"


def test_bfloat16_needs_ml_dtypes_for_numpy(monkeypatch):
    from clce_wire import protocol

    monkeypatch.delitem(protocol._NUMPY_DTYPES, "bfloat16")
    with pytest.raises(ProtocolError, match="pip install ml_dtypes"):
        decode_tensor(WireTensor("bfloat16", (2,), b"\0" * 4), name="loss")


# --- messages -------------------------------------------------------------------------------


def test_encode_message_matches_msgpack_packb_byte_for_byte():
    rng = np.random.default_rng(1)
    msg = {
        "v": PROTOCOL_VERSION,
        "input": rng.standard_normal((7, 33)).astype(np.float32),
        "target": rng.integers(0, 33, size=7),
        "weight": None,
        "ignore_index": -100,
        "reduction": "mean",
        "label_smoothing": 0.1,
        "return_grad": True,
        "nested": {"a": [1, -2**63, 2**64 - 1, 1.5, "x" * 40, None, True]},
        "empty": np.zeros((0, 4), np.float16),
        "big": np.zeros(70_000, np.uint8),  # bin32 header
        "mid": np.zeros(300, np.uint8),  # bin16 header
    }
    segments = encode_message(msg)
    body = b"".join(segments)
    assert body == msgpack.packb(as_reference(msg), use_bin_type=True)
    assert message_nbytes(segments) == len(body)
    assert msgpack.unpackb(body)["big"]["data"] == bytes(70_000)


def test_encode_accepts_numpy_scalars_and_tuples():
    body = b"".join(encode_message({"i": np.int64(5), "f": np.float32(0.5), "t": (1, 2)}))
    assert msgpack.unpackb(body) == {"i": 5, "f": 0.5, "t": [1, 2]}


@pytest.mark.parametrize(
    "msg, exc",
    [
        ({1: 2}, TypeError),
        ({"a": object()}, TypeError),
        ({"a": [[1]]}, TypeError),
        ({"a": {"b": {"c": {"d": {}}}}}, ProtocolError),
        ({"a": {"b": {"c": np.zeros(1)}}}, ProtocolError),
        ({"a": 2**64}, ProtocolError),
        ({"a": "x" * 70_000}, ProtocolError),
    ],
)
def test_encode_rejects_what_decode_would_reject(msg, exc):
    with pytest.raises(exc):
        encode_message(msg)


def test_depth_limit_is_the_same_on_both_sides():
    # four levels: the top map and three nested maps (or top, map, tensor map, shape list)
    out = roundtrip({"a": {"b": {"c": {"d": 1}}}, "t": {"u": np.ones(2, np.uint8)}})
    assert out["a"]["b"]["c"]["d"] == 1
    assert decode_tensor(out["t"]["u"]).tolist() == [1, 1]
    with pytest.raises(ProtocolError, match="nested deeper than 4"):
        encode_message({"t": {"u": {"w": np.ones(2, np.uint8)}}})
    deep = msgpack.packb({"t": {"u": {"w": {"dtype": "uint8", "shape": [1], "data": b"x"}}}})
    with pytest.raises(ProtocolError, match="nested deeper than 4"):
        decode_message(deep)


def test_decode_plain_values_like_msgpack():
    msg = {"a": None, "b": True, "c": False, "d": -1, "e": 2**64 - 1, "f": -(2**63),
           "g": 1e300, "h": "ünï", "i": [1, "two", 3.0], "j": {"k": {"l": []}}, "m": 127,
           "n": -32}  # fmt: skip
    body = msgpack.packb(msg)
    assert decode_message(body) == msg
    f32 = msgpack.packb({"x": 1.5}, use_single_float=True)
    assert f32[-5] == 0xCA and decode_message(f32) == {"x": 1.5}


def bin_header(n: int) -> bytes:
    return b"\xc6" + n.to_bytes(4, "big")


@pytest.mark.parametrize(
    "body, message",
    [
        (b"", "empty message"),
        (msgpack.packb([1, 2]), "must be a msgpack map"),
        (msgpack.packb({"a": 1}) + b"\x00", "1 trailing bytes"),
        (msgpack.packb({"a": "hello"})[:-2], "truncated"),
        (b"\x81\xa1a\xc6\xff\xff\xff\xff" + b"x" * 10, "truncated"),  # 4 GiB bin claimed
        (b"\x81\xa1a\xdd\xff\xff\xff\xff", "more than 1024 items"),  # 4G-item array
        (b"\x81\xa1a\xdf\x00\x00\x01\x00" + b"\xc0" * 10, "truncated"),  # 256-entry map, 10 bytes
        (b"\x81\xa1a\xdb\xff\xff\xff\xff", "exceeds 65536"),  # 4 GiB string claimed
        (b"\x81\x01\x02", "keys must be strings"),
        (b"\x82\xa1a\x01\xa1a\x02", "duplicate key 'a'"),
        (b"\x81\xa1a\xd4\x01\x00", "ext types"),
        (b"\x81\xa1a\xc7\x01\x05x", "ext types"),
        (b"\x81\xa1a\xc1", "invalid msgpack type byte 0xc1"),
        (b"\x81\xa1a\xa2\xff\xfe", "invalid UTF-8"),
        (msgpack.packb({"a": {"b": {"c": {"d": {}}}}}), "nested deeper than 4"),
        (msgpack.packb({"a": [[1]]}), "lists may hold only"),
        (msgpack.packb({"a": b"raw"}), "a: binary data is allowed only as a tensor's data"),
        (msgpack.packb({"a": {"dtype": 1, "shape": [1], "data": b"\0"}}), "str dtype"),
    ],
)  # fmt: skip
def test_decode_rejects_malformed_bodies(body, message):
    with pytest.raises(ProtocolError, match=message):
        decode_message(body)


def test_wrong_data_length_in_a_message():
    body = msgpack.packb({"input": {"dtype": "float32", "shape": [2, 3], "data": b"\0" * 12}})
    wt = decode_message(body)["input"]  # structurally fine ...
    expected = r"^input: 12 bytes of data for shape \[2, 3\] float32 needs 24$"
    with pytest.raises(ProtocolError, match=expected):
        decode_tensor(wt, name="input")  # ... but the sizes disagree


def test_decode_limits_are_configurable():
    body = msgpack.packb({"a": list(range(20))})
    assert decode_message(body)["a"] == list(range(20))
    with pytest.raises(ProtocolError, match="more than 10 items"):
        decode_message(body, max_items=10)
    with pytest.raises(ProtocolError, match="exceeds 3"):
        decode_message(msgpack.packb({"abcd": 1}), max_str=3)
    deep = msgpack.packb({"a": {"b": {"c": {"d": {"e": 1}}}}})
    assert decode_message(deep, max_depth=5)["a"]["b"]["c"]["d"] == {"e": 1}


def test_top_level_map_with_tensor_keys_stays_a_message():
    body = msgpack.packb({"dtype": "uint8", "shape": [1], "data": b"\x07"})
    with pytest.raises(ProtocolError, match="data: binary data"):
        decode_message(body)


# --- fuzzing ----------------------------------------------------------------------------------

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**63), max_value=2**64 - 1),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=20),
)
values = st.recursive(
    st.one_of(scalars, st.lists(scalars, max_size=5)),
    lambda inner: st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=20,
)
messages = st.dictionaries(st.text(max_size=8), values, max_size=6)
tensors = st.builds(
    sample,
    st.sampled_from(list(DTYPES)),
    st.lists(st.integers(0, 4), max_size=3).map(tuple),
    st.integers(0, 100),
)


def depth_of(obj) -> int:
    if isinstance(obj, dict):
        return 1 + max((depth_of(v) for v in obj.values()), default=0)
    if isinstance(obj, list):
        return 1
    return 0


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(messages)
def test_decode_agrees_with_msgpack_on_valid_messages(msg):
    body = msgpack.packb(msg)
    if depth_of(msg) > 4:
        with pytest.raises(ProtocolError):
            decode_message(body)
        return
    decoded = decode_message(body)
    # compare through packb so that NaN == NaN
    assert msgpack.packb(decoded) == msgpack.packb(msgpack.unpackb(body))
    assert b"".join(encode_message(decoded)) == body


@settings(max_examples=500, deadline=None)
@given(
    st.binary(max_size=200),
    st.sampled_from([b"", b"\x81", b"\x82\xa1a", b"\x8f", b"\xde\x00\x03"]),
)
def test_random_bytes_raise_only_protocol_error(data, prefix):
    body = prefix + data  # map prefixes get past the first byte into the walker
    try:
        result = decode_message(body)
    except ProtocolError:
        return
    assert isinstance(result, dict)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    msg=messages,
    tensor=tensors,
    edits=st.lists(
        st.tuples(st.sampled_from(["flip", "insert", "delete", "truncate"]),
                  st.integers(0, 10**6), st.integers(0, 255)),
        min_size=1, max_size=4,
    ),
)  # fmt: skip
def test_mutated_messages_raise_only_protocol_error(msg, tensor, edits):
    if depth_of(msg) > 3:
        return
    msg = {**msg, "input": tensor}
    body = bytearray(b"".join(encode_message(msg)))
    for op, pos, byte in edits:
        pos %= len(body) + 1
        if op == "flip" and pos < len(body):
            body[pos] = byte
        elif op == "insert":
            body[pos:pos] = bytes([byte])
        elif op == "delete":
            del body[pos : pos + 1]
        else:
            del body[pos:]
    try:
        decoded = decode_message(body)
        for key, value in decoded.items():
            if isinstance(value, WireTensor):
                decode_tensor(value, name=key)
    except ProtocolError:
        return


# --- requests ---------------------------------------------------------------------------------


def test_request_fields_and_defaults():
    assert PROTOCOL_VERSION == 1
    assert REQUIRED == {"input", "target"}
    x = np.zeros((2, 3), np.float32)
    t = np.array([0, 2])
    req = parse_request(roundtrip({"v": 1, "input": x, "target": t}))
    assert set(req) == OPTION_NAMES and [o.name for o in OPTIONS][:2] == ["input", "target"]
    assert req["ignore_index"] == -100 and req["reduction"] == "mean"
    assert req["label_smoothing"] == 0.0 and req["return_grad"] is False
    assert req["weight"] is None and req["softcap"] is None
    np.testing.assert_array_equal(req["target"], t)
    assert req["input"].dtype == np.float32


@pytest.mark.parametrize(
    "extra, message",
    [
        ({"ignore_idx": 1}, "unknown request field 'ignore_idx'"),
        ({"v": 2}, "unsupported protocol version 2"),
        ({"ignore_index": 1.5}, "ignore_index: expected an integer, got float"),
        ({"ignore_index": True}, "ignore_index: expected an integer, got bool"),
        ({"label_smoothing": "0.1"}, "label_smoothing: expected a number, got str"),
        ({"return_grad": 1}, "return_grad: expected true or false, got int"),
        ({"reduction": None}, "reduction: expected a string, got nil"),
        ({"weight": [1.0, 2.0]}, "weight: expected a tensor, got list"),
    ],
)
def test_parse_request_rejects_bad_fields(extra, message):
    msg = roundtrip({"input": np.zeros((1, 2), np.float32), "target": np.zeros(1, np.int64)})
    with pytest.raises(ProtocolError, match=message):
        parse_request({**msg, **extra})
    with pytest.raises(ProtocolError, match="missing request field 'target'"):
        parse_request({"input": msg["input"]})


def test_parse_request_json_form():
    req = parse_request(
        {"input": [[1, 2.5], [0, "-Infinity"]], "target": [1, 0], "label_smoothing": 0,
         "softcap": "Infinity", "weight": {"dtype": "float64", "data": [1, 2]}},
        json=True,
    )  # fmt: skip
    assert req["input"].dtype == np.float32 and req["input"][1, 1] == -np.inf
    assert req["target"].dtype == np.int64 and req["target"].tolist() == [1, 0]
    assert req["weight"].dtype == np.float64
    assert req["softcap"] == math.inf and req["label_smoothing"] == 0.0
    probs = parse_request({"input": [[0.0, 1.0]], "target": [[0.25, 0.75]]}, json=True)["target"]
    assert probs.dtype == np.float32  # floats: class probabilities, like torch.tensor infers


# --- JSON form --------------------------------------------------------------------------------


def test_tensor_json_roundtrip_keeps_non_finite_values():
    for dtype in ("float32", "float64", "float16", "bfloat16"):
        arr = np.array([[1.5, np.nan], [np.inf, -np.inf]], dtype=NUMPY[dtype])
        js = tensor_to_json(arr)
        assert js == [[1.5, "NaN"], ["Infinity", "-Infinity"]]
        assert all(type(v) in (float, str) for row in js for v in row)
        back = tensor_from_json(js, name="x", default_dtype=dtype)
        assert back.dtype == np.dtype(NUMPY[dtype])
        np.testing.assert_array_equal(back.astype(np.float64), arr.astype(np.float64))
    assert tensor_to_json(np.float32(0.1)) == float(np.float32(0.1))
    assert tensor_to_json(np.array([[1, 2]], np.int16)) == [[1, 2]]
    assert tensor_to_json(np.array([True, False])) == [True, False]


def test_tensor_from_json_forms_and_inference():
    flat = tensor_from_json({"dtype": "int32", "data": [1, 2, 3, 4, 5, 6], "shape": [2, 3]},
                            name="x", default_dtype="float32")  # fmt: skip
    assert flat.dtype == np.int32 and flat.tolist() == [[1, 2, 3], [4, 5, 6]]
    assert tensor_from_json(3, name="x", default_dtype=None).shape == ()
    assert tensor_from_json([], name="x", default_dtype="int64").shape == (0,)
    assert tensor_from_json([[], []], name="x", default_dtype="int64").shape == (2, 0)
    assert tensor_from_json([1, 2], name="x", default_dtype=None).dtype == np.int64
    assert tensor_from_json([1, 2.0], name="x", default_dtype=None).dtype == np.float32
    assert tensor_from_json([True], name="x", default_dtype=None).dtype == np.bool_
    assert tensor_from_json([1.0, 2], name="x", default_dtype="int64").tolist() == [1, 2]


@pytest.mark.parametrize(
    "value, dtype, message",
    [
        ([[1, 2], [3]], "float32", "ragged"),
        ([[1, 2], 3], "float32", "ragged"),
        ([1, [2]], "float32", "ragged"),
        (["nan"], "float32", "'nan' is not a number"),
        ([None], "float32", "None is not a number"),
        ([1.5], "int64", "1.5 is not an integer"),
        ([300], "uint8", "out of range for uint8"),
        ([2**70], "int64", "out of range for int64"),
        ({"data": [1, 2, 3], "shape": [2, 2]}, "float32", "3 values for shape"),
        ({"data": [1], "strides": [1]}, "float32", "unknown tensor key 'strides'"),
        ({"shape": [1]}, "float32", "needs \"data\""),
        ({"dtype": "complex64", "data": [1]}, "float32", "unknown dtype 'complex64'"),
        ([[[[[[[[[[[[[[[[[1]]]]]]]]]]]]]]]]], "float32", "deeper than 16"),
    ],
)  # fmt: skip
def test_tensor_from_json_errors(value, dtype, message):
    with pytest.raises(ProtocolError, match=message) as info:
        tensor_from_json(value, name="input", default_dtype=dtype)
    assert str(info.value).startswith("input: ")


def test_message_to_json():
    out = message_to_json({"v": 1, "loss": np.float32(np.nan), "lse": encode_tensor(
        np.array([1.0, np.inf], np.float32)), "accuracy": 0.5, "z": float("-inf")})  # fmt: skip
    assert out == {"v": 1, "loss": "NaN", "lse": [1.0, "Infinity"], "accuracy": 0.5,
                   "z": "-Infinity"}  # fmt: skip


# --- errors, timing ---------------------------------------------------------------------------


def test_error_code_table():
    expected = {
        "value_error": (400, ValueError), "index_error": (400, IndexError),
        "runtime_error": (400, RuntimeError), "type_error": (400, TypeError),
        "overflow_error": (400, OverflowError), "bad_request": (400, None), "unsupported_media_type": (415, None),
        "unauthorized": (401, None), "not_found": (404, None), "weight_not_stored": (404, None), "payload_too_large": (413, None),
        "queue_full": (429, None), "deadline_exceeded": (504, None), "not_ready": (503, None),
        "device_unavailable": (503, None), "internal": (500, None),
    }  # fmt: skip
    assert dict(ERROR_CODES) == expected
    assert ProtocolError.code == "bad_request" and issubclass(ProtocolError, ValueError)
    assert error_body("queue_full", "busy") == {"error": {"code": "queue_full", "message": "busy"}}
    with pytest.raises(ValueError):
        error_body("nope", "x")


def test_code_for_exception_and_client_classes_agree():
    cases = {
        ProtocolError("x"): "bad_request",
        IndexError("x"): "index_error",
        ValueError("x"): "value_error",
        TypeError("x"): "type_error",
        OverflowError("x"): "overflow_error",
        RuntimeError("x"): "runtime_error",
        NotImplementedError("x"): "runtime_error",
        KeyError("x"): "internal",
    }
    for exc, code in cases.items():
        assert code_for_exception(exc) == code
    for code, (status, builtin) in ERROR_CODES.items():
        body = msgpack.packb(error_body(code, f"message for {code}"))
        err = errors.error_from_response(status, body, "application/msgpack", {})
        assert err.code == code and err.status == status and str(err) == f"message for {code}"
        assert builtin is None or isinstance(err, builtin)
        if builtin is not None:
            assert code_for_exception(builtin("x")) == code


def test_server_timing_roundtrip():
    header = format_server_timing({"decode": 0.25, "queue": 1.5, "kernel": 3.0, "total": 5.125})
    assert header == "decode;dur=0.250, queue;dur=1.500, kernel;dur=3.000, total;dur=5.125"
    assert parse_server_timing(header) == {"decode": 0.25, "queue": 1.5, "kernel": 3.0,
                                           "total": 5.125}  # fmt: skip
    assert parse_server_timing('a;desc="x";dur=2, b, c;dur=oops, ;dur=1') == {"a": 2.0}
    assert parse_server_timing(None) == {}
