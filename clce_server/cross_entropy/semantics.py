"""PyTorch's `cross_entropy` contract: argument checks with PyTorch's messages and exception types,
and the host-side normalisation that turns arguments into a `Problem` the kernels can run.

Checks run in PyTorch's order, so the first error a user sees is the one PyTorch would raise.
A bad target value never reaches a kernel: targets are bounds-checked here, and normalised to
int32 class indices with -1 marking ignored rows, which also frees the kernels from one variant
per index dtype and per ignore_index.

Two documented departures from torch 2.x (both asked for by users of a service):
  * int32 and int16 class indices are accepted (PyTorch's CPU kernels accept only int64 and uint8);
  * label_smoothing below 0 is an error (PyTorch silently treats it as 0).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from clce_wire.reduction import mean_denominator
from clce_wire.reduction import scales as reduction_scales   # check()'s argument is named reduction

from ..rails.errors import ArgumentError

FLOAT_DTYPES = ("float32", "float16", "bfloat16", "float64")
INDEX_DTYPES = ("int64", "int32", "int16", "uint8")
REDUCTIONS = ("none", "mean", "sum")

# PyTorch's scalar-type names, as its messages print them.
TORCH_NAMES = {
    "float32": "Float", "float64": "Double", "float16": "Half", "bfloat16": "BFloat16",
    "int64": "Long", "int32": "Int", "int16": "Short", "int8": "Char", "uint8": "Byte", "bool": "Bool",
}
_PROMOTE_ORDER = {"float16": 1, "bfloat16": 1, "float32": 2, "float64": 3}


def _dims(shape) -> str:
    return "[" + ", ".join(str(int(d)) for d in shape) + "]"


def _num(x: float) -> str:
    """Format a float as C++ iostreams do in PyTorch's messages (2.0 -> "2", 0.1 -> "0.1")."""
    return f"{x:g}"


def _promote(a: str, b: str) -> str:
    if a == b:
        return a
    if {a, b} == {"float16", "bfloat16"}:
        return "float32"
    return a if _PROMOTE_ORDER[a] >= _PROMOTE_ORDER[b] else b


# numpy computes dtype.name in Python (~3 us a call): the names checked per request, looked up
_DTYPE_NAMES: dict[np.dtype, str] = {np.dtype(n): n for n in ("float32", "float16", "float64", *INDEX_DTYPES)}


def _name(dtype: np.dtype) -> str:
    name = _DTYPE_NAMES.get(dtype)
    return name if name is not None else dtype.name


def _cast(arr: np.ndarray, dtype: str) -> np.ndarray:
    if _name(arr.dtype) == dtype:
        return arr
    if dtype == "bfloat16":
        import ml_dtypes
        return arr.astype(ml_dtypes.bfloat16)
    return arr.astype(dtype)


@dataclass
class Problem:
    """A validated request, in the form the kernels take."""

    input: np.ndarray              # C-contiguous, compute dtype (bfloat16 as ml_dtypes)
    compute_dtype: str             # the kernels' IN_DTYPE; also the loss dtype
    grad_dtype: str
    classes: int                   # C
    batch: int                     # N (1 for unbatched input)
    spatial: int                   # S = prod(d1..dk)
    soft: bool
    targets: np.ndarray | None     # int32 (rows,), -1 = ignored (hard targets)
    soft_target: np.ndarray | None  # input's layout and compute dtype (soft targets)
    weight: np.ndarray | None      # float32 / float64 (C,)
    weight_sum: float              # sum of all class weights (C when unweighted)
    reduction: str
    label_smoothing: float
    loss_scale: float              # 1 / (sum of target weights) for 'mean', else 1
    z_scale: float                 # 1 / (non-ignored rows) for 'mean', else 1
    denominator: float             # what 'mean' divides the loss sum by
    valid_rows: int
    row_shape: tuple[int, ...]     # shape of per-row outputs ('none' loss, lse, argmax)
    lse_square_scale: float
    softcap: float

    @property
    def rows(self) -> int:
        return self.batch * self.spatial


def check(input: np.ndarray, target: np.ndarray, weight: np.ndarray | None = None,
          ignore_index: int = -100, reduction: str = "mean", label_smoothing: float = 0.0, *,
          grad_dtype: str | None = None, lse_square_scale: float = 0.0,
          softcap: float | None = None) -> Problem:
    """Validate arguments as torch.nn.functional.cross_entropy does and normalise them. A refusal
    is an ArgumentError carrying PyTorch's exception."""
    ignore_index, label_smoothing = check_options(reduction, ignore_index, label_smoothing)
    in_dt = _name(input.dtype)
    if in_dt not in FLOAT_DTYPES:
        raise ArgumentError(RuntimeError(f"\"log_softmax_lastdim_kernel_impl\" not implemented for '{TORCH_NAMES.get(in_dt, in_dt)}'"))
    if grad_dtype is not None and grad_dtype not in FLOAT_DTYPES:
        raise ArgumentError(ValueError(f"grad_dtype must be one of {', '.join(FLOAT_DTYPES)}, got {grad_dtype!r}"))
    check_extras(lse_square_scale, softcap)
    if input.ndim == 0:
        if target.ndim == 0 and target.dtype.name in FLOAT_DTYPES:
            raise ArgumentError(IndexError("Dimension specified as 1 but tensor has no dimensions"))
        if target.ndim == 0:
            raise ArgumentError(RuntimeError("Expected floating point type for target with class probabilities, "
                                             f"got {TORCH_NAMES.get(target.dtype.name, target.dtype.name)}"))
        raise ArgumentError(IndexError("Dimension out of range (expected to be in range of [-1, 0], but got 1)"))

    unbatched = input.ndim == 1
    C = int(input.shape[0] if unbatched else input.shape[1])
    soft = tuple(input.shape) == tuple(target.shape)

    def check_weight(prefix: str) -> None:
        if weight is not None and (weight.ndim != 1 or weight.shape[0] != C):
            raise ArgumentError(RuntimeError(f"{prefix}weight tensor should be defined either for all {C} classes or no "
                                             f"classes but got weight tensor of shape: {_dims(weight.shape)}"))

    def check_smoothing() -> None:
        if not 0.0 <= label_smoothing <= 1.0:
            raise ArgumentError(RuntimeError(f"label_smoothing must be between 0.0 and 1.0. Got: {_num(label_smoothing)}"))

    if soft:
        t_dt = _name(target.dtype)
        if t_dt not in FLOAT_DTYPES:
            raise ArgumentError(RuntimeError("Expected floating point type for target with class probabilities, "
                                             f"got {TORCH_NAMES.get(t_dt, t_dt)}"))
        if ignore_index >= 0:
            raise ArgumentError(RuntimeError("ignore_index is not supported for floating point target"))
        check_weight("cross_entropy: ")
        check_smoothing()
        compute = _promote(in_dt, t_dt)
        if weight is not None:
            if _name(weight.dtype) not in FLOAT_DTYPES:
                raise ArgumentError(RuntimeError(f"expected scalar type {TORCH_NAMES[compute]} but found "
                                                 f"{TORCH_NAMES.get(weight.dtype.name, weight.dtype.name)}"))
            compute = _promote(compute, weight.dtype.name)
        batch = 1 if unbatched else int(input.shape[0])
        spatial = math.prod(input.shape[2:]) if not unbatched else 1
        row_shape = () if unbatched else (batch, *input.shape[2:])
        rows = batch * spatial
        x = np.ascontiguousarray(_cast(input, compute))
        y = np.ascontiguousarray(_cast(target, compute))
        w, wsum = _weights(weight, compute, C)
        loss_scale, z_scale = reduction_scales(reduction, float(rows), rows)   # every row counts
        return Problem(x, compute, grad_dtype or in_dt, C, batch, spatial, True, None, y, w, wsum,
                       reduction, label_smoothing, loss_scale, z_scale, float(rows), rows, row_shape,
                       float(lse_square_scale), float(softcap or 0.0))

    # ---- class indices ----
    # PyTorch checks the target's shape before its dtype (the unbatched size-1 check comes after)
    t_dt = _name(target.dtype)

    def check_index_dtype() -> None:
        if t_dt not in INDEX_DTYPES:
            raise ArgumentError(RuntimeError(f"expected target dtype to be Long or Byte, but got {TORCH_NAMES.get(t_dt, t_dt)}"))

    if unbatched:
        if target.ndim > 1:
            raise ArgumentError(RuntimeError("0D or 1D target tensor expected, multi-target not supported"))
        check_index_dtype()
        if target.ndim == 1 and target.shape[0] != 1:
            raise ArgumentError(ValueError(f"For 1D input, 1D target must have size 1, but got target size: {target.shape[0]}"))
        batch, spatial, row_shape = 1, 1, tuple(target.shape)
    else:
        if input.ndim == 2 and target.ndim != 1:
            if target.ndim == 0:
                raise ArgumentError(ValueError(f"Expected input batch_size ({input.shape[0]}) to match target batch_size (0)."))
            raise ArgumentError(RuntimeError("0D or 1D target tensor expected, multi-target not supported"))
        if target.ndim >= 1 and target.shape[0] != input.shape[0]:
            raise ArgumentError(ValueError(f"Expected input batch_size ({input.shape[0]}) to match target batch_size ({target.shape[0]})."))
        if input.ndim > 2:
            want = (input.shape[0], *input.shape[2:])
            if tuple(target.shape) != want:
                if input.ndim == 4 and target.ndim != 3:
                    raise ArgumentError(RuntimeError("only batches of spatial targets supported (3D tensors) but got targets "
                                                     f"of dimension: {target.ndim}"))
                if input.ndim == 4:
                    raise ArgumentError(RuntimeError(f"size mismatch (got input: {_dims(input.shape)} , target: {_dims(target.shape)}"))
                raise ArgumentError(RuntimeError(f"Expected target size {_dims(want)}, got {_dims(target.shape)}"))
        check_index_dtype()
        batch = int(input.shape[0])
        spatial = math.prod(input.shape[2:])
        row_shape = tuple(target.shape)
    check_weight("")
    if weight is not None and _name(weight.dtype) != in_dt:
        raise ArgumentError(RuntimeError(f"expected scalar type {TORCH_NAMES[in_dt]} but found "
                                         f"{TORCH_NAMES.get(weight.dtype.name, weight.dtype.name)}"))
    check_smoothing()

    t = target.reshape(-1).astype(np.int64, copy=False)
    if t.size and 0 <= t.min() and t.max() < C and not 0 <= ignore_index < C:
        valid, t32, n_valid = None, t.astype(np.int32), t.size   # no row ignored, none out of range
    else:
        ignored = t == ignore_index
        bad = ~ignored & ((t < 0) | (t >= C))
        if bad.any():
            raise ArgumentError(IndexError(f"Target {int(t[int(np.argmax(bad))])} is out of bounds."))
        valid = ~ignored
        t32 = np.where(ignored, -1, t).astype(np.int32)
        n_valid = int(valid.sum())
    w, wsum = _weights(weight, in_dt, C)
    denom = mean_denominator(t if valid is None else t[valid], w)
    loss_scale, z_scale = reduction_scales(reduction, denom, n_valid)
    return Problem(np.ascontiguousarray(input), in_dt, grad_dtype or in_dt, C, batch, spatial, False,
                   t32, None, w, wsum, reduction, label_smoothing, loss_scale, z_scale, denom, n_valid,
                   row_shape, float(lse_square_scale), float(softcap or 0.0))


def check_options(reduction: str, ignore_index: int, label_smoothing: float) -> tuple[int, float]:
    """The reduction's name and the types of ignore_index and label_smoothing, checked first, as
    PyTorch does (shared with the fused linear cross-entropy's check); returns them as int and float."""
    if reduction not in REDUCTIONS:
        raise ArgumentError(ValueError(f"{reduction} is not a valid value for reduction"))
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, (int, np.integer)):
        raise ArgumentError(TypeError(f"ignore_index must be an int, got {type(ignore_index).__name__}"))
    if isinstance(label_smoothing, bool) or not isinstance(label_smoothing, (int, float, np.floating)):
        raise ArgumentError(TypeError(f"label_smoothing must be a float, got {type(label_smoothing).__name__}"))
    return int(ignore_index), float(label_smoothing)


def check_extras(lse_square_scale: float, softcap: float | None) -> None:
    """The options PyTorch does not have: the z-loss coefficient and Gemma's soft-capping."""
    if softcap is not None and not (float(softcap) > 0 and np.isfinite(softcap)):
        raise ArgumentError(ValueError(f"softcap must be a positive finite number, got {softcap}"))
    if not math.isfinite(lse_square_scale) or lse_square_scale < 0:
        raise ArgumentError(ValueError(f"lse_square_scale must be a non-negative finite number, got {lse_square_scale}"))


def _weights(weight: np.ndarray | None, compute: str, classes: int) -> tuple[np.ndarray | None, float]:
    """Class weights in the kernels' accumulation type, and their sum (C when unweighted)."""
    if weight is None:
        return None, float(classes)
    acc = np.float64 if compute == "float64" else np.float32
    w = np.ascontiguousarray(weight.astype(acc))
    return w, float(np.sum(w, dtype=np.float64))
