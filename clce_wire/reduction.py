"""How a batch's rows reduce to its loss: the one definition, numpy only.

'mean' and 'sum' are computed in blocks of `REDUCE_BLOCK_ROWS` rows. The device sums each block
in a fixed order (kernels/reduce_rows.cl); the block sums are then added here, in order, in
float64; the whole batch's normalisers scale the result. Everything that must agree for a
result to be bit-identical lives here:

* `mean_denominator`, `mean_normaliser`, `scales`: what 'mean' divides by, and the per-row
  scales the kernels apply to each row's loss and gradient (semantics.check, and a pipelined
  batch's chunks through jobs.LossJob);
* `block_starts`: where a row range's blocks start, on whole-batch multiples of the block size,
  so that row chunks of a batch reduce exactly as the whole batch (the engine);
* `sum_blocks` and `finish`: block sums to loss, z-loss and accuracy (the engine for one
  request, the client pipeline for the chunks of one batch: the same bits either way).
"""

from __future__ import annotations

import numpy as np

__all__ = ["REDUCE_BLOCK_ROWS", "block_starts", "mean_denominator", "mean_normaliser", "scales", "sum_blocks",
           "finish", "combine_partials"]

#: the loss of 'mean'/'sum' is reduced in blocks of this many rows (each summed in a fixed order
#: on the device), the block sums then added in order in float64. Row chunks that start on a
#: block boundary therefore combine to exactly the bits of the whole batch in one request.
REDUCE_BLOCK_ROWS = 64


def block_starts(row0: int, rows: int) -> np.ndarray:
    """Segment starts (and the end) for rows [row0, row0 + rows), relative to row0: boundaries
    at whole-problem multiples of REDUCE_BLOCK_ROWS."""
    b = REDUCE_BLOCK_ROWS
    return np.array([0, *range(b - row0 % b, rows, b), rows])


def mean_denominator(valid_targets: np.ndarray, weight: np.ndarray | None) -> float:
    """What 'mean' divides the loss sum by, for class-index targets: the summed class weights of
    the non-ignored targets (`weight` already in the kernels' accumulation type), or their count
    when unweighted; a float64 sum, as PyTorch's."""
    if weight is None:
        return float(valid_targets.size)
    return float(np.sum(weight[valid_targets], dtype=np.float64))


def mean_normaliser(input_dtype: str, input_shape, target, weight, ignore_index: int) -> tuple[float, int]:
    """A whole batch's (denominator, non-ignored rows) for 'mean', from its raw arguments: what
    the server computes for it as one request (for the row chunks of a pipelined batch)."""
    if tuple(target.shape) == tuple(input_shape):   # probabilities: every row counts
        shape = tuple(input_shape)
        rows = 1 if len(shape) == 1 else int(np.prod(shape[:1] + shape[2:], dtype=np.int64))
        return float(rows), rows
    t = target.reshape(-1).astype(np.int64, copy=False)
    valid = t[t != ignore_index]
    w = None if weight is None else weight.astype(np.float64 if input_dtype == "float64" else np.float32)
    return mean_denominator(valid, w), int(valid.size)


def scales(reduction: str, denominator: float, valid_rows: int) -> tuple[float, float]:
    """(loss_scale, z_scale): what the kernels multiply each row's loss and gradient, and its
    z-loss, by: 1/denominator and 1/valid_rows for 'mean' (inf for an empty batch, as 0/0 is
    PyTorch's nan), 1 otherwise."""
    if reduction != "mean":
        return 1.0, 1.0
    with np.errstate(divide="ignore"):
        return float(np.float64(1.0) / denominator), float(np.float64(1.0) / valid_rows)


def sum_blocks(partials) -> np.ndarray:
    """The sums of block partials (blocks, k), added in order in float64 (sequentially: cumsum
    never reorders, unlike np.sum's pairwise summation)."""
    p = np.asarray(partials, np.float64)
    if not len(p):
        return np.zeros(p.shape[1] if p.ndim == 2 else 3, np.float64)
    return np.cumsum(np.vstack([np.zeros((1, p.shape[1])), p]), axis=0)[-1]


def finish(sums, reduction: str, denominator: float, valid_rows: int, with_z: bool, loss_dtype, *,
           want_accuracy: bool):
    """loss, z_loss (None without z-loss) and accuracy (None unless asked) of a 'mean' or 'sum'
    batch from its summed (loss, z-loss, correct argmaxes)."""
    with np.errstate(invalid="ignore", divide="ignore"):
        if reduction == "mean":
            main = sums[0] / np.float64(denominator)
            z = sums[1] / np.float64(valid_rows) if with_z else 0.0
        else:
            main, z = sums[0], sums[1]
    loss = np.array(main + z).astype(loss_dtype)
    z_loss = np.array(z, np.float32) if with_z else None
    accuracy = (float(sums[2]) / valid_rows if valid_rows else float("nan")) if want_accuracy else None
    return loss, z_loss, accuracy


def combine_partials(partials, reduction: str, denominator: float, rows: int, z_scale: bool,
                     loss_dtype, *, want_accuracy: bool):
    """`finish` over the partials of all of a batch's chunks, in order."""
    return finish(sum_blocks(partials), reduction, denominator, rows, z_scale, loss_dtype,
                  want_accuracy=want_accuracy)
