"""kernels/gemm.cl through clce_server/gemm.py against numpy in float64: the three layouts the
fused linear cross-entropy uses (A row-major, A transposed, C stored transposed), edges in every
dimension (tiles past M and N, K not a multiple of the K block, M below the micro-tile), alpha and
beta, bf16 operands and results, and the same bits on every run."""

import ml_dtypes
import numpy as np
import pyopencl as cl
import pytest

from clce_server.gemm import Gemm

MF = cl.mem_flags


@pytest.fixture(scope="module")
def gemm(cpu_device):
    return Gemm(cpu_device)


def _buf(dev, arr):
    return cl.Buffer(dev.context, MF.READ_WRITE | MF.USE_HOST_PTR, hostbuf=arr)


def _run(gemm, M, N, K, A, a_strides, B, C, c_strides, dtypes=("float32",) * 3, **kw):
    dev = gemm.device
    bufs = [_buf(dev, x.view(np.uint16) if x.dtype == ml_dtypes.bfloat16 else x) for x in (A, B, C)]
    gemm(M, N, K, bufs[0], a_strides, bufs[1], B.shape[1], bufs[2], c_strides, dtypes=dtypes, **kw).wait()
    mapped, _ = cl.enqueue_map_buffer(dev.queue, bufs[2], cl.map_flags.READ, 0, (C.nbytes,), np.uint8)
    mapped.base.release(dev.queue)
    for b in bufs:
        b.release()
    return C


SHAPES = [(1, 1, 1), (5, 7, 3), (6, 32, 256), (25, 33, 257), (97, 130, 600), (3, 200, 40), (200, 3, 1),
          (1000, 70, 300)]   # the last: several work-items down M, the last one short


@pytest.mark.parametrize("M, N, K", SHAPES, ids=str)
@pytest.mark.parametrize("layout", ["nn", "tn", "nt_store"])
def test_layouts_against_numpy(gemm, M, N, K, layout):
    rng = np.random.default_rng(M * 1000 + N + K)
    B = rng.standard_normal((K, N)).astype(np.float32)
    if layout == "tn":        # A given as its transpose (K, M): dW += dlogits^T . h
        At = rng.standard_normal((K, M)).astype(np.float32)
        A, a_strides = At.T, (1, M)
        src = At
    else:
        src = A = rng.standard_normal((M, K)).astype(np.float32)
        a_strides = (K, 1)
    if layout == "nt_store":  # C stored transposed: logits (n, V) from W . h^T
        Ct = np.full((N, M), np.nan, np.float32)
        _run(gemm, M, N, K, src, a_strides, B, Ct, (1, M))
        got = Ct.T
    else:
        got = _run(gemm, M, N, K, src, a_strides, B, np.full((M, N), np.nan, np.float32), (N, 1))
    want = A.astype(np.float64) @ B.astype(np.float64)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.sqrt(K))


def test_alpha_beta_accumulate(gemm):
    rng = np.random.default_rng(1)
    M, N, K = 31, 45, 300
    A = rng.standard_normal((M, K)).astype(np.float32)
    B = rng.standard_normal((K, N)).astype(np.float32)
    C0 = rng.standard_normal((M, N)).astype(np.float32)
    got = _run(gemm, M, N, K, A, (K, 1), B, C0.copy(), (N, 1), alpha=0.5, beta=1.0)
    np.testing.assert_allclose(got, 0.5 * (A.astype(np.float64) @ B) + C0, rtol=1e-5, atol=1e-4)
    got = _run(gemm, M, N, 0, A, (K, 1), B[:1], C0.copy(), (N, 1), beta=2.0)   # K = 0: C = beta C
    np.testing.assert_array_equal(got, 2 * C0)


def test_bf16_operands_and_result(gemm):
    rng = np.random.default_rng(2)
    M, N, K = 40, 50, 333
    A = rng.standard_normal((M, K)).astype(ml_dtypes.bfloat16)
    B = rng.standard_normal((K, N)).astype(ml_dtypes.bfloat16)
    C = np.zeros((M, N), ml_dtypes.bfloat16)
    got = _run(gemm, M, N, K, A, (K, 1), B, C, (N, 1), dtypes=("bfloat16", "bfloat16", "bfloat16"))
    want = A.astype(np.float64) @ B.astype(np.float64)
    # fp32 accumulation of exact bf16 products, then one rounding to bf16 (2^-8 relative)
    np.testing.assert_allclose(got.astype(np.float64), want, rtol=2 ** -8, atol=1e-5 * np.sqrt(K))


def test_bit_identical_runs(gemm):
    rng = np.random.default_rng(3)
    M, N, K = 300, 200, 1000
    A = rng.standard_normal((M, K)).astype(np.float32)
    B = rng.standard_normal((K, N)).astype(np.float32)
    first = _run(gemm, M, N, K, A, (K, 1), B, np.empty((M, N), np.float32), (N, 1))
    for _ in range(2):
        again = _run(gemm, M, N, K, A, (K, 1), B, np.empty((M, N), np.float32), (N, 1))
        np.testing.assert_array_equal(again.view(np.uint32), first.view(np.uint32))
