"""Scheduler and metrics tests with pure-Python jobs (no OpenCL).

Timing-sensitive properties are checked on the order in which steps ran (deterministic given
the virtual-time rules) and, where wall time is used, only through wide relative margins.
"""

import asyncio
import itertools
import statistics
import threading
import time

import pytest

from clce_server.metrics import Metrics
from clce_wire.protocol import ERROR_CODES
from clce_server.rails.scheduler import (
    QueueTimeout,
    AdmissionError,
    DeadlineExceeded,
    PayloadTooLarge,
    QueueFull,
    SchedulerError,
    ShuttingDown,
)
from tests.support.scheduler_jobs import GATE_TIMEOUT, gated, holding, queued, run, steps_job, tenant, wait_until


# -- results and errors -----------------------------------------------------------------------


def test_result_device_and_timings(make):
    sched = make(devices=["gpu0"])
    t = sched.registry.tenants[0]

    async def main():
        timings = {}
        result = await sched.submit(t, 10, steps_job(4, dt=0.25, tag="x"), timings=timings)
        return result, timings

    result, timings = run(main())
    assert result == ("x", "gpu0")
    assert timings["steps"] == 5  # four yields plus the final segment that returns
    assert timings["device"] == "gpu0"
    # Yielded device seconds are trusted; the final segment adds only its (tiny) wall time.
    assert 1.0 <= timings["compute_s"] < 1.5
    assert 0.0 <= timings["queue_s"] < 5.0
    stats = sched.stats()
    assert stats["devices"][0]["busy_s"] == pytest.approx(timings["compute_s"])
    assert stats["tenants"]["default"]["completed"] == 1
    assert stats["inflight_bytes"] == 0


def test_exceptions_propagate_unchanged_and_worker_survives(make):
    sched = make()
    t = sched.registry.tenants[0]
    error = IndexError("Target 7 is out of bounds.")

    def failing_mid(device):
        yield 0.001
        raise error

    def failing_first(device):
        raise ValueError("bad reduction")
        yield  # pragma: no cover - makes this a generator function

    def plain(device):
        return 42

    def interrupting(device):
        yield 0.001
        raise KeyboardInterrupt

    def bad_yield(device):
        yield "not a number"
        yield float("nan")
        return "ok"

    async def main():
        with pytest.raises(IndexError) as info:
            await sched.submit(t, 0, failing_mid)
        assert info.value is error
        with pytest.raises(ValueError, match="bad reduction"):
            await sched.submit(t, 0, failing_first)
        # A KeyboardInterrupt inside a job must not tear down the caller's event loop.
        with pytest.raises(RuntimeError, match="KeyboardInterrupt"):
            await sched.submit(t, 0, interrupting)
        assert await sched.submit(t, 0, plain) == 42
        assert await sched.submit(t, 0, bad_yield) == "ok"

    run(main())
    counts = sched.stats()["tenants"]["default"]
    assert (counts["completed"], counts["failed"]) == (2, 3)
    assert all(w.thread.is_alive() for w in sched._workers)


def test_fifo_within_tenant(make):
    sched = make()
    t = sched.registry.tenants[0]
    gate = threading.Event()
    log = []

    async def main():
        first = asyncio.create_task(sched.submit(t, 0, gated(gate, steps=3, log=log, tag=0)))
        rest = [
            asyncio.create_task(sched.submit(t, 0, steps_job(3, log=log, tag=k)))
            for k in range(1, 10)
        ]
        await wait_until(lambda: queued(sched) == 10)
        gate.set()
        return await asyncio.gather(first, *rest)

    results = run(main())
    assert [r if isinstance(r, int) else r[0] for r in results] == list(range(10))
    # Only a tenant's head job runs: no interleaving between its own jobs.
    assert [(tag, i) for tag, i, _ in log] == [(k, i) for k in range(10) for i in range(3)]


# -- fairness ---------------------------------------------------------------------------------


def _flood_then_small_jobs(make):
    """Tenant A floods the device (12 jobs of 10 steps, queued first), tenant B then sends 10
    one-step jobs. Returns the step log, the completion times and the start time."""
    sched = make(tenants=[tenant("a"), tenant("b")])
    a, b = sched.registry.get("a"), sched.registry.get("b")
    n_a, steps_a, n_b, step_s = 12, 10, 10, 0.002
    gate = threading.Event()
    log = []
    done = {}

    async def timed(key, coro):
        await coro
        done[key] = time.monotonic()

    def submit(who, k, job):
        t = a if who == "a" else b
        return asyncio.create_task(timed((who, k), sched.submit(t, 0, job)))

    async def main():
        tasks = [submit("a", 0, gated(gate, steps=steps_a, log=log, tag="a", dt=step_s))]
        for k in range(1, n_a):
            job = steps_job(steps_a, dt=step_s, sleep=step_s, log=log, tag="a")
            tasks.append(submit("a", k, job))
        for k in range(n_b):
            tasks.append(submit("b", k, steps_job(1, dt=step_s, sleep=step_s, log=log, tag="b")))
        await wait_until(lambda: queued(sched) == n_a + n_b)
        start = time.monotonic()
        gate.set()
        await asyncio.gather(*tasks)
        return start

    return log, done, run(main())


def test_small_jobs_are_not_stuck_behind_a_flood(make):
    log, _, _ = _flood_then_small_jobs(make)
    n_a, steps_a, n_b = 12, 10, 10
    # Step order: B was queued behind all of A's work, yet its steps alternate with A's.
    order = [tag for tag, _, _ in log]
    last_b = max(i for i, tag in enumerate(order) if tag == "b")
    assert last_b <= 3 * n_b + 3, order[: last_b + 1]
    # FIFO would have run all of A's steps first.
    assert last_b < n_a * steps_a / 2


@pytest.mark.slow   # wall-clock latencies on a shared machine: the step order above is the proof
def test_small_jobs_wait_a_fraction_of_a_flood(make):
    log, done, start = _flood_then_small_jobs(make)
    n_a, steps_a, n_b = 12, 10, 10
    a_drain = max(v for (who, _), v in done.items() if who == "a") - start
    b_latencies = [v - start for (who, _), v in done.items() if who == "b"]
    b_mean = statistics.mean(b_latencies)
    assert b_mean < 0.35 * a_drain, (b_mean, a_drain)
    # FIFO reference from the same counts: every B job waits for all of A's steps.
    step_wall = a_drain / (n_a * steps_a + n_b)
    fifo_b_mean = step_wall * (n_a * steps_a + (n_b + 1) / 2)
    assert b_mean < 0.3 * fifo_b_mean, (b_mean, fifo_b_mean)


def _interleaved_log(make, tenants, jobs_per_tenant, steps_per_job, dt_of):
    """All tenants' jobs queued behind a gate, then run; returns the tag of each step run."""
    sched = make(tenants=tenants)
    gate = threading.Event()
    log = []

    async def main():
        first = tenants[0]
        job = gated(gate, steps=steps_per_job, log=log, tag=first.name, dt=dt_of[first.name])
        tasks = [asyncio.create_task(sched.submit(first, 0, job))]
        for t in tenants:
            for _ in range(jobs_per_tenant - (t is first)):
                job = steps_job(steps_per_job, dt=dt_of[t.name], log=log, tag=t.name)
                tasks.append(asyncio.create_task(sched.submit(t, 0, job)))
        await wait_until(lambda: queued(sched) == jobs_per_tenant * len(tenants))
        gate.set()
        await asyncio.gather(*tasks)

    run(main())
    return [tag for tag, _, _ in log]


def test_weighted_share_under_saturation(make):
    order = _interleaved_log(
        make, [tenant("heavy", weight=2), tenant("light", weight=1)], 6, 30,
        {"heavy": 0.001, "light": 0.001},
    )
    window = order[:150]  # both tenants are still backlogged here (180 steps each)
    ratio = window.count("heavy") / window.count("light")
    assert 1.6 <= ratio <= 2.5, ratio


def test_charged_by_device_seconds_not_steps(make):
    order = _interleaved_log(
        make, [tenant("slow"), tenant("fast")], 6, 30, {"slow": 0.004, "fast": 0.001}
    )
    window = order[:100]
    ratio = window.count("fast") / window.count("slow")
    assert 3.0 <= ratio <= 5.0, ratio


def test_idle_time_is_not_banked(make):
    sched = make(tenants=[tenant("a"), tenant("b")])
    a, b = sched.registry.get("a"), sched.registry.get("b")
    reached, go = threading.Event(), threading.Event()
    log = []

    def long_a(device):
        for i in range(120):
            if i == 60:
                reached.set()
                assert go.wait(GATE_TIMEOUT)
            log.append("a")
            yield 0.001
        return "a"

    async def main():
        task_a = asyncio.create_task(sched.submit(a, 0, long_a))
        await wait_until(reached.is_set)
        task_b = asyncio.create_task(sched.submit(b, 0, steps_job(30, dt=0.001, tag="b", log=log)))
        await wait_until(lambda: queued(sched) == 2)
        go.set()
        await asyncio.gather(task_a, task_b)

    run(main())
    tags = [x if isinstance(x, str) else x[0] for x in log]
    # B arrived after A had used 60 steps alone: it must not get those 60 steps as a burst.
    longest_b_run = max(len(list(g)) for k, g in itertools.groupby(tags) if k == "b")
    assert longest_b_run <= 2, tags
    assert tags[:60] == ["a"] * 60


# -- admission --------------------------------------------------------------------------------


def test_payload_too_large(make):
    t = tenant("a", max_request_bytes=1000, max_inflight_bytes=5000)
    sched = make(tenants=[t], max_inflight_bytes=2000)
    ran = []

    def job(device):
        ran.append(1)
        yield 0.0

    async def main():
        with pytest.raises(PayloadTooLarge) as info:
            await sched.submit(t, 1001, job)
        assert (ERROR_CODES[info.value.code][0], info.value.code) == (413, "payload_too_large")
        assert isinstance(info.value, AdmissionError)
        # Fits the request limit but could never fit the server's in-flight budget.
        big = tenant("b", max_request_bytes=10_000, max_inflight_bytes=10_000)
        with pytest.raises(PayloadTooLarge):
            await sched.submit(big, 3000, job)
        assert await sched.submit(t, 1000, steps_job(1)) is not None

    run(main())
    assert ran == []
    assert sched.stats()["inflight_bytes"] == 0


def test_queue_full_when_max_queued_reached(make):
    a, b = tenant("a", max_queued=2), tenant("b", max_queued=2)
    metrics = Metrics()
    sched = make(tenants=[a, b], metrics=metrics)
    gate = threading.Event()
    ran = []

    def never(device):
        ran.append(1)
        yield 0.0

    async def main():
        tasks = [asyncio.create_task(sched.submit(a, 10, gated(gate))) for _ in range(2)]
        await wait_until(lambda: queued(sched) == 2)
        assert metrics.registry.get_sample_value("clce_queue_depth", {"tenant": "a"}) == 2
        with pytest.raises(QueueFull) as info:
            await sched.submit(a, 10, never)
        assert (ERROR_CODES[info.value.code][0], info.value.code) == (429, "queue_full")
        assert 0 < info.value.retry_after <= 60
        # Another tenant's queue is independent.
        tasks.append(asyncio.create_task(sched.submit(b, 10, steps_job(1, tag="b"))))
        await wait_until(lambda: queued(sched) == 3)
        gate.set()
        await asyncio.gather(*tasks)
        # Slots are freed once jobs finish.
        assert (await sched.submit(a, 10, steps_job(1, tag="again")))[0] == "again"

    run(main())
    assert ran == []
    stats = sched.stats()
    assert stats["inflight_bytes"] == 0 and stats["queued_jobs"] == 0
    for name in ("a", "b"):
        assert stats["tenants"][name]["queue_depth"] == 0
        assert metrics.registry.get_sample_value("clce_queue_depth", {"tenant": name}) == 0
        assert metrics.registry.get_sample_value("clce_inflight_bytes", {"tenant": name}) == 0


def test_queue_full_on_byte_budgets(make):
    a = tenant("a", max_request_bytes=100, max_inflight_bytes=100)
    b = tenant("b", max_request_bytes=100, max_inflight_bytes=100)
    sched = make(tenants=[a, b], max_inflight_bytes=150)
    gate = threading.Event()

    async def main():
        tasks = [asyncio.create_task(sched.submit(a, 60, gated(gate)))]
        await wait_until(lambda: queued(sched) == 1)
        with pytest.raises(QueueFull, match="max_inflight_bytes") as info:
            await sched.submit(a, 50, steps_job(1))  # tenant budget: 60 + 50 > 100
        assert info.value.retry_after > 0
        tasks.append(asyncio.create_task(sched.submit(a, 40, steps_job(1))))  # exactly 100
        await wait_until(lambda: queued(sched) == 2)
        assert sched.stats()["tenants"]["a"]["inflight_bytes"] == 100
        with pytest.raises(QueueFull, match="server") as info:
            await sched.submit(b, 60, steps_job(1))  # global budget: 100 + 60 > 150
        assert info.value.retry_after > 0
        tasks.append(asyncio.create_task(sched.submit(b, 50, steps_job(1))))  # exactly 150
        await wait_until(lambda: queued(sched) == 3)
        assert sched.stats()["inflight_bytes"] == 150
        gate.set()
        await asyncio.gather(*tasks)

    run(main())
    stats = sched.stats()
    assert stats["inflight_bytes"] == 0
    assert stats["tenants"]["a"]["inflight_bytes"] == stats["tenants"]["b"]["inflight_bytes"] == 0


def test_retry_after_grows_with_backlog(make):
    a = tenant("a", max_request_bytes=1000, max_inflight_bytes=1000)
    sched = make(tenants=[a], max_inflight_bytes=10_000)
    gate = threading.Event()

    async def main():
        tasks = [asyncio.create_task(sched.submit(a, 100, gated(gate)))]
        for _ in range(9):
            tasks.append(asyncio.create_task(sched.submit(a, 100, steps_job(1))))
        await wait_until(lambda: queued(sched) == 10)
        with pytest.raises(QueueFull) as small:
            await sched.submit(a, 10, steps_job(1))  # the oldest job must finish first
        with pytest.raises(QueueFull) as large:
            await sched.submit(a, 1000, steps_job(1))  # all ten must finish first
        gate.set()
        await asyncio.gather(*tasks)
        return small.value.retry_after, large.value.retry_after

    small, large = run(main())
    assert small > 0
    assert large == pytest.approx(10 * small)


def test_shutting_down_rejects_with_503(make):
    sched = make()
    t = sched.registry.tenants[0]

    async def main():
        assert await sched.drain(1.0) is True
        with pytest.raises(ShuttingDown) as info:
            await sched.submit(t, 0, steps_job(1))
        assert (ERROR_CODES[info.value.code][0], info.value.code) == (503, "not_ready")

    run(main())


# -- cancellation and deadlines ---------------------------------------------------------------


def test_cancel_before_start_never_runs(make):
    metrics = Metrics()
    sched = make(tenants=[tenant("a"), tenant("b")], metrics=metrics)
    a, b = sched.registry.get("a"), sched.registry.get("b")
    gate = threading.Event()
    ran = []

    def victim(device):
        ran.append(1)
        yield 0.001
        return "victim"

    async def main():
        blocker = asyncio.create_task(sched.submit(a, 1, gated(gate)))
        doomed = asyncio.create_task(sched.submit(b, 500, victim))
        await wait_until(lambda: queued(sched) == 2)
        doomed.cancel()
        with pytest.raises(asyncio.CancelledError):
            await doomed
        # Dropped at once: its bytes and queue slot are released before the device frees up.
        assert sched.stats()["tenants"]["b"]["inflight_bytes"] == 0
        assert metrics.registry.get_sample_value("clce_queue_depth", {"tenant": "b"}) == 0
        gate.set()
        assert await blocker is None
        assert (await sched.submit(b, 0, steps_job(1, tag="after")))[0] == "after"

    run(main())
    assert ran == []
    assert sched.stats()["tenants"]["b"]["cancelled"] == 1


def test_cancel_mid_way_closes_generator(make):
    sched = make(tenants=[tenant("a"), tenant("b")])
    a, b = sched.registry.get("a"), sched.registry.get("b")
    steps = []
    closed = threading.Event()

    def endless(device):
        try:
            while True:
                time.sleep(0.001)
                steps.append(1)
                yield 0.001
        finally:
            closed.set()

    async def main():
        victim = asyncio.create_task(sched.submit(a, 100, endless))
        other = asyncio.create_task(sched.submit(b, 100, steps_job(20, sleep=0.001, tag="b")))
        await wait_until(lambda: len(steps) >= 5)
        victim.cancel()
        with pytest.raises(asyncio.CancelledError):
            await victim
        await wait_until(closed.is_set)
        count = len(steps)
        assert (await other)[0] == "b"
        await asyncio.sleep(0.02)
        return count

    count = run(main())
    assert len(steps) == count  # nothing ran after close
    stats = sched.stats()
    assert stats["tenants"]["a"]["cancelled"] == 1
    assert stats["tenants"]["b"]["completed"] == 1
    assert stats["inflight_bytes"] == 0


def test_deadline_before_start(make):
    sched = make(tenants=[tenant("a"), tenant("b")])
    a, b = sched.registry.get("a"), sched.registry.get("b")
    gate = threading.Event()
    ran = []

    def never(device):
        ran.append(1)
        yield 0.0

    async def main():
        blocker = asyncio.create_task(sched.submit(a, 0, gated(gate)))
        await wait_until(lambda: queued(sched) == 1)
        timings = {}
        with pytest.raises(DeadlineExceeded) as info:
            await sched.submit(b, 0, never, deadline=time.monotonic() + 0.05, timings=timings)
        assert (ERROR_CODES[info.value.code][0], info.value.code) == (504, "deadline_exceeded")
        assert timings["steps"] == 0 and timings["compute_s"] == 0.0
        with pytest.raises(DeadlineExceeded):  # already past: refused outright
            await sched.submit(b, 0, never, deadline=time.monotonic() - 1)
        gate.set()
        await blocker

    run(main())
    assert ran == []
    stats = sched.stats()
    assert stats["tenants"]["b"]["deadline_exceeded"] == 1
    assert stats["queued_jobs"] == 0


def test_deadline_mid_way_stops_job(make):
    sched = make()
    t = sched.registry.tenants[0]
    closed = threading.Event()
    steps = []

    def endless(device):
        try:
            while True:
                time.sleep(0.002)
                steps.append(1)
                yield 0.002
        finally:
            closed.set()

    async def main():
        with pytest.raises(DeadlineExceeded):
            await sched.submit(t, 10, endless, deadline=time.monotonic() + 0.1)
        await wait_until(closed.is_set)
        # The device is free again for the next job.
        assert (await sched.submit(t, 0, steps_job(1, tag="next")))[0] == "next"

    run(main())
    assert len(steps) >= 1
    assert sched.stats()["inflight_bytes"] == 0


# -- devices ----------------------------------------------------------------------------------


def test_two_devices_share_the_work(make):
    sched = make(devices=["gpu0", "gpu1"])
    t = sched.registry.tenants[0]
    log = []

    async def main():
        jobs = [
            sched.submit(t, 10, steps_job(5, sleep=0.001, log=log, tag=k)) for k in range(20)
        ]
        return await asyncio.gather(*jobs)

    results = run(main())
    per_job = {}
    for tag, _, device in log:
        per_job.setdefault(tag, set()).add(device)
    assert all(len(devices) == 1 for devices in per_job.values())  # a job stays on its device
    used = [device for _, device in results]
    assert {"gpu0", "gpu1"} == set(used)
    assert min(used.count("gpu0"), used.count("gpu1")) >= 5
    assert all(d["busy_s"] > 0 for d in sched.stats()["devices"])


def test_least_loaded_device_by_bytes(make):
    sched = make(devices=["x", "x"])
    assert [d["name"] for d in sched.stats()["devices"]] == ["x", "x#1"]
    t = sched.registry.tenants[0]
    gate = threading.Event()

    async def main():
        timings = [{} for _ in range(4)]
        tasks = [asyncio.create_task(sched.submit(t, 1000, gated(gate), timings=timings[0]))]
        await wait_until(lambda: queued(sched) == 1)
        for i in range(1, 4):  # small jobs avoid the device holding the big one
            tasks.append(asyncio.create_task(sched.submit(t, 10, gated(gate), timings=timings[i])))
        await wait_until(lambda: queued(sched) == 4)
        gate.set()
        await asyncio.gather(*tasks)
        return [tm["device"] for tm in timings]

    assert run(main()) == ["x", "x#1", "x#1", "x#1"]


# -- drain and shutdown -----------------------------------------------------------------------


def test_check_health_names_a_stopped_device_worker(make):
    sched = make(devices=["gpu0", "gpu1"])
    sched.check_health()                      # not started yet: nothing to say
    sched.start()
    sched.check_health()
    worker = sched._workers[1]
    with worker.cond:                         # its thread exits, the scheduler still runs
        worker.stopping = True
        worker.cond.notify()
    worker.thread.join(GATE_TIMEOUT)
    with pytest.raises(RuntimeError, match="gpu1"):
        sched.check_health()
    sched.shutdown(5.0)
    sched.check_health()                      # shut down on purpose: healthy enough to say nothing


def test_drain_waits_for_running_jobs(make):
    sched = make()
    t = sched.registry.tenants[0]
    gate = threading.Event()

    async def main():
        running = asyncio.create_task(sched.submit(t, 0, gated(gate, tag="done")))
        await wait_until(lambda: queued(sched) == 1)
        assert await sched.drain(0.05) is False  # still running
        drained = asyncio.create_task(sched.drain(5.0))
        await asyncio.sleep(0.05)
        assert not drained.done()
        assert not sched.accepting
        with pytest.raises(ShuttingDown):
            await sched.submit(t, 0, steps_job(1))
        gate.set()
        assert await drained is True
        assert await running == "done"

    run(main())
    assert sched.shutdown(timeout=5.0)


def test_shutdown_fails_pending_jobs(make):
    sched = make()
    t = sched.registry.tenants[0]
    started, gate, closed = threading.Event(), threading.Event(), threading.Event()

    def held(device):
        try:
            started.set()
            assert gate.wait(GATE_TIMEOUT)
            yield 0.001
            yield 0.001
        finally:
            closed.set()

    async def main():
        first = asyncio.create_task(sched.submit(t, 0, held))
        second = asyncio.create_task(sched.submit(t, 0, steps_job(1)))
        await wait_until(lambda: queued(sched) == 2 and started.is_set())
        stopper = threading.Thread(target=sched.shutdown, kwargs={"timeout": 5.0})
        stopper.start()
        await wait_until(lambda: not sched.accepting)
        gate.set()
        results = await asyncio.gather(first, second, return_exceptions=True)
        await asyncio.to_thread(stopper.join)
        return results

    results = run(main())
    assert all(isinstance(r, ShuttingDown) for r in results), results
    assert closed.is_set()
    assert not any(w.thread.is_alive() for w in sched._workers)


# -- metrics ----------------------------------------------------------------------------------


def test_scheduler_updates_metrics(make):
    metrics = Metrics(version="9.9", instance="test-host")
    sched = make(devices=["gpu0"], tenants=[tenant("a")], metrics=metrics)
    a = sched.registry.get("a")
    gate = threading.Event()
    get = metrics.registry.get_sample_value

    async def main():
        tasks = [asyncio.create_task(sched.submit(a, 300, gated(gate))) for _ in range(3)]
        await wait_until(lambda: queued(sched) == 3)
        assert get("clce_queue_depth", {"tenant": "a"}) == 3
        assert get("clce_inflight_bytes", {"tenant": "a"}) == 900
        gate.set()
        await asyncio.gather(*tasks)
        await sched.submit(a, 0, steps_job(2, dt=0.5))

    run(main())
    assert get("clce_queue_depth", {"tenant": "a"}) == 0
    assert get("clce_inflight_bytes", {"tenant": "a"}) == 0
    busy = get("clce_device_busy_seconds_total", {"device": "gpu0"})
    assert busy == pytest.approx(sched.stats()["devices"][0]["busy_s"])
    assert busy >= 1.0
    assert get("clce_build_info", {"version": "9.9", "instance": "test-host"}) == 1


def test_observe_request_and_render():
    metrics = Metrics(tenants=["train-a"])
    get = metrics.registry.get_sample_value
    # Series exist at zero before the first request.
    assert get("clce_requests_total", {"tenant": "train-a", "outcome": "ok"}) == 0
    metrics.observe_request("train-a", "ok", 0.02, 0.001, 0.015, 4096, 1024, 128)
    metrics.observe_request("train-a", "ok", 0.5, 0.1, 0.3, 100, 10, 2)
    metrics.observe_request("train-a", "rejected", 0.0002)
    metrics.observe_request("key-train-a-secret", "unauthorized", 0.0001)
    assert get("clce_requests_total", {"tenant": "train-a", "outcome": "ok"}) == 2
    assert get("clce_requests_total", {"tenant": "train-a", "outcome": "rejected"}) == 1
    # Unregistered names collapse to "unknown": no cardinality blow-up, no keys in labels.
    assert get("clce_requests_total", {"tenant": "unknown", "outcome": "unauthorized"}) == 1
    assert get("clce_request_duration_seconds_count", {"tenant": "train-a"}) == 3
    assert get("clce_queue_duration_seconds_count", {"tenant": "train-a"}) == 2
    assert get("clce_compute_duration_seconds_sum", {"tenant": "train-a"}) == pytest.approx(0.315)
    assert get("clce_request_duration_seconds_bucket", {"tenant": "train-a", "le": "0.0001"}) == 0
    assert get("clce_request_duration_seconds_bucket", {"tenant": "train-a", "le": "0.00025"}) == 1
    assert get("clce_request_duration_seconds_bucket", {"tenant": "train-a", "le": "60.0"}) == 3
    assert get("clce_request_bytes_total", {"tenant": "train-a"}) == 4196
    assert get("clce_response_bytes_total", {"tenant": "train-a"}) == 1034
    assert get("clce_rows_total", {"tenant": "train-a"}) == 130
    with pytest.raises(ValueError, match="outcome"):
        metrics.observe_request("train-a", "weird")

    body, content_type = metrics.render()
    text = body.decode()
    assert content_type.startswith("text/plain")
    for name in (
        "clce_requests_total", "clce_request_duration_seconds", "clce_queue_duration_seconds",
        "clce_compute_duration_seconds", "clce_request_bytes_total", "clce_response_bytes_total",
        "clce_inflight_bytes", "clce_queue_depth", "clce_device_busy_seconds_total",
        "clce_rows_total", "clce_build_info",
    ):
        assert f"\n{name}" in text or text.startswith(name) or f"# TYPE {name}" in text, name
    assert "secret" not in text


def test_metrics_instances_are_independent():
    one, two = Metrics(), Metrics()
    one.observe_request("x", "ok", 0.1)
    labels = {"tenant": "x", "outcome": "ok"}
    assert one.registry.get_sample_value("clce_requests_total", labels) == 1
    assert two.registry.get_sample_value("clce_requests_total", labels) is None


def test_error_hierarchy():
    for cls, status in [
        (PayloadTooLarge, 413), (QueueFull, 429), (ShuttingDown, 503), (DeadlineExceeded, 504),
    ]:
        assert issubclass(cls, SchedulerError) and ERROR_CODES[cls.code][0] == status
    assert not issubclass(DeadlineExceeded, AdmissionError)


# -- priority levels and queue policy (Triton's priority_levels and queue timeout) ---------------


def test_a_higher_priority_level_is_served_first_whatever_the_weights(make):
    hi = tenant("hi", weight=1.0, priority=1)
    lo = tenant("lo", weight=100.0, priority=2)
    sched = make(tenants=[hi, lo])
    gate, log = threading.Event(), []

    async def main():
        started = threading.Event()
        tasks = [asyncio.create_task(sched.submit(lo, 0, holding(gate, started)))]
        await wait_until(started.is_set)
        for k in range(3):    # lo queues first, and weighs 100x more
            tasks.append(asyncio.create_task(sched.submit(lo, 0, steps_job(2, log=log, tag=f"lo{k}"))))
        for k in range(3):
            tasks.append(asyncio.create_task(sched.submit(hi, 0, steps_job(2, log=log, tag=f"hi{k}"))))
        await wait_until(lambda: queued(sched) == 7, what=lambda: (queued(sched), log))
        gate.set()
        await asyncio.gather(*tasks)

    run(main())
    order = [tag for tag, _, _ in log]
    assert order[:6] == ["hi0", "hi0", "hi1", "hi1", "hi2", "hi2"], order
    assert sorted(order[6:]) == sorted(["lo0", "lo0", "lo1", "lo1", "lo2", "lo2"])


def test_weights_share_the_device_within_a_level(make):
    a = tenant("a", weight=3.0, priority=2)
    b = tenant("b", weight=1.0, priority=2)
    sched = make(tenants=[a, b])
    gate, log = threading.Event(), []

    async def main():
        started = threading.Event()
        blocker = asyncio.create_task(sched.submit(a, 0, holding(gate, started)))
        await wait_until(started.is_set)
        jobs = [asyncio.create_task(sched.submit(t, 0, steps_job(40, dt=0.01, log=log, tag=t.name))) for t in (a, b)]
        await wait_until(lambda: queued(sched) == 3)
        gate.set()
        await asyncio.gather(blocker, *jobs)

    run(main())
    first = [tag for tag, _, _ in log][:40]
    assert 26 <= first.count("a") <= 34, first   # 3:1 while both are backlogged


def test_queue_policy_rejects_work_queued_too_long_but_not_work_that_started(make):
    patient = tenant("patient")
    hasty = tenant("hasty", max_queue_time_ms=50)
    sched = make(tenants=[patient, hasty])
    gate = threading.Event()

    async def main():
        started = threading.Event()
        blocker = asyncio.create_task(sched.submit(patient, 0, holding(gate, started)))
        await wait_until(started.is_set)
        t0 = time.monotonic()
        with pytest.raises(QueueTimeout) as info:
            await sched.submit(hasty, 0, steps_job(1, tag="late"))
        waited = time.monotonic() - t0
        assert ERROR_CODES[info.value.code][0] == 504 and "max_queue_time_ms" in str(info.value)
        gate.set()
        assert await blocker == "blocker"
        # a job that starts within its queue time runs to the end, however long it takes
        done = await sched.submit(hasty, 0, steps_job(5, sleep=0.03, tag="slow"))
        return waited, done, sched.stats()["tenants"]["hasty"]

    waited, done, stats = run(main())
    assert 0.04 <= waited < 2.0
    assert done[0] == "slow"
    assert stats["deadline_exceeded"] == 1 and stats["completed"] == 1 and stats["queue_depth"] == 0


def test_tenant_priority_and_queue_time_are_validated():
    with pytest.raises(ValueError, match="priority"):
        tenant("x", priority=0)
    with pytest.raises(ValueError, match="max_queue_time_ms"):
        tenant("x", max_queue_time_ms=-1)
    assert tenant("x").priority == 1 and tenant("x").max_queue_time_ms is None


class FakeClock:
    """A scheduler clock the test moves by hand: deadlines and queue limits without waiting."""

    def __init__(self, now: float = 1000.0):
        self.now = now

    def __call__(self) -> float:
        return self.now


def test_queue_policy_holds_even_when_the_event_loop_is_late(make):
    """The worker never starts work past its queue time, though the loop's timer has not fired:
    the queue limit is a minute of loop time, but a minute and more has passed on the scheduler's
    clock when the device frees up."""
    clock = FakeClock()
    patient, hasty = tenant("patient"), tenant("hasty", max_queue_time_ms=60_000)
    sched = make(tenants=[patient, hasty], clock=clock)
    gate, started, log = threading.Event(), threading.Event(), []

    async def main():
        blocker = asyncio.create_task(sched.submit(patient, 0, holding(gate, started)))
        await wait_until(started.is_set)
        late = asyncio.create_task(sched.submit(hasty, 0, steps_job(1, log=log, tag="late")))
        await wait_until(lambda: queued(sched) == 2)  # admitted and queued
        clock.now += 61.0
        gate.set()                                    # the device frees up
        await blocker
        with pytest.raises(QueueTimeout):
            await late

    run(main())
    assert log == []


def test_deadlines_are_read_on_the_scheduler_clock(make):
    clock = FakeClock()
    sched = make(tenants=[tenant("a"), tenant("b")], clock=clock)
    a, b = sched.registry.get("a"), sched.registry.get("b")
    gate, started, ran = threading.Event(), threading.Event(), []

    def never(device):
        ran.append(1)
        yield 0.0

    async def main():
        blocker = asyncio.create_task(sched.submit(a, 0, holding(gate, started)))
        await wait_until(started.is_set)
        timings = {}
        doomed = asyncio.create_task(sched.submit(b, 0, never, deadline=clock() + 60.0, timings=timings))
        await wait_until(lambda: queued(sched) == 2)
        clock.now += 120.0                            # past its deadline, long before the loop's timer
        gate.set()
        await blocker
        with pytest.raises(DeadlineExceeded, match="before it started"):
            await doomed
        assert timings["queue_s"] == pytest.approx(120.0)   # measured on the same clock
        with pytest.raises(DeadlineExceeded):         # already past on that clock: refused outright
            await sched.submit(b, 0, never, deadline=clock() - 1.0)

    run(main())
    assert ran == []
    assert sched.stats()["tenants"]["b"]["deadline_exceeded"] == 1


@pytest.mark.parametrize("host_rate, big_first_of_4", [(0.0, 2), (1e9, 0)])
def test_fairness_charges_the_bytes_a_request_moves(make, host_rate, big_first_of_4):
    """Equal device time per job; one tenant's jobs move 100 MB each. Priced by bytes (1 GB/s: 0.1 s
    a job), the light tenant's jobs all run first; by device time alone they alternate."""
    heavy, light, other = tenant("heavy"), tenant("light"), tenant("other")
    sched = make(tenants=[heavy, light, other], host_bytes_per_s=host_rate)
    gate, started, log = threading.Event(), threading.Event(), []

    async def main():
        blocker = asyncio.create_task(sched.submit(other, 0, holding(gate, started)))
        await wait_until(started.is_set)
        tasks = []
        for k in range(4):
            tasks.append(asyncio.create_task(sched.submit(heavy, 100_000_000, steps_job(1, dt=0.001, log=log, tag="H"))))
            tasks.append(asyncio.create_task(sched.submit(light, 1000, steps_job(1, dt=0.001, log=log, tag="L"))))
        await wait_until(lambda: queued(sched) == 9)
        gate.set()
        await asyncio.gather(blocker, *tasks)

    run(main())
    order = [tag for tag, _, _ in log]
    assert order[:4].count("H") == big_first_of_4, order
