"""The clce wire format, shared by the client and the server.

A message is a msgpack map with str keys. Tensors travel as maps
``{"dtype": str, "shape": [int, ...], "data": bin}`` holding little-endian, C-order raw bytes.
The specification is docs/protocol.md.

This module imports only the standard library, numpy and msgpack (ml_dtypes when installed, for
bfloat16), so the server can use it without pulling in torch or httpx.

Zero copy in both directions: `encode_message` returns segments whose tensor parts are memoryviews
of the caller's arrays, and `decode_message` returns tensors as memoryviews of the request body.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Iterable, Mapping
from types import MappingProxyType
from typing import Any, NamedTuple, Union

import msgpack
import numpy as np

try:
    import ml_dtypes as _ml_dtypes
except ImportError:  # optional: only needed to hand bfloat16 tensors to numpy
    _ml_dtypes = None

__all__ = [
    "PROTOCOL_VERSION",
    "MSGPACK",
    "JSON",
    "DTYPES",
    "MAX_DIMS",
    "ERROR_CODES",
    "ProtocolError",
    "RefusedArgument",
    "INT64_MIN",
    "INT64_MAX",
    "WireTensor",
    "dtype_name",
    "numpy_dtype",
    "ALIGN",
    "first_data_offset",
    "aligned_body",
    "encode_tensor",
    "decode_tensor",
    "check_tensor_shape",
    "encode_message",
    "message_nbytes",
    "decode_message",
    "tensor_from_json",
    "kind_of",
    "special_float",
    "SPECIAL_FLOATS",
    "tensor_to_json",
    "message_to_json",
    "loads_json",
    "json_depth",
    "MAX_JSON_DEPTH",
    "error_body",
    "code_for_exception",
    "format_server_timing",
    "parse_server_timing",
]

PROTOCOL_VERSION = 1
MSGPACK = "application/msgpack"
JSON = "application/json"

# Wire dtype name -> itemsize. The order is the documented order.
DTYPES: Mapping[str, int] = MappingProxyType(
    {
        "float32": 4,
        "float64": 8,
        "float16": 2,
        "bfloat16": 2,
        "int64": 8,
        "int32": 4,
        "int16": 2,
        "uint8": 1,
        "bool": 1,
    }
)
MAX_DIMS = 16

_NUMPY_DTYPES: dict[str, np.dtype] = {
    "float32": np.dtype("<f4"),
    "float64": np.dtype("<f8"),
    "float16": np.dtype("<f2"),
    "int64": np.dtype("<i8"),
    "int32": np.dtype("<i4"),
    "int16": np.dtype("<i2"),
    "uint8": np.dtype("u1"),
    "bool": np.dtype("?"),
}
if _ml_dtypes is not None:
    # ml_dtypes types are native-order only; every platform clce supports is little-endian.
    _NUMPY_DTYPES["bfloat16"] = np.dtype(_ml_dtypes.bfloat16)

_NAME_BY_KIND = {
    ("f", 4): "float32",
    ("f", 8): "float64",
    ("f", 2): "float16",
    ("i", 8): "int64",
    ("i", 4): "int32",
    ("i", 2): "int16",
    ("u", 1): "uint8",
    ("b", 1): "bool",
}


class ProtocolError(ValueError):
    """A message that does not follow the wire format. Reported to clients as ``bad_request``."""

    code = "bad_request"


class RefusedArgument(ProtocolError):
    """A well-formed value that PyTorch itself refuses (an int64 overflow, a tensor size that
    overflows). ``error`` is the exception PyTorch raises for it: the server answers with its type
    and message (``code`` follows the type), as for any other argument PyTorch refuses."""

    def __init__(self, error: BaseException):
        super().__init__(str(error))
        self.error = error
        self.code = code_for_exception(error)


INT64_MIN, INT64_MAX = -(1 << 63), (1 << 63) - 1


# code -> (HTTP status, builtin exception type the client re-raises as, or None)
ERROR_CODES: Mapping[str, tuple[int, type[Exception] | None]] = MappingProxyType(
    {
        "value_error": (400, ValueError),
        "index_error": (400, IndexError),
        "runtime_error": (400, RuntimeError),
        "type_error": (400, TypeError),
        "overflow_error": (400, OverflowError),
        "bad_request": (400, None),
        "unsupported_media_type": (415, None),
        "unauthorized": (401, None),
        "not_found": (404, None),
        "weight_not_stored": (404, None),
        "payload_too_large": (413, None),
        "queue_full": (429, None),
        "deadline_exceeded": (504, None),
        "not_ready": (503, None),
        "device_unavailable": (503, None),
        "internal": (500, None),
    }
)


def error_body(code: str, message: str, request_id: str | None = None) -> dict[str, Any]:
    """The error body for `code` (either format): ``{"error": {"code": ..., "message": ...}}``,
    with ``request_id`` when given (server faults carry it, to find the logged trace)."""
    if code not in ERROR_CODES:
        raise ValueError(f"unknown error code {code!r}")
    message = str(message)
    try:
        message.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate from a JSON "\ud800" escape, quoted back to us
        message = message.encode("utf-8", "backslashreplace").decode("utf-8")
    err = {"code": code, "message": message}
    if request_id is not None:
        err["request_id"] = request_id
    return {"error": err}


def code_for_exception(exc: BaseException) -> str:
    """The error code under which the server reports `exc`."""
    code = getattr(exc, "code", None)
    if isinstance(code, str) and code in ERROR_CODES:
        return code
    # IndexError and TypeError first: they must not be reported as their more generic cousins.
    for builtin, name in (
        (IndexError, "index_error"),
        (TypeError, "type_error"),
        (OverflowError, "overflow_error"),
        (ValueError, "value_error"),
        (RuntimeError, "runtime_error"),
    ):
        if isinstance(exc, builtin):
            return name
    return "internal"


# ---------------------------------------------------------------------------------------------
# tensors


class WireTensor(NamedTuple):
    """A tensor as it travels: wire dtype name, shape and little-endian C-order bytes."""

    dtype: str
    shape: tuple[int, ...]
    data: Union[bytes, bytearray, memoryview]


def dtype_name(dtype: Any) -> str:
    """The wire name of a numpy dtype (or of a wire name, which is returned unchanged)."""
    if isinstance(dtype, str) and dtype in DTYPES:
        return dtype
    try:
        dt = np.dtype(dtype)
    except TypeError:
        raise TypeError(f"clce does not support dtype {dtype!r}") from None
    if _ml_dtypes is not None and dt == _NUMPY_DTYPES["bfloat16"]:
        return "bfloat16"
    name = _NAME_BY_KIND.get((dt.kind, dt.itemsize))
    if name is None:
        supported = ", ".join(DTYPES)
        raise TypeError(f"clce does not support dtype {dt}; supported: {supported}")
    return name


def numpy_dtype(name: str) -> np.dtype:
    """The (little-endian) numpy dtype for a wire dtype name."""
    dt = _NUMPY_DTYPES.get(name)
    if dt is not None:
        return dt
    if name == "bfloat16":
        raise ProtocolError(
            "bfloat16 tensors need the ml_dtypes package to become numpy arrays: "
            "pip install ml_dtypes"
        )
    raise ProtocolError(f"unknown dtype {name!r}; supported: {', '.join(DTYPES)}")


def _byte_view(data: Any, what: str) -> memoryview:
    """A flat unsigned-byte memoryview of `data`, without copying."""
    try:
        mv = memoryview(data)
    except TypeError:
        raise ProtocolError(f"{what}: expected bytes, got {type(data).__name__}") from None
    if mv.ndim == 1 and mv.format in ("B", "b", "c"):
        return mv if mv.format == "B" else mv.cast("B")
    if not mv.c_contiguous:
        raise ProtocolError(f"{what}: buffer is not contiguous")
    return mv.cast("B")


def encode_tensor(array: Any) -> WireTensor:
    """Describe a numpy array for the wire. Copies only to make it C-contiguous little-endian."""
    arr = np.asarray(array)
    name = dtype_name(arr.dtype)
    if name != "bfloat16":
        wire = _NUMPY_DTYPES[name]
        if arr.dtype != wire:  # big-endian or an alias such as int64 spelled differently
            arr = arr.astype(wire)
    shape = tuple(int(d) for d in arr.shape)
    if not arr.flags.c_contiguous:
        arr = np.ascontiguousarray(arr)
    data = memoryview(arr.reshape(-1).view(np.uint8))
    return WireTensor(name, shape, data)


def check_tensor_shape(dtype: Any, shape: Any, name: str) -> tuple[int, ...]:
    """The one check every tensor's dtype and shape passes before anything is allocated or
    viewed, whether its bytes came inline or lie in shared memory (clce_wire.shm.parse_ref): a
    known dtype; at most MAX_DIMS non-negative 64-bit sizes; a storage size that does not
    overflow as PyTorch counts it; and, for an empty tensor, sizes numpy can still describe."""
    if not isinstance(dtype, str) or dtype not in DTYPES:
        raise ProtocolError(f"{name}: unknown dtype {dtype!r}; supported: {', '.join(DTYPES)}")
    return _check_shape(shape, name, DTYPES[dtype])


def _check_shape(shape: Any, name: str, itemsize: int = 1) -> tuple[int, ...]:
    if not isinstance(shape, (list, tuple)):
        raise ProtocolError(f"{name}: shape must be a list of integers, got {type(shape).__name__}")
    if len(shape) > MAX_DIMS:
        raise ProtocolError(f"{name}: {len(shape)} dimensions; at most {MAX_DIMS} are supported")
    for d in shape:
        if type(d) is not int or d < 0 or d > INT64_MAX:
            raise ProtocolError(f"{name}: shape {list(shape)!r} must hold non-negative 64-bit integers")
    _check_storage_size(shape, itemsize)
    _check_numpy_size(shape, itemsize, name)
    return tuple(shape)


def _check_storage_size(shape: Any, itemsize: int) -> None:
    """Refuse a shape whose size overflows as PyTorch does (c10's computeStorageNbytes): the
    product of the sizes, taken in order in 64 bits, then times the item size, must not overflow
    and must fit in int64. A zero dimension does not excuse an overflow before it, as in torch."""
    prod, overflow = 1, False
    for d in shape:
        prod *= d
        if prod >= 1 << 64:
            overflow, prod = True, prod & ((1 << 64) - 1)
    nbytes = prod * itemsize
    if overflow or nbytes > INT64_MAX:
        raise RefusedArgument(RuntimeError(f"Storage size calculation overflowed with sizes={list(shape)}"))


def _check_numpy_size(shape: Any, itemsize: int, name: str) -> None:
    """numpy caps what an empty array may claim lower than torch does: the item size times the
    product of the non-zero sizes must fit in its intp ("array is too big"). Only an empty tensor
    can get here with such a shape (a non-empty one failed the storage check)."""
    nbytes = itemsize
    for d in shape:
        if d:
            nbytes *= d
    if nbytes > INT64_MAX:
        raise ProtocolError(f"{name}: empty tensor of shape {list(shape)} is too big for numpy")


def decode_tensor(wt: Any, *, name: str = "tensor") -> np.ndarray:
    """A numpy array over the tensor's bytes (no copy; writable when the bytes are)."""
    if not isinstance(wt, tuple) or len(wt) != 3:
        raise ProtocolError(f"{name}: expected a tensor {{dtype, shape, data}}")
    dtype_str, shape, data = wt
    shape = check_tensor_shape(dtype_str, shape, name)
    dtype = numpy_dtype(dtype_str)
    mv = _byte_view(data, name)
    need = math.prod(shape) * DTYPES[dtype_str]
    if mv.nbytes != need:
        raise ProtocolError(
            f"{name}: {mv.nbytes} bytes of data for shape {list(shape)} {dtype_str} needs {need}"
        )
    if need == 0:
        return _empty(shape, dtype, name)
    return np.frombuffer(mv, dtype=dtype).reshape(shape)


def _empty(shape: tuple[int, ...], dtype: np.dtype, name: str) -> np.ndarray:
    # the shape passed _check_numpy_size; a JSON tensor's inferred shape is small
    return np.empty(shape, dtype=dtype)


# ---------------------------------------------------------------------------------------------
# messages

Segment = Union[bytes, memoryview]
_SCALARS = (type(None), bool, int, float, str)


def _bin_header(n: int) -> bytes:
    if n < 1 << 8:
        return b"\xc4" + n.to_bytes(1, "big")
    if n < 1 << 16:
        return b"\xc5" + n.to_bytes(2, "big")
    if n < 1 << 32:
        return b"\xc6" + n.to_bytes(4, "big")
    raise ProtocolError(f"a tensor of {n} bytes exceeds msgpack's 4 GiB bin limit")


class _Encoder:
    def __init__(self, max_depth: int, max_str: int):
        self.max_depth = max_depth
        self.max_str = max_str
        self.segments: list[Segment] = []
        self.buf = bytearray()
        self.packer = msgpack.Packer(autoreset=True, use_bin_type=True)
        self.pack = self.packer.pack

    def scalar(self, value: Any, where: str) -> None:
        if isinstance(value, np.generic) and not isinstance(value, np.void):
            value = value.item()
        if not isinstance(value, _SCALARS):
            raise TypeError(f"{where}: cannot send a value of type {type(value).__name__}")
        if isinstance(value, str) and len(value) > self.max_str:
            raise ProtocolError(f"{where}: string longer than {self.max_str}")
        try:
            self.buf += self.pack(value)
        except OverflowError:
            raise ProtocolError(f"{where}: integer {value} does not fit in 64 bits") from None

    def value(self, value: Any, depth: int, where: str) -> None:
        if isinstance(value, np.ndarray):
            value = encode_tensor(value)
        if isinstance(value, WireTensor):
            self.tensor(value, depth + 1, where)
        elif isinstance(value, Mapping):
            self.map(value, depth + 1, where)
        elif isinstance(value, (list, tuple)):
            self.depth(depth + 1, where)
            self.buf += self.packer.pack_array_header(len(value))
            for i, item in enumerate(value):
                self.scalar(item, f"{where}[{i}]")
        else:
            self.scalar(value, where)

    def depth(self, depth: int, where: str) -> None:
        if depth > self.max_depth:
            raise ProtocolError(f"{where}: nested deeper than {self.max_depth} levels")

    def map(self, obj: Mapping[str, Any], depth: int, where: str) -> None:
        self.depth(depth, where)
        self.buf += self.packer.pack_map_header(len(obj))
        for key, value in obj.items():
            if not isinstance(key, str):
                raise TypeError(f"{where}: map keys must be str, got {type(key).__name__}")
            self.scalar(key, where)
            self.value(value, depth, f"{where}.{key}" if where else key)

    def tensor(self, wt: WireTensor, depth: int, where: str) -> None:
        self.depth(depth + 1, where)  # the shape list is one level below the tensor map
        if wt.dtype not in DTYPES:
            raise ProtocolError(f"{where}: unknown dtype {wt.dtype!r}")
        shape = [int(d) for d in _check_shape(tuple(wt.shape), where)]
        data = _byte_view(wt.data, where)
        self.buf += self.packer.pack_map_header(3)
        self.buf += self.pack("dtype")
        self.buf += self.pack(wt.dtype)
        self.buf += self.pack("shape")
        self.buf += self.pack(shape)
        self.buf += self.pack("data")
        self.buf += _bin_header(data.nbytes)
        if data.nbytes:
            self.segments.append(bytes(self.buf))
            self.buf.clear()
            self.segments.append(data)

    def finish(self) -> list[Segment]:
        if self.buf:
            self.segments.append(bytes(self.buf))
        return self.segments


def encode_message(
    obj: Mapping[str, Any], *, max_depth: int = 4, max_str: int = 65536
) -> list[Segment]:
    """Encode a message as msgpack segments; their concatenation is the message.

    numpy arrays and `WireTensor` values become tensor maps whose bytes are a memoryview segment of
    their own (never copied). Everything else must be nil, bool, int, float, str, a list of those or
    a nested map; the limits are the ones `decode_message` enforces by default.
    """
    if not isinstance(obj, Mapping):
        raise TypeError(f"a message must be a mapping, got {type(obj).__name__}")
    enc = _Encoder(max_depth, max_str)
    enc.map(obj, 1, "")
    return enc.finish()


def message_nbytes(segments: Iterable[Segment]) -> int:
    """The total size of `encode_message`'s segments."""
    return sum(s.nbytes if isinstance(s, memoryview) else len(s) for s in segments)


_U8 = struct.Struct(">B")
_U16 = struct.Struct(">H")
_U32 = struct.Struct(">I")
_FIXED = {  # type byte -> (struct, size) for fixed-width numbers
    0xCA: struct.Struct(">f"),
    0xCB: struct.Struct(">d"),
    0xCC: struct.Struct(">B"),
    0xCD: struct.Struct(">H"),
    0xCE: struct.Struct(">I"),
    0xCF: struct.Struct(">Q"),
    0xD0: struct.Struct(">b"),
    0xD1: struct.Struct(">h"),
    0xD2: struct.Struct(">i"),
    0xD3: struct.Struct(">q"),
}
_TENSOR_KEYS = frozenset(("dtype", "shape", "data"))


class _Decoder:
    """A msgpack reader for the message subset, working directly on the body.

    msgpack.Unpacker is not used because feeding it copies the whole body (tensor bytes included)
    into its own buffer, and skipping a bin needs the bin buffered: both defeat zero copy.
    Everything here is bounded by the body size and the limits before anything is allocated.
    """

    def __init__(self, mv: memoryview, max_depth: int, max_items: int, max_str: int):
        self.mv = mv
        self.end = len(mv)
        self.max_depth = max_depth
        self.items_left = max_items
        self.max_items = max_items
        self.max_str = max_str

    def need(self, pos: int, n: int, what: str) -> None:
        if n > self.end - pos:
            raise ProtocolError(
                f"truncated message: {what} at byte {pos} needs {n} bytes, "
                f"{max(self.end - pos, 0)} remain"
            )

    def length(self, pos: int, width: struct.Struct, what: str) -> tuple[int, int]:
        self.need(pos, width.size, what)
        return width.unpack_from(self.mv, pos)[0], pos + width.size

    def take_items(self, n: int, pos: int) -> None:
        self.items_left -= n
        if self.items_left < 0:
            raise ProtocolError(f"message has more than {self.max_items} items (at byte {pos})")

    def str_at(self, pos: int) -> tuple[str, int] | None:
        """The str at `pos`, or None when the value there is not a str."""
        t = self.mv[pos]
        if 0xA0 <= t <= 0xBF:
            n, pos = t & 0x1F, pos + 1
        elif t == 0xD9:
            n, pos = self.length(pos + 1, _U8, "str length")
        elif t == 0xDA:
            n, pos = self.length(pos + 1, _U16, "str length")
        elif t == 0xDB:
            n, pos = self.length(pos + 1, _U32, "str length")
        else:
            return None
        if n > self.max_str:
            raise ProtocolError(f"string of {n} bytes at byte {pos} exceeds {self.max_str}")
        self.need(pos, n, "str")
        try:
            return str(self.mv[pos : pos + n], "utf-8"), pos + n
        except UnicodeDecodeError:
            raise ProtocolError(f"invalid UTF-8 in string at byte {pos}") from None

    def value(self, pos: int, depth: int, where: str) -> tuple[Any, int]:
        self.need(pos, 1, "value")
        t = self.mv[pos]
        if t <= 0x7F:
            return t, pos + 1
        if t >= 0xE0:
            return t - 0x100, pos + 1
        if 0x80 <= t <= 0x8F:
            return self.map(t & 0x0F, pos + 1, depth + 1, where)
        if 0x90 <= t <= 0x9F:
            return self.array(t & 0x0F, pos + 1, depth + 1, where)
        s = self.str_at(pos)
        if s is not None:
            return s
        if t == 0xC0:
            return None, pos + 1
        if t == 0xC2:
            return False, pos + 1
        if t == 0xC3:
            return True, pos + 1
        fixed = _FIXED.get(t)
        if fixed is not None:
            self.need(pos + 1, fixed.size, "number")
            return fixed.unpack_from(self.mv, pos + 1)[0], pos + 1 + fixed.size
        if t in (0xC4, 0xC5, 0xC6):
            n, start = self.length(pos + 1, (_U8, _U16, _U32)[t - 0xC4], "bin length")
            self.need(start, n, f"{where}: bin of {n} bytes")
            return self.mv[start : start + n], start + n
        if t == 0xDC:
            n, pos = self.length(pos + 1, _U16, "array length")
            return self.array(n, pos, depth + 1, where)
        if t == 0xDD:
            n, pos = self.length(pos + 1, _U32, "array length")
            return self.array(n, pos, depth + 1, where)
        if t == 0xDE:
            n, pos = self.length(pos + 1, _U16, "map length")
            return self.map(n, pos, depth + 1, where)
        if t == 0xDF:
            n, pos = self.length(pos + 1, _U32, "map length")
            return self.map(n, pos, depth + 1, where)
        if t in (0xC7, 0xC8, 0xC9) or 0xD4 <= t <= 0xD8:
            raise ProtocolError(f"{where or 'message'}: msgpack ext types are not allowed")
        raise ProtocolError(f"invalid msgpack type byte 0x{t:02x} at byte {pos}")

    def check_container(self, n: int, pos: int, depth: int, where: str, min_bytes: int) -> None:
        if depth > self.max_depth:
            raise ProtocolError(f"{where or 'message'}: nested deeper than {self.max_depth} levels")
        self.take_items(n, pos)
        # every element takes at least one byte: reject huge claims before looping over them
        self.need(pos, n * min_bytes, f"{where or 'message'}: container of {n} items")

    def array(self, n: int, pos: int, depth: int, where: str) -> tuple[list[Any], int]:
        self.check_container(n, pos, depth, where, 1)
        out = []
        for i in range(n):
            item, pos = self.value(pos, depth, f"{where}[{i}]")
            if not isinstance(item, _SCALARS):
                raise ProtocolError(f"{where}[{i}]: lists may hold only nil, bool, int, float, str")
            out.append(item)
        return out, pos

    def map(self, n: int, pos: int, depth: int, where: str) -> tuple[Any, int]:
        self.check_container(n, pos, depth, where, 2)
        out: dict[str, Any] = {}
        for _ in range(n):
            self.need(pos, 1, "map key")
            key = self.str_at(pos)
            if key is None:
                raise ProtocolError(f"{where or 'message'}: map keys must be strings (byte {pos})")
            key, pos = key
            if key in out:
                raise ProtocolError(f"{where or 'message'}: duplicate key {key!r}")
            out[key], pos = self.value(pos, depth, f"{where}.{key}" if where else key)
        if depth > 1 and out.keys() == _TENSOR_KEYS and isinstance(out["data"], memoryview):
            shape = out["shape"]
            if not isinstance(out["dtype"], str) or not isinstance(shape, list):
                raise ProtocolError(f"{where}: a tensor needs a str dtype and a list shape")
            return WireTensor(out["dtype"], tuple(shape), out["data"]), pos
        for key, value in out.items():
            if isinstance(value, memoryview):
                field = f"{where}.{key}" if where else key
                raise ProtocolError(f"{field}: binary data is allowed only as a tensor's data")
        return out, pos


# ---------------------------------------------------------------------------------------------
# receiving into aligned memory

#: tensor payloads are placed on this boundary by receivers (SIMD loads, OpenCL USE_HOST_PTR)
ALIGN = 64
_DATA_KEY = b"\xa4data"   # the fixstr key "data" as encode_message writes it
_BIN_HEADER = {0xC4: 2, 0xC5: 3, 0xC6: 5}


def first_data_offset(head: Union[bytes, bytearray, memoryview]) -> int | None:
    """Where the first tensor's bytes start in a message that begins with `head`, or None.

    Senders put the big tensor first (requests: input; responses: grad), so a receiver that
    knows this offset from the first few hundred bytes can place the whole body so the tensor
    lands aligned, and use it in place. It only reads our own encoding; a wrong guess costs
    alignment, never correctness.
    """
    h = bytes(head[:4096])
    i = h.find(_DATA_KEY)
    while i >= 0:
        j = i + len(_DATA_KEY)
        hdr = _BIN_HEADER.get(h[j]) if j < len(h) else None
        if hdr is not None and j + hdr <= len(h):
            return j + hdr
        i = h.find(_DATA_KEY, i + 1)
    return None


def aligned_body(size: int, head: Union[bytes, bytearray, memoryview], backing: np.ndarray | None = None) -> np.ndarray:
    """A writable uint8 array of `size` bytes, placed in `backing` (or a new allocation of
    size + ALIGN bytes) so the first tensor of a message beginning with `head` is ALIGN-aligned."""
    off = first_data_offset(head) or 0
    if backing is None:
        backing = np.empty(size + ALIGN, np.uint8)
    if backing.nbytes < size + ALIGN:
        raise ValueError("backing buffer too small")
    start = (-(backing.ctypes.data + off)) % ALIGN
    return backing[start : start + size]


def decode_message(
    body: Union[bytes, bytearray, memoryview],
    *,
    max_depth: int = 4,
    max_items: int = 1024,
    max_str: int = 65536,
) -> dict[str, Any]:
    """Decode a msgpack message. Tensor maps become `WireTensor`s viewing `body` (no copy).

    Raises only `ProtocolError`, whatever the body holds.
    """
    mv = _byte_view(body, "body")
    if not mv:
        raise ProtocolError("empty message")
    t = mv[0]
    if not (0x80 <= t <= 0x8F or t in (0xDE, 0xDF)):
        raise ProtocolError("a message must be a msgpack map")
    try:
        msg, pos = _Decoder(mv, max_depth, max_items, max_str).value(0, 0, "")
    except RecursionError:  # only reachable with a caller-chosen huge max_depth
        raise ProtocolError("message nested too deeply") from None
    if pos != len(mv):
        raise ProtocolError(f"{len(mv) - pos} trailing bytes after the message")
    return msg


def kind_of(value: Any) -> str:
    if value is None:
        return "nil"
    if isinstance(value, WireTensor):
        return "a tensor"
    return type(value).__name__


# ---------------------------------------------------------------------------------------------
# JSON form

SPECIAL_FLOATS = {"NaN": math.nan, "Infinity": math.inf, "-Infinity": -math.inf}


def special_float(value: Any) -> bool:
    return type(value) is str and value in SPECIAL_FLOATS


def _flatten(value: Any, name: str) -> tuple[list[Any], tuple[int, ...]]:
    """Flatten a nested list level by level, checking it is rectangular."""
    shape: list[int] = []
    level = [value]
    while level and isinstance(level[0], list):
        n = len(level[0])
        for sub in level:
            if not isinstance(sub, list) or len(sub) != n:
                raise ProtocolError(f"{name}: ragged nested list (not a rectangular tensor)")
        shape.append(n)
        if len(shape) > MAX_DIMS:
            raise ProtocolError(f"{name}: nested deeper than {MAX_DIMS} dimensions")
        level = [x for sub in level for x in sub]
    if any(isinstance(x, list) for x in level):
        raise ProtocolError(f"{name}: ragged nested list (not a rectangular tensor)")
    return level, tuple(shape)


def _json_array(flat: list[Any], dtype: str | None, name: str) -> np.ndarray:
    for x in flat:
        if type(x) not in (int, float, bool) and not special_float(x):
            raise ProtocolError(f"{name}: {x!r} is not a number")
    if dtype is None:  # infer like torch.tensor
        if not flat or any(type(x) is float or type(x) is str for x in flat):
            dtype = "float32"
        elif flat and all(type(x) is bool for x in flat):
            dtype = "bool"
        else:
            dtype = "int64"
    if dtype not in DTYPES:
        raise ProtocolError(f"{name}: unknown dtype {dtype!r}; supported: {', '.join(DTYPES)}")
    target = numpy_dtype(dtype)
    if dtype in ("float32", "float64", "float16", "bfloat16"):
        values = np.array([SPECIAL_FLOATS.get(x, x) for x in flat], dtype=np.float64)
        return values.astype(target)
    if dtype == "bool":
        if any(type(x) is not bool and x not in (0, 1) for x in flat):
            raise ProtocolError(f"{name}: bool tensors take true/false (or 0/1)")
        return np.array([bool(x) for x in flat], dtype=target)
    ints = []
    for x in flat:
        if type(x) is float and not x.is_integer() or type(x) is str:
            raise ProtocolError(f"{name}: {x!r} is not an integer, as {dtype} needs")
        ints.append(int(x))
    info = np.iinfo(target)
    if ints and (min(ints) < info.min or max(ints) > info.max):
        raise ProtocolError(f"{name}: value out of range for {dtype}")
    return np.array(ints, dtype=target)


def tensor_from_json(
    value: Any, *, name: str = "tensor", default_dtype: str | None = "float32"
) -> np.ndarray:
    """A numpy array from the JSON form of a tensor.

    Either a nested list of numbers (or a bare number, giving a 0-d tensor) in `default_dtype`, or
    an object ``{"dtype": ..., "data": nested-or-flat list, "shape": optional}``. Non-finite floats
    are the strings "NaN", "Infinity", "-Infinity". `default_dtype=None` infers the dtype like
    torch.tensor: int64 for integers, float32 when any value is a float, bool for all booleans.
    """
    dtype = default_dtype
    shape = None
    if isinstance(value, dict):
        unknown = sorted(set(value) - {"dtype", "data", "shape"})
        if unknown:
            raise ProtocolError(f"{name}: unknown tensor key {unknown[0]!r}")
        if "data" not in value:
            raise ProtocolError(f"{name}: a tensor object needs \"data\"")
        dtype = value.get("dtype", default_dtype)
        if dtype is not None and not isinstance(dtype, str):
            raise ProtocolError(f"{name}: dtype must be a string")
        if "shape" in value:
            shape = _check_shape(value["shape"], name, DTYPES.get(dtype, 1) if dtype else 1)
        value = value["data"]
    flat, inferred = _flatten(value, name)
    if shape is None:
        shape = inferred
    elif math.prod(shape) != len(flat):
        raise ProtocolError(f"{name}: {len(flat)} values for shape {list(shape)}")
    arr = _json_array(flat, dtype, name)
    if arr.size:
        return arr.reshape(shape)
    # the dtype may have been inferred only now: the shape is checked with its real item size
    return _empty(check_tensor_shape(dtype_name(arr.dtype), shape, name), arr.dtype, name)


def _json_floats(value: Any) -> Any:
    if isinstance(value, list):
        return [_json_floats(v) for v in value]
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "Infinity" if value > 0 else "-Infinity"
    return value


def tensor_to_json(array: Any) -> Any:
    """The JSON form of an array: nested lists (a scalar for 0-d); non-finite floats as strings."""
    arr = np.asarray(array)
    name = dtype_name(arr.dtype)
    if name in ("float32", "float64", "float16", "bfloat16"):
        wide = arr.astype(np.float64)
        out = wide.tolist()
        return out if np.isfinite(wide).all() else _json_floats(out)
    return arr.tolist()


def message_to_json(msg: Mapping[str, Any]) -> dict[str, Any]:
    """A message with its tensors (numpy or `WireTensor`) in the JSON form, ready for json.dumps."""
    out: dict[str, Any] = {}
    for key, value in msg.items():
        if isinstance(value, WireTensor):
            value = tensor_to_json(decode_tensor(value, name=key))
        elif isinstance(value, (np.ndarray, np.generic)):
            value = tensor_to_json(value)
        elif isinstance(value, Mapping):
            value = message_to_json(value)
        elif isinstance(value, float) and not math.isfinite(value):
            value = _json_floats(value)
        out[key] = value
    return out


# ---------------------------------------------------------------------------------------------
# JSON bodies

#: Nesting a JSON request needs: the request object, a tensor object, and MAX_DIMS nested lists.
MAX_JSON_DEPTH = MAX_DIMS + 2
_JSON_SCAN_CHUNK = 1 << 22


def _escaped(c: np.ndarray, quotes: np.ndarray, carry: int) -> tuple[np.ndarray, int]:
    """Which of the quotes at positions `quotes` of chunk `c` are escaped (an odd run of
    backslashes before them; `carry` backslashes ended the previous chunk), and the length of
    the run of backslashes that ends this chunk."""
    bpos = np.flatnonzero(c == 0x5C)
    if not bpos.size:
        return (quotes == 0) & bool(carry & 1), 0
    first = np.ones(bpos.size, bool)
    first[1:] = np.diff(bpos) != 1
    run_start = bpos[np.maximum.accumulate(np.where(first, np.arange(bpos.size), 0))]

    def run_length(end: np.ndarray) -> np.ndarray:   # runs ending at bpos[end]
        start = run_start[end]
        return bpos[end] - start + 1 + np.where(start == 0, carry, 0)

    escaped = np.zeros(quotes.size, bool)
    before = quotes - 1
    i = np.searchsorted(bpos, before)
    hit = (i < bpos.size) & (before >= 0)
    hit[hit] = bpos[i[hit]] == before[hit]
    escaped[hit] = run_length(i[hit]) & 1 == 1
    escaped |= (quotes == 0) & bool(carry & 1)
    tail = int(run_length(np.array([bpos.size - 1]))[0]) if bpos[-1] == c.size - 1 else 0
    return escaped, tail


def json_depth(text: Union[bytes, bytearray, memoryview], stop_above: int | None = None, *,
               chunk_bytes: int = _JSON_SCAN_CHUNK) -> int:
    """The deepest nesting of arrays and objects in JSON `text`, without parsing it: brackets
    inside strings do not count (escaped quotes are followed). Vectorised over chunks, so a body
    of any size costs a few cheap numpy passes (about a tenth of json.loads) and bounded memory.
    Exact for valid JSON; for invalid JSON the answer is meaningless, but the parser refuses such
    a body anyway. Returns early, with a depth above `stop_above`, once that is exceeded."""
    buf = np.frombuffer(text, np.uint8)
    depth = deepest = 0
    in_string = 0
    carry = 0            # backslashes that ended the previous chunk
    for start in range(0, buf.size, chunk_bytes):
        c = buf[start:start + chunk_bytes]
        folded = c | 0x20                      # [ -> {, ] -> }
        opens = folded == 0x7B
        brackets = np.flatnonzero(opens | (folded == 0x7D))
        quotes = np.flatnonzero(c == 0x22)
        if quotes.size or carry or c[-1] == 0x5C:
            escaped, carry = _escaped(c, quotes, carry)
            quotes = quotes[~escaped]
        if quotes.size or in_string:
            # a bracket is inside a string when an odd number of real quotes (plus the state the
            # chunk began in) precede it
            outside = (np.searchsorted(quotes, brackets) + in_string) & 1 == 0
            brackets = brackets[outside]
            in_string = (quotes.size + in_string) & 1
        if not brackets.size:
            continue
        levels = np.cumsum(np.where(opens[brackets], 1, -1), dtype=np.int64) + depth
        deepest = max(deepest, int(levels.max()))
        depth = int(levels[-1])
        if stop_above is not None and deepest > stop_above:
            break
    return deepest


def loads_json(text: Union[bytes, bytearray, memoryview, str], max_depth: int = MAX_JSON_DEPTH) -> Any:
    """`json.loads` for untrusted bodies: raises only `ProtocolError`, whatever `text` holds.

    Nesting deeper than `max_depth` is refused before parsing (the parser recurses, and a body
    nested a thousand deep would exhaust the stack); invalid UTF-8, invalid JSON and integers of
    more digits than Python converts are refused too."""
    import json

    if isinstance(text, str):
        text = text.encode("utf-8", "surrogatepass")
    if json_depth(text, max_depth) > max_depth:
        raise ProtocolError(f"JSON nested deeper than {max_depth} levels")
    try:
        return json.loads(bytes(text) if not isinstance(text, bytes) else text)
    except RecursionError:   # only with a caller-chosen max_depth near the recursion limit
        raise ProtocolError("JSON nested too deeply") from None
    except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError, int digit limit
        raise ProtocolError(f"invalid JSON: {exc}") from None


# ---------------------------------------------------------------------------------------------
# Server-Timing header


def format_server_timing(timings: Mapping[str, float]) -> str:
    """``decode;dur=0.412, queue;dur=1.000, ...`` from milliseconds per phase."""
    return ", ".join(f"{name};dur={ms:.3f}" for name, ms in timings.items())


def parse_server_timing(header: str | None) -> dict[str, float]:
    """Milliseconds per phase from a Server-Timing header; malformed entries are skipped."""
    out: dict[str, float] = {}
    if not header:
        return out
    for entry in header.split(","):
        name, *params = (p.strip() for p in entry.split(";"))
        for param in params:
            key, _, val = param.partition("=")
            if name and key.strip().lower() == "dur":
                try:
                    out[name] = float(val.strip().strip('"'))
                except ValueError:
                    pass
    return out

