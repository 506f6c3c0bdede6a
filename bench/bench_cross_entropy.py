"""Speed of the fused cross-entropy kernel against PyTorch, a naive OpenCL chain, and memcpy.

One run, the same data per shape, every method interleaved round-robin (best of --repeat), or
with --calls K in blocks of K calls per method (the first of each block dropped: it pays for the
method before it, e.g. a copy's dirty lines), --repeat blocks per method:

  fused      LossEngine.cross_entropy(x, t, return_grad=True).kernel_seconds: forward + backward,
             the gradient buffer recycled after each call as the server does
             in one launch plus the tiny on-device reduction (OpenCL profiling events).
  fused*     the same launches with the gradient's pages touched beforehand (engine.prepare,
             grad.fill, run_chunk, finish): a diagnostic that separates the cost of first-touching
             a freshly allocated gradient (part of `fused`, as it is of torch) from the kernel.
  torch      F.cross_entropy(x, t) + backward() on the CPU, default threads, wall clock.
  naive      an unfused OpenCL chain on the same device, as an eager framework runs it:
             log_softmax (materialised), gather + mean (the loss), then a backward kernel
             (softmax - onehot) / R from the stored log_softmax; the sum of its events. Checked
             against torch (loss and gradient) before it is timed.
  memcpy     the logits copied into a preallocated array: torch's copy_ (parallel, all cores) and
             numpy.copyto (one thread) on the host, and on the device clEnqueueCopyBuffer and a
             copy kernel (events).

Bandwidth: the fused kernel must read the logits and write the gradient, 2 * R * C * itemsize
bytes; a copy of the logits moves the same bytes (read + write), so fused/memcpy bandwidth is the
fraction of the memory system the kernel gets. The reference copy is the fastest copy on the
device's memory: the device's copies, and the host's (torch's parallel copy_ and numpy.copyto)
when the device computes in host memory, on the same cores. Ratios (the % of the copy, bf16
against fp32) are of medians of the interleaved runs; the table's times are the best.

    python bench/bench_cross_entropy.py                  # the three default shapes, fp32 + bf16
    python bench/bench_cross_entropy.py --quick          # small shapes, 2 repetitions
    python bench/bench_cross_entropy.py --shapes 4096x1000,8x21x256x256 --repeat 9 --device pocl
    python bench/bench_cross_entropy.py --shapes 2048x32000,8x21x256x256 --repeat 5 --calls 3
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402  (puts the repo on sys.path)

import numpy as np  # noqa: E402
import pyopencl as cl  # noqa: E402

DEFAULT_SHAPES = "4096x1000,2048x32000,8x21x256x256,2048x32000:bf16"
QUICK_SHAPES = "256x1000,512x8000,2x21x64x64,512x8000:bf16"

# ------------------------------------------------------------------------------------------------
# The naive chain: the baseline, deliberately not product code. Rows are seen as in
# kernels/cross_entropy.cl: input (N, C, S) -> R = N*S rows, row r = n*S + s starts at n*C*S + s,
# classes S apart. Shapes follow the device's tuning like the fused kernel does: one work-item per
# row (CPU; float8 loads when rows are contiguous) or one work-group per row (GPU).
NAIVE_SRC = r"""
#ifndef ROW_WG
#define ROW_WG 1
#endif
#ifndef CONTIG
#define CONTIG 0
#endif
#ifndef RED_WG
#define RED_WG 16
#endif

inline ulong row_base(ulong r, uint C, ulong S) {
    ulong n = r / S;
    return n * (ulong)C * S + (r - n * S);
}

inline float hmax8(float8 v) {
    float4 a = fmax(v.lo, v.hi);
    float2 b = fmax(a.lo, a.hi);
    return fmax(b.x, b.y);
}
inline float hsum8(float8 v) {
    float4 a = v.lo + v.hi;
    float2 b = a.lo + a.hi;
    return b.x + b.y;
}

#if ROW_WG > 1
inline float wg_reduce(float v, __local float *sc, int is_max) {
    uint l = get_local_id(0);
    sc[l] = v;
    barrier(CLK_LOCAL_MEM_FENCE);
    for (uint h = ROW_WG / 2; h > 0; h >>= 1) {
        if (l < h) sc[l] = is_max ? fmax(sc[l], sc[l + h]) : sc[l] + sc[l + h];
        barrier(CLK_LOCAL_MEM_FENCE);
    }
    float out = sc[0];
    barrier(CLK_LOCAL_MEM_FENCE);
    return out;
}
#endif

/* lp = x - logsumexp(x) per row (3 passes over x, one write of lp) */
__kernel void log_softmax_rows(__global const float *x, __global float *lp, uint C, ulong S) {
#if ROW_WG == 1
    ulong b = row_base(get_global_id(0), C, S);
#if CONTIG
    const __global float *xr = x + b;
    __global float *lr = lp + b;
    uint j = 0;
    float8 m8 = (float8)(-INFINITY);
    for (; j + 8 <= C; j += 8) m8 = fmax(m8, vload8(0, xr + j));
    float m = hmax8(m8);
    for (; j < C; ++j) m = fmax(m, xr[j]);
    float8 s8 = (float8)(0.0f);
    for (j = 0; j + 8 <= C; j += 8) s8 += exp(vload8(0, xr + j) - m);
    float s = hsum8(s8);
    for (; j < C; ++j) s += exp(xr[j] - m);
    float lse = m + log(s);
    for (j = 0; j + 8 <= C; j += 8) vstore8(vload8(0, xr + j) - lse, 0, lr + j);
    for (; j < C; ++j) lr[j] = xr[j] - lse;
#else
    float m = -INFINITY, s = 0.0f;
    for (uint j = 0; j < C; ++j) m = fmax(m, x[b + j * S]);
    for (uint j = 0; j < C; ++j) s += exp(x[b + j * S] - m);
    float lse = m + log(s);
    for (uint j = 0; j < C; ++j) lp[b + j * S] = x[b + j * S] - lse;
#endif
#else
    __local float sc[ROW_WG];
    ulong b = row_base(get_group_id(0), C, S);
    uint l = get_local_id(0);
    float m = -INFINITY, s = 0.0f;
    for (uint j = l; j < C; j += ROW_WG) m = fmax(m, x[b + j * S]);
    m = wg_reduce(m, sc, 1);
    for (uint j = l; j < C; j += ROW_WG) s += exp(x[b + j * S] - m);
    s = wg_reduce(s, sc, 0);
    float lse = m + log(s);
    for (uint j = l; j < C; j += ROW_WG) lp[b + j * S] = x[b + j * S] - lse;
#endif
}

/* loss = -mean_r lp[r, t_r]: one work-group gathers and sums (fixed order) */
__kernel void nll_mean(__global const float *lp, __global const long *t, __global float *loss,
                       ulong R, uint C, ulong S) {
    __local float sc[RED_WG];
    uint l = get_local_id(0);
    float acc = 0.0f;
    for (ulong r = l; r < R; r += RED_WG) acc -= lp[row_base(r, C, S) + (ulong)t[r] * S];
    sc[l] = acc;
    barrier(CLK_LOCAL_MEM_FENCE);
    for (uint h = RED_WG / 2; h > 0; h >>= 1) {
        if (l < h) sc[l] += sc[l + h];
        barrier(CLK_LOCAL_MEM_FENCE);
    }
    if (l == 0) loss[0] = sc[0] / (float)R;
}

/* grad = (exp(lp) - onehot(t)) / R, from the stored log_softmax */
__kernel void nll_softmax_backward(__global const float *lp, __global const long *t,
                                   __global float *grad, uint C, ulong S, float inv_r) {
#if ROW_WG == 1
    ulong r = get_global_id(0);
    ulong b = row_base(r, C, S);
    uint tt = (uint)t[r];
#if CONTIG
    const __global float *lr = lp + b;
    __global float *gr = grad + b;
    uint j = 0;
    for (; j + 8 <= C; j += 8) vstore8(exp(vload8(0, lr + j)) * inv_r, 0, gr + j);
    for (; j < C; ++j) gr[j] = exp(lr[j]) * inv_r;
    gr[tt] = (exp(lr[tt]) - 1.0f) * inv_r;
#else
    for (uint j = 0; j < C; ++j)
        grad[b + j * S] = (exp(lp[b + j * S]) - (j == tt ? 1.0f : 0.0f)) * inv_r;
#endif
#else
    ulong r = get_group_id(0);
    ulong b = row_base(r, C, S);
    uint tt = (uint)t[r];
    for (uint j = get_local_id(0); j < C; j += ROW_WG)
        grad[b + j * S] = (exp(lp[b + j * S]) - (j == tt ? 1.0f : 0.0f)) * inv_r;
#endif
}

/* memcpy reference: work-item i copies `per` consecutive uint4s (GPU: per = 1, coalesced) */
__kernel void copy16(__global const uint4 *src, __global uint4 *dst, ulong per, ulong n) {
    ulong i0 = get_global_id(0) * per, i1 = min(i0 + per, n);
    for (ulong i = i0; i < i1; ++i) dst[i] = src[i];
}
"""

MF = cl.mem_flags


def parse_shapes(spec: str) -> list[tuple[tuple[int, ...], str]]:
    """'4096x1000,8x21x256x256,2048x32000:bf16' -> [((4096, 1000), 'float32'), ...]"""
    out = []
    for part in spec.split(","):
        part = part.strip()
        if not part:
            continue
        dims, _, dt = part.partition(":")
        dt = {"": "float32", "fp32": "float32", "float32": "float32", "bf16": "bfloat16",
              "bfloat16": "bfloat16", "fp16": "float16", "float16": "float16"}[dt.strip().lower()]
        shape = tuple(int(d) for d in dims.lower().split("x"))
        if len(shape) < 2:
            raise SystemExit(f"shape {part!r}: need at least N x C")
        out.append((shape, dt))
    return out


def shape_label(shape: tuple[int, ...], dt: str) -> str:
    return "x".join(map(str, shape)) + ("" if dt == "float32" else f" {dt}")


class Naive:
    """The unfused chain on one device, with its buffers for one problem."""

    def __init__(self, dev, x: np.ndarray, t: np.ndarray):
        self.dev = dev
        ctx, q = dev.context, dev.queue
        self.N, self.C = x.shape[0], x.shape[1]
        self.S = int(np.prod(x.shape[2:], dtype=np.int64)) if x.ndim > 2 else 1
        self.R = self.N * self.S
        self.row_wg = dev.launch.local_size if dev.launch.rows == "group" else 1
        self.red_wg = 16 if dev.kind == "cpu" else 256
        contig = int(self.S == 1 and self.row_wg == 1)
        self.prg = _naive_program(dev, self.row_wg, contig, self.red_wg)
        self.k_lsm = cl.Kernel(self.prg, "log_softmax_rows")
        self.k_nll = cl.Kernel(self.prg, "nll_mean")
        self.k_bwd = cl.Kernel(self.prg, "nll_softmax_backward")
        n = x.size
        if dev.host_unified:
            self.x_buf = cl.Buffer(ctx, MF.READ_ONLY | MF.USE_HOST_PTR, hostbuf=x)
        else:
            self.x_buf = cl.Buffer(ctx, MF.READ_ONLY | MF.COPY_HOST_PTR, hostbuf=x)
        self.t_buf = cl.Buffer(ctx, MF.READ_ONLY | MF.COPY_HOST_PTR, hostbuf=t.astype(np.int64))
        self.lp_buf = cl.Buffer(ctx, MF.READ_WRITE, n * 4)
        self.g_buf = cl.Buffer(ctx, MF.READ_WRITE, n * 4)
        self.loss_buf = cl.Buffer(ctx, MF.READ_WRITE, 4)
        # Strided rows (S > 1), one work-item per row: a few neighbouring rows per work-group so
        # the compiler can vectorise across them (their elements are adjacent in memory).
        loc = 1
        if self.row_wg == 1 and self.S > 1:
            loc = next(l for l in (16, 8, 4, 2, 1) if self.R % l == 0)
        self.row_global, self.row_local = (self.R, (loc,)) if self.row_wg == 1 else (self.R * self.row_wg, (self.row_wg,))
        self.q = q
        # the first touch of lp/grad outside the timed runs
        for b in (self.lp_buf, self.g_buf):
            cl.enqueue_fill_buffer(q, b, np.float32(0), 0, n * 4)
        q.finish()

    def run(self) -> float:
        """One forward + backward; the device seconds of the three launches."""
        q, C, S, R = self.q, np.uint32(self.C), np.uint64(self.S), self.R
        self.k_lsm.set_args(self.x_buf, self.lp_buf, C, S)
        e1 = cl.enqueue_nd_range_kernel(q, self.k_lsm, (self.row_global,), self.row_local)
        self.k_nll.set_args(self.lp_buf, self.t_buf, self.loss_buf, np.uint64(R), C, S)
        e2 = cl.enqueue_nd_range_kernel(q, self.k_nll, (self.red_wg,), (self.red_wg,))
        self.k_bwd.set_args(self.lp_buf, self.t_buf, self.g_buf, C, S, np.float32(1.0 / R))
        e3 = cl.enqueue_nd_range_kernel(q, self.k_bwd, (self.row_global,), self.row_local)
        e3.wait()
        e2.wait()
        return sum((e.profile.end - e.profile.start) * 1e-9 for e in (e1, e2, e3))

    def results(self, shape) -> tuple[float, np.ndarray]:
        loss = np.empty(1, np.float32)
        grad = np.empty(shape, np.float32)
        cl.enqueue_copy(self.q, loss, self.loss_buf)
        cl.enqueue_copy(self.q, grad, self.g_buf)
        return float(loss[0]), grad

    def release(self) -> None:
        for b in (self.x_buf, self.t_buf, self.lp_buf, self.g_buf, self.loss_buf):
            b.release()


_PROGRAMS: dict = {}


def _naive_program(dev, row_wg: int, contig: int, red_wg: int) -> cl.Program:
    key = (id(dev), row_wg, contig, red_wg)
    if key not in _PROGRAMS:
        _PROGRAMS[key] = cl.Program(dev.context, NAIVE_SRC).build(
            options=[f"-DROW_WG={row_wg}", f"-DCONTIG={contig}", f"-DRED_WG={red_wg}"])
    return _PROGRAMS[key]


class DeviceCopy:
    """The logits copied on the device: clEnqueueCopyBuffer and a copy kernel (both events)."""

    def __init__(self, dev, x_storage: np.ndarray):
        ctx = dev.context
        self.q = dev.queue
        self.nbytes = x_storage.nbytes
        flags = MF.READ_ONLY | (MF.USE_HOST_PTR if dev.host_unified else MF.COPY_HOST_PTR)
        self.src = cl.Buffer(ctx, flags, hostbuf=x_storage)
        self.dst = cl.Buffer(ctx, MF.READ_WRITE, self.nbytes)
        cl.enqueue_fill_buffer(self.q, self.dst, np.uint8(0), 0, self.nbytes)
        self.n16 = self.nbytes // 16
        prg = _naive_program(dev, 1, 0, 16)
        self.k = cl.Kernel(prg, "copy16")
        if dev.kind == "cpu":   # one contiguous block per work-item, a few per core
            items = max(1, dev.cl_device.max_compute_units * 4)
            self.per = -(-self.n16 // items)
        else:
            self.per = 1
        self.items = -(-self.n16 // self.per)
        self.q.finish()

    def enqueue_copy(self) -> float:
        ev = cl.enqueue_copy(self.q, self.dst, self.src, byte_count=self.n16 * 16)
        ev.wait()
        return (ev.profile.end - ev.profile.start) * 1e-9

    def kernel(self) -> float:
        self.k.set_args(self.src, self.dst, np.uint64(self.per), np.uint64(self.n16))
        ev = cl.enqueue_nd_range_kernel(self.q, self.k, (self.items,), None)
        ev.wait()
        return (ev.profile.end - ev.profile.start) * 1e-9

    def release(self) -> None:
        self.src.release()
        self.dst.release()


def make_data(shape, dt: str, seed: int = 0):
    import torch

    rng = np.random.default_rng(seed)
    x32 = (rng.standard_normal(shape, dtype=np.float32) * 2.0)
    t = rng.integers(0, shape[1], (shape[0], *shape[2:]), dtype=np.int64)
    if dt == "float32":
        x_np = x32
        x_t = torch.from_numpy(x_np)
    elif dt == "bfloat16":
        import ml_dtypes

        x_np = x32.astype(ml_dtypes.bfloat16)
        x_t = torch.from_numpy(x_np.view(np.int16)).view(torch.bfloat16)
    elif dt == "float16":
        x_np = x32.astype(np.float16)
        x_t = torch.from_numpy(x_np)
    else:
        raise ValueError(dt)
    return x_np, t, x_t, torch.from_numpy(t)


def bench_shape(dev, engine, shape, dt, repeat, progress, verify=True, calls: int = 0) -> dict:
    import torch.nn.functional as F

    from clce_server.rails.device import as_storage
    from clce_server.rails.hostmem import HostPool

    pool = HostPool()   # as the server's: gradient buffers reused with their pages mapped

    def give_back(grad):
        if pool.pooled(grad.nbytes):   # buffers under the pool's minimum are not the pool's
            pool.release(grad)

    x_np, t_np, x_t, t_t = make_data(shape, dt)
    itemsize = x_np.dtype.itemsize
    nbytes = x_np.size * itemsize
    rec: dict = {"shape": list(shape), "dtype": dt, "rows": int(t_np.size), "classes": shape[1],
                 "bytes_logits": nbytes, "bytes_moved": 2 * nbytes, "notes": []}

    # ---- the methods ----
    def fused():
        # as the server does: the gradient buffer goes back to the pool once used, so steady-state
        # calls reuse mapped pages (fused* below touches them explicitly, as a cross-check)
        grad = pool.empty(x_np.shape, x_np.dtype)
        res = engine.cross_entropy(x_np, t_np, return_grad=True, grad_out=grad)
        give_back(grad)
        return res.kernel_seconds

    def fused_prefaulted():
        grad = pool.empty(x_np.shape, x_np.dtype)
        prep = engine.prepare(x_np, t_np, return_grad=True, grad_out=grad)
        try:
            prep.grad.reshape(-1).view(np.uint8).fill(0)   # touch the gradient's pages first
            secs = 0.0
            for ch in prep.chunks():
                secs += engine.run_chunk(prep, ch)
            res = engine.finish(prep)
        finally:
            prep.release()
        give_back(grad)   # else `fused` pays fresh pages
        return res.kernel_seconds

    xr = x_t.detach().clone().requires_grad_(True)

    def torch_fb():
        xr.grad = None
        loss = F.cross_entropy(xr, t_t)
        loss.backward()
        return None

    x_host = np.ascontiguousarray(as_storage(x_np))
    dst = np.empty_like(x_host)
    dst.fill(0)

    def np_copy():
        np.copyto(dst, x_host)
        return None

    import torch

    x_host_t, dst_t = torch.from_numpy(x_host), torch.from_numpy(dst)

    def torch_copy():   # parallel over torch's threads: the fastest host copy on these cores
        dst_t.copy_(x_host_t)
        return None

    copies = DeviceCopy(dev, x_host)
    naive = None
    methods = {"fused": fused, "fused_prefaulted": fused_prefaulted, "torch": torch_fb}
    if dt == "float32":
        naive = Naive(dev, x_np, t_np)
        methods["naive"] = naive.run
    else:
        rec["notes"].append("naive chain: fp32 only (skipped for " + dt + ")")
        x32 = np.asarray(x_np, np.float32)

        def fused_fp32():
            # the same values in float32, interleaved: half-precision kernel time against fp32's
            grad = pool.empty(x32.shape, x32.dtype)
            res = engine.cross_entropy(x32, t_np, return_grad=True, grad_out=grad)
            give_back(grad)
            return res.kernel_seconds

        methods["fused_fp32"] = fused_fp32
    methods.update({"memcpy_torch": torch_copy, "memcpy_numpy": np_copy,
                    "memcpy_cl_enqueue_copy": copies.enqueue_copy, "memcpy_cl_kernel": copies.kernel})

    # ---- correctness, before timing ----
    if verify:
        xv = x_t.detach().clone().requires_grad_(True)
        ref_t = F.cross_entropy(xv.float() if dt != "float32" else xv, t_t)
        ref_t.backward()
        ref = ref_t.item()
        g_ref = xv.grad.float().numpy()
        res = engine.cross_entropy(x_np, t_np, return_grad=True)
        g = np.asarray(res.grad, dtype=np.float32)
        tol = 1e-5 if dt == "float32" else 2e-2          # grad, relative to its largest element
        ltol = 1e-4 if dt == "float32" else 8e-3         # loss: the loss comes back in the input dtype
        scale = float(np.abs(g_ref).max())
        rec["check_fused"] = {"loss": float(np.asarray(res.loss, np.float32)), "loss_torch": float(ref),
                              "grad_max_abs_err_rel": float(np.abs(g - g_ref).max() / scale)}
        ok = abs(float(np.asarray(res.loss, np.float32)) - float(ref)) <= ltol * abs(float(ref)) + 1e-6 \
            and rec["check_fused"]["grad_max_abs_err_rel"] <= tol
        rec["check_fused"]["ok"] = bool(ok)
        if naive is not None:
            naive.run()
            nl, ng = naive.results(shape)
            err = float(np.abs(ng - g_ref).max() / scale)
            ok = abs(nl - float(ref)) <= 1e-4 * abs(float(ref)) + 1e-6 and err <= 1e-4
            rec["check_naive"] = {"loss": nl, "loss_torch": float(ref), "grad_max_abs_err_rel": err,
                                  "ok": bool(ok)}
            if not ok:
                raise AssertionError(f"the naive chain disagrees with torch at {shape}: {rec['check_naive']}")
            del ng
        del g, g_ref, xv

    # calls > 1: `repeat` blocks of `calls` calls per method, the first of each block dropped (it
    # pays for the method before it: a copy leaves the next method its dirty lines and a cold
    # cache); else round-robin, one call per method per round
    rec["load_before"] = os.getloadavg()[0]
    samples = (common.blocks(methods, repeat, calls, progress=progress) if calls > 1
               else common.round_robin(methods, repeat, progress=progress))
    rec["load_after"] = os.getloadavg()[0]
    rec["seconds"] = {k: common.stats(v) for k, v in samples.items()}
    rec["samples"] = samples
    best = {k: v["min"] for k, v in rec["seconds"].items()}
    f = best["fused"]
    rec["speedup_vs_torch"] = best["torch"] / f
    rec["speedup_vs_naive"] = best["naive"] / f if "naive" in best else None
    # kernel against kernel: the naive chain reuses its (already touched) buffers, fused* too
    rec["speedup_vs_naive_prefaulted"] = best["naive"] / best["fused_prefaulted"] if "naive" in best else None
    rec["speedup_vs_torch_prefaulted"] = best["torch"] / best["fused_prefaulted"]
    # ratios of medians: one slow or lucky call moves neither side
    med = {k: v["median"] for k, v in rec["seconds"].items()}
    rec["time_vs_fp32"] = med["fused"] / med["fused_fp32"] if "fused_fp32" in med else None
    bw = {k: 2 * nbytes / med[k] for k in med if k.startswith(("fused", "memcpy"))}
    rec["bandwidth_gbs"] = {k: v / 1e9 for k, v in bw.items()}
    ref_keys = ["memcpy_cl_enqueue_copy", "memcpy_cl_kernel"] + (["memcpy_torch", "memcpy_numpy"]
                                                                 if dev.host_unified else [])
    ref_key = max(ref_keys, key=lambda k: bw[k])
    rec["memcpy_reference"] = ref_key
    rec["fused_pct_of_memcpy"] = 100 * bw["fused"] / bw[ref_key]
    rec["fused_prefaulted_pct_of_memcpy"] = 100 * bw["fused_prefaulted"] / bw[ref_key]
    rec["fused_pct_of_each_memcpy"] = {k: 100 * bw["fused"] / bw[k] for k in bw if k.startswith("memcpy")}

    copies.release()
    if naive is not None:
        naive.release()
    return rec


TARGETS = [
    # (name, shape label, key, threshold, description)
    ("torch_2048x32000", "2048x32000", "speedup_vs_torch", 5.0, "fused >= 5x faster than torch fwd+bwd at 2048x32000 fp32"),
    ("torch_4096x1000", "4096x1000", "speedup_vs_torch", 2.0, "fused >= 2x faster than torch fwd+bwd at 4096x1000 fp32"),
    ("naive", "*", "speedup_vs_naive", 4.0, "fused >= 4x faster than the naive OpenCL chain (every fp32 shape)"),
    ("bandwidth_2048x32000", "2048x32000", "fused_pct_of_memcpy", 80.0, "fused >= 80% of the fastest copy at 2048x32000 fp32"),
    ("bandwidth_8x21x256x256", "8x21x256x256", "fused_pct_of_memcpy", 60.0, "fused >= 60% of the fastest copy at 8x21x256x256 fp32"),
]
#: (shape label, dtype): the half-precision kernel time must not exceed fp32's at the same shape
HALF_TARGETS = [("2048x32000", "bfloat16")]


def evaluate_targets(records: list[dict]) -> list[dict]:
    out = []
    for name, label, key, thr, desc in TARGETS:
        recs = [r for r in records if r["dtype"] == "float32" and r.get(key) is not None
                and (label == "*" or r["label"] == label)]
        if not recs:
            out.append({"target": name, "description": desc, "value": None, "threshold": thr, "result": "n/a"})
            continue
        val = min(r[key] for r in recs)
        worst = min(recs, key=lambda r: r[key])["label"]
        out.append({"target": name, "description": desc, "value": val, "threshold": thr, "at": worst,
                    "result": common.verdict(val >= thr)})
    for label, dt in HALF_TARGETS:
        recs = [r for r in records if r["dtype"] == dt and r["label"] == label and r.get("time_vs_fp32")]
        val = recs[0]["time_vs_fp32"] if recs else None
        out.append({"target": f"{dt}_vs_fp32_{label}", "value": val, "threshold": 1.0, "at": label if recs else None,
                    "description": f"{dt} kernel time <= fp32's at {label} (ratio, interleaved)",
                    "result": common.verdict(None if val is None else val <= 1.0)})
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", help=f"comma-separated NxC[xd1..] [:bf16] (default {DEFAULT_SHAPES})")
    ap.add_argument("--repeat", type=int, help="timed repetitions per method, round-robin (default 7; --quick 2); "
                                               "with --calls, the number of blocks")
    ap.add_argument("--calls", type=int, default=0,
                    help="time in blocks of this many calls in a row per method (>= 2), the first of each "
                         "block dropped, the methods' order rotating between blocks (common.blocks); "
                         "default: round-robin")
    ap.add_argument("--device", help="OpenCL device selector, as CLCE_DEVICE (default: the best that builds)")
    ap.add_argument("--out", type=Path, default=common.RESULTS,
                    help="output directory for cross_entropy.json / .png (default bench/results)")
    ap.add_argument("--quick", action="store_true", help="small shapes, 2 repetitions: a smoke run")
    ap.add_argument("--no-verify", action="store_true", help="skip the correctness checks against torch")
    args = ap.parse_args(argv)
    spec = args.shapes or (QUICK_SHAPES if args.quick else DEFAULT_SHAPES)
    repeat = args.repeat or (2 if args.quick else 7)
    shapes = parse_shapes(spec)

    import torch
    from tqdm import tqdm

    from clce_server.rails.device import open_devices
    from clce_server.cross_entropy.engine import LossEngine

    t0 = time.perf_counter()
    dev = open_devices(args.device)[0]
    engine = LossEngine(dev)
    print(f"device: {dev.name} [{dev.platform}] kind={dev.kind} CUs={dev.cl_device.max_compute_units} "
          f"tuning={dev.tuning.describe()}; torch {torch.__version__} threads={torch.get_num_threads()}", flush=True)

    methods_per_shape = 8   # fp32 shapes: naive; other dtypes: fused on the same values in fp32
    if args.calls == 1 or args.calls < 0:
        ap.error("--calls needs at least 2 (the first call of a block is dropped)")
    per_method = repeat * args.calls if args.calls > 1 else repeat + 1
    total = sum(per_method * methods_per_shape for _, dt in shapes)
    records = []
    with tqdm(total=total, desc="cross_entropy", unit="call", dynamic_ncols=True) as bar:
        for shape, dt in shapes:
            bar.set_postfix_str(shape_label(shape, dt))
            rec = bench_shape(dev, engine, shape, dt, repeat, bar, verify=not args.no_verify, calls=args.calls)
            rec["label"] = "x".join(map(str, shape))
            records.append(rec)

    headers = ["shape", "fused ms", "fused* ms", "torch ms", "naive ms", "fused/fp32", "torch/fused", "naive/fused", "naive/fused*",
               "fused GB/s", "copy GB/s (torch/np/cl/kern)", "% of copy", "fused* %", "check"]
    rows = []
    for r in records:
        b = {k: v["min"] for k, v in r["seconds"].items()}
        bw = r["bandwidth_gbs"]
        chk = [("fused", r.get("check_fused")), ("naive", r.get("check_naive"))]
        rows.append([
            shape_label(tuple(r["shape"]), r["dtype"]), common.fmt_ms(b["fused"]),
            common.fmt_ms(b["fused_prefaulted"]), common.fmt_ms(b["torch"]), common.fmt_ms(b.get("naive")),
            f"{r['time_vs_fp32']:.2f}" if r.get("time_vs_fp32") else "-",
            common.fmt_ratio(r["speedup_vs_torch"]), common.fmt_ratio(r["speedup_vs_naive"]),
            common.fmt_ratio(r["speedup_vs_naive_prefaulted"]),
            f"{bw['fused']:.1f}",
            f"{bw['memcpy_torch']:.1f}/{bw['memcpy_numpy']:.1f}/{bw['memcpy_cl_enqueue_copy']:.1f}/{bw['memcpy_cl_kernel']:.1f}",
            f"{r['fused_pct_of_memcpy']:.0f}%", f"{r['fused_prefaulted_pct_of_memcpy']:.0f}%",
            " ".join(f"{n}:{'ok' if c['ok'] else 'BAD'}" for n, c in chk if c) or "-",
        ])
    policy = (f"{repeat} blocks of {args.calls} calls, the first of each dropped" if args.calls > 1
              else f"best of {repeat} (interleaved)")
    loads = ", ".join(f"{r['label']}{'' if r['dtype'] == 'float32' else ':' + r['dtype']} "
                      f"{r['load_before']:.1f}-{r['load_after']:.1f}" for r in records)
    common.print_table(f"cross-entropy fwd+bwd, {policy}; device {dev.name}", headers, rows)
    print(f"load average (1 min) before-after each shape: {loads}")
    print("fused: LossResult.kernel_seconds; fused*: the same with the gradient's pages touched beforehand; "
          "torch: wall clock; naive: sum of its 3 kernels' events (its buffers are allocated and touched once, "
          "so naive/fused* compares kernels alike).\nBandwidth (medians) counts 2 x logits bytes "
          "(read logits + write gradient; a copy moves the same). % of copy: medians, against the fastest copy "
          f"on the device's memory ({', '.join(sorted({r['memcpy_reference'] for r in records}))}).")
    for r in records:
        for n in r["notes"]:
            print(f"  {r['label']} {r['dtype']}: {n}")

    targets = evaluate_targets(records)
    print("\ntargets (reported, not asserted):")
    for tg in targets:
        val = "-" if tg["value"] is None else f"{tg['value']:.2f}"
        at = f" (worst at {tg['at']})" if tg.get("at") else ""
        print(f"  {tg['result']:4}  {tg['description']}: {val}{at}")

    out_dir = args.out
    doc = {"benchmark": "cross_entropy", "repeat": repeat, "calls": args.calls, "quick": args.quick,
           "device": dev.describe(),
           "machine": common.machine_info(), "results": records, "targets": targets,
           "elapsed_s": time.perf_counter() - t0}
    jp = common.write_json(out_dir / "cross_entropy.json", doc)
    groups = [shape_label(tuple(r["shape"]), r["dtype"]) for r in records]
    series = {}
    for key, name in [("fused", "fused (kernel_seconds)"), ("torch", "torch CPU fwd+bwd"),
                      ("naive", "naive OpenCL chain"), ("memcpy_cl_enqueue_copy", "memcpy (cl copy)"),
                      ("memcpy_torch", "memcpy (torch copy_)"), ("memcpy_numpy", "memcpy (numpy)")]:
        series[name] = [r["seconds"][key]["min"] * 1e3 if key in r["seconds"] else None for r in records]
    annotate = {"fused (kernel_seconds)": [f"{r['fused_pct_of_memcpy']:.0f}% bw" for r in records],
                "torch CPU fwd+bwd": [f"{1 / r['speedup_vs_torch']:.2f}x" for r in records],
                "naive OpenCL chain": [f"{1 / r['speedup_vs_naive']:.2f}x" if r["speedup_vs_naive"] else ""
                                       for r in records]}
    # the project's one ratio convention (README, "How fast"): fused's time over the other's
    pp = common.bar_plot(out_dir / "cross_entropy.png", groups, series, annotate=annotate,
                         title=f"cross-entropy fwd+bwd on {dev.name} (best of {repeat}; labels: fused's time "
                               "over the bar's, lower is better)")
    print(f"\nwrote {jp} and {pp} ({time.perf_counter() - t0:.0f}s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
