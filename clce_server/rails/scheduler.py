"""Admission control and weighted fair scheduling of device work between tenants.

A `Job` runs on the worker thread of one device: ``job.run(device)`` is a generator that yields
after each bounded chunk of device work (the yielded float is the device seconds that chunk used)
and returns its result. A job whose ``batch_key`` is not None may be coalesced with queued jobs of
the same key into one step, ``type(job).run_batch(device, jobs)``; each tenant is then charged in
proportion to its jobs' ``cost``. The scheduler knows nothing about OpenCL.

Flow: ``submit`` admits synchronously (size and byte/queue budgets), assigns the job to the
least-loaded device worker and awaits an asyncio future. Each worker keeps a FIFO queue per
tenant and runs one step at a time from the backlogged tenant with the lowest virtual time
(start-time weighted fair queueing): after each step the tenant is charged
``device_seconds / weight``. Within a tenant only the head job runs, so a big job of tenant A is
interleaved chunk by chunk with the small jobs of tenant B, while A's own jobs stay in order.

The worker picks work in ``_Worker._next``; ``_Worker._gather`` extends a pick to the queued jobs
with the same batch key (dynamic batching), head-first in every tenant's queue.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import itertools
import logging
import math
import threading
import time
from collections import deque
from typing import Any, Callable, ClassVar, Generator, Hashable, Iterable, Sequence

from ..config import over_limit
from ..metrics import Metrics
from ..tenants import Tenant, TenantRegistry

log = logging.getLogger(__name__)


# Retry-After bounds: never tell a client "retry now", never make it wait absurdly long.
MIN_RETRY_AFTER_S = 0.05
MAX_RETRY_AFTER_S = 60.0
# Prior for the per-job service time before any job has completed.
_INITIAL_JOB_S = 0.25
# How fast the host moves a request's bytes (received, decoded, sent): loopback TCP from Python
# moves about 2.6 GB/s one way. A tenant is charged nbytes / this, divided by its weight, besides
# its device time. 0 charges device time only.
HOST_BYTES_PER_S = 2.5e9
_EWMA_ALPHA = 0.2


class Job:
    """Work for one device. Subclasses implement `run`; coalescible ones also set `batch_key`
    (jobs with equal keys may share one step) and `cost` (their share of a shared step), and
    implement `run_batch`."""

    batch_key: Hashable | None = None
    cost: float = 1.0

    def run(self, device: Any) -> Generator[float, None, Any] | Any:
        """A generator yielding device seconds per chunk and returning the result (or, for work
        that is one step, the result itself)."""
        raise NotImplementedError

    @classmethod
    def run_batch(cls, device: Any, jobs: Sequence["Job"]) -> list:
        """One step for several jobs with the same batch key: a result or exception per job."""
        raise NotImplementedError


class FunctionJob(Job):
    """A job from a plain function of the device (a generator function runs in steps)."""

    def __init__(self, fn: Callable[[Any], Any]) -> None:
        self.fn = fn

    def run(self, device: Any) -> Any:
        return self.fn(device)


def as_job(job: Job | Callable[[Any], Any]) -> Job:
    return job if isinstance(job, Job) else FunctionJob(job)


class SchedulerError(Exception):
    """Base of scheduler errors; each subclass's `code` is the wire error code it is answered with."""

    code: ClassVar[str]

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class AdmissionError(SchedulerError):
    """The job was refused before it was queued; it never ran."""


class PayloadTooLarge(AdmissionError):
    code = "payload_too_large"


class QueueFull(AdmissionError):
    code = "queue_full"

    def __init__(self, message: str, retry_after: float, scope: str = "tenant") -> None:
        super().__init__(message)
        self.retry_after = retry_after
        #: which budget is full: "tenant" (its own bytes may be freed: the weight store evicts
        #: the tenant's least recently used weights and tries again) or "server"
        self.scope = scope



class ShuttingDown(AdmissionError):
    code = "not_ready"


class DeadlineExceeded(SchedulerError):
    code = "deadline_exceeded"


class QueueTimeout(DeadlineExceeded):
    """Still queued after the tenant's max_queue_time_ms (its queue policy rejects it)."""


_QUEUED, _STARTED, _DONE = "queued", "started", "done"


class _Job:
    __slots__ = (
        "seq", "tenant", "nbytes", "work", "deadline", "loop", "future", "worker", "state", "gen",
        "abandoned", "abandon_outcome", "submitted_at", "started_at", "finished_at", "compute_s",
        "steps", "keep",
    )  # fmt: skip

    def __init__(self, seq, tenant, nbytes, work, deadline, loop, worker, now: float) -> None:
        self.seq: int = seq
        self.tenant: Tenant = tenant
        self.nbytes: int = nbytes
        self.work: Job = work
        self.deadline: float | None = deadline
        self.loop: asyncio.AbstractEventLoop = loop
        self.future: asyncio.Future = loop.create_future()
        self.worker: _Worker = worker
        self.state = _QUEUED
        self.gen: Generator | None = None
        self.abandoned = False  # the caller is gone (cancelled or past its deadline)
        self.abandon_outcome = "cancelled"
        self.submitted_at = now
        self.started_at: float | None = None
        self.finished_at: float | None = None
        self.compute_s = 0.0
        self.steps = 0
        self.keep: Reservation | None = None   # where its bytes go when it ends (see Reservation)

    def expired(self, now: float) -> bool:
        return self.deadline is not None and now >= self.deadline

    def queued_too_long(self, now: float) -> bool:
        """Past the tenant's max_queue_time_ms without having started (its queue policy rejects it)."""
        limit = self.tenant.max_queue_time_ms
        return self.state is _QUEUED and limit is not None and now - self.submitted_at >= limit / 1000.0


class _TenantState:
    __slots__ = ("name", "active", "inflight_bytes", "stored_bytes", "outcomes", "gauges")

    def __init__(self, name: str) -> None:
        self.name = name
        self.gauges = None  # (queue depth, in-flight bytes) metric children: label lookups, once
        self.active: dict[int, _Job] = {}  # admitted, not finished; insertion = submission order
        self.inflight_bytes = 0
        self.stored_bytes = 0   # of inflight_bytes: kept between requests (stored weights)
        self.outcomes = {"ok": 0, "error": 0, "cancelled": 0, "deadline": 0, "shutdown": 0}


def _step_seconds(reported: Any, wall: float) -> float:
    # Trust the job's own device time; fall back to wall time when it yielded nonsense.
    try:
        seconds = float(reported)
    except (TypeError, ValueError):
        return wall
    return seconds if math.isfinite(seconds) and seconds >= 0 else wall


def _close(job: _Job) -> None:
    if job.gen is None:
        return
    try:
        job.gen.close()  # runs the job's finally blocks (frees its device buffers)
    except Exception:
        log.exception("job of tenant %r raised while being closed", job.tenant.name)


class _Worker:
    """One thread per device; all state is guarded by the scheduler's lock."""

    def __init__(self, sched: "Scheduler", index: int, device: Any, name: str) -> None:
        self.sched = sched
        self.index = index
        self.device = device
        self.name = name
        self.cond = threading.Condition(sched._lock)
        self.queues: dict[str, deque[_Job]] = {}  # backlogged tenants only
        self.vtime: dict[str, float] = {}
        self.backlog_order: dict[str, int] = {}  # tie-break: earlier backlogged first
        self.level: dict[str, int] = {}  # the queue's priority level (1 first); FIFO has one queue, one level
        self.vclock = 0.0  # virtual time of the last step taken
        self.reap: deque[_Job] = deque()  # started jobs whose caller is gone
        self.queued_jobs = 0
        self.queued_bytes = 0
        self.busy_s = 0.0
        self.steps = 0
        self.stopping = False
        self.thread: threading.Thread | None = None

    # -- called with the lock held ---------------------------------------------------------

    def queue_key(self, job: _Job) -> str:
        # FIFO (the baseline fairness is measured against) is one queue shared by every tenant.
        return job.tenant.name if self.sched.policy == "fair" else ""

    def enqueue(self, job: _Job) -> None:
        name = self.queue_key(job)
        queue = self.queues.get(name)
        if queue is None:
            queue = self.queues[name] = deque()
            # Start at the current minimum so a tenant cannot bank credit while idle.
            self.vtime[name] = min(self.vtime.values(), default=self.vclock)
            self.backlog_order[name] = next(self.sched._counter)
            self.level[name] = job.tenant.priority if name else 1
        # Fairness covers the host work a request causes, not only device time: the bytes it was
        # received in and will be answered with cost event-loop time that other tenants wait for.
        rate = self.sched.host_bytes_per_s
        if rate:
            self.vtime[name] += job.nbytes / rate / job.tenant.weight
        queue.append(job)
        self.queued_jobs += 1
        self.queued_bytes += job.nbytes
        self.cond.notify()

    def remove(self, job: _Job) -> None:
        name = self.queue_key(job)
        queue = self.queues[name]
        queue.remove(job)
        if not queue:
            del self.queues[name], self.vtime[name], self.backlog_order[name], self.level[name]
        self.queued_jobs -= 1
        self.queued_bytes -= job.nbytes

    def _next(self) -> tuple[str, _Job | list[_Job] | None]:
        """The next action and its job(s): ("step", job), ("batch", jobs), ("close" | "deadline" |
        "queue_timeout" | "shutdown", job) to stop one, or ("exit", None). Waits while there is nothing to do."""
        while True:
            while self.reap:
                job = self.reap.popleft()
                if job.state is not _DONE:
                    return "close", job
            if self.stopping:
                for queue in self.queues.values():
                    return "shutdown", queue[0]
                return "exit", None
            if self.vtime:
                name = min(self.vtime, key=lambda n: (self.level[n], self.vtime[n], self.backlog_order[n]))
                self.vclock = self.vtime[name]
                job = self.queues[name][0]
                if job.abandoned:
                    return "close", job
                now = self.sched.clock()
                if job.expired(now):
                    return "deadline", job
                if job.queued_too_long(now):   # the loop's timer may be late; never start it
                    return "queue_timeout", job
                if job.state is _QUEUED:
                    batch = self._gather(job, now)
                    for j in batch:
                        j.state = _STARTED
                        j.started_at = now
                    if len(batch) > 1:
                        return "batch", batch
                return "step", job
            self.cond.wait()

    def _gather(self, job: _Job, now: float) -> list[_Job]:
        """Dynamic batching: queued jobs with the same `batch_key` as `job` ride along in
        one step (one device launch for many small requests). Each tenant's queue is taken from its
        head and only while jobs match, so per-tenant order holds."""
        key = job.work.batch_key
        limit = self.sched.max_batch
        if key is None or limit <= 1:
            return [job]
        batch = [job]
        for queue in self.queues.values():
            for other in queue:
                if len(batch) >= limit:
                    return batch
                if other is job:
                    continue
                if (other.state is not _QUEUED or other.abandoned or other.expired(now) or other.queued_too_long(now)
                        or other.work.batch_key != key):
                    break
                batch.append(other)
        return batch

    # -- worker thread ----------------------------------------------------------------------

    def run(self) -> None:
        while True:
            with self.cond:
                action, job = self._next()
            if job is None:
                return
            jobs = job if isinstance(job, list) else [job]
            try:
                if action == "step":
                    self._step(job)
                elif action == "batch":
                    self._run_batch(jobs)
                else:
                    self._stop(job, action)
            except BaseException as exc:  # a scheduler bug must not leave callers hanging
                log.exception("device worker %s: internal error", self.name)
                error = RuntimeError(f"internal scheduler error: {exc!r}")
                for j in jobs:
                    _close(j)
                    self.sched._finish(j, "error", exc=error)
            # Not kept while waiting for the next work: a finished job's future holds its result
            # (the request's gradient) until the caller is done with it, not until the next job.
            job = jobs = j = None

    def _run_batch(self, jobs: list[_Job]) -> None:
        """One step for several jobs: `run_batch(device, works)` returns a result or an exception per
        job. Each tenant is charged the step's time in proportion to its jobs' `cost`."""
        works = [j.work for j in jobs]
        t0 = time.perf_counter()
        try:
            results = list(type(works[0]).run_batch(self.device, works))
            if len(results) != len(jobs):
                raise RuntimeError(f"run_batch returned {len(results)} results for {len(jobs)} jobs")
        except Exception as e:
            results = [e] * len(jobs)
        wall = time.perf_counter() - t0
        costs = [float(w.cost) for w in works]
        total = sum(costs) or 1.0
        metrics = self.sched.metrics
        with self.cond:
            for j, c in zip(jobs, costs):
                share = wall * c / total
                j.compute_s += share
                j.steps += 1
                name = self.queue_key(j)
                if name in self.vtime:
                    self.vtime[name] += share / j.tenant.weight
            self.busy_s += wall
            self.steps += 1
            if metrics is not None:
                metrics.device_busy(self.name, wall)
        pending: list = []
        for j, r in zip(jobs, results):
            if isinstance(r, BaseException):
                self.sched._finish(j, "error", exc=r, pending=pending)
            else:
                self.sched._finish(j, "ok", result=r, pending=pending)
        self.sched._deliver(pending)
        # an exception raised here has this frame in its traceback: no cycle through the jobs
        results = r = j = jobs = works = None

    def _step(self, job: _Job) -> None:
        done = False
        result: Any = None
        exc: BaseException | None = None
        reported: Any = None
        t0 = time.perf_counter()
        try:
            if job.gen is None:
                obj = job.work.run(self.device)
                if inspect.isgenerator(obj):
                    job.gen = obj
                    reported = next(obj)
                else:  # a plain function: the call was the whole job
                    result, done = obj, True
            else:
                reported = next(job.gen)
        except StopIteration as stop:
            result, done = stop.value, True
        except Exception as e:
            exc, done = e, True
        except BaseException as e:
            # SystemExit/KeyboardInterrupt from a job would tear down the caller's event loop.
            exc, done = RuntimeError(f"job raised {e!r}"), True
            exc.__cause__ = e
        wall = time.perf_counter() - t0
        # The segment after the last yield (final reductions, read-back) is charged its wall time.
        seconds = wall if done else _step_seconds(reported, wall)

        stop_action = None
        metrics = self.sched.metrics
        with self.cond:
            job.compute_s += seconds
            job.steps += 1
            self.busy_s += seconds
            self.steps += 1
            name = self.queue_key(job)
            if name in self.vtime:
                self.vtime[name] += seconds / job.tenant.weight
            if metrics is not None:
                metrics.device_busy(self.name, seconds)
            if not done:
                if job.abandoned:
                    stop_action = "close"
                elif job.expired(self.sched.clock()):
                    stop_action = "deadline"
        if done:
            self.sched._finish(job, "ok" if exc is None else "error", result=result, exc=exc)
        elif stop_action is not None:
            self._stop(job, stop_action)
        # A failed job's exception has this frame in its traceback, and its job's future holds the
        # exception: without these locals, that is no reference cycle (the request's arrays are
        # freed with the exception, not by the garbage collector).
        exc = result = job = None

    def _stop(self, job: _Job, action: str) -> None:
        _close(job)
        if action == "close":
            self.sched._finish(job, job.abandon_outcome)
        elif action == "deadline":
            self.sched._finish(job, "deadline", exc=DeadlineExceeded(_deadline_message(job)))
        elif action == "queue_timeout":
            self.sched._finish(job, "deadline", exc=_queue_timeout_error(job))
        else:
            self.sched._finish(job, "shutdown", exc=ShuttingDown("server is shutting down"))


def _queue_timeout_error(job: _Job) -> QueueTimeout:
    return QueueTimeout(f"rejected after {job.tenant.max_queue_time_ms:g} ms in the queue (the tenant's "
                        "max_queue_time_ms) before it started")


def _deadline_message(job: _Job) -> str:
    where = "before it started" if job.started_at is None else f"after {job.steps} step(s)"
    return f"deadline exceeded {where}"


class Reservation:
    """Bytes held against a tenant's and the server's in-flight budgets outside a job's run: the
    request's body while it is read and decoded (`reserve`), then, once the job it was handed to
    (`submit(reservation=...)`) is over, the job's bytes until the response has gone out (the
    body and gradient are still in memory while they stream).

    `release()` gives back all of it, once. When the job is still running then (the caller gave
    up on it), its bytes are given back when it ends, and so is the memory behind them:
    `release(after_job=f)` returns True and the scheduler calls `f` once the job is over, on
    whichever thread ends it."""

    __slots__ = ("scheduler", "tenant", "nbytes", "closed", "job_active", "after_job", "stored")

    def __init__(self, scheduler: "Scheduler", tenant: Tenant, nbytes: int, stored: bool = False):
        self.scheduler, self.tenant, self.nbytes = scheduler, tenant, nbytes
        #: bytes kept between requests (a stored weight, its accumulators), shown apart in stats()
        self.stored = stored
        self.closed = False
        self.job_active = False        # a job admitted with it has not ended (scheduler's lock)
        self.after_job: Callable[[], None] | None = None

    def release(self, after_job: Callable[[], None] | None = None) -> bool:
        """Give the bytes back; True when a job is still running and `after_job` will be called
        when it ends."""
        return self.scheduler._unreserve(self, after_job)


class Scheduler:
    """Per-device worker threads with per-tenant weighted fair queues and admission control.

    `devices` are opaque objects handed to jobs (named by str()); `max_inflight_bytes` bounds the
    bytes of all admitted, unfinished jobs; `max_batch` bounds how many jobs share one step;
    `host_bytes_per_s` prices a job's bytes in the virtual time of fair queueing (0: device time only).
    `clock` (seconds, monotonic) is what deadlines and queue-time limits are measured on.
    """

    def __init__(
        self,
        devices: Sequence[Any],
        registry: TenantRegistry,
        *,
        max_inflight_bytes: int,
        metrics: Metrics | None = None,
        policy: str = "fair",
        max_batch: int = 64,
        host_bytes_per_s: float = HOST_BYTES_PER_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not devices:
            raise ValueError("at least one device is required")
        if (
            isinstance(max_inflight_bytes, bool)
            or not isinstance(max_inflight_bytes, int)
            or max_inflight_bytes <= 0
        ):
            raise ValueError(
                f"max_inflight_bytes must be a positive integer, got {max_inflight_bytes!r}"
            )
        if policy not in ("fair", "fifo"):
            raise ValueError(f"policy must be 'fair' or 'fifo', got {policy!r}")
        self.policy = policy
        #: the time deadlines, queue limits and queue durations are read on (tests pass their own)
        self.clock = clock
        self.max_batch = int(max_batch)
        self.host_bytes_per_s = float(host_bytes_per_s)
        self.registry = registry
        self.max_inflight_bytes = max_inflight_bytes
        self.metrics = metrics
        self._lock = threading.Lock()
        self._counter = itertools.count()
        self._workers: list[_Worker] = []
        seen: set[str] = set()
        for i, device in enumerate(devices):
            name = str(device)
            if name in seen:
                name = f"{name}#{i}"
            seen.add(name)
            self._workers.append(_Worker(self, i, device, name))
        self._tenants: dict[str, _TenantState] = {}
        self._jobs: dict[int, _Job] = {}  # admitted, not finished; insertion = submission order
        self._inflight_bytes = 0
        self._stored_bytes = 0
        self._ewma_job_s = _INITIAL_JOB_S
        self._accepting = True
        self._started = False
        self._closed = False
        self._idle_waiters: list[tuple[asyncio.AbstractEventLoop, asyncio.Future]] = []
        for tenant in registry.tenants:
            self._tenant_state(tenant.name)
        if metrics is not None:
            for worker in self._workers:
                metrics.add_device(worker.name)

    # -- lifecycle -----------------------------------------------------------------------------

    def start(self) -> None:
        """Start the worker threads (idempotent; `submit` also starts them on first use)."""
        with self._lock:
            if self._started or self._closed:
                return
            self._started = True
            for worker in self._workers:
                worker.thread = threading.Thread(
                    target=worker.run, name=f"clce-worker-{worker.name}", daemon=True
                )
                worker.thread.start()

    @property
    def accepting(self) -> bool:
        return self._accepting

    def check_health(self) -> None:
        """Raise RuntimeError when a started device worker has stopped (its thread died): jobs
        sent to it would wait forever. Returns quietly while starting and after shutdown."""
        with self._lock:
            if not self._started or self._closed:
                return
            dead = [w.name for w in self._workers if w.thread is not None and not w.thread.is_alive()]
        if dead:
            raise RuntimeError(f"device worker(s) stopped: {', '.join(dead)}")

    async def drain(self, timeout: float | None = None) -> bool:
        """Stop admitting (new submits raise ShuttingDown) and wait for admitted jobs to finish.

        Returns True when everything finished, False when `timeout` seconds passed first.
        """
        loop = asyncio.get_running_loop()
        waiter = loop.create_future()
        with self._lock:
            self._accepting = False
            if not self._jobs:
                return True
            self._idle_waiters.append((loop, waiter))
        try:
            await asyncio.wait_for(waiter, timeout)
            return True
        except asyncio.TimeoutError:   # wait_for's; not the built-in TimeoutError before Python 3.11
            return False
        finally:
            with self._lock:
                self._idle_waiters = [w for w in self._idle_waiters if w[1] is not waiter]

    def shutdown(self, timeout: float | None = None) -> bool:
        """Stop the workers. Jobs still admitted are stopped and fail with ShuttingDown.

        Returns True when every worker thread has exited within `timeout` seconds.
        """
        with self._lock:
            self._accepting = False
            self._closed = True
            for worker in self._workers:
                worker.stopping = True
                worker.cond.notify()
        end = None if timeout is None else time.monotonic() + timeout
        for worker in self._workers:
            if worker.thread is not None:
                worker.thread.join(None if end is None else max(0.0, end - time.monotonic()))
        return not any(w.thread is not None and w.thread.is_alive() for w in self._workers)

    # -- submission ----------------------------------------------------------------------------

    async def submit(
        self,
        tenant: Tenant,
        nbytes: int,
        job: Job | Callable[[Any], Any],
        *,
        deadline: float | None = None,
        timings: dict | None = None,
        request_bytes: int | None = None,
        reservation: Reservation | None = None,
    ) -> Any:
        """Run `job` on a device on behalf of `tenant`; return its result or raise its exception.
        A plain function of the device is run as a `FunctionJob`.

        `nbytes` is what the request holds in memory until it finishes (body plus buffers);
        `request_bytes`, when given, is the request's own size, checked against max_request_bytes
        (default: nbytes).
        `deadline` is an absolute time on the scheduler's `clock`. `timings`, when given, is filled with
        queue_s (submit to first step), compute_s (device seconds), steps and device.
        `reservation` (from `reserve`) holds part of `nbytes` already; only the rest is admitted.
        Raises PayloadTooLarge, QueueFull, ShuttingDown (before queueing) or DeadlineExceeded.
        """
        loop = asyncio.get_running_loop()
        if deadline is not None and self.clock() >= deadline:
            raise DeadlineExceeded("deadline exceeded before the request was queued")
        if not self._started:
            self.start()
        j = self._admit(tenant, nbytes, as_job(job), deadline, loop, request_bytes, reservation)
        timers = []
        if deadline is not None:
            timers.append(loop.call_later(max(0.0, deadline - self.clock()), self._expire, j))
        if tenant.max_queue_time_ms is not None:
            timers.append(loop.call_later(tenant.max_queue_time_ms / 1000.0, self._queue_timeout, j))
        try:
            return await j.future
        except asyncio.CancelledError:
            self._abandon(j, "cancelled")
            raise
        finally:
            for timer in timers:
                timer.cancel()
            if timings is not None:
                timings.update(self._timings(j))
            # A failed job's exception has this frame in its traceback, and the frame the job
            # whose future holds the exception: dropped here, that is no cycle (the request's
            # arrays are freed with the exception, not by the garbage collector).
            j = job = timers = None

    def reserve(self, tenant: Tenant, nbytes: int, stored: bool = False) -> Reservation:
        """Hold `nbytes` (a request body, from its Content-Length) against the in-flight budgets
        before the body is read, so that a burst is turned away with 429 before its bodies are in
        memory, not after. `stored`: bytes kept between requests (clce_server/linear/weights.py), the
        same budgets, shown apart in stats(). Raises QueueFull or ShuttingDown."""
        if not self._accepting:
            raise ShuttingDown("server is shutting down")
        with self._lock:
            state = self._tenant_state(tenant.name)
            self._check_budgets(tenant, state, nbytes)
            state.inflight_bytes += nbytes
            self._inflight_bytes += nbytes
            if stored:
                state.stored_bytes += nbytes
                self._stored_bytes += nbytes
            self._publish(state)
        return Reservation(self, tenant, nbytes, stored)

    def _unreserve(self, r: Reservation, after_job: Callable[[], None] | None) -> bool:
        with self._lock:
            if r.closed:
                return False
            state = self._tenants[r.tenant.name]
            state.inflight_bytes -= r.nbytes
            self._inflight_bytes -= r.nbytes
            if r.stored:
                state.stored_bytes -= r.nbytes
                self._stored_bytes -= r.nbytes
            r.nbytes, r.closed = 0, True
            self._publish(state)
            if r.job_active:
                r.after_job = after_job
            return r.job_active

    def grow(self, reservation: Reservation, nbytes: int) -> None:
        """Hold `nbytes` more in `reservation` (a request's buffers, counted before they are
        allocated). Raises PayloadTooLarge when the reservation could never fit the budgets,
        QueueFull when it does not fit now, ShuttingDown."""
        if isinstance(nbytes, bool) or not isinstance(nbytes, int) or nbytes < 0:
            raise ValueError(f"nbytes must be a non-negative integer, got {nbytes!r}")
        if not self._accepting:
            raise ShuttingDown("server is shutting down")
        tenant = reservation.tenant
        with self._lock:
            if reservation.closed:
                raise ValueError("the reservation was released")
            self.check_fits(tenant, reservation.nbytes + nbytes)
            state = self._tenant_state(tenant.name)
            self._check_budgets(tenant, state, nbytes)
            reservation.nbytes += nbytes
            state.inflight_bytes += nbytes
            self._inflight_bytes += nbytes
            if reservation.stored:
                state.stored_bytes += nbytes
                self._stored_bytes += nbytes
            self._publish(state)

    def split(self, reservation: Reservation, nbytes: int, stored: bool = False) -> Reservation:
        """Move up to `nbytes` of `reservation` into a new one of the same tenant (the budgets'
        totals unchanged): bytes that outlive the request that reserved them (a stored weight
        keeps viewing its upload's body). Nothing is moved from a closed reservation."""
        with self._lock:
            moved = 0 if reservation.closed else max(0, min(int(nbytes), reservation.nbytes))
            reservation.nbytes -= moved
            if stored != reservation.stored:
                state = self._tenant_state(reservation.tenant.name)
                sign = 1 if stored else -1
                state.stored_bytes += sign * moved
                self._stored_bytes += sign * moved
        return Reservation(self, reservation.tenant, moved, stored)

    def merge(self, into: Reservation, other: Reservation) -> Reservation:
        """`other`'s bytes moved into `into` (same tenant; totals unchanged); `other` is closed."""
        if into.tenant.name != other.tenant.name or into.stored != other.stored:
            raise ValueError("only reservations of one tenant and one kind can be merged")
        with self._lock:
            if into.closed:
                raise ValueError("cannot merge into a released reservation")
            into.nbytes += other.nbytes
            other.nbytes, other.closed = 0, True
        return into

    def check_fits(self, tenant: Tenant, nbytes: int, what: str = "request") -> None:
        """PayloadTooLarge when `nbytes` held at once could never fit the tenant's or the
        server's byte budget (413, not an endless stream of 429s), naming the budget and where
        it is set."""
        if nbytes > tenant.max_inflight_bytes:
            raise PayloadTooLarge(over_limit(f"{what} needs {nbytes} bytes of server memory at once",
                                             "tenant_max_inflight_bytes", tenant.max_inflight_bytes))
        if nbytes > self.max_inflight_bytes:
            raise PayloadTooLarge(over_limit(f"{what} needs {nbytes} bytes of server memory at once",
                                             "max_inflight_bytes", self.max_inflight_bytes))

    def tenant_bytes(self, tenant: str) -> int:
        """The bytes a tenant holds against its budget now: requests in flight, answers being
        sent, stored weights and their accumulators."""
        with self._lock:
            state = self._tenants.get(tenant)
            return 0 if state is None else state.inflight_bytes

    def _check_budgets(self, tenant: Tenant, state: _TenantState, nbytes: int) -> None:
        excess = state.inflight_bytes + nbytes - tenant.max_inflight_bytes
        if excess > 0:
            raise QueueFull(
                over_limit(f"tenant {tenant.name!r} has {state.inflight_bytes} bytes in flight or stored, and "
                           f"{nbytes} more would take it", "tenant_max_inflight_bytes", tenant.max_inflight_bytes),
                self._retry_after(state.active.values(), excess),
            )
        excess = self._inflight_bytes + nbytes - self.max_inflight_bytes
        if excess > 0:
            raise QueueFull(
                over_limit(f"the server has {self._inflight_bytes} bytes in flight or stored (all tenants), and "
                           f"{nbytes} more would take it", "max_inflight_bytes", self.max_inflight_bytes),
                self._retry_after(self._jobs.values(), excess), scope="server",
            )

    def _admit(self, tenant: Tenant, nbytes: int, fn: Job, deadline, loop,
               request_bytes: int | None = None, reservation: Reservation | None = None) -> _Job:
        if isinstance(nbytes, bool) or not isinstance(nbytes, int) or nbytes < 0:
            raise ValueError(f"nbytes must be a non-negative integer, got {nbytes!r}")
        if not self._accepting:
            raise ShuttingDown("server is shutting down")
        # max_request_bytes bounds the request itself; nbytes may also count what the request
        # will produce (a gradient), which only the in-flight budgets bound.
        size = nbytes if request_bytes is None else request_bytes
        if size > tenant.max_request_bytes:
            raise PayloadTooLarge(over_limit(f"request of {size} bytes", "max_request_bytes",
                                             tenant.max_request_bytes))
        # A request that can never fit the byte budgets is 413, not an endless stream of 429s.
        if nbytes > min(tenant.max_inflight_bytes, self.max_inflight_bytes):
            which, limit = (("tenant_max_inflight_bytes", tenant.max_inflight_bytes)
                            if tenant.max_inflight_bytes <= self.max_inflight_bytes
                            else ("max_inflight_bytes", self.max_inflight_bytes))
            raise PayloadTooLarge(over_limit(
                f"request needing {nbytes} bytes of server memory in flight (its body and what the server "
                "allocates to answer it, such as a gradient it sends back)", which, limit))
        with self._lock:
            if not self._accepting:
                raise ShuttingDown("server is shutting down")
            state = self._tenant_state(tenant.name)
            if len(state.active) >= tenant.max_queued:
                raise QueueFull(
                    over_limit(f"tenant {tenant.name!r} has {len(state.active)} requests queued or running",
                               "max_queued", tenant.max_queued),
                    self._retry_after(state.active.values(), 0),
                )
            held = 0
            if reservation is not None and reservation.nbytes:
                if reservation.tenant.name != tenant.name:
                    raise ValueError("a reservation is for the tenant that made it")
                held = min(reservation.nbytes, nbytes)
            self._check_budgets(tenant, state, nbytes - held)
            worker = min(self._workers, key=lambda w: (w.queued_bytes, w.queued_jobs, w.index))
            job = _Job(next(self._counter), tenant, nbytes, fn, deadline, loop, worker, self.clock())
            self._jobs[job.seq] = job
            state.active[job.seq] = job
            state.inflight_bytes += nbytes - held
            self._inflight_bytes += nbytes - held
            if reservation is not None:
                reservation.nbytes -= held     # now the job's, back to the reservation at its end
                reservation.job_active = True
                job.keep = reservation
            worker.enqueue(job)
            self._publish(state)
            return job

    def _retry_after(self, jobs: Iterable[_Job], bytes_needed: int) -> float:
        # The oldest jobs finish first; count how many must finish to free enough, then assume
        # they run `len(workers)` at a time at the recently observed per-job service time.
        count = freed = 0
        for job in jobs:
            count += 1
            freed += job.nbytes
            if freed >= bytes_needed:
                break
        rounds = math.ceil(max(count, 1) / len(self._workers))
        return min(MAX_RETRY_AFTER_S, max(MIN_RETRY_AFTER_S, rounds * self._ewma_job_s))

    # -- completion (any thread) -----------------------------------------------------------------

    def _expire(self, job: _Job) -> None:
        # Loop thread: the caller gets 504 at its deadline even if a step is still running.
        if not job.future.done():
            job.future.set_exception(DeadlineExceeded(_deadline_message(job)))
        self._abandon(job, "deadline")

    def _queue_timeout(self, job: _Job) -> None:
        # Loop thread: the tenant's queue policy rejects work that waited too long to start; work
        # that started runs to the end.
        with self._lock:
            if job.state is not _QUEUED or job.abandoned:
                return
            job.abandoned = True
            job.abandon_outcome = "deadline"
            after = self._finish_locked(job, "deadline")
        if not job.future.done():
            job.future.set_exception(_queue_timeout_error(job))
        _run_all(after)

    def _abandon(self, job: _Job, outcome: str) -> None:
        """The caller is gone: drop the job if queued, else have its worker close it."""
        if not job.future.done():
            job.future.cancel()
        with self._lock:
            if job.state is _DONE or job.abandoned:
                return
            job.abandoned = True
            job.abandon_outcome = outcome
            if job.state is not _QUEUED:
                job.worker.reap.append(job)
                job.worker.cond.notify()
                return
            after = self._finish_locked(job, outcome)
        _run_all(after)

    def _finish(
        self, job: _Job, outcome: str, *, result: Any = None, exc: BaseException | None = None,
        pending: list | None = None,
    ) -> None:
        """End a job and hand its caller the result or the exception. `pending`: collect the
        deliveries for `_deliver` instead (a batch's, one wake-up of each event loop)."""
        with self._lock:
            if job.state is _DONE:
                return
            after = self._finish_locked(job, outcome)
            deliver = not job.abandoned  # else nobody is waiting and the result is dropped
        if deliver:

            def resolve() -> None:
                if job.future.done():
                    return
                if exc is not None:
                    job.future.set_exception(exc)
                else:
                    job.future.set_result(result)

            if pending is None:
                _call_soon(job.loop, resolve)
            else:
                pending.append((job.loop, resolve))
        # Signalled after the result, so drain() returns after the callers have their results.
        if pending is None:
            _run_all(after)
        else:
            pending.extend((None, callback) for callback in after)

    @staticmethod
    def _deliver(pending: list) -> None:
        """Run what `_finish(pending=...)` collected: the results as one callback per event loop
        (one thread-safe wake-up each, not one per job), then the rest, in order."""
        by_loop: dict = {}
        for loop, callback in pending:
            if loop is not None:
                by_loop.setdefault(loop, []).append(callback)
        for loop, callbacks in by_loop.items():
            _call_soon(loop, _run_all, callbacks)
        _run_all([callback for loop, callback in pending if loop is None])

    def _finish_locked(self, job: _Job, outcome: str) -> list[Callable[[], None]]:
        """Release the job's accounting; returns what to call once the lock is let go: the
        reservation's after-job callback, and the drain() waiters to wake if now idle."""
        now = self.clock()
        ran_to_end = job.started_at is not None and outcome in ("ok", "error")
        if ran_to_end:
            service = now - job.started_at
            self._ewma_job_s += _EWMA_ALPHA * (service - self._ewma_job_s)
        job.state = _DONE
        job.finished_at = now
        # Drop the request's arrays and device buffers now, not when the last reference goes.
        job.work = job.gen = None
        job.worker.remove(job)
        state = self._tenants[job.tenant.name]
        del state.active[job.seq]
        del self._jobs[job.seq]
        after: list[Callable[[], None]] = []
        keep = job.keep
        if keep is not None:
            keep.job_active = False
        if keep is not None and not keep.closed:
            keep.nbytes += job.nbytes      # still in memory until the response is out
        else:
            state.inflight_bytes -= job.nbytes
            self._inflight_bytes -= job.nbytes
            if keep is not None and keep.after_job is not None:
                after.append(keep.after_job)    # the response went first: the request's memory now
                keep.after_job = None
        state.outcomes[outcome] += 1
        self._publish(state)
        if not self._jobs:
            after.extend(functools.partial(_call_soon, loop, _set_done, waiter)
                         for loop, waiter in self._idle_waiters)
        return after

    # -- bookkeeping ---------------------------------------------------------------------------

    def _tenant_state(self, name: str) -> _TenantState:
        state = self._tenants.get(name)
        if state is None:
            state = self._tenants[name] = _TenantState(name)
            if self.metrics is not None:
                self.metrics.add_tenant(name)
                state.gauges = (self.metrics.queue_depth(name), self.metrics.inflight_bytes(name))
        return state

    def _publish(self, state: _TenantState) -> None:
        if state.gauges is not None:
            depth, inflight = state.gauges
            depth.set(len(state.active))
            inflight.set(state.inflight_bytes)

    def _timings(self, job: _Job) -> dict:
        with self._lock:
            if job.started_at is not None:
                queue_s = job.started_at - job.submitted_at
            else:
                queue_s = (job.finished_at or self.clock()) - job.submitted_at
            return {
                "queue_s": queue_s,
                "compute_s": job.compute_s,
                "steps": job.steps,
                "device": job.worker.name,
            }

    def stats(self) -> dict:
        """Snapshot for /v1/status and the status page."""
        with self._lock:
            tenants = {}
            for name, state in self._tenants.items():
                tenant = self.registry.get(name)
                tenants[name] = {
                    "weight": tenant.weight if tenant is not None else None,
                    "priority": tenant.priority if tenant is not None else None,
                    "queue_depth": len(state.active),
                    "inflight_bytes": state.inflight_bytes,
                    "stored_bytes": state.stored_bytes,
                    "completed": state.outcomes["ok"],
                    "failed": state.outcomes["error"],
                    "cancelled": state.outcomes["cancelled"],
                    "deadline_exceeded": state.outcomes["deadline"],
                }
            return {
                "accepting": self._accepting,
                "inflight_bytes": self._inflight_bytes,
                "stored_bytes": self._stored_bytes,
                "max_inflight_bytes": self.max_inflight_bytes,
                "queued_jobs": len(self._jobs),
                "devices": [
                    {
                        "name": w.name,
                        "busy_s": w.busy_s,
                        "steps": w.steps,
                        "queued_jobs": w.queued_jobs,
                        "queued_bytes": w.queued_bytes,
                        "backlogged_tenants": sorted(w.queues),
                    }
                    for w in self._workers
                ],
                "tenants": tenants,
            }


def _call_soon(loop: asyncio.AbstractEventLoop, callback: Callable, *args: Any) -> None:
    try:
        loop.call_soon_threadsafe(callback, *args)
    except RuntimeError:  # that loop is closed: nobody left to tell
        pass


def _run_all(callbacks: list[Callable[[], None]]) -> None:
    for callback in callbacks:
        try:
            callback()
        except Exception:   # one owner's failure must not keep the others (or drain) waiting
            log.exception("callback at the end of a job failed")


def _set_done(fut: asyncio.Future) -> None:
    if not fut.done():
        fut.set_result(None)
