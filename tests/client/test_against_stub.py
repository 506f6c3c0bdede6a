"""Client behaviour against a small in-process HTTP server (no clce server needed).

The stand-in server (tests/support/stub_server.py) speaks the real wire format and computes with torch itself, so the values the
client returns can be compared with torch.nn.functional.cross_entropy exactly.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import httpx
import msgpack
import numpy as np
import pytest

import clce_client
from clce_client import errors
from clce_client.client import AsyncClient, Client, CrossEntropyResult, _chunks
from clce_wire.protocol import MSGPACK, decode_message, encode_message, error_body
from tests.support.stub_server import TIMING, closed_url, logits, server  # noqa: F401  (fixtures)

torch = pytest.importorskip("torch")
F = torch.nn.functional

REPO = Path(__file__).resolve().parents[2]


# --- numpy --------------------------------------------------------------------------------------


def test_numpy_loss_matches_torch_and_keeps_dtype(server):
    x, t = logits()
    with Client(server.url) as client:
        loss = client.cross_entropy(x, t)
        assert isinstance(loss, np.ndarray) and loss.shape == () and loss.dtype == np.float32
        expected = F.cross_entropy(torch.from_numpy(x), torch.from_numpy(t))
        assert loss.item() == expected.item()
        none = client.cross_entropy(x.astype(np.float64), t, reduction="none")
        assert none.dtype == np.float64 and none.shape == (8,)
        np.testing.assert_array_equal(
            none, F.cross_entropy(torch.from_numpy(x).double(), torch.from_numpy(t),
                                  reduction="none").numpy()
        )  # fmt: skip
    req = decode_message(server.requests[0]["body"])
    assert req["ignore_index"] == -100 and req["reduction"] == "mean" and req["v"] == 1
    assert server.requests[0]["headers"]["content-type"] == MSGPACK


def test_numpy_extras_return_a_result(server):
    x, t = logits()
    w = np.linspace(0.5, 2.0, 5).astype(np.float32)
    with Client(server.url) as client:
        res = client.cross_entropy(x, t, w, label_smoothing=0.1, return_grad=True,
                                   return_lse=True, return_argmax=True)  # fmt: skip
    assert isinstance(res, CrossEntropyResult)
    xt = torch.from_numpy(x).requires_grad_()
    ref = F.cross_entropy(xt, torch.from_numpy(t), torch.from_numpy(w), label_smoothing=0.1)
    ref.backward()
    assert res.loss.item() == ref.item()
    np.testing.assert_array_equal(res.grad, xt.grad.numpy())
    np.testing.assert_allclose(res.lse, torch.logsumexp(xt.detach(), 1).numpy(), rtol=1e-6)
    assert res.argmax.dtype == np.int64
    np.testing.assert_array_equal(res.argmax, x.argmax(1))
    assert res.accuracy == pytest.approx(float((x.argmax(1) == t).mean()))
    assert res.z_loss is None
    assert res.server_timing == TIMING


def test_large_upload_has_content_length_and_download_is_zero_copy(server):
    rng = np.random.default_rng(3)
    x = rng.standard_normal((2048, 1024)).astype(np.float32)  # 8 MiB
    t = rng.integers(0, 1024, size=2048)
    with Client(server.url, chunk_bytes=1 << 20) as client:
        res = client.cross_entropy(x, t, return_grad=True)
    req = server.requests[-1]
    assert not req["chunked"] and "transfer-encoding" not in req["headers"]
    assert int(req["headers"]["content-length"]) == len(req["body"]) > 8 * 2**20
    sent = decode_message(req["body"])["input"]
    assert bytes(sent.data) == x.tobytes()
    # loss and gradient are writable views into the one preallocated response buffer
    assert res.grad.shape == x.shape and res.grad.flags.writeable
    roots = []
    for arr in (res.grad, res.loss):
        root = None
        while isinstance(arr, (np.ndarray, memoryview)):    # down to None, or the pool's mmap
            root = arr if isinstance(arr, np.ndarray) else root
            arr = arr.obj if isinstance(arr, memoryview) else arr.base
        assert root.nbytes >= 8 * 2**20
        roots.append(root)
    assert roots[0] is roots[1]


def test_chunks_slice_tensors_without_copying():
    big = np.arange(3 << 20, dtype=np.uint8)
    segments = encode_message({"a": 1, "x": big, "b": "tail"})
    chunks = list(_chunks(segments, 1 << 20))
    assert b"".join(chunks) == b"".join(segments)
    assert all(len(c) <= 1 << 20 for c in chunks)
    views = [c for c in chunks if isinstance(c, memoryview)]
    assert len(views) == 3 and all(np.shares_memory(np.frombuffer(v, np.uint8), big) for v in views)


# --- torch --------------------------------------------------------------------------------------


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_torch_autograd_uses_the_returned_gradient(server, reduction):
    x, t = logits(6, 7, seed=1)
    x_remote = torch.from_numpy(x.copy()).requires_grad_()
    x_local = torch.from_numpy(x.copy()).requires_grad_()
    target = torch.from_numpy(t)
    with Client(server.url) as client:
        loss = client.cross_entropy(x_remote, target, reduction=reduction)
    ref = F.cross_entropy(x_local, target, reduction=reduction)
    assert loss.grad_fn is not None and loss.dtype == torch.float32
    torch.testing.assert_close(loss, ref, rtol=0, atol=0)
    # a non-trivial grad_output exercises the chain rule (broadcast over classes for 'none')
    scale = torch.arange(1.0, 1.0 + loss.numel()).reshape(loss.shape)
    (loss * scale).sum().backward()
    (ref * scale).sum().backward()
    torch.testing.assert_close(x_remote.grad, x_local.grad, rtol=1e-6, atol=1e-7)
    assert len(server.requests) == 1  # one round trip gives loss and gradient
    assert decode_message(server.requests[0]["body"])["return_grad"] is True


def test_torch_unbatched_none_and_no_grad(server):
    x = torch.randn(9, generator=torch.Generator().manual_seed(0), requires_grad=True)
    target = torch.tensor(4)
    with Client(server.url) as client:
        loss = client.cross_entropy(x, target, reduction="none")
        (loss * 3).backward()
        ref_x = x.detach().clone().requires_grad_()
        (F.cross_entropy(ref_x, target, reduction="none") * 3).backward()
        torch.testing.assert_close(x.grad, ref_x.grad)
        with torch.no_grad():
            plain = client.cross_entropy(x, target)
        assert plain.grad_fn is None
        assert decode_message(server.requests[-1]["body"])["return_grad"] is False
        # gradient accumulation divides the loss in place
        x.grad = None
        loss = client.cross_entropy(x, target)
        loss /= 4
        loss.backward()
        ref_x.grad = None
        (F.cross_entropy(ref_x, target) / 4).backward()
        torch.testing.assert_close(x.grad, ref_x.grad)
        assert client.cross_entropy(x, target, return_grad=False).grad_fn is None


def test_torch_bfloat16_goes_as_raw_bits(server):
    x, t = logits(4, 6, seed=2)
    xb = torch.from_numpy(x).to(torch.bfloat16).requires_grad_()
    with Client(server.url) as client:
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # e.g. torch.from_numpy on read-only memory
            res = client.cross_entropy(xb, torch.from_numpy(t), return_grad=True, return_lse=True)
    sent = decode_message(server.requests[0]["body"])["input"]
    assert sent.dtype == "bfloat16"
    assert bytes(sent.data) == xb.detach().view(torch.int16).numpy().tobytes()
    ref_x = xb.detach().clone().requires_grad_()
    ref = F.cross_entropy(ref_x, torch.from_numpy(t))
    ref.backward()
    assert res.loss.dtype == torch.bfloat16 and res.loss.item() == ref.item()
    assert res.grad.dtype == torch.bfloat16 and torch.equal(res.grad, ref_x.grad)
    assert res.lse.dtype == torch.float32 and res.lse.shape == (4,)
    res.loss.backward()
    assert torch.equal(xb.grad, ref_x.grad)


def test_cross_entropy_loss_module(server):
    x, t = logits(5, 3, seed=4)
    w = torch.tensor([1.0, 2.0, 0.5])
    with Client(server.url) as client:
        module = clce_client.CrossEntropyLoss(weight=w, ignore_index=1, reduction="sum",
                                              client=client)  # fmt: skip
        assert isinstance(module, torch.nn.Module) and "weight" in dict(module.named_buffers())
        xt = torch.from_numpy(x).requires_grad_()
        loss = module(xt, torch.from_numpy(t))
    ref = torch.nn.CrossEntropyLoss(weight=w, ignore_index=1, reduction="sum")(
        torch.from_numpy(x), torch.from_numpy(t)
    )
    torch.testing.assert_close(loss, ref, rtol=0, atol=0)
    req = decode_message(server.requests[0]["body"])
    assert req["ignore_index"] == 1 and req["reduction"] == "sum"


# --- auth, failover, errors -----------------------------------------------------------------


def test_api_key_is_sent_and_never_shown(server, monkeypatch):
    monkeypatch.setenv("CLCE_URL", server.url)
    monkeypatch.setenv("CLCE_API_KEY", "s3cret-key")
    client = Client()
    assert client.urls == [server.url]
    x, t = logits()
    client.cross_entropy(x, t)
    assert server.requests[-1]["headers"]["authorization"] == "Bearer s3cret-key"
    assert "s3cret" not in repr(client)
    denied = msgpack.packb(error_body("unauthorized", "unknown API key"))
    server.respond = lambda req: (401, {"content-type": MSGPACK}, denied)
    with pytest.raises(errors.AuthenticationError) as info:
        client.cross_entropy(x, t)
    assert "s3cret" not in str(info.value) and "s3cret" not in repr(info.value)
    assert info.value.status == 401
    client.close()
    with Client(server.url, api_key="") as anonymous:
        anonymous.healthz()
    assert "authorization" not in server.requests[-1]["headers"]


def test_read_timeout_is_raised_without_retrying(server):
    def slow(req):
        import time

        time.sleep(0.5)
        return 200, {"content-type": MSGPACK}, b"\x80"

    server.respond = slow
    with Client(server.url, timeout=httpx.Timeout(0.1), retries=3) as client:
        with pytest.raises(errors.ReadTimeout):
            client.cross_entropy(*logits())
    assert len(server.requests) == 1


def test_failover_skips_a_dead_replica(server, closed_url):
    x, t = logits()
    with Client(f"{closed_url}, {server.url}", retries=1) as client:
        losses = [client.cross_entropy(x, t).item() for _ in range(6)]
    assert len(set(losses)) == 1 and len(server.requests) == 6


def test_all_replicas_dead_raises_connect_error(closed_url):
    with Client([closed_url, closed_url + "/"], retries=2) as client:
        with pytest.raises(errors.ConnectError, match="after 3 attempts") as info:
            client.cross_entropy(*logits())
        assert client.healthz() is False
    assert isinstance(info.value, errors.TransportError)


def test_index_error_has_pytorchs_exact_message(server):
    x, _ = logits(2, 5)
    with Client(server.url) as client:
        with pytest.raises(IndexError, match="^Target 7 is out of bounds.$") as info:
            client.cross_entropy(x, np.array([1, 7]))
        assert isinstance(info.value, errors.BadRequest) and info.value.code == "index_error"
        with pytest.raises(ValueError, match="^avg is not a valid value for reduction$"):
            client.cross_entropy(x, np.array([1, 2]), reduction="avg")


def test_error_mapping_of_canned_responses(server):
    replies = {
        "json": (400, {"content-type": "application/json"},
                 json.dumps(error_body("runtime_error", "boom")).encode()),
        "429": (429, {"content-type": MSGPACK, "retry-after": "3"},
                msgpack.packb(error_body("queue_full", "queue is full"))),
        "504": (504, {"content-type": MSGPACK},
                msgpack.packb(error_body("deadline_exceeded", "deadline passed"))),
        "413": (413, {"content-type": MSGPACK},
                msgpack.packb(error_body("payload_too_large", "too big"))),
        "html": (502, {"content-type": "text/html"}, b"<h1>Bad Gateway</h1>"),
    }  # fmt: skip
    expected = {
        "json": (errors.ClceRuntimeError, "boom"),
        "429": (errors.Overloaded, "queue is full"),
        "504": (errors.DeadlineExceeded, "deadline passed"),
        "413": (errors.PayloadTooLarge, "too big"),
        "html": (errors.ServerError, f"{server.url}/v1/cross_entropy answered HTTP 502: <h1>Bad Gateway</h1>"),
    }
    with Client(server.url, retries=3, retry_budget_s=0) as client:
        for name, reply in replies.items():
            server.respond = lambda req, reply=reply: reply
            before = len(server.requests)
            with pytest.raises(expected[name][0]) as info:
                client.cross_entropy(*logits())
            assert str(info.value) == expected[name][1]
            assert len(server.requests) == before + 1  # none of these is retried (429: budget 0)
    assert expected["json"][0].__mro__[1:3] == (errors.BadRequest, errors.ServerError)
    assert isinstance(info.value, errors.ServerError) and info.value.status == 502


def test_overloaded_carries_retry_after(server):
    full = msgpack.packb(error_body("queue_full", "tenant queue full"))
    server.respond = lambda req: (429, {"content-type": MSGPACK, "retry-after": "7"}, full)
    with Client(server.url) as client:
        client.retry_budget_s = 5.0   # Retry-After 7 s would overrun it: raised at once
        with pytest.raises(errors.Overloaded, match="tenant queue full") as info:
            client.cross_entropy(*logits())
    assert info.value.retry_after == 7.0 and info.value.status == 429
    assert len(server.requests) == 1


def test_not_ready_is_retried_then_raised(server):
    warming = msgpack.packb(error_body("not_ready", "warming up"))
    server.respond = lambda req: (503, {"content-type": MSGPACK}, warming)
    with Client(server.url, retry_budget_s=2.0) as client:   # room for several round trips on a busy CPU
        with pytest.raises(errors.ServiceUnavailable, match="warming up"):
            client.cross_entropy(*logits())
        tries = len(server.requests)
        assert client.readyz() is False
    assert tries >= 3 and len(server.requests) == tries + 1  # backoff within the budget, one probe


def test_info_and_probes(server, closed_url):
    with Client([closed_url, server.url]) as client:
        assert client.info() == {"version": "test"}
        assert client.healthz() is True and client.readyz() is True


def test_module_level_cross_entropy_uses_the_environment(server, monkeypatch):
    from clce_client import client as client_module

    monkeypatch.setenv("CLCE_URL", server.url)
    monkeypatch.setattr(client_module, "_default", None)
    x, t = logits()
    assert clce_client.cross_entropy(x, t, reduction="sum").shape == ()
    assert client_module._default.urls == [server.url]
    client_module._default.close()


# --- asyncio ------------------------------------------------------------------------------------


def test_async_client(server, closed_url):
    rng = np.random.default_rng(5)
    big = rng.standard_normal((1024, 1024)).astype(np.float32)
    big_t = rng.integers(0, 1024, size=1024)

    async def main():
        async with AsyncClient([closed_url, server.url], api_key="k", chunk_bytes=1 << 18) as c:
            losses = await asyncio.gather(*(c.cross_entropy(*logits(seed=i)) for i in range(4)))
            res = await c.cross_entropy(big, big_t, return_grad=True)
            x = torch.from_numpy(big).requires_grad_()
            loss = await c.cross_entropy(x, torch.from_numpy(big_t))
            loss.backward()
            with pytest.raises(IndexError, match="Target 9 is out of bounds."):
                await c.cross_entropy(*logits(1, 3)[:1], np.array([9]))
            return losses, res, x.grad, await c.readyz(), await c.info()

    losses, res, grad, ready, info = asyncio.run(main())
    for i, loss in enumerate(losses):
        x, t = logits(seed=i)
        assert loss.item() == F.cross_entropy(torch.from_numpy(x), torch.from_numpy(t)).item()
    np.testing.assert_array_equal(res.grad, grad.numpy())
    assert ready is True and info == {"version": "test"}
    uploads = [r for r in server.requests if int(r["headers"].get("content-length", 0)) > 2**22]
    assert len(uploads) == 2 and not any(r["chunked"] for r in uploads)
    assert all(r["headers"]["authorization"] == "Bearer k" for r in server.requests)


# --- packaging ----------------------------------------------------------------------------------


def run_python(code: str, **env: str) -> str:
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60,
        env={**os.environ, "PYTHONPATH": str(REPO), **env},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip()


def test_import_does_not_load_torch():
    assert run_python("import sys, clce_client; print('torch' in sys.modules)") == "False"


def test_works_without_torch(server):
    code = """
import sys
sys.modules["torch"] = None  # import torch now raises ImportError
import numpy as np, clce_client
loss_fn = clce_client.CrossEntropyLoss(reduction="sum")
assert not hasattr(loss_fn, "parameters")
x = np.zeros((2, 4), np.float32)
print(loss_fn(x, np.array([0, 3])).item(), clce_client.cross_entropy(x, np.array([1, 2])).item())
"""
    out = run_python(code, CLCE_URL=server.url)
    assert [float(v) for v in out.split()] == pytest.approx([2 * np.log(4), np.log(4)])
