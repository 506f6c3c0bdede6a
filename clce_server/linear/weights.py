"""Stored weights for the fused linear cross-entropy: the weight crosses the wire once per version.

A client uploads a (vocabulary, hidden) weight (and bias) under (tenant, name, version) and then
sends only hidden states and targets. The weight's gradient accumulates here over the
micro-batches of one version and is taken once (`take_grad`), before the optimizer step that
makes the next version. Uploading a new version of a name replaces the old one (and drops its
untaken gradient: the optimizer has moved on).

On shared memory (docs/protocol.md) the weight and bias may be region references: the store then
keeps the references, not the bytes, and holds no pin while the weight is stored. Each request
that uses the weight pins its regions through its own lease and views them (`resolve`); a region
gone since the upload (the client closed it or died, the server restarted) or registered anew
under the same name answers as an evicted weight does, and the entry is dropped.

Bytes: one budget per tenant and one for the server, the scheduler's (max_inflight_bytes), which
requests in flight count against too. A stored version holds a reservation of its inline weight
and bias, plus ENTRY_FLOOR_BYTES and its name and version (what an entry costs even when its
parts lie in a region, which the shared-memory caps count). Its gradient accumulators (fp32
(V, H), float64 (V,)) are reserved when a micro-batch first needs them, before they exist, and
the reservation goes with them: to the flush's answer until it is sent, or back when the version
is replaced, evicted, deleted or expires. An upload that does not fit the tenant's budget evicts
the tenant's least recently used other weights first (never one a job is accumulating into); one
that could never fit is refused (413); one that does not fit now is answered 429.

Entries: a name follows the region-name rules (1-64 of A-Z a-z 0-9 _ . -), a version is 1-256
characters, and a tenant holds at most `max_entries` names (429 beyond: DELETE one). A version no
request has used for `idle_s` seconds is dropped with its accumulators: a client that went away
leaves nothing behind, and one that returns gets `not_found` saying it expired, never a stale sum.

Micro-batch counts: every answer names the server's `instance` (random per process) and the
micro-batches the version's accumulators hold. A client compares them with its own count at the
flush and replays what a restart, an eviction or an expiry lost (clce_client/linear.py).
"""

from __future__ import annotations

import asyncio
import itertools
import os
import threading
import time
import weakref
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Union

import numpy as np

from clce_wire.shm import REGION_NAME, RegionRef

from ..config import over_limit
from ..rails.errors import ApiError
from ..rails.scheduler import QueueFull
from ..rails.shm import Region
from ..tenants import Tenant

if TYPE_CHECKING:
    from ..rails.lease import RequestLease
    from ..rails.scheduler import Reservation, Scheduler

#: a stored part: its bytes (viewing the upload's body), or where they lie in shared memory
Part = Union[np.ndarray, RegionRef]

#: what an entry costs besides its parts: its record, the body's framing, the dict slots
ENTRY_FLOOR_BYTES = 4096
MAX_VERSION_CHARS = 256
#: defaults of the settings max_stored_weights and weight_idle_s (clce_server/config.py)
MAX_ENTRIES = 256
IDLE_S = 600.0
#: how many expired versions are remembered, to say "expired" rather than "not stored"
_EXPIRED_KEPT = 4096
#: the OS errors an allocation refused for want of memory comes as
NO_MEMORY = (MemoryError,)


@dataclass(eq=False)
class StoredWeight:
    tenant: str
    name: str
    version: str
    weight: Part                          # (V, H), float32 or bfloat16
    bias: Part | None                     # (V,), the weight's dtype
    #: region name -> the registration the upload was checked against (weak: no pin, no mapping kept)
    regions: dict[str, "weakref.ref[Region]"] = field(default_factory=dict)
    charge: "Reservation | None" = None   # the entry's own bytes, against the budgets
    grad_weight: np.ndarray | None = None  # (V, H) float32: the micro-batches' sum
    grad_bias: np.ndarray | None = None    # (V,) float64
    grad_charge: "Reservation | None" = None   # the accumulators' bytes
    #: which accumulation the accumulators are (new each time they are made): a client counts
    #: its micro-batches per (instance, accumulation) and compares at the flush
    accumulation: str | None = None
    micro_batches: int = 0
    last_used: float = field(default_factory=time.monotonic)
    #: one accumulating job at a time (two device workers must not add into one gradient at
    #: once); a device worker holds it across a job's chunks, the event loop only ever tries it
    #: (`acquire`), so a flush waits without blocking anyone else
    lock: threading.Lock = field(default_factory=threading.Lock)
    _waiters: list = field(default_factory=list)         # (loop, future) waiting for `lock`
    _waiters_lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.weight.shape)

    @property
    def nbytes(self) -> int:
        """What it holds against its tenant's budget now."""
        return sum(r.nbytes for r in (self.charge, self.grad_charge) if r is not None)

    @property
    def accumulating(self) -> bool:
        return self.grad_weight is not None

    async def acquire(self) -> None:
        """Take `lock` on the event loop without blocking it: wait (a future the lock's holder
        resolves in `release`) while a job accumulates."""
        loop = asyncio.get_running_loop()
        while True:
            fut = loop.create_future()
            with self._waiters_lock:       # registered before trying: a release cannot slip between
                self._waiters.append((loop, fut))
            try:
                if self.lock.acquire(blocking=False):
                    return
                await fut
            finally:
                with self._waiters_lock:
                    if (loop, fut) in self._waiters:
                        self._waiters.remove((loop, fut))

    def release(self) -> None:
        """Let `lock` go and wake whoever waits for it on an event loop (any thread)."""
        self.lock.release()
        with self._waiters_lock:
            waiters, self._waiters = self._waiters, []
        for loop, fut in waiters:
            try:
                loop.call_soon_threadsafe(_wake, fut)
            except RuntimeError:     # that loop is closed
                pass


def _wake(fut: asyncio.Future) -> None:
    if not fut.done():
        fut.set_result(None)


def stored_bytes(shape: tuple[int, ...], itemsize: int, has_bias: bool) -> int:
    """What an inline weight may come to hold: itself, its bias and both gradient accumulators
    (without the entry's floor and name)."""
    V, H = int(shape[0]), int(shape[1])
    return V * H * itemsize + (V * itemsize if has_bias else 0) + accumulator_bytes(shape, has_bias)


def accumulator_bytes(shape: tuple[int, ...], has_bias: bool) -> int:
    """The gradient accumulators of a (V, H) weight: fp32 (V, H), and float64 (V,) with a bias."""
    V, H = int(shape[0]), int(shape[1])
    return V * H * 4 + (V * 8 if has_bias else 0)


def entry_bytes(name: str, version: str, weight: Part, bias: Part | None) -> int:
    """What storing a version reserves: its inline parts, the floor, its name and version."""
    inline = sum(p.nbytes for p in (weight, bias) if isinstance(p, np.ndarray))
    return inline + ENTRY_FLOOR_BYTES + len(name.encode()) + len(version.encode())


def check_name(name: str) -> None:
    if not REGION_NAME.fullmatch(name):
        raise ApiError("bad_request", f"a weight name is 1-64 characters of A-Z a-z 0-9 _ . -, got {name[:80]!r}"
                       + ("..." if len(name) > 80 else ""))


def check_version(version: str) -> None:
    if not 1 <= len(version) <= MAX_VERSION_CHARS:
        raise ApiError("bad_request", f"weight_version must be 1-{MAX_VERSION_CHARS} characters, got {len(version)}")


def _not_stored(name: str, version: str, why: str) -> ApiError:
    return ApiError("weight_not_stored", f"weight {name!r} version {version!r} is not stored on this server{why}; "
                                 "upload it again")


def no_memory(nbytes: int, exc: BaseException) -> ApiError:
    """The answer to an allocation the OS refused (the budgets allowed it): 503, retry later."""
    return ApiError("device_unavailable", f"the server could not allocate {nbytes} bytes for this request "
                    f"({type(exc).__name__}: {exc}); the host is short of memory, retry later", retry_after=1.0)


class WeightStore:
    """Weights by (tenant, name), one version each, their bytes held against the scheduler's
    budgets (the tenant's and the server's)."""

    def __init__(self, scheduler: "Scheduler", *, max_entries: int = MAX_ENTRIES, idle_s: float = IDLE_S,
                 instance: str | None = None, clock: Callable[[], float] = time.monotonic) -> None:
        self.scheduler = scheduler
        self.max_entries = max_entries
        self.idle_s = idle_s
        self.clock = clock
        #: this process's store: a client seeing another instance knows its accumulations are gone
        self.instance = instance or os.urandom(8).hex()
        self._lock = threading.Lock()
        self._weights: dict[tuple[str, str], StoredWeight] = {}
        self._expired: OrderedDict[tuple[str, str, str], None] = OrderedDict()
        self._sweeper: asyncio.TimerHandle | None = None
        self._accumulations = itertools.count(1)

    def tenant_bytes(self, tenant: str) -> int:
        """The bytes the tenant's stored weights hold (their share of its budget)."""
        with self._lock:
            return sum(w.nbytes for (t, _), w in self._weights.items() if t == tenant)

    def entries(self, tenant: str) -> int:
        with self._lock:
            return sum(1 for t, _ in self._weights if t == tenant)

    # ---- storing -----------------------------------------------------------------------------

    def put(self, tenant: Tenant, name: str, version: str, weight: Part, bias: Part | None,
            regions: dict[str, Region] | None = None, body: "Reservation | None" = None) -> StoredWeight:
        """Store a version. `weight`/`bias`: arrays, or references into `regions` (by name; each
        checked against the reference's bounds by the caller, and no longer pinned). `body`: the
        upload's reservation, whose bytes the stored parts view: they move to the entry's charge
        (counted once, not once for the request and again for the entry)."""
        check_name(name)
        check_version(version)
        entry = StoredWeight(tenant.name, name, version, weight, bias,
                             {n: weakref.ref(r) for n, r in (regions or {}).items()}, last_used=self.clock())
        need = entry_bytes(name, version, weight, bias)
        self.scheduler.check_fits(tenant, need, f"weight {name!r}")
        with self._lock:
            old = self._weights.get((tenant.name, name))
            if old is None and sum(1 for t, _ in self._weights if t == tenant.name) >= self.max_entries:
                raise ApiError("queue_full", over_limit(f"tenant {tenant.name!r} has {self.max_entries} stored "
                                                        "weights, and this one more would take it",
                                                        "max_stored_weights", self.max_entries), retry_after=1.0)
            if old is not None:      # the new version replaces the old, and its untaken gradient
                self._remove_locked(old)
        charge = self.scheduler.split(body, need, stored=True) if body is not None else None
        try:
            if charge is None or charge.nbytes < need:
                more = self._reserve(tenant, need - (charge.nbytes if charge else 0), keep=entry)
                charge = more if charge is None else self.scheduler.merge(charge, more)
        except BaseException:
            if charge is not None:
                charge.release()
            raise
        entry.charge = charge
        with self._lock:
            old = self._weights.get((tenant.name, name))
            if old is not None:      # another upload of the name won the race: this one replaces it
                self._remove_locked(old)
            self._weights[(tenant.name, name)] = entry
        return entry

    def reserve_accumulators(self, entry: StoredWeight, tenant: Tenant) -> None:
        """Reserve, then make (zeroed) the version's accumulators, unless it has them: before a
        micro-batch's job is admitted, on the event loop."""
        if entry.grad_weight is not None:
            return
        need = accumulator_bytes(entry.shape, entry.bias is not None)
        self.scheduler.check_fits(tenant, need + (entry.charge.nbytes if entry.charge else 0),
                                  f"weight {entry.name!r} with its gradient accumulators")
        charge = self._reserve(tenant, need, keep=entry)
        try:
            gw = np.zeros(entry.shape, np.float32)
            gb = np.zeros(entry.shape[0], np.float64) if entry.bias is not None else None
        except NO_MEMORY as exc:
            charge.release()
            raise no_memory(need, exc) from None
        with self._lock:
            if self._weights.get((entry.tenant, entry.name)) is not entry:   # dropped meanwhile
                charge.release()
                raise _not_stored(entry.name, entry.version, ": it was replaced, evicted or expired")
            if entry.grad_weight is not None:   # another request made them first
                charge.release()
                return
            entry.grad_weight, entry.grad_bias, entry.grad_charge = gw, gb, charge
            entry.accumulation = f"{next(self._accumulations)}"
            entry.micro_batches = 0

    def admit(self, tenant: Tenant, reservation: "Reservation", need: int, entry: StoredWeight | None = None,
              accumulating: bool = False) -> None:
        """A request's `need` bytes (linear/job.py's held_bytes) added to its reservation, the
        tenant's least recently used other weights evicted to make room; with a stored version,
        what could never fit beside it (and the accumulators an `accumulating` request makes) is
        413, not 429s; the accumulators are reserved and made before the job is admitted."""
        if entry is not None:
            acc = accumulator_bytes(entry.shape, entry.bias is not None) if accumulating else 0
            self.scheduler.check_fits(tenant, reservation.nbytes + need + entry.nbytes
                                      + (acc if entry.grad_weight is None else 0),
                                      f"this request with weight {entry.name!r}"
                                      + (" and its gradient accumulators" if acc else ""))
        self.making_room(tenant, lambda: self.scheduler.grow(reservation, need), keep=entry)
        if accumulating:
            self.reserve_accumulators(entry, tenant)

    def _reserve(self, tenant: Tenant, nbytes: int, keep: StoredWeight) -> "Reservation":
        return self.making_room(tenant, lambda: self.scheduler.reserve(tenant, nbytes, stored=True), keep)

    def making_room(self, tenant: Tenant, attempt: Callable[[], Any], keep: StoredWeight | None = None,
                    first: str | None = None) -> Any:
        """`attempt()` (a reservation against the budgets); when the tenant's budget is full, its
        least recently used weights (other than `keep`, and none a job is accumulating into; the
        name `first` before any, an upload's old version) are evicted one by one and it is tried
        again. QueueFull when it still does not fit."""
        while True:
            try:
                return attempt()
            except QueueFull as exc:
                if exc.scope != "tenant" or not self._evict_one(tenant.name, keep, first):
                    raise

    def _evict_one(self, tenant: str, keep: StoredWeight | None, first: str | None = None) -> bool:
        with self._lock:
            # a weight with no unflushed micro-batches first: it costs its client an upload, not a replay
            mine = sorted((n != first, w.accumulating, w.last_used, id(w), w) for (t, n), w in self._weights.items()
                          if t == tenant and w is not keep and not w.lock.locked() and w.nbytes)
            if not mine:
                return False
            self._remove_locked(mine[0][4])
            return True

    # ---- finding -----------------------------------------------------------------------------

    def get(self, tenant: Tenant, name: str, version: str) -> StoredWeight:
        check_name(name)
        check_version(version)
        self.sweep()
        with self._lock:
            entry = self._weights.get((tenant.name, name))
            if entry is None or entry.version != version:
                if (tenant.name, name, version) in self._expired:
                    why = (f": no request used it for {self.idle_s:g} s (--weight-idle-s), so it was dropped "
                           "with its accumulated gradient")
                else:
                    have = "" if entry is None else f" (stored: version {entry.version!r})"
                    why = f"{have}: it was replaced, evicted or the server restarted"
                raise _not_stored(name, version, why)
            entry.last_used = self.clock()
            return entry

    def current(self, entry: StoredWeight) -> bool:
        with self._lock:
            return self._weights.get((entry.tenant, entry.name)) is entry

    def resolve(self, entry: StoredWeight, lease: "RequestLease") -> tuple[np.ndarray, np.ndarray | None]:
        """The stored version's weight and bias as arrays: a part in a region is resolved by the
        request's lease (pinned for the request, read where it lies). A region gone or registered
        anew since the upload answers weight_not_stored (upload it again), and the entry is dropped."""
        out = []
        for what, part in (("weight", entry.weight), ("bias", entry.bias)):
            if not isinstance(part, RegionRef):
                out.append(part)
                continue
            try:
                region = lease.pin(part.region)
            except ApiError as exc:
                if exc.code != "not_found":
                    raise
                region = None
            if region is None or entry.regions.get(part.region, lambda: None)() is not region:
                self.drop(entry)
                raise _not_stored(entry.name, entry.version,
                                  f": the shared-memory region {part.region!r} its {what} was uploaded in is gone "
                                  "(the client closed or re-registered it, or the server restarted)")
            out.append(lease.resolve(part, what=what))
        return out[0], out[1]

    # ---- dropping ----------------------------------------------------------------------------

    def _remove_locked(self, entry: StoredWeight) -> None:
        """Forget the entry and give back what it holds (store lock held). Its accumulators go
        with it: a job still adding into them finishes into memory nobody reads again."""
        if self._weights.get((entry.tenant, entry.name)) is entry:
            del self._weights[(entry.tenant, entry.name)]
        for attr in ("charge", "grad_charge"):
            r = getattr(entry, attr)
            if r is not None:
                setattr(entry, attr, None)
                r.release()
        entry.grad_weight = entry.grad_bias = None

    def drop(self, entry: StoredWeight) -> None:
        """Drop this version, if it is still the stored one (a region gone; an accumulated gradient
        no longer a sum of whole micro-batches)."""
        with self._lock:
            if self._weights.get((entry.tenant, entry.name)) is entry:
                self._remove_locked(entry)

    def delete(self, tenant: Tenant, name: str) -> bool:
        with self._lock:
            entry = self._weights.get((tenant.name, name))
            if entry is None:
                return False
            self._remove_locked(entry)
            return True

    def sweep(self) -> int:
        """Drop the versions no request has used for idle_s seconds (none a job is using);
        returns how many."""
        cutoff = self.clock() - self.idle_s
        dropped = 0
        with self._lock:
            for entry in [w for w in self._weights.values() if w.last_used < cutoff and not w.lock.locked()]:
                self._remove_locked(entry)
                self._expired[(entry.tenant, entry.name, entry.version)] = None
                dropped += 1
            while len(self._expired) > _EXPIRED_KEPT:
                self._expired.popitem(last=False)
        return dropped

    def keep_sweeping(self, loop: asyncio.AbstractEventLoop) -> None:
        """Sweep on a timer while anything is stored (a client that went away is not there to
        trigger a lazy sweep); idempotent, on the event loop."""
        if self._sweeper is not None:
            return

        def tick() -> None:
            self._sweeper = None
            self.sweep()
            with self._lock:
                empty = not self._weights
            if not empty:
                self.keep_sweeping(loop)

        self._sweeper = loop.call_later(max(0.05, min(self.idle_s / 4, 30.0)), tick)

    # ---- the gradient ------------------------------------------------------------------------

    def take_grad(self, entry: StoredWeight) -> tuple[np.ndarray | None, np.ndarray | None, int, "Reservation | None"]:
        """The accumulated gradients, how many micro-batches they sum and the reservation of
        their bytes (now the caller's, to release once they are sent); the accumulators start
        again from zero (a version's gradient is taken once). The caller holds `entry.lock`."""
        with self._lock:
            gw, gb, n, charge = entry.grad_weight, entry.grad_bias, entry.micro_batches, entry.grad_charge
            entry.grad_weight = entry.grad_bias = entry.grad_charge = entry.accumulation = None
            entry.micro_batches = 0
            entry.last_used = self.clock()
        return gw, gb, n, charge
