"""The weight store (clce_server/weights.py): versions replace each other, bytes count against the
tenant's budget with least-recently-used eviction, refusals and unknown versions say what to do,
and gradients are taken once."""

import numpy as np
import pytest

from clce_server.errors import ApiError
from clce_server.tenants import Tenant
from clce_server.weights import WeightStore, stored_bytes

V, H = 100, 16
ONE = stored_bytes((V, H), 4, True)   # weight + bias + fp32 / float64 accumulators


def _w(seed=0):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((V, H)).astype(np.float32), rng.standard_normal(V).astype(np.float32)


def test_sizes_count_the_accumulators():
    assert ONE == V * H * 4 * 2 + V * (4 + 8)


def test_new_version_replaces_and_old_answers_not_found():
    s, t = WeightStore(), Tenant("a", max_inflight_bytes=10 * ONE)
    s.put(t, "head", "1", *_w())
    s.put(t, "head", "2", *_w(1))
    assert s.get(t, "head", "2").version == "2"
    with pytest.raises(ApiError, match="version '1' is not stored.*upload it again") as e:
        s.get(t, "head", "1")
    assert e.value.status == 404 and s.tenant_bytes("a") == ONE


def test_budget_evicts_least_recently_used_and_refuses_what_cannot_fit():
    s, t = WeightStore(), Tenant("a", max_inflight_bytes=2 * ONE)
    other = Tenant("b", max_inflight_bytes=2 * ONE)
    s.put(t, "x", "1", *_w())
    s.put(t, "y", "1", *_w())
    s.put(other, "x", "1", *_w())   # another tenant's bytes are its own
    s.get(t, "x", "1")               # y is now the least recently used
    s.put(t, "z", "1", *_w())
    assert s.tenant_bytes("a") == 2 * ONE and s.tenant_bytes("b") == ONE
    s.get(t, "x", "1")
    s.get(t, "z", "1")
    with pytest.raises(ApiError, match="not stored"):
        s.get(t, "y", "1")
    tiny = Tenant("c", max_inflight_bytes=ONE - 1)
    with pytest.raises(ApiError, match="over tenant 'c''s budget") as e:
        s.put(tiny, "x", "1", *_w())
    assert e.value.status == 413


def test_gradient_is_taken_once():
    s, t = WeightStore(), Tenant("a")
    e = s.put(t, "head", "1", *_w())
    gw, gb = e.accumulators()
    gw += 1.5
    gb += 2.0
    e.micro_batches = 3
    got_w, got_b, n = s.take_grad(t, "head", "1")
    assert n == 3 and np.all(got_w == 1.5) and np.all(got_b == 2.0)
    again_w, again_b, n = s.take_grad(t, "head", "1")
    assert again_w is None and again_b is None and n == 0


# ---- weights stored as shared-memory references ----------------------------------------------------

def _region(name: str, data: np.ndarray):
    import mmap

    from clce_server.shm import Region

    mm = mmap.mmap(-1, data.nbytes)
    mm[:] = data.tobytes()
    return Region("a", name, data.nbytes, mm, session=None)


def test_a_region_weight_counts_its_accumulators_only_and_is_read_where_it_lies():
    from clce_server.weights import accumulator_bytes
    from clce_wire.shm import RegionRef

    W, b = _w(3)
    region = _region("r", np.concatenate([W.reshape(-1), b]))
    s, t = WeightStore(), Tenant("a", max_inflight_bytes=ONE - 1)   # too small for W inline
    with pytest.raises(ApiError, match="over tenant"):
        s.put(t, "inline", "1", W, b)
    entry = s.put(t, "head", "1", RegionRef("float32", (V, H), "r", 0), RegionRef("float32", (V,), "r", W.nbytes),
                  regions={"r": region})
    assert s.tenant_bytes("a") == accumulator_bytes((V, H), True) == V * H * 4 + V * 8
    pins = []
    w, bias = s.resolve(entry, lambda name: pins.append(name) or region)
    assert pins == ["r", "r"] and np.array_equal(w, W) and np.array_equal(bias, b)
    assert np.shares_memory(w, np.frombuffer(region.mm, np.uint8)) and not w.flags.writeable


@pytest.mark.parametrize("how", ["gone", "registered_anew"])
def test_a_region_weight_whose_region_is_gone_answers_upload_again_and_is_dropped(how):
    from clce_wire.shm import RegionRef

    W, _ = _w(4)
    region = _region("r", W)
    s, t = WeightStore(), Tenant("a")
    entry = s.put(t, "head", "1", RegionRef("float32", (V, H), "r", 0), None, regions={"r": region})

    def pin(name):
        if how == "gone":
            raise ApiError("not_found", f"no shared-memory region {name!r} is registered for this tenant")
        return _region(name, W)       # the same name and bytes, another registration

    with pytest.raises(ApiError, match="region 'r' its weight was uploaded in is gone.*upload it again") as e:
        s.resolve(entry, pin)
    assert e.value.status == 404
    with pytest.raises(ApiError, match="not stored.*upload it again"):
        s.get(t, "head", "1")
    assert s.tenant_bytes("a") == 0
