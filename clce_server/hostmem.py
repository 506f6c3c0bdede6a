"""A pool of large host buffers: request bodies and gradients.

A fresh 256 MB buffer costs its page faults (the kernel zeroes every page on first touch): on
this 2-core host that was 30-40% of the fused kernel's time at 2048x32000. Buffers that went out
in a response come back here and are reused with their pages already mapped.

Only the server returns buffers, and only after the response that used them has been sent: a
buffer nobody releases (its client vanished mid-upload or mid-download) is simply freed by the
garbage collector.

Large buffers are anonymous mmaps of their own, not malloc'd: freeing one unmaps it, so the
memory goes back to the OS at once. From malloc, a burst of large requests left RSS hundreds of
MB above its baseline for good (glibc raises its mmap threshold after such frees, and keeps the
next ones in per-thread arenas).
"""

from __future__ import annotations

import mmap
import threading
import weakref

import numpy as np

from clce_wire.protocol import ALIGN

MiB = 1 << 20


class HostPool:
    def __init__(self, max_cached_bytes: int = 1 << 30, min_bytes: int = MiB):
        self.max_cached_bytes = max_cached_bytes
        self.min_bytes = min_bytes
        self._free: dict[int, list[np.ndarray]] = {}
        self._owned: dict[int, int] = {}      # id(backing) -> size class
        self._cached = 0
        self._lock = threading.Lock()

    def _size_class(self, nbytes: int) -> int:
        return -(-(nbytes + ALIGN) // MiB) * MiB

    def backing(self, nbytes: int) -> np.ndarray:
        """A uint8 buffer of at least nbytes + ALIGN bytes (pooled when large)."""
        if nbytes < self.min_bytes:
            return np.empty(nbytes + ALIGN, np.uint8)
        cls = self._size_class(nbytes)
        with self._lock:
            free = self._free.get(cls)
            if free:
                self._cached -= cls
                return free.pop()
        buf = np.frombuffer(mmap.mmap(-1, cls), np.uint8)   # zero pages, mapped on first touch
        with self._lock:
            self._owned[id(buf)] = cls
        # a buffer never given back is freed by the GC; its id must not be mistaken for another's
        weakref.finalize(buf, self._forget, id(buf))
        return buf

    def _forget(self, ident: int) -> None:
        with self._lock:
            self._owned.pop(ident, None)

    def empty(self, shape, dtype) -> np.ndarray:
        """An ALIGN-aligned array from the pool."""
        dtype = np.dtype(dtype)
        nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        buf = self.backing(nbytes)
        start = (-buf.ctypes.data) % ALIGN
        return buf[start:start + nbytes].view(dtype).reshape(shape)

    def held_bytes(self) -> int:
        """Bytes of pooled buffers handed out and not given back (or not yet collected)."""
        with self._lock:
            return sum(self._owned.values()) - self._cached

    def release(self, arr: np.ndarray | None) -> None:
        """Give back the pooled buffer under `arr` (no-op for arrays the pool does not own)."""
        b = arr
        while b is not None and id(b) not in self._owned:
            b = b.base if isinstance(b, np.ndarray) else None   # stops at the mmap under the pool's array
        if b is None:
            return
        with self._lock:
            cls = self._owned.get(id(b))
            if cls is None:
                return
            if self._cached + cls > self.max_cached_bytes:
                del self._owned[id(b)]      # let it go; the GC frees it
                return
            free = self._free.setdefault(cls, [])
            # Already back: a second release is ignored. Only a sequential one: a buffer handed out
            # again in between cannot be told apart, so callers give each buffer back once
            # (routes/loss.py skips a gradient that shares its body's buffer).
            if any(f is b for f in free):
                return
            free.append(b)
            self._cached += cls


#: the process's pool (the server's bodies and gradients)
POOL = HostPool()
