"""The fused linear cross-entropy's client speaks the loss path's language (issue 27, must-have
5), on a real server over TCP and shared memory, through Client and AsyncClient: the loss path's
CrossEntropyResult (lse, argmax, accuracy: Liger's token accuracy and predicted tokens), fp16,
a float32 loss with gradients in the inputs' dtype, a z-loss always (zeros at lse_square_scale
0, on the loss path too with return_z_loss), a per-row grad_output for reduction='none',
Liger's constructor for LinearCrossEntropyLoss, and torch.autocast's dtypes alike in eager and
compiled calls on both paths. References are torch's (what Liger documents it returns)."""

import asyncio

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import clce_client
from clce_client.client import CrossEntropyResult
from tests.support.linear_reference import model
from tests.support.serverproc import server_fixture

server = server_fixture()

TRANSPORTS = {"tcp": dict(transport="tcp"), "shm": dict(transport="shm", shm_min_bytes=0)}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
TOL = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.bfloat16: dict(rtol=2e-2, atol=2e-2),
       torch.float16: dict(rtol=2e-3, atol=2e-3)}


def reference(h, W, y, b=None, *, grad_output=None, shift=0, lse_square_scale=0.0, **opts):
    """torch, fp32 from the inputs' values: what Liger's fused linear cross-entropy returns
    (loss, z_loss, token accuracy over non-ignored rows, predicted tokens) and the gradients."""
    h2, W2 = h.detach().float().requires_grad_(), W.detach().float().requires_grad_()
    b2 = None if b is None else b.detach().float().requires_grad_()
    logits, t = F.linear(h2, W2, b2), y
    if shift:
        logits, t = logits[..., :-shift, :], y[..., shift:]
    flat, ft = logits.reshape(-1, logits.shape[-1]), t.reshape(-1)
    red, ign = opts.get("reduction", "mean"), opts.get("ignore_index", -100)
    valid = ft != ign
    lse = torch.logsumexp(flat, -1)
    z = lse_square_scale * lse ** 2 * valid
    z = z.sum() / valid.sum() if red == "mean" else z.sum() if red == "sum" else z.reshape(t.shape)
    loss = F.cross_entropy(flat, ft, **opts)
    loss = (loss.reshape(t.shape) if red == "none" else loss) + z
    amax = flat.argmax(-1)
    loss.backward(torch.ones_like(loss) if grad_output is None else grad_output)
    return dict(loss=loss.detach(), z_loss=z.detach(), lse=lse.detach().reshape(t.shape), argmax=amax.reshape(t.shape),
                accuracy=float(((amax == ft) & valid).sum()) / float(valid.sum()),
                grads=(h2.grad, W2.grad, None if b2 is None else b2.grad))


def _grads_close(params, ref, dtype):
    for p, g in zip(params, ref["grads"]):
        if p is not None:
            assert p.grad.dtype == p.dtype
            torch.testing.assert_close(p.grad.float(), g, **TOL[dtype])


@pytest.mark.parametrize("client_kind", ["sync", "async"])
@pytest.mark.parametrize("transport", TRANSPORTS)
@pytest.mark.parametrize("dt", DTYPES)
def test_result_is_the_loss_paths_and_matches_torch(server, client_kind, transport, dt):
    dtype = DTYPES[dt]
    h, W, b, y = model(3, N=140, dtype=dtype)
    y[::3] = F.linear(h.float(), W.float(), b.float()).argmax(-1)[::3]   # some right: an accuracy to check
    y[::6] = -100
    opts = dict(return_lse=True, return_argmax=True, label_smoothing=0.05)

    async def acall(c):
        return await c.linear_cross_entropy(h, W, y, b, **opts)

    if client_kind == "sync":
        with clce_client.Client(server.url, **TRANSPORTS[transport]) as c:
            r = c.linear_cross_entropy(h, W, y, b, **opts)
    else:
        async def go():
            async with clce_client.AsyncClient(server.url, **TRANSPORTS[transport]) as c:
                return await acall(c)
        r = asyncio.run(go())
    ref = reference(h, W, y, b, label_smoothing=0.05)
    assert isinstance(r, CrossEntropyResult)
    # float32 loss for half inputs (Liger, Cut Cross-Entropy); the z-loss there, zero
    assert r.loss.dtype == r.z_loss.dtype == r.lse.dtype == torch.float32 and r.argmax.dtype == torch.int64
    assert r.z_loss.shape == () and float(r.z_loss) == 0.0
    torch.testing.assert_close(r.loss, ref["loss"], **TOL[dtype])
    torch.testing.assert_close(r.lse, ref["lse"], **TOL[dtype])
    agree = (r.argmax == ref["argmax"]).float().mean()
    assert agree == 1.0 if dtype == torch.float32 else agree > 0.97   # half may flip a near tie
    assert r.accuracy == pytest.approx(ref["accuracy"], abs=0 if dtype == torch.float32 else 0.03)
    r.loss.backward()
    _grads_close((h, W, b), ref, dtype)


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_numpy_answers_carry_the_extras(server, transport):
    h, W, b, y = model(4, N=90)
    with clce_client.Client(server.url, **TRANSPORTS[transport]) as c:
        out = c.linear_cross_entropy(h.detach().numpy(), W.detach().numpy(), y.numpy(), b.detach().numpy(),
                                     reduction="none", return_lse=True, return_argmax=True)
    ref = reference(h, W, y, b, reduction="none")
    assert out["loss"].dtype == np.float32 and out["loss"].shape == (90,)
    np.testing.assert_array_equal(out["z_loss"], np.zeros(90, np.float32))
    np.testing.assert_allclose(out["loss"], ref["loss"].numpy(), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(out["lse"], ref["lse"].numpy(), rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(out["argmax"], ref["argmax"].numpy())
    assert out["accuracy"] == pytest.approx(ref["accuracy"])


@pytest.mark.parametrize("client_kind", ["sync", "async"])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_return_z_loss_is_always_a_z_loss(server, client_kind, reduction):
    """Liger's return_z_loss: (loss, z_loss), zeros at lse_square_scale 0, on both paths."""
    h, W, b, y = model(5, N=70)
    x = torch.randn(70, 31, requires_grad=True)
    t = torch.randint(0, 31, (70,))

    def calls(c):
        return (c.linear_cross_entropy(h, W, y, b, reduction=reduction, return_z_loss=True),
                c.linear_cross_entropy(h, W, y, b, reduction=reduction, return_z_loss=True, lse_square_scale=1e-2),
                c.cross_entropy(x, t, reduction=reduction, return_z_loss=True),
                c.cross_entropy(x, t, reduction=reduction, return_z_loss=True, lse_square_scale=1e-2))

    if client_kind == "sync":
        with clce_client.Client(server.url) as c:
            got = calls(c)
    else:
        async def go():
            async with clce_client.AsyncClient(server.url) as c:
                return [await a for a in calls(c)]
        got = asyncio.run(go())
    shape = () if reduction == "mean" else (70,)
    (l0, z0), (l1, z1), r0, r1 = got
    assert z0.shape == r0.z_loss.shape == shape and z0.dtype == r0.z_loss.dtype == torch.float32
    assert not z0.any() and not r0.z_loss.any()
    torch.testing.assert_close(z1, reference(h, W, y, b, reduction=reduction, lse_square_scale=1e-2)["z_loss"])
    zx = 1e-2 * torch.logsumexp(x.detach(), -1) ** 2
    torch.testing.assert_close(r1.z_loss, zx.mean() if reduction == "mean" else zx)
    # without return_z_loss nothing changes on the loss path: no z_loss at scale 0
    with clce_client.Client(server.url) as c:
        assert c.cross_entropy(x, t, return_lse=True).z_loss is None


@pytest.mark.parametrize("transport", TRANSPORTS)
@pytest.mark.parametrize("stateless", [False, True], ids=["stored", "stateless"])
@pytest.mark.parametrize("shift", [0, 1])
@pytest.mark.parametrize("dt", ["fp32", "bf16"])
def test_per_row_grad_output_for_reduction_none(server, transport, stateless, shift, dt):
    dtype = DTYPES[dt]
    g = torch.Generator().manual_seed(shift)
    h = torch.randn(2, 60, 40, generator=g).to(dtype).requires_grad_()
    W = (torch.randn(310, 40, generator=g) / 40 ** 0.5).to(dtype).requires_grad_()
    b = (torch.randn(310, generator=g) * 0.1).to(dtype).requires_grad_()
    y = torch.randint(0, 310, (2, 60), generator=g)
    with clce_client.Client(server.url, **TRANSPORTS[transport]) as c:
        loss = c.linear_cross_entropy(h, W, y, b, reduction="none", shift=shift, stateless=stateless)
        go = torch.rand(loss.shape, generator=g) * 2 - 0.5      # a grad_output per row, not one value
        (loss * go).sum().backward()
    ref = reference(h, W, y, b, reduction="none", shift=shift, grad_output=go)
    torch.testing.assert_close(loss, ref["loss"], **TOL[dtype])
    _grads_close((h, W, b), ref, dtype)


def test_per_row_grad_output_is_refused_where_it_cannot_be_right(server):
    h, W, b, y = model(6, N=64)
    with clce_client.Client(server.url) as c:
        loss = c.linear_cross_entropy(h, W, y, b, reduction="none", accumulate=True)
        with pytest.raises(RuntimeError, match="cannot accumulate on the server"):
            loss.backward(torch.rand(64))
        loss = c.linear_cross_entropy(h, W, y, b, reduction="none", accumulate=True)
        loss.sum().backward()    # one value: fine

    async def go():
        async with clce_client.AsyncClient(server.url) as c:
            return await c.linear_cross_entropy(h, W, y, b, reduction="none")
    loss = asyncio.run(go())
    with pytest.raises(RuntimeError, match="AsyncClient cannot make"):
        loss.backward(torch.rand(64))


def test_liger_constructor_positionally(server):
    h, W, b, y = model(7, N=96)
    y[::7] = 3
    cw = torch.rand(310) + 0.5
    with clce_client.Client(server.url) as c:
        # Liger's order: ce_weight, ignore_index, lse_square_scale, label_smoothing, reduction, softcap, return_z_loss
        fn = clce_client.LinearCrossEntropyLoss(cw, 3, 1e-3, 0.1, "sum", None, True, client=c)
        loss, z = fn(W, h, y, b)
        acc = clce_client.LinearCrossEntropyLoss(None, 3, return_token_accuracy=True, client=c)(W, h, y, b)
        old = clce_client.LinearCrossEntropyLoss(client=c, reduction="sum")(W, h, y, b)   # the old keywords
        with pytest.raises(TypeError, match="first argument is ce_weight"):
            clce_client.LinearCrossEntropyLoss(c)
    with pytest.raises(ValueError, match="accumulates in torch.float32"):
        clce_client.LinearCrossEntropyLoss(accum_dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="label_smoothing must be between"):
        clce_client.LinearCrossEntropyLoss(None, -100, 0.0, 1.5)
    ref = reference(h, W, y, b, weight=cw, ignore_index=3, lse_square_scale=1e-3, label_smoothing=0.1,
                    reduction="sum")
    torch.testing.assert_close(loss, ref["loss"], rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(z, ref["z_loss"], rtol=1e-5, atol=1e-5)
    ref_acc = reference(h, W, y, b, ignore_index=3)
    assert acc.accuracy == pytest.approx(ref_acc["accuracy"])
    torch.testing.assert_close(acc.argmax, ref_acc["argmax"])
    torch.testing.assert_close(old, reference(h, W, y, b, reduction="sum")["loss"], rtol=1e-5, atol=1e-4)


def test_autocast_eager_and_compiled_linear_agree(server):
    """Under autocast: hidden, weight and bias in the autocast dtype (torch's F.linear policy, as
    Liger casts them), the cross-entropy in float32 (torch's policy): a float32 loss, eagerly and
    under torch.compile alike, and the fp32 parameters' gradients in float32."""
    torch.manual_seed(0)
    h = torch.randn(64, 32, requires_grad=True)
    lin = torch.nn.Linear(32, 101)
    y = torch.randint(0, 101, (64,))
    with clce_client.Client(server.url) as c:
        fn = lambda h, y: c.linear_cross_entropy(h, lin.weight, y, lin.bias, stateless=True)  # noqa: E731
        with torch.autocast("cpu", dtype=torch.bfloat16):
            eager = fn(h, y)
            compiled = torch.compile(fn, backend="aot_eager", fullgraph=True)(h, y)
            want = F.cross_entropy(lin(h), y)       # torch: bf16 logits, fp32 cross-entropy
        assert eager.dtype == compiled.dtype == want.dtype == torch.float32
        torch.testing.assert_close(eager, compiled)
        torch.testing.assert_close(eager, want, rtol=2e-2, atol=2e-2)   # fp32 logits here, bf16 there
        eager.backward()
        assert lin.weight.grad.dtype == h.grad.dtype == torch.float32
        # a stored weight under autocast is stored apart from its fp32 self, and both calls work
        with torch.autocast("cpu", dtype=torch.bfloat16):
            stored = c.linear_cross_entropy(h, lin.weight, y, lin.bias)
        plain = c.linear_cross_entropy(h, lin.weight, y, lin.bias)
        torch.testing.assert_close(stored, eager)
        torch.testing.assert_close(plain, F.cross_entropy(lin(h), y), rtol=1e-5, atol=1e-5)


def test_autocast_eager_and_compiled_loss_path_agree(server):
    """The loss path's eager call follows torch's fp32 policy as its operator does under compile:
    bf16 logits under autocast give a float32 loss either way, and a bf16 gradient."""
    torch.manual_seed(1)
    x = torch.randn(40, 57).bfloat16().requires_grad_()
    t = torch.randint(0, 57, (40,))
    with clce_client.Client(server.url) as c:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            eager = c.cross_entropy(x, t)
            compiled = torch.compile(lambda x, t: c.cross_entropy(x, t), backend="aot_eager", fullgraph=True)(x, t)
            want = F.cross_entropy(x, t)
        assert eager.dtype == compiled.dtype == want.dtype == torch.float32
        torch.testing.assert_close(eager, want)
        torch.testing.assert_close(compiled, want)
        eager.backward()
        assert x.grad.dtype == torch.bfloat16
        x2 = x.detach().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            F.cross_entropy(x2, t).backward()
        torch.testing.assert_close(x.grad, x2.grad)
