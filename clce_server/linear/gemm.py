"""Matrix products on an OpenCL device for the fused linear cross-entropy: kernels/gemm.cl.

One kernel, `C = alpha * A . B + beta * C` (fp32 C) with B's rows contiguous and A and C at any
strides, serves the three products of a row chunk (clce_server/linear/engine.py). Chosen over CLBlast by
measurement (bench/bench_gemm.py): on PoCL's CPU device CLBlast has no tuned parameters, and
the best of its Xgemm parameters we tried through its override API stayed below this kernel.

Tunables are per device and per product, CLBlast style: GEMM_TUNING maps (vendor substring or
"*", device kind, product or "*") to the kernel's #ifndef defines; the first matching row wins.
The products are linear.py's: "forward" (logits^T = W . h^T, stored transposed), "dh" (dlogits .
W, K = the vocabulary) and "dW" (dlogits^T . h, A read transposed); anything else is "*".

GPU rows run gemm_local (work-group tiles in local memory; GEMM_LOCAL 1), cut to the device's
work-group and local-memory limits when read off it; GEMM_CLBLAST 1 runs the fp32 products
through CLBlast instead (pyclblast, the clce[gpu] extra), where it is installed. Which wins on
a GPU is for bench/bench_gemm.py to say once one is measured: the GPU rows are "guess:" until then.

Launch (gemm): one work-item per work-group. PoCL gives every work-item of a group its own copy of the
private arrays on one stack (measured: a 5.5 MB frame for 84 work-items of 64 KiB panels), so a
larger group multiplies the kernel's private B panel and overflows the stack at large M.
"""

from __future__ import annotations

import threading

import numpy as np
import pyopencl as cl

from ..rails.device import Device, kernel_source

#: gemm.cl's parameters, in its signature's order
GEMM_PARAMS = ("M", "N", "K", "alpha", "beta", "A", "a_off", "sam", "sak", "B", "b_off", "ldb",
               "C", "c_off", "scm", "scn")

#: element types the kernel reads (its GEMM_A_DTYPE / GEMM_B_DTYPE codes); C is float32
GEMM_DTYPES = {"float32": 0, "float16": 1, "bfloat16": 2}

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
        "GEMM_ROWS_FIRST": 0, "GEMM_LOCAL": 0, "GEMM_CLBLAST": 0}
_CPU_SOURCE = "measured: PoCL 3.1 CPU device, 2-core Xeon with AVX-512 (bench/bench_gemm.py)"
#: GPUs: gemm_local, work-group tiles in local memory. Never run on a GPU yet: the shapes are the
#: textbook SGEMM ones, and each is cut to the device's limits when read off it (`fit_to_device`).
_GPU = {**_CPU, "GEMM_LOCAL": 1, "GEMM_WGM": 16, "GEMM_WGN": 16, "GEMM_WPM": 4, "GEMM_WPN": 4, "GEMM_TK": 16}
#: (vendor substring or "*", kind, product or "*", defines, where the figures come from)
GEMM_TUNING: list[tuple[str, str, str, dict[str, int], str]] = [
    ("*", "cpu", "forward", {**_CPU, "GEMM_MB": 64, "GEMM_NB": 2, "GEMM_KC": 1024}, _CPU_SOURCE),
    ("*", "cpu", "dh", {**_CPU, "GEMM_MB": 86, "GEMM_KC": 1024}, _CPU_SOURCE),
    ("*", "cpu", "*", _CPU, _CPU_SOURCE),
    ("NVIDIA", "gpu", "*", _GPU,
     "guess: never run on an NVIDIA GPU; 64 x 64 tiles of C per work-group of 256 (8 warps), 4 x 4 "
     "outputs per work-item, K steps of 16 (8 KiB of local memory): the textbook SGEMM shape, the "
     "size of CLBlast's untuned Xgemm; CLBlast (GEMM_CLBLAST 1, clce[gpu]) is the alternative to "
     "measure against; checked under Oclgrind at this work-group size"),
    ("*", "gpu", "*", {**_GPU, "GEMM_WGM": 8},
     "guess: never run on a GPU; 32 x 64 tiles per work-group of 128 (2 AMD wavefronts, 4-8 Intel "
     "sub-groups), 4 x 4 outputs per work-item, K steps of 16; checked under Oclgrind"),
    ("*", "*", "*", _CPU, "guess: a device of another kind runs the CPU shape"),
]


def gemm_row(vendor: str, kind: str, product: str = "*") -> tuple[dict[str, int], str]:
    """The first row of GEMM_TUNING that matches the device and the product: (defines, source)."""
    for v, k, p, t, source in GEMM_TUNING:
        if (v == "*" or v.lower() in vendor.lower()) and k in ("*", kind) and p in ("*", product):
            return dict(t), source
    raise LookupError(kind)   # the table ends in ("*", "*", "*")


def gemm_tuning(vendor: str, kind: str, product: str = "*") -> dict[str, int]:
    """The defines of the first row of GEMM_TUNING that matches the device and the product."""
    return gemm_row(vendor, kind, product)[0]


def fit_to_device(tuning: dict[str, int], max_group: int, local_mem: int) -> tuple[dict[str, int], dict]:
    """A gemm_local row cut to what the device reports: the work-group halved (its larger side
    first) until the device's maximum work-group size holds it, then the K step halved until its
    tiles fit the local memory. Returns the defines and what was read off the device."""
    t = dict(tuning)
    if not t.get("GEMM_LOCAL"):
        return t, {}
    while t["GEMM_WGM"] * t["GEMM_WGN"] > max_group and t["GEMM_WGM"] * t["GEMM_WGN"] > 1:
        side = "GEMM_WGM" if t["GEMM_WGM"] >= t["GEMM_WGN"] else "GEMM_WGN"
        t[side] = max(1, t[side] // 2)

    def local_bytes() -> int:
        return 4 * t["GEMM_TK"] * (t["GEMM_WGM"] * t["GEMM_WPM"] + t["GEMM_WGN"] * t["GEMM_WPN"])

    while local_bytes() > local_mem and t["GEMM_TK"] > 1:
        t["GEMM_TK"] //= 2
    return t, {"max_work_group_size": max_group, "local_mem_bytes": local_mem,
               "work_group": t["GEMM_WGM"] * t["GEMM_WGN"], "local_bytes": local_bytes()}


def clblast_available() -> bool:
    """pyclblast (the clce[gpu] extra) imports."""
    try:
        import pyclblast  # noqa: F401
    except ImportError:
        return False
    return True


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
        row = {**gemm_tuning(self.device.vendor, self.device.kind, product), **self.override}
        d = self.device.cl_device
        return fit_to_device(row, int(d.max_work_group_size), int(d.local_mem_size))[0]

    def describe(self) -> dict:
        """Each product's defines, where the row's figures come from and what was read off the
        device (for /v1/info-style reports and the GPU runner)."""
        out = {}
        for product in GEMM_PRODUCTS:
            row, source = gemm_row(self.device.vendor, self.device.kind, product)
            d = self.device.cl_device
            t, read = fit_to_device({**row, **self.override}, int(d.max_work_group_size), int(d.local_mem_size))
            out[product] = {"defines": t, "source": source, "read_off_device": read,
                            "kernel": "clblast" if self._use_clblast(t, "float32", "float32")
                            else ("gemm_local" if t.get("GEMM_LOCAL") else "gemm")}
        return out

    def tile(self, product: str = "*") -> tuple[int, int]:
        """(rows, columns) of C one work-item (gemm) or one work-group (gemm_local) computes."""
        t = self.tuning(product)
        if t.get("GEMM_LOCAL"):
            return t["GEMM_WGM"] * t["GEMM_WPM"], t["GEMM_WGN"] * t["GEMM_WPN"]
        return t["GEMM_MR"] * t["GEMM_MB"], t["GEMM_NB"] * t["GEMM_NV"] * t["GEMM_VW"]

    @staticmethod
    def _use_clblast(tuning: dict[str, int], a_dtype: str, b_dtype: str) -> bool:
        """CLBlast where the row (or an override) asks for it, it is installed, and the product
        is fp32 (CLBlast has no bfloat16: those products run gemm.cl)."""
        return bool(tuning.get("GEMM_CLBLAST")) and a_dtype == b_dtype == "float32" and clblast_available()

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

    def scale_rows(self, n: int, V: int, s: cl.Buffer, C: cl.Buffer, ldc: int, wait_for=None) -> cl.Event:
        """Enqueue C[i, j] *= s[i] for the n rows of an (n, ldc) float32 buffer (gemm.cl's
        scale_rows: a per-row grad_output applied to a chunk's logit gradient)."""
        k = self._kernel(self.tuning("forward"), "float32", "float32", "scale_rows")
        k.set_args(np.uint32(n), np.uint32(V), s, C, np.int64(ldc))
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
        if self._use_clblast(tuning, *dtypes):
            return self._clblast(M, N, K, A, a_strides, B, ldb, C, c_strides, alpha, beta, offsets, wait_for)
        local = tuning.get("GEMM_LOCAL")
        k = self._kernel(tuning, *dtypes, "gemm_local" if local else "gemm")
        mt, nt = self.tile(product)
        grid = (max(-(-N // nt), 1), max(-(-M // mt), 1))
        group = (1, 1)
        if local:   # a work-group per tile: GEMM_WGN x GEMM_WGM work-items
            group = (tuning["GEMM_WGN"], tuning["GEMM_WGM"])
            grid = (grid[0] * group[0], grid[1] * group[1])
        elif tuning["GEMM_ROWS_FIRST"]:
            grid = grid[::-1]
        k.set_args(np.uint32(M), np.uint32(N), np.uint32(K), np.float32(alpha), np.float32(beta),
                   A, np.uint64(offsets[0]), np.int64(a_strides[0]), np.int64(a_strides[1]),
                   B, np.uint64(offsets[1]), np.int64(ldb),
                   C, np.uint64(offsets[2]), np.int64(c_strides[0]), np.int64(c_strides[1]))
        return cl.enqueue_nd_range_kernel(self.device.queue, k, grid, group, wait_for=wait_for)

    def _clblast(self, M, N, K, A, a_strides, B, ldb, C, c_strides, alpha, beta, offsets, wait_for) -> cl.Event:
        """The product through CLBlast's Xgemm (row-major; A and C each with one unit stride:
        the other is its leading dimension, transposed where the unit stride is the row's)."""
        import pyclblast

        if wait_for:
            cl.wait_for_events(list(wait_for))
        (sam, sak), (scm, scn) = a_strides, c_strides
        a_t = sam == 1 and sak != 1
        if scn == 1:        # C row-major: C = A . B
            return pyclblast.gemm(self.device.queue, M, N, K, _array(self.device, A), _array(self.device, B),
                                  _array(self.device, C), a_ld=sak if a_t else sam, b_ld=ldb, c_ld=scm,
                                  alpha=alpha, beta=beta, a_transp=a_t, b_transp=False,
                                  a_offset=offsets[0], b_offset=offsets[1], c_offset=offsets[2])
        # C stored transposed (the forward product's logits): C^T (N x M) = B^T . A^T
        return pyclblast.gemm(self.device.queue, N, M, K, _array(self.device, B), _array(self.device, A),
                              _array(self.device, C), a_ld=ldb, b_ld=sak if a_t else sam, c_ld=scn,
                              alpha=alpha, beta=beta, a_transp=True, b_transp=not a_t,
                              a_offset=offsets[1], b_offset=offsets[0], c_offset=offsets[2])


def _array(device: Device, buf: cl.Buffer):
    """A float32 pyopencl array over a whole buffer, 2-D as pyclblast checks (CLBlast itself reads
    only the buffer, the offsets and leading dimensions it is given)."""
    import pyopencl.array as cla

    return cla.Array(device.queue, (buf.size // 4, 1), np.float32, data=buf)
