"""The weight store (clce_server/linear/weights.py): versions replace each other, bytes count against the
tenant's and the server's budgets (the scheduler's) with least-recently-used eviction, refusals
and unknown versions say what to do, entries follow their rules, idle versions expire, and
gradients are taken once."""

import dataclasses

import numpy as np
import pytest

from clce_server.rails.errors import ApiError
from clce_server.rails.scheduler import PayloadTooLarge, QueueFull, Scheduler
from clce_server.tenants import Tenant, TenantRegistry
from clce_server.linear.weights import ENTRY_FLOOR_BYTES, WeightStore, accumulator_bytes, entry_bytes, stored_bytes

V, H = 100, 16
ONE = stored_bytes((V, H), 4, True)   # weight + bias + fp32 / float64 accumulators
ENTRY = V * H * 4 + V * 4 + ENTRY_FLOOR_BYTES + len("x") + len("1")   # a stored version, no accumulators


def _w(seed=0):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((V, H)).astype(np.float32), rng.standard_normal(V).astype(np.float32)


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


def _store(*tenants, server_bytes=1 << 40, **kw):
    """A store over a real scheduler (its budgets; no device work is submitted)."""
    keyed = [dataclasses.replace(t, api_key=f"key-{t.name}-secret") for t in tenants]
    sched = Scheduler(["dev0"], TenantRegistry(keyed), max_inflight_bytes=server_bytes)
    return WeightStore(sched, **kw), sched


def test_sizes_count_the_accumulators():
    assert ONE == V * H * 4 * 2 + V * (4 + 8)
    W, b = _w()
    assert entry_bytes("x", "1", W, b) == ENTRY


def test_new_version_replaces_and_old_answers_not_found():
    t = Tenant("a", max_inflight_bytes=10 * ONE)
    s, sched = _store(t)
    s.put(t, "x", "1", *_w())
    s.put(t, "x", "2", *_w(1))
    assert s.get(t, "x", "2").version == "2"
    with pytest.raises(ApiError, match="version '1' is not stored.*upload it again") as e:
        s.get(t, "x", "1")
    assert e.value.status == 404 and e.value.code == "weight_not_stored"
    assert s.tenant_bytes("a") == sched.tenant_bytes("a") == ENTRY


def test_budget_evicts_least_recently_used_and_refuses_what_cannot_fit():
    t = Tenant("a", max_inflight_bytes=2 * ENTRY)
    other = Tenant("b", max_inflight_bytes=2 * ENTRY)
    tiny = Tenant("c", max_inflight_bytes=ENTRY - 1)
    s, sched = _store(t, other, tiny)
    s.put(t, "x", "1", *_w())
    s.put(t, "y", "1", *_w())
    s.put(other, "x", "1", *_w())   # another tenant's bytes are its own
    s.get(t, "x", "1")               # y is now the least recently used
    s.put(t, "z", "1", *_w())
    assert s.tenant_bytes("a") == sched.tenant_bytes("a") == 2 * ENTRY and s.tenant_bytes("b") == ENTRY
    s.get(t, "x", "1")
    s.get(t, "z", "1")
    with pytest.raises(ApiError, match="not stored"):
        s.get(t, "y", "1")
    with pytest.raises(PayloadTooLarge, match=r"needs \d+ bytes of server memory at once: "
                                              r"over tenant_max_inflight_bytes=\d+"):
        s.put(tiny, "x", "1", *_w())
    assert sched.tenant_bytes("c") == 0


def test_one_budget_with_requests_and_the_server_cap():
    """Stored bytes and a request's reserved bytes share the tenant's budget; the server's cap
    holds across tenants, and a full server is 429 (the scheduler's), never an eviction of
    another tenant's weights."""
    t, u = Tenant("a", max_inflight_bytes=3 * ENTRY), Tenant("b", max_inflight_bytes=3 * ENTRY)
    s, sched = _store(t, u, server_bytes=3 * ENTRY)
    request = sched.reserve(t, 2 * ENTRY)             # a request's body in flight
    s.put(t, "x", "1", *_w())
    with pytest.raises(QueueFull, match="in flight or stored.*max_inflight_bytes") as e:
        s.put(u, "y", "1", *_w())                      # the server's cap: a's bytes are not b's to evict
    assert e.value.scope == "server"
    request.release()
    s.put(u, "y", "1", *_w())
    assert sched.stats()["stored_bytes"] == sched.stats()["inflight_bytes"] == 2 * ENTRY
    s.delete(t, "x")
    s.delete(u, "y")
    assert sched.stats()["inflight_bytes"] == sched.stats()["stored_bytes"] == 0


def test_accumulators_are_reserved_then_handed_to_the_flush():
    t = Tenant("a", max_inflight_bytes=10 * ONE)
    s, sched = _store(t)
    e = s.put(t, "x", "1", *_w())
    s.reserve_accumulators(e, t)
    assert sched.tenant_bytes("a") == ENTRY + accumulator_bytes((V, H), True)
    first = e.accumulation
    e.grad_weight += 1.5
    e.grad_bias += 2.0
    e.micro_batches = 3
    assert e.lock.acquire(blocking=False)
    try:
        gw, gb, n, charge = s.take_grad(e)
    finally:
        e.release()
    assert n == 3 and np.all(gw == 1.5) and np.all(gb == 2.0)
    # the flush's answer holds them until it is sent
    assert charge.nbytes == accumulator_bytes((V, H), True) and sched.tenant_bytes("a") == ENTRY + charge.nbytes
    charge.release()
    assert sched.tenant_bytes("a") == ENTRY
    gw, gb, n, charge = s.take_grad(e)
    assert gw is None and gb is None and n == 0 and charge is None
    s.reserve_accumulators(e, t)
    assert e.accumulation != first and e.micro_batches == 0


def test_a_weight_and_its_accumulators_over_the_budget_is_413_naming_it():
    t = Tenant("a", max_inflight_bytes=ENTRY + 10)
    s, sched = _store(t)
    e = s.put(t, "x", "1", *_w())
    with pytest.raises(PayloadTooLarge, match="with its gradient accumulators needs .* "
                                              "over tenant_max_inflight_bytes="):
        s.reserve_accumulators(e, t)
    assert sched.tenant_bytes("a") == ENTRY and e.grad_weight is None


@pytest.mark.parametrize("name", ["", "a" * 65, "../x", "a b", "é"])
def test_names_follow_the_region_name_rules(name):
    t = Tenant("a")
    s, sched = _store(t)
    with pytest.raises(ApiError, match="a weight name is 1-64 characters") as e:
        s.put(t, name, "1", *_w())
    assert e.value.status == 400 and sched.tenant_bytes("a") == 0


@pytest.mark.parametrize("version", ["", "v" * 257])
def test_versions_are_bounded(version):
    t = Tenant("a")
    s, _ = _store(t)
    with pytest.raises(ApiError, match="weight_version must be 1-256 characters") as e:
        s.put(t, "x", version, *_w())
    assert e.value.status == 400


def test_a_tenant_has_a_cap_on_entries():
    t, u = Tenant("a"), Tenant("b")
    s, sched = _store(t, u, max_entries=3)
    for i in range(3):
        s.put(t, f"w{i}", "1", *_w())
    s.put(t, "w0", "2", *_w())      # a new version of a stored name is no new entry
    with pytest.raises(ApiError, match="has 3 stored weights.*--max-stored-weights") as e:
        s.put(t, "w3", "1", *_w())
    assert e.value.status == 429 and e.value.retry_after
    s.put(u, "w3", "1", *_w())      # another tenant's cap is its own
    assert s.delete(t, "w1")
    s.put(t, "w3", "1", *_w())
    assert s.entries("a") == 3


def test_idle_versions_expire_with_their_accumulators_and_say_so():
    clock = Clock()
    t = Tenant("a")
    s, sched = _store(t, idle_s=60, clock=clock)
    e = s.put(t, "x", "1", *_w())
    s.put(t, "y", "1", *_w())
    s.reserve_accumulators(e, t)
    e.micro_batches = 2
    clock.now += 45
    s.get(t, "y", "1")               # used: y stays
    clock.now += 30
    with pytest.raises(ApiError, match="no request used it for 60 s .*dropped with its accumulated gradient.*"
                                       "upload it again") as err:
        s.get(t, "x", "1")
    assert err.value.status == 404
    assert s.entries("a") == 1 and sched.tenant_bytes("a") == s.tenant_bytes("a") == ENTRY - 1 + len("y")
    e2 = s.put(t, "x", "1", *_w())   # a returning client uploads again: nothing of the old sum
    assert e2.grad_weight is None and e2.micro_batches == 0


def test_a_version_a_job_is_accumulating_into_is_neither_evicted_nor_expired():
    clock = Clock()
    t = Tenant("a", max_inflight_bytes=2 * ENTRY - 1)
    s, sched = _store(t, idle_s=60, clock=clock)
    busy = s.put(t, "x", "1", *_w())
    busy.lock.acquire()             # a device worker holds it across its job's chunks
    try:
        clock.now += 120
        assert s.sweep() == 0
        with pytest.raises(QueueFull, match="in flight or stored"):
            s.put(t, "y", "1", *_w())   # fits only without x, which is in use
        assert s.get(t, "x", "1") is busy
    finally:
        busy.release()
    s.put(t, "y", "1", *_w())           # x, no longer in use, is evicted for it
    with pytest.raises(ApiError, match="not stored"):
        s.get(t, "x", "1")
    assert sched.tenant_bytes("a") == ENTRY - 1 + len("y")


# ---- weights stored as shared-memory references ----------------------------------------------------

def _region(name: str, data: np.ndarray):
    import mmap

    from clce_server.rails.shm import Region

    mm = mmap.mmap(-1, data.nbytes)
    mm[:] = data.tobytes()
    return Region("a", name, data.nbytes, mm, session=None)


class _Registry:
    """The registry's side of a lease's pins (rails/shm.py ShmRegistry.pin/unpin), over `pin`."""

    def __init__(self, pin):
        self.pin_region, self.pinned = pin, []

    def pin(self, tenant, name):
        region = self.pin_region(name)
        self.pinned.append(name)
        return region

    def unpin(self, region):
        self.pinned.remove(region.name)


def _lease(pin):
    """A request's lease whose shared-memory pins go to `pin(name)`."""
    from clce_server.rails.hostmem import HostPool
    from clce_server.rails.lease import RequestLease
    from clce_server.rails.recording import RequestRecord

    lease = RequestLease(RequestRecord("r"), HostPool(0), _Registry(pin))
    lease.tenant = "a"
    return lease


def test_a_region_weight_counts_its_accumulators_only_and_is_read_where_it_lies():
    from clce_server.linear.weights import accumulator_bytes
    from clce_wire.shm import RegionRef

    W, b = _w(3)
    region = _region("r", np.concatenate([W.reshape(-1), b]))
    t = Tenant("a", max_inflight_bytes=ONE - 1)   # too small for W inline with its accumulators
    s, sched = _store(t)
    inline = s.put(t, "inline", "1", W, b)
    with pytest.raises(PayloadTooLarge, match="over tenant_max_inflight_bytes"):
        s.reserve_accumulators(inline, t)
    entry = s.put(t, "head", "1", RegionRef("float32", (V, H), "r", 0), RegionRef("float32", (V,), "r", W.nbytes),
                  regions={"r": region})
    floor = ENTRY_FLOOR_BYTES + len("head") + len("1")
    assert s.tenant_bytes("a") == sched.tenant_bytes("a") == floor   # inline evicted: only the region weight
    s.reserve_accumulators(entry, t)
    assert sched.tenant_bytes("a") == floor + accumulator_bytes((V, H), True) == floor + V * H * 4 + V * 8
    lease = _lease(lambda name: region)
    w, bias = s.resolve(entry, lease)
    assert lease.shm.pinned == ["r"] and np.array_equal(w, W) and np.array_equal(bias, b)   # pinned once
    assert np.shares_memory(w, np.frombuffer(region.mm, np.uint8))
    lease.close()
    assert lease.shm.pinned == []


@pytest.mark.parametrize("how", ["gone", "registered_anew"])
def test_a_region_weight_whose_region_is_gone_answers_upload_again_and_is_dropped(how):
    from clce_wire.shm import RegionRef

    W, _ = _w(4)
    region = _region("r", W)
    t = Tenant("a")
    s, sched = _store(t)
    entry = s.put(t, "head", "1", RegionRef("float32", (V, H), "r", 0), None, regions={"r": region})

    def pin(name):
        if how == "gone":
            raise ApiError("not_found", f"no shared-memory region {name!r} is registered for this tenant")
        return _region(name, W)       # the same name and bytes, another registration

    with pytest.raises(ApiError, match="region 'r' its weight was uploaded in is gone.*upload it again") as e:
        s.resolve(entry, _lease(pin))
    assert e.value.status == 404
    with pytest.raises(ApiError, match="not stored.*upload it again"):
        s.get(t, "head", "1")
    assert s.tenant_bytes("a") == sched.tenant_bytes("a") == 0


def test_an_uploads_own_old_version_makes_room_first():
    """A new version of x, its body not fitting: x's old version (being replaced) goes, not y."""
    t = Tenant("a", max_inflight_bytes=2 * ENTRY)
    s, sched = _store(t)
    s.put(t, "x", "1", *_w())
    s.put(t, "y", "1", *_w())
    s.get(t, "x", "1")               # y is the least recently used
    body = s.making_room(t, lambda: sched.reserve(t, ENTRY), first="x")
    s.get(t, "y", "1")
    with pytest.raises(ApiError, match="not stored"):
        s.get(t, "x", "1")
    s.put(t, "x", "2", *_w(), body=body)   # the body's bytes become the entry's: counted once
    assert sched.tenant_bytes("a") == s.tenant_bytes("a") == 2 * ENTRY
    body.release()                    # the request's close: nothing left to give back
    assert sched.tenant_bytes("a") == 2 * ENTRY
