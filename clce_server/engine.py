"""The loss engine: runs kernels/cross_entropy.cl and kernels/reduce_rows.cl on one OpenCL device.

A call goes prepare -> run_chunk (one or more row ranges) -> finish, so a scheduler can interleave
the chunks of a big batch with other work (a launch cannot be pre-empted); `cross_entropy` does
all three. Device time comes from OpenCL profiling events.

Memory: on devices that compute in host memory (PoCL's CPU device) the logits, targets and
gradient are wrapped with USE_HOST_PTR, so a 256 MB batch is neither copied in nor out; elsewhere
buffers come from the device's memory pool and are copied.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Iterator

import numpy as np
import pyopencl as cl

from . import semantics
from .device import Device, as_storage
from .hostmem import POOL

MF = cl.mem_flags


@dataclass
class LossResult:
    loss: np.ndarray                       # 0-d for mean/sum, row shape for 'none'; compute dtype
    grad: np.ndarray | None = None         # input's shape, grad_dtype
    lse: np.ndarray | None = None          # float32, row shape
    argmax: np.ndarray | None = None       # int64, row shape
    accuracy: float | None = None          # argmax == target over non-ignored rows (hard targets)
    z_loss: np.ndarray | None = None       # the z-loss part of `loss` (float32), when lse_square_scale > 0
    kernel_seconds: float = 0.0            # device time, from profiling events
    rows: int = 0


def _np_dtype(name: str) -> np.dtype:
    if name == "bfloat16":
        import ml_dtypes
        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(name)


@dataclass
class RowGroup:
    """A slab of whole samples (batch items n0..n1) whose buffers fit one device allocation."""

    n0: int
    n1: int
    row0: int                              # first row of the slab in the whole problem
    rows: int
    buffers: dict = field(default_factory=dict)
    grad_host: np.ndarray | None = None


@dataclass
class PreparedLoss:
    """A validated problem with its device buffers; run its chunks, then finish it."""

    problem: semantics.Problem
    device: Device
    want_grad: bool
    want_lse: bool
    want_argmax: bool
    groups: list[RowGroup] = field(default_factory=list)
    grad: np.ndarray | None = None
    kernel_seconds: float = 0.0
    done_rows: int = 0

    def chunks(self, target_seconds: float | None = None) -> Iterator[tuple[int, int, int]]:
        """(group, start, count) row ranges, each expected to take about target_seconds."""
        per_row = max(self.problem.classes, 1) / self.device.elements_per_second
        step = max(1, int(target_seconds / per_row)) if target_seconds else None
        if step is not None and self.rows_per_item > 1:   # ce_rows8 takes rows eight at a time
            step = -(-step // self.rows_per_item) * self.rows_per_item
        for gi, g in enumerate(self.groups):
            if step is None:
                yield gi, 0, g.rows
                continue
            for start in range(0, g.rows, step):
                yield gi, start, min(step, g.rows - start)

    @property
    def rows_per_item(self) -> int:
        """8 when the spatial-rows kernel runs (rows of one sample are adjacent per class)."""
        p = self.problem
        return 8 if (not self.device.tuning["CE_WG_PER_ROW"] and p.spatial > 1 and p.spatial % 8 == 0) else 1

    def release(self) -> None:
        for g in self.groups:
            for buf in g.buffers.values():
                if buf is not None:
                    buf.release()
            g.buffers.clear()


class LossEngine:
    """Fused cross-entropy forward + backward on one device."""

    def __init__(self, device: Device):
        self.device = device
        self._rate_lock = threading.Lock()
        if not hasattr(device, "elements_per_second"):
            device.elements_per_second = 2e8   # refined by every chunk that runs

    # ---- one call ----
    def cross_entropy(self, input, target, weight=None, ignore_index=-100, reduction="mean",
                      label_smoothing=0.0, **kw) -> LossResult:
        prep = self.prepare(input, target, weight, ignore_index, reduction, label_smoothing, **kw)
        try:
            for chunk in prep.chunks():
                self.run_chunk(prep, chunk)
            return self.finish(prep)
        finally:
            prep.release()

    # ---- the three steps ----
    def prepare(self, input: np.ndarray, target: np.ndarray, weight: np.ndarray | None = None,
                ignore_index: int = -100, reduction: str = "mean", label_smoothing: float = 0.0, *,
                return_grad: bool = False, grad_dtype: str | None = None, return_lse: bool = False,
                return_argmax: bool = False, lse_square_scale: float = 0.0,
                softcap: float | None = None) -> PreparedLoss:
        p = self._check(input, target, weight, ignore_index, reduction, label_smoothing,
                        grad_dtype=grad_dtype, lse_square_scale=lse_square_scale, softcap=softcap)
        dev = self.device
        prep = PreparedLoss(p, dev, bool(return_grad), bool(return_lse), bool(return_argmax))
        if p.rows == 0 or p.classes == 0:
            return prep
        if return_grad:   # pooled: a fresh 256 MB buffer pays a page fault per 4 KB in the kernel
            prep.grad = POOL.empty(p.input.shape, _np_dtype(p.grad_dtype))
        # Whole samples per group, as many as fit the device's largest allocation (PoCL: 2 GiB),
        # so batches of any size run, each group's offsets starting at 0.
        x = p.input.reshape(p.batch, -1)
        sample_bytes = max(x.shape[1] * max(x.itemsize, prep.grad.itemsize if return_grad else 0), 1)
        per_group = dev.cl_device.max_mem_alloc_size // sample_bytes
        if per_group < 1:
            raise RuntimeError(f"one sample of {sample_bytes} bytes exceeds the OpenCL device's largest "
                               f"allocation ({dev.cl_device.max_mem_alloc_size} bytes)")
        for n0 in range(0, p.batch, per_group):
            n1 = min(p.batch, n0 + per_group)
            g = RowGroup(n0, n1, n0 * p.spatial, (n1 - n0) * p.spatial)
            self._alloc_group(prep, g)
            prep.groups.append(g)
        return prep

    def _check(self, input, target, weight=None, ignore_index=-100, reduction="mean", label_smoothing=0.0, *,
               grad_dtype=None, lse_square_scale=0.0, softcap=None, return_grad=False, return_lse=False,
               return_argmax=False) -> semantics.Problem:
        """PyTorch's argument checks, then what this device can run (return_* are accepted so a
        request's keyword dict can be passed whole)."""
        p = semantics.check(input, target, weight, ignore_index, reduction, label_smoothing,
                            grad_dtype=grad_dtype, lse_square_scale=lse_square_scale, softcap=softcap)
        if "float64" in (p.compute_dtype, p.grad_dtype) and not self.device.has_fp64:
            raise RuntimeError(f"the OpenCL device {self.device.name!r} has no float64 support")
        return p

    def _alloc_group(self, prep: PreparedLoss, g: RowGroup) -> None:
        p, dev, b = prep.problem, self.device, g.buffers
        acc = np.dtype(np.float64 if p.compute_dtype == "float64" else np.float32)
        rows = slice(g.row0, g.row0 + g.rows)
        b["x"] = self._input_buffer(as_storage(p.input.reshape(p.batch, -1)[g.n0:g.n1]))
        b["tgt"] = self._input_buffer(p.targets[rows]) if p.targets is not None else None
        b["y"] = self._input_buffer(as_storage(p.soft_target.reshape(p.batch, -1)[g.n0:g.n1])) if p.soft else None
        b["w"] = self._input_buffer(p.weight) if p.weight is not None else None
        b["grad"] = None
        if prep.want_grad:
            g.grad_host = prep.grad.reshape(p.batch, -1)[g.n0:g.n1]
            b["grad"] = self._output_buffer(as_storage(g.grad_host))
        b["row_loss"] = dev.pool.allocate(g.rows * acc.itemsize)
        b["row_zloss"] = dev.pool.allocate(g.rows * acc.itemsize)
        b["row_lse"] = dev.pool.allocate(g.rows * 4) if prep.want_lse else None
        b["row_amax"] = dev.pool.allocate(g.rows * 4) if prep.want_argmax else None

    def _input_buffer(self, arr: np.ndarray) -> cl.Buffer:
        dev = self.device
        if dev.host_unified and arr.flags.writeable and arr.flags.c_contiguous:
            return cl.Buffer(dev.context, MF.READ_ONLY | MF.USE_HOST_PTR, hostbuf=arr)
        buf = dev.pool.allocate(max(arr.nbytes, 1))
        cl.enqueue_copy(dev.queue, buf, np.ascontiguousarray(arr), is_blocking=False)
        return buf

    def _output_buffer(self, host: np.ndarray) -> cl.Buffer:
        """Where a kernel writes `host`'s contents: `host` itself on devices that compute in host
        memory, else pooled device memory (read back by `_read_back`)."""
        dev = self.device
        if dev.host_unified:
            return cl.Buffer(dev.context, MF.WRITE_ONLY | MF.USE_HOST_PTR, hostbuf=host)
        return dev.pool.allocate(host.nbytes)

    def _read_back(self, buf: cl.Buffer, host: np.ndarray) -> None:
        q = self.device.queue
        if self.device.host_unified:
            # The kernel wrote into host memory; a map/unmap pair is OpenCL's coherence point.
            mapped, _ = cl.enqueue_map_buffer(q, buf, cl.map_flags.READ, 0, (host.nbytes,), np.uint8)
            mapped.base.release(q)
        else:
            cl.enqueue_copy(q, host, buf)

    def _reduce(self, dtype: str, b: dict, starts: np.ndarray, wait_for=None) -> tuple[np.ndarray, float]:
        """Deterministic per-segment sums of the per-row results (reduce_rows.cl): an array of
        (segments, 4) float64 — loss, z-loss, correct argmaxes — and the device seconds."""
        dev, q = self.device, self.device.queue
        red_dt = np.float64 if (dev.has_fp64 or dtype == "float64") else np.float32
        nseg = len(starts) - 1
        out = np.empty(4 * nseg, red_dt)
        seg_buf = cl.Buffer(dev.context, MF.READ_ONLY | MF.COPY_HOST_PTR, hostbuf=starts.astype(np.uint64))
        out_buf = dev.pool.allocate(out.nbytes)
        try:
            k = dev.kernel("reduce", dtype)
            k.set_args(b["row_loss"], b["row_zloss"], b["row_amax"], b["tgt"], seg_buf, out_buf)
            wg = dev.tuning["RED_WG_SIZE"]
            ev = cl.enqueue_nd_range_kernel(q, k, (wg * nseg,), (wg,), wait_for=wait_for)
            cl.enqueue_copy(q, out, out_buf, wait_for=[ev])
        finally:
            out_buf.release()
            seg_buf.release()
        return out.astype(np.float64).reshape(nseg, 4), (ev.profile.end - ev.profile.start) * 1e-9

    def run_chunk(self, prep: PreparedLoss, chunk: tuple[int, int, int]) -> float:
        """Launch the fused kernel over rows [start, start + count) of one group; device seconds."""
        p, dev = prep.problem, prep.device
        gi, start, count = chunk
        b = prep.groups[gi].buffers
        acc = np.float64 if p.compute_dtype == "float64" else np.float32
        per_item = prep.rows_per_item
        if start % per_item or count % per_item:
            raise ValueError(f"this problem runs {per_item} rows per work-item: chunk ({start}, {count}) "
                             "must be a multiple of that")
        k = dev.kernel("ce8" if per_item == 8 else "ce", p.compute_dtype,
                       p.grad_dtype if prep.want_grad else p.compute_dtype, p.softcap > 0)
        k.set_args(b["x"], b["tgt"], b["y"], b["w"], b["grad"], b["row_loss"], b["row_zloss"],
                   b["row_lse"], b["row_amax"], np.uint64(start), np.uint64(count),
                   np.uint32(p.classes), np.uint64(p.spatial), acc(p.label_smoothing), acc(p.weight_sum),
                   acc(p.loss_scale), acc(p.z_scale), acc(p.lse_square_scale), acc(p.softcap))
        ev = self._launch(k, count // per_item)
        ev.wait()
        secs = (ev.profile.end - ev.profile.start) * 1e-9
        prep.kernel_seconds += secs
        prep.done_rows += count
        if secs > 1e-4:
            with self._rate_lock:   # EWMA of elements/s sizes the next chunks
                rate = count * p.classes / secs
                dev.elements_per_second = 0.7 * dev.elements_per_second + 0.3 * rate
        return secs

    def finish(self, prep: PreparedLoss) -> LossResult:
        """Deterministic reductions on the device (groups summed on the host in order), read-back."""
        p, dev = prep.problem, prep.device
        loss_dt = _np_dtype(p.compute_dtype)
        res = LossResult(loss=np.array(0, loss_dt), kernel_seconds=prep.kernel_seconds, rows=p.rows)
        if p.rows == 0 or p.classes == 0:
            return self._degenerate(prep, res, loss_dt)
        if prep.done_rows != p.rows:
            raise RuntimeError(f"finish() after {prep.done_rows} of {p.rows} rows")
        acc = np.float64 if p.compute_dtype == "float64" else np.float32
        q = dev.queue
        sums = np.zeros(4, np.float64)
        row_loss = np.empty(p.rows, acc) if p.reduction == "none" else None
        row_z = np.empty(p.rows, acc) if p.reduction == "none" else None
        lse = np.empty(p.rows, np.float32) if prep.want_lse else None
        amax = np.empty(p.rows, np.int32) if prep.want_argmax else None
        for g in prep.groups:
            b = g.buffers
            out, secs = self._reduce(p.compute_dtype, b, np.array([0, g.rows]))
            res.kernel_seconds += secs
            sums += out[0]
            rows = slice(g.row0, g.row0 + g.rows)
            if row_loss is not None:
                cl.enqueue_copy(q, row_loss[rows], b["row_loss"])
                cl.enqueue_copy(q, row_z[rows], b["row_zloss"])
            if lse is not None:
                cl.enqueue_copy(q, lse[rows], b["row_lse"])
            if amax is not None:
                cl.enqueue_copy(q, amax[rows], b["row_amax"])
            if prep.want_grad:
                self._read_back(b["grad"], as_storage(g.grad_host))

        if p.reduction == "none":
            total = row_loss + row_z if p.lse_square_scale else row_loss
            res.loss = total.astype(loss_dt).reshape(p.row_shape)
            if p.lse_square_scale:
                res.z_loss = row_z.astype(np.float32).reshape(p.row_shape)
        else:
            with np.errstate(invalid="ignore", divide="ignore"):
                if p.reduction == "mean":
                    main = sums[0] / np.float64(p.denominator)
                    z = sums[1] / np.float64(p.valid_rows) if p.lse_square_scale else 0.0
                else:
                    main, z = sums[0], sums[1]
            res.loss = np.array(main + z).astype(loss_dt)
            if p.lse_square_scale:
                res.z_loss = np.array(z, np.float32)
        if lse is not None:
            res.lse = lse.reshape(p.row_shape)
        if amax is not None:
            res.argmax = amax.astype(np.int64).reshape(p.row_shape)
            if not p.soft:
                res.accuracy = float(sums[2]) / p.valid_rows if p.valid_rows else float("nan")
        res.grad = prep.grad
        return res

    @staticmethod
    def recycle(result: LossResult) -> None:
        """Give the result's gradient buffer back for reuse; the caller must not touch it again."""
        POOL.release(result.grad)
        result.grad = None

    # ---- many small requests, one launch ----
    @staticmethod
    def batch_key(p: semantics.Problem, want_grad: bool, want_lse: bool, want_argmax: bool):
        """Requests with equal keys can share one launch; None: this one runs alone. A shared
        launch has one set of kernel scalars, so everything they depend on is in the key."""
        if p.spatial != 1 or p.rows == 0 or p.classes == 0 or p.lse_square_scale:
            return None
        w = None if p.weight is None else p.weight.tobytes()
        return (p.classes, p.compute_dtype, p.soft, p.label_smoothing, p.softcap, w,
                want_grad, want_lse, want_argmax)

    def cross_entropy_many(self, requests: list[dict]) -> list:
        """Run several requests, coalescing the compatible ones into one launch each. `requests`
        are keyword dicts for `cross_entropy`; returns a LossResult or the exception, per request.

        A shared launch runs with reduction 'sum' scales and an fp32 (fp64) gradient; each
        request's slice is then scaled by its own 1/denominator and rounded once to its grad
        dtype, and its loss is its own segment of the deterministic row reduction."""
        out: list = [None] * len(requests)
        groups: dict = {}
        for i, kw in enumerate(requests):
            try:
                p = self._check(**kw)
            except Exception as exc:   # this request's argument error; the others go on
                out[i] = exc
                continue
            flags = (bool(kw.get("return_grad")), bool(kw.get("return_lse")), bool(kw.get("return_argmax")))
            key = self.batch_key(p, *flags)
            groups.setdefault(key if key is not None else ("alone", i), []).append((i, p, flags))
        for key, members in groups.items():
            if key[0] == "alone" or len(members) == 1:
                for i, _, _ in members:
                    try:
                        out[i] = self.cross_entropy(**requests[i])
                    except Exception as exc:
                        out[i] = exc
                continue
            try:
                for i, res in zip((m[0] for m in members), self._run_merged(members)):
                    out[i] = res
            except Exception as exc:   # a device failure hits the whole launch
                for i, _, _ in members:
                    out[i] = exc
        return out

    def _run_merged(self, members: list) -> list[LossResult]:
        dev, q = self.device, self.device.queue
        p0 = members[0][1]
        want_grad, want_lse, want_argmax = members[0][2]
        C, dt = p0.classes, p0.compute_dtype
        acc = np.float64 if dt == "float64" else np.float32
        sizes = [m[1].rows for m in members]
        starts = np.concatenate([[0], np.cumsum(sizes)]).astype(np.uint64)
        R = int(starts[-1])
        x = np.concatenate([as_storage(m[1].input).reshape(-1, C) for m in members])
        tgt = None if p0.soft else np.concatenate([m[1].targets for m in members])
        y = np.concatenate([as_storage(m[1].soft_target).reshape(-1, C) for m in members]) if p0.soft else None
        grad = np.empty((R, C), acc) if want_grad else None
        bufs = {"x": self._input_buffer(x), "tgt": self._input_buffer(tgt) if tgt is not None else None,
                "y": self._input_buffer(y) if y is not None else None,
                "w": self._input_buffer(p0.weight) if p0.weight is not None else None,
                "row_loss": dev.pool.allocate(R * np.dtype(acc).itemsize),
                "row_zloss": dev.pool.allocate(R * np.dtype(acc).itemsize),
                "row_lse": dev.pool.allocate(R * 4) if want_lse else None,
                "row_amax": dev.pool.allocate(R * 4) if want_argmax else None,
                "grad": self._output_buffer(grad) if want_grad else None}
        gdt = "float64" if dt == "float64" else "float32"
        try:
            k = dev.kernel("ce", dt, gdt if want_grad else dt, p0.softcap > 0)
            k.set_args(bufs["x"], bufs["tgt"], bufs["y"], bufs["w"], bufs["grad"], bufs["row_loss"],
                       bufs["row_zloss"], bufs["row_lse"], bufs["row_amax"], np.uint64(0), np.uint64(R),
                       np.uint32(C), np.uint64(1), acc(p0.label_smoothing), acc(p0.weight_sum),
                       acc(1.0), acc(1.0), acc(0.0), acc(p0.softcap))
            ev = self._launch(k, R)
            sums, red_secs = self._reduce(dt, bufs, starts, wait_for=[ev])
            row_loss = np.empty(R, acc) if any(m[1].reduction == "none" for m in members) else None
            if row_loss is not None:
                cl.enqueue_copy(q, row_loss, bufs["row_loss"])
            lse = amax = None
            if want_lse:
                lse = np.empty(R, np.float32)
                cl.enqueue_copy(q, lse, bufs["row_lse"])
            if want_argmax:
                amax = np.empty(R, np.int32)
                cl.enqueue_copy(q, amax, bufs["row_amax"])
            if want_grad:
                self._read_back(bufs["grad"], grad)
            secs = (ev.profile.end - ev.profile.start) * 1e-9 + red_secs
        finally:
            for b in bufs.values():
                if b is not None:
                    b.release()
        results = []
        for g, (_, p, _) in enumerate(members):
            a, b = int(starts[g]), int(starts[g + 1])
            loss_dt = _np_dtype(p.compute_dtype)
            res = LossResult(loss=np.array(0, loss_dt), kernel_seconds=secs, rows=p.rows)
            if p.reduction == "none":
                res.loss = row_loss[a:b].astype(loss_dt).reshape(p.row_shape)
            else:
                with np.errstate(invalid="ignore", divide="ignore"):
                    total = sums[g, 0]
                    res.loss = np.array(total / np.float64(p.denominator) if p.reduction == "mean" else total).astype(loss_dt)
            if want_grad:
                res.grad = (grad[a:b] * acc(p.loss_scale)).astype(_np_dtype(p.grad_dtype)).reshape(p.input.shape)
            if lse is not None:
                res.lse = lse[a:b].reshape(p.row_shape)
            if amax is not None:
                res.argmax = amax[a:b].astype(np.int64).reshape(p.row_shape)
                if not p.soft:
                    res.accuracy = float(sums[g, 2]) / p.valid_rows if p.valid_rows else float("nan")
            results.append(res)
        return results

    def _launch(self, k: cl.Kernel, rows: int) -> cl.Event:
        """rows: work-items for the work-item shapes, work-groups for the work-group-per-row one."""
        dev = self.device
        if dev.tuning["CE_WG_PER_ROW"]:
            wg = dev.tuning["CE_WG_SIZE"]
            return cl.enqueue_nd_range_kernel(dev.queue, k, (rows * wg,), (wg,))
        loc = dev.tuning.get("CE_LOCAL", 1)
        return cl.enqueue_nd_range_kernel(dev.queue, k, (rows,), (loc,) if rows % loc == 0 else None)

    def _degenerate(self, prep: PreparedLoss, res: LossResult, loss_dt: np.dtype) -> LossResult:
        """No rows or no classes: nothing to launch; answer as PyTorch does."""
        p = prep.problem
        if p.reduction == "none":
            res.loss = np.zeros(p.row_shape, loss_dt)
        elif p.reduction == "sum":
            res.loss = np.array(0, loss_dt)
        else:   # no rows: 0/0; rows of C == 0 probability targets: empty sums over the rows
            res.loss = np.array(np.nan if p.rows == 0 else 0.0, loss_dt)
        if prep.want_grad:
            res.grad = np.zeros(p.input.shape, _np_dtype(p.grad_dtype))
        if prep.want_lse:
            res.lse = np.full(p.row_shape, -np.inf, np.float32)
        if prep.want_argmax:
            res.argmax = np.zeros(p.row_shape, np.int64)
            res.accuracy = float("nan") if not p.soft else None
        if p.lse_square_scale:
            res.z_loss = np.zeros(p.row_shape if p.reduction == "none" else (), np.float32)
        return res
