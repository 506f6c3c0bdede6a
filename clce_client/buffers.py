"""Memory the client reuses across calls: received gradients (TCP) and shared-memory regions.

Why reuse: on these machines a fresh 262 MB buffer costs 110-230 ms of page faults, paid by
whoever touches it first: the client receiving a gradient over TCP, or the server's kernel writing
the gradient into a new shared-memory region (the kernel time then shows 149 ms for 16 ms of
work). A training loop asks for the same few buffers every step, but with dynamic padding their
sizes vary (512 to 2048 rows, say), and with mixed precision so do their dtypes. Exact-size reuse
would miss almost every time.

The policy (`FreeList`), one for both kinds of memory:

* Size classes: a buffer is made a little larger than asked, to the next quarter of its power of
  two (at most 25 % more, four classes per doubling), so nearby sizes share a class.
* Growth: a request takes the smallest free buffer that holds it, up to `TAKE_RATIO` times its
  size, whatever its class: a step with fewer rows or a narrower dtype reuses the buffer of a
  bigger step. A buffer is made only when no free one fits, and then the free buffers too small
  for it (within TAKE_RATIO: it serves what they served) are let go: a loop's largest step
  replaces them, so what stays is a working set of the largest sizes, already touched. Over 20
  random lengths a loop makes a buffer only at a new maximum that crosses a class (a handful of
  times: the running maximum of 20 random lengths changes about ln(20) + 0.6 = 3.6 times).
* A bound: at most `max_cached_bytes` of free buffers are kept; beyond it the smallest go first.

A buffer is handed out as a numpy array and comes back to its free list when that array and every
view of it (numpy, torch, memoryview) are gone: memory a caller still holds is never reused. (It is
filed at the pool's next use: a finalizer may run from the garbage collector at any allocation,
also inside the pool's own lock, so it takes no lock.)

`BufferPool` is that for plain memory (TCP); `clce_client.shm.Arena` uses the same `FreeList`
for its registered regions.
"""

from __future__ import annotations

import collections
import math
import mmap
import threading
import weakref
from typing import Any, Generic, TypeVar

import numpy as np

from clce_wire.protocol import numpy_dtype

__all__ = ["FreeList", "BufferPool", "size_class", "TAKE_RATIO", "MIN_POOLED_BYTES"]

#: a free buffer serves requests down to 1/TAKE_RATIO of its size (a 2048-row buffer serves a
#: 512-row step of twice the width: 4x, with the class's headroom on top)
TAKE_RATIO = 8
#: smaller buffers are not worth pooling: malloc reuses them, and they fault in microseconds
MIN_POOLED_BYTES = 1 << 20
_PAGE = mmap.PAGESIZE

T = TypeVar("T")


def size_class(nbytes: int, granule: int = 64) -> int:
    """`nbytes` rounded up to the next quarter of its power of two (and to `granule`)."""
    nbytes = max(int(nbytes), 1)
    step = max((1 << (nbytes - 1).bit_length()) // 8, granule)
    return -(-nbytes // step) * step


class FreeList(Generic[T]):
    """Free buffers by size; the caller holds `lock` around every method (it owns the buffers and
    their other state under the same lock). `created` counts buffers made (first touches)."""

    def __init__(self, max_cached_bytes: int):
        if int(max_cached_bytes) < 0:
            raise ValueError("max_cached_bytes must be >= 0")
        self.max_cached_bytes = int(max_cached_bytes)
        self.lock = threading.Lock()
        self._free: list[tuple[int, T]] = []     # (size, buffer), smallest first
        self.cached = 0
        self.created = 0
        self.reused = 0

    def take(self, nbytes: int) -> T | None:
        """The smallest free buffer of at least nbytes and at most TAKE_RATIO * nbytes, or None."""
        for k, (size, buf) in enumerate(self._free):
            if size >= nbytes:
                if size > TAKE_RATIO * nbytes:
                    return None
                del self._free[k]
                self.cached -= size
                self.reused += 1
                return buf
        return None

    def grow(self, size: int) -> list[T]:
        """A buffer of `size` is about to be made: the free buffers it outgrows (smaller, but
        within TAKE_RATIO of it, so it serves what they served) go, returned for the caller to
        release outside the lock."""
        self.created += 1
        outgrown = [(s, b) for s, b in self._free if size // TAKE_RATIO <= s < size]
        if outgrown:
            self.cached -= sum(s for s, _ in outgrown)
            self._free = [e for e in self._free if not any(e[1] is b for _, b in outgrown)]
        return [b for _, b in outgrown]

    def give(self, size: int, buf: T) -> list[T]:
        """`buf` is free again. Returns what no longer fits under the bound (smallest first)."""
        self._free.append((size, buf))
        self._free.sort(key=lambda e: e[0])
        self.cached += size
        gone = []
        while self.cached > self.max_cached_bytes and self._free:
            s, b = self._free.pop(0)
            self.cached -= s
            gone.append(b)
        return gone

    def remove(self, buf: T) -> bool:
        for k, (s, b) in enumerate(self._free):
            if b is buf:
                del self._free[k]
                self.cached -= s
                return True
        return False

    def clear(self, keep_bytes: int = 0) -> list[T]:
        """Let go of free buffers, largest first, until at most keep_bytes are cached."""
        gone = []
        while self.cached > keep_bytes and self._free:
            s, b = self._free.pop()
            self.cached -= s
            gone.append(b)
        return gone

    def __len__(self) -> int:
        return len(self._free)


def _unmap(mm: mmap.mmap) -> None:
    try:
        mm.close()
    except BufferError:   # the array being finalised still exports it: unmapped when it is freed
        pass


class BufferPool:
    """Page-aligned memory for what the client receives over TCP (response bodies, pipelined
    gradients), reused across calls by the `FreeList` policy. Thread-safe."""

    def __init__(self, max_cached_bytes: int = 1 << 30):
        self._free: FreeList[mmap.mmap] = FreeList(max_cached_bytes)
        self._out = 0           # bytes handed out and not yet back
        # buffers whose last array is gone. The finalizer only appends here: it may run from the GC
        # at any allocation, also while this thread holds the lock; `_take_back` files them.
        self._returned: collections.deque[mmap.mmap] = collections.deque()
        self._closed = False

    def empty_bytes(self, nbytes: int) -> np.ndarray:
        """A uint8 array of nbytes (page-aligned start). Pooled from MIN_POOLED_BYTES up; it comes
        back when this array and every view of it are gone."""
        nbytes = int(nbytes)
        if nbytes < MIN_POOLED_BYTES:
            return np.empty(nbytes, np.uint8)
        with self._free.lock:
            gone = self._take_back()
            mm = self._free.take(nbytes)
            size = len(mm) if mm is not None else size_class(nbytes, _PAGE)
            if mm is None:
                gone += self._free.grow(size)
            self._out += size
        for old in gone:
            _unmap(old)
        if mm is None:
            mm = mmap.mmap(-1, size)
        root = np.frombuffer(mm, np.uint8)
        weakref.finalize(root, self._give, mm)
        return root[:nbytes]

    def empty(self, shape: Any, dtype: Any = np.float32) -> Any:
        """An uninitialised array from the pool: numpy for a numpy dtype, torch (CPU) for a torch
        dtype. For a caller that needs a gradient-sized buffer it will drop soon (the autograd
        side), so that the next step gets the same, already touched, memory."""
        shape = (shape,) if isinstance(shape, int) else tuple(int(d) for d in shape)
        if type(dtype).__module__ == "torch":
            import torch

            from .torch_support import wire_dtype

            name = wire_dtype(dtype)
            nbytes = math.prod(shape) * dtype.itemsize
            raw = self.empty_bytes(nbytes)
            if name == "bfloat16":
                return torch.from_numpy(raw.view(np.int16).reshape(shape)).view(torch.bfloat16)
            return torch.from_numpy(raw.view(numpy_dtype(name)).reshape(shape))
        dt = np.dtype(dtype)
        return self.empty_bytes(math.prod(shape) * dt.itemsize).view(dt).reshape(shape)

    def _give(self, mm: mmap.mmap) -> None:
        # the finalizer of a buffer's last array: no lock (see _returned). After close() the
        # buffer is not kept: it is unmapped with that last array.
        if not self._closed:
            self._returned.append(mm)

    def _take_back(self) -> list[mmap.mmap]:
        """Under the lock: returned buffers become free; returns those beyond the bound."""
        gone: list[mmap.mmap] = []
        while self._returned:
            mm = self._returned.popleft()
            self._out -= len(mm)
            gone += self._free.give(len(mm), mm)
        return gone

    def trim(self, keep_bytes: int = 0) -> None:
        """Give cached buffers back to the system, keeping at most keep_bytes."""
        with self._free.lock:
            gone = self._take_back() + self._free.clear(keep_bytes)
        for old in gone:
            _unmap(old)

    def close(self) -> None:
        """Keep nothing from now on; arrays still held stay valid (each buffer is unmapped with
        its last array)."""
        self._closed = True
        self.trim(0)

    @property
    def stats(self) -> dict[str, int]:
        """created: buffers made (each one's pages are touched for the first time); reused:
        requests served by a free buffer; cached_bytes: free and kept; out_bytes: handed out."""
        with self._free.lock:
            gone = self._take_back()
        for old in gone:
            _unmap(old)
        with self._free.lock:
            return {"created": self._free.created, "reused": self._free.reused,
                    "cached_bytes": self._free.cached, "out_bytes": self._out, "free": len(self._free)}
