"""Matrix products on an OpenCL device for the fused linear cross-entropy: kernels/gemm.cl.

One kernel, `C = alpha * A . B + beta * C` (fp32 C) with B's rows contiguous and A and C at any
strides, serves the three products of a row chunk (clce_server/linear.py). Chosen over CLBlast by
measurement (bench/bench_gemm.py): on PoCL's CPU device CLBlast has no tuned parameters, and
the best of its Xgemm parameters we tried through its override API stayed below this kernel.

Tunables are per device and per product, CLBlast style: GEMM_TUNING maps (vendor substring or
"*", device kind, product or "*") to the kernel's #ifndef defines; the first matching row wins.
The products are linear.py's: "forward" (logits^T = W . h^T, stored transposed), "dh" (dlogits .
W, K = the vocabulary) and "dW" (dlogits^T . h, A read transposed); anything else is "*".

Launch: one work-item per work-group. PoCL gives every work-item of a group its own copy of the
private arrays on one stack (measured: a 5.5 MB frame for 84 work-items of 64 KiB panels), so a
larger group multiplies the kernel's private B panel and overflows the stack at large M.
"""

from __future__ import annotations

import threading

import numpy as np
import pyopencl as cl

from .device import Device, kernel_source

#: gemm.cl's parameters, in its signature's order
GEMM_PARAMS = ("M", "N", "K", "alpha", "beta", "A", "a_off", "sam", "sak", "B", "b_off", "ldb",
               "C", "c_off", "scm", "scn")

#: element types the kernel reads (its GEMM_A_DTYPE / GEMM_B_DTYPE codes); C is float32
GEMM_DTYPES = {"float32": 0, "bfloat16": 2}

#: the products linear.py runs, each tuned on its own
GEMM_PRODUCTS = ("forward", "dh", "dW")

#: PoCL's CPU device (measured with bench/bench_gemm.py, AVX-512, 2 cores): 12 x 32 micro-tiles
#: (24 of the 32 vector registers accumulate), four across N sharing each A sliver, a work-item
#: 384 rows deep, K blocks of 512 (dW: 1024 measured 20% slower).
#:   forward  C stored transposed (scalar, strided stores): all of K = H in one block, so C is
#:            passed once; 768-row work-items; two micro-tiles across N (NB 4: -7%).
#:   dh       K = V: a work-item spans the whole default chunk (86 x 12 = 1032 >= 1024 rows), so
#:            W, the B operand, is packed and read once per product, not once per row tile
#:            (+25% over 384-row work-items); K blocks of 1024 (+5%).
_CPU = {"GEMM_MR": 12, "GEMM_NV": 2, "GEMM_VW": 16, "GEMM_MB": 32, "GEMM_NB": 4, "GEMM_KC": 512,
        "GEMM_ROWS_FIRST": 0}
GEMM_TUNING: list[tuple[str, str, str, dict[str, int]]] = [
    ("*", "cpu", "forward", {**_CPU, "GEMM_MB": 64, "GEMM_NB": 2, "GEMM_KC": 1024}),
    ("*", "cpu", "dh", {**_CPU, "GEMM_MB": 86, "GEMM_KC": 1024}),
    ("*", "cpu", "*", _CPU),
    ("*", "gpu", "*", {"GEMM_MR": 4, "GEMM_NV": 1, "GEMM_VW": 8, "GEMM_MB": 1, "GEMM_NB": 1, "GEMM_KC": 64,
                       "GEMM_ROWS_FIRST": 0}),
    ("*", "*", "*", _CPU),
]


def gemm_tuning(vendor: str, kind: str, product: str = "*") -> dict[str, int]:
    """The first row of GEMM_TUNING that matches the device and the product."""
    for v, k, p, t in GEMM_TUNING:
        if (v == "*" or v.lower() in vendor.lower()) and k in ("*", kind) and p in ("*", product):
            return dict(t)
    raise LookupError(kind)   # the table ends in ("*", "*", "*")


class Gemm:
    """The gemm kernel on one device, built once per (product's tuning, A and B element types).
    `tuning`: defines that override the table's for every product (benchmarks, tests)."""

    def __init__(self, device: Device, tuning: dict[str, int] | None = None):
        self.device = device
        self.override = dict(tuning or {})
        self._programs: dict[tuple, cl.Program] = {}
        self._lock = threading.Lock()
        self._local = threading.local()

    def tuning(self, product: str = "*") -> dict[str, int]:
        return {**gemm_tuning(self.device.vendor, self.device.kind, product), **self.override}

    def tile(self, product: str = "*") -> tuple[int, int]:
        """(rows, columns) of C one work-item computes."""
        t = self.tuning(product)
        return t["GEMM_MR"] * t["GEMM_MB"], t["GEMM_NB"] * t["GEMM_NV"] * t["GEMM_VW"]

    def _kernel(self, tuning: dict[str, int], a_dtype: str, b_dtype: str, name: str = "gemm") -> cl.Kernel:
        key = (tuple(sorted(tuning.items())), a_dtype, b_dtype)
        cache = getattr(self._local, "kernels", None)
        if cache is None:
            cache = self._local.kernels = {}
        k = cache.get((*key, name))
        if k is None:
            with self._lock:
                prg = self._programs.get(key)
                if prg is None:
                    defines = {**tuning, "GEMM_A_DTYPE": GEMM_DTYPES[a_dtype], "GEMM_B_DTYPE": GEMM_DTYPES[b_dtype]}
                    opts = [f"-D{n}={v}" for n, v in defines.items()] + ["-cl-mad-enable"]
                    prg = self._programs[key] = cl.Program(self.device.context, kernel_source("gemm.cl")).build(
                        options=opts)
            k = cache[(*key, name)] = cl.Kernel(prg, name)
        return k

    def bias_rows(self, n: int, V: int, bias: cl.Buffer, bias_dtype: str, C: cl.Buffer, ldc: int,
                  wait_for=None) -> cl.Event:
        """Enqueue C[i, j] = bias[j] for the n rows of an (n, ldc) float32 buffer (gemm.cl's
        bias_rows: the forward product's beta-1 start on a device with memory of its own)."""
        k = self._kernel(self.tuning("forward"), bias_dtype, "float32", "bias_rows")
        k.set_args(np.uint32(n), np.uint32(V), bias, C, np.int64(ldc))
        return cl.enqueue_nd_range_kernel(self.device.queue, k, (V, n), None, wait_for=wait_for)

    def column_sums(self, n: int, V: int, G: cl.Buffer, ldg: int, out: cl.Buffer, wait_for=None) -> cl.Event:
        """Enqueue out[j] += sum of G's n rows, in float64, rows in order (gemm.cl's column_sums:
        the bias gradient, the same bits as the host path's numpy sum). Needs float64."""
        if not self.device.has_fp64:
            raise RuntimeError(f"column_sums needs float64, which {self.device.name!r} lacks")
        k = self._kernel(self.tuning("forward"), "float32", "float32", "column_sums")
        k.set_args(np.uint32(n), np.uint32(V), G, np.int64(ldg), out)
        return cl.enqueue_nd_range_kernel(self.device.queue, k, (V,), None, wait_for=wait_for)

    def __call__(self, M: int, N: int, K: int, A: cl.Buffer, a_strides: tuple[int, int], B: cl.Buffer, ldb: int,
                 C: cl.Buffer, c_strides: tuple[int, int], *, alpha: float = 1.0, beta: float = 0.0,
                 dtypes: tuple[str, str] = ("float32", "float32"), product: str = "*",
                 offsets: tuple[int, int, int] = (0, 0, 0), wait_for=None) -> cl.Event:
        """Enqueue C[M, N] = alpha * A[M, K] . B[K, N] + beta * C (C float32, A and B of `dtypes`),
        with `product`'s tuning; strides and offsets in elements."""
        tuning = self.tuning(product)
        k = self._kernel(tuning, *dtypes)
        mt = tuning["GEMM_MR"] * tuning["GEMM_MB"]
        nt = tuning["GEMM_NB"] * tuning["GEMM_NV"] * tuning["GEMM_VW"]
        grid = (max(-(-N // nt), 1), max(-(-M // mt), 1))
        if tuning["GEMM_ROWS_FIRST"]:
            grid = grid[::-1]
        k.set_args(np.uint32(M), np.uint32(N), np.uint32(K), np.float32(alpha), np.float32(beta),
                   A, np.uint64(offsets[0]), np.int64(a_strides[0]), np.int64(a_strides[1]),
                   B, np.uint64(offsets[1]), np.int64(ldb),
                   C, np.uint64(offsets[2]), np.int64(c_strides[0]), np.int64(c_strides[1]))
        return cl.enqueue_nd_range_kernel(self.device.queue, k, grid, (1, 1), wait_for=wait_for)
