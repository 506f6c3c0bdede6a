"""A pool of large host buffers: request bodies and gradients.

A fresh 256 MB buffer costs its page faults (the kernel zeroes every page on first touch): on
this 2-core host that was 30-40% of the fused kernel's time at 2048x32000. Buffers that went out
in a response come back here and are reused with their pages already mapped.

The pool belongs to the server's state (`state.ServerState.pool`); a request's buffers are taken
and given back by its lease (`lease.RequestLease`), once, after the response that used them has
gone out and the job that wrote them has ended. A buffer is given back by the very object the
pool handed out (`release` checks identity): giving one back twice, or giving back a view of
it, raises, so two requests can never be handed the same memory.

Large buffers are anonymous mmaps of their own, not malloc'd: freeing one unmaps it, so the
memory goes back to the OS at once. From malloc, a burst of large requests left RSS hundreds of
MB above its baseline for good (glibc raises its mmap threshold after such frees, and keeps the
next ones in per-thread arenas).
"""

from __future__ import annotations

import mmap
import threading

import numpy as np

from clce_wire.protocol import ALIGN

MiB = 1 << 20


class PoolError(RuntimeError):
    """A buffer given back that the pool did not hand out, or has already taken back."""


class HostPool:
    """Buffers of at least `min_bytes` are pooled by size class (MiB multiples) up to
    `max_cached_bytes` of free ones. Smaller requests get plain numpy arrays, not tracked: their
    memory goes with their last reference, and a pool would save them nothing."""

    def __init__(self, max_cached_bytes: int = 1 << 30, min_bytes: int = MiB):
        self.max_cached_bytes = max_cached_bytes
        self.min_bytes = min_bytes
        self._free: dict[int, list[np.ndarray]] = {}
        # id(handed out) -> (it, its backing, bytes it holds)
        self._out: dict[int, tuple[np.ndarray, np.ndarray, int]] = {}
        self._cached = 0
        self._lock = threading.Lock()

    def _size_class(self, nbytes: int) -> int:
        return -(-(nbytes + ALIGN) // MiB) * MiB

    def backing(self, nbytes: int) -> np.ndarray:
        """A uint8 buffer of at least nbytes + ALIGN bytes; give it back with `release`."""
        if nbytes < self.min_bytes:
            return np.empty(nbytes + ALIGN, np.uint8)
        cls = self._size_class(nbytes)
        with self._lock:
            free = self._free.get(cls)
            if free:
                self._cached -= cls
                buf = free.pop()
                self._out[id(buf)] = (buf, buf, cls)
                return buf
        # zero pages, mapped on first touch; unmapped when the last array over it goes
        buf = np.frombuffer(mmap.mmap(-1, cls), np.uint8)
        return self._hand_out(buf, buf, cls)

    def _hand_out(self, handle: np.ndarray, backing: np.ndarray | None, nbytes: int) -> np.ndarray:
        with self._lock:
            self._out[id(handle)] = (handle, backing, nbytes)
        return handle

    def empty(self, shape, dtype) -> np.ndarray:
        """An ALIGN-aligned array over a buffer of its own; give back this array with `release`."""
        dtype = np.dtype(dtype)
        nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        buf = self.backing(nbytes)
        start = (-buf.ctypes.data) % ALIGN
        arr = buf[start:start + nbytes].view(dtype).reshape(shape)
        if nbytes >= self.min_bytes:
            with self._lock:   # the array is the handle now, in place of its backing
                _, backing, held = self._out.pop(id(buf))
                self._out[id(arr)] = (arr, backing, held)
        return arr

    def pooled(self, nbytes: int) -> bool:
        """Whether a buffer of nbytes comes from the pool (and must be given back)."""
        return nbytes >= self.min_bytes

    def held_bytes(self) -> int:
        """Bytes of buffers handed out and not given back."""
        with self._lock:
            return sum(n for _, _, n in self._out.values())

    def cached_bytes(self) -> int:
        """Bytes of free buffers kept for reuse."""
        with self._lock:
            return self._cached

    def release(self, handle: np.ndarray) -> None:
        """Give back what `backing` or `empty` returned for a pooled size: that very object, once."""
        with self._lock:
            entry = self._out.get(id(handle))
            if entry is None or entry[0] is not handle:
                raise PoolError("released a buffer the pool has not handed out (or took back already)")
            del self._out[id(handle)]
            _, backing, cls = entry
            if self._cached + cls > self.max_cached_bytes:
                return                         # dropped here: freed (unmapped) with its last array
            self._free.setdefault(cls, []).append(backing)
            self._cached += cls
