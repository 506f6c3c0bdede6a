"""A tiny causal LM trained for a few steps with a given loss, and the check that two such runs
(clce's loss and torch's) trained the same (tests/client/test_training_loop.py,
tests/client/test_failover.py)."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

STEPS = 15
VOCAB, DIM, BATCH, SEQ = 96, 32, 8, 12


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
