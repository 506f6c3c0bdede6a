"""accumulate=True across server restarts: no step is ever taken on a partial gradient.

A small model's LM head accumulates on the server over 4 micro-batches per optimizer step
(`client.weights.attach(optimizer)` flushes before each step). In the middle of step 1, between
micro-batches 2 and 3, the server process is killed (SIGKILL) or drained (SIGTERM) and a new one is
started on the same port: the first two micro-batches' accumulated gradient is gone with it.
The client's flush sees that the server's accumulation (its instance, its count) holds 2 of the 4
micro-batches, replays the 2 it lost from the inputs it kept, and takes them again: every step,
that one included, equals local torch's, over shared memory and over TCP. With replay off the
flush raises AccumulationLost before the optimizer step, and the parameters stay as they were.
"""

from __future__ import annotations

import signal

import pytest
from tests.support.serverproc import ServerProcess  # noqa: E402

import clce_client  # noqa: E402

torch = pytest.importorskip("torch")
from tests.support.linear_training import Loop, compare, data, local_steps, make_model, params, train  # noqa: E402

LOOP = Loop(3, 4, 256, 24, 48, 1024, 9)   # steps, micro-batches per step, rows, features, hidden, vocabulary
STEPS, K = LOOP.steps, LOOP.k
RESTART = (1, 2)                 # (step, micro-batch): the server is replaced before this one


@pytest.fixture(scope="module")
def local():
    return local_steps(LOOP)


def restart(srv: ServerProcess, sig: signal.Signals) -> ServerProcess:
    """The server replaced: signalled, exited, and a new process ready on its port."""
    srv.proc.send_signal(sig)
    code = srv.proc.wait(60)
    assert code == (0 if sig == signal.SIGTERM else -signal.SIGKILL)
    srv.cleanup()
    return ServerProcess(port=srv.port).start()


def run(client, srv, sig, replay: bool, local):
    """Train with the head accumulating on the server, replacing it at RESTART; returns the
    server still running, the worst difference per step, and the flush errors (step, message)."""
    running = [srv]

    def replace():
        running[0] = restart(running[0], sig)

    worst, refused = train(client, local, replace, replay=replay, loop=LOOP, at=RESTART)
    return running[0], worst, refused


TRANSPORTS = {"shm": dict(transport="shm"), "tcp": dict(transport="tcp")}


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM], ids=["SIGKILL", "SIGTERM"])
@pytest.mark.parametrize("transport", list(TRANSPORTS))
def test_a_restart_between_micro_batches_is_replayed_and_every_step_equals_torch(transport, sig, local):
    srv = ServerProcess().start()
    try:
        with clce_client.Client(srv.url, retry_budget_s=60, **TRANSPORTS[transport]) as client:
            srv, worst, refused = run(client, srv, sig, replay=True, local=local)
            weights = client.weights
            assert refused == []
            assert weights.replayed == 2            # micro-batches 0 and 1 of step 1, and nothing else
            # one upload per version, plus the one the restart cost
            assert weights.uploads == STEPS + 1
            if transport == "shm":
                assert client._arena is not None and client._arena.generation == 1   # moved once
        print(f"{transport} {sig.name}: worst difference per step {worst}")
    finally:
        srv.cleanup()


def test_with_replay_off_the_flush_refuses_the_step_and_a_rerun_equals_torch(local):
    srv = ServerProcess().start()
    try:
        with clce_client.Client(srv.url, retry_budget_s=60, transport="tcp") as client:
            srv, worst, refused = run(client, srv, signal.SIGKILL, replay=False, local=local)
            assert [s for s, _ in refused] == [1]
            msg = refused[0][1]
            assert "missing 2 of the 4 micro-batches" in msg and "replay is off" in msg, msg
            assert client.weights.replayed == 0
            assert len(worst) == STEPS
    finally:
        srv.cleanup()


def test_an_async_client_replays_across_a_restart_too(local):
    """The same loop on an AsyncClient (its flush is awaited before the step), SIGKILL over TCP."""
    import asyncio

    srv = ServerProcess().start()
    loop = asyncio.new_event_loop()
    client = clce_client.AsyncClient(srv.url, retry_budget_s=60, transport="tcp")
    try:
        body, head = make_model(LOOP)
        opt = torch.optim.SGD([*body.parameters(), *head.parameters()], lr=0.5, momentum=0.9)
        weights = client.weights
        batches = data(loop=LOOP)
        for step in range(STEPS):
            for mb in range(K):
                if (step, mb) == RESTART:
                    srv = restart(srv, signal.SIGKILL)
                x, y = batches[step * K + mb]
                loss = loop.run_until_complete(client.linear_cross_entropy(
                    body(x), head.weight, y, head.bias, weight_name="head", accumulate=True))
                (loss / K).backward()
            loop.run_until_complete(weights.flush())
            opt.step()
            opt.zero_grad()
            compare(step, params(body, head), local[step])
        assert weights.replayed == 2
    finally:
        loop.run_until_complete(client.aclose())
        loop.close()
        srv.cleanup()
