"""The shared-memory extension of the wire format (docs/protocol.md, "Shared memory").

A client on the server's host registers sealed memfds ("regions") over the server's Unix socket,
once; a request then names tensors as references into them instead of carrying their bytes:

    {"dtype": "float32", "shape": [2048, 32000], "region": "r1-7", "offset": 0}

and asks for the gradient to be written into one of its regions (`grad_region`, `grad_offset`);
the answer's "grad" is then such a reference too. This module is what both sides share: the
reference type and its wire checks, region names, the socket's framing, and the host identity.
Only the standard library, numpy and msgpack.
"""

from __future__ import annotations

import math
import os
import re
import socket
import struct
from collections.abc import Mapping
from typing import Any, NamedTuple

import msgpack

from .protocol import DTYPES, MAX_DIMS, ProtocolError, check_tensor_shape

__all__ = ["RegionRef", "parse_ref", "ref_map", "is_ref_map", "check_region_name", "REGION_NAME",
           "host_id", "send_frame", "recv_frame", "encode_frame", "decode_frame", "FRAME_HEADER", "MAX_FRAME",
           "SEALS_REQUIRED"]

#: a region's name: a name, never a path
REGION_NAME = re.compile(r"[A-Za-z0-9_.-]{1,64}")
MAX_FRAME = 1 << 16
#: a frame's header: the length of the msgpack map that follows
FRAME_HEADER = _LEN = struct.Struct(">I")
_REF_KEYS = frozenset(("dtype", "shape", "region", "offset"))
_U64_MAX = (1 << 64) - 1

try:
    import fcntl as _fcntl

    #: seals a region must carry before a server maps it: it can never shrink under the mapping
    #: (no SIGBUS), and never grow past the size the server charged its tenant for
    SEALS_REQUIRED = _fcntl.F_SEAL_SHRINK | _fcntl.F_SEAL_GROW
except (ImportError, AttributeError):   # not Linux
    SEALS_REQUIRED = 0x0002 | 0x0004


class RegionRef(NamedTuple):
    """A tensor that lives in a registered region: `nbytes` bytes at `offset`."""

    dtype: str
    shape: tuple[int, ...]
    region: str
    offset: int

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * DTYPES[self.dtype]


def check_region_name(name: Any, what: str = "region") -> str:
    if not isinstance(name, str) or not REGION_NAME.fullmatch(name):
        raise ProtocolError(f"{what}: a region name is 1-64 characters of A-Z a-z 0-9 _ . -, got {name!r}")
    return name


def is_ref_map(value: Any) -> bool:
    return isinstance(value, Mapping) and "region" in value


def parse_ref(value: Any, *, name: str) -> RegionRef:
    """A RegionRef from its wire map, with every number checked (sizes are Python ints: no overflow)."""
    if not isinstance(value, Mapping) or value.keys() != _REF_KEYS:
        raise ProtocolError(f"{name}: a region reference has exactly the keys dtype, shape, region, offset")
    dtype, offset = value["dtype"], value["offset"]
    shape = check_tensor_shape(dtype, value["shape"], name)   # the same check as inline tensors
    if type(offset) is not int or not 0 <= offset <= _U64_MAX:
        raise ProtocolError(f"{name}: offset must be a non-negative integer, got {offset!r}")
    if offset % DTYPES[dtype]:
        raise ProtocolError(f"{name}: offset {offset} is not a multiple of the {dtype} item size")
    return RegionRef(dtype, shape, check_region_name(value["region"], f"{name}.region"), offset)


def ref_map(dtype: str, shape, region: str, offset: int) -> dict[str, Any]:
    return {"dtype": dtype, "shape": [int(d) for d in shape], "region": region, "offset": int(offset)}


def host_id() -> str:
    """This host's identity as the client and server compare it: the kernel's boot id (the same
    for every process on the host, containers included; a shared Unix socket decides the rest)."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip()
    except OSError:
        return ""


# ---- the Unix socket's frames: a 4-byte big-endian length, a msgpack map, and maybe one fd ----

def encode_frame(msg: Mapping[str, Any]) -> bytes:
    data = msgpack.packb(dict(msg), use_bin_type=True)
    return _LEN.pack(len(data)) + data


def decode_frame(body: bytes | bytearray) -> dict[str, Any]:
    """The map a frame's body holds (without its header); ProtocolError if it is not one. Small
    limits: a frame holds a few scalars, never a big container or any bin."""
    try:
        msg = msgpack.unpackb(bytes(body), raw=False, strict_map_key=True, max_bin_len=0,
                              max_array_len=MAX_DIMS, max_map_len=16)
    except Exception as exc:
        raise ProtocolError(f"undecodable frame: {exc}") from None
    if not isinstance(msg, dict):
        raise ProtocolError("a frame must be a map")
    return msg


def send_frame(sock: socket.socket, msg: Mapping[str, Any], fd: int | None = None) -> None:
    frame = encode_frame(msg)
    if fd is None:
        sock.sendall(frame)
    else:
        n = socket.send_fds(sock, [frame], [fd])
        if n < len(frame):
            sock.sendall(frame[n:])


def _recv_exact(sock: socket.socket, n: int, buf: bytearray) -> bool:
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            return False
        buf += chunk
    return True


def recv_frame(sock: socket.socket) -> tuple[dict[str, Any] | None, list[int]]:
    """One frame and the fds that came with it; (None, []) at EOF. Bad frames raise ProtocolError
    (the fds received so far are closed)."""
    fds: list[int] = []
    try:
        data, fds, flags, _ = socket.recv_fds(sock, _LEN.size, 1)
        if not data:
            return None, []
        if flags & socket.MSG_CTRUNC:
            raise ProtocolError("one fd per frame")
        buf = bytearray(data)
        if not _recv_exact(sock, _LEN.size, buf):
            raise ProtocolError("connection closed inside a frame")
        (n,) = _LEN.unpack(buf)
        if n > MAX_FRAME:
            raise ProtocolError(f"frame of {n} bytes exceeds {MAX_FRAME}")
        body = bytearray()
        if not _recv_exact(sock, n, body):
            raise ProtocolError("connection closed inside a frame")
        return decode_frame(body), fds
    except BaseException:
        for fd in fds:
            os.close(fd)
        raise
