"""Fixtures shared by the shared rails' tests (tests/rails/)."""

import pytest


@pytest.fixture
def make():
    """make(devices=..., tenants=..., **scheduler_kwargs): a Scheduler over pure-Python devices,
    shut down (and checked to have stopped) when the test ends."""
    from clce_server.rails.scheduler import Scheduler
    from clce_server.tenants import TenantRegistry

    created = []

    def make_scheduler(devices=("dev0",), tenants=None, **kwargs):
        registry = TenantRegistry(tenants) if tenants else TenantRegistry.open()
        kwargs.setdefault("max_inflight_bytes", 1 << 40)
        sched = Scheduler(list(devices), registry, **kwargs)
        created.append(sched)
        return sched

    yield make_scheduler
    for sched in created:
        assert sched.shutdown(timeout=5.0)
