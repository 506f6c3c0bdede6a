"""A stored weight across replicas: its requests go where the weight is (issue 31).

Two real clce servers, reached two ways: by the multi-replica client (`Client("a,b")`, which picks
a weight's replica by rendezvous hashing of its affinity key) and through Debian's HAProxy running
the shipped docker/haproxy.cfg (only the addresses changed), which hashes the same key, sent in
the serve_multiplexed_model_id header, consistently. For each:

* stored mode: a tiny LM head (2000x64), 12 calls of one version: every loss and gradient equals
  torch's, the weight crosses the wire once, to one replica, and no call fails;
* accumulate=True: 4 optimizer steps of 4 micro-batches with `client.weights.attach(optimizer)`:
  every step's parameters equal torch's, one upload per version, and no micro-batch is replayed
  (all of a step's micro-batches and its flush reached the one replica holding its accumulator);
* the replica holding the weight killed (SIGKILL, not restarted) between micro-batches 2 and 3 of
  step 1: the weight moves to the other replica with one upload there, the flush finds the 2
  micro-batches that went with the dead one missing and replays them, and every step equals
  torch's; with replay off that step raises AccumulationLost before the optimizer runs.
"""

from __future__ import annotations

import re
import shutil
import signal
import subprocess
import time

import httpx
import pytest
from tests.support.linear_training import H, N, STEPS, V, local_steps, per_version, train  # noqa: E402
from tests.support.serverproc import REPO, ServerProcess, free_port  # noqa: E402

import clce_client  # noqa: E402

torch = pytest.importorskip("torch")
F = torch.nn.functional

pytestmark = pytest.mark.timeout(300)

SETUPS = ["client", "haproxy"]
needs_haproxy = pytest.mark.skipif(shutil.which("haproxy") is None, reason="haproxy is not installed (setup.sh dev)")


# ---- the two ways to the replicas --------------------------------------------------------------------

def lb_config(replica_ports: list[int], front_port: int, monitor_port: int) -> str:
    """docker/haproxy.cfg with loopback addresses instead of compose's service names."""
    cfg = (REPO / "docker" / "haproxy.cfg").read_text()
    cfg = re.sub(r"\nresolvers docker\n(?:    .*\n)+", "\n", cfg)
    cfg = cfg.replace(" resolvers docker init-addr last,libc,none", "")
    cfg = cfg.replace("bind :8000", f"bind 127.0.0.1:{front_port}").replace("bind :8405", f"bind 127.0.0.1:{monitor_port}")
    names = re.findall(r"^    server (\S+) \S+:8000$", cfg, flags=re.M)
    assert len(names) == len(replica_ports), names
    for name, port in zip(names, replica_ports):
        # the leastconn backend's server and the hashing backend's (which tracks its health)
        cfg = cfg.replace(f"    server {name} {name}:8000", f"    server {name} 127.0.0.1:{port}")
    return cfg


class Front:
    """How a client reaches two replicas: their URLs ("client") or HAProxy in front ("haproxy")."""

    def __init__(self, how: str, replicas: list[ServerProcess], tmp_path):
        self.how, self.replicas, self.lb = how, replicas, None
        if how == "client":
            self.url = ",".join(r.url for r in replicas)
            return
        front, monitor = free_port(), free_port()
        cfg = tmp_path / f"haproxy-{front}.cfg"
        cfg.write_text(lb_config([r.port for r in replicas], front, monitor))
        self.log = open(tmp_path / f"haproxy-{front}.log", "w+")
        self.lb = subprocess.Popen(["haproxy", "-db", "-f", str(cfg)], stdout=self.log, stderr=subprocess.STDOUT)
        self.url = f"http://127.0.0.1:{front}"
        deadline = time.monotonic() + 30
        while True:   # ready once both replicas passed HAProxy's health checks
            try:
                stats = httpx.get(f"http://127.0.0.1:{monitor}/metrics", timeout=2).text
                up = re.findall(r'^haproxy_server_status\{proxy="clce",server="[^"]+",state="UP"\} 1', stats, re.M)
                if len(up) == len(replicas):
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline and self.lb.poll() is None, self.log.seek(0) or self.log.read()
            time.sleep(0.2)

    def close(self) -> None:
        if self.lb is not None:
            self.lb.terminate()
            self.lb.wait(10)
            self.log.close()


def instances(replicas: list[ServerProcess]) -> dict[str, ServerProcess]:
    """Each replica by the instance id its answers carry."""
    return {httpx.get(r.url + "/v1/info", timeout=10).json()["instance_id"]: r for r in replicas}


@pytest.fixture(scope="module")
def pair():
    replicas = [ServerProcess().start(), ServerProcess().start()]
    try:
        yield replicas
    finally:
        for r in replicas:
            r.cleanup()


@pytest.fixture(params=SETUPS)
def front(request, pair, tmp_path):
    if request.param == "haproxy" and shutil.which("haproxy") is None:
        pytest.skip("haproxy is not installed (setup.sh dev)")
    f = Front(request.param, pair, tmp_path)
    yield f
    f.close()


@pytest.fixture(scope="module")
def local():
    return local_steps()


# ---- stored mode -----------------------------------------------------------------------------------

def test_stored_weight_is_uploaded_once_and_every_call_equals_torch(front, pair):
    """12 calls of one version of a 2000x64 head: one upload, to one replica, no failed call."""
    g = torch.Generator().manual_seed(1)
    W = torch.randn(V, H, generator=g).mul_(0.05).requires_grad_(True)
    W_ref = W.detach().clone().requires_grad_(True)
    failed = 0
    with clce_client.Client(front.url, transport="tcp") as client:
        for i in range(12):
            h = torch.randn(N, H, generator=g, requires_grad=True)
            y = torch.randint(0, V, (N,), generator=g)
            try:
                loss = client.linear_cross_entropy(h, W, y, weight_name="head")
                loss.backward()
            except clce_client.errors.ClceError:   # what this test counts: want none
                failed += 1
                continue
            h_ref = h.detach().clone().requires_grad_(True)
            ref = F.cross_entropy(F.linear(h_ref, W_ref), y)
            ref.backward()
            torch.testing.assert_close(loss.detach(), ref.detach(), rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(h.grad, h_ref.grad, rtol=1e-4, atol=1e-6)
        weights = client.weights
        assert failed == 0
        torch.testing.assert_close(W.grad, W_ref.grad, rtol=1e-4, atol=1e-6)
        assert weights.uploads == 1, list(weights.upload_log)
        assert list(per_version(weights).values())[0][0] in instances(pair)
        print(f"{front.how} stored: uploads {weights.uploads} for 1 version, failed calls {failed} of 12")


def test_weights_spread_over_the_replicas_and_each_stays_on_one(front, pair):
    """16 weight names: each uploaded once, to one replica, and both replicas hold some (the
    hashing spreads the weights; each call of a weight goes where its upload went)."""
    g = torch.Generator().manual_seed(2)
    names = [f"layer{i}" for i in range(16)]
    Ws = {n: torch.randn(64, 16, generator=g) for n in names}
    with clce_client.Client(front.url, transport="tcp") as client:
        for _ in range(3):
            for n, W in Ws.items():
                h = torch.randn(8, 16, generator=g)
                y = torch.randint(0, 64, (8,), generator=g)
                with torch.no_grad():
                    loss = client.linear_cross_entropy(h, W, y, weight_name=n)
                torch.testing.assert_close(loss, F.cross_entropy(F.linear(h, W), y), rtol=1e-5, atol=1e-6)
        weights = client.weights
        uploads = per_version(weights)
        assert weights.uploads == len(names), uploads
        assert all(len(where) == 1 for where in uploads.values()), uploads
        held = {where[0] for where in uploads.values()}
        assert held == set(instances(pair)), held


# ---- accumulate=True -------------------------------------------------------------------------------

def test_accumulated_steps_equal_torch_on_one_replica(front, local):
    with clce_client.Client(front.url, transport="tcp", retry_budget_s=60) as client:
        worst, refused = train(client, local)
        weights = client.weights
        assert refused == [] and len(worst) == STEPS
        # no micro-batch missing at any flush: each step's micro-batches and flush met one accumulator
        assert weights.replayed == 0
        uploads = per_version(weights)
        assert weights.uploads == STEPS and all(len(w) == 1 for w in uploads.values()), uploads
        assert len({w[0] for w in uploads.values()}) == 1     # every version on the same replica
        print(f"{front.how} accumulate: {len(worst)} of {STEPS} steps exact (worst {max(worst):.2e}), "
              f"uploads {weights.uploads} for {STEPS} versions, replayed {weights.replayed}")


# ---- the weight's replica killed mid-step ----------------------------------------------------------

@pytest.mark.parametrize("how", SETUPS)
def test_the_weights_replica_killed_mid_step(how, local, tmp_path):
    if how == "haproxy" and shutil.which("haproxy") is None:
        pytest.skip("haproxy is not installed (setup.sh dev)")
    replicas = [ServerProcess().start(), ServerProcess().start()]
    f = Front(how, replicas, tmp_path)
    killed: list[str] = []
    try:
        with clce_client.Client(f.url, transport="tcp", retry_budget_s=60) as client:
            weights = client.weights
            by_instance = instances(replicas)

            def kill() -> None:
                holder = weights.upload_log[-1][2]       # where the weight (and the accumulator) is
                srv = by_instance[holder]
                srv.proc.send_signal(signal.SIGKILL)
                srv.proc.wait(20)
                killed.append(holder)

            worst, refused = train(client, local, kill)
            assert refused == [] and len(worst) == STEPS
            assert weights.replayed == 2     # micro-batches 0 and 1 of step 1 died with the replica
            uploads = per_version(weights)
            # one upload per version, plus one for the version that moved to the other replica;
            # never twice to one replica
            assert weights.uploads == STEPS + 1, uploads
            assert all(len(set(w)) == len(w) for w in uploads.values()), uploads
            survivor = (set(by_instance) - set(killed)).pop()
            assert [w[-1] for w in uploads.values()][1:] == [survivor] * (STEPS - 1), uploads
            print(f"{how} killed mid-step: {len(worst)} of {STEPS} steps exact (worst {max(worst):.2e}), "
                  f"uploads {weights.uploads} for {STEPS} versions, replayed {weights.replayed}")
    finally:
        f.close()
        for r in replicas:
            r.cleanup()


def test_killed_with_replay_off_the_step_raises_and_a_rerun_equals_torch(local, tmp_path):
    replicas = [ServerProcess().start(), ServerProcess().start()]
    try:
        with clce_client.Client(",".join(r.url for r in replicas), transport="tcp", retry_budget_s=60) as client:
            weights = client.weights
            by_instance = instances(replicas)

            def kill() -> None:
                srv = by_instance[weights.upload_log[-1][2]]
                srv.proc.send_signal(signal.SIGKILL)
                srv.proc.wait(20)

            worst, refused = train(client, local, kill, replay=False)
            assert [s for s, _ in refused] == [1]
            assert "missing 2 of the 4 micro-batches" in refused[0][1] and "replay is off" in refused[0][1]
            assert len(worst) == STEPS and weights.replayed == 0
    finally:
        for r in replicas:
            r.cleanup()


# ---- the replica choice itself -----------------------------------------------------------------------

def test_rendezvous_order_is_shared_and_moves_only_the_removed_replicas_weights():
    """Every client with the same URL list ranks a weight's replicas alike; removing a replica
    moves only the weights it ranked first, each to its second choice; weights spread."""
    from clce_client.client import _Replicas

    urls = [f"http://10.0.0.{i}:8000" for i in range(1, 5)]
    keys = [f"tag.layer{i}" for i in range(400)]
    a, b = _Replicas(list(urls)), _Replicas(list(urls))
    first = {k: a.order_for(k) for k in keys}
    assert first == {k: b.order_for(k) for k in keys}
    share = [sum(first[k][0] == i for k in keys) for i in range(len(urls))]
    assert min(share) > len(keys) / len(urls) / 2, share
    fewer = _Replicas(urls[:2] + urls[3:])          # 10.0.0.3 gone
    for k in keys:
        now = urls.index(fewer.urls[fewer.order_for(k)[0]])
        before = first[k]
        assert now == (before[0] if before[0] != 2 else before[1]), (k, before, now)
    # a replica that failed is tried last, until it is up again
    a.mark_down(first[keys[0]][0])
    assert a.order_for(keys[0]) == first[keys[0]][1:] + first[keys[0]][:1]


def test_only_stored_weights_carry_the_affinity_header():
    from clce_client.linear import LinearCall

    with clce_client.Client("http://127.0.0.1:9,http://127.0.0.1:10", transport="tcp") as client:
        h, W, y = torch.randn(4, 8), torch.randn(16, 8), torch.randint(0, 16, (4,))
        stored = LinearCall(client, h, W, y, weight_name="head")
        stored.version = "v1"
        stateless = LinearCall(client, h, W, y, stateless=True)
        key = client.weights.affinity("head")
        assert stored._request(None).affinity == stored._upload(None).affinity == key
        assert key.endswith(".head") and client._api_key is None
        assert stateless._request(None).affinity is None      # spread by load, as the loss routes
    with clce_client.Client("http://127.0.0.1:9", api_key="k1") as c1, \
            clce_client.Client("http://127.0.0.1:9", api_key="k2") as c2:
        # a tenant's weight of a name is not another tenant's: other keys, the API key not in them
        k1, k2 = c1.weights.affinity("head"), c2.weights.affinity("head")
        assert k1 != k2 and "k1" not in k1 and "k2" not in k2


def test_async_client_keeps_a_weight_on_one_replica(pair):
    import asyncio

    async def main():
        async with clce_client.AsyncClient(",".join(r.url for r in pair), transport="tcp") as client:
            g = torch.Generator().manual_seed(4)
            W = torch.randn(V, H, generator=g).mul_(0.05).requires_grad_(True)
            W_ref = W.detach().clone().requires_grad_(True)
            for _ in range(4):
                h = torch.randn(N, H, generator=g)
                y = torch.randint(0, V, (N,), generator=g)
                loss = await client.linear_cross_entropy(h, W, y, weight_name="async-head", accumulate=True)
                loss.backward()
                F.cross_entropy(F.linear(h, W_ref), y).backward()
            weights = client.weights
            await weights.flush()
            torch.testing.assert_close(W.grad, W_ref.grad, rtol=1e-4, atol=1e-6)
            assert weights.uploads == 1 and weights.replayed == 0

    asyncio.run(main())
