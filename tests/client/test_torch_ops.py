"""`torch.ops.clce.cross_entropy` (clce_client.ops) on a real server: eager parity with
F.cross_entropy, torch.compile with the op as one opaque node, and autocast's dtype policy."""

from __future__ import annotations


import pytest
from tests.support.serverproc import server_fixture  # noqa: E402

import clce_client  # noqa: E402

torch = pytest.importorskip("torch")
F = torch.nn.functional
from clce_client import ops  # noqa: E402

B, T, D, V = 2, 7, 16, 33
server = server_fixture()


@pytest.fixture(scope="module")
def client(server):
    with clce_client.Client(server.url) as c:
        yield c


class Head(torch.nn.Module):
    """A tiny LM head with its loss: (B, T, D) hidden states -> (B, T, V) logits -> causal LM loss."""

    def __init__(self, loss):
        super().__init__()
        torch.manual_seed(0)
        self.proj = torch.nn.Linear(D, D)
        self.head = torch.nn.Linear(D, V)
        self.loss = loss

    def forward(self, h, labels):
        return self.loss(self.head(torch.tanh(self.proj(h))), labels)


def clce_loss(client):
    return lambda logits, labels: ops.cross_entropy(logits, labels, shift=1, client=client)


def local_loss(logits, labels):
    return F.cross_entropy(logits[:, :-1].reshape(-1, V), labels[:, 1:].reshape(-1))


def data(seed=0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(B, T, D, generator=g)
    y = torch.randint(0, V, (B, T), generator=g)
    y[0, 3] = -100
    return h, y


def grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("layout", ["rows", "spatial", "shift", "classes_last"])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_op_matches_f_cross_entropy(client, layout, reduction):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(B, T, V, generator=g)
    y = torch.randint(0, V, (B, T), generator=g)
    w = torch.rand(V, generator=g) + 0.5
    kw = dict(weight=w, reduction=reduction, label_smoothing=0.1)
    if layout == "rows":
        args, ref_args, extra = (x.reshape(-1, V), y.reshape(-1)), None, {}
    elif layout == "spatial":
        args, ref_args, extra = (x.transpose(1, 2).contiguous(), y), None, {}
    elif layout == "shift":
        args, extra = (x, y), {"shift": 1}
        ref_args = (x[:, :-1].transpose(1, 2), y[:, 1:])
    else:
        args, extra = (x, y), {"classes_last": True}
        ref_args = (x.transpose(1, 2), y)
    ref_args = ref_args or args
    xi = args[0].clone().requires_grad_()
    got = ops.cross_entropy(xi, args[1], client=client, **kw, **extra)
    xr = x.clone().requires_grad_()
    # the reference differentiates through the same view of x
    ref_in = {"rows": lambda: xr.reshape(-1, V), "spatial": lambda: xr.transpose(1, 2),
              "shift": lambda: xr[:, :-1].transpose(1, 2), "classes_last": lambda: xr.transpose(1, 2)}[layout]()
    ref = F.cross_entropy(ref_in, ref_args[1], **kw)
    assert got.shape == ref.shape and got.dtype == ref.dtype
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)
    go = torch.rand(ref.shape, generator=g) + 0.5
    got.backward(go)
    ref.backward(go)
    want = {"rows": lambda gr: gr.reshape(-1, V), "spatial": lambda gr: gr.transpose(1, 2)}.get(layout, lambda gr: gr)
    torch.testing.assert_close(xi.grad, want(xr.grad), rtol=1e-5, atol=1e-7)


def test_op_without_grad_sends_no_gradient(client):
    h, y = data()
    x = torch.randn(B, T, V)
    with torch.no_grad():
        got = ops.cross_entropy(x.requires_grad_(), y, shift=1, client=client)
    assert got.grad_fn is None
    torch.testing.assert_close(got, local_loss(x.detach(), y), rtol=1e-6, atol=1e-6)


def test_compile_equals_eager(client):
    """torch.compile (inductor) with the loss inside the compiled function: the same loss and
    gradients as eager mode, and as the local loss."""
    h, y = data()
    eager = Head(clce_loss(client))
    loss_e = eager(h, y)
    loss_e.backward()

    compiled_model = Head(clce_loss(client))
    compiled = torch.compile(compiled_model)
    for step in range(2):      # a second call runs the cached graph
        compiled_model.zero_grad()
        loss_c = compiled(h, y)
        loss_c.backward()
        torch.testing.assert_close(loss_c, loss_e, rtol=0, atol=0)
        for name, g in grads(eager).items():
            torch.testing.assert_close(grads(compiled_model)[name], g, rtol=1e-6, atol=1e-7, msg=name)

    local = Head(local_loss)
    loss_l = local(h, y)
    loss_l.backward()
    torch.testing.assert_close(loss_e, loss_l, rtol=1e-6, atol=1e-6)
    for name, g in grads(local).items():
        torch.testing.assert_close(grads(eager)[name], g, rtol=1e-5, atol=1e-7, msg=name)


def test_compiled_graph_has_the_op_as_one_node(client):
    h, y = data()
    model = Head(clce_loss(client))
    explained = torch._dynamo.explain(model)(h, y)
    assert explained.graph_break_count == 0 and explained.graph_count == 1
    nodes = [n for n in explained.graphs[0].graph.nodes if n.op == "call_function"]
    # nothing of the HTTP client was traced: the model's two linears and tanh, the op, its output
    targets = [n.target for n in nodes]
    assert targets.count(torch.ops.clce.cross_entropy) == 1 and len(targets) == 5, targets


def test_a_compiled_function_follows_the_client_it_is_given(client):
    """The client is an argument of the compiled function: another client is used, not the one the
    graph was first compiled with (dynamo guards on it and recompiles)."""
    lin = torch.nn.Linear(D, V)
    compiled = torch.compile(lambda h, y, c: ops.cross_entropy(lin(h), y, client=c), backend="aot_eager")
    h, y = torch.randn(3, D), torch.randint(0, V, (3,))
    torch.testing.assert_close(compiled(h, y, client), F.cross_entropy(lin(h), y), rtol=1e-6, atol=1e-6)
    with clce_client.Client("http://127.0.0.1:9", retries=0) as unreachable:
        with pytest.raises(clce_client.ConnectError):
            compiled(h, y, unreachable)


def test_opcheck(client):
    """torch.library's own checks of the registration: schema, fake tensor, autograd."""
    x = torch.randn(B, T, V, requires_grad=True)
    y = torch.randint(0, V, (B, T))
    key = ops.client_key(client)
    for reduction in ("mean", "none"):
        torch.library.opcheck(torch.ops.clce.cross_entropy.default,
                              (x, y, None, -100, reduction, 0.0, 1, True, key, True),
                              test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))


def test_autocast_follows_torchs_fp32_policy_for_cross_entropy(client):
    """torch's CPU autocast runs cross_entropy_loss in float32 (it is on the fp32 list): with
    bfloat16 logits from a Linear under autocast, F.cross_entropy returns float32 computed on
    float32-cast logits. clce's op is registered with the same policy."""
    h, y = data()
    model_c, model_l = Head(clce_loss(client)), Head(local_loss)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model_l.head(torch.tanh(model_l.proj(h)))
        assert logits.dtype == torch.bfloat16
        assert F.cross_entropy(logits.reshape(-1, V), y.reshape(-1)).dtype == torch.float32   # the policy
        loss_c = model_c(h, y)
        loss_l = model_l(h, y)
    assert loss_c.dtype == loss_l.dtype == torch.float32
    # the same float32 math on the same bfloat16 logits
    torch.testing.assert_close(loss_c, loss_l, rtol=1e-6, atol=1e-6)
    loss_c.backward()
    loss_l.backward()
    for name, g in grads(model_l).items():
        assert grads(model_c)[name].dtype == g.dtype
        torch.testing.assert_close(grads(model_c)[name], g, rtol=1e-2, atol=1e-4, msg=name)
