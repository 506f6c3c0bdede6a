"""The loss as scheduler work: `LossJob` carries one request to an engine, in row chunks, and small
compatible requests share one launch through `run_batch`."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any, Generator

import numpy as np

from clce_wire import options
from clce_wire.protocol import DTYPES, dtype_name

from . import layouts
from .errors import classify
from .hostmem import POOL
from .scheduler import Job

# weights of more classes than this are not worth comparing byte for byte to coalesce
_BATCH_MAX_WEIGHT = 4096


class LossJob(Job):
    """One cross_entropy request for whichever device the scheduler picks.

    ``engines`` maps a device index to its LossEngine. ``chunk_s`` is the device time per step
    (None: the whole request in one step, FIFO's baseline). A small 2-D request gets a batch key
    (see `batch_key_for`), so the scheduler may coalesce it with others into one launch.
    """

    def __init__(self, args: Mapping[str, Any], engines: Mapping[int, Any], *, chunk_s: float | None,
                 max_batch_elements: int = 0):
        # classes_last / shift: rewritten into (N, C) rows here, results mapped back by self.restore
        args, self.restore = layouts.to_rows(args)
        self.request = options.engine_kwargs(args)
        self.engines = engines
        self.chunk_s = chunk_s
        self.batch_key = batch_key_for(args, max_batch_elements) if self.restore is None else None
        self.cost = float(args["input"].size)
        #: where the gradient goes (the client's shared memory), else None: a pooled buffer
        self.grad_out = args.get("grad_out")
        # The kernels write it there directly, also when it is the input's own memory (in place:
        # the engine reads each logit before writing its gradient). A layout rewrite
        # (classes_last / shift) computes rows of another shape: delivered after.
        self._direct = self.grad_out is not None and self.restore is None
        #: row chunks of a bigger batch: its normaliser for 'mean' (the kernel scales by it)
        self.mean_of = ((args["mean_denominator"], args["mean_rows"])
                        if args.get("mean_denominator") is not None or args.get("mean_rows") is not None else None)
        if self.mean_of is not None:
            self.batch_key = None      # one problem's scales: never coalesced

    def _deliver(self, result):
        """Put the gradient where it was asked for, when the engine computed it elsewhere (a
        coalesced launch)."""
        if self.grad_out is not None and result.grad is not None and result.grad is not self.grad_out:
            np.copyto(self.grad_out, result.grad.reshape(self.grad_out.shape), casting="no")
            POOL.release(result.grad)
            result.grad = self.grad_out
        return result

    def run(self, device) -> Generator[float, None, Any]:
        engine = self.engines[device.index]
        try:
            prep = engine.prepare(**self.request, grad_out=self.grad_out if self._direct else None)
        except Exception as exc:
            raise classify(exc) from exc
        if self.mean_of is not None:
            prep.problem = whole_batch_mean(prep.problem, *self.mean_of)
        try:
            for chunk in prep.chunks(self.chunk_s):
                yield engine.run_chunk(prep, chunk)
            result = engine.finish(prep)
            return self._deliver(result if self.restore is None else self.restore(result))
        except Exception as exc:
            raise classify(exc) from exc
        finally:
            prep.release()

    @classmethod
    def run_batch(cls, device, jobs: Sequence["LossJob"]) -> list:
        engine = jobs[0].engines[device.index]
        return [classify(r) if isinstance(r, BaseException) else j._deliver(r)
                for j, r in zip(jobs, engine.cross_entropy_many([j.request for j in jobs]))]


def whole_batch_mean(p, denominator: float | None, rows: int | None):
    """`p` (a chunk of rows) with the whole batch's 'mean' normaliser, so its gradient and loss
    partials are the whole batch's (semantics.check computes the same from a whole batch)."""
    d = float(p.denominator if denominator is None else denominator)
    n = int(p.valid_rows if rows is None else rows)
    mean = p.reduction == "mean"
    with np.errstate(divide="ignore"):
        return dataclasses.replace(p, denominator=d, valid_rows=n,
                                   loss_scale=float(np.float64(1.0) / d) if mean else 1.0,
                                   z_scale=float(np.float64(1.0) / n) if mean else 1.0)


def batch_key_for(args: Mapping[str, Any], max_elements: int) -> tuple | None:
    """What requests sharing one launch must agree on, or None when this one runs alone: the shape
    of the work (classes, dtypes, hard or soft targets) and every option declared `shared`. The
    engine regroups by the exact validated problem anyway; this key only decides who waits together."""
    x, w = args["input"], args["weight"]
    if not (max_elements and x.ndim == 2 and 0 < x.size <= max_elements and not args["lse_square_scale"]
            and (w is None or w.size <= _BATCH_MAX_WEIGHT)):
        return None
    t = args["target"]
    return (x.shape[1], x.dtype.str, t.shape == x.shape, t.dtype.kind, *options.shared_values(args))


def inflight_bytes(args: Mapping[str, Any], body_len: int) -> int:
    """What a request holds until it finishes: its body, plus the gradient it will send back."""
    x = args["input"]
    if not args.get("return_grad") or args.get("grad_out") is x:   # none, or written over the body
        return body_len
    return body_len + x.size * DTYPES.get(args.get("grad_dtype") or dtype_name(x.dtype), 4)
