"""The kernels' core cases, run by tests/cross_entropy/test_oclgrind_kernels.py inside `oclgrind --data-races --uninitialized`.

Under that wrapper Oclgrind is the only OpenCL platform this process sees, so the engine runs on
the simulator unchanged; `tuning_row` and the launch overrides give it each tuning row's kernel
shape. Every case's loss and gradient are checked against torch (float64, on the same values) here;
the Oclgrind diagnostics go to its log, which the test reads. Prints one JSON line per case:

    {"config": ..., "case": ..., "ok": bool, "detail": ...}

    oclgrind --data-races --uninitialized python tests/support/oclgrind_cases.py CONFIG [CONFIG ...]

CONFIG names one of CONFIGS below. Shapes are small: the simulator runs every work-item's every
instruction, checked.
"""

from __future__ import annotations

import json
import sys
import traceback
from pathlib import Path

import ml_dtypes
import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from clce_server.rails.device import open_devices  # noqa: E402
from clce_server.cross_entropy.engine import LossEngine, _RowBlock, _RowOutputs  # noqa: E402

BF16 = np.dtype(ml_dtypes.bfloat16)
DTYPES = ("float32", "float16", "bfloat16", "float64")
#: gradient tolerance, relative to the largest |gradient|: one rounding of the gradient's dtype
#: plus fp32 accumulation; the loss is checked to the accumulation type's precision
GRAD_TOL = {"float32": 2e-6, "float64": 1e-12, "float16": 1.5e-3, "bfloat16": 1e-2}
LOSS_TOL = {"float32": 2e-5, "float64": 1e-10, "float16": 1e-3, "bfloat16": 8e-3}

#: name -> (tuning row (vendor, kind), launch overrides). The group rows run ce_rows_group and
#: reduce_rows at their work-group size: the NVIDIA and generic-GPU rows at the sizes they get on
#: their devices (256: 8 warps of 32; 128), then the extremes 32 and 1024. The CPU row runs
#: ce_rows_item (CE_VW 8 and 16, the AVX-512 width) and ce_spatial8.
CONFIGS = {
    "cpu-vw8": (("pocl", "cpu"), {"CE_VW": 8}),
    "cpu-vw16": (("pocl", "cpu"), {"CE_VW": 16}),
    "nvidia": (("NVIDIA", "gpu"), {"local_size": 256, "reduce_local_size": 256}),
    "gpu": (("AMD", "gpu"), {"local_size": 128, "reduce_local_size": 128}),
    "wg32": (("AMD", "gpu"), {"local_size": 32, "reduce_local_size": 32}),
    "wg1024": (("AMD", "gpu"), {"local_size": 1024, "reduce_local_size": 1024}),
}
#: configurations that run the shorter case list (see cases)
SHORT = {"wg1024"}


def np_dtype(name: str) -> np.dtype:
    return BF16 if name == "bfloat16" else np.dtype(name)


def to_torch64(a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.asarray(a, np.float64).copy())


def reference(x, target, weight=None, *, reduction="mean", ignore_index=-100, label_smoothing=0.0,
              softcap=None, lse_square_scale=0.0):
    """torch in float64 on the same values: the loss, the gradient of the reduced loss, the lse."""
    xt = to_torch64(x).requires_grad_(True)
    z = softcap * torch.tanh(xt / softcap) if softcap else xt
    soft = np.issubdtype(target.dtype, np.floating) or target.dtype == BF16
    tt = to_torch64(target) if soft else torch.from_numpy(target.astype(np.int64))
    wt = to_torch64(weight) if weight is not None else None
    loss = F.cross_entropy(z, tt, weight=wt, reduction=reduction, ignore_index=ignore_index,
                           label_smoothing=label_smoothing)
    lse = torch.logsumexp(z, dim=1 if z.dim() > 1 else 0)
    if lse_square_scale:
        valid = (tt != ignore_index) if not soft else torch.ones_like(lse, dtype=torch.bool)
        zl = lse_square_scale * lse * lse * valid
        loss = loss + (zl.sum() / valid.sum() if reduction == "mean" else zl.sum() if reduction == "sum" else zl)
    loss.backward(torch.ones_like(loss))
    return loss.detach().numpy(), xt.grad.numpy(), lse.detach().numpy()


def check(res, x, target, weight, grad_dtype, lse_asked=False, **kw) -> str | None:
    """None when `res` matches torch; else what differs."""
    ref_loss, ref_grad, ref_lse = reference(x, target, weight, **kw)
    loss = np.asarray(res.loss, np.float64)
    acc = "float64" if x.dtype == np.float64 else "float32"
    in_dt = "bfloat16" if x.dtype == BF16 else str(x.dtype)   # the loss comes back in it, as torch's
    ltol = LOSS_TOL[in_dt] * max(1.0, float(np.abs(ref_loss).max(initial=0)))
    if loss.shape != ref_loss.shape or not np.allclose(loss, ref_loss, rtol=0, atol=ltol, equal_nan=True):
        return f"loss {loss.ravel()[:4]} != torch {ref_loss.ravel()[:4]}"
    g = np.asarray(res.grad, np.float64)
    gtol = max(GRAD_TOL[grad_dtype], GRAD_TOL[acc]) * max(float(np.abs(ref_grad).max(initial=0)), 1e-30)
    if g.shape != ref_grad.shape or not np.allclose(g, ref_grad, rtol=0, atol=gtol, equal_nan=True):
        err = float(np.abs(g - ref_grad).max())
        return f"grad max err {err:.3g} > {gtol:.3g} ({grad_dtype})"
    if lse_asked and not np.allclose(np.asarray(res.lse, np.float64), ref_lse, rtol=2e-6, atol=2e-6):
        return "lse differs from torch.logsumexp"
    return None


def make(shape, dtype, rng, ignore_every=0):
    x = (rng.standard_normal(shape) * 3.0).astype(np_dtype(dtype))
    t = rng.integers(0, shape[1], (shape[0], *shape[2:])).astype(np.int64)
    if ignore_every:
        t.reshape(-1)[::ignore_every] = -100
    return x, t


def run_chunked(eng: LossEngine, x, t, rows_per_chunk: int, **kw):
    """prepare / run_chunk over row ranges that start past row 0 / finish: as the scheduler runs
    a big batch."""
    prep = eng.prepare(x, t, return_grad=True, **kw)
    try:
        step = max(rows_per_chunk, prep.rows_per_item)
        for bi, blk in enumerate(prep.blocks):
            for s in range(0, blk.rows, step):
                eng.run_chunk(prep, (bi, s, min(step, blk.rows - s)))
        return eng.finish(prep)
    finally:
        prep.release()


def run_in_place(eng: LossEngine, x, t, grad_dtype):
    """ce_rows_item with the gradient written over the logits (one buffer for both, and scratch
    rows for pass 1's exps), as the engine runs it on host-memory devices; Oclgrind's device
    is not one, so the launch is made here through the engine's own launch layer."""
    from clce_server.cross_entropy import semantics

    p = semantics.check(x, t, grad_dtype=grad_dtype)
    acc = np.float64 if p.compute_dtype == "float64" else np.float32
    xs = x.reshape(x.shape[0], -1).view(np.uint16) if x.dtype == BF16 else x.reshape(x.shape[0], -1)
    blk = _RowBlock.allocate(eng.device, 0, p.rows, xs, p.targets, None, None, xs, acc, False, False,
                             in_place=True)
    try:
        assert blk.in_place
        ev = eng._launch_rows(p, blk, 0, p.rows, grad_dtype=grad_dtype, scalars=eng._scalars(p))
        ev.wait()
        out = _RowOutputs.empty(p.rows, acc, True, False, False)
        eng._read_rows(blk, out)
    finally:
        blk.release()
    eng.device.queue.finish()
    valid = p.targets >= 0
    loss = np.array(out.row_loss.astype(np.float64).sum() / valid.sum())

    class R:   # the fields check() reads
        pass
    r = R()
    r.loss, r.grad, r.lse = loss, x, None
    return r


def cases(row_kind: str, full: bool = True):
    """(name, callable(eng) -> failure text or None) for one configuration. `full` False: every
    dtype as input and as gradient once rather than every pair (1024 work-items a row simulate
    slowly)."""
    rng = np.random.default_rng(19)
    out = []

    def add(name, x, t, weight=None, grad_dtype=None, chunk=None, **kw):
        gd = grad_dtype or ("float64" if x.dtype == np.float64 else str(x.dtype) if x.dtype != BF16 else "bfloat16")

        def run(eng):
            if chunk:
                res = run_chunked(eng, x, t, chunk, weight=weight, grad_dtype=gd, **kw)
            else:
                res = eng.cross_entropy(x, t, weight, return_grad=True, grad_dtype=gd, **kw)
            return check(res, x, t, weight, gd, lse_asked=kw.get("return_lse", False),
                         **{k: v for k, v in kw.items() if k not in ("return_lse", "return_argmax")})
        out.append((name, run))

    # every input / gradient dtype pair, with an ignored row, C not a multiple of 8 or 16. fp64
    # input first: Oclgrind 21.10 flags reduce_rows's reads of a pooled row buffer as
    # uninitialised when an fp32- or fp16-input launch with an fp64 gradient used the pool just
    # before (with pyopencl's plain allocator instead of the pool it does not; the values match
    # torch either way), a finding left to the pool's owner
    order = ("float64", "float32", "float16", "bfloat16")
    pairs = [(i, g) for i in order for g in order] if full else [(d, d) for d in order] + [("bfloat16", "float32")]
    for in_dt, gd in pairs:
        x, t = make((3, 37), in_dt, rng, ignore_every=3)
        add(f"dtypes {in_dt}->{gd}", x, t, grad_dtype=gd)
    # edge shapes (C = 1, C smaller than the work-group, C not a multiple of it or of the vector
    # width, a single row, strided rows, eight-row spatial rows)
    shapes = [(4, 1), (5, 7), (2, 1001), (1, 50), (1, 300), (2, 5, 3), (2, 5, 8), (1, 3, 16)]
    for shape in shapes if full else shapes[:4]:
        x, t = make(shape, "float32", rng, ignore_every=4 if shape[0] > 1 else 0)
        add(f"shape {shape}", x, t)
    if not full:   # the options and chunking once each, on few rows
        x, t = make((3, 45), "bfloat16", rng, ignore_every=3)
        add("softcap bf16 + z-loss + lse + argmax", x, t, softcap=5.0, lse_square_scale=1e-3,
            return_lse=True, return_argmax=True)
        x, t = make((5, 33), "float32", rng, ignore_every=3)
        add("chunked rows 5x33 by 2", x, t, chunk=2)
        return out
    x, t = make((3, 600), "bfloat16", rng)
    add("bf16 600 classes (two blocks, 16-wide)", x, t)
    for dt, gd in (("float64", "float16"), ("float16", "bfloat16")):   # spatial rows, 16 and 8 lanes
        x, t = make((2, 4, 16), dt, rng, ignore_every=5)
        add(f"spatial {dt}->{gd} 2x4x16", x, t, grad_dtype=gd)
        x, t = make((2, 4, 8), dt, rng, ignore_every=5)
        add(f"spatial {dt}->{gd} 2x4x8", x, t, grad_dtype=gd)
    # options
    x, t = make((4, 45), "float32", rng, ignore_every=3)
    w = (rng.random(45) + 0.25).astype(np.float32)
    add("weights + smoothing, sum", x, t, w, label_smoothing=0.1, reduction="sum")
    add("z-loss + lse + argmax, none", x, t, lse_square_scale=1e-3, reduction="none", return_lse=True,
        return_argmax=True)
    xs = x.astype(np.float16)
    add("softcap fp16->fp32", xs, t, grad_dtype="float32", softcap=5.0)
    add("softcap bf16", x.astype(BF16), t, softcap=5.0)
    add("softcap fp32 + smoothing", x, t, softcap=2.0, label_smoothing=0.2)
    y = rng.random((4, 45))
    y /= y.sum(1, keepdims=True)
    add("soft targets + weights", x, y.astype(np.float32), w)
    xsp, tsp = make((2, 6, 8), "float32", rng, ignore_every=5)
    add("spatial soft-capped + z-loss", xsp, tsp, softcap=3.0, lse_square_scale=1e-2)
    # spatial rows past one work-group (GPU rows: ce_rows_strided, a work-item per row, the last
    # group part-filled), soft targets and options; a width no ce_spatial kernel takes on a CPU
    xsp, tsp = make((2, 5, 131), "float32", rng, ignore_every=7)
    add("spatial 2x5x131 weights + smoothing + lse + argmax", xsp, tsp, (rng.random(5) + 0.5).astype(np.float32),
        label_smoothing=0.1, return_lse=True, return_argmax=True)
    ysp = rng.random((2, 5, 131))
    ysp /= ysp.sum(1, keepdims=True)
    add("spatial 2x5x131 soft targets, bf16", xsp.astype(BF16), ysp.astype(BF16))
    # chunked rows: ranges that start past row 0, as the scheduler runs a big batch
    x, t = make((7, 33), "float32", rng, ignore_every=3)
    add("chunked rows 7x33 by 3", x, t, chunk=3)
    x, t = make((2, 9, 16), "bfloat16", rng)
    add("chunked spatial 2x9x16 by 16", x, t, chunk=16)
    if row_kind == "item":
        for dt in ("float32", "bfloat16", "float16", "float64"):
            x, t = make((5, 70), dt, rng, ignore_every=4)
            ref_x = x.copy()

            def in_place(eng, x=x, t=t, ref_x=ref_x, dt=dt):
                res = run_in_place(eng, x, t, dt)
                return check(res, ref_x, t, None, dt)
            out.append((f"in place {dt}", in_place))
    return out


def main(argv: list[str]) -> int:
    only = None
    if argv[:1] == ["--only"]:   # a substring of the case names, to bisect a failure
        only, argv = argv[1], argv[2:]
    for name in argv:
        row, overrides = CONFIGS[name]
        dev = open_devices(tuning_row=row, tuning_overrides=overrides)[0]
        eng = LossEngine(dev)
        launch = dev.launch
        print(json.dumps({"config": name, "device": dev.name, "tuning": dev.tuning.describe()["launch"],
                          "defines": dev.tuning.build_defines()}), flush=True)
        for case, fn in cases(launch.rows, full=name not in SHORT):
            if only is not None and only not in case:
                continue
            try:
                detail = fn(eng)
            except Exception:
                detail = traceback.format_exc(limit=4)
            print(json.dumps({"config": name, "case": case, "ok": detail is None, "detail": detail}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
