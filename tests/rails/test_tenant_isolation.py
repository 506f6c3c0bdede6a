"""Tenant isolation on the real server: a tenant's key sees its own row of /v1/status, the admin
key sees all, /metrics is the admin's (or a separate listener's), and after a whole session no key
is found in the log, the metrics, the status, the error bodies or any header."""

from __future__ import annotations

import json

import httpx
import numpy as np
import pytest

import clce_client
from clce_client import errors
from tests.support.tenant_server import ADMIN_KEY, KEYS, METRICS_PORT, SECRETS, WRONG_KEY, server  # noqa: F401  (fixture)


def bearer(key):
    return {"Authorization": f"Bearer {key}"}


@pytest.fixture(scope="module")
def session(server):
    """A session of every kind of request, with every key (and a wrong one); what came back."""
    x = np.random.default_rng(0).standard_normal((6, 9)).astype(np.float32)
    t = np.array([0, 8, 3, 3, 1, 2])
    seen: list[str] = []
    for name, key in KEYS.items():
        with clce_client.Client(server.url, api_key=key, retry_budget_s=0) as c:
            c.cross_entropy(x, t, return_grad=True)
            with pytest.raises(IndexError) as info:                 # an argument error
                c.cross_entropy(x, np.array([0, 9, 0, 0, 0, 0]))
            seen.append(repr(info.value))
    for key in (WRONG_KEY, ADMIN_KEY):          # the admin key is not a tenant's: no work with it
        with clce_client.Client(server.url, api_key=key, retry_budget_s=0) as c:
            with pytest.raises(errors.AuthenticationError) as info:
                c.cross_entropy(x, t)
            seen.append(repr(info.value))
    with httpx.Client(base_url=server.url, timeout=30) as h:
        for key in SECRETS:
            for path in ("/v1/status", "/metrics", "/v1/info", "/", "/v1/nope"):
                r = h.get(path, headers=bearer(key))
                seen += [r.text, json.dumps(dict(r.headers))]
            for ctype, body in (("application/json", b"[" * 1000), ("application/msgpack", b"\xc1"),
                                ("text/plain", b"x")):
                r = h.post("/v1/cross_entropy", content=body,
                           headers={"Content-Type": ctype, **bearer(key)})
                seen += [r.text, json.dumps(dict(r.headers))]
    return seen


def test_a_tenant_sees_only_its_own_row(server, session):
    for name, key in KEYS.items():
        r = httpx.get(server.url + "/v1/status", headers=bearer(key))
        assert r.status_code == 200
        st = r.json()["scheduler"]
        assert list(st["tenants"]) == [name] and st["tenants"][name]["completed"] >= 1
        others = [n for n in KEYS if n != name]
        assert not any(o in r.text for o in others), r.text
        assert all(set(d["backlogged_tenants"]) <= {name} for d in st["devices"])


def test_the_admin_sees_every_tenant(server, session):
    st = httpx.get(server.url + "/v1/status", headers=bearer(ADMIN_KEY)).json()["scheduler"]
    assert set(st["tenants"]) >= set(KEYS)


def test_status_without_a_valid_key_is_401(server):
    for headers in ({}, bearer(WRONG_KEY), {"Authorization": "Basic abc"}):
        r = httpx.get(server.url + "/v1/status", headers=headers)
        assert r.status_code == 401 and r.json()["error"]["code"] == "unauthorized"
        assert "alpha" not in r.text and "beta" not in r.text


def test_metrics_are_the_admins_or_the_separate_listeners(server, session):
    for headers in ({}, bearer(KEYS["alpha"]), bearer(WRONG_KEY)):
        assert httpx.get(server.url + "/metrics", headers=headers).status_code == 401
    admin = httpx.get(server.url + "/metrics", headers=bearer(ADMIN_KEY))
    assert admin.status_code == 200 and 'tenant="alpha"' in admin.text
    scraped = httpx.get(f"http://127.0.0.1:{METRICS_PORT}/metrics")   # Prometheus, no key
    assert scraped.status_code == 200 and 'clce_requests_total{outcome="ok",tenant="alpha"}' in scraped.text


def test_no_key_anywhere_after_a_session(server, session):
    everything = {
        "log": server.log(),
        "answers": "\n".join(session),
        "metrics": httpx.get(server.url + "/metrics", headers=bearer(ADMIN_KEY)).text,
        "metrics_listener": httpx.get(f"http://127.0.0.1:{METRICS_PORT}/metrics").text,
        "status": httpx.get(server.url + "/v1/status", headers=bearer(ADMIN_KEY)).text,
        "info": httpx.get(server.url + "/v1/info").text,
    }
    assert '"tenant": "alpha"' in everything["log"]       # the access log was searched, not empty
    for where, text in everything.items():
        for secret in SECRETS:
            assert secret not in text, f"a key in the {where}"
            assert secret[-8:] not in text, f"a key's tail in the {where}"
