"""msgpack's C codec for small messages, with the exact results of `protocol`'s own codec.

`protocol.decode_message` walks a body in Python so that big tensors stay views of the body (no
copy); for a request of a few KB that walk is a measurable share of the server's time per
request, and a copy costs nothing. So small bodies are decoded by msgpack's C unpacker and then
checked against the message rules (str keys, no duplicates, lists of scalars, binary only as a
tensor's data, the depth and size limits). Anything unusual (an error, a rule broken, a limit
reached) falls back to `protocol.decode_message`, which then gives the precise error. Valid
messages decode to equal values either way (tests/wire/test_fastpath.py checks this).

Encoding likewise: `encode_small` is `b"".join(protocol.encode_message(msg))` for small messages.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Union

import msgpack
import numpy as np

from .protocol import WireTensor, decode_message, encode_message, encode_tensor

__all__ = ["SMALL_BYTES", "decode_small", "encode_small"]

#: bodies up to this size take the C path
SMALL_BYTES = 64 * 1024
_TENSOR_KEYS = frozenset(("dtype", "shape", "data"))
_SCALARS = (type(None), bool, int, float, str)


class _Unusual(Exception):
    """Leave this message to protocol.decode_message."""


def _pairs(pairs: list) -> dict:
    out = dict(pairs)
    if len(out) != len(pairs):
        raise _Unusual("duplicate key")
    return out


def _reject_ext(code: int, data: bytes) -> Any:
    raise _Unusual("ext type")


def _check(value: Any, depth: int, max_depth: int, budget: list[int]) -> Any:
    """The message rules on a C-decoded value; tensor maps become WireTensors. `budget` holds the
    items left of the message's limit (containers count their entries, as in protocol)."""
    if isinstance(value, (dict, list)):
        budget[0] -= len(value)
        if budget[0] < 0:
            raise _Unusual("too many items")
    if isinstance(value, dict):
        if depth > max_depth:
            raise _Unusual("too deep")
        if depth > 1 and value.keys() == _TENSOR_KEYS and isinstance(value["data"], bytes):
            shape = value["shape"]
            if not isinstance(value["dtype"], str) or not isinstance(shape, list) or depth + 1 > max_depth:
                raise _Unusual("bad tensor")
            budget[0] -= len(shape)
            if budget[0] < 0 or not all(type(d) is int for d in shape):
                raise _Unusual("bad shape")
            # writable, like a view of a received body: the CPU device computes on it in place
            return WireTensor(value["dtype"], tuple(shape), memoryview(bytearray(value["data"])))
        return {k: _check(v, depth + 1, max_depth, budget) for k, v in value.items()}
    if isinstance(value, list):
        if depth > max_depth or not all(isinstance(x, _SCALARS) for x in value):
            raise _Unusual("list")
        return value
    if isinstance(value, (bytes, bytearray)):
        raise _Unusual("bare binary")
    return value


def decode_small(body: Union[bytes, bytearray, memoryview], *, max_depth: int = 4, max_items: int = 1024,
                 max_str: int = 65536) -> dict[str, Any]:
    """`protocol.decode_message(body)`, faster for small bodies (tensor data is then a copy)."""
    n = memoryview(body).nbytes
    if n == 0 or n > SMALL_BYTES:
        return decode_message(body, max_depth=max_depth, max_items=max_items, max_str=max_str)
    try:
        msg = msgpack.unpackb(body, raw=False, strict_map_key=True, use_list=True, object_pairs_hook=_pairs,
                              ext_hook=_reject_ext, max_str_len=max_str, max_bin_len=n,
                              max_array_len=min(max_items, n), max_map_len=min(max_items, n))
        if not isinstance(msg, dict):
            raise _Unusual("not a map")
        return _check(msg, 1, max_depth, [max_items])
    except Exception:   # _Unusual, or anything msgpack refused: the full decoder says what is wrong
        return decode_message(body, max_depth=max_depth, max_items=max_items, max_str=max_str)


def _plain(value: Any) -> Any:
    if isinstance(value, np.ndarray):
        value = encode_tensor(value)
    if isinstance(value, WireTensor):
        return {"dtype": value.dtype, "shape": list(value.shape), "data": value.data}
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, np.generic):
        return value.item()
    return value


def encode_small(msg: Mapping[str, Any]) -> bytes:
    """The bytes of `protocol.encode_message(msg)`, by msgpack's C packer when that is safe."""
    try:
        return msgpack.packb(_plain(msg), use_bin_type=True)
    except Exception:   # something the message rules refuse: the full encoder raises the right error
        return b"".join(bytes(s) for s in encode_message(msg))
