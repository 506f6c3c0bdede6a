"""Causal-LM layout on the real app over real HTTP (in this process, tests/support/inprocess.py):
(B, T, V) logits and (B, T) labels sent as they are, with the shift done by the server (`shift=`) or none (`classes_last=True`). Everything is compared with the
manual reference a user writes today: ``logits[..., :-1, :].contiguous().view(-1, V)`` against
``labels[..., 1:].reshape(-1)`` through torch.nn.functional.cross_entropy, loss and gradient."""

from __future__ import annotations

import numpy as np
import pytest

import clce_client
from tests.support.inprocess import inprocess_fixture

torch = pytest.importorskip("torch")
F = torch.nn.functional

B, T, V = 3, 9, 37
server = inprocess_fixture()


@pytest.fixture(scope="module")
def client(server):
    with clce_client.Client(server.url) as c:
        yield c


def data(seed=0, ignore_index=-100, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(B, T, V, generator=g) * 2).to(dtype)
    y = torch.randint(0, V, (B, T), generator=g)
    y[torch.rand(B, T, generator=g) < 0.25] = ignore_index   # padding / masked prompt tokens
    y[0, 0] = 3            # position 0 is dropped by the shift: it must not count...
    y[1, 0] = ignore_index
    return x, y


def reference(x, y, shift, **kw):
    """The manual shift: copy, flatten, F.cross_entropy. 'none' comes back as (B, T - shift)."""
    xs = x[..., : T - shift, :].contiguous().view(-1, V)
    out = F.cross_entropy(xs, y[..., shift:].reshape(-1), **kw)
    return out.view(B, T - shift) if kw.get("reduction") == "none" else out


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("ignore_index", [-100, 5])
@pytest.mark.parametrize("label_smoothing", [0.0, 0.2])
@pytest.mark.parametrize("shift", [1, 2])
def test_shift_matches_manual_shift(client, reduction, weighted, ignore_index, label_smoothing, shift):
    x, y = data(seed=shift, ignore_index=ignore_index)
    w = torch.rand(V, generator=torch.Generator().manual_seed(7)) + 0.5 if weighted else None
    kw = dict(weight=w, ignore_index=ignore_index, reduction=reduction, label_smoothing=label_smoothing)

    xr = x.clone().requires_grad_()
    ref = reference(xr, y, shift, **kw)
    xc = x.clone().requires_grad_()
    got = client.cross_entropy(xc, y, shift=shift, **kw)
    assert got.shape == ref.shape and got.dtype == ref.dtype
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)

    # backward with a non-trivial grad_output: for 'none' it has the (B, T - shift) loss shape
    go = torch.rand(ref.shape, generator=torch.Generator().manual_seed(1)) + 0.5
    ref.backward(go)
    got.backward(go)
    assert xc.grad.shape == (B, T, V)
    torch.testing.assert_close(xc.grad, xr.grad, rtol=1e-5, atol=1e-7)
    # the dropped positions get exactly zero gradient rows
    assert torch.count_nonzero(xc.grad[:, T - shift:, :]) == 0


def test_shift_gradient_is_the_servers_for_grad_output_one(client):
    """return_grad without autograd: the raw (B, T, V) gradient, zero rows where dropped."""
    x, y = data(seed=3)
    res = client.cross_entropy(x.numpy(), y.numpy(), shift=1, return_grad=True)
    xr = x.clone().requires_grad_()
    reference(xr, y, 1).backward()
    assert res.grad.shape == (B, T, V)
    np.testing.assert_allclose(res.grad, xr.grad.numpy(), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(res.loss, reference(x, y, 1).numpy(), rtol=1e-6)


def test_classes_last_without_shift(client):
    """classes_last=True alone: (B, T, V) against (B, T), the same as F.cross_entropy on the
    transposed (B, V, T) input, and 'none' has the target's shape."""
    x, y = data(seed=4)
    for reduction in ("mean", "none"):
        xc = x.clone().requires_grad_()
        got = client.cross_entropy(xc, y, reduction=reduction, classes_last=True)
        xr = x.clone().requires_grad_()
        ref = F.cross_entropy(xr.transpose(1, 2), y, reduction=reduction)
        assert got.shape == ref.shape
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)
        go = torch.rand(ref.shape) + 0.5
        got.backward(go)
        ref.backward(go)
        torch.testing.assert_close(xc.grad, xr.grad, rtol=1e-5, atol=1e-7)


def test_classes_last_probabilities(client):
    x, _ = data(seed=5)
    p = torch.softmax(torch.randn(B, T, V), -1)
    got = client.cross_entropy(x, p, classes_last=True, reduction="none", label_smoothing=0.1)
    ref = F.cross_entropy(x.transpose(1, 2), p.transpose(1, 2), reduction="none", label_smoothing=0.1)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)


def test_shift_per_row_extras_have_the_shifted_shape(client):
    x, y = data(seed=6)
    res = client.cross_entropy(x, y, shift=1, reduction="none", return_lse=True, return_argmax=True,
                               lse_square_scale=1e-2)
    xs = x[:, :-1]
    lse = torch.logsumexp(xs, -1)
    torch.testing.assert_close(res.lse, lse, rtol=1e-5, atol=1e-5)
    assert torch.equal(res.argmax, xs.argmax(-1))
    kept = y[:, 1:] != -100
    acc = (xs.argmax(-1) == y[:, 1:])[kept].float().mean().item()
    assert res.accuracy == pytest.approx(acc)
    ref = F.cross_entropy(xs.reshape(-1, V), y[:, 1:].reshape(-1), reduction="none").view(B, T - 1)
    torch.testing.assert_close(res.loss, ref + 1e-2 * lse ** 2 * kept, rtol=1e-5, atol=1e-5)


def test_shift_bfloat16(client):
    x, y = data(seed=8, dtype=torch.bfloat16)
    got = client.cross_entropy(x, y, shift=1)
    ref = reference(x.float(), y, 1)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), ref, rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("kwargs, shape, exc, match", [
    (dict(shift=T), None, ValueError, "smaller than the sequence length T = 9"),
    (dict(shift=-1), None, ValueError, "shift must be >= 0"),
    (dict(shift=1), (B, T - 1), ValueError, r"needs target \[3, 9\], got target \[3, 8\]"),
    (dict(classes_last=True), (B * T,), ValueError, r"input \[3, 9, 37\] needs target \[3, 9\]"),
])
def test_layout_errors_are_pytorch_style(client, kwargs, shape, exc, match):
    x, y = data()
    if shape is not None:
        y = y.reshape(-1)[: int(np.prod(shape))].reshape(shape)
    with pytest.raises(exc, match=match):
        client.cross_entropy(x, y, **kwargs)


def test_shift_with_probabilities_is_refused(client):
    x, _ = data()
    with pytest.raises(ValueError, match="shift needs class-index targets"):
        client.cross_entropy(x, torch.softmax(x, -1), shift=1)


def test_shift_of_a_single_sequence(client):
    """(T, V) logits and (T,) labels: one unbatched sequence."""
    x, y = data(seed=9)
    got = client.cross_entropy(x[0], y[0], shift=1, reduction="sum")
    ref = F.cross_entropy(x[0, :-1], y[0, 1:], reduction="sum")
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


def test_shift_in_the_json_form(server):
    """curl users get the layout too: the JSON form takes the same fields."""
    import httpx

    x, y = data(seed=10)
    body = {"input": {"dtype": "float32", "data": x.reshape(-1).tolist(), "shape": [B, T, V]},
            "target": y.tolist(), "shift": 1, "reduction": "none", "return_grad": True}
    r = httpx.post(server.url + "/v1/cross_entropy", json=body, timeout=30)
    assert r.status_code == 200, r.text
    out = r.json()
    ref = reference(x, y, 1, reduction="none")
    torch.testing.assert_close(torch.tensor(out["loss"]), ref, rtol=1e-5, atol=1e-5)
    grad = torch.tensor(out["grad"])
    assert grad.shape == (B, T, V) and torch.count_nonzero(grad[:, -1]) == 0
