"""Pure-Python jobs and helpers for driving clce_server's Scheduler without OpenCL (tests/rails/):
a job is a generator that yields the device seconds of each step; `gated` and `holding` hold their
device until the test opens a gate, so a test waits on state (`wait_until`), never on a sleep."""

import asyncio
import time

from clce_server.tenants import Tenant


GATE_TIMEOUT = 10.0  # a broken test fails instead of hanging forever


def tenant(name, weight=1.0, **limits):
    return Tenant(name, f"key-{name}-secret", weight, **limits)


def run(coro, timeout=30.0):
    return asyncio.run(asyncio.wait_for(coro, timeout))


async def wait_until(predicate, timeout=5.0, what=None):
    end = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > end:
            raise AssertionError("condition not reached in time" + (f": {what()}" if what else ""))
        await asyncio.sleep(0.001)


def steps_job(n, *, dt=0.001, sleep=0.0, log=None, tag=None, result=None):
    def job(device):
        for i in range(n):
            if sleep:
                time.sleep(sleep)
            if log is not None:
                log.append((tag, i, str(device)))
            yield dt
        return result if result is not None else (tag, str(device))

    return job


def gated(gate, *, steps=1, log=None, tag=None, dt=0.001):
    """A job whose first step blocks on `gate`: holds its device while the test queues work."""

    def job(device):
        assert gate.wait(GATE_TIMEOUT)
        for i in range(steps):
            if log is not None:
                log.append((tag, i, str(device)))
            yield dt
        return tag

    return job


def queued(sched):
    return sched.stats()["queued_jobs"]


def holding(gate, started):
    """A job that holds its device from its first step until `gate` opens."""

    def job(device):
        started.set()
        assert gate.wait(GATE_TIMEOUT)
        yield 0.001
        return "blocker"

    return job
