"""torch.compile on the README's API, with a real server: ``clce_client.cross_entropy``,
``Client.cross_entropy`` and ``CrossEntropyLoss`` inside a compiled function give one graph with no
graph break (the call becomes the operator clce::cross_entropy, clce_client.ops), and the loss and
gradients of eager mode. Before, dynamo traced into the HTTP client and failed with
``setStorage: ... out of bounds``."""

from __future__ import annotations


import pytest
from tests.support.serverproc import server_fixture  # noqa: E402

import clce_client  # noqa: E402

torch = pytest.importorskip("torch")
F = torch.nn.functional

D, V = 16, 33
server = server_fixture()
ENTRIES = ("clce_client.cross_entropy", "Client.cross_entropy", "CrossEntropyLoss", "CrossEntropyLoss(client)")


@pytest.fixture(scope="module")
def client(server):
    with clce_client.Client(server.url) as c:
        yield c


@pytest.fixture
def default_client(client, monkeypatch):
    """clce_client.cross_entropy and a CrossEntropyLoss without a client use this client."""
    monkeypatch.setattr(clce_client.client, "_default", client)
    return client


class Model(torch.nn.Module):
    def __init__(self, entry, client):
        super().__init__()
        torch.manual_seed(0)
        self.lin = torch.nn.Linear(D, V)
        if entry == "CrossEntropyLoss":
            self.loss_fn = clce_client.CrossEntropyLoss(label_smoothing=0.1)
        elif entry == "CrossEntropyLoss(client)":
            self.loss_fn = clce_client.CrossEntropyLoss(label_smoothing=0.1, client=client)
        elif entry == "Client.cross_entropy":
            self.loss_fn = lambda x, y: client.cross_entropy(x, y, label_smoothing=0.1)   # the call
        else:
            self.loss_fn = lambda x, y: clce_client.cross_entropy(x, y, label_smoothing=0.1)

    def forward(self, h, y):
        return self.loss_fn(self.lin(torch.tanh(h)), y)


def data(seed=0):
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, V, (12,), generator=g)
    y[3] = -100
    return torch.randn(12, D, generator=g), y


@pytest.mark.parametrize("entry", ENTRIES)
def test_no_graph_break_and_the_operator_as_one_node(default_client, entry):
    torch._dynamo.reset()
    explained = torch._dynamo.explain(Model(entry, default_client))(*data())
    assert explained.graph_break_count == 0 and explained.graph_count == 1, explained.break_reasons
    targets = [n.target for n in explained.graphs[0].graph.nodes if n.op == "call_function"]
    assert targets.count(torch.ops.clce.cross_entropy.default) + targets.count(torch.ops.clce.cross_entropy) == 1, \
        targets


@pytest.mark.parametrize("entry", ENTRIES)
def test_compiled_equals_eager_and_torch(default_client, entry):
    torch._dynamo.reset()
    h, y = data()
    eager = Model(entry, default_client)
    loss_e = eager(h, y)
    loss_e.backward()
    model = Model(entry, default_client)
    compiled = torch.compile(model, fullgraph=True)
    for seed in (0, 1):               # the second call runs the cached graph on other data
        h, y = data(seed)
        model.zero_grad()
        eager.zero_grad()
        loss_c = compiled(h, y)
        loss_c.backward()
        loss_e = eager(h, y)
        loss_e.backward()
        torch.testing.assert_close(loss_c, loss_e, rtol=1e-6, atol=1e-6)
        for (name, p), q in zip(model.named_parameters(), eager.parameters()):
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-7, msg=name)
    local = torch.nn.Linear(D, V)
    local.load_state_dict(eager.lin.state_dict())
    ref = F.cross_entropy(local(torch.tanh(h)), y, label_smoothing=0.1)
    ref.backward()
    torch.testing.assert_close(loss_c, ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(model.lin.weight.grad, local.weight.grad, rtol=1e-5, atol=1e-6)


def test_compiled_options_of_the_operator(client):
    """shift/classes_last and reduction='none' through Client.cross_entropy under compile, with
    return_grad=False as in eager mode (a loss without a grad_fn)."""
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, 5, V, generator=g, requires_grad=True)
    y = torch.randint(0, V, (2, 5), generator=g)
    fn = torch.compile(lambda x, y: client.cross_entropy(x * 1.0, y, reduction="none", shift=1), fullgraph=True)
    got = fn(x, y)
    ref = F.cross_entropy(x[:, :-1].transpose(1, 2), y[:, 1:], reduction="none")
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)
    go = torch.rand(ref.shape, generator=g)
    (gx,) = torch.autograd.grad(got, x, go)
    (gr,) = torch.autograd.grad(ref, x, go)
    torch.testing.assert_close(gx, gr, rtol=1e-5, atol=1e-7)
    detached = torch.compile(lambda x, y: client.cross_entropy(x, y[:, 0], return_grad=False), fullgraph=True)
    loss = detached(x[:, 0], y)
    assert loss.grad_fn is None
    torch.testing.assert_close(loss, F.cross_entropy(x[:, 0].detach(), y[:, 0]), rtol=1e-5, atol=1e-6)


def test_what_the_operator_does_not_compute_runs_eagerly(client):
    """return_lse (a CrossEntropyResult) is the eager client's: compiled code gets the eager result
    (the call runs outside the graph), where it used to fail while dynamo traced the client."""
    torch._dynamo.reset()
    lin = torch.nn.Linear(D, V)
    h, y = data()

    def fn(h, y):
        res = client.cross_entropy(lin(h), y, return_lse=True)
        return res.loss, res.lse

    loss, lse = torch.compile(fn)(h, y)
    logits = lin(h)
    torch.testing.assert_close(lse, torch.logsumexp(logits, 1), rtol=1e-5, atol=1e-5)
    loss.backward()
    ref = lin.weight.grad.clone()
    lin.zero_grad()
    F.cross_entropy(logits, y).backward()
    torch.testing.assert_close(ref, lin.weight.grad, rtol=1e-5, atol=1e-6)
