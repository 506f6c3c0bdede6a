"""The fused linear cross-entropy end to end: the real app over real HTTP, in this process
(tests/support/inprocess.py), the client's
autograd against torch's F.cross_entropy(F.linear(h, W, b), y) backward, the Liger-order module,
the weight stored once per version, server-side accumulation over k micro-batches against local
accumulation, re-upload after eviction, and clear errors for bad arguments."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import clce_client
from clce_client import errors
from tests.support.linear_reference import local, model
from tests.support.inprocess import inprocess_fixture

server = inprocess_fixture()


@pytest.fixture()
def client(server):
    with clce_client.Client(server.url) as c:
        yield c


@pytest.mark.parametrize("opts", [dict(), dict(reduction="sum", label_smoothing=0.1), dict(ignore_index=5)], ids=str)
def test_autograd_stateless_matches_torch(client, opts):
    h, W, b, y = model(1)
    if "ignore_index" in opts:
        y[::3] = 5
    loss = client.linear_cross_entropy(h, W, y, b, **opts)
    (loss * 0.5).backward()
    ref, h2, W2, b2 = local(h, W, y, b, **opts)
    (ref * 0.5).backward()
    torch.testing.assert_close(loss, ref)
    torch.testing.assert_close(h.grad, h2.grad)
    torch.testing.assert_close(W.grad, W2.grad)
    torch.testing.assert_close(b.grad, b2.grad)


def test_liger_order_module_and_shift(client):
    g = torch.Generator().manual_seed(2)
    h = torch.randn(2, 33, 24, generator=g, requires_grad=True)
    W = torch.randn(90, 24, generator=g, requires_grad=True)
    y = torch.randint(0, 90, (2, 33), generator=g)
    loss = clce_client.LinearCrossEntropyLoss(client=client, shift=1)(W, h, y)
    loss.backward()
    h2, W2 = h.detach().clone().requires_grad_(), W.detach().clone().requires_grad_()
    logits = F.linear(h2, W2)
    ref = F.cross_entropy(logits[:, :-1].reshape(-1, 90), y[:, 1:].reshape(-1))
    ref.backward()
    torch.testing.assert_close(loss, ref)
    torch.testing.assert_close(h.grad, h2.grad)
    torch.testing.assert_close(W.grad, W2.grad)


def test_stored_weight_accumulates_over_micro_batches(client, server):
    """k = 4 micro-batches of loss / k: the weight goes up once, its gradient comes down once
    (in flush, before the optimizer step), and equals local accumulation."""
    torch.manual_seed(3)
    W = torch.nn.Parameter(torch.randn(200, 32) / 32 ** 0.5)
    b = torch.nn.Parameter(torch.zeros(200))
    W_ref, b_ref = torch.nn.Parameter(W.detach().clone()), torch.nn.Parameter(b.detach().clone())
    opt = torch.optim.SGD([W, b], lr=0.5)
    opt_ref = torch.optim.SGD([W_ref, b_ref], lr=0.5)
    weights = client.weights
    weights.attach(opt)
    before = weights.uploads
    k = 4
    for step in range(2):
        for _ in range(k):
            h = torch.randn(70, 32)
            y = torch.randint(0, 200, (70,))
            loss = client.linear_cross_entropy(h, W, y, b, weight_name="head", accumulate=True)
            (loss / k).backward()
            assert W.grad is None        # held on the server until the step
            (F.cross_entropy(F.linear(h, W_ref, b_ref), y) / k).backward()
        opt.step()                       # the pre-step hook flushes first
        opt_ref.step()
        torch.testing.assert_close(W, W_ref)
        torch.testing.assert_close(b, b_ref)
        opt.zero_grad(set_to_none=True)
        opt_ref.zero_grad(set_to_none=True)
    assert weights.uploads - before == 2  # once per version: the step made the second


def test_evicted_weight_is_uploaded_again(client, server):
    import httpx

    torch.manual_seed(4)
    h, W, b, y = model(4, bias=False)
    first = client.linear_cross_entropy(h.detach(), W.detach(), y, weight_name="gone")
    assert httpx.delete(server.url + "/v1/weights/gone").status_code == 204   # as an eviction would
    again = client.linear_cross_entropy(h.detach(), W.detach(), y, weight_name="gone")
    torch.testing.assert_close(again, first)


def test_unknown_version_answers_not_found(client):
    from clce_client.linear import _post
    with pytest.raises(errors.WeightNotStored, match="upload it again") as err:
        _post(client, "/v1/weights/nothing/grad", {"v": 1, "weight_version": "x"})
    assert err.value.code == "weight_not_stored" and isinstance(err.value, errors.NotFound)


def test_bad_arguments_are_torch_errors(client):
    h, W, b, y = model(5)
    y = y.clone()
    y[7] = 310
    with pytest.raises(IndexError, match="Target 310 is out of bounds"):
        client.linear_cross_entropy(h.detach(), W.detach(), y)
    with pytest.raises(RuntimeError, match="mat1 and mat2 shapes cannot be multiplied"):
        client.linear_cross_entropy(h.detach()[:, :30], W.detach(), y)


def test_numpy_inputs_give_loss_and_gradients(client):
    h, W, b, y = model(6)
    out = client.linear_cross_entropy(h.detach().numpy(), W.detach().numpy(), y.numpy(), b.detach().numpy())
    ref, h2, W2, b2 = local(h, W, y, b)
    ref.backward()
    np.testing.assert_allclose(out["loss"], ref.item(), rtol=1e-5)
    np.testing.assert_allclose(out["grad_hidden"], h2.grad.numpy(), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(out["grad_weight"], W2.grad.numpy(), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(out["grad_bias"], b2.grad.numpy(), rtol=1e-4, atol=1e-6)


def test_custom_op_under_torch_compile(client):
    from clce_client.ops import linear_cross_entropy

    h, W, b, y = model(8)

    @torch.compile(backend="eager", fullgraph=True)
    def step(h, W, b, y):
        return linear_cross_entropy(h, W, y, b, client=client, label_smoothing=0.05) * 2.0

    loss = step(h, W, b, y)
    loss.backward()
    ref, h2, W2, b2 = local(h, W, y, b, label_smoothing=0.05)
    (ref * 2.0).backward()
    torch.testing.assert_close(loss, ref * 2.0)
    torch.testing.assert_close(h.grad, h2.grad)
    torch.testing.assert_close(W.grad, W2.grad)
    torch.testing.assert_close(b.grad, b2.grad)
    from clce_client.ops import client_key
    torch.library.opcheck(torch.ops.clce.linear_cross_entropy.default,
                          (h.detach(), W.detach(), y, b.detach(), None, -100, "mean", 0.0, 0.0, 0.0, 0,
                           client_key(client), False),
                          test_utils=("test_schema", "test_faketensor"))


@pytest.mark.parametrize("msg, status, match", [
    ({"v": 1, "target": np.zeros(3, np.int64)}, 400, "missing request field 'hidden'"),
    ({"v": 1, "hidden": np.zeros((3, 4), np.float32), "target": np.zeros(3, np.int64), "bogus": 1}, 400,
     "unknown request field 'bogus'"),
    ({"v": 1, "hidden": np.zeros((3, 4), np.float32), "target": np.zeros(3, np.int64),
      "weight": np.zeros((5, 4), np.float32), "reduction": 3}, 400, "reduction: expected a string"),
    ({"v": 1, "hidden": np.zeros((0, 4), np.float32), "target": np.zeros(0, np.int64),
      "weight": np.zeros((5, 4), np.float32), "reduction": "sum"}, 200, None),
    ({"v": 1, "hidden": np.zeros((3, 4), np.float32), "target": np.zeros(3, np.int64),
      "weight": np.zeros((5, 4), np.float32), "ignore_index": 1 << 63}, 400, "Overflow"),
    ({"v": 1, "hidden": np.zeros((3, 4), np.float32), "target": np.zeros(3, np.int64),
      "weight_name": "nope", "weight_version": "1"}, 404, "upload it again"),
], ids=["missing", "unknown", "type", "no_rows", "overflow", "unknown_weight"])
def test_bad_requests_get_clear_answers_not_500(server, msg, status, match):
    import httpx

    from clce_wire.protocol import encode_message
    r = httpx.post(server.url + "/v1/linear_cross_entropy", content=b"".join(bytes(s) for s in encode_message(msg)),
                   headers={"Content-Type": "application/msgpack"})
    assert r.status_code == status, r.text
    if match:
        import msgpack
        body = msgpack.unpackb(r.content) if "msgpack" in r.headers["content-type"] else r.json()
        assert match in body["error"]["message"]


def test_bf16_autograd_within_bf16_tolerance(client):
    h, W, b, y = model(9)
    hb = h.detach().bfloat16().requires_grad_()
    Wb = W.detach().bfloat16().requires_grad_()
    bb = b.detach().bfloat16().requires_grad_()
    loss = client.linear_cross_entropy(hb, Wb, y, bb)
    loss.backward()
    assert loss.dtype == torch.float32   # as Liger and Cut Cross-Entropy return it
    assert hb.grad.dtype == Wb.grad.dtype == bb.grad.dtype == torch.bfloat16
    ref, h2, W2, b2 = local(hb.detach().float(), Wb.detach().float(), y, bb.detach().float())
    ref.backward()
    tol = dict(atol=1e-2, rtol=1.6e-2)
    torch.testing.assert_close(loss.float(), ref, **tol)
    torch.testing.assert_close(hb.grad.float(), h2.grad, **tol)
    torch.testing.assert_close(Wb.grad.float(), W2.grad, **tol)
    torch.testing.assert_close(bb.grad.float(), b2.grad, **tol)


# ---- an accumulating micro-batch that fails part way -------------------------------------------------

def test_an_accumulating_micro_batch_failing_part_way_drops_the_version_and_gives_everything_back():
    """A device fault after the first chunk has added into the stored version's gradient: the
    version is dropped (the next call answers upload again) rather than keep a partial sum, and the
    request's pooled buffers and reservation are given back."""
    import httpx
    import pyopencl as cl

    from clce_wire import protocol
    from tests.support.inprocess import FailingEngine, InProcessServer, assert_all_given_back

    class FailsOnSecondChunk(FailingEngine):
        def __init__(self, engine):
            super().__init__(engine, "run_chunk", cl.MemoryError("MEM_OBJECT_ALLOCATION_FAILURE"))
            self.passes = 1

        def __getattr__(self, name):
            failing = super().__getattr__(name)
            if name != "run_chunk":
                return failing

            def run_chunk(*args, **kwargs):
                if self.passes:
                    self.passes -= 1
                    return getattr(self.engine, name)(*args, **kwargs)
                return failing(*args, **kwargs)
            return run_chunk

    def send(srv, method, path, msg):
        return httpx.request(method, srv.url + path, timeout=120, headers={"Content-Type": protocol.MSGPACK},
                             content=b"".join(bytes(s) for s in protocol.encode_message(msg)))

    rng = np.random.default_rng(13)
    W = rng.standard_normal((300, 32)).astype(np.float32)
    h = rng.standard_normal((2048, 32)).astype(np.float32)        # two chunks of 1024 rows
    y = rng.integers(0, 300, 2048)
    post = {"v": 1, "hidden": h, "target": y, "weight_name": "w", "weight_version": "1", "accumulate": True}
    with InProcessServer(max_batch=1) as srv:
        assert send(srv, "PUT", "/v1/weights/w", {"v": 1, "weight_version": "1", "weight": W}).status_code == 200
        assert send(srv, "POST", "/v1/linear_cross_entropy", post).status_code == 200
        from clce_server.linear.engine import LinearCrossEntropy

        index = srv.state.devices[0].index
        real = srv.state.linear_engines[index]   # the device's runtime, over a loss engine that fails
        srv.state.linear_engines[index] = LinearCrossEntropy(FailsOnSecondChunk(real.engine), real.gemm)
        try:
            failed = send(srv, "POST", "/v1/linear_cross_entropy", post)
        finally:
            srv.state.linear_engines[index] = real
        assert failed.status_code == 503, failed.content[:300]
        for path, msg in (("/v1/linear_cross_entropy", post), ("/v1/weights/w/grad", {"v": 1, "weight_version": "1"})):
            gone = send(srv, "POST", path, msg)
            assert gone.status_code == 404 and b"upload it again" in gone.content, gone.content[:300]
        assert send(srv, "PUT", "/v1/weights/w", {"v": 1, "weight_version": "1", "weight": W}).status_code == 200
        assert send(srv, "POST", "/v1/linear_cross_entropy", post).status_code == 200
        taken = protocol.decode_message(bytearray(send(srv, "POST", "/v1/weights/w/grad",
                                                       {"v": 1, "weight_version": "1"}).content))
        assert taken["micro_batches"] == 1
        ht, Wt = torch.from_numpy(h), torch.from_numpy(W).requires_grad_()
        F.cross_entropy(F.linear(ht, Wt), torch.from_numpy(y)).backward()
        torch.testing.assert_close(torch.from_numpy(protocol.decode_tensor(taken["grad_weight"]).copy()), Wt.grad)
        # the stored weight holds its share of the budget until it is deleted
        assert srv.state.scheduler.tenant_bytes("default") == srv.state.weight_store.tenant_bytes("default") > W.nbytes
        assert httpx.delete(srv.url + "/v1/weights/w", timeout=30).status_code == 204
        assert_all_given_back(srv.state)
