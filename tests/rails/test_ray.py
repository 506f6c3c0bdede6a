"""clce_server.ray on a local Ray instance: two replicas behind Serve's HTTP proxy.

Needs `pip install "ray[serve]"` (the `ray` extra) and an OpenCL device (PoCL's CPU device in CI).
The client talks to Serve's proxy exactly as to one server; results are checked against
torch.nn.functional.cross_entropy, and /v1/info's instance_id shows both replicas answered.

Stored weights are Serve's multiplexed models (the client's serve_multiplexed_model_id header): a
2000x64 head's 12 calls of one version cost one upload; weights spread over both replicas and each
stays on one; accumulate=True over 4 steps of 4 micro-batches equals torch's with no micro-batch
replayed; Serve evicting a weight drops it from the replica's store; the replica holding a weight
killed mid-step costs one upload on the other and a replay of the lost micro-batches, still exact.
"""

from __future__ import annotations

import os
import socket
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest

torch = pytest.importorskip("torch")
F = torch.nn.functional

try:
    import ray
    from ray import serve
except Exception as exc:  # not installed, or broken for this Python
    pytest.skip(f"ray[serve] is not importable ({exc!r}); pip install 'ray[serve]'", allow_module_level=True)

from clce_client import Client  # noqa: E402

pytestmark = pytest.mark.timeout(240)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def serve_url():
    os.environ["CLCE_REPLICAS"] = "2"
    # Replicas inherit the driver's environment through the local raylet: no autoscaling, CPU
    # actors, and half a CPU each so two replicas fit next to Serve's own actors.
    os.environ.pop("CLCE_AUTOSCALE", None)
    os.environ.pop("CLCE_RAY_GPUS", None)
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False,
             namespace="clce-test", ignore_reinit_error=True)
    try:
        import clce_server.ray as clce_ray

        port = _free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        opts = clce_ray.deployment_options(replicas=2, cpus=0.5)
        assert opts["num_replicas"] == 2
        t0 = time.monotonic()
        # blocks until both replicas are RUNNING, i.e. their devices are open and warm
        serve.run(clce_ray.ClceDeployment.options(**opts).bind(), name="clce", route_prefix="/")
        print(f"serve.run: two replicas ready in {time.monotonic() - t0:.1f} s")
        yield f"http://127.0.0.1:{port}"
    finally:
        try:
            serve.shutdown()
        finally:
            ray.shutdown()
            os.environ.pop("CLCE_REPLICAS", None)


def test_module_app_is_a_bound_application():
    import clce_server.ray as clce_ray
    from ray.serve.deployment import Application

    assert isinstance(clce_ray.app, Application)
    auto = clce_ray.deployment_options(replicas=2, autoscale=True, max_replicas=6, target_ongoing=3)
    assert "num_replicas" not in auto
    assert auto["autoscaling_config"]["max_replicas"] == 6
    assert auto["autoscaling_config"]["initial_replicas"] == 2
    assert clce_ray.deployment_options(gpus=True)["ray_actor_options"]["num_gpus"] == 1
    assert "num_gpus" not in clce_ray.deployment_options(gpus=False)["ray_actor_options"]


def test_results_match_torch_through_serve(serve_url):
    rng = np.random.default_rng(0)
    with Client(serve_url) as client:
        assert client.readyz()
        for n, c in ((8, 17), (64, 1000), (3, 5)):
            x = rng.standard_normal((n, c)).astype(np.float32) * 3
            t = rng.integers(0, c, size=n)
            t[0] = -100
            res = client.cross_entropy(x, t, return_grad=True, label_smoothing=0.1)
            xt = torch.from_numpy(x).requires_grad_(True)
            ref = F.cross_entropy(xt, torch.from_numpy(t), label_smoothing=0.1)
            ref.backward()
            np.testing.assert_allclose(np.asarray(res.loss), ref.item(), rtol=1e-5, atol=1e-6)
            np.testing.assert_allclose(res.grad, xt.grad.numpy(), rtol=1e-4, atol=1e-6)
        # the torch path (autograd through the client) works through the proxy too
        x = torch.randn(16, 33, requires_grad=True)
        t = torch.randint(0, 33, (16,))
        loss = client.cross_entropy(x, t, reduction="sum")
        loss.backward()
        x2 = x.detach().clone().requires_grad_(True)
        ref = F.cross_entropy(x2, t, reduction="sum")
        ref.backward()
        torch.testing.assert_close(loss.detach(), ref.detach(), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(x.grad, x2.grad, rtol=1e-4, atol=1e-6)


def test_both_replicas_answer(serve_url):
    rng = np.random.default_rng(1)
    x = rng.standard_normal((32, 100)).astype(np.float32)
    t = rng.integers(0, 100, size=32)
    ref = F.cross_entropy(torch.from_numpy(x), torch.from_numpy(t)).item()
    seen: set[str] = set()
    with Client(serve_url) as client:

        def call(_):
            loss = client.cross_entropy(x, t)
            return client.info()["instance_id"], float(loss)

        with ThreadPoolExecutor(8) as pool:
            for _ in range(6):   # a few rounds of concurrent calls, until both replicas showed up
                for instance, loss in pool.map(call, range(32)):
                    seen.add(instance)
                    assert loss == pytest.approx(ref, rel=1e-5)
                if len(seen) >= 2:
                    break
        assert len(seen) == 2, f"expected two replicas to answer, saw {seen}"
        info = client.info()
        assert info["ready"] and info["devices"], info
    status = httpx.get(serve_url + "/v1/status", timeout=10).json()
    assert status["instance_id"] in seen and status["ready"]
    assert status["scheduler"]["tenants"]["default"]["completed"] > 0


# ---- stored weights: Serve's model multiplexing routes a weight's requests to its replica ----------

def _replica_actors() -> dict[str, object]:
    """Each live clce replica actor by the instance id its answers carry."""
    from ray.util import list_named_actors

    out = {}
    for entry in list_named_actors(all_namespaces=True):
        if "SERVE_REPLICA" in entry["name"] and "clce" in entry["name"]:
            actor = ray.get_actor(entry["name"], namespace=entry["namespace"])
            try:
                instance = ray.get(actor.__ray_call__.remote(
                    lambda _: __import__("clce_server.ray").ray._REPLICA[0]._state().instance_id), timeout=30)
            except Exception:   # a replica that died or is going
                continue
            out[instance] = actor
    return out


@pytest.fixture(scope="module")
def local():
    from tests.support.linear_training import local_steps

    return local_steps()


def test_stored_weight_goes_to_one_replica_through_serve(serve_url):
    """12 calls of one version of a 2000x64 head: one upload, every call exact, none failed."""
    from tests.support.linear_training import H, N, V

    g = torch.Generator().manual_seed(1)
    W = torch.randn(V, H, generator=g).mul_(0.05).requires_grad_(True)
    W_ref = W.detach().clone().requires_grad_(True)
    failed = 0
    with Client(serve_url, transport="tcp") as client:
        for _ in range(12):
            h = torch.randn(N, H, generator=g, requires_grad=True)
            y = torch.randint(0, V, (N,), generator=g)
            try:
                loss = client.linear_cross_entropy(h, W, y, weight_name="ray-head")
                loss.backward()
            except Exception:   # what this test counts: want none
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
        print(f"ray stored: uploads {weights.uploads} for 1 version, failed calls {failed} of 12")


def test_weights_spread_over_serve_replicas_and_each_stays_on_one(serve_url):
    g = torch.Generator().manual_seed(2)
    names = [f"ray-layer{i}" for i in range(8)]
    Ws = {n: torch.randn(64, 16, generator=g) for n in names}
    with Client(serve_url, transport="tcp") as client:
        for _ in range(3):
            for n, W in Ws.items():
                h = torch.randn(8, 16, generator=g)
                y = torch.randint(0, 64, (8,), generator=g)
                with torch.no_grad():
                    loss = client.linear_cross_entropy(h, W, y, weight_name=n)
                torch.testing.assert_close(loss, F.cross_entropy(F.linear(h, W), y), rtol=1e-5, atol=1e-6)
        weights = client.weights
        where = [instance for _, _, instance in weights.upload_log]
        assert weights.uploads == len(names), list(weights.upload_log)
        # Serve loads a model nobody holds on the replica with the fewest: both take weights
        assert len(set(where)) == 2, where


def test_accumulated_steps_equal_torch_through_serve(serve_url, local):
    from tests.support.linear_training import STEPS, per_version, train

    with Client(serve_url, transport="tcp", retry_budget_s=60) as client:
        worst, refused = train(client, local)
        weights = client.weights
        assert refused == [] and len(worst) == STEPS
        assert weights.replayed == 0     # every step's micro-batches and flush met one accumulator
        uploads = per_version(weights)
        assert weights.uploads == STEPS and all(len(w) == 1 for w in uploads.values()), uploads
        print(f"ray accumulate: {len(worst)} of {STEPS} steps exact (worst {max(worst):.2e}), "
              f"uploads {weights.uploads} for {STEPS} versions, replayed {weights.replayed}")


def _evict(model_id: str):
    """On a replica: Serve's own eviction of its least recently used multiplexed model (what it
    does beyond CLCE_RAY_MAX_WEIGHTS), until `model_id` is gone; the names its store still holds."""

    def run(_actor):
        import asyncio

        import clce_server.ray as clce_ray

        replica = clce_ray._REPLICA[0]
        cache = getattr(replica, "__serve_multiplex_wrapper")   # @serve.multiplexed's, per replica

        async def evict() -> None:
            while model_id in replica._slots:
                await cache.unload_model_lru()

        asyncio.run_coroutine_threadsafe(evict(), replica._loop).result(30)
        return sorted(name for _, name in replica._weight_store()._weights)

    return run


def test_a_weight_serve_evicts_is_dropped_from_the_replicas_store(serve_url):
    """Serve evicting a weight from a replica's multiplexed cache deletes it from that replica's
    store (the store holds what Serve routes there); its next call uploads it again, exact."""
    g = torch.Generator().manual_seed(3)
    W = torch.randn(64, 16, generator=g)

    def call():
        h, y = torch.randn(8, 16, generator=g), torch.randint(0, 64, (8,), generator=g)
        with torch.no_grad():
            loss = client.linear_cross_entropy(h, W, y, weight_name="ray-evict")
        torch.testing.assert_close(loss, F.cross_entropy(F.linear(h, W), y), rtol=1e-5, atol=1e-6)

    with Client(serve_url, transport="tcp") as client:
        weights = client.weights
        call()
        call()
        assert weights.uploads == 1
        holder = weights.upload_log[-1][2]
        held = ray.get(_replica_actors()[holder].__ray_call__.remote(_evict(weights.affinity("ray-evict"))),
                       timeout=60)
        assert "ray-evict" not in held, held
        call()                       # the same version: "not stored", uploaded again, exact
        assert weights.uploads == 2, list(weights.upload_log)


def test_the_weights_replica_killed_mid_step_through_serve(serve_url, local):
    """The replica holding the head is killed (ray.kill) between micro-batches 2 and 3 of step 1:
    Serve routes the weight to the other replica, which answers "not stored"; the client uploads it
    there, the flush replays the 2 lost micro-batches, and every step equals torch's."""
    from tests.support.linear_training import STEPS, train

    killed = []
    with Client(serve_url, transport="tcp", retry_budget_s=120) as client:
        weights = client.weights

        def kill() -> None:
            holder = weights.upload_log[-1][2]
            actors = _replica_actors()
            assert holder in actors, (holder, sorted(actors))
            ray.kill(actors[holder], no_restart=True)
            killed.append(holder)

        worst, refused = train(client, local, kill)
        assert refused == [] and len(worst) == STEPS
        assert weights.replayed == 2
        after = [instance for _, _, instance in list(weights.upload_log)[-STEPS + 1:]]
        assert killed[0] not in after, (killed, list(weights.upload_log))
        print(f"ray killed mid-step: {len(worst)} of {STEPS} steps exact (worst {max(worst):.2e}), "
              f"uploads {weights.uploads} for {STEPS} versions, replayed {weights.replayed}")
