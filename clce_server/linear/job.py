"""The fused linear cross-entropy as scheduler work: `LinearJob` carries one request to a device's
`LinearCrossEntropy` (engine.py), a chunk of rows per scheduler step, as cross_entropy/job.py's
`LossJob` carries the loss. What a request holds while it runs is counted before any of it exists
(`held_bytes`), and its buffers come from the request's lease (`Scratch`, `allocating`).

Accumulation (`accumulate` with a stored version): the weight's and bias's gradients add into the
version's accumulators, one job at a time (the version's lock, held across the job's chunks); a
job stopped part way drops the version, whose sum is then no longer one of whole micro-batches.
"""

from __future__ import annotations

import errno
from collections.abc import Mapping
from typing import Any, Callable, Generator

import numpy as np

from ..rails.errors import ApiError
from ..rails.scheduler import Job
from .engine import LinearCrossEntropy, LinearProblem, LinearResult
from .weights import NO_MEMORY, StoredWeight, WeightStore, no_memory


class LinearJob(Job):
    """One fused linear cross-entropy request for whichever device the scheduler picks.

    ``engines`` maps a device index to its LinearCrossEntropy. The job owns no memory: the
    gradients go where the request's lease (or the client's region, or the stored version's
    accumulators) has them, the scratch comes from `scratch`."""

    def __init__(self, problem: LinearProblem, engines: Mapping[int, LinearCrossEntropy], *, want_grad: bool,
                 grad_hidden: np.ndarray | None = None, grad_weight: np.ndarray | None = None,
                 scratch: "Scratch | None" = None, stored: StoredWeight | None = None,
                 store: WeightStore | None = None, accumulating: bool = False):
        self.problem, self.engines, self.want_grad = problem, engines, want_grad
        self.grad_hidden, self.grad_weight = grad_hidden, grad_weight
        self.empty = scratch.take if scratch is not None else np.empty
        self.stored, self.store, self.accumulating = stored, store, accumulating
        self.cost = float(problem.hidden.shape[0]) * problem.weight.shape[0]

    def run(self, device) -> Generator[float, None, LinearResult]:
        lce = self.engines[device.index]
        p, want = self.problem, self.want_grad
        if not self.accumulating:
            # a stored version stays in device memory (weight_key), its accumulators untouched
            return (yield from lce.steps(p, want_grad_hidden=want, want_grad_weight=want,
                                         want_grad_bias=want and p.bias is not None, grad_weight=self.grad_weight,
                                         overwrite_grad_weight=True, grad_hidden=self.grad_hidden, empty=self.empty,
                                         weight_key=self.stored))
        stored = self.stored
        stored.lock.acquire()
        try:
            gw, gb = stored.grad_weight, stored.grad_bias
            if gw is None:   # taken by a flush, or dropped, while this micro-batch waited
                raise ApiError("weight_not_stored", f"weight {stored.name!r} version {stored.version!r}: its "
                               "accumulated gradient was taken or dropped while this micro-batch waited; "
                               "upload it again")
            added = False
            try:
                result = yield from lce.steps(p, grad_weight=gw, grad_bias=gb, grad_hidden=self.grad_hidden,
                                              empty=self.empty, weight_key=stored)
                added = True
            finally:
                if added:
                    stored.micro_batches += 1
                    result.micro_batches, result.accumulation = stored.micro_batches, stored.accumulation
                else:   # stopped part way: the sum is no longer one of whole micro-batches
                    self.store.drop(stored)
        finally:
            stored.release()
        return result


def held_bytes(lce: LinearCrossEntropy, p: LinearProblem, *, want_grad: bool, grad_hidden_in_region: bool,
               fresh_grad_weight: bool, accumulating: bool, copied_bytes: int) -> int:
    """What a request holds besides its body, reserved before any of it exists: the copies out of
    shared memory, the hidden's gradient (unless it goes to a region), the chunk's scratch and a
    fresh weight (and bias) gradient. An accumulating version's accumulators are the stored
    weight's own (WeightStore.admit)."""
    return (copied_bytes + (p.hidden.nbytes if want_grad and not grad_hidden_in_region else 0)
            + lce.work_bytes(p, want_grad_hidden=want_grad, fresh_grad_weight=fresh_grad_weight,
                             fresh_grad_bias=want_grad and p.bias is not None and not accumulating))


class Scratch:
    """A request's scratch buffers, taken from its lease's pool before its job runs (on the event
    loop, the lease's owner: fresh (chunk, V) pages would fault in on every call); the job's
    LinearCrossEntropy.steps asks for them by shape (anything else: a plain allocation, reserved
    with them by LinearCrossEntropy.work_bytes)."""

    def __init__(self, lease, shapes):
        self._free: dict[tuple, list[np.ndarray]] = {}
        for shape, dtype in shapes:
            self._free.setdefault((tuple(shape), np.dtype(dtype)), []).append(lease.array(shape, dtype))

    def take(self, shape, dtype) -> np.ndarray:
        kept = self._free.get((tuple(shape), np.dtype(dtype)))
        return kept.pop() if kept else np.empty(shape, dtype)


def allocating(nbytes: int, make: Callable[[], Any]) -> Any:
    """`make()`, whose allocations the budgets allowed: one the OS refuses anyway answers 503 with
    Retry-After (the host is short of memory now), never 500."""
    try:
        return make()
    except NO_MEMORY as exc:
        raise no_memory(nbytes, exc) from None
    except OSError as exc:
        if exc.errno in (errno.ENOMEM, errno.EAGAIN):   # mmap's answer for a pool buffer
            raise no_memory(nbytes, exc) from None
        raise
