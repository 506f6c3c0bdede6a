"""A server restart costs no training step, on every transport.

A training loop of 20 steps runs against a real server; in the middle of it the server process is
replaced, once after SIGTERM (it drains) and once after SIGKILL, by a new process on the same
port. The replacement happens in a thread while the loop goes on, so a step meets the old server
dying, no server at all, and the new one starting. Every step must complete, and the losses and
the final parameters must equal a local torch run: a result computed on memory the new server
did not have would show as a wrong loss or a wrong gradient. Over shared memory the client must
have moved its arena to each new instance (two moves); over TCP each instance must have served
steps. A rolling restart of two replicas behind one client loses nothing either.
"""

from __future__ import annotations

import asyncio
import signal
import threading

import httpx
import pytest
from tests.support.serverproc import ServerProcess  # noqa: E402

import clce_client  # noqa: E402
from clce_client import pipeline as pipeline_mod  # noqa: E402

torch = pytest.importorskip("torch")
F = torch.nn.functional

STEPS = 20
N, D, V = 256, 48, 1024          # 1 MiB of fp32 logits: "auto" chooses shared memory on this host
RESTART_AT = {6: signal.SIGTERM, 13: signal.SIGKILL}


def batches():
    g = torch.Generator().manual_seed(0)
    centers = torch.randn(V, D, generator=g)
    out = []
    for _ in range(STEPS):
        y = torch.randint(0, V, (N,), generator=g)
        y[::7] = -100                                       # some ignored rows
        x = centers[y.clamp(min=0)] + 0.5 * torch.randn(N, D, generator=g)
        out.append((x, y))
    return out


def train(loss_of, before_step=lambda step: None):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(D, D), torch.nn.Tanh(), torch.nn.Linear(D, V))
    optim = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
    losses = []
    for step, (x, y) in enumerate(batches()):
        before_step(step)
        loss = loss_of(model(x), y)
        optim.zero_grad()
        loss.backward()
        optim.step()
        losses.append(loss.item())
    return losses, {k: v.detach().clone() for k, v in model.state_dict().items()}


def completed(srv: ServerProcess) -> int:
    tenants = httpx.get(srv.url + "/v1/status").json()["scheduler"]["tenants"]
    return sum(t["completed"] for t in tenants.values())


class Restarts:
    """Replaces servers mid-loop: at the chosen steps a thread signals the process, waits for it to
    exit and starts a new one on its port, while the loop's next call is already on its way.
    `which(step)` picks the server to replace (one server, or each replica in turn)."""

    def __init__(self, servers: list[ServerProcess], at: dict[int, signal.Signals], which=lambda step: 0):
        self.servers = servers
        self.at = at
        self.which = which
        self.thread: threading.Thread | None = None
        self.served: list[int] = []          # requests each replaced instance completed
        self.exit_codes: list[int] = []
        self.error: BaseException | None = None
        self.retired: list[ServerProcess] = []

    def __call__(self, step: int) -> None:
        sig = self.at.get(step)
        if sig is None:
            return
        if self.thread is not None:          # a rolling restart: one replica at a time
            self.thread.join()
        i = self.which(step)
        old = self.servers[i]
        self.served.append(completed(old))

        def replace():
            try:
                old.proc.send_signal(sig)
                self.exit_codes.append(old.proc.wait(60))
                self.retired.append(old)
                self.servers[i] = ServerProcess(port=old.port).start()
            except BaseException as exc:     # noqa: BLE001  (reported by finish())
                self.error = exc

        self.thread = threading.Thread(target=replace)
        self.thread.start()

    def finish(self) -> None:
        if self.thread is not None:
            self.thread.join()
        if self.error is not None:
            raise self.error

    def cleanup(self) -> None:
        self.finish()
        for s in self.servers + self.retired:
            s.cleanup()


def assert_same(remote, local):
    (r_losses, r_state), (l_losses, l_state) = remote, local
    assert len(r_losses) == len(l_losses) == STEPS        # no step failed
    for step, (a, b) in enumerate(zip(r_losses, l_losses)):
        assert a == pytest.approx(b, rel=1e-5), f"step {step}: remote {a} vs torch {b}"
    assert l_losses[-1] < 0.9 * l_losses[0]                # it learned: the parameters moved
    for name in l_state:
        torch.testing.assert_close(r_state[name], l_state[name], rtol=1e-4, atol=1e-6,
                                   msg=lambda m, name=name: f"parameter {name}: {m}")


@pytest.fixture(scope="module")
def local():
    return train(lambda x, y: F.cross_entropy(x, y))


TRANSPORTS = {
    "auto": dict(),
    "async": dict(),                                            # AsyncClient, auto
    "shm": dict(transport="shm"),
    "tcp": dict(transport="tcp"),
    "pipelined": dict(transport="tcp", pipeline_bytes=128 << 10),   # 4 row chunks of 64 rows
}


@pytest.mark.parametrize("transport", list(TRANSPORTS))
def test_restarts_mid_loop_cost_no_step(transport, local, monkeypatch):
    if transport == "pipelined":
        monkeypatch.setattr(pipeline_mod, "MIN_BYTES", 0)
    restarts = Restarts([ServerProcess().start()], RESTART_AT)
    loop = asyncio.new_event_loop()
    try:
        if transport == "async":
            client = clce_client.AsyncClient(restarts.servers[0].url, retry_budget_s=60)
            loss_of = lambda x, y: loop.run_until_complete(client.cross_entropy(x, y))  # noqa: E731
            info = lambda: loop.run_until_complete(client.info())                    # noqa: E731
        else:
            client = clce_client.Client(restarts.servers[0].url, retry_budget_s=60, **TRANSPORTS[transport])
            loss_of, info = client.cross_entropy, client.info
        try:
            remote = train(loss_of, restarts)
            restarts.finish()
            arena = client._arena
            if transport in ("auto", "async", "shm"):
                assert arena is not None and arena.generation == 2     # moved to each new instance
                assert arena.instance_id == info()["instance_id"]
            else:
                assert arena is None
        finally:
            loop.run_until_complete(client.aclose()) if transport == "async" else client.close()
        assert restarts.exit_codes == [0, -signal.SIGKILL]          # drained, then killed
        # the first instance computed the 6 steps before the first restart (4 chunks each when
        # pipelined); the second computed steps too, and so does the last
        assert restarts.served[0] == 6 * (4 if transport == "pipelined" else 1)
        assert restarts.served[1] > 0 and completed(restarts.servers[0]) > 0
    finally:
        loop.close()
        restarts.cleanup()
    assert_same(remote, local)


def test_rolling_restart_of_two_replicas_loses_nothing(local):
    servers = [ServerProcess(), ServerProcess()]
    threads = [threading.Thread(target=s.start) for s in servers]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    # replica 0 drains and is replaced at step 5; once it is back, replica 1 is killed at step 12
    restarts = Restarts(servers, {5: signal.SIGTERM, 12: signal.SIGKILL}, which=lambda step: 0 if step < 10 else 1)
    try:
        with clce_client.Client(",".join(s.url for s in servers), retry_budget_s=60) as client:
            remote = train(lambda x, y: client.cross_entropy(x, y), restarts)
            restarts.finish()
        assert restarts.exit_codes == [0, -signal.SIGKILL]
        assert all(n > 0 for n in restarts.served)
        assert sum(completed(s) for s in restarts.servers) > 0
    finally:
        restarts.cleanup()
    assert_same(remote, local)


def test_an_unknown_region_on_the_same_instance_is_a_real_not_found():
    """NotFound means a restart only when the instance changed: a region the same server never had
    (here unregistered behind the client's back) raises at once, after one look at /v1/info."""
    import numpy as np

    with ServerProcess() as srv, clce_client.Client(srv.url, transport="shm", shm_min_bytes=0) as client:
        x = client.empty((64, 100), np.float32)
        x[...] = np.random.default_rng(0).standard_normal(x.shape)
        t = np.zeros(64, np.int64)
        assert np.isfinite(client.cross_entropy(x, t))
        arena = client._arena
        name = next(iter(arena._live))
        arena._session.call({"op": "unregister", "name": name})
        with pytest.raises(clce_client.NotFound, match="no shared-memory region"):
            client.cross_entropy(x, t)
        assert arena.generation == 0 and client._arena is arena


@pytest.mark.parametrize("notice", ["info", "not_found"])
def test_a_new_instance_behind_the_same_url_while_the_old_one_lives(notice):
    """What a load balancer switching backends looks like: the URL now reaches instance B while A,
    holding the arena, is alive (its socket open). The client notices through /v1/info's
    instance_id (asked by anyone through it) or through B's 404 for a region, moves the arena to B
    and computes there; the result equals a plain TCP call."""
    import numpy as np

    with ServerProcess() as a, ServerProcess() as b:
        x = np.random.default_rng(0).standard_normal((256, 1000)).astype(np.float32)
        t = np.random.default_rng(1).integers(0, 1000, 256)
        with clce_client.Client(a.url, transport="shm") as client, \
                clce_client.Client(b.url, transport="tcp") as plain:
            client.cross_entropy(x, t)
            arena = client._arena
            assert arena.instance_id == httpx.get(a.url + "/v1/info").json()["instance_id"]
            client._replicas.urls[0] = b.url             # the balancer now sends us to B
            if notice == "info":
                assert client.info()["instance_id"] != arena.instance_id
            r = client.cross_entropy(x, t, return_grad=True)
            ref = plain.cross_entropy(x, t, return_grad=True)
            assert arena.generation == 1 and client._arena is arena
            assert arena.instance_id == httpx.get(b.url + "/v1/info").json()["instance_id"]
            assert httpx.get(b.url + "/v1/info").json()["shm"]["regions"] >= 1
        assert r.loss.tobytes() == ref.loss.tobytes() and r.grad.tobytes() == ref.grad.tobytes()
