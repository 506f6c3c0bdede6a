"""Parity of the fused OpenCL kernel with torch.nn.functional.cross_entropy (loss and input
gradient), on both kernel shapes, over shapes x options x (dtype, atol, rtol)."""

import zlib

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from clce_server.rails.errors import ArgumentError
from tests.support.loss_reference import BF16, DTYPES, assert_close, make, np_dtype, reference, to_torch


# (2, 5, 4, 4), (3, 7, 8) and (2, 3, 2, 4, 3) have S % 8 == 0: the eight-rows-per-work-item kernel
SHAPES = [(5,), (4, 5), (3, 37), (17, 1000), (2, 7, 3), (2, 5, 3, 4), (3, 1), (2, 3, 2, 2, 3),
          (2, 5, 4, 4), (3, 7, 8), (2, 3, 2, 4, 3)]


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("weighted", [False, True], ids=["unweighted", "weighted"])
@pytest.mark.parametrize("ignore_index", [-100, -1, 2])
@pytest.mark.parametrize("label_smoothing", [0.0, 0.15])
def test_hard_targets_float32(engine, shape, reduction, weighted, ignore_index, label_smoothing):
    rng = np.random.default_rng(zlib.crc32(repr((shape, reduction, weighted, ignore_index)).encode()))
    x, t = make(shape, "float32", rng)
    C = x.shape[0] if x.ndim == 1 else x.shape[1]
    if ignore_index < 0 and t.size:
        t.reshape(-1)[:: 3] = ignore_index          # every third target ignored
    w = (rng.random(C) + 0.25).astype(np.float32) if weighted else None
    kw = dict(reduction=reduction, ignore_index=ignore_index, label_smoothing=label_smoothing)
    ref_loss, ref_grad = reference(x, t, w, **kw)
    r = engine.cross_entropy(x, t, w, return_grad=True, **kw)
    assert r.loss.dtype == np.float32 and r.loss.shape == ref_loss.shape
    assert r.grad.dtype == np.float32 and r.grad.shape == x.shape
    assert_close(r.loss, ref_loss, 2e-6, 2e-5, "loss")
    assert_close(r.grad, ref_grad, 1e-6, 2e-5, "grad")


@pytest.mark.parametrize("shape", [(6,), (4, 6), (3, 37), (9, 1000), (2, 5, 3, 4), (2, 5, 2, 8)], ids=str)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("weighted", [False, True], ids=["unweighted", "weighted"])
@pytest.mark.parametrize("label_smoothing", [0.0, 0.2])
def test_soft_targets_float32(engine, shape, reduction, weighted, label_smoothing):
    rng = np.random.default_rng(len(shape) * 7 + shape[-1])
    x, y = make(shape, "float32", rng, soft=True)
    C = x.shape[0] if x.ndim == 1 else x.shape[1]
    w = (rng.random(C) + 0.25).astype(np.float32) if weighted else None
    kw = dict(reduction=reduction, label_smoothing=label_smoothing)
    ref_loss, ref_grad = reference(x, y, w, **kw)
    r = engine.cross_entropy(x, y, w, return_grad=True, **kw)
    assert r.loss.shape == ref_loss.shape
    assert_close(r.loss, ref_loss, 2e-6, 2e-5, "loss")
    assert_close(r.grad, ref_grad, 1e-6, 2e-5, "grad")


@pytest.mark.parametrize("dtype, atol, rtol", DTYPES, ids=[d[0] for d in DTYPES])
@pytest.mark.parametrize("shape", [(4, 5), (7, 1003), (2, 11, 3, 5), (2, 11, 4, 4)], ids=str)
@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("soft", [False, True], ids=["hard", "soft"])
def test_dtypes(engine, dtype, atol, rtol, shape, reduction, soft):
    rng = np.random.default_rng(shape[1])
    x, t = make(shape, dtype, rng, soft=soft)
    kw = dict(reduction=reduction, label_smoothing=0.1)
    ref_dtype = torch.float64 if dtype == "float64" else torch.float32
    ref_loss, ref_grad = reference(x, t, None, ref_dtype=ref_dtype, **kw)
    r = engine.cross_entropy(x, t, return_grad=True, **kw)
    assert r.loss.dtype == np_dtype(dtype) and r.grad.dtype == np_dtype(dtype)
    assert_close(r.loss, ref_loss, atol, rtol, "loss")
    scale = np.abs(ref_grad).max()
    assert_close(r.grad, ref_grad, atol * scale, rtol, "grad")


@pytest.mark.parametrize("in_dtype", ["float16", "bfloat16", "float32"])
@pytest.mark.parametrize("grad_dtype", ["float32", "bfloat16", "float16", "float64"])
def test_grad_dtype(engine, in_dtype, grad_dtype):
    rng = np.random.default_rng(3)
    x, t = make((8, 301), in_dtype, rng)
    ref_loss, ref_grad = reference(x, t, ref_dtype=torch.float64)
    r = engine.cross_entropy(x, t, return_grad=True, grad_dtype=grad_dtype)
    assert r.grad.dtype == np_dtype(grad_dtype)
    # the kernels compute in fp32 for these inputs, so an fp64 gradient carries fp32 precision
    tol = {"float32": 1e-6, "float64": 1e-6, "float16": 1e-3, "bfloat16": 8e-3}[grad_dtype]
    assert_close(r.grad, ref_grad, tol * np.abs(ref_grad).max(), tol, "grad")


def test_true_class_term_rounded_once(engine):
    """A confident bf16 row: p_t - 1 formed in fp32 keeps the small gradient that rounding p_t to
    bf16 first would lose (p_t = 1 - 2e-4 rounds to 1.0 in bf16)."""
    x = np.zeros((1, 4), np.float32)
    x[0, 0] = 9.0
    xb = x.astype(BF16)
    r = engine.cross_entropy(xb, np.array([0]), return_grad=True, reduction="sum")
    _, ref = reference(x, np.array([0]), reduction="sum", ref_dtype=torch.float64)
    assert float(r.grad[0, 0]) != 0.0
    assert abs(float(r.grad[0, 0]) - ref[0, 0]) <= abs(ref[0, 0]) * 2**-8


@pytest.mark.parametrize("shape", [(4, 5), (3, 37), (5, 1000), (2, 5, 3, 4), (2, 3, 300), (6,)], ids=str)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("soft", [False, True], ids=["hard", "soft"])
def test_work_group_per_row_shape(wg_engine, shape, reduction, soft):
    """The GPU kernel shapes, run on PoCL, against the same oracle: a work-group per row, and a
    work-item per row for spatial input (ce_rows_strided, its global size rounded up to whole
    work-groups: 600 rows in the fixture's groups of 16)."""
    rng = np.random.default_rng(shape[-1])
    x, t = make(shape, "float32", rng, soft=soft)
    C = x.shape[0] if x.ndim == 1 else x.shape[1]
    w = (rng.random(C) + 0.5).astype(np.float32)
    kw = dict(reduction=reduction, label_smoothing=0.1)
    if not soft and x.ndim > 1:
        kw["ignore_index"] = int(t.reshape(-1)[0])
    ref_loss, ref_grad = reference(x, t, w, **kw)
    r = wg_engine.cross_entropy(x, t, w, return_grad=True, return_lse=True, return_argmax=True, **kw)
    assert_close(r.loss, ref_loss, 2e-6, 2e-5, "loss")
    assert_close(r.grad, ref_grad, 1e-6, 2e-5, "grad")
    xt = torch.from_numpy(x)
    cdim = 0 if x.ndim == 1 else 1
    assert_close(r.lse, torch.logsumexp(xt.double(), cdim).numpy(), 1e-5, 1e-6, "lse")
    np.testing.assert_array_equal(r.argmax, torch.argmax(xt, cdim).numpy())


# ---- edge cases ----

def test_single_class(engine):
    x = np.random.default_rng(0).standard_normal((3, 1)).astype(np.float32)
    r = engine.cross_entropy(x, np.zeros(3, np.int64), return_grad=True)
    ref_loss, ref_grad = reference(x, np.zeros(3, np.int64))
    assert_close(r.loss, ref_loss, 0, 0, "loss")
    assert_close(r.grad, ref_grad, 1e-7, 0, "grad")


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("soft", [False, True])
def test_empty_batch(engine, reduction, soft):
    x = np.zeros((0, 5), np.float32)
    t = np.zeros((0, 5), np.float32) if soft else np.zeros(0, np.int64)
    ref_loss, ref_grad = reference(x, t, reduction=reduction)
    r = engine.cross_entropy(x, t, reduction=reduction, return_grad=True)
    assert r.loss.shape == ref_loss.shape
    assert_close(r.loss, ref_loss, 0, 0, "loss")
    assert r.grad.shape == (0, 5)


@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
@pytest.mark.parametrize("weighted", [False, True])
def test_all_ignored(engine, label_smoothing, weighted):
    x = np.random.default_rng(1).standard_normal((4, 6)).astype(np.float32)
    t = np.full(4, -100)
    w = np.linspace(0.5, 2, 6).astype(np.float32) if weighted else None
    ref_loss, ref_grad = reference(x, t, w, label_smoothing=label_smoothing)
    r = engine.cross_entropy(x, t, w, label_smoothing=label_smoothing, return_grad=True)
    assert np.isnan(r.loss) and np.isnan(ref_loss)
    assert_close(r.grad, ref_grad, 0, 0, "grad")


@pytest.mark.parametrize("magnitude", [1e4, -1e4, 3e4])
@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
def test_huge_logits(engine, magnitude, label_smoothing):
    rng = np.random.default_rng(2)
    x = rng.standard_normal((6, 513)).astype(np.float32)
    x[:, ::7] += magnitude
    x[1] = magnitude                                    # a row that is all huge
    t = rng.integers(0, 513, 6)
    ref_loss, ref_grad = reference(x, t, label_smoothing=label_smoothing, reduction="none")
    r = engine.cross_entropy(x, t, label_smoothing=label_smoothing, reduction="none", return_grad=True)
    assert np.all(np.isfinite(r.loss)) and np.all(np.isfinite(r.grad))
    # fp32 logits of 1e4 carry an absolute error of ~1e-3 in x itself, so loss agrees to that
    assert_close(r.loss, ref_loss, 4e-3 * (abs(magnitude) / 1e4), 1e-5, "loss")
    assert_close(r.grad, ref_grad, 1e-5, 1e-4, "grad")


@pytest.mark.parametrize("bad", ["nan", "inf", "-inf", "all-inf", "all-neginf"])
@pytest.mark.parametrize("C", [5, 300])
def test_non_finite_propagate_like_torch(engine, bad, C):
    rng = np.random.default_rng(C)
    x = rng.standard_normal((4, C)).astype(np.float32)
    v = {"nan": np.nan, "inf": np.inf, "-inf": -np.inf}
    if bad.startswith("all"):
        x[1] = np.inf if bad == "all-inf" else -np.inf
    else:
        x[1, 2] = v[bad]
        x[2, C - 1] = v[bad]
    t = np.array([0, 2, 1, C - 1])
    for kw in (dict(reduction="none"), dict(reduction="mean", label_smoothing=0.1)):
        ref_loss, ref_grad = reference(x, t, **kw)
        r = engine.cross_entropy(x, t, return_grad=True, **kw)
        np.testing.assert_array_equal(np.isnan(r.loss), np.isnan(ref_loss))
        np.testing.assert_array_equal(np.isnan(r.grad), np.isnan(ref_grad))
        assert_close(r.loss, ref_loss, 1e-5, 1e-5, f"loss {kw}")
        assert_close(r.grad, ref_grad, 1e-6, 1e-5, f"grad {kw}")


def test_deterministic(engine):
    rng = np.random.default_rng(5)
    x = rng.standard_normal((3000, 257)).astype(np.float32)
    t = rng.integers(0, 257, 3000)
    a = engine.cross_entropy(x, t, return_grad=True, label_smoothing=0.1)
    b = engine.cross_entropy(x, t, return_grad=True, label_smoothing=0.1)
    assert a.loss.tobytes() == b.loss.tobytes()
    assert a.grad.tobytes() == b.grad.tobytes()


def test_chunked_equals_one_launch(engine):
    """The scheduler runs big batches in row chunks: the result must not depend on the split."""
    rng = np.random.default_rng(6)
    x = rng.standard_normal((101, 300)).astype(np.float32)
    t = rng.integers(0, 300, 101)
    whole = engine.cross_entropy(x, t, return_grad=True)
    prep = engine.prepare(x, t, return_grad=True)
    for start in range(0, 101, 17):
        engine.run_chunk(prep, (0, start, min(17, 101 - start)))
    parts = engine.finish(prep)
    prep.release()
    assert whole.loss.tobytes() == parts.loss.tobytes()
    assert whole.grad.tobytes() == parts.grad.tobytes()


def test_more_than_2_31_elements(engine):
    """N*C > 2^31: rows beyond element 2^31 are read correctly. Devices cap one allocation (PoCL:
    2 GiB), so the engine runs such a batch as groups of whole samples; on GPUs with larger
    allocations the kernels' 64-bit offsets carry the same batch in one buffer."""
    C = (1 << 29) + 24
    N = 5                                               # 2.7e9 elements, 5.4 GB of bfloat16
    x = np.zeros((N, C), BF16)
    x[N - 1, C - 1] = 5.0
    x[N - 1, C - 9] = -3.0
    x[2, 7] = 2.0
    t = np.array([3, 0, 7, 1, C - 1])
    r = engine.cross_entropy(x, t, reduction="none", return_lse=True)
    base = np.log(C)
    lse = np.array([base, base, np.log((C - 1) + np.exp(2.0)), base,
                    np.log((C - 2) + np.exp(5.0) + np.exp(-3.0))])
    assert_close(r.lse, lse, 1e-3, 1e-6, "lse")
    assert_close(r.loss.astype(np.float32), lse - np.array([0, 0, 2.0, 0, 5.0]), 0.05, 0.01, "loss")


# ---- extras beyond PyTorch ----

def test_lse_argmax_accuracy(engine):
    rng = np.random.default_rng(7)
    x = rng.standard_normal((50, 97)).astype(np.float32)
    x[3, 10] = x[3, 20] = 9.0                            # a tie: first index wins, as torch.argmax
    t = rng.integers(0, 97, 50)
    t[:10] = np.argmax(x[:10], 1)
    t[45:] = -100
    r = engine.cross_entropy(x, t, return_lse=True, return_argmax=True)
    xt = torch.from_numpy(x)
    assert_close(r.lse, torch.logsumexp(xt.double(), 1).numpy(), 1e-5, 1e-6, "lse")
    np.testing.assert_array_equal(r.argmax, torch.argmax(xt, 1).numpy())
    valid = t != -100
    assert r.accuracy == pytest.approx(np.mean(np.argmax(x, 1)[valid] == t[valid]))


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_z_loss(engine, reduction):
    rng = np.random.default_rng(8)
    x = rng.standard_normal((12, 40)).astype(np.float32) * 4
    t = rng.integers(0, 40, 12)
    t[::4] = -100
    c = 1e-3
    xt = torch.tensor(x, dtype=torch.float64, requires_grad=True)
    tt = torch.tensor(t)
    valid = (tt != -100).double()
    ce = F.cross_entropy(xt, tt, reduction="none")
    z = c * torch.logsumexp(xt, 1) ** 2 * valid
    if reduction == "mean":
        total = ce.sum() / valid.sum() + z.sum() / valid.sum()
        zref = z.sum() / valid.sum()
    elif reduction == "sum":
        total, zref = ce.sum() + z.sum(), z.sum()
    else:
        total, zref = ce + z, z
    total.backward(torch.ones_like(total))
    r = engine.cross_entropy(x, t, reduction=reduction, lse_square_scale=c, return_grad=True)
    assert_close(r.loss, total.detach().numpy(), 2e-6, 2e-5, "loss")
    assert_close(r.z_loss, zref.detach().numpy(), 1e-6, 1e-5, "z_loss")
    assert_close(r.grad, xt.grad.numpy(), 1e-6, 2e-5, "grad")


@pytest.mark.parametrize("soft", [False, True])
def test_softcap(engine, soft):
    rng = np.random.default_rng(9)
    x, t = make((9, 130), "float32", rng, soft=soft, scale=20.0)
    cap = 30.0
    xt = torch.tensor(x, dtype=torch.float64, requires_grad=True)
    tt = torch.tensor(t, dtype=torch.float64) if soft else torch.tensor(t)
    loss = F.cross_entropy(cap * torch.tanh(xt / cap), tt, label_smoothing=0.1)
    loss.backward()
    r = engine.cross_entropy(x, t, label_smoothing=0.1, softcap=cap, return_grad=True)
    assert_close(r.loss, loss.detach().numpy(), 2e-6, 2e-5, "loss")
    assert_close(r.grad, xt.grad.numpy(), 1e-6, 2e-5, "grad")


# ---- property test ----

@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    n=st.integers(0, 9), c=st.integers(1, 70), k=st.sampled_from([(), (3,), (2, 2)]),
    reduction=st.sampled_from(["mean", "sum", "none"]), ls=st.sampled_from([0.0, 0.05, 1.0]),
    weighted=st.booleans(), ignore=st.sampled_from([-100, -1, 0]), seed=st.integers(0, 2**31),
)
def test_property_hard_targets(engine, n, c, k, reduction, ls, weighted, ignore, seed):
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal((n, c, *k)) * rng.uniform(0.1, 10)).astype(np.float32)
    t = rng.integers(-1 if ignore == -1 else 0, c, (n, *k))
    w = rng.uniform(0.1, 3, c).astype(np.float32) if weighted else None
    kw = dict(reduction=reduction, label_smoothing=ls, ignore_index=ignore)
    ref_loss, ref_grad = reference(x, t, w, **kw)
    r = engine.cross_entropy(x, t, w, return_grad=True, **kw)
    assert_close(r.loss, ref_loss, 1e-5, 5e-5, "loss")
    assert_close(r.grad, ref_grad, 1e-6, 5e-5, "grad")


def test_float16_subnormals_and_specials(engine):
    """fp16 is widened by hand in the kernel (PoCL's vload_half8 faults on unaligned rows):
    subnormals, signed zeros and the largest half must come out exactly."""
    vals = np.array([6e-8, 1e-5, -3e-6, 0.0, -0.0, 2.0**-14, -(2.0**-15), 1.5, -2.25, 3.0,
                     60000.0, -60000.0, 0.1, 7e-6, 4e-7, 1.0, 2.0], np.float16)
    x = np.stack([vals, vals[::-1], vals * 0 + vals[3:4]]).astype(np.float16)[:, :17]
    x[:, 10:12] = 0                         # keep the row sums finite and informative
    lse = engine.cross_entropy(x, np.array([0, 1, 2]), return_lse=True).lse
    ref = torch.logsumexp(torch.tensor(x.astype(np.float64)), 1).numpy()
    assert_close(lse, ref, 1e-6, 1e-6, "lse")
    big = engine.cross_entropy(np.array([[60000.0, 0.0]], np.float16), np.array([1]), reduction="sum")
    assert float(big.loss) == 60000.0


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float64"])
@pytest.mark.parametrize("soft", [False, True])
def test_coalesced_requests_match_solo_runs(engine, dtype, soft):
    """Small requests sharing one launch (dynamic batching) get what they would get alone,
    whatever their reduction, ignore_index or grad dtype; a bad request fails alone."""
    rng = np.random.default_rng(11)
    C = 37
    reqs = []
    for i, (n, red) in enumerate([(5, "mean"), (1, "sum"), (9, "none"), (64, "mean"), (3, "mean")]):
        x, t = make((n, C), dtype, rng, soft=soft)
        kw = dict(input=x, target=t, reduction=red, label_smoothing=0.1, return_grad=True, return_lse=True)
        if not soft:
            kw["ignore_index"] = int(t[0])
            kw["grad_dtype"] = "float32" if i == 3 else None
        reqs.append(kw)
    bad_t = np.full(4, C) if not soft else rng.random((4, C + 1)).astype(np_dtype(dtype))
    reqs.insert(2, dict(input=make((4, C), dtype, rng)[0], target=bad_t, return_grad=True, return_lse=True,
                        label_smoothing=0.1))
    out = engine.cross_entropy_many(reqs)
    with pytest.raises(Exception) as torch_error:               # what PyTorch says about the bad one
        reference(reqs[2]["input"], bad_t, label_smoothing=0.1)
    assert isinstance(out[2], ArgumentError)
    assert type(out[2].error) is torch_error.type and str(out[2].error) == str(torch_error.value)
    tol = {"float32": 2e-6, "float64": 1e-12, "bfloat16": 8e-3}[dtype]
    for kw, res in zip(reqs[:2] + reqs[3:], out[:2] + out[3:]):
        solo = engine.cross_entropy(**kw)
        assert res.loss.dtype == solo.loss.dtype and res.grad.dtype == solo.grad.dtype
        assert res.loss.shape == solo.loss.shape and res.grad.shape == solo.grad.shape
        assert_close(res.loss.astype(np.float64), solo.loss.astype(np.float64), tol, tol, "loss")
        assert_close(res.grad.astype(np.float64), solo.grad.astype(np.float64), tol, tol, "grad")
        np.testing.assert_array_equal(res.lse, solo.lse)


def test_coalesced_requests_share_the_launch_time(engine):
    """Each request of a shared launch is charged its share of the device time, by elements:
    the shares add up to the launch and none is charged the whole launch."""
    rng = np.random.default_rng(12)
    sizes = [3, 40, 9, 100]
    reqs = [dict(input=x, target=t, return_grad=True) for x, t in (make((n, 50), "float32", rng) for n in sizes)]
    out = engine.cross_entropy_many(reqs)
    secs = [r.kernel_seconds for r in out]
    launch = sum(secs)
    assert all(0 < s < launch for s in secs)
    np.testing.assert_allclose(np.array(secs) / launch, np.array(sizes) / sum(sizes), rtol=1e-9)


@pytest.mark.parametrize("shape_of", ["engine", "wg_engine"], ids=["cpu-spatial-rows", "gpu-strided-rows"])
@pytest.mark.parametrize("soft", [False, True])
def test_spatial_rows_kernel_extras_and_non_finite(request, shape_of, soft):
    """(N, C, d...) with S % 8 == 0 runs eight rows per work-item on a CPU (ce_spatial8/16) and a
    work-item per row under the GPU rows (ce_rows_strided): lse, argmax, accuracy, z-loss,
    softcap, ignored rows and non-finite logits, per lane and per row."""
    engine = request.getfixturevalue(shape_of)
    from clce_server.cross_entropy import semantics
    want = "ce_rows_strided" if shape_of == "wg_engine" else ("ce_spatial8", "ce_spatial16")
    assert engine.kernel_name(semantics.check(np.zeros((3, 9, 4, 8), np.float32),
                                              np.zeros((3, 4, 8), np.int64))) in want
    rng = np.random.default_rng(13)
    x, t = make((3, 9, 4, 6), "float32", rng, soft=soft)
    x[0, 2, 1, 1] = np.nan
    x[1, :, 2, 3] = -np.inf
    x[2, 4, 0, 5] = np.inf
    x[2, 1, 3, 2] = x[2, 6, 3, 2] = 50.0                       # an argmax tie
    if not soft:
        t[0, 0, :3] = -100
        t[:, 3, 3] = np.argmax(x[:, :, 3, 3], 1)
    xt = torch.tensor(x, dtype=torch.float64, requires_grad=True)
    tt = torch.tensor(t, dtype=torch.float64) if soft else torch.tensor(t)
    c = 1e-3
    ce = F.cross_entropy(xt, tt, reduction="none", label_smoothing=0.1)
    valid = torch.ones_like(ce) if soft else (tt != -100).double()
    z = c * torch.logsumexp(xt, 1) ** 2 * valid
    (ce + z).sum().backward()
    r = engine.cross_entropy(x, t, reduction="none", label_smoothing=0.1, lse_square_scale=c,
                             return_grad=True, return_lse=True, return_argmax=True)
    np.testing.assert_array_equal(np.isnan(r.loss), np.isnan((ce + z).detach().numpy()))
    assert_close(r.loss, (ce + z).detach().numpy(), 1e-5, 1e-5, "loss")
    assert_close(r.grad, xt.grad.numpy(), 1e-6, 2e-5, "grad")
    assert_close(r.lse, torch.logsumexp(xt.detach(), 1).numpy(), 1e-5, 1e-6, "lse")
    np.testing.assert_array_equal(r.argmax, torch.argmax(torch.from_numpy(x), 1).numpy())
    cap = engine.cross_entropy(x, t, reduction="sum", softcap=20.0, return_grad=True)
    xc = torch.tensor(x, dtype=torch.float64, requires_grad=True)
    ref = F.cross_entropy(20.0 * torch.tanh(xc / 20.0), tt, reduction="sum")
    ref.backward()
    assert_close(cap.loss, ref.detach().numpy(), 1e-4, 1e-5, "softcap loss")
    assert_close(cap.grad, xc.grad.numpy(), 1e-6, 2e-5, "softcap grad")


def test_spatial_rows_kernel_chunks(engine):
    rng = np.random.default_rng(14)
    x, t = make((5, 7, 8, 4), "float32", rng)               # 160 rows, 8 per work-item
    whole = engine.cross_entropy(x, t, return_grad=True)
    prep = engine.prepare(x, t, return_grad=True)
    chunks = list(prep.chunks(1e-9))                          # as small as the kernel allows
    assert all(start % 8 == 0 and count % 8 == 0 for _, start, count in chunks) and len(chunks) > 1
    with pytest.raises(ValueError):
        engine.run_chunk(prep, (0, 0, 12))
    for ch in chunks:
        engine.run_chunk(prep, ch)
    parts = engine.finish(prep)
    prep.release()
    assert whole.loss.tobytes() == parts.loss.tobytes() and whole.grad.tobytes() == parts.grad.tobytes()


@pytest.mark.parametrize("dtype, atol, rtol", DTYPES[2:], ids=[d[0] for d in DTYPES[2:]])
@pytest.mark.parametrize("grad_dtype", [None, "float32"])
def test_half_inputs_with_more_rows_than_scratch_rows(engine, dtype, atol, rtol, grad_dtype):
    """A half-precision gradient cannot hold pass 1's exps, so a few work-items loop over the rows
    with a scratch row each: every row is right, and chunking does not change a bit."""
    rng = np.random.default_rng(15)
    x, t = make((203, 517), dtype, rng)
    t[::5] = -100
    kw = dict(label_smoothing=0.1, grad_dtype=grad_dtype)
    ref_loss, ref_grad = reference(x, t, ref_dtype=torch.float32, label_smoothing=0.1)
    r = engine.cross_entropy(x, t, return_grad=True, **kw)
    assert_close(r.loss, ref_loss, atol, rtol, "loss")
    assert_close(r.grad, ref_grad, atol * np.abs(ref_grad).max(), rtol, "grad")
    prep = engine.prepare(x, t, return_grad=True, **kw)
    for start in range(0, 203, 50):
        engine.run_chunk(prep, (0, start, min(50, 203 - start)))
    parts = engine.finish(prep)
    prep.release()
    assert r.loss.tobytes() == parts.loss.tobytes() and r.grad.tobytes() == parts.grad.tobytes()


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_a_late_block_far_above_the_running_max(engine, dtype):
    """After its first block a row's exps are taken against the running max in one sweep, kept
    when the block holds no new max and redone otherwise: spikes late in a row, small and large,
    infinities and NaN, against torch."""
    rng = np.random.default_rng(16)
    C = 1500                                              # several blocks of 256 classes
    x = rng.standard_normal((8, C)).astype(np.float32)
    x[0, 900] = 60.0                                      # new maxima late in the row: redone
    x[1, 700] = 300.0
    x[2, 1400] = -1e4                                     # far below: contributes 0
    x[3, 300:] += 1e4                                     # every later block jumps
    x[4, 1000] = np.inf
    x[5, 1100] = np.nan
    x[6, :256] = -np.inf                                  # an all -inf first block
    x = x.astype(np_dtype(dtype))
    t = np.array([900, 700, 5, 400, 3, 4, 1200, 1499])
    ref_loss, ref_grad = reference(x, t, reduction="none", label_smoothing=0.05, ref_dtype=torch.float64)
    r = engine.cross_entropy(x, t, reduction="none", label_smoothing=0.05, return_grad=True, return_lse=True,
                             grad_dtype="float32")
    np.testing.assert_array_equal(np.isnan(r.loss), np.isnan(ref_loss))
    np.testing.assert_array_equal(np.isnan(r.grad), np.isnan(ref_grad))
    # row 3 has logits of 1e4 (see test_huge_logits); a bf16 loss is rounded once to bf16
    loss_atol, loss_rtol = (4e-3, 2e-5) if dtype == "float32" else (1.6e-2, 2**-8)
    assert_close(r.loss, ref_loss, loss_atol, loss_rtol, "loss")
    assert_close(r.grad, ref_grad, 1e-6, 2e-5, "grad")
    lse_ref = torch.logsumexp(to_torch(x).double(), 1).numpy()
    assert_close(r.lse, lse_ref, 1e-2, 1e-6, "lse")


@pytest.mark.parametrize("dtype, atol, rtol", DTYPES, ids=[d[0] for d in DTYPES])
@pytest.mark.parametrize("C", [21, 32, 33, 40])
@pytest.mark.parametrize("soft", [False, True], ids=["hard", "soft"])
def test_spatial_tile_and_its_fallback(engine, dtype, atol, rtol, C, soft):
    """ce_spatial8/16 keep a row tile of at most CE_SP_TILE (32) classes in private arrays (one
    read of the logits), and stream more classes from memory as before: both sides of the
    boundary, every dtype, weights and smoothing, against torch in fp64."""
    from clce_server.cross_entropy import semantics
    rng = np.random.default_rng(C)
    x, t = make((2, C, 3, 16), dtype, rng, soft=soft)
    assert engine.kernel_name(semantics.check(x, t)).startswith("ce_spatial")
    w = (rng.random(C) + 0.5).astype(x.dtype)
    kw = dict(reduction="sum", label_smoothing=0.1)
    if not soft:
        t[0, 1, :5] = -100
    ref_loss, ref_grad = reference(x, t, w, ref_dtype=torch.float64, **kw)
    r = engine.cross_entropy(x, t, w, return_grad=True, **kw)
    scale = max(1.0, float(np.abs(ref_loss).max()))
    assert_close(r.loss, ref_loss, atol * scale, rtol, "loss")
    assert_close(r.grad, ref_grad, atol, rtol, "grad")


def test_spatial_non_temporal_stores_change_no_bit(engine):
    """The CPU row writes a tiled spatial row's fp32 gradient with non-temporal stores when it is
    64-byte aligned (as the engine's and the server's gradients are): the same bits as ordinary
    stores, on a gradient the engine allocates and on a caller's misaligned one (which falls back)."""
    from clce_server.rails.device import open_devices
    from clce_server.cross_entropy.engine import LossEngine
    if not engine.device.tuning.defines.get("CE_SP_NT_STORE"):
        pytest.skip("this device's tuning row has no non-temporal stores")
    plain = LossEngine(open_devices("pocl", tuning_overrides={"CE_SP_NT_STORE": 0})[0])
    rng = np.random.default_rng(29)
    x, t = make((3, 21, 4, 32), "float32", rng)
    t[0, 1, :7] = -100
    kw = dict(label_smoothing=0.05, return_grad=True)
    a, b = engine.cross_entropy(x, t, **kw), plain.cross_entropy(x, t, **kw)
    assert a.grad.ctypes.data % 64 == 0
    assert a.grad.tobytes() == b.grad.tobytes() and a.loss.tobytes() == b.loss.tobytes()
    raw = np.empty(x.nbytes + 128, np.uint8)
    off = (-raw.ctypes.data) % 64 + 4                        # 4 bytes past a line: ordinary stores
    odd = raw[off:off + x.nbytes].view(np.float32).reshape(x.shape)
    c = engine.cross_entropy(x, t, grad_out=odd, **kw)
    assert c.grad.tobytes() == b.grad.tobytes()
    ref_loss, ref_grad = reference(x, t, ref_dtype=torch.float64, label_smoothing=0.05)
    assert_close(a.grad, ref_grad, 1e-6, 2e-5, "grad")


@pytest.mark.parametrize("in_place", [False, True], ids=["grad", "in-place"])
def test_bf16_rows_non_temporal_stores_change_no_bit(engine, in_place):
    """The CPU row writes an aligned bf16 gradient row (exps in a scratch row) with non-temporal
    stores: the same bits as ordinary stores, with and without NaN rows, and written over the
    logits (in place) too."""
    from clce_server.rails.device import open_devices
    from clce_server.cross_entropy.engine import LossEngine
    if not engine.device.tuning.defines.get("CE_NT_STORE"):
        pytest.skip("this device's tuning row has no non-temporal stores")
    plain = LossEngine(open_devices("pocl", tuning_overrides={"CE_NT_STORE": 0})[0])
    rng = np.random.default_rng(31)
    x, t = make((9, 1024), "bfloat16", rng)
    x[4, 17] = np.nan
    t[2] = -100
    outs = []
    for eng in (engine, plain):
        if in_place:
            from clce_server.cross_entropy.engine import _aligned_empty
            xi = _aligned_empty(x.shape, x.dtype)   # 64-byte aligned rows, as pooled buffers are
            xi[...] = x
            eng.cross_entropy(xi, t, return_grad=True, grad_out=xi, reduction="sum")
            outs.append(xi.tobytes())
        else:
            r = eng.cross_entropy(x, t, return_grad=True, reduction="sum")
            assert r.grad.ctypes.data % 64 == 0
            outs.append(r.grad.tobytes())
    assert outs[0] == outs[1]
