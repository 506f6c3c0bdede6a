"""Fused linear cross-entropy: loss and gradients of `cross_entropy(hidden @ W.T + b, target)`
without ever holding the (N, V) logits.

Rows go in chunks (Liger-Kernel's FusedLinearCrossEntropy, on an OpenCL device):

    L      = h_c . W^T + b            one (chunk, V) fp32 buffer, reused       kernels/gemm.cl
    L      = dloss/dlogits, in place  the fused cross-entropy kernel           kernels/cross_entropy.cl
    dh_c   = L . W                    into the hidden's gradient (half: by an  kernels/gemm.cl
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
scale them by the actual grad_output. A per-row grad_output ('none', `check(grad_output=)`) scales
each chunk's logit gradient by rows (gemm.cl's scale_rows) before the three products read it: the
weight's gradient is a sum over rows and cannot be rescaled afterwards.

The result is the loss engine's, assembled the same way (clce_wire.reduction over the chunks'
block sums): a float32 loss for every input dtype (float32, bfloat16, float16), the z-loss always
(zeros without lse_square_scale), and with return_lse / return_argmax the rows' lse, argmax and
the accuracy over the non-ignored rows, from the cross-entropy kernel's own per-row outputs.

Two memory paths (the device's `memory`, clce-server --device-memory):
  host      PoCL's CPU device: the chunk's host arrays are the kernels' buffers (USE_HOST_PTR).
  discrete  a GPU (or PoCL forced to it): the weight lives in device memory, once per weight
            version when the caller names the version (`weight_key`: a stored or region-backed
            weight; an inline weight is copied in per request); the logits, the gradient
            accumulators (dW, db, the hidden's gradient) stay on the device; hidden-state chunks
            stream in on a second queue, chunk i+1's copy overlapping chunk i's kernels (events
            order them); the gradients are read back once per request. Device bytes are counted
            against the device's memory (`device_bytes`); resident weights not in use are evicted,
            least recently used first, to make room. Both paths give the same bits.
"""

from __future__ import annotations

import itertools
import threading
import time
import weakref
from dataclasses import dataclass, field
from typing import Any, Callable, Generator

import numpy as np
import pyopencl as cl

from clce_wire.reduction import REDUCE_BLOCK_ROWS, combine_partials

from ..cross_entropy import semantics
from ..rails.device import as_storage
from ..cross_entropy.engine import LossEngine, PreparedLoss, _np_dtype, _RowBlock, to_device
from ..rails.errors import ArgumentError, device_faults
from .gemm import Gemm

MF = cl.mem_flags

#: dtypes of hidden and weight the products run in (fp32 accumulation either way)
LINEAR_DTYPES = ("float32", "bfloat16", "float16")
INDEX_DTYPES = ("int64", "int32", "int16", "uint8")


@dataclass
class LinearResult:
    """The loss path's LossResult fields where they apply. The loss is float32 whatever the
    inputs' dtype (the logits are fp32 on the device; Liger-Kernel and Cut Cross-Entropy return
    an fp32 loss for half-precision inputs); the gradients are in the inputs' dtypes."""

    loss: np.ndarray                        # 0-d ('mean', 'sum') or the rows' shape ('none'); float32
    z_loss: np.ndarray | None = None        # the z-loss part of loss (float32; zeros at lse_square_scale 0)
    lse: np.ndarray | None = None           # return_lse: per-row log-sum-exp (float32, the loss rows' shape)
    argmax: np.ndarray | None = None        # return_argmax: per-row argmax (int64, the loss rows' shape)
    accuracy: float | None = None           # return_argmax: argmax == target over the non-ignored rows
    grad_hidden: np.ndarray | None = None   # hidden's shape and dtype
    grad_weight: np.ndarray | None = None   # (V, H) float32: the accumulator (added into when given)
    grad_bias: np.ndarray | None = None     # (V,) float64 sums (added into when given)
    kernel_seconds: float = 0.0
    rows: int = 0
    micro_batches: int | None = None        # accumulated into a stored version: the micro-batches it holds now
    accumulation: str | None = None         # and which accumulation they are


@dataclass
class LinearProblem:
    """A validated request: rows flattened, shift applied to the targets."""

    hidden: np.ndarray          # (R, H), C-contiguous, float32, float16 or bfloat16 (ml_dtypes)
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
    return_lse: bool = False
    return_argmax: bool = False
    grad_output: np.ndarray | None = None   # (R,) float32 per-row scales of the gradients ('none'), or None: 1

    @property
    def dtype(self) -> str:
        return "bfloat16" if self.hidden.dtype == _np_dtype("bfloat16") else self.hidden.dtype.name

    def rows_out(self, per_row: np.ndarray) -> np.ndarray:
        """Per-row results (R,) in the loss's shape: the row shape, less the shifted-out positions."""
        a = per_row.reshape(self.row_shape)
        return np.ascontiguousarray(a[..., :self.loss_shape[-1]] if self.shift else a)


def _dtype_name(a: np.ndarray) -> str:
    return "bfloat16" if a.dtype == _np_dtype("bfloat16") else a.dtype.name


def check(hidden: np.ndarray, weight: np.ndarray, target: np.ndarray, bias: np.ndarray | None = None, *,
          class_weight: np.ndarray | None = None, ignore_index: int = -100, reduction: str = "mean",
          label_smoothing: float = 0.0, lse_square_scale: float = 0.0, softcap: float | None = None,
          shift: int = 0, return_lse: bool = False, return_argmax: bool = False,
          grad_output: np.ndarray | None = None) -> LinearProblem:
    """F.linear's and F.cross_entropy's checks, in their words where they have them. Every target
    is checked here, before any chunk runs (a weight gradient must not be half accumulated).
    Departure from torch: a weight with no rows or no columns is refused (torch computes logits
    of zero classes, or of the bias alone). `grad_output` ('none' only): the loss's gradient, one
    value per row of the loss's shape, which the gradients are computed for (autograd's
    backward of a non-uniform grad_output)."""
    ignore_index, label_smoothing = semantics.check_options(reduction, ignore_index, label_smoothing)
    if not -(1 << 63) <= ignore_index < (1 << 63):
        raise ArgumentError(ValueError("Overflow when unpacking long long"))
    if not 0.0 <= label_smoothing <= 1.0:
        raise ArgumentError(RuntimeError(f"label_smoothing must be between 0.0 and 1.0. Got: {label_smoothing:g}"))
    semantics.check_extras(lse_square_scale, softcap)
    h_dt, w_dt = _dtype_name(hidden), _dtype_name(weight)
    if weight.ndim != 2:
        raise ArgumentError(RuntimeError(f"weight must be 2-D (vocabulary, hidden), got shape {list(weight.shape)}"))
    if hidden.ndim < 1 or hidden.shape[-1] != weight.shape[1]:
        rows = int(np.prod(hidden.shape[:-1])) if hidden.ndim else 1
        raise ArgumentError(RuntimeError(f"mat1 and mat2 shapes cannot be multiplied ({rows}x{hidden.shape[-1] if hidden.ndim else 1} "
                                         f"and {weight.shape[1]}x{weight.shape[0]})"))
    if h_dt != w_dt:
        raise ArgumentError(RuntimeError(f"expected m1 and m2 to have the same dtype, but got: {h_dt} != {w_dt}"))
    if h_dt not in LINEAR_DTYPES:
        raise ArgumentError(RuntimeError(f"fused linear cross-entropy runs float32, bfloat16 and float16, got {h_dt}"))
    V, H = int(weight.shape[0]), int(weight.shape[1])
    if V == 0 or H == 0:
        raise ArgumentError(RuntimeError(f"fused linear cross-entropy needs a weight with rows and columns, got shape [{V}, {H}]"))
    if bias is not None:
        if bias.shape != (V,):
            raise ArgumentError(RuntimeError(f"bias must have shape ({V},), got {list(bias.shape)}"))
        if _dtype_name(bias) != h_dt:
            raise ArgumentError(RuntimeError(f"expected bias of dtype {h_dt}, got {_dtype_name(bias)}"))
    if class_weight is not None and (class_weight.ndim != 1 or class_weight.shape[0] != V):
        raise ArgumentError(RuntimeError(f"weight tensor should be defined either for all {V} classes or no classes "
                                         f"but got weight tensor of shape: [{', '.join(map(str, class_weight.shape))}]"))
    row_shape = tuple(int(d) for d in hidden.shape[:-1])
    if tuple(target.shape) != row_shape:
        raise ArgumentError(ValueError(f"Expected target of shape {list(row_shape)} (the hidden states' rows), "
                                       f"got {list(target.shape)}"))
    if _dtype_name(target) not in INDEX_DTYPES:
        raise ArgumentError(RuntimeError(f"expected target dtype to be Long or Byte, but got {_dtype_name(target)}"))
    t = np.array(target, np.int64).reshape(row_shape)   # a copy: the shift writes into it
    loss_shape = row_shape
    if shift:
        if len(row_shape) < 1 or not 0 <= shift < row_shape[-1]:
            raise ArgumentError(ValueError(f"shift must be in [0, T) for T = {row_shape[-1] if row_shape else 0} positions, got {shift}"))
        T = row_shape[-1]
        t[..., :T - shift] = t[..., shift:].copy()
        t[..., T - shift:] = ignore_index
        loss_shape = (*row_shape[:-1], T - shift)
    t = t.reshape(-1)
    ignored = t == ignore_index
    bad = ~ignored & ((t < 0) | (t >= V))
    if bad.any():
        raise ArgumentError(IndexError(f"Target {int(t[int(np.argmax(bad))])} is out of bounds."))
    valid = ~ignored
    n_valid = int(valid.sum())
    if class_weight is not None:
        cw = np.ascontiguousarray(class_weight, np.float32)
        denom = float(np.sum(cw[t[valid]], dtype=np.float64))
    else:
        cw, denom = None, float(n_valid)
    go = None
    if grad_output is not None:
        if reduction != "none":
            raise ArgumentError(RuntimeError(f"grad_output is per row, for reduction='none' (got {reduction!r}: the loss is one "
                                             "number, its grad_output a scale)"))
        if tuple(grad_output.shape) != loss_shape:
            raise ArgumentError(RuntimeError(f"Mismatch in shape: grad_output has a shape of {list(grad_output.shape)} and "
                                             f"output has a shape of {list(loss_shape)}"))
        if _dtype_name(grad_output) not in ("float32", "float64", "float16", "bfloat16"):
            raise ArgumentError(TypeError(f"grad_output must be floating point, got {_dtype_name(grad_output)}"))
        full = np.zeros(row_shape, np.float32)   # shifted-out rows are ignored: their gradient is zero anyway
        (full[..., :loss_shape[-1]] if shift else full)[...] = np.asarray(grad_output, np.float32)
        go = full.reshape(-1)
    return LinearProblem(_aligned(hidden.reshape(-1, H)), _aligned(weight), None if bias is None else _aligned(bias),
                         t, cw, int(ignore_index),
                         reduction, float(label_smoothing), float(lse_square_scale),
                         None if softcap is None else float(softcap), row_shape, loss_shape, int(shift),
                         denom, n_valid, bool(return_lse), bool(return_argmax), go)


def _aligned(a: np.ndarray) -> np.ndarray:
    """C-contiguous and aligned to its element (a tensor inside a msgpack body may sit at any byte)."""
    return np.require(a, requirements=("C", "A"))


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
        self._discrete_lock = threading.Lock()
        self._discrete_path: _DiscretePath | None = None

    def warm_up(self) -> None:
        """One small call per input dtype, with and without a bias, so that every GEMM program and
        kernel a request runs is built (and compiled by PoCL, which compiles at first launch)
        before the server says it is ready (on a device with memory of its own, the discrete
        path's helpers too)."""
        rng = np.random.default_rng(0)
        for dt in LINEAR_DTYPES:
            h, w, b = (rng.standard_normal(s).astype(np.float32).astype(_np_dtype(dt))
                       for s in ((70, 24), (37, 24), (37,)))
            t = rng.integers(0, 37, 70)
            for bias in (None, b):
                self(check(h, w, t, bias, label_smoothing=0.1))
        # gemm.cl's scale_rows (a per-row grad_output), launched once: PoCL compiles at first launch
        self(check(h, w, t, b, reduction="none", grad_output=np.ones(70, np.float32), return_lse=True,
                   return_argmax=True))

    def chunk_for(self, rows: int) -> int:
        """Rows per chunk for a problem of `rows` rows (whole blocks of the row sums)."""
        return min(self.chunk_rows, -(-rows // REDUCE_BLOCK_ROWS) * REDUCE_BLOCK_ROWS)

    def _discrete(self) -> "_DiscretePath":
        with self._discrete_lock:
            if self._discrete_path is None:
                self._discrete_path = _DiscretePath(self)
            return self._discrete_path

    def device_bytes(self, p: LinearProblem, *, want_grad_hidden: bool = True, want_grad_weight: bool = True,
                     want_grad_bias: bool | None = None) -> int:
        """Device memory one request needs on a device with memory of its own (0 on a host-memory
        device): the weight, bias and gradient accumulators, and the chunk's buffers."""
        if self.device.host_unified:
            return 0
        want_grad_bias = (p.bias is not None) if want_grad_bias is None else want_grad_bias
        return self._discrete().plan(p, want_grad_hidden, want_grad_weight, want_grad_bias).total

    def scratch_shapes(self, p: LinearProblem, *, want_grad_hidden: bool) -> list[tuple[tuple[int, ...], Any]]:
        """The (shape, dtype) of every scratch buffer `steps` asks `empty` for (a caller that
        allocates them up front, in its own pool)."""
        R, H = p.hidden.shape
        V, chunk = p.weight.shape[0], self.chunk_for(R)
        if not self.device.host_unified:
            return self._discrete().scratch_shapes(p, want_grad_hidden)
        shapes = [((chunk, V), np.float32), ((H, chunk), np.float32)]
        if want_grad_hidden and p.dtype != "float32":   # half precision: through an fp32 scratch
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
        if not self.device.host_unified:
            # device memory counts too: the chunk's buffers there, and fresh gradients' device copies
            # (a stored version's resident weight and accumulators are the device's own budget's)
            want = want_grad_hidden   # the server asks for every gradient or none
            total += self._discrete().plan(p, want, want, want and p.bias is not None).working
            total += (V * H * 4 if fresh_grad_weight else 0) + (V * 8 if fresh_grad_bias else 0)
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
              empty: Callable[[tuple[int, ...], Any], np.ndarray] = np.empty,
              weight_key: Any = None) -> Generator[float, None, LinearResult]:
        """Run chunk by chunk, yielding each chunk's device seconds (a scheduler interleaves other
        work there); returns the LinearResult. `grad_weight` (V, H) float32 / `grad_bias` (V,)
        float64: accumulators the weight's and bias's gradients are added into (micro-batches of
        one weight version); without them fresh ones are made. `overwrite_grad_weight`: the given
        `grad_weight` is where the gradient is written, not added (its old contents are never
        read: no zeroing pass). `grad_hidden`: where the hidden's gradient goes (its (R, H) shape
        and dtype, e.g. a shared-memory region). `empty(shape, dtype)` makes the scratch buffers
        (the (chunk, V) logits, the transposed hidden chunk) and a fresh weight gradient: a
        request's pooled buffers, whose pages a fresh allocation would fault in on every call.
        `weight_key`: an object that stands for this weight version (the weight store's entry),
        weakly referenced: on a device with memory of its own the weight (and, when accumulating,
        its gradient accumulators) stay there while it lives. The caller promises the version's
        bytes do not change under it."""
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
        if not self.device.host_unified:
            return (yield from self._discrete().steps(p, res, want_grad_hidden, want_grad_weight, want_grad_bias,
                                                      fresh_w, empty, weight_key))
        chunk = self.chunk_for(R)
        t32 = np.where(p.targets == p.ignore_index, -1, p.targets).astype(np.int32)   # checked by `check`
        logits = empty((chunk, V), np.float32)               # the one (chunk, V) buffer
        h_t = empty((H, chunk), np.float32)                   # the chunk's hidden, transposed
        dh_scratch = empty((chunk, H), np.float32) if want_grad_hidden and p.dtype != "float32" else None
        gemm_dt = p.dtype
        store = as_storage   # bf16 arrays reach the kernels as their uint16 bits
        bufs: list[cl.Buffer] = []

        def buf(arr: np.ndarray, flags=MF.READ_ONLY) -> cl.Buffer:
            b = cl.Buffer(self.device.context, flags | MF.USE_HOST_PTR, hostbuf=store(arr))
            bufs.append(b)
            return b

        rows = _PerRow()
        try:
            with device_faults():
                if R == 0:   # nothing to launch (OpenCL has no empty buffers): the empty sums below
                    return self._assemble(p, res, rows)
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
                    ce, ce_secs = self._cross_entropy(p, L, t32[r0:r0 + n], want_any)
                    secs += ce_secs
                    rows.add(p, ce.block_sums, ce.loss if p.reduction == "none" else None, ce.z_loss, ce.lse,
                             ce.argmax)
                    if want_any:
                        events = []
                        if p.grad_output is not None:   # the rows' grad_output, before the products read L
                            s_buf = buf(np.ascontiguousarray(p.grad_output[r0:r0 + n]))
                            ev = self.gemm.scale_rows(n, V, s_buf, l_buf, V)
                            ev.wait()
                            secs += _seconds(ev)
                            _sync(self.device, l_buf, logits.nbytes)
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
        return self._assemble(p, res, rows)

    @staticmethod
    def _assemble(p: LinearProblem, res: LinearResult, rows: "_PerRow") -> LinearResult:
        """The loss, z-loss, lse, argmax and accuracy from the chunks' per-row results and block
        sums (clce_wire.reduction, as the loss engine's result is made). The loss is float32 for
        every input dtype; the z-loss is always there (zeros without lse_square_scale)."""
        blocks = np.concatenate(rows.partials) if rows.partials else np.zeros((0, 4))
        loss, z, accuracy = combine_partials(blocks[:, :3], p.reduction, p.denominator, p.valid_rows,
                                             True, np.float32, want_accuracy=p.return_argmax)
        if p.reduction == "none":
            res.loss = p.rows_out(rows.cat(rows.loss, np.float32))
            if p.lse_square_scale:
                res.z_loss = p.rows_out(rows.cat(rows.zloss, np.float32))
        else:
            if p.hidden.shape[0] == 0 and p.reduction == "mean":
                loss, z = np.array(np.nan, np.float32), np.array(np.nan, np.float32)
            res.loss, res.z_loss = np.asarray(loss, np.float32), np.asarray(z, np.float32)
        if not p.lse_square_scale:   # exactly zero, whatever the empty-batch arithmetic above gave
            res.z_loss = np.zeros(res.loss.shape, np.float32)
        if p.return_lse:
            res.lse = p.rows_out(rows.cat(rows.lse, np.float32))
        if p.return_argmax:
            res.argmax = p.rows_out(rows.cat(rows.argmax, np.int64))
            res.accuracy = accuracy
        return res

    def _cross_entropy(self, p: LinearProblem, L: np.ndarray, targets: np.ndarray, want_grad: bool):
        """The fused kernel over one chunk of logits, in place, scaled by the whole batch's
        reduction ('none' and 'sum' scale by 1 per row; 'mean' by the batch's normalisers). The
        chunk's targets (int32, -1 ignored) were checked with the whole batch's (`check`)."""
        prep = self.engine.prepare_checked(_chunk_problem(p, len(targets), L, targets), return_grad=want_grad,
                                           grad_out=L if want_grad else None, return_lse=p.return_lse,
                                           return_argmax=p.return_argmax)
        try:
            secs = 0.0
            for c in prep.chunks():
                secs += self.engine.run_chunk(prep, c)
            res = self.engine.finish(prep)
        finally:
            prep.release()
        if res.block_sums is None:   # no rows or no classes
            res.block_sums = np.zeros((0, 4))
        return res, secs + res.kernel_seconds - prep.kernel_seconds


class _PerRow:
    """What each chunk adds to the result: its block sums, and per-row loss, z-loss, lse and
    argmax where asked (the rows in order)."""

    def __init__(self):
        self.partials, self.loss, self.zloss, self.lse, self.argmax = [], [], [], [], []

    def add(self, p: LinearProblem, sums, loss, zloss, lse, argmax) -> None:
        self.partials.append(sums)
        if p.reduction == "none":
            self.loss.append(np.asarray(loss, np.float32).reshape(-1))
            if zloss is not None:
                self.zloss.append(np.asarray(zloss, np.float32).reshape(-1))
        if p.return_lse:
            self.lse.append(np.asarray(lse, np.float32).reshape(-1))
        if p.return_argmax:
            self.argmax.append(np.asarray(argmax).reshape(-1))

    @staticmethod
    def cat(parts: list, dtype) -> np.ndarray:
        return np.concatenate(parts).astype(dtype, copy=False) if parts else np.zeros(0, dtype)


def _read(q: cl.CommandQueue, buf: cl.Buffer, n: int, dtype) -> np.ndarray:
    out = np.empty(n, dtype)
    cl.enqueue_copy(q, out, buf)
    return out


def _seconds(ev: cl.Event) -> float:
    return (ev.profile.end - ev.profile.start) * 1e-9


def _sync(dev, buf: cl.Buffer, nbytes: int) -> None:
    """A map/unmap pair: OpenCL's coherence point for a USE_HOST_PTR buffer the host reads next."""
    if nbytes:
        mapped, _ = cl.enqueue_map_buffer(dev.queue, buf, cl.map_flags.READ, 0, (nbytes,), np.uint8)
        mapped.base.release(dev.queue)


# ---- devices with memory of their own ----------------------------------------------------------

#: the share of a discrete device's global memory this engine fills at most (its driver, other
#: contexts and the allocator's slack take the rest)
DEVICE_MEMORY_SHARE = 0.9

#: id(host accumulator) -> (a weak reference to it, the stamp of the device copy it equals): a
#: resident device accumulator is used as is only while its host array is the one it last wrote
#: (another device, a failed request or taking the gradient all break that)
_ACC_COPIES: dict[int, tuple["weakref.ref", int]] = {}
_ACC_LOCK = threading.RLock()   # re-entrant: `gone` may run inside it, from a garbage collection
_stamps = itertools.count(1)


def _acc_equal(host: np.ndarray, stamp: int) -> bool:
    with _ACC_LOCK:
        e = _ACC_COPIES.get(id(host))
        return e is not None and e[0]() is host and e[1] == stamp


def _acc_mark(host: np.ndarray, stamp: int | None) -> None:
    """Record that `host` equals the device copy `stamp` (None: that no device copy is known to)."""
    key = id(host)

    def gone(ref, key=key):
        with _ACC_LOCK:
            if _ACC_COPIES.get(key, (None,))[0] is ref:
                del _ACC_COPIES[key]

    with _ACC_LOCK:
        if stamp is None:
            _ACC_COPIES.pop(key, None)
        else:
            _ACC_COPIES[key] = (weakref.ref(host, gone), stamp)


@dataclass
class _Plan:
    """One request's device memory on a discrete device."""

    chunk: int               # rows per chunk
    span: int                # rows of the hidden's gradient held on the device per read-back (R: one)
    in_place: bool           # the cross-entropy writes its gradient over the logits (ce_rows_item)
    weight: int              # bytes of the weight and bias
    accumulators: int        # bytes of dW (fp32) and db (fp64)
    working: int             # bytes of the request's own buffers (logits, streamed chunks, dh)

    @property
    def total(self) -> int:
        return self.weight + self.accumulators + self.working


@dataclass
class _Resident:
    """A weight version in device memory (and its gradient accumulators, once accumulated into)."""

    shape: tuple[int, int]
    dtype: np.dtype
    w: cl.Buffer
    b: cl.Buffer | None
    nbytes: int
    gw: cl.Buffer | None = None
    gb: cl.Buffer | None = None
    stamp: int = field(default_factory=lambda: next(_stamps))
    users: int = 0
    last_used: float = field(default_factory=time.monotonic)


class _DiscretePath:
    """The fused linear cross-entropy on a device with memory of its own (LinearCrossEntropy's
    `steps` there). Per device: a transfer queue beside the device's kernel queue, and the
    resident weights."""

    def __init__(self, lce: LinearCrossEntropy):
        self.lce, self.device, self.engine, self.gemm = lce, lce.device, lce.engine, lce.gemm
        dev = self.device
        self.copy_queue = cl.CommandQueue(dev.context, dev.cl_device,
                                          properties=cl.command_queue_properties.PROFILING_ENABLE)
        self.budget = int(dev.cl_device.global_mem_size * DEVICE_MEMORY_SHARE)
        self._lock = threading.RLock()   # re-entrant: `forget` may run inside it, from a garbage collection
        self._resident: dict[int, tuple[weakref.ref, _Resident]] = {}
        self._working = 0          # bytes of the requests running now

    # ---- memory ----
    def plan(self, p: LinearProblem, want_gh: bool, want_gw: bool, want_gb: bool) -> _Plan:
        R, H = p.hidden.shape
        V = p.weight.shape[0]
        cl_dev = self.device.cl_device
        max_alloc = int(cl_dev.max_mem_alloc_size)
        item = p.hidden.itemsize
        chunk = max(self.lce.chunk_for(R), REDUCE_BLOCK_ROWS)
        while chunk > REDUCE_BLOCK_ROWS and chunk * V * 4 > max_alloc:   # the logits: one allocation
            chunk = max(REDUCE_BLOCK_ROWS, (chunk // 2) // REDUCE_BLOCK_ROWS * REDUCE_BLOCK_ROWS)
        for what, nbytes in (("a chunk's logits", chunk * V * 4), ("the weight", V * H * item),
                             ("the weight's gradient", V * H * 4 if want_gw else 0),
                             ("a chunk's hidden states", H * chunk * 4)):
            if nbytes > max_alloc:
                raise ArgumentError(RuntimeError(
                    f"{what} ({nbytes} bytes) is over the OpenCL device {self.device.name!r}'s largest "
                    f"allocation ({max_alloc} bytes)"))
        span = min(max(R, 1), max(chunk, (max_alloc // (H * 4)) // chunk * chunk))
        in_place = self.device.launch.rows == "item"
        scratch_rows = self.device.launch.scratch_items_per_cu * cl_dev.max_compute_units if in_place else 0
        working = (chunk * V * 4 * (1 if in_place else 2) + scratch_rows * V * 4
                   + 2 * (H * chunk * 4 + chunk * 4) + (2 * chunk * H * item if want_gw else 0)
                   + 2 * chunk * 4 + (span * H * 4 if want_gh else 0)
                   + (V * 4 if p.class_weight is not None else 0) + chunk * 32
                   + chunk * 4 * (p.return_lse + p.return_argmax + (p.grad_output is not None)))
        weight = V * H * item + (V * item if p.bias is not None else 0)
        acc = (V * H * 4 if want_gw else 0) + (V * 8 if want_gb else 0)
        return _Plan(chunk, span, in_place, weight, acc, working)

    def scratch_shapes(self, p: LinearProblem, want_gh: bool) -> list[tuple[tuple[int, ...], Any]]:
        """The host buffers `steps` asks `empty` for: two staging buffers of transposed hidden
        chunks and, for a bf16 hidden gradient, the fp32 block it is read back into."""
        R, H = p.hidden.shape
        plan = self.plan(p, want_gh, want_gh, want_gh and p.bias is not None)
        shapes = [((H, plan.chunk), np.float32)] * 2
        if want_gh and p.dtype != "float32":
            shapes.append(((plan.span, H), np.float32))
        return shapes

    def resident_bytes(self) -> int:
        with self._lock:
            return sum(r.nbytes for _, r in self._resident.values())

    def _admit(self, plan: _Plan, key: Any) -> None:
        """Count the request's device bytes; evict resident weights not in use (least recently
        used first) while the device's share is exceeded. A request over the whole share is an
        argument error: it can never run here."""
        if plan.total > self.budget:
            raise ArgumentError(RuntimeError(
                f"fused linear cross-entropy needs {plan.total} bytes of memory on the OpenCL device "
                f"{self.device.name!r} (weight {plan.weight}, gradient accumulators {plan.accumulators}, "
                f"chunk buffers {plan.working}); it has {self.budget} for clce"))
        with self._lock:
            mine = self._resident.get(id(key)) if key is not None else None
            held = sum(r.nbytes for _, r in self._resident.values()) + self._working
            need = plan.working + (plan.weight + plan.accumulators
                                   if mine is None or mine[0]() is not key else plan.accumulators)
            for k, (ref, r) in sorted(self._resident.items(), key=lambda kv: kv[1][1].last_used):
                if held + need <= self.budget:
                    break
                if r.users == 0 and (mine is None or k != id(key)):
                    held -= r.nbytes
                    del self._resident[k]        # its buffers go when no request holds them
            self._working += plan.working

    def _release(self, plan: _Plan) -> None:
        with self._lock:
            self._working -= plan.working

    def _weight(self, p: LinearProblem, key: Any, owned: list) -> tuple[_Resident | None, cl.Buffer,
                                                                        cl.Buffer | None, list]:
        """The weight (and bias) in device memory: the resident copy of `key`'s version (made
        on its first use), or, without a key, a copy for this request alone."""
        dev, cq = self.device, self.copy_queue
        if key is None:
            w, ev = to_device(dev, p.weight, queue=cq)
            owned.append(w)
            evs, b = [ev], None
            if p.bias is not None:
                b, ev = to_device(dev, p.bias, queue=cq)
                owned.append(b)
                evs.append(ev)
            return None, w, b, evs
        with self._lock:
            entry = self._resident.get(id(key))
            r = entry[1] if entry is not None and entry[0]() is key else None
            if r is not None and (r.shape != p.weight.shape or r.dtype != p.weight.dtype
                                  or (r.b is None) != (p.bias is None)):
                r = None
            if r is None:
                w = cl.Buffer(dev.context, MF.READ_ONLY, p.weight.nbytes)
                evs = [cl.enqueue_copy(cq, w, as_storage(p.weight), is_blocking=False)]
                b = None
                if p.bias is not None:
                    b = cl.Buffer(dev.context, MF.READ_ONLY, p.bias.nbytes)
                    evs.append(cl.enqueue_copy(cq, b, as_storage(p.bias), is_blocking=False))
                # waited for here, once per version: the copies' events hold the host arrays (a
                # region's mapping), which the resident copy must not keep alive
                cl.wait_for_events(evs)
                r = _Resident(tuple(p.weight.shape), p.weight.dtype, w, b,
                              p.weight.nbytes + (p.bias.nbytes if p.bias is not None else 0))
                this = weakref.ref(self)

                def forget(ref, k=id(key)):
                    path = this()
                    if path is not None:
                        with path._lock:
                            if path._resident.get(k, (None,))[0] is ref:
                                del path._resident[k]

                self._resident[id(key)] = (weakref.ref(key, forget), r)
            r.users += 1
            r.last_used = time.monotonic()
        return r, r.w, r.b, []

    def _accumulator(self, r: _Resident | None, host: np.ndarray, what: str, owned: list,
                     waits: list) -> tuple[cl.Buffer, bool]:
        """The device copy of a host gradient accumulator to add into: the resident one, as is
        when it equals `host`, else `host` copied in. Returns it and whether it is resident."""
        dev = self.device
        if r is not None:
            buf = getattr(r, what)
            if buf is None:
                buf = cl.Buffer(dev.context, MF.READ_WRITE, host.nbytes)
                with self._lock:
                    setattr(r, what, buf)
                    r.nbytes += host.nbytes
            if not _acc_equal(host, r.stamp):
                waits.append(to_device(dev, host, buf, queue=self.copy_queue)[1])
            _acc_mark(host, None)   # until this request reads it back whole
            return buf, True
        buf, ev = to_device(dev, host, queue=self.copy_queue)
        owned.append(buf)
        waits.append(ev)
        return buf, False

    # ---- the request ----
    def steps(self, p: LinearProblem, res: LinearResult, want_gh: bool, want_gw: bool, want_gb: bool,
              fresh_w: bool, empty: Callable, key: Any) -> Generator[float, None, LinearResult]:
        R, H = p.hidden.shape
        V = p.weight.shape[0]
        if R == 0:   # nothing to launch: the empty sums (a fresh weight gradient is zeroed by the caller)
            return LinearCrossEntropy._assemble(p, res, _PerRow())
        dev, q, cq = self.device, self.device.queue, self.copy_queue
        plan = self.plan(p, want_gh, want_gw, want_gb)
        chunk, span = plan.chunk, plan.span
        gemm_dt = p.dtype
        want_any = want_gh or want_gw or want_gb
        owned: list[cl.Buffer] = []
        resident = None
        rows = _PerRow()
        self._admit(plan, key)
        try:
            with device_faults():
                resident, w_buf, b_buf, first_waits = self._weight(p, key, owned)
                first_waits = list(first_waits)

                def alloc(nbytes: int) -> cl.Buffer:
                    b = dev.pool.allocate(max(nbytes, 1))
                    owned.append(b)
                    return b

                # the gradient accumulators, on the device for the whole request
                gw_buf = gb_buf = None
                res_w = res_b = False
                if want_gw:
                    if fresh_w:
                        gw_buf = alloc(V * H * 4)
                    else:
                        gw_buf, res_w = self._accumulator(resident, res.grad_weight, "gw", owned, first_waits)
                if want_gb and dev.has_fp64:   # else summed on the host, chunk by chunk (below)
                    gb_buf, res_b = self._accumulator(resident, res.grad_bias, "gb", owned, first_waits)
                cw_buf = None
                if p.class_weight is not None:
                    cw_buf, ev = to_device(dev, p.class_weight.astype(np.float32), queue=cq)
                    owned.append(cw_buf)
                    first_waits.append(ev)
                t32 = np.where(p.targets == p.ignore_index, -1, p.targets).astype(np.int32)
                cp = _chunk_problem(p, chunk)
                # per-chunk buffers: the logits (and their gradient), two slots of streamed inputs
                l_buf = alloc(chunk * V * 4)
                g_buf = (l_buf if plan.in_place else alloc(chunk * V * 4)) if want_any else None
                rl_buf, rz_buf = alloc(chunk * 4), alloc(chunk * 4)
                lse_buf = alloc(chunk * 4) if p.return_lse else None
                am_buf = alloc(chunk * 4) if p.return_argmax else None
                go_buf = alloc(chunk * 4) if p.grad_output is not None and want_any else None
                ht_host = [empty((H, chunk), np.float32) for _ in range(2)]
                ht_dev = [alloc(H * chunk * 4) for _ in range(2)]
                hc_dev = [alloc(chunk * H * p.hidden.itemsize) for _ in range(2)] if want_gw else None
                t_dev = [alloc(chunk * 4) for _ in range(2)]
                dh_buf = alloc(span * H * 4) if want_gh else None
                dh_host = empty((span, H), np.float32) if want_gh and p.dtype != "float32" else None
                uploads: dict[int, list] = {}

                def prefetch(i: int) -> None:
                    """Chunk i's inputs onto the transfer queue: they copy while chunk i - 1 computes."""
                    r0 = i * chunk
                    if r0 >= R:
                        return
                    n, slot = min(chunk, R - r0), i % 2
                    np.copyto(ht_host[slot][:, :n], p.hidden[r0:r0 + n].T, casting="unsafe")
                    evs = [cl.enqueue_copy(cq, ht_dev[slot], ht_host[slot], is_blocking=False),
                           cl.enqueue_copy(cq, t_dev[slot], t32[r0:r0 + n], is_blocking=False)]
                    if want_gw:
                        evs.append(cl.enqueue_copy(cq, hc_dev[slot], as_storage(p.hidden[r0:r0 + n]),
                                                   is_blocking=False))
                    uploads[i] = evs

                prefetch(0)
                span0 = 0
                for i, r0 in enumerate(range(0, R, chunk)):
                    n, slot = min(chunk, R - r0), i % 2
                    waits = uploads.pop(i) + (first_waits if i == 0 else [])
                    secs = 0.0
                    # forward: L^T (V x n) = W . h_c^T, stored into L's rows (after the bias)
                    if b_buf is not None:
                        ev_b = self.gemm.bias_rows(n, V, b_buf, gemm_dt, l_buf, V, wait_for=waits)
                        waits = None
                    ev_f = self.gemm(V, n, H, w_buf, (H, 1), ht_dev[slot], chunk, l_buf, (1, V),
                                     beta=1.0 if b_buf is not None else 0.0, dtypes=(gemm_dt, "float32"),
                                     product="forward", wait_for=waits)
                    prefetch(i + 1)   # the host's transpose and the copy overlap this chunk's kernels
                    ev_f.wait()
                    secs += _seconds(ev_f) + (_seconds(ev_b) if b_buf is not None else 0.0)
                    # the cross-entropy over the chunk, its gradient over the logits (or beside them)
                    blk = _RowBlock(0, n, x=l_buf, target=t_dev[slot], weight=cw_buf, grad=g_buf,
                                    row_loss=rl_buf, row_zloss=rz_buf, row_lse=lse_buf, row_argmax=am_buf)
                    prep = PreparedLoss(cp, self.engine, g_buf is not None, p.return_lse, p.return_argmax,
                                        blocks=[blk])
                    secs += self.engine.run_chunk(prep, (0, 0, n))
                    sums, red_secs = self.engine._reduce("float32", blk, reduction_block_starts(n))
                    secs += red_secs
                    rl = rz = lse = am = None
                    if p.reduction == "none":
                        rl = _read(q, rl_buf, n, np.float32)
                        if p.lse_square_scale:
                            rz = _read(q, rz_buf, n, np.float32)
                            rl = (rl + rz).astype(np.float32)
                    if p.return_lse:
                        lse = _read(q, lse_buf, n, np.float32)
                    if p.return_argmax:
                        am = _read(q, am_buf, n, np.int32)
                    rows.add(p, sums, rl, rz, lse, am)
                    if want_any:
                        events = []
                        if go_buf is not None:   # the rows' grad_output, before the products read G
                            cl.enqueue_copy(q, go_buf, p.grad_output[r0:r0 + n], is_blocking=False)
                            ev = self.gemm.scale_rows(n, V, go_buf, g_buf, V)   # (in order after the copy)
                            ev.wait()
                            secs += _seconds(ev)
                        if want_gh:   # dh_c (n x H) = G . W, into the request's dh block
                            events.append(self.gemm(n, H, V, g_buf, (V, 1), w_buf, H, dh_buf, (H, 1),
                                                    dtypes=("float32", gemm_dt), product="dh",
                                                    offsets=(0, 0, (r0 - span0) * H)))
                        if want_gw:   # dW (V x H) += G^T . h_c
                            first = fresh_w and r0 == 0
                            events.append(self.gemm(V, H, n, g_buf, (1, V), hc_dev[slot], H, gw_buf, (H, 1),
                                                    beta=0.0 if first else 1.0, dtypes=("float32", gemm_dt),
                                                    product="dW"))
                        if want_gb:
                            if dev.has_fp64:
                                events.append(self.gemm.column_sums(n, V, g_buf, V, gb_buf))
                            else:   # no float64 on the device: the chunk's gradient summed here
                                G = np.empty((n, V), np.float32)
                                cl.enqueue_copy(q, G, g_buf)
                                res.grad_bias += G.sum(axis=0, dtype=np.float64)
                        for e in events:
                            e.wait()
                            secs += _seconds(e)
                        if want_gh and (r0 + n - span0 == span or r0 + n == R):
                            self._read_dh(p, res, dh_buf, dh_host, span0, r0 + n)
                            span0 = r0 + n
                    res.kernel_seconds += secs
                    yield secs
                # the accumulators, read back once
                if want_gw:
                    cl.enqueue_copy(q, res.grad_weight, gw_buf)
                if want_gb and dev.has_fp64:
                    cl.enqueue_copy(q, res.grad_bias, gb_buf)
                if resident is not None:
                    if res_w:
                        _acc_mark(res.grad_weight, resident.stamp)
                    if res_b:
                        _acc_mark(res.grad_bias, resident.stamp)
        finally:
            try:
                q.finish()          # nothing may still read or write a buffer given back below
                cq.finish()
            finally:
                for b in owned:
                    b.release()
                if resident is not None:
                    with self._lock:
                        resident.users -= 1
                self._release(plan)
        return LinearCrossEntropy._assemble(p, res, rows)

    def _read_dh(self, p: LinearProblem, res: LinearResult, dh_buf: cl.Buffer, dh_host: np.ndarray | None,
                 a: int, b: int) -> None:
        """Rows [a, b) of the hidden's gradient, from the device's block (fp32) into the result
        (bf16: rounded here, as the host path rounds its fp32 scratch)."""
        q = self.device.queue
        if dh_host is None:
            cl.enqueue_copy(q, res.grad_hidden[a:b], dh_buf)
        else:
            cl.enqueue_copy(q, dh_host[:b - a], dh_buf)
            np.copyto(res.grad_hidden[a:b], dh_host[:b - a], casting="unsafe")


def _chunk_problem(p: LinearProblem, rows: int, logits: np.ndarray | None = None,
                   targets: np.ndarray | None = None) -> semantics.Problem:
    """The cross-entropy's kernel arguments for a chunk of `rows` logits (int32 `targets`, -1
    ignored), as semantics.check would make them for that chunk, without checking it again:
    'mean' runs as 'sum' scaled by the whole batch's normalisers."""
    V = p.weight.shape[0]
    red = "sum" if p.reduction == "mean" else p.reduction
    cw = None if p.class_weight is None else np.ascontiguousarray(p.class_weight, np.float32)
    wsum = float(V) if cw is None else float(np.sum(cw, dtype=np.float64))
    valid = rows if targets is None else int(np.count_nonzero(targets >= 0))
    loss_scale, z_scale = semantics.reduction_scales(red, float(valid), valid)
    if p.reduction == "mean":
        with np.errstate(divide="ignore"):
            loss_scale = float(np.float64(1.0) / p.denominator)
            z_scale = float(np.float64(1.0) / p.valid_rows)
    x = np.empty((0, V), np.float32) if logits is None else logits
    return semantics.Problem(x, "float32", "float32", V, rows, 1, False, targets, None, cw, wsum, red,
                             p.label_smoothing, loss_scale, z_scale, float(valid), valid, (rows,),
                             p.lse_square_scale, p.softcap or 0.0)


def reduction_block_starts(n: int) -> np.ndarray:
    """The row sums' segments of a chunk of n rows (chunks are whole blocks of the whole problem)."""
    from clce_wire.reduction import block_starts
    return block_starts(0, n)
