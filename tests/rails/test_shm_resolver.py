"""The one resolver of shared-memory references: `RequestLease.resolve` and `.output`, on a real
registry with real sealed memfds (no server: the rules themselves). Both operations' routes go
through it; tests/rails/test_shm.py and tests/linear/test_endpoint_shm.py prove that end to end."""

from __future__ import annotations

import fcntl
import os

import numpy as np
import pytest

pytest.importorskip("fastapi")

from clce_server.rails.errors import ApiError  # noqa: E402
from clce_server.rails.hostmem import HostPool  # noqa: E402
from clce_server.rails.lease import RequestLease  # noqa: E402
from clce_server.rails.recording import RequestRecord  # noqa: E402
from clce_server.rails.shm import Session, ShmRegistry  # noqa: E402
from clce_wire.shm import RegionRef  # noqa: E402

SEALS = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW


def _memfd(data: bytes, *, read_only: bool = False) -> int:
    fd = os.memfd_create("t", os.MFD_ALLOW_SEALING)
    os.write(fd, data)
    fcntl.fcntl(fd, fcntl.F_ADD_SEALS, SEALS | (fcntl.F_SEAL_WRITE if read_only else 0))
    return fd


@pytest.fixture
def registry():
    reg = ShmRegistry(1 << 24)
    session = Session("alice")
    data = np.arange(64, dtype=np.float32)
    reg.register(session, "rw", data.nbytes, _memfd(data.tobytes()))
    reg.register(session, "ro", data.nbytes, _memfd(data.tobytes(), read_only=True))
    yield reg, data
    reg.end_session(session)


def _lease(reg, tenant="alice"):
    lease = RequestLease(RequestRecord("r1"), HostPool(0), reg)
    lease.tenant = tenant
    return lease


def test_a_region_is_pinned_once_per_request_whatever_reads_it(registry):
    reg, data = registry
    lease = _lease(reg)
    a = lease.resolve(RegionRef("float32", (8,), "rw", 0), what="input")
    b = lease.resolve(RegionRef("float32", (4, 4), "rw", 32), what="weight")
    np.testing.assert_array_equal(a, data[:8])
    np.testing.assert_array_equal(b, data[8:24].reshape(4, 4))
    assert list(lease.pinned()) == ["rw"] and lease.pinned()["rw"].pins == 1
    assert lease.shm_bytes == 32 + 64 and lease.copied_bytes == 0
    lease.unpin()
    assert reg.stats("alice")["pinned"] == 0
    lease.close()


def test_writability_is_the_callers_word_not_the_tensors_name(registry):
    reg, _ = registry
    lease = _lease(reg)
    # read where it lies: a read-only region serves any name, "grad" included
    ro = lease.resolve(RegionRef("float32", (8,), "ro", 0), what="grad")
    assert not ro.flags.writeable
    # written: refused in a read-only region, whatever it is called
    with pytest.raises(ApiError, match="input: region 'ro' is read-only") as info:
        lease.resolve(RegionRef("float32", (8,), "ro", 0), what="input", writable=True)
    assert info.value.code == "bad_request"
    ref, out = lease.output("grad_weight", "float32", (2, 3), "rw", 8)
    assert ref == RegionRef("float32", (2, 3), "rw", 8) and out.flags.writeable
    out[...] = 7.0
    assert (lease.resolve(RegionRef("float32", (8,), "rw", 0), what="x")[2:8] == 7.0).all()
    assert lease.shm_bytes == 32 + 32          # the outputs are not what the request reads
    lease.close()


def test_copy_out_is_explicit_and_counted(registry):
    reg, data = registry
    lease = _lease(reg)
    ref = RegionRef("float32", (4,), "rw", 0)
    copied = lease.resolve(ref, what="target", copy=True)
    in_place = lease.resolve(ref, what="target")
    in_place[0] = -1.0                          # the client writing its region meanwhile
    assert copied[0] == data[0] and in_place[0] == -1.0
    assert lease.copied_bytes == 16 and lease.shm_bytes == 32
    lease.close()


def test_refusals(registry):
    reg, _ = registry
    lease = _lease(reg)
    with pytest.raises(ApiError, match="past the end of region 'rw'"):
        lease.resolve(RegionRef("float32", (65,), "rw", 0), what="input")
    with pytest.raises(ApiError, match="no shared-memory region 'nope'") as info:
        lease.resolve(RegionRef("float32", (1,), "nope", 0), what="input")
    assert info.value.code == "not_found"
    with pytest.raises(ApiError, match="grad: the offset must be a non-negative integer"):
        lease.output("grad", "float32", (1,), "rw", -4)
    with pytest.raises(ApiError, match="not a multiple of the float32 item size"):
        lease.output("grad", "float32", (1,), "rw", 2)
    lease.close()
    # another tenant's region has the same answer as no region at all
    other = _lease(reg, tenant="bob")
    with pytest.raises(ApiError, match="no shared-memory region 'rw'"):
        other.resolve(RegionRef("float32", (1,), "rw", 0), what="input")
    other.close()
    # a server without shared memory
    bare = RequestLease(RequestRecord("r2"), HostPool(0))
    bare.tenant = "alice"
    with pytest.raises(ApiError, match="does not allow shared memory"):
        bare.resolve(RegionRef("float32", (1,), "rw", 0), what="input")
    bare.close()


def test_the_close_lets_every_region_go(registry):
    reg, _ = registry
    lease = _lease(reg)
    lease.resolve(RegionRef("float32", (1,), "rw", 0), what="a")
    lease.resolve(RegionRef("float32", (1,), "ro", 0), what="b")
    assert reg.stats("alice")["pinned"] == 2
    lease.close()
    assert reg.stats("alice")["pinned"] == 0
