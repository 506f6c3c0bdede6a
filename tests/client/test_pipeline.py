"""Pipelined TCP: a big batch sent as row chunks on several connections equals one request bit
for bit, for every reduction, weight, ignore_index, label smoothing and extra; small batches stay
one request."""

from __future__ import annotations

import numpy as np
import pytest

from clce_client import AsyncClient, Client
from clce_client import pipeline as pipeline_mod
from clce_wire.reduction import mean_normaliser
from tests.support.serverproc import server_fixture

torch = pytest.importorskip("torch")

server = server_fixture()

N, C = 1000, 2000           # 8 MB of logits; 256 KiB chunks of 64-row blocks
CHUNK = 256 << 10

CASES = [
    dict(), dict(reduction="sum"), dict(reduction="none"),
    dict(ignore=True), dict(weighted=True), dict(weighted=True, ignore=True, label_smoothing=0.1),
    dict(reduction="sum", weighted=True, label_smoothing=0.3),
    dict(return_lse=True, return_argmax=True), dict(lse_square_scale=1e-3, return_argmax=True),
    dict(reduction="none", lse_square_scale=1e-3, return_argmax=True, return_lse=True),
    dict(soft=True), dict(soft=True, label_smoothing=0.2, weighted=True),
    dict(spatial=True), dict(spatial=True, reduction="none"),
    dict(dtype="bfloat16"), dict(dtype="float64", weighted=True), dict(grad_dtype="bfloat16"),
    dict(all_ignored=True),
]


def _problem(case, rng):
    case = dict(case)
    dtype = case.pop("dtype", "float32")
    if case.pop("spatial", False):
        x = rng.standard_normal((256, 50, 3, 5)).astype(np.float32)
        t = rng.integers(0, 50, (256, 3, 5))
        c = 50
    else:
        x = rng.standard_normal((N, C)).astype(np.float32)
        t = rng.integers(0, C, N)
        c = C
    if case.pop("ignore", False):
        t.reshape(-1)[::5] = -100
    if case.pop("all_ignored", False):
        t[...] = -100
    if case.pop("soft", False):
        t = rng.random(x.shape).astype(np.float32)
        t /= t.sum(1, keepdims=True)
    w = rng.random(c).astype(np.float32) + 0.25 if case.pop("weighted", False) else None
    tx = torch.tensor(x).to(getattr(torch, dtype))
    tw = None if w is None else torch.tensor(w).to(getattr(torch, dtype))
    tt = torch.tensor(t) if t.dtype.kind != "f" else torch.tensor(t).to(getattr(torch, dtype))
    return tx, tt, tw, case


def _equal(a, b):
    for key in ("loss", "grad", "lse", "argmax", "z_loss"):
        va, vb = getattr(a, key), getattr(b, key)
        assert (va is None) == (vb is None), key
        if va is not None:
            assert va.dtype == vb.dtype and va.shape == vb.shape, key
            assert va.reshape(-1).contiguous().view(torch.uint8).numpy().tobytes() == \
                vb.reshape(-1).contiguous().view(torch.uint8).numpy().tobytes(), key
    assert a.accuracy == b.accuracy or (np.isnan(a.accuracy) and np.isnan(b.accuracy))


@pytest.fixture
def chunked(monkeypatch):
    monkeypatch.setattr(pipeline_mod, "MIN_BYTES", 0)
    plans = []
    real = pipeline_mod.Pipeline.plan

    def spy(values, **kw):
        p = real(values, **kw)
        plans.append(p)
        return p

    monkeypatch.setattr(pipeline_mod.Pipeline, "plan", staticmethod(spy))
    return plans


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()) or "mean")
def test_pipelined_equals_one_request_bit_for_bit(server, chunked, case):
    x, t, w, opts = _problem(case, np.random.default_rng(11))
    with Client(server.url, transport="tcp", pipeline_bytes=CHUNK) as cp, \
            Client(server.url, transport="tcp", pipeline_bytes=0) as c1:
        a = cp.cross_entropy(x, t, w, return_grad=True, **opts)
        assert chunked[-1] is not None and len(chunked[-1].bounds) > 2      # really in chunks
        b = c1.cross_entropy(x, t, w, return_grad=True, **opts)
    _equal(a, b)


def test_pipelined_autograd_and_async(server, chunked):
    import asyncio

    x, t, _, _ = _problem({}, np.random.default_rng(2))
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    with Client(server.url, transport="tcp", pipeline_bytes=CHUNK) as cp:
        la = cp.cross_entropy(xa, t, label_smoothing=0.1)
        la.backward()
    assert chunked[-1] is not None
    ref = torch.nn.functional.cross_entropy(xb, t, label_smoothing=0.1)
    ref.backward()
    torch.testing.assert_close(la, ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(xa.grad, xb.grad, rtol=1e-4, atol=1e-7)

    async def main():
        async with AsyncClient(server.url, transport="tcp", pipeline_bytes=CHUNK) as c:
            return await c.cross_entropy(x, t, return_grad=True, label_smoothing=0.1)

    r = asyncio.run(main())
    assert torch.equal(r.grad, xa.grad) and torch.equal(r.loss, la.detach())


def test_small_batches_stay_one_request(server, chunked):
    monkey_min = pipeline_mod.MIN_BYTES
    assert monkey_min == 0
    with Client(server.url, transport="tcp", pipeline_bytes=CHUNK) as c:
        c.cross_entropy(np.zeros((64, 10), np.float32), np.zeros(64, np.int64))
    assert chunked[-1] is None


def test_argument_errors_are_pytorchs(server, chunked):
    x, t, _, _ = _problem({}, np.random.default_rng(2))
    t[700] = C + 5
    with Client(server.url, transport="tcp", pipeline_bytes=CHUNK) as c, \
            pytest.raises(IndexError, match=f"Target {C + 5} is out of bounds"):
        c.cross_entropy(x, t)


def test_normaliser_is_the_servers():
    rng = np.random.default_rng(0)
    t = rng.integers(0, 100, 5000)
    t[::3] = 7
    w = rng.random(100).astype(np.float32)
    d, n = mean_normaliser("float32", (5000, 100), t, w, 7)
    assert n == int((t != 7).sum())
    assert d == float(np.sum(w[t[t != 7]], dtype=np.float64))
