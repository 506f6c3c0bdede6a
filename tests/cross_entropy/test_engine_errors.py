"""Failures by cause: bad arguments raise ArgumentError carrying PyTorch's exact exception, a
failing device raises DeviceError, and the engine keeps working afterwards."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import clce_server.rails.device as device_mod
from clce_server.rails.device import open_devices
from clce_server.cross_entropy.engine import LossEngine
from clce_server.rails.errors import ArgumentError, DeviceError, classify


def torch_error(x, t, **kw):
    with pytest.raises(Exception) as info:
        F.cross_entropy(torch.from_numpy(x), torch.from_numpy(t), **kw)
    return info.value


@pytest.mark.parametrize("case", ["target out of range", "batch mismatch", "bad smoothing", "bad reduction"])
def test_argument_errors_carry_pytorchs_exception(engine, case):
    x = np.zeros((4, 5), np.float32)
    t, kw = np.array([0, 1, 2, 3]), {}
    if case == "target out of range":
        t = np.array([0, 7, 2, 3])
    elif case == "batch mismatch":
        t = np.array([0, 1, 2])
    elif case == "bad smoothing":
        kw = {"label_smoothing": 1.5}
    else:
        kw = {"reduction": "avg"}
    expected = torch_error(x, t, **kw)
    for call in (lambda: engine.cross_entropy(x, t, **kw), lambda: engine.prepare(x, t, **kw)):
        with pytest.raises(ArgumentError) as info:
            call()
        assert type(info.value.error) is type(expected) and str(info.value.error) == str(expected)
        assert classify(info.value) is info.value
    out = engine.cross_entropy_many([dict(input=x, target=t, **kw), dict(input=x, target=np.array([0, 1, 2, 3]))])
    assert isinstance(out[0], ArgumentError) and str(out[0].error) == str(expected)
    assert float(out[1].loss) == pytest.approx(np.log(5))


def test_a_sample_bigger_than_the_largest_allocation_is_an_argument_error(engine):
    limit = engine.device.cl_device.max_mem_alloc_size
    C = limit // 8 + 1                                  # its float64 gradient is just over the limit
    x = np.lib.stride_tricks.as_strided(np.zeros(1, np.float16), (1, C), (0, 0))
    with pytest.raises(ArgumentError) as info:
        engine.prepare(x, np.array([0]), return_grad=True, grad_dtype="float64")
    assert isinstance(info.value.error, RuntimeError) and "largest allocation" in str(info.value)


@pytest.fixture
def fresh_engine():
    """An engine on a device of its own, so a fault injected here cannot leak into other tests."""
    return LossEngine(open_devices()[0])


def small_problem():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((6, 33)).astype(np.float32)
    t = rng.integers(0, 33, 6)
    xt = torch.from_numpy(x).requires_grad_(True)
    ref = F.cross_entropy(xt, torch.from_numpy(t))
    ref.backward()
    return x, t, ref.item(), xt.grad.numpy()


def assert_works(engine):
    x, t, ref, ref_grad = small_problem()
    r = engine.cross_entropy(x, t, return_grad=True)
    assert float(r.loss) == pytest.approx(ref, rel=2e-5)
    np.testing.assert_allclose(r.grad, ref_grad, atol=1e-6, rtol=2e-5)


def test_a_failing_build_is_a_device_error_and_is_retried_on_the_next_request(fresh_engine, monkeypatch):
    real = device_mod.kernel_source
    monkeypatch.setattr(device_mod, "kernel_source", lambda name: real(name) + "\nthis is not OpenCL C;\n")
    x, t, _, _ = small_problem()
    with pytest.raises(DeviceError) as info:             # the soft-cap build is not made at start-up
        fresh_engine.cross_entropy(x, t, softcap=30.0)
    assert "building ce" in str(info.value)
    out = fresh_engine.cross_entropy_many([dict(input=x, target=t, softcap=30.0)] * 2)
    assert all(isinstance(o, DeviceError) for o in out)
    monkeypatch.setattr(device_mod, "kernel_source", real)
    r = fresh_engine.cross_entropy(x, t, softcap=30.0)   # a failed build is not cached
    assert np.isfinite(float(r.loss))
    assert_works(fresh_engine)


def test_a_bad_build_define_is_a_device_error():
    dev = open_devices()[0]
    dev.tuning.defines["CE_MIN_BLOCK"] = "not_a_number"   # a broken tuning row
    with pytest.raises(DeviceError):
        LossEngine(dev).cross_entropy(np.zeros((2, 3), np.float32), np.array([0, 1]), softcap=1.0)


class CappedPool:
    """The device's memory pool with a byte limit per buffer: beyond it, asks OpenCL for more than
    the device can allocate, so the failure is the runtime's own (CL_INVALID_BUFFER_SIZE)."""

    def __init__(self, dev, limit):
        self.inner = dev.pool
        self.limit = limit
        self.too_big = dev.cl_device.max_mem_alloc_size + 1

    def allocate(self, nbytes):
        return self.inner.allocate(nbytes if nbytes <= self.limit else self.too_big)


def test_an_allocation_failure_is_a_device_error_and_the_engine_recovers(fresh_engine, monkeypatch):
    dev = fresh_engine.device
    pool = dev.pool
    monkeypatch.setattr(dev, "pool", CappedPool(dev, 1024))
    rng = np.random.default_rng(1)
    x = rng.standard_normal((512, 40)).astype(np.float32)   # per-row outputs: 2 KiB each, over the cap
    t = rng.integers(0, 40, 512)
    with pytest.raises(DeviceError) as info:
        fresh_engine.prepare(x, t, return_grad=True)
    assert "OpenCL" in str(info.value)
    small = [dict(input=x[i:i + 200], target=t[i:i + 200]) for i in (0, 200)]
    assert all(isinstance(o, DeviceError) for o in fresh_engine.cross_entropy_many(small))
    monkeypatch.setattr(dev, "pool", pool)
    assert_works(fresh_engine)
    assert len(fresh_engine.cross_entropy_many(small)) == 2


def test_warm_up_runs_every_built_program(fresh_engine):
    fresh_engine.device.build_startup_programs()
    fresh_engine.warm_up()
    assert_works(fresh_engine)
