"""Shared memory with a clce server on this host (docs/protocol.md, "Shared memory").

An `Arena` holds sealed memfd regions registered with the server over its Unix socket, and reuses
them across calls. A call puts what is not already in a region (the input, target, weight) into
one region, asks the server to write the gradient into it, and hands the gradient back as an
array over that region: no copy on either side. A region goes back to the arena when the last
array over it is gone (the gradient a caller still holds is never overwritten).

`Arena.empty` gives arrays (numpy, or torch with a torch dtype) that are born in shared memory:
logits computed into one travel with no copy at all, and ``inplace_grad=True`` then writes the
gradient over them (as Liger-Kernel does), halving the memory. Their contents are gone after it.
"""

from __future__ import annotations

import collections
import fcntl
import json
import math
import mmap
import os
import select
import socket
import threading
import weakref
from typing import Any

import numpy as np

from clce_wire.protocol import ALIGN, ERROR_CODES, ProtocolError, WireTensor, numpy_dtype
from clce_wire.shm import host_id, recv_frame, ref_map, send_frame

from . import errors
from .buffers import FreeList, size_class

__all__ = ["Arena", "ArenaLost", "SharedMemoryUnavailable", "connect", "reconnect", "socket_path"]

_SEALS = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL


class SharedMemoryUnavailable(errors.TransportError):
    """transport="shm" was asked for, and this client cannot share memory with the server."""


class ArenaLost(errors.TransportError):
    """The registration socket is closed: the server that held this arena's regions is gone (a
    restart). The client re-registers the regions with the new instance and repeats the call."""


def _server_error(err: Any) -> errors.ServerError:
    code = err.get("code") if isinstance(err, dict) else None
    if code not in ERROR_CODES:
        code = "internal"
    body = json.dumps({"error": {"code": code, "message": str(err.get("message", ""))}}).encode()
    return errors.error_from_response(ERROR_CODES[code][0], body, "application/json")


class _Session:
    """The registration socket: its lifetime is the registrations' lifetime."""

    def __init__(self, path: str, api_key: str | None, timeout: float = 10.0):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        self.sock.connect(path)
        self.lock = threading.Lock()
        reply = self.call({"op": "hello", "api_key": api_key})
        self.tenant = reply.get("tenant")
        self.max_bytes = reply.get("max_bytes")

    def call(self, msg: dict, fd: int | None = None) -> dict:
        with self.lock:
            try:
                send_frame(self.sock, msg, fd)
            except (BrokenPipeError, ConnectionResetError):
                pass    # a server refusing this connection may have answered before closing: read why below
            try:
                reply, fds = recv_frame(self.sock)
            except ConnectionError as exc:
                raise ArenaLost(f"the server closed the shared-memory socket ({exc})") from None
        for f in fds:
            os.close(f)
        if reply is None:
            raise ArenaLost("the server closed the shared-memory socket")
        if not reply.get("ok"):
            raise _server_error(reply.get("error"))
        return reply

    def closed(self) -> bool:
        """True when the server has closed its end (it exited). The server never speaks first, so
        anything readable between calls is the end of the stream; a poll costs a few microseconds."""
        # A call in flight on another thread makes the socket readable with its answer: that is
        # not the end of the stream, so poll only between calls (a call that finds the socket
        # closed raises ArenaLost itself).
        if not self.lock.acquire(blocking=False):
            return False
        try:
            if self.sock.fileno() < 0:
                return True
            poller = select.poll()
            poller.register(self.sock, select.POLLIN | select.POLLHUP | select.POLLERR)
            return bool(poller.poll(0))
        finally:
            self.lock.release()

    def close(self) -> None:
        self.sock.close()


class _Region:
    __slots__ = ("name", "size", "fd", "mm", "addr", "__weakref__")

    def __init__(self, name: str, size: int):
        self.name = name
        self.size = size
        self.fd = os.memfd_create(f"clce-{name}", os.MFD_ALLOW_SEALING | os.MFD_CLOEXEC)
        try:
            os.ftruncate(self.fd, size)
            fcntl.fcntl(self.fd, fcntl.F_ADD_SEALS, _SEALS)
            self.mm = mmap.mmap(self.fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        except BaseException:
            os.close(self.fd)
            raise
        probe = np.frombuffer(self.mm, np.uint8, count=1)
        self.addr = probe.ctypes.data
        del probe

    def close(self) -> None:
        mm, self.mm = self.mm, None
        if mm is not None:
            try:
                mm.close()
            except BufferError:   # arrays over it remain (maybe the one being finalised): with no
                pass              # reference left here, it is unmapped when the last one goes
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class Arena:
    """Registered regions of this client, reused across calls (thread-safe)."""

    def __init__(self, socket_path: str, api_key: str | None, *, instance_id: str | None = None,
                 max_cached_bytes: int | None = None):
        self._api_key = api_key
        self._session = _Session(socket_path, api_key)
        #: the server instance (/v1/info's instance_id) that holds the registrations, and how many
        #: times they were moved to a new one (`reconnect`)
        self.instance_id = instance_id
        self.generation = 0
        # free regions, reused across calls by size class and growth (clce_client.buffers); its
        # lock guards all of the arena's bookkeeping
        # None: keep up to the tenant's shared-memory budget. Every region counts against that
        # budget whether cached or in use, and a language model's step needs its logits and their
        # gradient (GBs) again at the next step: a region dropped and made anew costs its first
        # touch each time (4.2 GB: 11.7 s against 0.85 s reused, measured at 8x1024x128256 fp32)
        if max_cached_bytes is None:
            max_cached_bytes = self._session.max_bytes or 4 << 30
        self._free: FreeList[_Region] = FreeList(max_cached_bytes)
        self._lock = self._free.lock
        # held across every registration and across `reconnect`, so that a region registered while
        # the arena moves to a new instance is never missed by the move
        self._registering = threading.RLock()
        self._live: dict[str, _Region] = {}      # name -> region in use (arrays over it exist)
        self._all: dict[str, _Region] = {}
        self._seq = 0
        self._prefix = f"{os.getpid()}-{os.urandom(4).hex()}"
        self._closed = False
        # regions whose last array is gone. The finalizer only appends here: it may run from the GC
        # at any allocation, also while this thread holds the lock; the next call to the arena
        # takes them back under the lock (`_take_back`).
        self._returned: collections.deque[_Region] = collections.deque()
        self._to_drop: list[_Region] = []   # let go of (unmapped): unregistered on the next acquire

    # ---- regions ----
    def _new_region(self, size: int) -> _Region:
        with self._lock:
            self._seq += 1
            name = f"{self._prefix}-{self._seq}"
        region = _Region(name, size)
        try:
            with self._registering:
                try:
                    self._session.call({"op": "register", "name": name, "size": size}, region.fd)
                except (errors.PayloadTooLarge, errors.Overloaded):
                    self.trim(0)           # give back what is cached, then try once more
                    self._session.call({"op": "register", "name": name, "size": size}, region.fd)
                with self._lock:
                    self._all[name] = region
        except BaseException:
            region.close()
            raise
        return region

    @property
    def max_bytes(self) -> int | None:
        """The tenant's shared-memory budget (the server's shm_max_bytes, from the session's hello):
        a call that would need more is split into row chunks that fit (client.py)."""
        return self._session.max_bytes

    def lost(self) -> bool:
        """True when the server holding the registrations has gone (its socket closed)."""
        return self._session.closed()

    def reconnect(self, socket_path: str, instance_id: str | None) -> None:
        """Register every region of this arena with a new server instance (a restart), under the
        same names and with the same memfds: the memory and everything callers hold in it are
        unchanged, only the server's mapping is new, so a request built before the restart means
        the same bytes after it. Cached regions the new server will not take (its cap) are let go;
        a region in use that it will not take raises."""
        with self._registering:
            session = _Session(socket_path, self._api_key)
            try:
                with self._lock:
                    regions = list(self._all.values())
                for r in regions:
                    try:
                        session.call({"op": "register", "name": r.name, "size": r.size}, r.fd)
                    except (errors.PayloadTooLarge, errors.Overloaded):
                        if not self._forget_if_free(r):
                            raise
            except BaseException:
                session.close()
                raise
            old, self._session = self._session, session
            self.instance_id = instance_id
            self.generation += 1
        old.close()

    def _forget_if_free(self, region: _Region) -> bool:
        with self._lock:
            if not self._free.remove(region):
                return False
            self._all.pop(region.name, None)
        region.close()
        return True

    def _acquire(self, nbytes: int) -> tuple[np.ndarray, str]:
        """A fresh uint8 array over a whole region of at least nbytes, and the region's name; the
        region comes back to the arena when this array and every view of it are gone. A free
        region is reused when one fits (clce_client.buffers: size classes and growth), so a loop
        whose sizes vary writes into memory already touched."""
        with self._lock:
            self._take_back()
            drop, self._to_drop = self._to_drop, []
            if self._closed:
                raise errors.TransportError("the client is closed")
            region = self._free.take(nbytes)
            if region is None:
                size = size_class(nbytes)
                for r in self._free.grow(size):
                    self._all.pop(r.name, None)
                    drop.append(r)
        for r in drop:
            self._drop(r)
        if region is None:
            region = self._new_region(size)
        with self._lock:
            self._live[region.name] = region
        root = np.frombuffer(region.mm, np.uint8)
        weakref.finalize(root, self._release, region)
        return root, region.name

    def _release(self, region: _Region) -> None:
        # the finalizer of a region's last array: no lock, no I/O (see _returned)
        if not self._closed:
            self._returned.append(region)

    def _take_back(self) -> None:
        """Under the lock: returned regions become free; those beyond the bound are unmapped now
        and unregistered on the next acquire (this may run inside `stats`: no socket I/O)."""
        while self._returned:
            region = self._returned.popleft()
            self._live.pop(region.name, None)
            if self._closed:
                continue
            for r in self._free.give(region.size, region):
                self._all.pop(r.name, None)
                self._to_drop.append(r)
                r.close()

    def _drop(self, region: _Region) -> None:
        try:
            if not self._closed:
                self._session.call({"op": "unregister", "name": region.name})
        except (errors.ClceError, OSError):
            pass
        region.close()     # a second close is harmless

    def trim(self, keep_bytes: int = 0) -> None:
        """Unregister cached regions beyond keep_bytes."""
        with self._lock:
            self._take_back()
            drop = self._free.clear(keep_bytes)
            for r in drop:
                self._all.pop(r.name, None)
        for r in drop:
            self._drop(r)

    def locate(self, addr: int, nbytes: int) -> tuple[str, int] | None:
        """(region, offset) when [addr, addr + nbytes) lies in a region in use, else None."""
        with self._lock:
            for r in self._live.values():
                if r.addr <= addr and addr + nbytes <= r.addr + r.size:
                    return r.name, addr - r.addr
        return None

    # ---- arrays born in shared memory ----
    def empty(self, shape, dtype: Any = np.float32) -> Any:
        """An uninitialised array in shared memory: numpy for a numpy dtype, torch for a torch
        dtype. Passed as a cross_entropy input it travels without a copy."""
        shape = (shape,) if isinstance(shape, int) else tuple(int(d) for d in shape)
        if type(dtype).__module__ == "torch":
            import torch

            from .torch_support import wire_dtype

            name = wire_dtype(dtype)
            nbytes = math.prod(shape) * dtype.itemsize
            root, _ = self._acquire(nbytes)
            if name == "bfloat16":
                return torch.from_numpy(root[:nbytes].view(np.int16).reshape(shape)).view(torch.bfloat16)
            return torch.from_numpy(root[:nbytes].view(numpy_dtype(name)).reshape(shape))
        dt = np.dtype(dtype)
        nbytes = math.prod(shape) * dt.itemsize
        return self._acquire(nbytes)[0][:nbytes].view(dt).reshape(shape)

    def close(self) -> None:
        with self._lock:
            self._closed = True
            regions = list(self._all.values()) + self._to_drop
            self._all.clear()
            self._free.clear(0)
            self._to_drop = []
        self._session.close()   # the server reclaims every region of this session
        for r in regions:
            r.close()

    @property
    def stats(self) -> dict[str, int]:
        """regions: registered; live: with arrays over them; cached_bytes: free and kept; created:
        regions made (each one's pages are touched for the first time); reused: acquisitions
        served by a free region."""
        with self._lock:
            self._take_back()
            return {"regions": len(self._all), "live": len(self._live), "cached_bytes": self._free.cached,
                    "created": self._free.created, "reused": self._free.reused}


class Placement:
    """Where one call's tensors live. `parts`: (key, array or None, nbytes) — an array already in
    a region of the arena is used where it is; others are copied into one region for the call;
    None reserves nbytes there (the gradient)."""

    def __init__(self, arena: Arena, parts: list[tuple[str, Any, int]]):
        self.refs: dict[str, tuple[str, int]] = {}
        self.mem: dict[str, np.ndarray] = {}     # each part's bytes (uint8), for the answer
        need: list[tuple[str, Any, int]] = []
        for key, arr, nbytes in parts:
            if arr is not None and nbytes:
                loc = arena.locate(arr.ctypes.data, nbytes)
                if loc is not None:
                    self.refs[key] = loc
                    self.mem[key] = arr.reshape(-1).view(np.uint8)
                    continue
            need.append((key, arr, nbytes))
        if not need:
            return
        total = sum(_aligned(n) for _, _, n in need)
        root, name = arena._acquire(total)
        off = 0
        for key, arr, nbytes in need:
            mem = root[off:off + nbytes]
            if arr is not None and nbytes:
                mem[...] = arr.reshape(-1).view(np.uint8)
            self.refs[key] = (name, off)
            self.mem[key] = mem
            off += _aligned(nbytes)

    def ref(self, key: str, dtype: str, shape) -> dict[str, Any]:
        name, off = self.refs[key]
        return ref_map(dtype, shape, name, off)

    def tensor(self, ref: Any, name: str) -> WireTensor:
        """A WireTensor over the bytes a reference in the answer names (memory of this call)."""
        if not isinstance(ref, dict) or set(ref) != {"dtype", "shape", "region", "offset"}:
            raise ProtocolError(f"{name}: expected a shared-memory reference")
        key = next((k for k, loc in self.refs.items() if loc == (ref["region"], ref["offset"])), None)
        if key is None:
            raise ProtocolError(f"{name}: the answer names memory this call did not give")
        try:
            nbytes = math.prod(ref["shape"]) * np.dtype(numpy_dtype(ref["dtype"]) if ref["dtype"] != "bfloat16"
                                                        else np.int16).itemsize
        except (TypeError, ValueError) as exc:
            raise ProtocolError(f"{name}: {exc}") from None
        mem = self.mem[key]
        if nbytes > mem.nbytes:
            raise ProtocolError(f"{name}: the answer names more bytes than this call gave")
        return WireTensor(ref["dtype"], tuple(ref["shape"]), memoryview(mem[:nbytes]))


def _aligned(n: int) -> int:
    return -(-max(n, 1) // ALIGN) * ALIGN


def socket_path(info: Any) -> str:
    """The registration socket named by /v1/info `info`; SharedMemoryUnavailable says why there is
    none this client can use."""
    shm = info.get("shm") if isinstance(info, dict) else None
    if not isinstance(shm, dict) or not shm.get("enabled"):
        raise SharedMemoryUnavailable("the server does not allow shared memory (start it with --allow-shm, "
                                      "or bind loopback)")
    if not shm.get("host_id") or shm.get("host_id") != host_id():
        raise SharedMemoryUnavailable("the server runs on another host")
    path = shm.get("socket")
    if not isinstance(path, str):
        raise SharedMemoryUnavailable("the server reported no shared-memory socket")
    return path


def connect(info: dict, api_key: str | None, **arena_options: Any) -> Arena:
    """An Arena for the server that sent /v1/info `info`; SharedMemoryUnavailable says why not."""
    path = socket_path(info)
    try:
        return Arena(path, api_key, instance_id=info.get("instance_id"), **arena_options)
    except errors.ServerError:
        raise
    except OSError as exc:
        raise SharedMemoryUnavailable(f"cannot reach the server's shared-memory socket {path}: {exc}") from None


def reconnect(arena: Arena, info: dict) -> None:
    """Move `arena`'s registrations to the server instance that sent `info` (Arena.reconnect)."""
    path = socket_path(info)
    try:
        arena.reconnect(path, info.get("instance_id"))
    except OSError as exc:
        raise SharedMemoryUnavailable(f"cannot reach the server's shared-memory socket {path}: {exc}") from None
