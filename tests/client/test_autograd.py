"""The autograd call (``loss = loss_fn(logits, target); loss.backward()``) on a real server, on
every transport and through every entry point: the values of torch's F.cross_entropy for any
grad_output, and the server's gradient buffer made the input's gradient without a copy
(`clce_client.torch_support.input_grad`), but never when something else still reads it
(retain_graph, a gradient the caller asked for too, torch.autograd.grad's earlier results)."""

from __future__ import annotations

import gc

import pytest
from tests.support.serverproc import server_fixture  # noqa: E402

import clce_client  # noqa: E402
from clce_client import pipeline as pipeline_mod  # noqa: E402

torch = pytest.importorskip("torch")
F = torch.nn.functional
from clce_client import ops  # noqa: E402
import clce_client.transformers as clce_hf  # noqa: E402

N, V = 128, 1000            # 512 KB of fp32 logits: by reference over shared memory (>= 64 KiB)
server = server_fixture()

TRANSPORTS = ("shm", "tcp", "tcp-pipelined")
ENTRIES = ("clce_client.cross_entropy", "Client.cross_entropy", "CrossEntropyLoss", "ops.cross_entropy",
           "transformers.loss_function", "transformers.causal_lm_loss")
CAUSAL = ("transformers.loss_function", "transformers.causal_lm_loss")
# the causal LM losses have their own reduction: a mean, or (Trainer, num_items_in_batch) a sum
# divided by the batch's token count
CASES = [(e, r) for e in ENTRIES for r in ("mean", "sum", "none") if e not in CAUSAL or r == "mean"]


@pytest.fixture(scope="module", params=TRANSPORTS)
def client(request, server):
    kind = request.param
    if kind == "tcp-pipelined":
        # row chunks of 64 KiB on 4 connections: this batch goes as 8 requests
        c = clce_client.Client(server.url, transport="tcp", pipeline_bytes=64 << 10)
    else:
        c = clce_client.Client(server.url, transport=kind, pipeline_bytes=0)
    c.kind = kind
    with c:
        yield c


@pytest.fixture(autouse=True)
def pipelined_small_batches(monkeypatch):
    # the pipelined client splits batches this small too (the default floor is 32 MiB)
    monkeypatch.setattr(pipeline_mod, "MIN_BYTES", 0)


def loss_of(entry, client, reduction="mean", label_smoothing=0.0, weight=None):
    """The entry point as a function of (logits, target); the transformers one takes (B, T, V)
    logits and (B, T) labels, and its loss is F.cross_entropy of the shifted pair."""
    kw = dict(reduction=reduction, label_smoothing=label_smoothing, weight=weight)
    if entry == "clce_client.cross_entropy":
        def fn(x, t):
            old, clce_client.client._default = clce_client.client._default, client
            try:
                return clce_client.cross_entropy(x, t, **kw)
            finally:
                clce_client.client._default = old
        return fn
    if entry == "Client.cross_entropy":
        return lambda x, t: client.cross_entropy(x, t, **kw)
    if entry == "CrossEntropyLoss":
        return clce_client.CrossEntropyLoss(client=client, **kw)
    if entry == "ops.cross_entropy":
        return lambda x, t: ops.cross_entropy(x, t, client=client, **kw)
    assert entry in CAUSAL and reduction == "mean" and weight is None
    if entry == "transformers.loss_function":
        return lambda x, t: clce_hf.loss_function(x, t, client=client)
    return lambda x, t: clce_hf.causal_lm_loss({"logits": x}, t, num_items_in_batch=items(t), client=client)


def items(labels):
    """The Trainer's num_items_in_batch: the labels scored (a tensor, as the Trainer passes it)."""
    return (labels[:, 1:] != -100).sum()


def torch_loss(entry, x, t, reduction="mean", label_smoothing=0.0, weight=None):
    if entry == "transformers.loss_function":
        return F.cross_entropy(x[:, :-1].reshape(-1, V), t[:, 1:].reshape(-1))
    if entry == "transformers.causal_lm_loss":
        return F.cross_entropy(x[:, :-1].reshape(-1, V), t[:, 1:].reshape(-1), reduction="sum") / items(t)
    return F.cross_entropy(x, t, weight=weight, reduction=reduction, label_smoothing=label_smoothing)


def batch(entry, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    shape = (2, N // 2 + 1, V) if entry in CAUSAL else (N, V)
    x = (torch.randn(shape, generator=g) * 2).to(dtype)
    t = torch.randint(0, V, shape[:-1], generator=g)
    t.view(-1)[::7] = -100
    return x, t


def biggest_allocation(fn) -> int:
    """The largest CPU allocation torch made while `fn` ran (bytes), from the profiler."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    return max((e.cpu_memory_usage for e in prof.events()), default=0)


@pytest.mark.parametrize("entry,reduction", CASES)
def test_backward_equals_torch_for_any_grad_output(client, entry, reduction):
    x, t = batch(entry)
    w = torch.rand(V, generator=torch.Generator().manual_seed(3)) + 0.5
    weight = None if entry in CAUSAL else w
    smoothing = 0.0 if entry in CAUSAL else 0.1
    xc, xr = x.clone().requires_grad_(), x.clone().requires_grad_()
    got = loss_of(entry, client, reduction, smoothing, weight)(xc, t)
    ref = torch_loss(entry, xr, t, reduction, smoothing, weight)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)
    # grad_output != 1: a scalar for mean/sum, random per row for 'none'
    go = (torch.rand(ref.shape, generator=torch.Generator().manual_seed(4)) + 0.5 if reduction == "none"
          else torch.tensor(-2.5))
    got.backward(go)
    ref.backward(go)
    torch.testing.assert_close(xc.grad, xr.grad, rtol=1e-5, atol=1e-7)
    # and once more, grad_output 1: AccumulateGrad adds into the .grad the first call left
    got = loss_of(entry, client, reduction, smoothing, weight)(xc, t)
    ref = torch_loss(entry, xr, t, reduction, smoothing, weight)
    (got.sum() if reduction == "none" else got).backward()
    (ref.sum() if reduction == "none" else ref).backward()
    torch.testing.assert_close(xc.grad, xr.grad, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("entry", ENTRIES)
@pytest.mark.parametrize("scale", [1.0, 3.0])
def test_backward_makes_no_gradient_sized_allocation(client, entry, scale):
    """The old backward multiplied the server's gradient into a new tensor (as big as the logits);
    now the buffer the gradient arrived in becomes x.grad."""
    x, t = batch(entry, seed=1)
    x.requires_grad_()
    loss = loss_of(entry, client)(x, t) * scale
    biggest = biggest_allocation(loss.backward)
    assert biggest < x.nbytes // 4, f"backward allocated {biggest} bytes for a {x.nbytes}-byte gradient"
    xr = x.detach().clone().requires_grad_()
    (torch_loss(entry, xr, t) * scale).backward()
    torch.testing.assert_close(x.grad, xr.grad, rtol=1e-5, atol=1e-7)
    if client.kind == "shm":      # and that buffer is the one the server wrote, in shared memory
        assert client._arena.locate(x.grad.data_ptr(), x.grad.nbytes) is not None


def test_bfloat16_gradient_is_scaled_in_place(client):
    x, t = batch("Client.cross_entropy", seed=2, dtype=torch.bfloat16)
    x.requires_grad_()
    loss = client.cross_entropy(x, t) * 4
    assert biggest_allocation(loss.backward) < x.nbytes // 4
    xr = x.detach().float().requires_grad_()
    (F.cross_entropy(xr, t) * 4).backward()
    assert x.grad.dtype == torch.bfloat16
    torch.testing.assert_close(x.grad.float(), xr.grad, rtol=2e-2, atol=1e-5)


def test_retain_graph_reads_the_servers_gradient_again(client):
    """retain_graph: every backward sees the server's gradient as it came (no in-place scaling of
    the saved buffer); the last one, without retain_graph, frees it, and one more is torch's error."""
    x, t = batch("Client.cross_entropy", seed=5)
    x.requires_grad_()
    xr = x.detach().clone().requires_grad_()
    loss, ref = client.cross_entropy(x, t) * 2, F.cross_entropy(xr, t) * 2
    first = torch.autograd.grad(loss, x, retain_graph=True)[0]
    kept = first.clone()
    loss.backward(retain_graph=True)
    loss.backward(torch.tensor(3.0))           # the graph's last backward: may scale in place
    want = torch.autograd.grad(ref, xr)[0]
    torch.testing.assert_close(first, want, rtol=1e-5, atol=1e-7)
    assert torch.equal(first, kept), "a later backward wrote into a gradient autograd had already returned"
    torch.testing.assert_close(x.grad, 4 * want, rtol=1e-5, atol=1e-7)
    with pytest.raises(RuntimeError, match="backward through the graph a second time"):
        loss.backward()


def test_saved_gradient_is_freed_by_backward(client):
    """After backward the graph holds no gradient: only x.grad does (over shared memory, its region
    goes back to the arena once x.grad is dropped, while the loss and its graph still live)."""
    x, t = batch("Client.cross_entropy", seed=6)
    x.requires_grad_()
    loss = client.cross_entropy(x, t)
    loss.backward()
    with pytest.raises(RuntimeError, match="second time"):
        loss.grad_fn.saved_tensors
    if client.kind == "shm":
        assert client._arena.locate(x.grad.data_ptr(), x.grad.nbytes) is not None
        live = client._arena.stats["live"]
        x.grad = None
        gc.collect()
        assert client._arena.stats["live"] == live - 1
    assert loss.grad_fn is not None


def test_a_gradient_the_caller_asked_for_is_left_alone(client):
    x, t = batch("Client.cross_entropy", seed=7)
    x.requires_grad_()
    res = client.cross_entropy(x, t, return_grad=True)
    held = res.grad.clone()
    (res.loss * 5).backward()
    assert torch.equal(res.grad, held)
    assert x.grad.data_ptr() != res.grad.data_ptr()
    torch.testing.assert_close(x.grad, 5 * held, rtol=1e-6, atol=0)


def test_the_ops_gradient_output_a_caller_holds_is_left_alone(client):
    x, t = batch("ops.cross_entropy", seed=8)
    x.requires_grad_()
    loss, grad = torch.ops.clce.cross_entropy(x, t, None, -100, "mean", 0.0, 0, False, ops.client_key(client), True)
    held = grad.clone()
    (loss * 5).backward()
    assert torch.equal(grad, held)
    torch.testing.assert_close(x.grad, 5 * held, rtol=1e-6, atol=0)


def test_inplace_gradient_is_the_logits_memory(server):
    """inplace_grad=True over logits born in shared memory: x.grad is x's own memory (as
    Liger-Kernel's). A second such call while that .grad is held would have written over it: an
    error, not a doubled gradient."""
    with clce_client.Client(server.url, transport="shm") as c:
        x0, t = batch("Client.cross_entropy", seed=9)
        x = c.empty(x0.shape, torch.float32)
        x.copy_(x0)
        x.requires_grad_()
        xr = x0.clone().requires_grad_()
        (c.cross_entropy(x, t, inplace_grad=True) * 2).backward()
        (F.cross_entropy(xr, t) * 2).backward()
        assert x.grad.data_ptr() == x.data_ptr()
        torch.testing.assert_close(x.grad, xr.grad, rtol=1e-5, atol=1e-7)
        with pytest.raises(RuntimeError, match="set input.grad = None"):
            c.cross_entropy(x, t, inplace_grad=True)
