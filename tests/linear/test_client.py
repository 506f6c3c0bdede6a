"""The fused linear cross-entropy's client: the same call through Client and AsyncClient, over TCP
and over shared memory, against torch's F.cross_entropy(F.linear(h, W, b), y); the weight stored
once per version by default (a new tensor object is a new version even at a recycled address);
a parameter moved into shared memory read by the server where it lies; the accumulated gradient
flushed through an AsyncClient; a server restart in the middle of a shared-memory loop."""

import asyncio
import signal

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import clce_client
from clce_client.linear import share_weight
from tests.support.linear_reference import local, model
from tests.support.serverproc import ServerProcess, server_fixture

server = server_fixture()

TRANSPORTS = {"tcp": dict(transport="tcp"), "shm": dict(transport="shm", shm_min_bytes=0)}


def _close(a, b, dtype=torch.float32):
    tol = {} if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(a.float(), b.float(), **tol)


@pytest.mark.parametrize("transport", TRANSPORTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("opts", [dict(), dict(reduction="sum", label_smoothing=0.1, ignore_index=4)], ids=str)
def test_autograd_matches_torch(server, transport, dtype, opts):
    h, W, b, y = model(1, dtype=dtype)
    y[::5] = 4
    with clce_client.Client(server.url, **TRANSPORTS[transport]) as client:
        loss = client.linear_cross_entropy(h, W, y, b, **opts)
        (loss * 0.5).backward()
        if transport == "shm":
            assert client._arena is not None         # the call went through shared memory
    ref, h2, W2, b2 = local(h, W, y, b, **opts)
    (ref * 0.5).backward()
    assert loss.dtype == torch.float32 and h.grad.dtype == W.grad.dtype == b.grad.dtype == dtype
    _close(loss, ref, dtype)
    _close(h.grad, h2.grad, dtype)
    _close(W.grad, W2.grad, dtype)
    _close(b.grad, b2.grad, dtype)


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_async_client_matches_the_sync_one(server, transport):
    h, W, b, y = model(2)

    async def run():
        async with clce_client.AsyncClient(server.url, **TRANSPORTS[transport]) as client:
            loss = await client.linear_cross_entropy(h, W, y, b, shift=0, lse_square_scale=1e-3,
                                                     return_z_loss=True)
            arrays = await client.linear_cross_entropy(h.detach().numpy(), W.detach().numpy(), y.numpy(),
                                                       b.detach().numpy())
            return loss, arrays

    (loss, z), arrays = asyncio.run(run())
    loss.backward()
    h2, W2, b2 = (t.detach().clone().requires_grad_() for t in (h, W, b))
    logits = F.linear(h2, W2, b2)
    lse = torch.logsumexp(logits, -1)
    ref = F.cross_entropy(logits, y) + 1e-3 * (lse ** 2).mean()
    ref.backward()
    torch.testing.assert_close(loss, ref)
    torch.testing.assert_close(z, 1e-3 * (lse ** 2).mean().detach())
    torch.testing.assert_close(h.grad, h2.grad)
    torch.testing.assert_close(W.grad, W2.grad)
    plain, h3, W3, b3 = local(h, W, y, b)
    plain.backward()
    np.testing.assert_allclose(arrays["loss"], plain.item(), rtol=1e-5)
    np.testing.assert_allclose(arrays["grad_weight"], W3.grad.numpy(), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(arrays["grad_bias"], b3.grad.numpy(), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_weight_is_stored_once_per_version_by_default(server, transport):
    """k micro-batches send the weight once; an optimizer step makes a new version (uploaded once
    more); a new tensor object is a new version, even where it reuses the old one's memory."""
    torch.manual_seed(3)
    W = torch.nn.Parameter(torch.randn(200, 32) / 32 ** 0.5)
    W_ref = torch.nn.Parameter(W.detach().clone())
    opt, opt_ref = torch.optim.SGD([W], lr=0.5), torch.optim.SGD([W_ref], lr=0.5)
    with clce_client.Client(server.url, **TRANSPORTS[transport]) as client:
        weights = client.weights
        for step in range(2):
            for _ in range(3):
                h, y = torch.randn(64, 32), torch.randint(0, 200, (64,))
                (client.linear_cross_entropy(h, W, y) / 3).backward()
                (F.cross_entropy(F.linear(h, W_ref), y) / 3).backward()
            torch.testing.assert_close(W.grad, W_ref.grad)
            opt.step(), opt_ref.step()
            opt.zero_grad(), opt_ref.zero_grad()
        assert weights.uploads == 2                 # one per version, not one per micro-batch
        torch.testing.assert_close(W, W_ref)
        # the same storage under a new tensor object, with different values and _version 0
        for seed in range(3):
            fresh = torch.randn(200, 32, generator=torch.Generator().manual_seed(seed))
            h, y = torch.randn(64, 32), torch.randint(0, 200, (64,))
            torch.testing.assert_close(client.linear_cross_entropy(h, fresh, y), F.cross_entropy(F.linear(h, fresh), y))
            del fresh


def test_stateless_sends_the_weight_every_call(server):
    h, W, b, y = model(4)
    with clce_client.Client(server.url) as client:
        for _ in range(2):
            loss = client.linear_cross_entropy(h.detach(), W.detach(), y, b.detach(), stateless=True)
        assert client.weights.uploads == 0
    torch.testing.assert_close(loss, local(h, W, y, b)[0].detach())


def test_shared_weight_is_read_where_it_lies(server):
    """share_weight moves the parameter into a region once: its versions are stored on the server
    as references (no copy), and an optimizer step in place is seen by the next call."""
    torch.manual_seed(5)
    head = torch.nn.Linear(32, 180)
    ref_head = torch.nn.Linear(32, 180)
    ref_head.load_state_dict(head.state_dict())
    with clce_client.Client(server.url, transport="shm", shm_min_bytes=0) as client:
        assert share_weight(head.weight, client)
        arena = client._arena
        assert arena.locate(head.weight.data_ptr(), head.weight.numel() * 4) is not None
        opt = torch.optim.SGD(head.parameters(), lr=0.3)
        opt_ref = torch.optim.SGD(ref_head.parameters(), lr=0.3)
        weights = client.weights
        for _ in range(3):
            h, y = torch.randn(50, 32), torch.randint(0, 180, (50,))
            loss = client.linear_cross_entropy(h, head.weight, y, head.bias)
            loss.backward()
            ref = F.cross_entropy(ref_head(h), y)
            ref.backward()
            torch.testing.assert_close(loss, ref)
            # the stored version's weight is a reference to the parameter's own bytes: the upload
            # placed nothing (Placement found the weight where it lies)
            (_, placement) = next(iter(weights._stored.values()))
            region, offset = placement.refs["weight"]
            assert arena.locate(head.weight.data_ptr(), 4) == (region, offset)
            opt.step(), opt_ref.step()
            opt.zero_grad(), opt_ref.zero_grad()
        torch.testing.assert_close(head.weight, ref_head.weight)
        assert weights.uploads == 3


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_async_client_accumulates_and_flushes(server, transport):
    torch.manual_seed(6)
    W = torch.nn.Parameter(torch.randn(150, 24) / 5)
    W_ref = torch.nn.Parameter(W.detach().clone())
    batches = [(torch.randn(40, 24), torch.randint(0, 150, (40,))) for _ in range(4)]

    async def run():
        async with clce_client.AsyncClient(server.url, **TRANSPORTS[transport]) as client:
            weights = client.weights
            with pytest.raises(TypeError, match="await weights.flush"):
                weights.attach(torch.optim.SGD([W], lr=0.1))
            for h, y in batches:
                loss = await client.linear_cross_entropy(h, W, y, weight_name="head", accumulate=True)
                (loss / 4).backward()
                assert W.grad is None
            await weights.flush()

    asyncio.run(run())
    for h, y in batches:
        (F.cross_entropy(F.linear(h, W_ref), y) / 4).backward()
    torch.testing.assert_close(W.grad, W_ref.grad)


def test_restart_mid_loop_over_shared_memory():
    """SIGKILL the server between micro-batches: the client moves its arena to the new process,
    uploads the weight again (the new server has none) and the loop goes on, equal to torch."""
    torch.manual_seed(7)
    head = torch.nn.Linear(32, 120, bias=False)
    W_ref = head.weight.detach().clone()
    servers = [ServerProcess().start()]
    try:
        with clce_client.Client(servers[0].url, transport="shm", shm_min_bytes=0, retry_budget_s=60) as client:
            assert share_weight(head.weight, client)
            for step in range(4):
                if step == 2:
                    servers[0].proc.send_signal(signal.SIGKILL)
                    servers[0].proc.wait(10)
                    servers.append(ServerProcess(port=servers[0].port).start())
                h, y = torch.randn(30, 32), torch.randint(0, 120, (30,))
                loss = client.linear_cross_entropy(h, head.weight, y)
                torch.testing.assert_close(loss, F.cross_entropy(F.linear(h, W_ref), y))
            assert client.weights.uploads == 2    # before and after the restart
    finally:
        for srv in servers:
            srv.cleanup()


def test_compiled_readme_call_goes_through_the_operator(server):
    """torch.compile(fullgraph=True) over the README's call: one opaque operator, same numbers."""
    h, W, b, y = model(8)
    with clce_client.Client(server.url) as client:
        @torch.compile(backend="aot_eager", fullgraph=True)
        def step(h, W, b, y):
            return client.linear_cross_entropy(h, W, y, b, label_smoothing=0.05) * 2.0

        loss = step(h, W, b, y)
        loss.backward()
    ref, h2, W2, b2 = local(h, W, y, b, label_smoothing=0.05)
    (ref * 2.0).backward()
    torch.testing.assert_close(loss, ref * 2.0)
    torch.testing.assert_close(h.grad, h2.grad)
    torch.testing.assert_close(W.grad, W2.grad)
    torch.testing.assert_close(b.grad, b2.grad)


def test_fused_optimizer_step_is_a_new_version(server):
    """torch's fused AdamW updates in place without bumping tensor._version: the stored weight must
    still be uploaded again after the step (over TCP the server holds a copy)."""
    torch.manual_seed(9)
    W = torch.nn.Parameter(torch.randn(100, 16) / 4)
    W_ref = torch.nn.Parameter(W.detach().clone())
    opt = torch.optim.AdamW([W], lr=0.05, fused=True)
    opt_ref = torch.optim.AdamW([W_ref], lr=0.05, fused=True)
    with clce_client.Client(server.url, transport="tcp") as client:
        for _ in range(3):
            h, y = torch.randn(20, 16), torch.randint(0, 100, (20,))
            loss = client.linear_cross_entropy(h, W, y)
            loss.backward()
            ref = F.cross_entropy(F.linear(h, W_ref), y)
            ref.backward()
            torch.testing.assert_close(loss, ref)
            opt.step(), opt_ref.step()
            opt.zero_grad(), opt_ref.zero_grad()
        assert client.weights.uploads == 3
