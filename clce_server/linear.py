"""Fused linear cross-entropy: loss and gradients of `cross_entropy(hidden @ W.T + b, target)`
without ever holding the (N, V) logits.

Rows go in chunks (Liger-Kernel's FusedLinearCrossEntropy, on an OpenCL device):

    L      = h_c . W^T + b            one (chunk, V) fp32 buffer, reused       kernels/gemm.cl
    L      = dloss/dlogits, in place  the fused cross-entropy kernel           kernels/cross_entropy.cl
    dh_c   = L . W                    into the hidden's gradient (bf16: by an  kernels/gemm.cl
                                      fp32 (chunk, H) scratch, then rounded)
    dW    += L^T . h_c                an fp32 accumulator of W's shape         kernels/gemm.cl
    db    += column sums of L         float64, on the host

So memory is the weight, its fp32 gradient and one chunk (plus the request's own hidden states
and their gradient). Gradient math: with z = h W^T + b and g = dloss/dz (what the cross-entropy
kernel writes, already scaled by the reduction), dloss/dh = g W, dloss/dW = g^T h, dloss/db =
sum over rows of g: each chunk's rows contribute independently, so chunks add up exactly.

The reduction spans all chunks. 'mean' needs the whole batch's normaliser (the summed class
weights of its non-ignored targets, and its non-ignored rows for the z-loss) before the first
chunk's gradient is scaled, so it is computed from the targets first and the kernel runs with
those scales; the loss is the in-order sum of every chunk's 64-row block sums (the same blocks as
one big launch: chunks are whole blocks), divided once. Everything runs in a fixed order, so the
results are the same bits run to run.

`shift` (causal LMs): hidden (B, T, H) and target (B, T); position t is scored against target
t + shift. The last `shift` positions of each sequence are ignored rows (their hidden gradient is
zero), and 'none' returns (B, T - shift) losses, as F.cross_entropy on the shifted slices would.

The gradients are those of the loss with grad_output = 1 ('none': of the summed rows); callers
scale them by the actual grad_output. Runs on devices that compute in host memory (PoCL's CPU
device): the chunk's host arrays are the kernels' buffers.
"""

from __future__ import annotations

import math
import threading
import weakref
from dataclasses import dataclass
from typing import Any, Callable, Generator

import numpy as np
import pyopencl as cl

from clce_wire.reduction import REDUCE_BLOCK_ROWS, combine_partials

from .device import as_storage
from .engine import LossEngine, _device_errors, _np_dtype
from .errors import ArgumentError
from .gemm import Gemm

MF = cl.mem_flags

#: dtypes of hidden and weight the products run in (fp32 accumulation either way)
LINEAR_DTYPES = ("float32", "bfloat16")
INDEX_DTYPES = ("int64", "int32", "int16", "uint8")


@dataclass
class LinearResult:
    loss: np.ndarray                        # 0-d ('mean', 'sum') or the rows' shape ('none'); hidden's dtype
    z_loss: np.ndarray | None = None        # the z-loss part of loss (float32), when lse_square_scale > 0
    grad_hidden: np.ndarray | None = None   # hidden's shape and dtype
    grad_weight: np.ndarray | None = None   # (V, H) float32: the accumulator (added into when given)
    grad_bias: np.ndarray | None = None     # (V,) float64 sums (added into when given)
    kernel_seconds: float = 0.0
    rows: int = 0


@dataclass
class LinearProblem:
    """A validated request: rows flattened, shift applied to the targets."""

    hidden: np.ndarray          # (R, H), C-contiguous, float32 or bfloat16 (ml_dtypes)
    weight: np.ndarray          # (V, H), the hidden's dtype
    bias: np.ndarray | None     # (V,) the hidden's dtype
    targets: np.ndarray         # (R,) int64, ignored rows (and shifted-out ones) = ignore_index
    class_weight: np.ndarray | None
    ignore_index: int
    reduction: str
    label_smoothing: float
    lse_square_scale: float
    softcap: float | None
    row_shape: tuple[int, ...]  # the hidden's leading dims (the loss's shape for 'none')
    loss_shape: tuple[int, ...]  # 'none': row_shape with the shift taken off the time axis
    shift: int
    denominator: float          # 'mean': summed class weights of the non-ignored targets
    valid_rows: int

    @property
    def dtype(self) -> str:
        return "bfloat16" if self.hidden.dtype == _np_dtype("bfloat16") else self.hidden.dtype.name


def _dtype_name(a: np.ndarray) -> str:
    return "bfloat16" if a.dtype == _np_dtype("bfloat16") else a.dtype.name


def check(hidden: np.ndarray, weight: np.ndarray, target: np.ndarray, bias: np.ndarray | None = None, *,
          class_weight: np.ndarray | None = None, ignore_index: int = -100, reduction: str = "mean",
          label_smoothing: float = 0.0, lse_square_scale: float = 0.0, softcap: float | None = None,
          shift: int = 0) -> LinearProblem:
    """F.linear's and F.cross_entropy's checks, in their words where they have them. Every target
    is checked here, before any chunk runs (a weight gradient must not be half accumulated).
    Departure from torch: a weight with no rows or no columns is refused (torch computes logits
    of zero classes, or of the bias alone)."""
    if reduction not in ("none", "mean", "sum"):
        raise ValueError(f"{reduction} is not a valid value for reduction")
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, (int, np.integer)):
        raise TypeError(f"ignore_index must be an int, got {type(ignore_index).__name__}")
    if not -(1 << 63) <= int(ignore_index) < (1 << 63):
        raise ValueError("Overflow when unpacking long long")
    if not 0.0 <= float(label_smoothing) <= 1.0:
        raise RuntimeError(f"label_smoothing must be between 0.0 and 1.0. Got: {float(label_smoothing):g}")
    if not math.isfinite(lse_square_scale) or lse_square_scale < 0:
        raise ValueError(f"lse_square_scale must be a non-negative finite number, got {lse_square_scale}")
    if softcap is not None and not (float(softcap) > 0 and math.isfinite(softcap)):
        raise ValueError(f"softcap must be a positive finite number, got {softcap}")
    h_dt, w_dt = _dtype_name(hidden), _dtype_name(weight)
    if weight.ndim != 2:
        raise RuntimeError(f"weight must be 2-D (vocabulary, hidden), got shape {list(weight.shape)}")
    if hidden.ndim < 1 or hidden.shape[-1] != weight.shape[1]:
        rows = int(np.prod(hidden.shape[:-1])) if hidden.ndim else 1
        raise RuntimeError(f"mat1 and mat2 shapes cannot be multiplied ({rows}x{hidden.shape[-1] if hidden.ndim else 1} "
                           f"and {weight.shape[1]}x{weight.shape[0]})")
    if h_dt != w_dt:
        raise RuntimeError(f"expected m1 and m2 to have the same dtype, but got: {h_dt} != {w_dt}")
    if h_dt not in LINEAR_DTYPES:
        raise RuntimeError(f"fused linear cross-entropy runs float32 and bfloat16, got {h_dt}")
    V, H = int(weight.shape[0]), int(weight.shape[1])
    if V == 0 or H == 0:
        raise RuntimeError(f"fused linear cross-entropy needs a weight with rows and columns, got shape [{V}, {H}]")
    if bias is not None:
        if bias.shape != (V,):
            raise RuntimeError(f"bias must have shape ({V},), got {list(bias.shape)}")
        if _dtype_name(bias) != h_dt:
            raise RuntimeError(f"expected bias of dtype {h_dt}, got {_dtype_name(bias)}")
    if class_weight is not None and (class_weight.ndim != 1 or class_weight.shape[0] != V):
        raise RuntimeError(f"weight tensor should be defined either for all {V} classes or no classes "
                           f"but got weight tensor of shape: [{', '.join(map(str, class_weight.shape))}]")
    row_shape = tuple(int(d) for d in hidden.shape[:-1])
    if tuple(target.shape) != row_shape:
        raise ValueError(f"Expected target of shape {list(row_shape)} (the hidden states' rows), "
                         f"got {list(target.shape)}")
    if _dtype_name(target) not in INDEX_DTYPES:
        raise RuntimeError(f"expected target dtype to be Long or Byte, but got {_dtype_name(target)}")
    t = np.array(target, np.int64).reshape(row_shape)   # a copy: the shift writes into it
    loss_shape = row_shape
    if shift:
        if len(row_shape) < 1 or not 0 <= shift < row_shape[-1]:
            raise ValueError(f"shift must be in [0, T) for T = {row_shape[-1] if row_shape else 0} positions, got {shift}")
        T = row_shape[-1]
        t[..., :T - shift] = t[..., shift:].copy()
        t[..., T - shift:] = ignore_index
        loss_shape = (*row_shape[:-1], T - shift)
    t = t.reshape(-1)
    ignored = t == ignore_index
    bad = ~ignored & ((t < 0) | (t >= V))
    if bad.any():
        raise IndexError(f"Target {int(t[int(np.argmax(bad))])} is out of bounds.")
    valid = ~ignored
    n_valid = int(valid.sum())
    if class_weight is not None:
        cw = np.ascontiguousarray(class_weight, np.float32)
        denom = float(np.sum(cw[t[valid]], dtype=np.float64))
    else:
        cw, denom = None, float(n_valid)
    return LinearProblem(_aligned(hidden.reshape(-1, H)), _aligned(weight), None if bias is None else _aligned(bias),
                         t, cw, int(ignore_index),
                         reduction, float(label_smoothing), float(lse_square_scale),
                         None if softcap is None else float(softcap), row_shape, loss_shape, int(shift),
                         denom, n_valid)


def _aligned(a: np.ndarray) -> np.ndarray:
    """C-contiguous and aligned to its element (a tensor inside a msgpack body may sit at any byte)."""
    return np.require(a, requirements=("C", "A"))


_per_engine_lock = threading.Lock()
_per_engine: "weakref.WeakKeyDictionary[LossEngine, LinearCrossEntropy]" = weakref.WeakKeyDictionary()


class LinearCrossEntropy:
    """The fused linear cross-entropy on one device (its LossEngine and its Gemm). chunk_rows'
    default, 1024, is what gemm.py's "dh" tuning was sized for (one work-item spans a chunk's
    rows: W is read once per chunk); 512 measured 25% slower in dh, 2048 no faster."""

    def __init__(self, engine: LossEngine, gemm: Gemm | None = None, chunk_rows: int = 1024):
        self.engine = engine
        self.device = engine.device
        self.gemm = gemm or Gemm(engine.device)
        if chunk_rows % REDUCE_BLOCK_ROWS:
            raise ValueError(f"chunk_rows must be a multiple of {REDUCE_BLOCK_ROWS} (the row sums' blocks)")
        self.chunk_rows = chunk_rows

    def warm_up(self) -> None:
        """One small call per input dtype, with and without a bias, so that every GEMM program and
        kernel a request runs is built (and compiled by PoCL, which compiles at first launch)
        before the server says it is ready. A device this operation does not run on is skipped:
        its requests are refused with the reason (`steps`)."""
        if not self.device.host_unified:
            return
        rng = np.random.default_rng(0)
        for dt in LINEAR_DTYPES:
            h, w, b = (rng.standard_normal(s).astype(np.float32).astype(_np_dtype(dt))
                       for s in ((70, 24), (37, 24), (37,)))
            t = rng.integers(0, 37, 70)
            for bias in (None, b):
                self(check(h, w, t, bias, label_smoothing=0.1))

    @classmethod
    def for_engine(cls, engine: LossEngine) -> "LinearCrossEntropy":
        """The one LinearCrossEntropy of `engine`'s device (its GEMM programs built once, warmed by
        the server's start-up)."""
        with _per_engine_lock:
            lce = _per_engine.get(engine)
            if lce is None:
                lce = _per_engine[engine] = cls(engine)
            return lce

    def chunk_for(self, rows: int) -> int:
        """Rows per chunk for a problem of `rows` rows (whole blocks of the row sums)."""
        return min(self.chunk_rows, -(-rows // REDUCE_BLOCK_ROWS) * REDUCE_BLOCK_ROWS)

    def scratch_shapes(self, p: LinearProblem, *, want_grad_hidden: bool) -> list[tuple[tuple[int, ...], Any]]:
        """The (shape, dtype) of every scratch buffer `steps` asks `empty` for (a caller that
        allocates them up front, in its own pool)."""
        R, H = p.hidden.shape
        V, chunk = p.weight.shape[0], self.chunk_for(R)
        shapes = [((chunk, V), np.float32), ((H, chunk), np.float32)]
        if want_grad_hidden and p.dtype == "bfloat16":
            shapes.append(((chunk, H), np.float32))
        return shapes

    def work_bytes(self, p: LinearProblem, *, want_grad_hidden: bool, fresh_grad_weight: bool,
                   fresh_grad_bias: bool) -> int:
        """The bytes `steps` will allocate for `p` besides its inputs and the outputs it is given:
        the scratch of `scratch_shapes` (the chunk rounded up to whole 64-row blocks, the bf16
        gradient's fp32 (chunk, H) scratch included), a fresh (V, H) fp32 weight gradient, and a
        fresh (V,) float64 bias gradient. A caller reserves them before any exists."""
        total = sum(int(np.prod(shape)) * np.dtype(dt).itemsize
                    for shape, dt in self.scratch_shapes(p, want_grad_hidden=want_grad_hidden))
        V, H = p.weight.shape
        if fresh_grad_weight:
            total += V * H * 4
        if fresh_grad_bias:
            total += V * 8
        return total

    def __call__(self, *args, **kw) -> LinearResult:
        steps = self.steps(*args, **kw)
        while True:
            try:
                next(steps)
            except StopIteration as done:
                return done.value

    def steps(self, p: LinearProblem, *, want_grad_hidden: bool = True, want_grad_weight: bool = True,
              want_grad_bias: bool | None = None, grad_weight: np.ndarray | None = None,
              grad_bias: np.ndarray | None = None, grad_hidden: np.ndarray | None = None,
              overwrite_grad_weight: bool = False,
              empty: Callable[[tuple[int, ...], Any], np.ndarray] = np.empty) -> Generator[float, None, LinearResult]:
        """Run chunk by chunk, yielding each chunk's device seconds (a scheduler interleaves other
        work there); returns the LinearResult. `grad_weight` (V, H) float32 / `grad_bias` (V,)
        float64: accumulators the weight's and bias's gradients are added into (micro-batches of
        one weight version); without them fresh ones are made. `overwrite_grad_weight`: the given
        `grad_weight` is where the gradient is written, not added (its old contents are never
        read: no zeroing pass). `grad_hidden`: where the hidden's gradient goes (its (R, H) shape
        and dtype, e.g. a shared-memory region). `empty(shape, dtype)` makes the scratch buffers
        (the (chunk, V) logits, the transposed hidden chunk) and a fresh weight gradient: a
        request's pooled buffers, whose pages a fresh allocation would fault in on every call."""
        if not self.device.host_unified:
            raise ArgumentError(RuntimeError(
                f"fused linear cross-entropy runs on OpenCL devices that compute in host memory "
                f"(PoCL's CPU device); {self.device.name!r} has its own"))
        R, H = p.hidden.shape
        V = p.weight.shape[0]
        want_grad_bias = (p.bias is not None) if want_grad_bias is None else want_grad_bias
        want_any = want_grad_hidden or want_grad_weight or want_grad_bias
        res = LinearResult(loss=np.zeros((), np.float32), rows=R)
        if want_grad_hidden:
            res.grad_hidden = grad_hidden if grad_hidden is not None else np.empty((R, H), p.hidden.dtype)
            if res.grad_hidden.shape != (R, H) or res.grad_hidden.dtype != p.hidden.dtype \
                    or not res.grad_hidden.flags.c_contiguous:
                raise ValueError(f"grad_hidden must be a C-contiguous {p.dtype} array of shape ({R}, {H})")
        fresh_w = want_grad_weight and (grad_weight is None or overwrite_grad_weight)
        if want_grad_weight:
            res.grad_weight = empty((V, H), np.float32) if grad_weight is None else grad_weight
            if fresh_w and R == 0:   # no chunk writes it
                res.grad_weight.fill(0)
            if res.grad_weight.shape != (V, H) or res.grad_weight.dtype != np.float32:
                raise ValueError(f"grad_weight must be a float32 array of shape ({V}, {H})")
        if want_grad_bias:
            res.grad_bias = np.zeros(V, np.float64) if grad_bias is None else grad_bias
        chunk = self.chunk_for(R)
        logits = empty((chunk, V), np.float32)               # the one (chunk, V) buffer
        h_t = empty((H, chunk), np.float32)                   # the chunk's hidden, transposed
        dh_scratch = empty((chunk, H), np.float32) if want_grad_hidden and p.dtype == "bfloat16" else None
        gemm_dt = "bfloat16" if p.dtype == "bfloat16" else "float32"
        store = as_storage   # bf16 arrays reach the kernels as their uint16 bits
        bufs: list[cl.Buffer] = []

        def buf(arr: np.ndarray, flags=MF.READ_ONLY) -> cl.Buffer:
            b = cl.Buffer(self.device.context, flags | MF.USE_HOST_PTR, hostbuf=store(arr))
            bufs.append(b)
            return b

        partials, row_losses, row_zlosses = [], [], []
        try:
            with _device_errors():
                if R == 0:   # nothing to launch (OpenCL has no empty buffers): the empty sums below
                    return self._assemble(p, res, partials, row_losses, row_zlosses)
                w_buf = buf(p.weight)
                l_buf = buf(logits, MF.READ_WRITE)
                ht_buf = buf(h_t)
                h_buf = buf(p.hidden)
                gh_buf = None
                if want_grad_hidden:   # the kernel writes fp32: a bf16 gradient goes through a scratch
                    gh_buf = buf(res.grad_hidden if dh_scratch is None else dh_scratch, MF.WRITE_ONLY)
                gw_buf = buf(res.grad_weight, MF.READ_WRITE) if want_grad_weight else None
                for r0 in range(0, R, chunk):
                    n = min(chunk, R - r0)
                    L = logits[:n]
                    secs = 0.0
                    # forward: L^T (V x n) = W . h_c^T, stored into L's rows
                    np.copyto(h_t[:, :n], p.hidden[r0:r0 + n].T, casting="unsafe")
                    if p.bias is not None:
                        np.copyto(L, p.bias.astype(np.float32))
                    ev = self.gemm(V, n, H, w_buf, (H, 1), ht_buf, chunk, l_buf, (1, V),
                                   beta=1.0 if p.bias is not None else 0.0, dtypes=(gemm_dt, "float32"),
                                   product="forward")
                    ev.wait()
                    secs += _seconds(ev)
                    _sync(self.device, l_buf, logits.nbytes)
                    # cross-entropy over the chunk, its gradient written over the logits
                    ce, ce_secs = self._cross_entropy(p, L, r0, n, want_any)
                    secs += ce_secs
                    partials.append(ce.block_sums)
                    if p.reduction == "none":
                        row_losses.append(np.asarray(ce.loss, np.float32))
                        if ce.z_loss is not None:
                            row_zlosses.append(ce.z_loss)
                    if want_any:
                        events = []
                        if want_grad_hidden:   # dh_c (n x H) = L . W (bf16: through the fp32 scratch)
                            events.append(self.gemm(n, H, V, l_buf, (V, 1), w_buf, H, gh_buf, (H, 1),
                                                    dtypes=("float32", gemm_dt), product="dh",
                                                    offsets=(0, 0, 0 if dh_scratch is not None else r0 * H)))
                        if want_grad_weight:   # dW (V x H) += L^T . h_c
                            first = fresh_w and r0 == 0
                            events.append(self.gemm(V, H, n, l_buf, (1, V), h_buf, H, gw_buf, (H, 1),
                                                    beta=0.0 if first else 1.0, dtypes=("float32", gemm_dt),
                                                    product="dW", offsets=(0, r0 * H, 0)))
                        if want_grad_bias:
                            res.grad_bias += L.sum(axis=0, dtype=np.float64)
                        for e in events:
                            e.wait()
                            secs += _seconds(e)
                        if want_grad_hidden and dh_scratch is not None:
                            _sync(self.device, gh_buf, dh_scratch.nbytes)
                            np.copyto(res.grad_hidden[r0:r0 + n], dh_scratch[:n], casting="unsafe")
                    res.kernel_seconds += secs
                    yield secs
                if want_grad_hidden and dh_scratch is None:
                    _sync(self.device, gh_buf, res.grad_hidden.nbytes)
                if want_grad_weight:
                    _sync(self.device, gw_buf, res.grad_weight.nbytes)
        finally:
            for b in bufs:
                b.release()
        return self._assemble(p, res, partials, row_losses, row_zlosses)

    @staticmethod
    def _assemble(p: LinearProblem, res: LinearResult, partials, row_losses, row_zlosses) -> LinearResult:
        """The loss (and z-loss) from the chunks' per-row losses or block sums."""
        out_dt = _np_dtype(p.dtype)
        if p.reduction == "none":
            loss = np.concatenate(row_losses) if row_losses else np.zeros(0, np.float32)
            loss = loss.reshape(p.row_shape)[..., :p.loss_shape[-1]] if p.shift else loss.reshape(p.row_shape)
            res.loss = np.ascontiguousarray(loss).astype(out_dt)
            if p.lse_square_scale:
                z = (np.concatenate(row_zlosses) if row_zlosses else np.zeros(0, np.float32)).reshape(p.row_shape)
                res.z_loss = np.ascontiguousarray(z[..., :p.loss_shape[-1]] if p.shift else z)
        else:
            blocks = np.concatenate(partials) if partials else np.zeros((0, 4))
            loss, z, _ = combine_partials(blocks[:, :3], p.reduction, p.denominator, p.valid_rows,
                                          bool(p.lse_square_scale), np.float32, want_accuracy=False)
            if p.hidden.shape[0] == 0 and p.reduction == "mean":
                loss = np.array(np.nan, np.float32)
            res.loss = np.asarray(loss).astype(out_dt)
            res.z_loss = z
        return res

    def _cross_entropy(self, p: LinearProblem, L: np.ndarray, r0: int, n: int, want_grad: bool):
        """The fused kernel over one chunk of logits, in place, scaled by the whole batch's
        reduction ('none' and 'sum' scale by 1 per row; 'mean' by the batch's normalisers)."""
        kw = dict(weight=p.class_weight, ignore_index=p.ignore_index,
                  reduction="sum" if p.reduction == "mean" else p.reduction,
                  label_smoothing=p.label_smoothing, lse_square_scale=p.lse_square_scale, softcap=p.softcap)
        prep = self.engine.prepare(L, p.targets[r0:r0 + n], return_grad=want_grad, grad_dtype="float32",
                                   grad_out=L if want_grad else None, **kw)
        try:
            if p.reduction == "mean":
                # 'sum' per chunk, the gradient scaled by the whole batch's 'mean' factors
                with np.errstate(divide="ignore"):
                    prep.problem.loss_scale = float(np.float64(1.0) / p.denominator)
                    prep.problem.z_scale = float(np.float64(1.0) / p.valid_rows)
            secs = 0.0
            for c in prep.chunks():
                secs += self.engine.run_chunk(prep, c)
            res = self.engine.finish(prep)
        finally:
            prep.release()
        if res.block_sums is None:   # no rows or no classes
            res.block_sums = np.zeros((0, 4))
        return res, secs + res.kernel_seconds - prep.kernel_seconds


def _seconds(ev: cl.Event) -> float:
    return (ev.profile.end - ev.profile.start) * 1e-9


def _sync(dev, buf: cl.Buffer, nbytes: int) -> None:
    """A map/unmap pair: OpenCL's coherence point for a USE_HOST_PTR buffer the host reads next."""
    if nbytes:
        mapped, _ = cl.enqueue_map_buffer(dev.queue, buf, cl.map_flags.READ, 0, (nbytes,), np.uint8)
        mapped.base.release(dev.queue)
