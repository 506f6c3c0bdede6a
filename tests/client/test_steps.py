"""One client core: every call (the loss, the fused linear cross-entropy, `empty`, the flush of an
accumulated weight gradient) is a flow of typed steps (clce_client/flows.py) under one loop that
owns the arena's renewal and the retry deadline; `Client` and `AsyncClient` run them with the same
code but for `await`; the client owns its weights (`client.weights`) and nothing sets state on a
client from outside. Against a real server, results checked against torch."""

from __future__ import annotations

import asyncio
import inspect
import re
import signal
import weakref

import numpy as np
import pytest

import clce_client
from clce_client import flows
from clce_client.client import AsyncClient, Client
from clce_client.linear import LinearWeights
from tests.support.serverproc import ServerProcess, server_fixture

torch = pytest.importorskip("torch")
F = torch.nn.functional

server = server_fixture()


class RecordingClient(Client):
    """A Client that notes the type of every step its flows ask for (then does it, unchanged), by
    the flow's name (an `info()` asked for on the way is a flow of its own)."""

    def _run(self, flow):
        steps = self.calls.setdefault(flow.__name__, [])

        def noted(flow):
            result, error = None, None
            while not isinstance(step := flows.resume(flow, result, error), flows.Done):
                steps.append(type(step))
                result, error = None, None
                try:
                    result = yield step
                except Exception as exc:   # the step's error, for the flow to decide
                    error = exc
            return step.value

        return super()._run(noted(flow))


@pytest.mark.parametrize("transport", ["tcp", "shm"])
def test_every_call_is_a_flow_of_typed_steps_asking_first_for_its_arena(server, transport):
    kw = dict(transport="tcp") if transport == "tcp" else dict(transport="shm", shm_min_bytes=0)
    torch.manual_seed(0)
    x, y = torch.randn(64, 300, requires_grad=True), torch.randint(0, 300, (64,))
    head = torch.nn.Linear(16, 50, bias=False)
    h, t = torch.randn(24, 16), torch.randint(0, 50, (24,))
    with RecordingClient(server.url, **kw) as client:
        client.calls = {}
        loss = client.cross_entropy(x, y, label_smoothing=0.1)
        buf = client.empty((8, 4))
        lin = client.linear_cross_entropy(h, head.weight, t, weight_name="head", accumulate=True)
        lin.backward()
        client.weights.flush()
        check_against_torch(x, y, loss, head, h, t, lin)
    kinds = {"loss": client.calls["_cross_entropy_flow"], "empty": client.calls["_empty_flow"],
             "linear": client.calls["finished"], "flush": client.calls["_flush_flow"]}
    for name, steps in kinds.items():
        assert steps and steps[0] is flows.Arena, (name, steps)
        assert all(issubclass(s, flows.Step) for s in steps), (name, steps)
    assert flows.Send in kinds["loss"] and flows.Send in kinds["linear"] and flows.Send in kinds["flush"]
    if transport == "shm":   # shared memory: the region is made (registered) off the caller's path
        assert flows.Blocking in kinds["empty"] and flows.Blocking in kinds["loss"]
    else:
        assert kinds["empty"] == [flows.Arena]      # an ordinary array: nothing sent
    assert tuple(buf.shape) == (8, 4)


def check_against_torch(x, y, loss, head, h, t, lin):
    ref_x = x.detach().clone().requires_grad_(True)
    ref = F.cross_entropy(ref_x, y, label_smoothing=0.1)
    torch.testing.assert_close(loss, ref)
    loss.backward()
    ref.backward()
    torch.testing.assert_close(x.grad, ref_x.grad)
    W = head.weight.detach().clone().requires_grad_(True)
    ref = F.cross_entropy(F.linear(h, W), t)
    ref.backward()
    torch.testing.assert_close(lin, ref)
    torch.testing.assert_close(head.weight.grad, W.grad)    # brought back by the flush


def _normalised(fn) -> str:
    """A driver method's source with what only asyncio needs taken out."""
    src = inspect.getsource(fn)
    src = re.sub(r"\basync (def|with|for)\b", r"\1", src)
    src = re.sub(r"\bawait ", "", src)
    src = src.replace("asyncio.sleep", "time.sleep").replace("aiter_", "iter_")
    src = "\n".join(ln for ln in src.splitlines() if not ln.strip().startswith('"""'))   # a one-line docstring
    return re.sub(r"\s+", " ", src)


def test_the_sync_and_async_drivers_differ_only_by_await():
    for name in ("_run", "_shm_ready", "_renew_arena", "_once", "_request", "_probe"):
        sync, asyn = getattr(Client, name), getattr(AsyncClient, name)
        assert inspect.iscoroutinefunction(asyn) and not inspect.iscoroutinefunction(sync), name
        assert _normalised(sync) == _normalised(asyn), name
    # every step names one method, which both clients have (a plain one, and a coroutine)
    for step in flows.Step.__subclasses__():
        method = re.search(r"client\.(_\w+)\(", inspect.getsource(step.on)).group(1)
        assert inspect.iscoroutinefunction(getattr(AsyncClient, method)), (step, method)
        assert not inspect.iscoroutinefunction(getattr(Client, method)), (step, method)
    # the API and the flows are the base's, once
    for name in ("cross_entropy", "linear_cross_entropy", "empty", "info", "_cross_entropy_flow", "_empty_flow"):
        assert name not in vars(Client) and name not in vars(AsyncClient), name


def test_async_client_runs_the_same_flows(server):
    torch.manual_seed(1)
    head = torch.nn.Linear(16, 50, bias=False)
    h, t = torch.randn(24, 16), torch.randint(0, 50, (24,))
    x, y = np.random.default_rng(0).standard_normal((32, 100)).astype(np.float32), np.arange(32) % 100

    async def main():
        async with AsyncClient(server.url, transport="shm", shm_min_bytes=0) as client:
            info = await client.info()
            loss = await client.cross_entropy(x, y)
            lin = await client.linear_cross_entropy(h, head.weight, t, accumulate=True)
            lin.backward()
            await client.weights.flush()
            return info, loss, lin

    info, loss, lin = asyncio.run(main())
    assert isinstance(info.get("instance_id"), str)
    np.testing.assert_allclose(loss, F.cross_entropy(torch.from_numpy(x), torch.from_numpy(y)).item(), rtol=1e-6)
    W = head.weight.detach().clone().requires_grad_(True)
    ref = F.cross_entropy(F.linear(h, W), t)
    ref.backward()
    torch.testing.assert_close(lin, ref)
    torch.testing.assert_close(head.weight.grad, W.grad)


def test_the_client_owns_its_weights_and_nothing_sets_state_on_it(server):
    from clce_client import ops

    torch.manual_seed(2)
    head = torch.nn.Linear(16, 50)
    h, t = torch.randn(24, 16), torch.randint(0, 50, (24,))
    client = Client(server.url)
    assert isinstance(client.weights, LinearWeights) and client.weights.client is client
    before = set(vars(client))
    loss = ops.linear_cross_entropy(h, head.weight, t, head.bias, client=client)
    loss = loss + ops.cross_entropy(torch.randn(4, 7), torch.arange(4), client=client)
    loss = loss + clce_client.LinearCrossEntropyLoss(client=client)(head.weight, h, t, head.bias)
    loss = loss + clce_client.linear_cross_entropy(h, head.weight, t, head.bias, client=client, accumulate=True)
    loss.backward()
    client.weights.flush()
    assert ops.client_key(client) == ops.client_key(client) != ops.client_key(None)
    assert set(vars(client)) == before        # no attribute was set on the client from outside
    # the weights hold their client weakly: a client nobody holds is freed (and its key is gone)
    client.close()
    gone, weights = weakref.ref(client), client.weights
    del client
    assert gone() is None
    with pytest.raises(RuntimeError, match="client is gone"):
        weights.flush()


def test_empty_and_the_loss_renew_their_arena_after_a_restart():
    """SIGKILL the server: the next `empty` registers the arena with the new process (the one loop
    of flows.renewing, through the Arena step), and the loss over that memory equals torch's."""
    servers = [ServerProcess().start()]
    try:
        with Client(servers[0].url, transport="shm", shm_min_bytes=0, retry_budget_s=60) as client:
            first = client.empty((16, 40), torch.float32)
            old = client._arena.instance_id
            servers[0].proc.send_signal(signal.SIGKILL)
            servers[0].proc.wait(10)
            servers.append(ServerProcess(port=servers[0].port).start())
            x = client.empty((16, 40), torch.float32)
            assert client._arena is not None and client._arena.instance_id != old
            x.copy_(torch.randn(16, 40))
            y = torch.randint(0, 40, (16,))
            got = client.cross_entropy(x, y, reduction="sum")
            torch.testing.assert_close(got, F.cross_entropy(x, y, reduction="sum"))
            assert first.shape == x.shape
    finally:
        for s in servers:
            s.stop()
