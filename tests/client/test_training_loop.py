"""Training with the remote loss is training with torch's: the same model, data and seed, trained
once with torch.nn.functional.cross_entropy and once with clce (a real server), give the same loss
at every step and the same parameters at the end."""

from __future__ import annotations

import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))
from serverproc import server_fixture  # noqa: E402

import clce_client  # noqa: E402

torch = pytest.importorskip("torch")
F = torch.nn.functional

STEPS = 15
VOCAB, DIM, BATCH, SEQ = 96, 32, 8, 12

server = server_fixture()


@pytest.fixture(scope="module")
def client(server):
    with clce_client.Client(server.url) as c:
        yield c


class TinyLM(torch.nn.Module):
    """Embedding -> tanh MLP -> LM head: logits (B, T, V)."""

    def __init__(self):
        super().__init__()
        self.emb = torch.nn.Embedding(VOCAB, DIM)
        self.mlp = torch.nn.Linear(DIM, DIM)
        self.head = torch.nn.Linear(DIM, VOCAB)

    def forward(self, tokens):
        return self.head(torch.tanh(self.mlp(self.emb(tokens))))


def lm_data(seed=0):
    g = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(STEPS):
        tokens = torch.randint(0, VOCAB, (BATCH, SEQ + 1), generator=g)
        # a learnable pattern: the next token is often (token * 7 + 3) % VOCAB
        follow = (tokens[:, :-1] * 7 + 3) % VOCAB
        mask = torch.rand(BATCH, SEQ, generator=g) < 0.7
        tokens[:, 1:] = torch.where(mask, follow, tokens[:, 1:])
        inputs, targets = tokens[:, :-1], tokens[:, 1:].clone()
        # padded tail of each sequence: ignore_index=-1
        lengths = torch.randint(SEQ // 2, SEQ + 1, (BATCH,), generator=g)
        targets[torch.arange(SEQ)[None, :] >= lengths[:, None]] = -1
        batches.append((inputs, targets))
    return batches


def train_lm(loss_of, *, kdim=False, opt="sgd", seed=0):
    """Train TinyLM for STEPS steps; loss_of(logits, targets) -> scalar loss. Returns losses, state."""
    torch.manual_seed(seed)
    model = TinyLM()
    if opt == "sgd":
        optim = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
    else:
        optim = torch.optim.Adam(model.parameters(), lr=1e-2, foreach=False)  # no first-step import cost
    losses = []
    for inputs, targets in lm_data(seed):
        logits = model(inputs)                               # (B, T, V)
        if kdim:
            loss = loss_of(logits.transpose(1, 2), targets)  # (B, V, T) with (B, T) targets
        else:
            loss = loss_of(logits.reshape(-1, VOCAB), targets.reshape(-1))
        optim.zero_grad()
        loss.backward()
        optim.step()
        losses.append(loss.item())
    return losses, {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_same_training(remote, local, *, loss_rtol=1e-5, param_rtol=1e-4):
    (r_losses, r_state), (l_losses, l_state) = remote, local
    assert len(r_losses) == len(l_losses) == STEPS
    for step, (a, b) in enumerate(zip(r_losses, l_losses)):
        assert a == pytest.approx(b, rel=loss_rtol), f"step {step}: remote {a} vs torch {b}"
    assert l_losses[-1] < l_losses[0]   # it did learn something
    for name in l_state:
        torch.testing.assert_close(r_state[name], l_state[name], rtol=param_rtol, atol=1e-6,
                                   msg=lambda m, name=name: f"parameter {name}: {m}")
    # and the parameters moved: the comparison is not trivially between two untouched models
    torch.manual_seed(0)
    assert not torch.allclose(TinyLM().state_dict()["head.weight"], l_state["head.weight"])


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
