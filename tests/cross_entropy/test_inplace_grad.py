"""In-place gradients (`grad_out` is the input's own memory, as Liger-Kernel writes them): the
kernel reads every logit before it writes its gradient, so the answer is bit for bit the one
computed aside, and torch's, on both kernel shapes; any other overlap is computed aside and
copied over. The server uses this to write a TCP request's gradient over its received body."""

import numpy as np
import pytest
import torch

from clce_server.rails.hostmem import HostPool, PoolError
from tests.support.loss_reference import DTYPES, assert_close, make, np_dtype, reference


def _in_place(engine, x, t, chunk_rows=None, **kw):
    """engine.cross_entropy with grad_out=x, optionally in row chunks (as the scheduler runs it)."""
    prep = engine.prepare(x, t, return_grad=True, grad_out=x, **kw)
    try:
        if chunk_rows is None:
            chunks = list(prep.chunks())
        else:
            chunks = [(bi, s, min(chunk_rows, blk.rows - s)) for bi, blk in enumerate(prep.blocks)
                      for s in range(0, blk.rows, chunk_rows)]
        for c in chunks:
            engine.run_chunk(prep, c)
        return engine.finish(prep)
    finally:
        prep.release()


OPTIONS = [dict(), dict(label_smoothing=0.1), dict(ignore_index=1), dict(reduction="sum", softcap=8.0),
           dict(lse_square_scale=1e-3, return_lse=True, return_argmax=True), dict(weighted=True, reduction="none")]


@pytest.mark.parametrize("dtype, atol, rtol", DTYPES, ids=[d[0] for d in DTYPES])
@pytest.mark.parametrize("shape", [(6, 5), (9, 1003), (2, 11, 3, 5), (2, 11, 4, 4)], ids=str)
@pytest.mark.parametrize("opts", OPTIONS, ids=lambda o: ",".join(o) or "plain")
@pytest.mark.parametrize("eng", ["engine", "wg_engine"])
def test_in_place_equals_aside_and_torch(request, eng, dtype, atol, rtol, shape, opts):
    engine = request.getfixturevalue(eng)
    rng = np.random.default_rng(shape[1])
    x, t = make(shape, dtype, rng)
    kw = dict(opts)
    if kw.pop("weighted", False):
        kw["weight"] = rng.random(shape[1]).astype(np_dtype(dtype))   # as torch: the input's dtype
    if kw.get("ignore_index") == 1:
        t.reshape(-1)[::3] = 1
    aside = engine.cross_entropy(x, t, return_grad=True, **kw)
    xin = x.copy()
    r = _in_place(engine, xin, t, **kw)
    assert np.shares_memory(r.grad, xin) and r.grad.ctypes.data == xin.ctypes.data   # written over x
    np.testing.assert_array_equal(np.asarray(r.grad).view(np.uint8), np.asarray(aside.grad).view(np.uint8))
    np.testing.assert_array_equal(np.asarray(r.loss), np.asarray(aside.loss))
    for extra in ("lse", "argmax", "z_loss"):
        if getattr(aside, extra) is not None:
            np.testing.assert_array_equal(getattr(r, extra), getattr(aside, extra))
    torch_kw = {k: v for k, v in kw.items() if k in ("reduction", "label_smoothing", "ignore_index")}
    if not any(k in kw for k in ("softcap", "lse_square_scale")):
        ref_loss, ref_grad = reference(x, t, kw.get("weight"), ref_dtype=torch.float64 if dtype == "float64"
                                       else torch.float32, **torch_kw)
        assert_close(r.loss, ref_loss, atol * 10, rtol, "loss")
        assert_close(r.grad, ref_grad, atol * np.abs(ref_grad).max(), rtol, "grad")


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_in_place_in_row_chunks_with_soft_targets(engine, dtype):
    """Chunks of a request each read only their own rows; soft targets alias nothing."""
    rng = np.random.default_rng(7)
    x, y = make((37, 2001), dtype, rng, soft=True)
    aside = engine.cross_entropy(x, y, return_grad=True, label_smoothing=0.05)
    xin = x.copy()
    r = _in_place(engine, xin, y, chunk_rows=5, label_smoothing=0.05)
    assert r.grad.ctypes.data == xin.ctypes.data
    np.testing.assert_array_equal(r.grad.view(np.uint8), aside.grad.view(np.uint8))
    np.testing.assert_array_equal(r.loss, aside.loss)


def test_an_overlap_that_is_not_the_input_is_computed_aside(engine):
    """A gradient region shifted by one row against the logits (a hostile or careless shared-memory
    request) gets the right gradient, computed aside and copied over, never a half-overwritten row."""
    rng = np.random.default_rng(1)
    x, t = make((9, 300), "float32", rng)
    aside = engine.cross_entropy(x, t, return_grad=True)
    buf = np.empty((10, 300), np.float32)
    buf[:9] = x
    r = engine.cross_entropy(buf[:9], t, return_grad=True, grad_out=buf[1:])
    assert r.grad.ctypes.data == buf[1:].ctypes.data
    np.testing.assert_array_equal(buf[1:], aside.grad)
    np.testing.assert_array_equal(r.loss, aside.loss)


def test_a_pooled_buffer_is_given_back_once_by_the_object_handed_out():
    """A TCP body with its gradient written over it is one buffer: the pool takes it back once,
    by the very array it handed out. A second release, or a view of it, raises instead of putting
    it on the free list twice (two later requests would then share it)."""
    pool = HostPool()
    body = pool.empty((300, 1024), np.float32)   # >= 1 MiB: pooled
    assert pool.held_bytes() >= body.nbytes
    with pytest.raises(PoolError):
        pool.release(body[10:])                  # the gradient, a view of the same buffer
    pool.release(body)
    with pytest.raises(PoolError):
        pool.release(body)                       # back already
    assert pool.held_bytes() == 0 and pool.cached_bytes() > 0
    first = pool.empty((300, 1024), np.float32)
    second = pool.empty((300, 1024), np.float32)
    assert not np.shares_memory(first, second)
    assert np.shares_memory(first, body)         # reused: its pages are mapped already
    with pytest.raises(PoolError):
        HostPool().release(first)                # another pool's buffer
    pool.release(first)
    pool.release(second)
    assert pool.held_bytes() == 0
