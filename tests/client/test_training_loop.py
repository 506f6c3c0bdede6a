"""Training with the remote loss is training with torch's: the same model, data and seed, trained
once with torch.nn.functional.cross_entropy and once with clce (a real server), give the same loss
at every step and the same parameters at the end."""

from __future__ import annotations

import pytest

import clce_client
from tests.support.serverproc import server_fixture
from tests.support.tiny_lm import STEPS, assert_same_training, train_lm

torch = pytest.importorskip("torch")
F = torch.nn.functional

server = server_fixture()


@pytest.fixture(scope="module")
def client(server):
    with clce_client.Client(server.url) as c:
        yield c


def test_module_level_cross_entropy_via_clce_url(server, monkeypatch):
    """clce_client.cross_entropy with the default client from CLCE_URL, ignore_index=-1."""
    monkeypatch.setenv("CLCE_URL", server.url)
    monkeypatch.setattr(clce_client.client, "_default", None)
    try:
        remote = train_lm(lambda x, t: clce_client.cross_entropy(x, t, ignore_index=-1))
        assert clce_client.default_client().urls == [server.url]
    finally:
        if clce_client.client._default is not None:
            clce_client.client._default.close()
    local = train_lm(lambda x, t: F.cross_entropy(x, t, ignore_index=-1))
    assert_same_training(remote, local)


def test_readme_one_line_swap(client):
    """The README's swap: CrossEntropyLoss(ignore_index=-1, label_smoothing=0.1, client=client),
    here on (B, V, T) logits as a sequence model produces them, trained with Adam."""
    loss_fn = clce_client.CrossEntropyLoss(ignore_index=-1, label_smoothing=0.1, client=client)
    ref_fn = torch.nn.CrossEntropyLoss(ignore_index=-1, label_smoothing=0.1)
    assert isinstance(loss_fn, torch.nn.Module)
    remote = train_lm(loss_fn, kdim=True, opt="adam")
    local = train_lm(ref_fn, kdim=True, opt="adam")
    assert_same_training(remote, local)


def test_weighted_classifier_sum_reduction(client):
    """An MLP classifier with class weights (a buffer of the loss module) and reduction='sum'."""
    g = torch.Generator().manual_seed(3)
    classes = 5
    centers = torch.randn(classes, 10, generator=g) * 2
    labels = torch.randint(0, classes, (STEPS, 32), generator=g)
    feats = centers[labels] + torch.randn(STEPS, 32, 10, generator=g)
    weight = torch.tensor([1.0, 2.0, 0.5, 1.5, 1.0])

    def train(loss_fn):
        torch.manual_seed(1)
        model = torch.nn.Sequential(torch.nn.Linear(10, 24), torch.nn.GELU(), torch.nn.Linear(24, classes))
        optim = torch.optim.SGD(model.parameters(), lr=0.01)
        losses = []
        for x, y in zip(feats, labels):
            loss = loss_fn(model(x), y)
            optim.zero_grad()
            loss.backward()
            optim.step()
            losses.append(loss.item())
        return losses, [p.detach().clone() for p in model.parameters()]

    remote_fn = clce_client.CrossEntropyLoss(weight=weight, reduction="sum", client=client)
    assert torch.equal(remote_fn.weight, weight)
    r_losses, r_params = train(remote_fn)
    l_losses, l_params = train(torch.nn.CrossEntropyLoss(weight=weight, reduction="sum"))
    assert r_losses == pytest.approx(l_losses, rel=1e-5)
    assert l_losses[-1] < l_losses[0]
    for a, b in zip(r_params, l_params):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
