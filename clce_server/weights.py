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

Bytes: a stored weight counts its weight, bias and gradient accumulators (fp32 (V, H), float64
(V,)) against its tenant's budget; a part held in a region counts nothing here (the shared-memory
caps count it) (the tenant's max_inflight_bytes: the bytes it may hold on
this server). An upload that does not fit evicts the tenant's least recently used other weights
first, and is refused (413) when it cannot fit at all. An evicted, replaced or never-stored
version answers `not_found` with a message saying to upload it again: the client does, and the
step goes on. A server restart empties the store (the same answer).
"""

from __future__ import annotations

import threading
import time
import weakref
from dataclasses import dataclass, field
from typing import Callable, Union

import numpy as np

from clce_wire.shm import RegionRef

from .errors import ApiError
from .shm import Region, view
from .tenants import Tenant

#: a stored part: its bytes (viewing the upload's body), or where they lie in shared memory
Part = Union[np.ndarray, RegionRef]


@dataclass
class StoredWeight:
    tenant: str
    name: str
    version: str
    weight: Part                          # (V, H), float32 or bfloat16
    bias: Part | None                     # (V,), the weight's dtype
    #: region name -> the registration the upload was checked against (weak: no pin, no mapping kept)
    regions: dict[str, "weakref.ref[Region]"] = field(default_factory=dict)
    grad_weight: np.ndarray | None = None  # (V, H) float32: the micro-batches' sum
    grad_bias: np.ndarray | None = None    # (V,) float64
    micro_batches: int = 0
    last_used: float = field(default_factory=time.monotonic)
    #: one accumulating job at a time (two device workers must not add into one gradient at once)
    lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.weight.shape)

    @property
    def nbytes(self) -> int:
        """What it holds against its tenant's budget: the accumulators, and the parts not in a region."""
        inline = sum(p.nbytes for p in (self.weight, self.bias) if isinstance(p, np.ndarray))
        return accumulator_bytes(self.shape, self.bias is not None) + inline

    def accumulators(self) -> tuple[np.ndarray, np.ndarray | None]:
        """The gradient accumulators, made (zeroed) on first use of this version."""
        if self.grad_weight is None:
            self.grad_weight = np.zeros(self.shape, np.float32)
            self.grad_bias = np.zeros(self.shape[0], np.float64) if self.bias is not None else None
        return self.grad_weight, self.grad_bias


def stored_bytes(shape: tuple[int, ...], itemsize: int, has_bias: bool) -> int:
    """What a stored weight may come to hold: itself, its bias and both gradient accumulators."""
    V, H = int(shape[0]), int(shape[1])
    return V * H * itemsize + (V * itemsize if has_bias else 0) + accumulator_bytes(shape, has_bias)


def accumulator_bytes(shape: tuple[int, ...], has_bias: bool) -> int:
    """The gradient accumulators of a (V, H) weight: fp32 (V, H), and float64 (V,) with a bias."""
    V, H = int(shape[0]), int(shape[1])
    return V * H * 4 + (V * 8 if has_bias else 0)


def _not_stored(name: str, version: str, why: str) -> ApiError:
    return ApiError("not_found", f"weight {name!r} version {version!r} is not stored on this server{why}; "
                                 "upload it again")


class WeightStore:
    """Weights by (tenant, name), one version each, within each tenant's byte budget."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._weights: dict[tuple[str, str], StoredWeight] = {}

    def tenant_bytes(self, tenant: str) -> int:
        with self._lock:
            return sum(w.nbytes for (t, _), w in self._weights.items() if t == tenant)

    def put(self, tenant: Tenant, name: str, version: str, weight: Part, bias: Part | None,
            regions: dict[str, Region] | None = None) -> StoredWeight:
        """Store a version. `weight`/`bias`: arrays, or references into `regions` (by name; each
        checked against the reference's bounds by the caller, and no longer pinned)."""
        entry = StoredWeight(tenant.name, name, version, weight, bias,
                             {n: weakref.ref(r) for n, r in (regions or {}).items()})
        need = entry.nbytes
        budget = tenant.max_inflight_bytes
        if need > budget:
            raise ApiError("payload_too_large",
                           f"weight {name!r} needs {need} bytes on the server (weight, bias and their gradient "
                           f"accumulators), over tenant {tenant.name!r}'s budget of {budget} bytes")
        with self._lock:
            self._weights.pop((tenant.name, name), None)   # the new version replaces the old
            mine = sorted(((w.last_used, key) for key, w in self._weights.items() if key[0] == tenant.name))
            held = sum(self._weights[key].nbytes for _, key in mine)
            for _, key in mine:                            # least recently used first
                if held + need <= budget:
                    break
                held -= self._weights.pop(key).nbytes
            self._weights[(tenant.name, name)] = entry
        return entry

    def get(self, tenant: Tenant, name: str, version: str) -> StoredWeight:
        with self._lock:
            entry = self._weights.get((tenant.name, name))
            if entry is None or entry.version != version:
                have = "" if entry is None else f" (stored: version {entry.version!r})"
                raise _not_stored(name, version, f"{have}: it was replaced, evicted or the server restarted")
            entry.last_used = time.monotonic()
            return entry

    def resolve(self, entry: StoredWeight, pin: Callable[[str], Region]) -> tuple[np.ndarray, np.ndarray | None]:
        """The stored version's weight and bias as arrays: a part in a region is viewed there,
        pinned by `pin(region name)` (the request's lease). A region gone or registered anew since
        the upload answers not_found (upload it again), and the entry is dropped."""
        out = []
        for what, part in (("weight", entry.weight), ("bias", entry.bias)):
            if not isinstance(part, RegionRef):
                out.append(part)
                continue
            try:
                region = pin(part.region)
            except ApiError as exc:
                if exc.code != "not_found":
                    raise
                region = None
            if region is None or entry.regions.get(part.region, lambda: None)() is not region:
                self.drop(entry)
                raise _not_stored(entry.name, entry.version,
                                  f": the shared-memory region {part.region!r} its {what} was uploaded in is gone "
                                  "(the client closed or re-registered it, or the server restarted)")
            out.append(view(region, part, name=what, writable=False))
        return out[0], out[1]

    def drop(self, entry: StoredWeight) -> None:
        """Drop this version, if it is still the stored one (a region gone; an accumulated gradient
        no longer a sum of whole micro-batches)."""
        with self._lock:
            if self._weights.get((entry.tenant, entry.name)) is entry:
                del self._weights[(entry.tenant, entry.name)]

    def take_grad(self, tenant: Tenant, name: str, version: str) -> tuple[np.ndarray | None, np.ndarray | None, int]:
        """The accumulated gradients and how many micro-batches they sum; the accumulators start
        again from zero (a version's gradient is taken once)."""
        entry = self.get(tenant, name, version)
        with entry.lock:
            gw, gb, n = entry.grad_weight, entry.grad_bias, entry.micro_batches
            entry.grad_weight = entry.grad_bias = None
            entry.micro_batches = 0
        return gw, gb, n

    def delete(self, tenant: Tenant, name: str) -> bool:
        with self._lock:
            return self._weights.pop((tenant.name, name), None) is not None
