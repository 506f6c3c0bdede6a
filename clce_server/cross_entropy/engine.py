"""The loss engine: runs kernels/cross_entropy.cl and kernels/reduce_rows.cl on one OpenCL device.

A call goes prepare -> run_chunk (one or more row ranges) -> finish, so a scheduler can interleave
the chunks of a big batch with other work (a launch cannot be pre-empted); `cross_entropy` does
all three. `cross_entropy_many` runs several small requests in one launch. Both paths share the
layers below them:

  _RowBlock.allocate   device buffers for a range of rows (inputs, gradient, per-row outputs)
  _launch_rows         the fused kernel over some of those rows, its arguments set by name
  _reduce / _read_rows the deterministic row sums per segment, and the per-row read-back
  _assemble            one request's LossResult from its sums and its slice of the rows

Device time comes from OpenCL profiling events. Errors: bad arguments raise `ArgumentError`
(its `.error` is what PyTorch raises), a failing device raises `DeviceError`.

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

from clce_wire import reduction
from clce_wire.options import coalescing_key

from . import semantics
from ..rails.device import Device, as_storage
from ..rails.errors import ArgumentError, device_faults

MF = cl.mem_flags

#: the fused kernels' parameters, in the order of CE_KERNEL_PARAMS (kernels/cross_entropy.cl), which every shape takes
CE_PARAMS = ("x", "target", "soft_target", "weight", "grad", "row_loss", "row_zloss", "row_lse", "row_argmax",
             "scratch", "row0", "nrows", "classes", "spatial", "eps", "weight_sum", "loss_scale", "z_scale", "z_coef",
             "softcap")
#: reduce_rows's parameters, in order
REDUCE_PARAMS = ("row_loss", "row_zloss", "row_argmax", "target", "seg_start", "out")


def set_args(kernel: cl.Kernel, params: tuple[str, ...], **args) -> None:
    """Set a kernel's arguments by name; `params` is its signature's order."""
    if set(args) != set(params):
        raise TypeError(f"kernel arguments: missing {sorted(set(params) - set(args))}, "
                        f"unknown {sorted(set(args) - set(params))}")
    kernel.set_args(*(args[name] for name in params))


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
    block_sums: np.ndarray | None = None   # (blocks, 4) float64 row sums per REDUCE_BLOCK_ROWS rows (finish)


def _np_dtype(name: str) -> np.dtype:
    if name == "bfloat16":
        import ml_dtypes
        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(name)


def _acc_dtype(compute_dtype: str) -> type:
    """The kernels' accumulation type: double for fp64 input, float otherwise."""
    return np.float64 if compute_dtype == "float64" else np.float32


@dataclass
class _RowBlock:
    """Device buffers for a contiguous range of rows: what the fused kernel reads and writes."""

    row0: int                              # first row of the block in the whole problem
    rows: int
    x: cl.Buffer | None = None
    target: cl.Buffer | None = None
    soft_target: cl.Buffer | None = None
    weight: cl.Buffer | None = None
    grad: cl.Buffer | None = None
    row_loss: cl.Buffer | None = None
    row_zloss: cl.Buffer | None = None
    row_lse: cl.Buffer | None = None
    row_argmax: cl.Buffer | None = None
    grad_host: np.ndarray | None = None    # where `grad` lands on the host

    _BUFFERS = ("x", "target", "soft_target", "weight", "grad", "row_loss", "row_zloss", "row_lse", "row_argmax")

    @classmethod
    def allocate(cls, dev: Device, row0: int, rows: int, x: np.ndarray, target: np.ndarray | None,
                 soft_target: np.ndarray | None, weight: np.ndarray | None, grad_host: np.ndarray | None,
                 acc: type, want_lse: bool, want_argmax: bool, in_place: bool = False) -> "_RowBlock":
        """x / soft_target / grad_host are these rows' storage (bf16 as uint16 bits); target has
        one int32 per row. `in_place`: grad_host is x's own memory, one buffer serves both."""
        b = cls(row0, rows, grad_host=grad_host)
        try:
            if in_place:
                b.x = b.grad = cl.Buffer(dev.context, MF.READ_WRITE | MF.USE_HOST_PTR, hostbuf=x)
            else:
                b.x = _input_buffer(dev, x)
            b.target = _input_buffer(dev, target) if target is not None else None
            b.soft_target = _input_buffer(dev, soft_target) if soft_target is not None else None
            b.weight = _input_buffer(dev, weight) if weight is not None else None
            if not in_place:
                b.grad = _output_buffer(dev, grad_host) if grad_host is not None else None
            b.row_loss = dev.pool.allocate(rows * np.dtype(acc).itemsize)
            b.row_zloss = dev.pool.allocate(rows * np.dtype(acc).itemsize)
            b.row_lse = dev.pool.allocate(rows * 4) if want_lse else None
            b.row_argmax = dev.pool.allocate(rows * 4) if want_argmax else None
        except BaseException:
            b.release()
            raise
        return b

    def buffer_args(self) -> dict:
        return {name: getattr(self, name) for name in self._BUFFERS}

    @property
    def in_place(self) -> bool:
        return self.grad is not None and self.grad is self.x

    def release(self) -> None:
        if self.in_place:
            self.grad = None        # the same buffer as x: released once
        for name in self._BUFFERS:
            buf = getattr(self, name)
            if buf is not None:
                buf.release()
                setattr(self, name, None)


def _input_buffer(dev: Device, arr: np.ndarray) -> cl.Buffer:
    if dev.host_unified and arr.flags.writeable and arr.flags.c_contiguous:
        return cl.Buffer(dev.context, MF.READ_ONLY | MF.USE_HOST_PTR, hostbuf=arr)
    return to_device(dev, arr)[0]


def to_device(dev: Device, arr: np.ndarray, buf: cl.Buffer | None = None, *, queue: cl.CommandQueue | None = None,
              wait_for=None) -> tuple[cl.Buffer, cl.Event]:
    """The discrete-memory upload both operations use: `arr` (bf16 as its bits) copied into
    `buf`, or into a buffer from the device's pool, without blocking. The copy runs on `queue`
    (the device's, or a transfer queue of the caller's, to overlap with kernels) after
    `wait_for`; the returned event says when it is done (pyopencl's event keeps `arr` alive
    until then, and the caller must not write `arr` before it)."""
    host = np.ascontiguousarray(as_storage(arr))
    own = buf is None
    if own:
        buf = dev.pool.allocate(max(host.nbytes, 1))
    try:
        ev = cl.enqueue_copy(queue or dev.queue, buf, host, is_blocking=False, wait_for=wait_for)
    except BaseException:
        if own:
            buf.release()
        raise
    return buf, ev


def _aligned_empty(shape, dtype) -> np.ndarray:
    """np.empty on a 64-byte boundary, as the server's pooled gradients are (np.empty's large
    arrays sit 16 bytes past a page): ce_spatial's non-temporal stores need whole lines."""
    dtype = np.dtype(dtype)
    nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    raw = np.empty(nbytes + 64, np.uint8)
    start = (-raw.ctypes.data) % 64
    return raw[start:start + nbytes].view(dtype).reshape(shape)


def _output_buffer(dev: Device, host: np.ndarray) -> cl.Buffer:
    """Where a kernel writes `host`'s contents: `host` itself on devices that compute in host
    memory, else pooled device memory (read back by `_read_rows`)."""
    if dev.host_unified:
        return cl.Buffer(dev.context, MF.WRITE_ONLY | MF.USE_HOST_PTR, hostbuf=host)
    return dev.pool.allocate(max(host.nbytes, 1))


@dataclass
class _RowOutputs:
    """Host arrays for the per-row results of a whole launch set (None: not asked for)."""

    row_loss: np.ndarray | None
    row_zloss: np.ndarray | None
    lse: np.ndarray | None
    argmax: np.ndarray | None

    @classmethod
    def empty(cls, rows: int, acc: type, want_rows: bool, want_lse: bool, want_argmax: bool) -> "_RowOutputs":
        return cls(np.empty(rows, acc) if want_rows else None, np.empty(rows, acc) if want_rows else None,
                   np.empty(rows, np.float32) if want_lse else None,
                   np.empty(rows, np.int32) if want_argmax else None)

    def slice(self, a: int, b: int) -> "_RowOutputs":
        return _RowOutputs(*(None if arr is None else arr[a:b] for arr in
                             (self.row_loss, self.row_zloss, self.lse, self.argmax)))


@dataclass
class PreparedLoss:
    """A validated problem with its device buffers; run its chunks, then finish it."""

    problem: semantics.Problem
    engine: "LossEngine"
    want_grad: bool
    want_lse: bool
    want_argmax: bool
    blocks: list[_RowBlock] = field(default_factory=list)
    grad: np.ndarray | None = None
    copy_to: np.ndarray | None = None      # grad_out that overlaps the input: grad goes there at finish
    kernel_seconds: float = 0.0
    done_rows: int = 0

    @property
    def device(self) -> Device:
        return self.engine.device

    def chunks(self, target_seconds: float | None = None) -> Iterator[tuple[int, int, int]]:
        """(block, start, count) row ranges, each expected to take about target_seconds."""
        per_row = max(self.problem.classes, 1) / self.engine.elements_per_second
        step = max(1, int(target_seconds / per_row)) if target_seconds else None
        if step is not None and self.rows_per_item > 1:   # ce_spatial8/16 take rows 8 or 16 at a time
            step = -(-step // self.rows_per_item) * self.rows_per_item
        for bi, blk in enumerate(self.blocks):
            if step is None:
                yield bi, 0, blk.rows
                continue
            for start in range(0, blk.rows, step):
                yield bi, start, min(step, blk.rows - start)

    @property
    def rows_per_item(self) -> int:
        return self.engine.rows_per_item(self.problem)

    def release(self) -> None:
        for blk in self.blocks:
            blk.release()


class LossEngine:
    """Fused cross-entropy forward + backward on one device."""

    def __init__(self, device: Device):
        self.device = device
        #: measured throughput, refined by every launch; sizes the chunks of big batches
        self.elements_per_second = 2e8
        self._rate_lock = threading.Lock()

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

    def warm_up(self) -> None:
        """One small call per program built so far and per kernel shape in it (rows of classes,
        spatial rows), so PoCL's lazy per-kernel compile is not paid by a user."""
        rng = np.random.default_rng(0)
        shapes = [((4, 67), (4,)), ((1, 5, 8), (1, 8))]
        for kind, in_dt, grad_dt, softcap in list(self.device.programs):
            if kind != "ce":
                continue
            for xs, ts in shapes:
                x = rng.standard_normal(xs).astype(np.float32).astype(_np_dtype(in_dt))
                t = rng.integers(0, xs[1], ts)
                t.reshape(-1)[0] = -100
                self.cross_entropy(x, t, return_grad=True, grad_dtype=grad_dt, softcap=30.0 if softcap else None)

    # ---- the three steps ----
    def prepare(self, input: np.ndarray, target: np.ndarray, weight: np.ndarray | None = None,
                ignore_index: int = -100, reduction: str = "mean", label_smoothing: float = 0.0, *,
                return_grad: bool = False, grad_dtype: str | None = None, return_lse: bool = False,
                return_argmax: bool = False, lse_square_scale: float = 0.0,
                softcap: float | None = None, grad_out: np.ndarray | None = None) -> PreparedLoss:
        """`grad_out`: where the gradient goes (the input's shape, the gradient's dtype, C-contiguous
        and writable: the server's pooled buffer, shared memory, or the received body), instead of
        a new array. It may be the input itself (in place, as Liger-Kernel does: the input is then
        gone). The engine owns no host memory beyond the call: whoever passes grad_out keeps it."""
        p = self._check(input, target, weight, ignore_index, reduction, label_smoothing,
                        grad_dtype=grad_dtype, lse_square_scale=lse_square_scale, softcap=softcap)
        return self.prepare_checked(p, return_grad=return_grad, return_lse=return_lse, return_argmax=return_argmax,
                                    grad_out=grad_out)

    def prepare_checked(self, p: semantics.Problem, *, return_grad: bool = False, return_lse: bool = False,
                        return_argmax: bool = False, grad_out: np.ndarray | None = None) -> PreparedLoss:
        """`prepare` of a problem already checked (the fused linear cross-entropy's chunks: their
        targets were checked once, for the whole batch)."""
        prep = PreparedLoss(p, self, bool(return_grad), bool(return_lse), bool(return_argmax))
        if p.rows == 0 or p.classes == 0:
            return prep
        dev = self.device
        x = as_storage(p.input.reshape(p.batch, -1))
        grad_itemsize = _np_dtype(p.grad_dtype).itemsize if return_grad else 0
        # Whole samples per block, as many as fit the device's largest allocation (PoCL: 2 GiB),
        # so batches of any size run, each block's offsets starting at 0.
        sample_bytes = max(x.shape[1] * max(x.itemsize, grad_itemsize), 1)
        per_block = dev.cl_device.max_mem_alloc_size // sample_bytes
        if per_block < 1:
            raise ArgumentError(RuntimeError(
                f"one sample of {sample_bytes} bytes exceeds the OpenCL device's largest allocation "
                f"({dev.cl_device.max_mem_alloc_size} bytes)"))
        in_place = False
        if return_grad and grad_out is not None:
            grad_out = _checked_grad_out(grad_out, p)
            if dev.host_unified and np.may_share_memory(grad_out, p.input):
                # Kernels that compute in host memory read the logits where the gradient goes.
                # Only the row-per-item kernel is written to be safe there, and only when the two
                # are exactly the same memory; anything else is computed aside and copied over.
                in_place = (dev.launch.rows == "item" and p.spatial == 1
                            and grad_out.ctypes.data == p.input.ctypes.data and grad_out.nbytes == p.input.nbytes
                            and p.classes * np.dtype(_acc_dtype(p.compute_dtype)).itemsize
                            <= dev.cl_device.max_mem_alloc_size)   # a scratch row fits
                if not in_place:
                    prep.copy_to, grad_out = grad_out, None
            # (a device with its own memory has copied the logits before the gradient comes back)
        with device_faults():
            try:
                if return_grad:   # the server passes a pooled grad_out: fresh pages cost the kernel faults
                    prep.grad = (grad_out if grad_out is not None
                                 else _aligned_empty(p.input.shape, _np_dtype(p.grad_dtype)))
                grad = as_storage(prep.grad.reshape(p.batch, -1)) if return_grad else None
                y = as_storage(p.soft_target.reshape(p.batch, -1)) if p.soft else None
                for n0 in range(0, p.batch, per_block):
                    n1 = min(p.batch, n0 + per_block)
                    row0, rows = n0 * p.spatial, (n1 - n0) * p.spatial
                    prep.blocks.append(_RowBlock.allocate(
                        dev, row0, rows, x[n0:n1],
                        p.targets[row0:row0 + rows] if p.targets is not None else None,
                        y[n0:n1] if y is not None else None, p.weight,
                        grad[n0:n1] if grad is not None else None,
                        _acc_dtype(p.compute_dtype), prep.want_lse, prep.want_argmax, in_place))
            except BaseException:
                prep.release()
                raise
        return prep

    def run_chunk(self, prep: PreparedLoss, chunk: tuple[int, int, int]) -> float:
        """Launch the fused kernel over rows [start, start + count) of one block; device seconds."""
        p = prep.problem
        bi, start, count = chunk
        per_item = prep.rows_per_item
        if start % per_item or count % per_item:
            raise ValueError(f"this problem runs {per_item} rows per work-item: chunk ({start}, {count}) "
                             "must be a multiple of that")
        with device_faults():
            ev = self._launch_rows(p, prep.blocks[bi], start, count,
                                   grad_dtype=p.grad_dtype if prep.want_grad else p.compute_dtype,
                                   scalars=self._scalars(p))
            ev.wait()
        secs = _event_seconds(ev)
        prep.kernel_seconds += secs
        prep.done_rows += count
        self._measured(count * p.classes, secs)
        return secs

    def finish(self, prep: PreparedLoss) -> LossResult:
        """Deterministic reductions on the device (blocks summed on the host in order), read-back."""
        p = prep.problem
        if p.rows == 0 or p.classes == 0:
            return self._degenerate(prep)
        if prep.done_rows != p.rows:
            raise RuntimeError(f"finish() after {prep.done_rows} of {p.rows} rows")
        out = _RowOutputs.empty(p.rows, _acc_dtype(p.compute_dtype), p.reduction == "none",
                                prep.want_lse, prep.want_argmax)
        secs = prep.kernel_seconds
        blocks = []
        with device_faults():
            for blk in prep.blocks:
                seg, red_secs = self._reduce(p.compute_dtype, blk, reduction.block_starts(blk.row0, blk.rows))
                blocks.append(seg)
                secs += red_secs
                self._read_rows(blk, out)
        if prep.copy_to is not None:
            np.copyto(prep.copy_to, prep.grad, casting="no")
            prep.grad = prep.copy_to
        # the block sums added in order: row chunks of a batch combine to exactly these bits
        block_sums = np.concatenate(blocks)
        res = _assemble(p, reduction.sum_blocks(block_sums), out, prep.grad, secs, prep.want_argmax)
        res.block_sums = block_sums
        return res

    # ---- many small requests, one launch ----
    def cross_entropy_many(self, requests: list[dict]) -> list:
        """Run several requests, coalescing the compatible ones into one launch each. `requests`
        are keyword dicts for `cross_entropy`; returns a LossResult or the exception, per request.

        A shared launch runs with reduction 'sum' scales and an fp32 (fp64) gradient; each
        request's slice is then scaled by its own 1/denominator and rounded once to its grad
        dtype, and its loss is its own segment of the deterministic row reduction. Each request
        is charged its share of the launch's device time, by elements."""
        out: list = [None] * len(requests)
        groups: dict = {}
        for i, kw in enumerate(requests):
            try:
                p = self._check(**kw)
            except ArgumentError as exc:   # this request's argument error; the others go on
                out[i] = exc
                continue
            flags = (bool(kw.get("return_grad")), bool(kw.get("return_lse")), bool(kw.get("return_argmax")))
            # the scheduler's key: equal keys give equal kernel scalars (clce_wire.options)
            key = coalescing_key(kw)
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
                with device_faults():
                    results = self._run_merged([m[1] for m in members], *members[0][2])
                for (i, _, _), res in zip(members, results):
                    out[i] = res
            except Exception as exc:   # a device failure hits the whole launch
                for i, _, _ in members:
                    out[i] = exc
        try:
            return out
        finally:
            # the exceptions in `out` have this frame in their tracebacks: without the local,
            # that is no reference cycle (their requests' arrays are freed with them)
            out = groups = None

    def _run_merged(self, problems: list[semantics.Problem], want_grad: bool, want_lse: bool,
                    want_argmax: bool) -> list[LossResult]:
        p0 = problems[0]
        C, dt, acc = p0.classes, p0.compute_dtype, _acc_dtype(p0.compute_dtype)
        starts = np.concatenate([[0], np.cumsum([p.rows for p in problems])]).astype(np.uint64)
        R = int(starts[-1])
        x = np.concatenate([as_storage(p.input).reshape(-1, C) for p in problems])
        tgt = None if p0.soft else np.concatenate([p.targets for p in problems])
        y = np.concatenate([as_storage(p.soft_target).reshape(-1, C) for p in problems]) if p0.soft else None
        grad = np.empty((R, C), acc) if want_grad else None
        out = _RowOutputs.empty(R, acc, any(p.reduction == "none" for p in problems), want_lse, want_argmax)
        blk = _RowBlock.allocate(self.device, 0, R, x, tgt, y, p0.weight, grad, acc, want_lse, want_argmax)
        try:
            ev = self._launch_rows(p0, blk, 0, R, grad_dtype=np.dtype(acc).name,
                                   scalars=self._scalars(p0, shared=True))
            # each request's rows in blocks, as if it ran alone: the same bits either way
            seg = [reduction.block_starts(0, int(starts[g + 1] - starts[g]))[:-1] + int(starts[g])
                   for g in range(len(problems))]
            block_sums, red_secs = self._reduce(dt, blk, np.concatenate([*seg, [R]]), wait_for=[ev])
            first = np.cumsum([0] + [len(b) for b in seg])
            sums = np.array([reduction.sum_blocks(block_sums[first[g]:first[g + 1]]) for g in range(len(problems))])
            self._read_rows(blk, out)
        finally:
            blk.release()
        secs = _event_seconds(ev) + red_secs
        self._measured(R * C, secs)
        results = []
        for g, p in enumerate(problems):
            a, b = int(starts[g]), int(starts[g + 1])
            g_req = (grad[a:b] * acc(p.loss_scale)).astype(_np_dtype(p.grad_dtype)).reshape(p.input.shape) \
                if want_grad else None
            results.append(_assemble(p, sums[g], out.slice(a, b), g_req, secs * (b - a) / R, want_argmax))
        return results

    # ---- the shared layers ----
    def _check(self, input, target, weight=None, ignore_index=-100, reduction="mean", label_smoothing=0.0, *,
               grad_dtype=None, lse_square_scale=0.0, softcap=None, return_grad=False, return_lse=False,
               return_argmax=False) -> semantics.Problem:
        """PyTorch's argument checks, then what this device can run (return_* are accepted so a
        request's keyword dict can be passed whole). Raises ArgumentError."""
        p = semantics.check(input, target, weight, ignore_index, reduction, label_smoothing,
                            grad_dtype=grad_dtype, lse_square_scale=lse_square_scale, softcap=softcap)
        if "float64" in (p.compute_dtype, p.grad_dtype) and not self.device.has_fp64:
            raise ArgumentError(RuntimeError(f"the OpenCL device {self.device.name!r} has no float64 support"))
        return p

    def rows_per_item(self, p: semantics.Problem) -> int:
        """16 or 8 when a spatial-rows kernel runs (rows of one sample are adjacent per class):
        16 on devices with 16-wide vectors (CE_VW, AVX-512) when the rows allow it, else 1."""
        if self.device.launch.rows != "item" or p.spatial <= 1:
            return 1
        widths = (16, 8) if self.device.tuning.defines.get("CE_VW") == 16 else (8,)
        return next((w for w in widths if p.spatial % w == 0), 1)

    def kernel_name(self, p: semantics.Problem) -> str:
        """The fused kernel a launch over `p`'s rows runs. Spatial rows on a "group" device (GPUs)
        take ce_rows_strided, a work-item per row: ce_rows_group would have one work-group read
        a row's classes S elements apart, while a work-item per row lets neighbouring work-items
        read neighbouring positions (coalesced), and there are S times as many rows as samples."""
        per_item = self.rows_per_item(p)
        if per_item > 1:
            return f"ce_spatial{per_item}"
        if p.spatial > 1:
            return "ce_rows_strided"
        return "ce_rows_group" if self.device.launch.rows == "group" else "ce_rows_item"

    @staticmethod
    def _scalars(p: semantics.Problem, shared: bool = False) -> dict:
        """The fused kernel's scalar arguments. `shared`: a coalesced launch, whose gradient and
        row losses are per-row 'sum' values that each request scales afterwards."""
        acc = _acc_dtype(p.compute_dtype)
        return dict(classes=np.uint32(p.classes), eps=acc(p.label_smoothing), weight_sum=acc(p.weight_sum),
                    loss_scale=acc(1.0 if shared else p.loss_scale), z_scale=acc(1.0 if shared else p.z_scale),
                    z_coef=acc(0.0 if shared else p.lse_square_scale), softcap=acc(p.softcap))

    def _launch_rows(self, p: semantics.Problem, blk: _RowBlock, start: int, count: int, *,
                     grad_dtype: str, scalars: dict) -> cl.Event:
        """The fused kernel over rows [start, start + count) of `blk`, in the device's launch shape."""
        dev, launch = self.device, self.device.launch
        per_item = self.rows_per_item(p)
        name = self.kernel_name(p)
        k = dev.kernel(name, p.compute_dtype, grad_dtype, p.softcap > 0)
        items = count // per_item
        scratch = None
        acc = np.dtype(_acc_dtype(p.compute_dtype))
        if name == "ce_rows_item" and p.spatial == 1 and blk.grad is not None and (grad_dtype != acc.name
                                                                                    or blk.in_place):
            # A gradient narrower than the accumulators cannot hold pass 1's exps, and one that is
            # the logits' own memory must not before pass 2 has read them: give each work-item a
            # scratch row instead, and run few work-items that loop over the rows (one exp per
            # element instead of two).
            row_bytes = p.classes * acc.itemsize
            n = min(items, launch.scratch_items_per_cu * dev.cl_device.max_compute_units,
                    dev.cl_device.max_mem_alloc_size // row_bytes)
            if n >= 1:
                scratch, items = dev.pool.allocate(n * row_bytes), n
        try:
            set_args(k, CE_PARAMS, **blk.buffer_args(), scratch=scratch, row0=np.uint64(start),
                     nrows=np.uint64(count), spatial=np.uint64(p.spatial), **scalars)
            if name == "ce_rows_group":   # one work-group per row
                return cl.enqueue_nd_range_kernel(dev.queue, k, (count * launch.local_size,), (launch.local_size,))
            if name == "ce_rows_strided" and launch.rows == "group":
                # GPU work-groups of the tuned size (at most what this kernel allows), the global
                # size rounded up to them: the surplus work-items find no row
                wg = min(launch.local_size, k.get_work_group_info(cl.kernel_work_group_info.WORK_GROUP_SIZE,
                                                                  dev.cl_device))
                return cl.enqueue_nd_range_kernel(dev.queue, k, (-(-count // wg) * wg,), (wg,))
            local = (launch.local_size,) if items % launch.local_size == 0 else None
            ev = cl.enqueue_nd_range_kernel(dev.queue, k, (items,), local)
            if scratch is not None:
                ev.wait()   # the pool may hand the scratch out again once released
            return ev
        finally:
            if scratch is not None:
                scratch.release()

    def _reduce(self, dtype: str, blk: _RowBlock, starts: np.ndarray, wait_for=None) -> tuple[np.ndarray, float]:
        """Deterministic per-segment sums of a block's per-row results (reduce_rows.cl): an array
        of (segments, 4) float64 — loss, z-loss, correct argmaxes — and the device seconds."""
        dev = self.device
        red_dt = np.float64 if (dev.has_fp64 or dtype == "float64") else np.float32
        nseg = len(starts) - 1
        out = np.empty(4 * nseg, red_dt)
        seg_buf = cl.Buffer(dev.context, MF.READ_ONLY | MF.COPY_HOST_PTR, hostbuf=starts.astype(np.uint64))
        out_buf = dev.pool.allocate(out.nbytes)
        try:
            k = dev.kernel("reduce_rows", dtype)
            set_args(k, REDUCE_PARAMS, row_loss=blk.row_loss, row_zloss=blk.row_zloss, row_argmax=blk.row_argmax,
                     target=blk.target, seg_start=seg_buf, out=out_buf)
            wg = dev.launch.reduce_local_size
            ev = cl.enqueue_nd_range_kernel(dev.queue, k, (wg * nseg,), (wg,), wait_for=wait_for)
            cl.enqueue_copy(dev.queue, out, out_buf, wait_for=[ev])
        finally:
            out_buf.release()
            seg_buf.release()
        return out.astype(np.float64).reshape(nseg, 4), _event_seconds(ev)

    def _read_rows(self, blk: _RowBlock, out: _RowOutputs) -> None:
        """A block's per-row results into its rows of `out`, and its gradient into its host array."""
        q = self.device.queue
        rows = slice(blk.row0, blk.row0 + blk.rows)
        for host, buf in ((out.row_loss, blk.row_loss), (out.row_zloss, blk.row_zloss),
                          (out.lse, blk.row_lse), (out.argmax, blk.row_argmax)):
            if host is not None:
                cl.enqueue_copy(q, host[rows], buf)
        if blk.grad is not None:
            host = blk.grad_host
            if self.device.host_unified:
                # The kernel wrote into host memory; a map/unmap pair is OpenCL's coherence point.
                mapped, _ = cl.enqueue_map_buffer(q, blk.grad, cl.map_flags.READ, 0, (host.nbytes,), np.uint8)
                mapped.base.release(q)
            else:
                cl.enqueue_copy(q, host, blk.grad)

    def _measured(self, elements: int, secs: float) -> None:
        if secs > 1e-4:
            with self._rate_lock:   # EWMA of elements/s sizes the next chunks
                self.elements_per_second = 0.7 * self.elements_per_second + 0.3 * elements / secs

    def _degenerate(self, prep: PreparedLoss) -> LossResult:
        """No rows or no classes: nothing to launch; answer as PyTorch does."""
        p = prep.problem
        loss_dt = _np_dtype(p.compute_dtype)
        res = LossResult(loss=np.array(0, loss_dt), rows=p.rows)
        if p.reduction == "none":
            res.loss = np.zeros(p.row_shape, loss_dt)
        elif p.reduction == "mean":   # no rows: 0/0; rows of C == 0 probability targets: empty sums
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


def _event_seconds(ev: cl.Event) -> float:
    return (ev.profile.end - ev.profile.start) * 1e-9


def _assemble(p: semantics.Problem, sums: np.ndarray, rows: _RowOutputs, grad: np.ndarray | None,
              kernel_seconds: float, want_argmax: bool) -> LossResult:
    """One request's result: `sums` are its (loss, z-loss, correct argmaxes) row sums, `rows` its
    per-row outputs, `grad` its finished gradient."""
    loss_dt = _np_dtype(p.compute_dtype)
    loss, z_loss, accuracy = reduction.finish(sums, p.reduction, p.denominator, p.valid_rows,
                                              bool(p.lse_square_scale), loss_dt,
                                              want_accuracy=want_argmax and not p.soft)
    res = LossResult(loss=loss, grad=grad, z_loss=z_loss, accuracy=accuracy, kernel_seconds=kernel_seconds,
                     rows=p.rows)
    if p.reduction == "none":
        total = rows.row_loss + rows.row_zloss if p.lse_square_scale else rows.row_loss
        res.loss = total.astype(loss_dt).reshape(p.row_shape)
        if p.lse_square_scale:
            res.z_loss = rows.row_zloss.astype(np.float32).reshape(p.row_shape)
    if rows.lse is not None:
        res.lse = rows.lse.reshape(p.row_shape)
    if want_argmax:
        res.argmax = rows.argmax.astype(np.int64).reshape(p.row_shape)
    return res


def _checked_grad_out(grad_out: np.ndarray, p: semantics.Problem) -> np.ndarray:
    want = _np_dtype(p.grad_dtype)
    if (tuple(grad_out.shape) != tuple(p.input.shape) or grad_out.dtype != want
            or not grad_out.flags.c_contiguous or not grad_out.flags.writeable):
        raise ValueError(f"grad_out must be a writable C-contiguous {want} array of shape {tuple(p.input.shape)}")
    return grad_out
