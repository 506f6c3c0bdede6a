"""What one request holds, owned in one place: `RequestLease`.

A request holds its record (recording.py), a byte reservation against the in-flight budgets
(scheduler.Reservation), its body in a pooled buffer, its gradient in another, and pins on the
shared-memory regions its tensors live in. The lease takes each of them as the stages acquire
them and gives all of them back in `close`, called exactly once by the endpoint (rails/endpoint.py)
when the response has gone out or the request has failed.

Shared memory is resolved here, once for every operation: `resolve` turns a region reference
(clce_wire.shm.RegionRef) into an array over the tenant's region, pinned once per region per
request, checked against its bounds. What the server does with the array is the caller's explicit
word, never read off a tensor's name: `writable` (the server writes it: a read-only region is
refused), `copy` (copied out now: a tensor that is bounds-checked and then used as indices, which
the client must not change in between). Otherwise the array is read where it lies (a client
changing it meanwhile gets garbage, never an out-of-bounds read).

A device thread may still be writing into the body or the gradient when the response is given
up (the client left, a deadline passed): then the buffers go back when the job ends, not before
(the scheduler calls back through the reservation), so the pool never hands out memory a kernel
is still writing. Nothing is left for the garbage collector to find.
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING

import numpy as np

from clce_wire.protocol import ProtocolError
from clce_wire.shm import RegionRef, parse_ref, ref_map

from .errors import ApiError
from .recording import RequestRecord
from .shm import view

if TYPE_CHECKING:
    from .hostmem import HostPool
    from .scheduler import Reservation
    from .shm import Region, ShmRegistry


class LeaseClosed(RuntimeError):
    """A lease closed twice, or used after it was closed."""


class RequestLease:
    __slots__ = ("record", "pool", "shm", "tenant", "reservation", "shm_bytes", "copied_bytes", "_buffers",
                 "_pins", "_closed", "_freed", "_lock")

    def __init__(self, record: RequestRecord, pool: "HostPool", shm: "ShmRegistry | None" = None):
        self.record = record
        self.pool = pool
        self.shm = shm
        self.tenant: str | None = None            # whose regions `resolve` reads (set by admit)
        self.reservation: Reservation | None = None
        self.shm_bytes = 0                        # bytes of the tensors read in shared memory
        self.copied_bytes = 0                     # of which copied out (`resolve(copy=True)`)
        self._buffers: list[np.ndarray] = []      # handed out by the pool, in order
        self._pins: dict[str, Region] = {}        # region name -> pinned once
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

    def pin(self, region_name: str) -> "Region":
        """The tenant's region of that name, pinned (not unmapped) once per request until `unpin`
        or the close."""
        self._check_open()
        region = self._pins.get(region_name)
        if region is None:
            if self.shm is None:
                raise ApiError("bad_request", "this server does not allow shared memory (see /v1/info)")
            region = self._pins[region_name] = self.shm.pin(self.tenant, region_name)
        return region

    def pinned(self) -> dict[str, "Region"]:
        """The regions pinned so far, by name."""
        return dict(self._pins)

    def resolve(self, ref: RegionRef, *, what: str, writable: bool = False, copy: bool = False) -> np.ndarray:
        """The array `ref` names in the tenant's region, checked against the region's bounds.
        `writable`: the server writes it (a gradient), so a read-only region is refused. `copy`:
        copied out now (counted in `copied_bytes`, the server's memory). Else it is read where it
        lies (counted in `shm_bytes`: the client's memory, bounded by its shared-memory budget)."""
        region = self.pin(ref.region)
        if writable and region.read_only:
            raise ApiError("bad_request", f"{what}: region {ref.region!r} is read-only (sealed against writes, or "
                           "passed read-only): it cannot take the gradient")
        arr = view(region, ref, name=what)
        if not writable:
            self.shm_bytes += ref.nbytes
        if copy:
            arr = arr.copy()
            self.copied_bytes += arr.nbytes
        return arr

    def output(self, what: str, dtype: str, shape: tuple[int, ...], region: str,
               offset: object) -> tuple[RegionRef, np.ndarray]:
        """Where the server writes a result `what` in the tenant's region: the reference the answer
        names and the writable array over it (checked as any reference is)."""
        if type(offset) is not int or offset < 0:
            raise ApiError("bad_request", f"{what}: the offset must be a non-negative integer, got {offset!r}")
        try:
            ref = parse_ref(ref_map(dtype, tuple(shape), region, offset), name=what)
        except ProtocolError as exc:
            raise ApiError("bad_request", str(exc)) from None
        return ref, self.resolve(ref, what=what, writable=True)

    def unpin(self) -> None:
        """Let the regions go before the close: the job is over and the answer carries none of
        their bytes."""
        pins, self._pins = self._pins, {}
        for region in pins.values():
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
