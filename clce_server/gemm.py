"""Matrix products on an OpenCL device for the fused linear cross-entropy: kernels/gemm.cl.

One kernel, `C = alpha * A . B + beta * C` with B's rows contiguous and A and C at any strides,
serves the three products of a row chunk (clce_server/linear.py). Chosen over CLBlast by
measurement (bench/bench_gemm.py): on PoCL's CPU device CLBlast has no tuned parameters, and
the best of its Xgemm parameters we tried through its override API stayed below this kernel.

Tunables are per device, CLBlast style: GEMM_TUNING maps (vendor substring or "*", device kind)
to the kernel's #ifndef defines. The launch runs one work-group per column tile of C, its
work-items walking down M, so consecutive work-items share the column tile's B panel in cache
(measured ~2x over PoCL choosing the work-group itself, at (2048x1024).(1024x32000)).
"""

from __future__ import annotations

import threading

import numpy as np
import pyopencl as cl

from .device import Device, kernel_source

#: gemm.cl's parameters, in its signature's order
GEMM_PARAMS = ("M", "N", "K", "alpha", "beta", "A", "a_off", "sam", "sak", "B", "b_off", "ldb",
               "C", "c_off", "scm", "scn")

#: element types the kernel reads and writes (its GEMM_*_DTYPE codes)
GEMM_DTYPES = {"float32": 0, "bfloat16": 2}

_CPU = {"GEMM_MR": 6, "GEMM_NV": 2, "GEMM_VW": 16, "GEMM_MB": 64, "GEMM_KC": 256}
GEMM_TUNING: list[tuple[str, str, dict[str, int]]] = [
    ("*", "cpu", _CPU),
    ("*", "gpu", {"GEMM_MR": 4, "GEMM_NV": 1, "GEMM_VW": 8, "GEMM_MB": 1, "GEMM_KC": 64}),
    ("*", "*", _CPU),
]


def gemm_tuning(vendor: str, kind: str) -> dict[str, int]:
    for v, k, t in GEMM_TUNING:
        if (v == "*" or v.lower() in vendor.lower()) and k in ("*", kind):
            return dict(t)
    raise LookupError(kind)   # the table ends in ("*", "*")


class Gemm:
    """The gemm kernel on one device, built once per (A, B, C) element types."""

    def __init__(self, device: Device, tuning: dict[str, int] | None = None):
        self.device = device
        self.tuning = tuning or gemm_tuning(device.vendor, device.kind)
        self._programs: dict[tuple[str, str, str], cl.Program] = {}
        self._lock = threading.Lock()
        self._local = threading.local()

    @property
    def tile(self) -> tuple[int, int]:
        """(rows, columns) of C one work-item computes."""
        t = self.tuning
        return t["GEMM_MR"] * t["GEMM_MB"], t["GEMM_NV"] * t["GEMM_VW"]

    def _kernel(self, a_dtype: str, b_dtype: str, c_dtype: str) -> cl.Kernel:
        key = (a_dtype, b_dtype, c_dtype)
        cache = getattr(self._local, "kernels", None)
        if cache is None:
            cache = self._local.kernels = {}
        k = cache.get(key)
        if k is None:
            with self._lock:
                prg = self._programs.get(key)
                if prg is None:
                    defines = {**self.tuning, "GEMM_A_DTYPE": GEMM_DTYPES[a_dtype],
                               "GEMM_B_DTYPE": GEMM_DTYPES[b_dtype], "GEMM_C_DTYPE": GEMM_DTYPES[c_dtype]}
                    opts = [f"-D{n}={v}" for n, v in defines.items()] + ["-cl-mad-enable"]
                    prg = self._programs[key] = cl.Program(self.device.context, kernel_source("gemm.cl")).build(
                        options=opts)
            k = cache[key] = cl.Kernel(prg, "gemm")
        return k

    def __call__(self, M: int, N: int, K: int, A: cl.Buffer, a_strides: tuple[int, int], B: cl.Buffer, ldb: int,
                 C: cl.Buffer, c_strides: tuple[int, int], *, alpha: float = 1.0, beta: float = 0.0,
                 dtypes: tuple[str, str, str] = ("float32", "float32", "float32"),
                 offsets: tuple[int, int, int] = (0, 0, 0), wait_for=None) -> cl.Event:
        """Enqueue C[M, N] = alpha * A[M, K] . B[K, N] + beta * C; strides and offsets in elements."""
        k = self._kernel(*dtypes)
        mt, nt = self.tile
        col_tiles, row_tiles = -(-N // nt), -(-M // mt)
        local_m = max(1, min(row_tiles, self.device.cl_device.max_work_group_size,
                             self.device.cl_device.max_work_item_sizes[1]))
        row_items = -(-row_tiles // local_m) * local_m   # OpenCL 1.2: local divides global
        k.set_args(np.uint32(M), np.uint32(N), np.uint32(K), np.float32(alpha), np.float32(beta),
                   A, np.uint64(offsets[0]), np.int64(a_strides[0]), np.int64(a_strides[1]),
                   B, np.uint64(offsets[1]), np.int64(ldb),
                   C, np.uint64(offsets[2]), np.int64(c_strides[0]), np.int64(c_strides[1]))
        return cl.enqueue_nd_range_kernel(self.device.queue, k, (max(col_tiles, 1), row_items), (1, local_m),
                                          wait_for=wait_for)
