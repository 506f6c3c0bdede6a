"""The fused linear cross-entropy on the server (clce_server/linear/engine.py) against torch's
F.cross_entropy(F.linear(h, W, b), y, **options) through autograd: loss and the gradients of
hidden, weight and bias, for every option, several chunks per batch (so the 'mean' normaliser
spans chunks), shift, bf16 with fp32 accumulation, the same bits run to run, and weight
gradients accumulating over micro-batches as local accumulation does."""

import contextlib

import ml_dtypes
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from clce_server.linear import engine as linear
from clce_server.rails.errors import ArgumentError
from tests.support.linear_reference import to_numpy, to_torch


@contextlib.contextmanager
def refused(exc_type, match):
    """A check's deliberate refusal: an ArgumentError carrying PyTorch's exception type."""
    with pytest.raises(ArgumentError, match=match) as info:
        yield info
    assert type(info.value.error) is exc_type, info.value.error


@pytest.fixture(scope="module")
def lce(engine):
    return linear.LinearCrossEntropy(engine, chunk_rows=64)   # small chunks: many per batch


_np, _torch = to_numpy, to_torch


def reference(h, W, y, b=None, *, shift=0, lse_square_scale=0.0, softcap=None, **opts):
    """torch: loss and grads of h, W, b (fp32 math for bf16 inputs' logits, as the server)."""
    h, W = h.detach().clone().requires_grad_(), W.detach().clone().requires_grad_()
    b = None if b is None else b.detach().clone().requires_grad_()
    logits = F.linear(h, W, b).float()
    if softcap:
        logits = softcap * torch.tanh(logits / softcap)
    tgt = y
    if shift:
        logits, tgt = logits[..., :-shift, :], y[..., shift:]
    V = logits.shape[-1]
    flat, ft = logits.reshape(-1, V), tgt.reshape(-1)
    loss = F.cross_entropy(flat, ft, **opts)
    red = opts.get("reduction", "mean")
    if lse_square_scale:
        ign = opts.get("ignore_index", -100)
        valid = ft != ign
        z = lse_square_scale * torch.logsumexp(flat, -1) ** 2 * valid
        zl = z.sum() / valid.sum() if red == "mean" else z.sum() if red == "sum" else z
        loss = loss + zl
    if red == "none":
        loss = loss.reshape(tgt.shape)
    loss.sum().backward()
    return loss.detach(), h.grad, W.grad, None if b is None else b.grad


def make(rng, rows_shape, H, V, dtype=torch.float32, bias=True):
    g = torch.Generator().manual_seed(int(rng.integers(1 << 30)))
    h = torch.randn(*rows_shape, H, generator=g).to(dtype)
    W = (torch.randn(V, H, generator=g) / H ** 0.5).to(dtype)
    b = (torch.randn(V, generator=g) * 0.1).to(dtype) if bias else None
    y = torch.randint(0, V, rows_shape, generator=g)
    return h, W, b, y


def run(lce, h, W, y, b=None, class_weight=None, **opts):
    p = linear.check(_np(h), _np(W), y.numpy(), None if b is None else _np(b),
                     class_weight=None if class_weight is None else class_weight.numpy(), **opts)
    return lce(p)


OPTIONS = [dict(), dict(reduction="sum"), dict(reduction="none"), dict(label_smoothing=0.1),
           dict(ignore_index=3), dict(weighted=True), dict(weighted=True, label_smoothing=0.2),
           dict(lse_square_scale=1e-3), dict(lse_square_scale=1e-3, reduction="none"),
           dict(softcap=5.0), dict(shift=1), dict(shift=2, reduction="none", ignore_index=3)]


@pytest.mark.parametrize("opts", OPTIONS, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()) or "plain")
@pytest.mark.parametrize("bias", [True, False])
def test_fp32_matches_torch(lce, opts, bias):
    rng = np.random.default_rng(len(str(opts)) + bias)
    h, W, b, y = make(rng, (3, 70), 48, 301, bias=bias)   # 210 rows: four chunks of 64
    opts = dict(opts)
    cw = torch.rand(301) + 0.5 if opts.pop("weighted", False) else None
    if opts.get("ignore_index") == 3:
        y[:, ::4] = 3
    r = run(lce, h, W, y, b, class_weight=cw, **opts)
    ropts = {k: v for k, v in opts.items() if k in ("reduction", "label_smoothing", "ignore_index")}
    loss, gh, gw, gb = reference(h, W, y, b, weight=cw, shift=opts.get("shift", 0),
                                 lse_square_scale=opts.get("lse_square_scale", 0.0),
                                 softcap=opts.get("softcap"), **ropts)
    torch.testing.assert_close(_torch(r.loss), loss)
    torch.testing.assert_close(_torch(r.grad_hidden).reshape(gh.shape), gh)
    torch.testing.assert_close(_torch(r.grad_weight), gw)
    if bias:
        torch.testing.assert_close(torch.from_numpy(r.grad_bias).float(), gb)
    else:
        assert r.grad_bias is None


@pytest.mark.parametrize("opts", [dict(), dict(reduction="sum", label_smoothing=0.1), dict(shift=1)], ids=str)
def test_bf16_matches_torch_within_bf16(lce, opts):
    rng = np.random.default_rng(7)
    h, W, b, y = make(rng, (2, 100), 64, 257, dtype=torch.bfloat16)
    r = run(lce, h, W, y, b, **opts)
    assert r.grad_hidden.dtype == ml_dtypes.bfloat16 and r.loss.dtype == np.float32   # as Liger, CCE
    ropts = {k: v for k, v in opts.items() if k != "shift"}
    # the reference in fp32 from the same bf16 values: the server accumulates in fp32 too
    loss, gh, gw, gb = reference(h.float(), W.float(), y, b.float(), shift=opts.get("shift", 0), **ropts)
    tol = dict(atol=1e-2, rtol=1.6e-2)   # torch's bf16 defaults (assert_close: 1e-5 / 1.6e-2)
    torch.testing.assert_close(_torch(r.loss).float(), loss, **tol)
    torch.testing.assert_close(_torch(r.grad_hidden).float().reshape(gh.shape), gh, **tol)
    torch.testing.assert_close(torch.from_numpy(r.grad_weight), gw, **tol)
    torch.testing.assert_close(torch.from_numpy(r.grad_bias).float(), gb, **tol)


def test_bit_identical_runs(lce):
    rng = np.random.default_rng(11)
    h, W, b, y = make(rng, (300,), 40, 500)
    first = run(lce, h, W, y, b, label_smoothing=0.05)
    for _ in range(2):
        again = run(lce, h, W, y, b, label_smoothing=0.05)
        for name in ("loss", "grad_hidden", "grad_weight", "grad_bias"):
            np.testing.assert_array_equal(np.asarray(getattr(again, name)).reshape(-1).view(np.uint8),
                                          np.asarray(getattr(first, name)).reshape(-1).view(np.uint8), err_msg=name)


def test_weight_gradient_accumulates_over_micro_batches(lce):
    """k micro-batches into one accumulator: as local accumulation of torch's gradients."""
    rng = np.random.default_rng(5)
    _, W, b, _ = make(rng, (1,), 32, 200)
    acc_w, acc_b = np.zeros((200, 32), np.float32), np.zeros(200, np.float64)
    ref_w, ref_b = torch.zeros(200, 32), torch.zeros(200)
    for _ in range(3):
        h, _, _, y = make(rng, (90,), 32, 200)
        p = linear.check(_np(h), _np(W), y.numpy(), _np(b))
        lce.steps  # noqa: B018  (the generator form is what the scheduler runs)
        r = lce(p, grad_weight=acc_w, grad_bias=acc_b)
        assert r.grad_weight is acc_w
        _, _, gw, gb = reference(h, W, y, b)
        ref_w += gw
        ref_b += gb
    torch.testing.assert_close(torch.from_numpy(acc_w), ref_w)
    torch.testing.assert_close(torch.from_numpy(acc_b).float(), ref_b)


@pytest.mark.parametrize("rows", [150, 0])
def test_overwritten_gradient_and_scratch_never_read_old_contents(lce, rows):
    """overwrite_grad_weight writes the weight's gradient over whatever the buffer held (NaN here),
    and the scratch buffers `empty` hands out (NaN-filled) are written before they are read."""
    rng = np.random.default_rng(15)
    h, W, b, y = make(rng, (max(rows, 1),), 48, 260)
    h, y = h[:rows], y[:rows]
    p = linear.check(_np(h), _np(W), y.numpy(), _np(b), reduction="sum")
    taken = []

    def poisoned(shape, dtype):
        a = np.full(shape, np.nan, dtype)
        taken.append(shape)
        return a

    dest = np.full((260, 48), np.nan, np.float32)
    r = lce(p, grad_weight=dest, overwrite_grad_weight=True, empty=poisoned)
    assert r.grad_weight is dest
    fresh = lce(p)
    np.testing.assert_array_equal(dest, fresh.grad_weight)
    np.testing.assert_array_equal(r.grad_hidden, fresh.grad_hidden)
    assert sorted(taken) == sorted(s for s, _ in lce.scratch_shapes(p, want_grad_hidden=True)) or rows == 0


def test_no_gradient_asked_computes_loss_only(lce):
    rng = np.random.default_rng(6)
    h, W, b, y = make(rng, (100,), 24, 90)
    p = linear.check(_np(h), _np(W), y.numpy(), _np(b))
    r = lce(p, want_grad_hidden=False, want_grad_weight=False, want_grad_bias=False)
    assert r.grad_hidden is None and r.grad_weight is None and r.grad_bias is None
    torch.testing.assert_close(_torch(r.loss), reference(h, W, y, b)[0])


@pytest.mark.parametrize("case, exc, match", [
    ("target_oob", IndexError, "Target 90 is out of bounds"),
    ("shapes", RuntimeError, "mat1 and mat2 shapes cannot be multiplied"),
    ("dtype_mix", RuntimeError, "same dtype"),
    ("reduction", ValueError, "is not a valid value for reduction"),
    ("float_target", RuntimeError, "expected target dtype"),
    ("shift", ValueError, "shift must be in"),
    ("fp64", RuntimeError, "runs float32, bfloat16 and float16"),
])
def test_bad_arguments_raise_before_any_chunk(case, exc, match):
    rng = np.random.default_rng(0)
    h, W, b, y = make(rng, (4, 5), 8, 90)
    h, W, b, y = _np(h), _np(W), _np(b), y.numpy()
    kw = {}
    if case == "target_oob":
        y = y.copy()
        y[2, 3] = 90
    elif case == "shapes":
        W = W[:, :7].copy()
    elif case == "dtype_mix":
        W = W.astype(np.float64)
    elif case == "reduction":
        kw["reduction"] = "avg"
    elif case == "float_target":
        y = y.astype(np.float32)
    elif case == "shift":
        kw["shift"] = 5
    elif case == "fp64":
        h, W, b = h.astype(np.float64), W.astype(np.float64), b.astype(np.float64)
    with refused(exc, match):
        linear.check(h, W, y, b, **kw)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_no_rows(lce, reduction):
    rng = np.random.default_rng(9)
    h, W, b, y = make(rng, (0,), 8, 30)
    r = run(lce, h, W, y, b, reduction=reduction, lse_square_scale=1e-3)
    loss = reference(h, W, y, b, reduction=reduction)[0]
    torch.testing.assert_close(_torch(r.loss), loss, equal_nan=True)
    assert r.grad_hidden.shape == (0, 8) and not r.grad_weight.any() and not r.grad_bias.any()


def test_unaligned_tensors_are_read_correctly(lce):
    """Tensors inside a msgpack body may start at any byte: they are aligned before the kernels."""
    rng = np.random.default_rng(10)
    h, W, b, y = make(rng, (70,), 16, 50)
    raw = np.zeros(h.numel() * 4 + 1, np.uint8)
    odd = raw[1:].view(np.float32).reshape(70, 16)   # one byte off
    odd[...] = h.numpy()
    assert odd.ctypes.data % 4
    r = lce(linear.check(odd, _np(W), y.numpy(), _np(b)))
    torch.testing.assert_close(_torch(r.loss), reference(h, W, y, b)[0])


def test_empty_weight_and_huge_ignore_index_are_refused():
    h = np.zeros((3, 4), np.float32)
    with refused(RuntimeError, "weight with rows and columns"):
        linear.check(h, np.zeros((0, 4), np.float32), np.zeros(3, np.int64))
    with refused(ValueError, "Overflow"):
        linear.check(h, np.zeros((5, 4), np.float32), np.zeros(3, np.int64), ignore_index=1 << 70)


# ---- devices with memory of their own (the discrete path), proven on PoCL ----------------------
# `memory="discrete"` drives PoCL through the GPU's path: the weight resident in device memory,
# the accumulators there, hidden chunks streamed on a second queue. The same kernels in the same
# order: the results are the host path's bits (and so torch's values, above).

@pytest.fixture(scope="module")
def host_lce():
    from clce_server.rails.device import open_devices
    from clce_server.cross_entropy.engine import LossEngine

    return linear.LinearCrossEntropy(LossEngine(open_devices(memory="host")[0]), chunk_rows=64)


@pytest.fixture(scope="module")
def disc_lce():
    from clce_server.rails.device import open_devices
    from clce_server.cross_entropy.engine import LossEngine

    dev = open_devices(memory="discrete")[0]
    assert dev.memory == "discrete" and not dev.host_unified and dev.describe()["memory"] == "discrete"
    return linear.LinearCrossEntropy(LossEngine(dev), chunk_rows=64)


@pytest.fixture(scope="module")
def disc_wg_lce():
    """Discrete, with the GPU's cross-entropy kernel (a work-group per row), whose gradient may
    not overwrite the logits it reads: the path keeps a separate gradient buffer there."""
    from clce_server.rails.device import open_devices
    from clce_server.cross_entropy.engine import LossEngine

    dev = open_devices(memory="discrete",
                       tuning_overrides={"rows": "group", "local_size": 16, "reduce_local_size": 32})[0]
    return linear.LinearCrossEntropy(LossEngine(dev), chunk_rows=64)


def _same_bits(a, b):
    for name in ("loss", "z_loss", "grad_hidden", "grad_weight", "grad_bias"):
        x, y = getattr(a, name), getattr(b, name)
        assert (x is None) == (y is None), name
        if x is not None:
            np.testing.assert_array_equal(np.asarray(x).reshape(-1).view(np.uint8),
                                          np.asarray(y).reshape(-1).view(np.uint8), err_msg=name)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("opts", OPTIONS, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()) or "plain")
def test_discrete_memory_gives_the_host_paths_bits(host_lce, disc_lce, opts, dtype):
    rng = np.random.default_rng(len(str(opts)))
    h, W, b, y = make(rng, (3, 70), 48, 301, dtype=dtype)
    opts = dict(opts)
    cw = torch.rand(301) + 0.5 if opts.pop("weighted", False) else None
    if opts.get("ignore_index") == 3:
        y[:, ::4] = 3
    _same_bits(run(disc_lce, h, W, y, b, class_weight=cw, **opts), run(host_lce, h, W, y, b, class_weight=cw, **opts))


@pytest.mark.parametrize("opts", [dict(), dict(reduction="none", label_smoothing=0.1, lse_square_scale=1e-3),
                                  dict(shift=1, weighted=True)], ids=str)
def test_discrete_with_the_gpu_kernel_shape_matches_torch(disc_wg_lce, opts):
    rng = np.random.default_rng(21)
    h, W, b, y = make(rng, (2, 90), 40, 203)
    opts = dict(opts)
    cw = torch.rand(203) + 0.5 if opts.pop("weighted", False) else None
    r = run(disc_wg_lce, h, W, y, b, class_weight=cw, **opts)
    ropts = {k: v for k, v in opts.items() if k in ("reduction", "label_smoothing", "ignore_index")}
    loss, gh, gw, gb = reference(h, W, y, b, weight=cw, shift=opts.get("shift", 0),
                                 lse_square_scale=opts.get("lse_square_scale", 0.0), **ropts)
    torch.testing.assert_close(_torch(r.loss), loss)
    torch.testing.assert_close(_torch(r.grad_hidden).reshape(gh.shape), gh)
    torch.testing.assert_close(_torch(r.grad_weight), gw)
    torch.testing.assert_close(torch.from_numpy(r.grad_bias).float(), gb)


class _Version:
    """Stands for a stored weight version (the weight store's entry): weakly referenced."""


def test_discrete_weight_and_accumulators_stay_resident_per_version(host_lce, disc_lce):
    """A named version is copied to the device once; its accumulators add up there across
    micro-batches, read back after each (the host copy always current), and start again from a
    new host accumulator (the gradient taken). Bits as the host path's."""
    rng = np.random.default_rng(31)
    _, W, b, _ = make(rng, (1,), 32, 200)
    path = disc_lce._discrete()
    version = _Version()
    acc = [np.zeros((200, 32), np.float32), np.zeros(200, np.float64)]
    ref = [np.zeros((200, 32), np.float32), np.zeros(200, np.float64)]
    for step in range(4):
        if step == 2:   # the gradient taken: fresh host accumulators, the device's must not carry over
            acc = [np.zeros((200, 32), np.float32), np.zeros(200, np.float64)]
            ref = [np.zeros((200, 32), np.float32), np.zeros(200, np.float64)]
        h, _, _, y = make(rng, (150,), 32, 200)
        p = linear.check(_np(h), _np(W), y.numpy(), _np(b))
        r = disc_lce(p, grad_weight=acc[0], grad_bias=acc[1], weight_key=version)
        host_lce(p, grad_weight=ref[0], grad_bias=ref[1])
        assert r.grad_weight is acc[0]
        np.testing.assert_array_equal(acc[0], ref[0])
        np.testing.assert_array_equal(acc[1], ref[1])
        (res,) = [r for ref_, r in path._resident.values() if ref_() is version]
        assert res.users == 0 and res.gw is not None
    assert path.resident_bytes() >= 200 * 32 * 4 * 2
    del version, res
    import gc
    gc.collect()
    assert not path._resident, "a version no longer stored keeps no device memory"


def test_discrete_accumulator_shared_by_two_devices_stays_exact(host_lce, disc_lce):
    """Two device workers add into one version's host accumulator in turn: each notices the
    other wrote it and copies it in again (the resident copy is stale)."""
    from clce_server.rails.device import open_devices
    from clce_server.cross_entropy.engine import LossEngine

    other = linear.LinearCrossEntropy(LossEngine(open_devices(memory="discrete")[0]), chunk_rows=64)
    rng = np.random.default_rng(33)
    _, W, b, _ = make(rng, (1,), 24, 130)
    version = _Version()
    acc = [np.zeros((130, 24), np.float32), np.zeros(130, np.float64)]
    ref = [np.zeros((130, 24), np.float32), np.zeros(130, np.float64)]
    for step in range(4):
        h, _, _, y = make(rng, (100,), 24, 130)
        p = linear.check(_np(h), _np(W), y.numpy(), _np(b))
        (disc_lce if step % 2 else other)(p, grad_weight=acc[0], grad_bias=acc[1], weight_key=version)
        host_lce(p, grad_weight=ref[0], grad_bias=ref[1])
    np.testing.assert_array_equal(acc[0], ref[0])
    np.testing.assert_array_equal(acc[1], ref[1])


def test_discrete_request_stopped_part_way_leaves_nothing_stale(host_lce, disc_lce):
    """A job stopped after one chunk (its client gone): its buffers go back, the version's pin is
    dropped, and the next micro-batch does not trust the half-added device accumulator."""
    rng = np.random.default_rng(35)
    _, W, b, _ = make(rng, (1,), 16, 120)
    version = _Version()
    acc = [np.zeros((120, 16), np.float32), np.zeros(120, np.float64)]
    h, _, _, y = make(rng, (200,), 16, 120)
    p = linear.check(_np(h), _np(W), y.numpy(), _np(b))
    disc_lce(p, grad_weight=acc[0], grad_bias=acc[1], weight_key=version)
    snapshot = [a.copy() for a in acc]
    steps = disc_lce.steps(p, grad_weight=acc[0], grad_bias=acc[1], weight_key=version)
    next(steps)
    steps.close()
    path = disc_lce._discrete()
    assert all(r.users == 0 for _, r in path._resident.values()) and path._working == 0
    # the host accumulator was not written; a caller restoring it (or keeping it) is what counts
    np.testing.assert_array_equal(acc[0], snapshot[0])
    disc_lce(p, grad_weight=acc[0], grad_bias=acc[1], weight_key=version)
    ref = [s.copy() for s in snapshot]
    host_lce(p, grad_weight=ref[0], grad_bias=ref[1])
    np.testing.assert_array_equal(acc[0], ref[0])
    np.testing.assert_array_equal(acc[1], ref[1])


def test_discrete_memory_is_counted_and_oversized_requests_refused(disc_lce):
    """Device bytes: a request over the device's share is an argument error before any chunk;
    resident versions not in use are evicted, least recently used first, to make room."""

    rng = np.random.default_rng(37)
    h, W, b, y = make(rng, (100,), 16, 100)
    p = linear.check(_np(h), _np(W), y.numpy(), _np(b))
    path = disc_lce._discrete()
    need = disc_lce.device_bytes(p)
    assert need >= 100 * 16 * 4 * 2 + 64 * 100 * 4   # weight + dW + the chunk's logits at least
    budget = path.budget
    try:
        path.budget = need - 1
        with pytest.raises(ArgumentError, match="bytes of memory on the OpenCL device"):
            disc_lce(p)
        path.budget = need + 10
        versions = [_Version() for _ in range(3)]
        for v in versions:
            disc_lce(p, weight_key=v)
        held = [r for ref_, r in path._resident.values() if ref_() in versions]
        assert len(held) == 1, "each new version evicted the last one to fit the budget"
    finally:
        path.budget = budget


def test_host_memory_devices_report_it():
    from clce_server.rails.device import open_devices

    dev = open_devices(memory="auto")[0]   # PoCL's CPU device here: host memory; a GPU: its own
    want = "host" if dev.kind == "cpu" or dev.cl_device.host_unified_memory else "discrete"
    assert dev.describe()["memory"] == want
    with pytest.raises(ValueError, match="device memory must be one of"):
        open_devices(memory="unified")


def test_discrete_without_float64_sums_the_bias_gradient_on_the_host(host_lce):
    """A device without float64 (some GPUs): the bias gradient's float64 column sums run on the
    host from the chunk's gradient read back, the same bits; the rest stays on the device."""
    from clce_server.rails.device import open_devices
    from clce_server.cross_entropy.engine import LossEngine

    import threading

    dev = open_devices(memory="discrete")[0]
    dev.has_fp64 = False   # this instance only, as a device without float64 opens: its programs
    dev.programs.clear()   # (the row sums' among them) built again without it, its kernels too
    dev._local = threading.local()
    lce = linear.LinearCrossEntropy(LossEngine(dev), chunk_rows=64)
    rng = np.random.default_rng(39)
    h, W, b, y = make(rng, (150,), 24, 110)
    version = _Version()
    acc = [np.zeros((110, 24), np.float32), np.zeros(110, np.float64)]
    ref = [np.zeros((110, 24), np.float32), np.zeros(110, np.float64)]
    for _ in range(2):
        p = linear.check(_np(h), _np(W), y.numpy(), _np(b))
        r = lce(p, grad_weight=acc[0], grad_bias=acc[1], weight_key=version)
        want = host_lce(p, grad_weight=ref[0], grad_bias=ref[1])
        np.testing.assert_array_equal(acc[1], ref[1])
        np.testing.assert_array_equal(acc[0], ref[0])
        np.testing.assert_array_equal(r.grad_hidden, want.grad_hidden)
        np.testing.assert_allclose(r.loss, want.loss, rtol=1e-6)   # row sums in float32 without float64
