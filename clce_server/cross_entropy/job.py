"""The loss as scheduler work: `LossJob` carries one request to an engine, in row chunks, and small
compatible requests share one launch through `run_batch`. A pipelined batch's chunks are scaled
by the whole batch's 'mean' (`whole_batch_mean`, from `clce_wire.reduction`)."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any, Generator

import numpy as np

from clce_wire import options, reduction
from clce_wire.protocol import DTYPES, dtype_name

from . import layouts
from ..rails.errors import classify, device_faults
from ..rails.scheduler import Job


class LossJob(Job):
    """One cross_entropy request for whichever device the scheduler picks.

    ``engines`` maps a device index to its LossEngine. ``chunk_s`` is the device time per step
    (None: the whole request in one step, FIFO's baseline). A small 2-D request gets a batch key
    (`clce_wire.options.coalescing_key`), so the scheduler may coalesce it with others into one
    launch. The job owns no memory: ``args["grad_out"]``, where the gradient goes, belongs to the
    request (its lease's pooled buffer, its body, or the client's shared memory).
    """

    def __init__(self, args: Mapping[str, Any], engines: Mapping[int, Any], *, chunk_s: float | None,
                 max_batch_elements: int = 0):
        # classes_last / shift: rewritten into (N, C) rows here, results mapped back by self.restore
        args, self.restore = layouts.to_rows(args)
        self.request = options.engine_kwargs(args)
        self.engines = engines
        self.chunk_s = chunk_s
        self.batch_key = (options.coalescing_key(args, max_batch_elements)
                          if self.restore is None and max_batch_elements else None)
        self.cost = float(args["input"].size)
        #: where the gradient goes, in the request's layout (None: the engine allocates it)
        self.grad_out = args.get("grad_out")
        # The kernels write it there directly, also when it is the input's own memory (in place:
        # the engine reads each logit before writing its gradient); a layout rewrite computes the
        # same memory viewed as rows.
        self._rows_grad_out = (None if self.grad_out is None
                               else self.grad_out.reshape(args["input"].shape))
        #: row chunks of a bigger batch: its normaliser for 'mean' (the kernel scales by it)
        self.mean_of = ((args["mean_denominator"], args["mean_rows"])
                        if args.get("mean_denominator") is not None or args.get("mean_rows") is not None else None)
        if self.mean_of is not None:
            self.batch_key = None      # one problem's scales: never coalesced

    def _deliver(self, result):
        """The gradient where it was asked for: already there (written directly, maybe viewed
        as rows), or copied there from a coalesced launch's own array."""
        if self.grad_out is not None and result.grad is not None:
            if result.grad.ctypes.data != self.grad_out.ctypes.data:
                np.copyto(self.grad_out, result.grad.reshape(self.grad_out.shape), casting="no")
            result.grad = self.grad_out
        return result

    def run(self, device) -> Generator[float, None, Any]:
        engine = self.engines[device.index]
        with device_faults():
            prep = engine.prepare(**self.request, grad_out=self._rows_grad_out)
        if self.mean_of is not None:
            prep.problem = whole_batch_mean(prep.problem, *self.mean_of)
        try:
            with device_faults():
                for chunk in prep.chunks(self.chunk_s):
                    yield engine.run_chunk(prep, chunk)
                result = engine.finish(prep)
            return self._deliver(result if self.restore is None else self.restore(result))
        finally:
            prep.release()

    @classmethod
    def run_batch(cls, device, jobs: Sequence["LossJob"]) -> list:
        engine = jobs[0].engines[device.index]
        return [classify(r) if isinstance(r, BaseException) else j._deliver(r)
                for j, r in zip(jobs, engine.cross_entropy_many([j.request for j in jobs]))]


def whole_batch_mean(p, denominator: float | None, rows: int | None):
    """`p` (a chunk of rows) with the whole batch's 'mean' normaliser, so its gradient and loss
    partials are the whole batch's (clce_wire.reduction, as for the whole batch in one request)."""
    d = float(p.denominator if denominator is None else denominator)
    n = int(p.valid_rows if rows is None else rows)
    loss_scale, z_scale = reduction.scales(p.reduction, d, n)
    return dataclasses.replace(p, denominator=d, valid_rows=n, loss_scale=loss_scale, z_scale=z_scale)


#: what the engine holds per row of a request besides its tensors: the int32 targets, the per-row
#: loss, z-loss, lse and argmax, and their host copies for per-row answers
ROW_BYTES = 48


def inflight_bytes(args: Mapping[str, Any], body_len: int) -> int:
    """What serving a request holds in the server's memory until it finishes: its body, the
    gradient when the server allocates it (not when it is written over the body or into the
    client's shared memory), a copy of logits it cannot compute on where they lie (read-only shared
    memory), and the per-row results. Logits referenced in shared memory are the client's memory:
    they are not counted here (the shared-memory budget bounded them at registration)."""
    x = args["input"]
    if x.ndim <= 1:
        rows = 1
    else:
        classes = int(x.shape[-1] if layouts.wanted(args) else x.shape[1])
        rows = x.size // max(classes, 1)
    held = body_len + ROW_BYTES * rows
    if isinstance(x, np.ndarray) and not x.flags.writeable:   # computed on a copy (engine._input_buffer)
        held += x.nbytes
    if args.get("return_grad") and args.get("grad_out") is not x and args.get("grad_ref") is None:
        held += x.size * DTYPES.get(args.get("grad_dtype") or dtype_name(x.dtype), 4)
    return held
