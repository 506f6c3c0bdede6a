"""The client's bounded retries: 429 and 503 wait for Retry-After (with jitter) within
retry_budget_s, then raise; connection failures move to the next replica. Against the in-process
stand-in server of tests/support/stub_server.py (it computes with torch)."""

from __future__ import annotations

import asyncio
import email.utils
import time

import msgpack
import numpy as np
import pytest
from tests.support.stub_server import Stub, closed_url, logits, server  # noqa: F401  (fixtures)

from clce_client import errors  # noqa: E402
from clce_client.client import AsyncClient, Client, _retry_budget  # noqa: E402
from clce_wire.protocol import MSGPACK, error_body  # noqa: E402

torch = pytest.importorskip("torch")

FULL = msgpack.packb(error_body("queue_full", "byte budget full"))
WARMING = msgpack.packb(error_body("not_ready", "warming up"))


def refuse_first(server, n, status=429, retry_after="1"):
    """The first n requests are turned away, the rest computed."""
    body = FULL if status == 429 else WARMING

    def respond(req):
        if len(server.requests) <= n:
            headers = {"content-type": MSGPACK}
            if retry_after is not None:
                headers["retry-after"] = retry_after
            return status, headers, body
        return server.cross_entropy(req)

    server.respond = respond


def expected_loss(x, t):
    return torch.nn.functional.cross_entropy(torch.from_numpy(x), torch.from_numpy(t)).item()


@pytest.mark.parametrize("status", [429, 503])
def test_transient_status_waits_for_retry_after_then_succeeds(server, status):
    refuse_first(server, 1, status, retry_after="1")
    times: list[tuple[float, float]] = []     # (arrived, answered) at the stand-in, per request
    answer = server.respond

    def respond(req):
        arrived = time.monotonic()
        out = answer(req)
        times.append((arrived, time.monotonic()))
        return out

    server.respond = respond
    x, t = logits()
    with Client(server.url, retry_budget_s=10) as client:
        loss = client.cross_entropy(x, t)
    assert loss.item() == expected_loss(x, t)
    assert len(server.requests) == 2
    # from the refusal's answer to the retry's arrival: the Retry-After (1 s), stretched by at
    # most 25 % jitter, plus the client's own turnaround (round trips are not counted)
    waited = times[1][0] - times[0][1]
    assert 1.0 <= waited < 1.0 * 1.25 + 0.5, waited


def test_retry_after_as_an_http_date(server):
    when = email.utils.formatdate(time.time() + 2, usegmt=True)
    refuse_first(server, 1, 503, retry_after=when)
    x, t = logits()
    with Client(server.url, retry_budget_s=10) as client:
        t0 = time.monotonic()
        client.cross_entropy(x, t)
    assert 0.5 <= time.monotonic() - t0 < 3.5 and len(server.requests) == 2


def test_no_retry_after_backs_off_until_the_budget_is_spent(server):
    refuse_first(server, 10**6, 503, retry_after=None)
    answered: list[float] = []               # when the stand-in sent each refusal
    refuse = server.respond

    def respond(req):
        out = refuse(req)
        answered.append(time.monotonic())
        return out

    server.respond = respond
    budget = 2.0                             # room for several round trips on a busy CPU
    with Client(server.url, retry_budget_s=budget) as client:
        t0 = time.monotonic()
        with pytest.raises(errors.ServiceUnavailable, match="warming up"):
            client.cross_entropy(*logits())
        raised = time.monotonic()
    tries = len(server.requests)
    assert tries >= 3 and len(answered) == tries
    # every retry was sent within the budget, and once the next backoff would end past it the
    # client raised at once, without starting that wait
    assert answered[-2] - t0 <= budget
    assert raised - answered[-1] < client._backoff(tries)


def test_a_wait_beyond_the_budget_raises_at_once(server):
    refuse_first(server, 10**6, 429, retry_after="60")
    with Client(server.url, retry_budget_s=5) as client:
        t0 = time.monotonic()
        with pytest.raises(errors.Overloaded) as info:
            client.cross_entropy(*logits())
    assert time.monotonic() - t0 < 1 and len(server.requests) == 1
    assert info.value.retry_after == 60.0


def test_budget_zero_disables_and_the_environment_sets_it(server, monkeypatch):
    refuse_first(server, 10**6, 429, retry_after="1")
    monkeypatch.setenv("CLCE_RETRY_BUDGET_S", "0")
    with Client(server.url) as client:
        assert client.retry_budget_s == 0
        with pytest.raises(errors.Overloaded):
            client.cross_entropy(*logits())
    assert len(server.requests) == 1
    monkeypatch.setenv("CLCE_RETRY_BUDGET_S", "2.5")
    assert _retry_budget(None) == 2.5 and _retry_budget(7) == 7.0
    monkeypatch.delenv("CLCE_RETRY_BUDGET_S")
    assert 10 <= _retry_budget(None) <= 60          # a few tens of seconds by default
    for bad in (-1, float("nan")):
        with pytest.raises(ValueError):
            _retry_budget(bad)
    monkeypatch.setenv("CLCE_RETRY_BUDGET_S", "soon")
    with pytest.raises(ValueError, match="CLCE_RETRY_BUDGET_S"):
        _retry_budget(None)


def test_a_turned_away_request_goes_to_the_other_replica_at_once(server):
    busy = Stub()
    import threading

    threading.Thread(target=busy.serve_forever, args=(0.02,), daemon=True).start()
    busy.respond = lambda req: (429, {"content-type": MSGPACK, "retry-after": "30"}, FULL)
    try:
        x, t = logits()
        with Client([busy.url, server.url], retry_budget_s=10) as client:
            t0 = time.monotonic()
            losses = [client.cross_entropy(x, t).item() for _ in range(4)]
            assert time.monotonic() - t0 < 2     # never waited the 30 s
        assert losses == [expected_loss(x, t)] * 4 and len(server.requests) == 4
    finally:
        busy.shutdown()
        busy.server_close()


def test_jitter_spreads_the_waits(server, monkeypatch):
    """Clients turned away together do not come back together: the waits differ."""
    from clce_client import client as client_module

    waits = []
    monkeypatch.setattr(client_module.time, "sleep", waits.append)
    for _ in range(5):
        refuse_first(server, len(server.requests) + 1, 429, retry_after="2")
        with Client(server.url, retry_budget_s=10) as client:
            client.cross_entropy(*logits())
    assert len(waits) == 5 and all(2.0 <= w <= 2.5 for w in waits) and len(set(waits)) == 5


def test_async_client_retries_the_same_way(server):
    refuse_first(server, 2, 503, retry_after="0.2")
    x, t = logits()

    async def main():
        async with AsyncClient(server.url, retry_budget_s=5) as client:
            return await client.cross_entropy(x, t)

    assert asyncio.run(main()).item() == expected_loss(x, t)
    assert len(server.requests) == 3


def test_connection_failures_move_on_without_waiting(server, closed_url):  # noqa: F811
    x, t = logits()
    with Client([closed_url, server.url], retry_budget_s=0) as client:
        assert [client.cross_entropy(x, t).item() for _ in range(3)] == [expected_loss(x, t)] * 3


def test_resending_is_harmless_the_answer_is_a_pure_function_of_the_body(server):
    """A retried request is the same bytes: the server computes the same answer (nothing is
    accumulated server-side, so a retry can never count twice)."""
    refuse_first(server, 1, 503, retry_after="0")
    x, t = logits()
    with Client(server.url, retry_budget_s=5) as client:
        client.cross_entropy(x, t)
    first, second = server.requests
    assert first["body"] == second["body"]
    assert np.isfinite(expected_loss(x, t))
