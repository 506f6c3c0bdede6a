"""The preamble's conversions (kernels/common.cl), bit for bit: float -> half and float -> bf16
stores (round to nearest even, subnormals, overflow, NaN) against numpy / ml_dtypes, and the
inline exp against float64."""

import ml_dtypes
import numpy as np
import pyopencl as cl
import pytest

from clce_server.rails.device import kernel_source

PROBE = r"""
__kernel void store16(__global const float *x, __global grad_t *out) {
    const size_t i = 16 * get_global_id(0);
    STORE16(out, i, vload16(0, x + i));
}
__kernel void store8(__global const float *x, __global grad_t *out) {
    const size_t i = 8 * get_global_id(0);
    STORE8(out, i, vload8(0, x + i));
}
__kernel void exp16(__global const float *x, __global float *out) {
    const size_t i = 16 * get_global_id(0);
    vstore16(fast_exp(vload16(0, x + i)), 0, out + i);
}
__kernel void exp1(__global const float *x, __global float *out) {
    out[get_global_id(0)] = fast_exp(x[get_global_id(0)]);
}
"""


def build(cpu_device, grad_dtype_code, fma=0):
    src = kernel_source("common.cl") + PROBE
    return cl.Program(cpu_device.context, src).build(options=["-DIN_DTYPE=0", f"-DGRAD_DTYPE={grad_dtype_code}",
                                                              f"-DCE_FMA={fma}"])


def run(cpu_device, prg, name, x, out_dtype, width):
    q = cpu_device.queue
    mf = cl.mem_flags
    out = np.empty(x.size, out_dtype)
    xb = cl.Buffer(cpu_device.context, mf.READ_ONLY | mf.COPY_HOST_PTR, hostbuf=x)
    ob = cl.Buffer(cpu_device.context, mf.WRITE_ONLY, out.nbytes)
    getattr(prg, name)(q, (x.size // width,), None, xb, ob)
    cl.enqueue_copy(q, out, ob)
    return out


def probe_values():
    rng = np.random.default_rng(0)
    specials = np.array([0.0, -0.0, np.inf, -np.inf, np.nan, -np.nan, 65504.0, 65519.99, 65520.0, 65536.0,
                         1e9, 2.0**-14, 2.0**-14 * (1 - 2.0**-11), 2.0**-24, 2.0**-25, 2.0**-25 * 1.0001, 3 * 2.0**-25,
                         2.0**-26, 1e-30, 1.5e-45, 1.0, 1.0 + 2.0**-11, 1.0 + 3 * 2.0**-11, 1.0 + 2.0**-8,
                         1.0 + 3 * 2.0**-8, 0.1, -0.1, 3.0e38], np.float32)
    ties = (rng.integers(0, 1 << 16, 4096).astype(np.uint32) << 16 | 0x8000).view(np.float32)   # bf16 ties
    half_ties = ((rng.integers(0x3880, 0x4780, 4096).astype(np.uint32) << 16)
                 | (rng.integers(0, 8, 4096).astype(np.uint32) << 13) | 0x1000).view(np.float32)
    mags = np.exp(rng.uniform(-110, 88, 1 << 15)) * rng.choice([-1, 1], 1 << 15)   # up to ~1.6e38
    x = np.concatenate([specials, -specials, ties, half_ties, mags.astype(np.float32),
                        rng.standard_normal(1 << 14).astype(np.float32) * 1e-5])
    pad = (-x.size) % 16
    return np.ascontiguousarray(np.concatenate([x, np.zeros(pad, np.float32)]))


@pytest.mark.parametrize("name, width", [("store16", 16), ("store8", 8)])
def test_half_stores_round_like_numpy(cpu_device, name, width):
    x = probe_values()
    out = run(cpu_device, build(cpu_device, 1), name, x, np.uint16, width)
    with np.errstate(over="ignore"):
        ref = x.astype(np.float16).view(np.uint16)
    nan = np.isnan(x)
    assert np.all((out[nan] & 0x7C00) == 0x7C00) and np.all((out[nan] & 0x03FF) != 0)   # NaN stays NaN
    bad = np.flatnonzero((out != ref) & ~nan)
    assert bad.size == 0, [(float(x[i]), hex(out[i]), hex(ref[i])) for i in bad[:8]]


@pytest.mark.parametrize("name, width", [("store16", 16), ("store8", 8)])
def test_bf16_stores_round_like_ml_dtypes(cpu_device, name, width):
    x = probe_values()
    out = run(cpu_device, build(cpu_device, 2), name, x, np.uint16, width)
    with np.errstate(invalid="ignore"):
        ref = x.astype(ml_dtypes.bfloat16).view(np.uint16)
    nan = np.isnan(x)
    assert np.all((out[nan] & 0x7F80) == 0x7F80) and np.all((out[nan] & 0x007F) != 0)
    bad = np.flatnonzero((out != ref) & ~nan)
    assert bad.size == 0, [(float(x[i]), hex(out[i]), hex(ref[i])) for i in bad[:8]]


@pytest.mark.parametrize("fma", [0, 1], ids=["mad", "fma"])
def test_fast_exp_accuracy_and_specials(cpu_device, fma):
    rng = np.random.default_rng(1)
    x = np.concatenate([np.array([0.0, -0.0, -np.inf, np.nan, -87.0, -88.0, -100.0, -1e30, 1e-8, -1e-8, 10.0],
                                 np.float32), rng.uniform(-87, 0, 1 << 16).astype(np.float32),
                        rng.uniform(-1, 1, 1 << 12).astype(np.float32)])
    x = np.concatenate([x, np.zeros((-x.size) % 16, np.float32)])
    prg = build(cpu_device, 0, fma)
    for name, width in (("exp16", 16), ("exp1", 1)):
        out = run(cpu_device, prg, name, x, np.float32, width)
        ref = np.exp(x.astype(np.float64))
        assert np.isnan(out[np.isnan(x)]).all()
        assert out[x == -np.inf].tolist() == [0.0] and out[x == -100.0].tolist() == [0.0]   # no subnormals
        ok = np.isfinite(x) & (x * np.log2(np.e) >= -126)
        # 1.8e-7 from the polynomial, plus the rounding of y = x log2(e) (half an ulp of y, times
        # ln 2: up to |x| 1.3e-7 relative, as PoCL's exp2(x log2 e) did): the arguments that
        # matter, differences near 0, get ~2 ulp
        rel = np.abs(out[ok] - ref[ok]) / ref[ok]
        assert np.all(rel <= 2.5e-7 + np.abs(x[ok]) * 1.3e-7), float(rel.max())
        near0 = ok & (np.abs(x) < 1)
        assert np.all(np.abs(out[near0] - ref[near0]) / ref[near0] <= 2.5e-7)
