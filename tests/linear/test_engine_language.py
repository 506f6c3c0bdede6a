"""The fused linear cross-entropy speaks the loss path's language (issue 27, must-have 5), on the
server's engine (clce_server/linear/engine.py), host and discrete memory: return_lse, return_argmax and
accuracy, fp16 inputs, a z-loss always (zeros at lse_square_scale 0), a float32 loss for half
inputs with gradients in the input's dtype, and a per-row grad_output for reduction='none'.
Against torch: F.cross_entropy(F.linear(h, W, b), y) through autograd, and what Liger-Kernel's
fused linear cross-entropy returns (its token accuracy: argmax == target over the non-ignored
rows; its predicted tokens: the argmax)."""

import contextlib

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from clce_server.linear import engine as linear
from clce_server.rails.errors import ArgumentError
from tests.support.linear_reference import to_numpy, to_torch

_np, _torch = to_numpy, to_torch


@contextlib.contextmanager
def refused(exc_type, match):
    """A check's deliberate refusal: an ArgumentError carrying PyTorch's exception type."""
    with pytest.raises(ArgumentError, match=match) as info:
        yield info
    assert type(info.value.error) is exc_type, info.value.error


def make(rng, rows_shape, H, V, dtype=torch.float32):
    g = torch.Generator().manual_seed(int(rng.integers(1 << 30)))
    h = torch.randn(*rows_shape, H, generator=g).to(dtype)
    W = (torch.randn(V, H, generator=g) / H ** 0.5).to(dtype)
    b = (torch.randn(V, generator=g) * 0.1).to(dtype)
    return h, W, b, torch.randint(0, V, rows_shape, generator=g)


def _same_bits(a, b):
    for name in ("loss", "z_loss", "lse", "argmax", "grad_hidden", "grad_weight", "grad_bias"):
        x, y = getattr(a, name), getattr(b, name)
        assert (x is None) == (y is None), name
        if x is not None:
            np.testing.assert_array_equal(np.asarray(x).reshape(-1).view(np.uint8),
                                          np.asarray(y).reshape(-1).view(np.uint8), err_msg=name)


def _lce(memory):
    from clce_server.rails.device import open_devices
    from clce_server.cross_entropy.engine import LossEngine

    return linear.LinearCrossEntropy(LossEngine(open_devices(memory=memory)[0]), chunk_rows=64)


@pytest.fixture(scope="module")
def host_lce():
    return _lce("host")


@pytest.fixture(scope="module")
def disc_lce():
    return _lce("discrete")

TOL = {torch.float32: {}, torch.bfloat16: dict(atol=1e-2, rtol=1.6e-2), torch.float16: dict(atol=1e-3, rtol=1e-3)}


def _check(h, W, y, b=None, **opts):
    return linear.check(_np(h), _np(W), y.numpy(), None if b is None else _np(b), **opts)


def reference(h, W, y, b=None, *, shift=0, grad_output=None, lse_square_scale=0.0, **opts):
    """torch, in fp32 from the inputs' values: loss, z-loss, lse, argmax, accuracy and the
    gradients for `grad_output` (None: the loss's sum)."""
    h, W = h.detach().float().requires_grad_(), W.detach().float().requires_grad_()
    b = None if b is None else b.detach().float().requires_grad_()
    logits, tgt = F.linear(h, W, b), y
    if shift:
        logits, tgt = logits[..., :-shift, :], y[..., shift:]
    V = logits.shape[-1]
    flat, ft = logits.reshape(-1, V), tgt.reshape(-1)
    red = opts.get("reduction", "mean")
    ign = opts.get("ignore_index", -100)
    loss = F.cross_entropy(flat, ft, **opts)
    valid = ft != ign
    lse = torch.logsumexp(flat, -1)
    z = lse_square_scale * lse ** 2 * valid
    z = z.sum() / valid.sum() if red == "mean" else z.sum() if red == "sum" else z
    loss = loss + z
    if red == "none":
        loss, z = loss.reshape(tgt.shape), z.reshape(tgt.shape)
    amax = flat.argmax(-1)
    acc = float(((amax == ft) & valid).sum() / valid.sum())
    loss.backward(torch.ones_like(loss) if grad_output is None else grad_output)
    return dict(loss=loss.detach(), z_loss=z.detach(), lse=lse.detach().reshape(tgt.shape),
                argmax=amax.reshape(tgt.shape), accuracy=acc, grad_hidden=h.grad, grad_weight=W.grad,
                grad_bias=None if b is None else b.grad)


DTYPES = [torch.float32, torch.bfloat16, torch.float16]
IDS = ["fp32", "bf16", "fp16"]
CASES = [dict(), dict(reduction="sum", label_smoothing=0.1), dict(reduction="none"),
         dict(lse_square_scale=1e-3), dict(shift=1, reduction="none", ignore_index=3), dict(softcap=4.0)]


@pytest.fixture(params=["host", "discrete"])
def lce(request, host_lce, disc_lce):
    return host_lce if request.param == "host" else disc_lce


@pytest.mark.parametrize("dtype", DTYPES, ids=IDS)
@pytest.mark.parametrize("opts", CASES, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()) or "plain")
def test_extras_and_dtypes_match_torch(lce, dtype, opts):
    rng = np.random.default_rng(len(str(opts)))
    h, W, b, y = make(rng, (2, 70), 48, 301, dtype=dtype)   # 140 rows: three chunks of 64
    opts = dict(opts)
    if opts.get("ignore_index") == 3:
        y[:, ::5] = 3
    softcap = opts.pop("softcap", None)
    r = lce(_check(h, W, y, b, return_lse=True, return_argmax=True, softcap=softcap, **opts))
    if softcap:   # the capped logits' lse and argmax: checked against the cap applied in torch
        return _softcapped(r, h, W, y, b, softcap)
    ref = reference(h, W, y, b, **opts)
    tol = TOL[dtype]
    # the loss in float32 for every input dtype (Liger, Cut Cross-Entropy); gradients in the input's
    assert r.loss.dtype == np.float32 and r.z_loss.dtype == np.float32
    assert _torch(r.grad_hidden).dtype == dtype and r.grad_weight.dtype == np.float32
    torch.testing.assert_close(torch.from_numpy(r.loss), ref["loss"], **tol)
    torch.testing.assert_close(torch.from_numpy(r.z_loss), ref["z_loss"].float(), **tol)
    if not opts.get("lse_square_scale"):   # zeros, not None, without a z-loss (Liger's)
        assert not r.z_loss.any() and r.z_loss.shape == r.loss.shape
    torch.testing.assert_close(torch.from_numpy(r.lse), ref["lse"], **tol)
    if dtype == torch.float32:   # half precision may flip a near tie; fp32 must agree exactly
        np.testing.assert_array_equal(r.argmax, ref["argmax"].numpy())
        assert r.accuracy == pytest.approx(ref["accuracy"])
    else:
        assert (r.argmax == ref["argmax"].numpy()).mean() > 0.97
        assert abs(r.accuracy - ref["accuracy"]) < 0.03
    assert r.argmax.dtype == np.int64 and r.lse.shape == r.argmax.shape == tuple(ref["lse"].shape)
    torch.testing.assert_close(_torch(r.grad_hidden).float().reshape(ref["grad_hidden"].shape), ref["grad_hidden"],
                               **tol)
    torch.testing.assert_close(torch.from_numpy(r.grad_weight), ref["grad_weight"], **tol)
    torch.testing.assert_close(torch.from_numpy(r.grad_bias).float(), ref["grad_bias"], **tol)


def _softcapped(r, h, W, y, b, cap):
    logits = F.linear(h.float(), W.float(), b.float())
    capped = cap * torch.tanh(logits / cap)
    torch.testing.assert_close(torch.from_numpy(r.lse), torch.logsumexp(capped, -1), atol=1e-2, rtol=1e-2)
    assert (r.argmax == capped.argmax(-1).numpy()).mean() > 0.97


def test_accuracy_counts_only_non_ignored_rows(lce):
    """Liger's token accuracy: correct predictions over the rows whose target is not ignored; the
    predicted tokens of ignored rows are still their argmax."""
    rng = np.random.default_rng(3)
    h, W, b, y = make(rng, (150,), 32, 97)
    logits = F.linear(h, W, b)
    y[:50] = logits[:50].argmax(-1)    # 50 right
    y[50:100] = -100                   # 50 ignored
    y[100:] = (logits[100:].argmax(-1) + 1) % 97   # 50 wrong
    r = lce(_check(h, W, y, b, return_argmax=True))
    assert r.accuracy == pytest.approx(0.5)
    np.testing.assert_array_equal(r.argmax, logits.argmax(-1).numpy())
    all_ignored = lce(_check(h, W, torch.full_like(y, -100), b, return_argmax=True))
    assert np.isnan(all_ignored.accuracy)


@pytest.mark.parametrize("dtype", DTYPES, ids=IDS)
@pytest.mark.parametrize("shift", [0, 1])
def test_per_row_grad_output_for_reduction_none(lce, dtype, shift):
    rng = np.random.default_rng(5 + shift)
    h, W, b, y = make(rng, (2, 70), 40, 203, dtype=dtype)
    go = torch.rand(2, 70 - shift) * 2 - 0.5
    r = lce(_check(h, W, y, b, reduction="none", shift=shift, grad_output=go.numpy()))
    ref = reference(h, W, y, b, reduction="none", shift=shift, grad_output=go)
    tol = TOL[dtype]
    torch.testing.assert_close(torch.from_numpy(r.loss), ref["loss"], **tol)   # the loss is not scaled
    torch.testing.assert_close(_torch(r.grad_hidden).float().reshape(ref["grad_hidden"].shape), ref["grad_hidden"],
                               **tol)
    torch.testing.assert_close(torch.from_numpy(r.grad_weight), ref["grad_weight"], **tol)
    torch.testing.assert_close(torch.from_numpy(r.grad_bias).float(), ref["grad_bias"], **tol)


def test_extras_on_discrete_memory_are_the_host_paths_bits(host_lce, disc_lce):
    rng = np.random.default_rng(9)
    for dtype in DTYPES:
        h, W, b, y = make(rng, (3, 70), 48, 301, dtype=dtype)
        go = np.random.default_rng(1).random((3, 69)).astype(np.float32)
        for opts in (dict(return_lse=True, return_argmax=True, label_smoothing=0.1),
                     dict(reduction="none", shift=1, grad_output=go, lse_square_scale=1e-3)):
            a, c = disc_lce(_check(h, W, y, b, **opts)), host_lce(_check(h, W, y, b, **opts))
            _same_bits(a, c)
            assert a.accuracy == c.accuracy or (a.accuracy is None and c.accuracy is None)


@pytest.mark.parametrize("case, exc, match", [
    (dict(reduction="mean", grad_output=np.ones(10, np.float32)), RuntimeError, "for reduction='none'"),
    (dict(reduction="none", grad_output=np.ones(9, np.float32)), RuntimeError, "Mismatch in shape"),
    (dict(reduction="none", grad_output=np.ones(10, np.int64)), TypeError, "floating point"),
])
def test_bad_grad_output_is_refused(case, exc, match):
    h, W = np.zeros((10, 4), np.float32), np.zeros((5, 4), np.float32)
    with refused(exc, match):
        linear.check(h, W, np.zeros(10, np.int64), **case)


def test_fp16_needs_matching_dtypes():
    h = np.zeros((3, 4), np.float16)
    with refused(RuntimeError, "same dtype"):
        linear.check(h, np.zeros((5, 4), np.float32), np.zeros(3, np.int64))
    with refused(RuntimeError, "runs float32, bfloat16 and float16"):
        linear.check(h.astype(np.float64), np.zeros((5, 4), np.float64), np.zeros(3, np.int64))
