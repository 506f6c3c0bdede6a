"""Pipelining over TCP: a big batch travels as row chunks on several connections, so the server
computes chunk k while chunk k+1 uploads and chunk k-1's gradient downloads (docs/protocol.md,
"Pipelining").

The result is bit-identical to one request, for every reduction, weight, ignore_index, label
smoothing and extra: every chunk is computed with the whole batch's 'mean' normaliser
(`mean_denominator`, `mean_rows`, computed here exactly as the server computes it for one
request), chunks start on REDUCE_BLOCK_ROWS boundaries, and their per-block loss sums
(`return_partials`) are added in order in float64, as the server adds the blocks of one request.
The gradient of every chunk is copied into its rows of one buffer as it arrives.

`Pipeline` does no I/O: the client's `_ChunkRun` hands its `messages()` to `connections` workers
(threads of `Client`, tasks of `AsyncClient`), which `add()` the answers; the first failure stops
the others before it is raised.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np

from clce_wire.options import request_message
from clce_wire.reduction import REDUCE_BLOCK_ROWS, combine_partials, mean_normaliser
from clce_wire.protocol import DTYPES, ProtocolError, WireTensor, decode_tensor, encode_tensor

#: default chunk size and connections
CHUNK_BYTES = 16 << 20
CONNECTIONS = 4
#: batches smaller than this go as one request
MIN_BYTES = 32 << 20

_ROW_EXTRAS = ("lse", "argmax")


def _aligned_empty(nbytes: int) -> np.ndarray:
    buf = np.empty(nbytes + 64, np.uint8)
    start = (-buf.ctypes.data) % 64
    return buf[start:start + nbytes]


def _rows(wt: WireTensor, n0: int, n1: int) -> WireTensor:
    """Samples n0..n1 (the first dimension) of a C-order tensor, without a copy."""
    per = math.prod(wt.shape[1:]) * DTYPES[wt.dtype]
    mv = memoryview(wt.data).cast("B")
    return WireTensor(wt.dtype, (n1 - n0, *wt.shape[1:]), mv[n0 * per:n1 * per])


def as_rows(values: dict[str, Any]) -> tuple[dict[str, Any], tuple[tuple[int, ...], tuple[int, ...], int] | None]:
    """A request with the class dimension last (``classes_last``, ``shift``) as PyTorch's (N, C)
    rows: the input (..., T, C) viewed as (rows, C) (no copy), the targets shifted here as the
    server would shift them (``ignore_index`` at each sequence's last ``shift`` positions). Row
    chunks of it are then plain row ranges, and the whole batch's normaliser for 'mean' counts
    exactly the labels the server scores. Also returns (input shape, row shape, shift) to map the
    results back (None when there was nothing to rewrite)."""
    shift = int(values.get("shift") or 0)
    if not values.get("classes_last") and not shift:
        return values, None
    x, t = values["input"], values["target"]
    if len(x.shape) < 2 or not isinstance(t, WireTensor):
        return values, None
    C = int(x.shape[-1])
    rows = math.prod(x.shape[:-1])
    out = {**values, "classes_last": False, "shift": 0}
    out["input"] = WireTensor(x.dtype, (rows, C), x.data)
    if tuple(t.shape) == tuple(x.shape):            # probabilities, classes last too
        out["target"] = WireTensor(t.dtype, (rows, C), t.data)
        return out, (tuple(x.shape), tuple(x.shape[:-1]), 0)
    if tuple(t.shape) != tuple(x.shape[:-1]) or (shift and shift >= x.shape[-2]):
        return values, None          # the server words the error, as for one request
    tgt = decode_tensor(t, name="target").reshape(-1, int(x.shape[-2]) if shift else 1)
    if shift:
        shifted = np.empty(tgt.shape, np.int64)
        shifted[:, : tgt.shape[1] - shift] = tgt[:, shift:]
        shifted[:, tgt.shape[1] - shift:] = int(values.get("ignore_index", -100))
        tgt = shifted
    out["target"] = encode_tensor(tgt.reshape(rows))
    return out, (tuple(x.shape), tuple(x.shape[:-1]), shift)


class Pipeline:
    """One batch as row chunks. `values`: the request's option values, tensors in wire form (the
    whole batch's message before it is sent); None from `plan` when it should stay one request.
    A class-last request (``classes_last``, ``shift``) is split as its (N, C) rows (`as_rows`)."""

    def __init__(self, values: dict[str, Any], chunk_samples: int,
                 alloc: Callable[[int], np.ndarray] = _aligned_empty):
        values, self.layout = as_rows(values)
        self.values = values
        x: WireTensor = values["input"]
        self.x = x
        self.n = x.shape[0]
        self.reduction = values.get("reduction", "mean")
        self.return_grad = bool(values.get("return_grad"))
        self.bounds = [(a, min(a + chunk_samples, self.n)) for a in range(0, self.n, chunk_samples)]
        t = values["target"]
        soft = tuple(t.shape) == tuple(x.shape)
        t = None if soft else decode_tensor(t, name="target")
        w = values.get("weight")
        w = decode_tensor(w, name="weight") if w is not None and not soft else None
        d, rows = mean_normaliser(x.dtype, x.shape, t if t is not None else values["target"], w,
                                  int(values.get("ignore_index", -100)))
        self.extra = {"mean_denominator": d, "mean_rows": rows, "return_partials": True}
        self.grad = None
        if self.return_grad:
            gdt = values.get("grad_dtype") or x.dtype
            self.grad_dtype = gdt
            self.grad = alloc(math.prod(x.shape) * DTYPES[gdt])
        self.answers: list[dict | None] = [None] * len(self.bounds)

    @staticmethod
    def plan(values: dict[str, Any], *, min_bytes: int, chunk_bytes: int,
             alloc: Callable[[int], np.ndarray] = _aligned_empty) -> "Pipeline | None":
        """The row chunks for `values`, or None when it should stay one request. `alloc(nbytes)`
        gives the gradient's buffer (64-byte aligned): the client's pool of received memory."""
        x = values["input"]
        t = values["target"]
        if not isinstance(x, WireTensor) or len(x.shape) < 2 or not isinstance(t, WireTensor) or not t.shape:
            return None
        nbytes = memoryview(x.data).nbytes
        if nbytes < max(min_bytes, 1):
            return None
        rows, layout = as_rows(values)
        x, t = rows["input"], rows["target"]
        if layout is None and t.shape[0] != x.shape[0]:
            return None
        samples = Pipeline.chunk_samples(x, chunk_bytes)
        if samples >= x.shape[0]:
            return None
        return Pipeline(values, samples, alloc)

    @staticmethod
    def chunk_samples(x: WireTensor, chunk_bytes: int, limit_bytes: int | None = None) -> int:
        """Samples (first dimension) per chunk of about `chunk_bytes` of input, a multiple of the
        reduction's blocks, so the chunks combine to one request's bits. Only when one block's
        samples would exceed `limit_bytes` (a hard bound, such as a shared-memory budget) are
        there fewer: as many as fit, at least one (then exact to rounding, not to the bit)."""
        nbytes = memoryview(x.data).nbytes
        spatial = math.prod(x.shape[2:])
        unit = REDUCE_BLOCK_ROWS // math.gcd(REDUCE_BLOCK_ROWS, max(spatial, 1))   # samples per block multiple
        per_sample = max(nbytes // max(x.shape[0], 1), 1)
        samples = max(unit, (chunk_bytes // per_sample) // unit * unit)
        if limit_bytes is not None and samples * per_sample > limit_bytes:
            samples = max(1, limit_bytes // per_sample)
        return samples

    def chunk_values(self):
        """(index, option values) per chunk: its rows of the tensors, the whole batch's normaliser."""
        for i, (a, b) in enumerate(self.bounds):
            v = dict(self.values)
            v["input"] = _rows(self.x, a, b)
            v["target"] = _rows(self.values["target"], a, b)
            v.update(self.extra)
            yield i, v

    def messages(self):
        """(index, message) per chunk."""
        for i, v in self.chunk_values():
            yield i, request_message(v)

    def grad_rows(self, i: int) -> np.ndarray | None:
        """Where chunk i's gradient belongs: its rows of the one buffer (the client receives it
        there directly), or None without a gradient."""
        if not self.return_grad:
            return None
        a, b = self.bounds[i]
        per = math.prod(self.x.shape[1:]) * DTYPES[self.grad_dtype]
        return self.grad[a * per:b * per]

    def add(self, i: int, msg: dict[str, Any]) -> None:
        """Chunk i's answer. Its gradient was received into its rows (an empty bin in `msg`), or
        is copied there now."""
        if self.return_grad:
            g = msg.get("grad")
            if not isinstance(g, WireTensor):
                raise ProtocolError("a chunk's answer has no grad")
            rows = self.grad_rows(i)
            src = memoryview(g.data).cast("B")
            if src.nbytes != rows.nbytes and not (src.nbytes == 0 and rows.nbytes):
                raise ProtocolError("a chunk's grad has the wrong size")
            if src.nbytes:
                rows[...] = np.frombuffer(src, np.uint8)
            msg = {k: v for k, v in msg.items() if k != "grad"}
        self.answers[i] = msg

    def result(self) -> dict[str, Any]:
        """The whole batch's answer, as one response would have carried it."""
        answers = self.answers
        first = answers[0]
        out: dict[str, Any] = {"v": first.get("v")}
        if self.return_grad:
            shape = self.layout[0] if self.layout is not None else tuple(self.x.shape)
            out["grad"] = WireTensor(self.grad_dtype, shape, memoryview(self.grad))
        partials = np.concatenate([decode_tensor(a["partials"], name="partials") for a in answers])
        loss_dt = decode_tensor(first["loss"], name="loss").dtype
        loss, z, acc = combine_partials(partials, self.reduction, self.extra["mean_denominator"],
                                        self.extra["mean_rows"], "z_loss" in first, loss_dt,
                                        want_accuracy="accuracy" in first)
        if self.reduction == "none":       # per-row results: the chunks' rows, in order
            out["loss"] = _concat([a["loss"] for a in answers])
            if "z_loss" in first:
                out["z_loss"] = _concat([a["z_loss"] for a in answers])
        else:
            out["loss"] = encode_tensor(loss)
            if z is not None:
                out["z_loss"] = encode_tensor(z)
        if acc is not None:
            out["accuracy"] = acc
        for key in _ROW_EXTRAS:
            if key in first:
                out[key] = _concat([a[key] for a in answers])
        if self.layout is not None:       # per-row results in the shifted labels' shape
            for key in ("loss", "z_loss", *_ROW_EXTRAS):
                if key in out and (key in _ROW_EXTRAS or self.reduction == "none"):
                    out[key] = _row_layout(out[key], *self.layout[1:])
        return out


def _row_layout(wt: WireTensor, row_shape: tuple[int, ...], shift: int) -> WireTensor:
    """Per-row results (rows,) -> (..., T - shift), as the server maps them for one request."""
    item = DTYPES[wt.dtype]         # as bytes: any dtype, bfloat16 included
    a = np.frombuffer(memoryview(wt.data).cast("B"), np.uint8).reshape(*row_shape, item)
    if shift:
        a = np.ascontiguousarray(a[..., : row_shape[-1] - shift, :])
    return WireTensor(wt.dtype, tuple(a.shape[:-1]), memoryview(a).cast("B"))


def _concat(parts: list[WireTensor]) -> WireTensor:
    data = b"".join(bytes(memoryview(p.data)) for p in parts)
    shape = (sum(p.shape[0] for p in parts), *parts[0].shape[1:])
    return WireTensor(parts[0].dtype, shape, data)
