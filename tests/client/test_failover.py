"""Two real replicas; one is killed with SIGKILL in the middle of a request while a training loop
runs. Every step completes, and the loss trajectory and the final parameters equal a local
torch run with the same seeds."""

from __future__ import annotations

import os
import signal
import threading

import pytest
from tests.support.serverproc import ServerProcess  # noqa: E402
from tests.support.tiny_lm import STEPS, assert_same_training, train_lm  # noqa: E402

import clce_client  # noqa: E402
from clce_client import client as client_module  # noqa: E402

torch = pytest.importorskip("torch")
F = torch.nn.functional

KILL_AT_STEP = 5


@pytest.fixture
def replicas():
    servers = [ServerProcess(), ServerProcess()]
    threads = [threading.Thread(target=s.start) for s in servers]   # start both at once
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    try:
        for s in servers:
            assert s.proc is not None and s.proc.poll() is None, s.log()
        yield servers
    finally:
        for s in servers:
            s.cleanup()


def test_sigkill_of_one_replica_mid_request_loses_no_step(replicas, monkeypatch):
    victim, survivor = replicas
    seen = {"step": 0, "url": None, "killed_mid_upload": False, "answered_by": []}

    def on_request(request):
        seen["url"] = str(request.url)

    def on_response(response):
        seen["answered_by"].append((seen["step"], str(response.request.url)))

    plain_chunks = client_module._chunks

    def chunks_that_kill(segments, chunk_bytes):
        """The upload, as the client sends it; at the chosen step, on a request to the victim,
        the victim is SIGKILLed after the first chunk has gone out: mid-request."""
        for n, chunk in enumerate(plain_chunks(segments, chunk_bytes)):
            if (n == 1 and seen["step"] >= KILL_AT_STEP and not seen["killed_mid_upload"]
                    and seen["url"].startswith(victim.url)):
                os.kill(victim.proc.pid, signal.SIGKILL)
                victim.proc.wait(10)
                seen["killed_mid_upload"] = True
            yield chunk

    monkeypatch.setattr(client_module, "_chunks", chunks_that_kill)
    # small upload chunks: even these small batches go out in several writes
    with clce_client.Client([victim.url, survivor.url], chunk_bytes=4096, retry_budget_s=30) as client:
        client._http.event_hooks = {"request": [on_request], "response": [on_response]}

        def remote_loss(logits, targets):
            loss = client.cross_entropy(logits, targets, ignore_index=-1)
            seen["step"] += 1
            return loss

        remote = train_lm(remote_loss)
    local = train_lm(lambda x, t: F.cross_entropy(x, t, ignore_index=-1))

    assert seen["killed_mid_upload"], "the victim was never sent a request after the kill step"
    assert victim.proc.returncode == -signal.SIGKILL
    assert seen["step"] == STEPS                         # every step completed
    killed_at = next(step for step, url in reversed(seen["answered_by"]) if url.startswith(victim.url)) + 1
    assert all(url.startswith(survivor.url) for step, url in seen["answered_by"] if step >= killed_at)
    assert_same_training(remote, local)                  # identical loss trajectory and parameters
