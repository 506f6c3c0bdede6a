"""What one loss request holds, owned in one place: `RequestLease`.

A request holds its record (recording.py), a byte reservation against the in-flight budgets
(scheduler.Reservation), its body in a pooled buffer, its gradient in another, and pins on the
shared-memory regions its tensors live in. The lease takes each of them as the stages acquire
them and gives all of them back in `close`, called exactly once by the loss endpoint when the
response has gone out or the request has failed.

A device thread may still be writing into the body or the gradient when the response is given
up (the client left, a deadline passed): then the buffers go back when the job ends, not before
(the scheduler calls back through the reservation), so the pool never hands out memory a kernel
is still writing. Nothing is left for the garbage collector to find.
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING

import numpy as np

from .recording import RequestRecord

if TYPE_CHECKING:
    from .hostmem import HostPool
    from .scheduler import Reservation
    from .shm import Region, ShmRegistry


class LeaseClosed(RuntimeError):
    """A lease closed twice, or used after it was closed."""


class RequestLease:
    __slots__ = ("record", "pool", "shm", "reservation", "_buffers", "_pins", "_closed", "_freed", "_lock")

    def __init__(self, record: RequestRecord, pool: "HostPool", shm: "ShmRegistry | None" = None):
        self.record = record
        self.pool = pool
        self.shm = shm
        self.reservation: Reservation | None = None
        self._buffers: list[np.ndarray] = []      # handed out by the pool, in order
        self._pins: list[Region] = []
        self._closed = False
        self._freed = False
        self._lock = threading.Lock()

    # ---- taking: the stages, on the event loop ----
    def hold(self, reservation: "Reservation") -> None:
        """The request's bytes against the in-flight budgets, given back at the close."""
        self._check_open()
        self.reservation = reservation

    def buffer(self, nbytes: int) -> np.ndarray:
        """A uint8 buffer of at least nbytes + ALIGN bytes (the body), pooled when large."""
        self._check_open()
        buf = self.pool.backing(nbytes)
        if self.pool.pooled(nbytes):
            self._buffers.append(buf)
        return buf

    def array(self, shape, dtype) -> np.ndarray:
        """An aligned array (the gradient), pooled when large."""
        self._check_open()
        arr = self.pool.empty(shape, dtype)
        if self.pool.pooled(arr.nbytes):
            self._buffers.append(arr)
        return arr

    def pin(self, tenant: str, region_name: str) -> "Region":
        """A shared-memory region pinned (not unmapped) until the job is over."""
        self._check_open()
        region = self.shm.pin(tenant, region_name)
        self._pins.append(region)
        return region

    def unpin(self) -> None:
        """Let the regions go before the close: the job is over and the answer carries none of
        their bytes."""
        pins, self._pins = self._pins, []
        for region in pins:
            self.shm.unpin(region)

    # ---- giving back ----
    def close(self) -> None:
        """Give back everything, once: now, or when the job still running on it ends."""
        with self._lock:
            if self._closed:
                raise LeaseClosed(f"the lease of request {self.record.request_id} was closed twice")
            self._closed = True
        if self.reservation is not None and self.reservation.release(after_job=self._free):
            return          # a job is still using the buffers: _free runs when it ends
        self._free()

    def _free(self) -> None:
        # the loop thread, or the worker thread that ended the job
        with self._lock:
            if self._freed:
                return
            self._freed = True
        self.unpin()
        buffers, self._buffers = self._buffers, []
        for buf in buffers:
            self.pool.release(buf)

    @property
    def closed(self) -> bool:
        return self._closed

    def _check_open(self) -> None:
        if self._closed:
            raise LeaseClosed(f"the lease of request {self.record.request_id} is closed")
