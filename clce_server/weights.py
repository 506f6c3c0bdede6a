"""Stored weights for the fused linear cross-entropy: the weight crosses the wire once per version.

A client uploads a (vocabulary, hidden) weight (and bias) under (tenant, name, version) and then
sends only hidden states and targets. The weight's gradient accumulates here over the
micro-batches of one version and is taken once (`take_grad`), before the optimizer step that
makes the next version. Uploading a new version of a name replaces the old one (and drops its
untaken gradient: the optimizer has moved on).

Bytes: a stored weight counts its weight, bias and gradient accumulators (fp32 (V, H), float64
(V,)) against its tenant's budget (the tenant's max_inflight_bytes: the bytes it may hold on
this server). An upload that does not fit evicts the tenant's least recently used other weights
first, and is refused (413) when it cannot fit at all. An evicted, replaced or never-stored
version answers `not_found` with a message saying to upload it again: the client does, and the
step goes on. A server restart empties the store (the same answer).
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

import numpy as np

from .errors import ApiError
from .tenants import Tenant


@dataclass
class StoredWeight:
    tenant: str
    name: str
    version: str
    weight: np.ndarray                    # (V, H), float32 or bfloat16
    bias: np.ndarray | None               # (V,), the weight's dtype
    grad_weight: np.ndarray | None = None  # (V, H) float32: the micro-batches' sum
    grad_bias: np.ndarray | None = None    # (V,) float64
    micro_batches: int = 0
    last_used: float = field(default_factory=time.monotonic)
    #: one accumulating job at a time (two device workers must not add into one gradient at once)
    lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def nbytes(self) -> int:
        return stored_bytes(self.weight.shape, self.weight.itemsize, self.bias is not None)

    def accumulators(self) -> tuple[np.ndarray, np.ndarray | None]:
        """The gradient accumulators, made (zeroed) on first use of this version."""
        if self.grad_weight is None:
            self.grad_weight = np.zeros(self.weight.shape, np.float32)
            self.grad_bias = np.zeros(self.weight.shape[0], np.float64) if self.bias is not None else None
        return self.grad_weight, self.grad_bias


def stored_bytes(shape: tuple[int, ...], itemsize: int, has_bias: bool) -> int:
    """What a stored weight may come to hold: itself, its bias and both gradient accumulators."""
    V, H = int(shape[0]), int(shape[1])
    return V * H * (itemsize + 4) + (V * (itemsize + 8) if has_bias else 0)


class WeightStore:
    """Weights by (tenant, name), one version each, within each tenant's byte budget."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._weights: dict[tuple[str, str], StoredWeight] = {}

    def tenant_bytes(self, tenant: str) -> int:
        with self._lock:
            return sum(w.nbytes for (t, _), w in self._weights.items() if t == tenant)

    def put(self, tenant: Tenant, name: str, version: str, weight: np.ndarray,
            bias: np.ndarray | None) -> StoredWeight:
        need = stored_bytes(weight.shape, weight.itemsize, bias is not None)
        budget = tenant.max_inflight_bytes
        if need > budget:
            raise ApiError("payload_too_large",
                           f"weight {name!r} needs {need} bytes on the server (weight, bias and their gradient "
                           f"accumulators), over tenant {tenant.name!r}'s budget of {budget} bytes")
        entry = StoredWeight(tenant.name, name, version, weight, bias)
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
                raise ApiError("not_found", f"weight {name!r} version {version!r} is not stored on this server"
                                            f"{have}: it was replaced, evicted or the server restarted; "
                                            "upload it again")
            entry.last_used = time.monotonic()
            return entry

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
