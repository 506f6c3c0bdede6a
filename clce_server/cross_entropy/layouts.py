"""Request layouts other than PyTorch's (N, C, d1, ..., dk): the class dimension last, and the
causal language-model shift.

A language model's logits are (B, T, V), class dimension last, and its labels (B, T). Scoring
position t against label t + 1 is usually written on the client as
``logits[..., :-1, :].contiguous().view(-1, V)``, which copies the whole logits tensor before
anything is sent. Here the client sends the tensors as they are and says ``shift=1``; this module
rewrites the request into the rows the engine already serves:

* the (..., T, V) input, C-contiguous, is viewed as (rows, V): a view, no copy;
* the targets become a new (rows,) int64 array (a few bytes per row) holding ``target[..., t + shift]``
  at position t and ``ignore_index`` at the last ``shift`` positions. Ignored rows are exactly what
  the manual shift leaves out: zero gradient, and no part of the mean's denominator, the class
  weights' sum, the label smoothing or the z-loss;
* the results are mapped back: the gradient is (..., T, V) (the same memory), with zero rows at the
  dropped positions; per-row outputs ('none' loss, lse, argmax, z_loss) have the shifted labels'
  shape (..., T - shift), which is what ``F.cross_entropy(logits[..., :-shift, :].transpose(1, -1),
  labels[..., shift:], reduction="none")`` gives.

`to_rows` is the only hook: `jobs.LossJob` calls it on the parsed arguments and keeps the `Restore`
for the result. Requests in such a layout are never coalesced with others (no batch key). Bad
arguments raise `errors.ArgumentError` carrying PyTorch's exception type and message (4xx).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..rails.errors import ArgumentError
from .semantics import FLOAT_DTYPES, INDEX_DTYPES, TORCH_NAMES

__all__ = ["wanted", "to_rows", "Restore"]

def _dims(shape) -> str:
    return "[" + ", ".join(str(int(d)) for d in shape) + "]"


def wanted(args: Mapping[str, Any]) -> bool:
    """Whether the request uses a layout this module rewrites."""
    return bool(args.get("classes_last")) or args.get("shift", 0) != 0


@dataclass
class Restore:
    """Maps the engine's per-row results back to the request's layout."""

    input_shape: tuple[int, ...]
    row_shape: tuple[int, ...]       # target's shape: the positions, before dropping any
    shift: int

    def rows(self, a: np.ndarray | None) -> np.ndarray | None:
        """A per-row result (rows,) -> the shifted labels' shape (..., T - shift)."""
        if a is None or a.ndim == 0:
            return a
        a = a.reshape(self.row_shape)
        if self.shift:
            a = np.ascontiguousarray(a[..., : self.row_shape[-1] - self.shift])
        return a

    def __call__(self, res):
        if res.grad is not None:
            res.grad = res.grad.reshape(self.input_shape)   # the same memory
        if res.loss is not None and res.loss.ndim:           # reduction='none'
            res.loss = self.rows(res.loss)
        res.lse = self.rows(res.lse)
        res.argmax = self.rows(res.argmax)
        if res.z_loss is not None and res.z_loss.ndim:
            res.z_loss = self.rows(res.z_loss)
        return res


def _check(args: Mapping[str, Any]) -> tuple[np.ndarray, np.ndarray, int]:
    x, t, shift = args["input"], args["target"], args.get("shift", 0)
    if isinstance(shift, bool) or not isinstance(shift, (int, np.integer)):
        raise ArgumentError(TypeError(f"shift must be an int, got {type(shift).__name__}"))
    shift = int(shift)
    if shift < 0:
        raise ArgumentError(ValueError(f"shift must be >= 0, got {shift}"))
    soft = x.ndim >= 1 and tuple(t.shape) == tuple(x.shape) and t.dtype.name in FLOAT_DTYPES
    if soft:
        if shift:
            raise ArgumentError(ValueError("shift needs class-index targets; got class probabilities shaped like the input "
                                           f"{_dims(x.shape)}"))
        return x, t, 0
    if x.ndim == 0:
        raise ArgumentError(IndexError("Dimension out of range (expected to be in range of [-1, 0], but got -1)"))
    if x.ndim == 1 and not shift:
        return x, t, 0           # (C,) with a () target: already PyTorch's layout
    if tuple(t.shape) != tuple(x.shape[:-1]):
        raise ArgumentError(ValueError(f"with the class dimension last, input {_dims(x.shape)} needs target "
                                       f"{_dims(x.shape[:-1])}, got target {_dims(t.shape)}"))
    if shift:
        if x.ndim < 2:
            raise ArgumentError(ValueError(f"shift needs a sequence dimension: input (..., T, C), got {_dims(x.shape)}"))
        T = int(x.shape[-2])
        if shift >= T:
            raise ArgumentError(ValueError(f"shift must be smaller than the sequence length T = {T}, got {shift}"))
        t_dt = t.dtype.name
        if t_dt not in INDEX_DTYPES:
            raise ArgumentError(RuntimeError(f"expected target dtype to be Long or Byte, but got {TORCH_NAMES.get(t_dt, t_dt)}"))
    return x, t, shift


def to_rows(args: Mapping[str, Any]) -> tuple[dict[str, Any], Restore | None]:
    """The request rewritten into PyTorch's (N, C) rows, and the map back for its results (None
    when there is nothing to rewrite). Bad arguments raise ArgumentError with PyTorch's type."""
    if not wanted(args):
        return args, None
    x, t, shift = _check(args)
    out = {**args, "classes_last": False, "shift": 0}
    if x.ndim <= 1:
        return out, None
    C = int(x.shape[-1])
    rows = int(np.prod(x.shape[:-1], dtype=np.int64))
    # a C-contiguous body tensor: reshape is a view; anything else is copied by numpy here
    out["input"] = x.reshape(rows, C)
    if tuple(t.shape) == tuple(x.shape):          # probabilities, classes last too
        out["target"] = t.reshape(rows, C)
    elif shift:
        T = int(x.shape[-2])
        src = t.reshape(-1, T)
        shifted = np.empty(src.shape, np.int64)
        shifted[:, : T - shift] = src[:, shift:]
        shifted[:, T - shift:] = args.get("ignore_index", -100)
        out["target"] = shifted.reshape(rows)
    else:
        out["target"] = t.reshape(rows)
    return out, Restore(tuple(x.shape), tuple(x.shape[:-1]), shift)
