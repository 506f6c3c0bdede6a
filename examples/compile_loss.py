"""torch.compile with clce's loss inside the compiled function.

    CLCE_URL=http://127.0.0.1:8000 python examples/compile_loss.py

`clce_client.ops.cross_entropy` is the operator ``torch.ops.clce.cross_entropy``
(torch.library.custom_op, with a fake implementation and register_autograd): the compiler sees
one opaque node and never traces the HTTP client, so the whole model, loss included, compiles
with no graph break. A few training steps, compiled and eager, give the same losses.
"""

from __future__ import annotations

import json
import os

import torch
import torch.nn.functional as F

import clce_client
from clce_client import ops

VOCAB, DIM, BATCH, SEQ, STEPS = 64, 32, 4, 16, 4


class LMWithLoss(torch.nn.Module):
    def __init__(self, client=None):
        super().__init__()
        torch.manual_seed(0)
        self.emb = torch.nn.Embedding(VOCAB, DIM)
        self.mlp = torch.nn.Linear(DIM, DIM)
        self.head = torch.nn.Linear(DIM, VOCAB)
        self.client = client

    def forward(self, tokens, labels):
        logits = self.head(torch.tanh(self.mlp(self.emb(tokens))))
        if self.client is None:     # the local reference
            return F.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), labels[:, 1:].reshape(-1))
        return ops.cross_entropy(logits, labels, shift=1, client=self.client)


def batches():
    g = torch.Generator().manual_seed(0)
    for _ in range(STEPS):
        tokens = torch.randint(0, VOCAB, (BATCH, SEQ), generator=g)
        labels = tokens.clone()
        labels[torch.rand(labels.shape, generator=g) < 0.2] = -100
        yield tokens, labels


def train(model, step_fn):
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    losses = []
    for tokens, labels in batches():
        opt.zero_grad()
        loss = step_fn(tokens, labels)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def main():
    with clce_client.Client(os.environ.get("CLCE_URL", clce_client.DEFAULT_URL)) as client:
        explained = torch._dynamo.explain(LMWithLoss(client))(*next(batches()))
        compiled_model = LMWithLoss(client)
        compiled = train(compiled_model, torch.compile(compiled_model))
        eager_model = LMWithLoss(client)
        eager = train(eager_model, eager_model)
    local_model = LMWithLoss()
    local = train(local_model, local_model)
    dev_eager = max(abs(a - b) / abs(b) for a, b in zip(compiled, eager))
    dev_local = max(abs(a - b) / abs(b) for a, b in zip(compiled, local))
    print(f"torch.compile: {explained.graph_count} graph, {explained.graph_break_count} graph breaks; {STEPS} steps, "
          f"max rel. deviation of the compiled loss from eager {dev_eager:.2e}, from the local loss {dev_local:.2e}")
    assert explained.graph_break_count == 0 and dev_eager < 1e-6 and dev_local < 1e-5
    print("RESULT " + json.dumps({"integration": "compile", "steps": STEPS, "graph_breaks": explained.graph_break_count,
                                  "max_rel_dev_from_eager": dev_eager, "max_rel_loss_dev": dev_local}))


if __name__ == "__main__":
    main()
