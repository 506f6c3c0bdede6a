"""Autocast with clce's loss: training under ``torch.autocast("cpu", dtype=torch.bfloat16)``.

    CLCE_URL=http://127.0.0.1:8000 python examples/autocast_loss.py

torch's autocast runs ``cross_entropy`` in float32 (it is on the CPU and CUDA "fp32" op lists):
bfloat16 logits are cast to float32 and the loss is float32. clce's operator is registered with the
same policy, so under autocast it does what F.cross_entropy does; this example trains a few steps
both ways and compares.
"""

from __future__ import annotations

import json
import os

import torch
import torch.nn.functional as F

import clce_client
from clce_client import ops

VOCAB, DIM, BATCH, SEQ, STEPS = 64, 32, 4, 16, 4


class TinyLM(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.emb = torch.nn.Embedding(VOCAB, DIM)
        self.mlp = torch.nn.Linear(DIM, DIM)
        self.head = torch.nn.Linear(DIM, VOCAB)

    def forward(self, tokens):
        return self.head(torch.tanh(self.mlp(self.emb(tokens))))


def train(loss_of):
    model = TinyLM()
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    g = torch.Generator().manual_seed(0)
    losses, dtypes = [], set()
    for _ in range(STEPS):
        tokens = torch.randint(0, VOCAB, (BATCH, SEQ), generator=g)
        labels = tokens.roll(-1, 1)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits = model(tokens)                  # bfloat16 under autocast
            loss = loss_of(logits, labels)          # float32: autocast's policy for cross_entropy
        dtypes.add((logits.dtype, loss.dtype))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses, dtypes


def main():
    with clce_client.Client(os.environ.get("CLCE_URL", clce_client.DEFAULT_URL)) as client:
        remote, remote_dtypes = train(lambda x, y: ops.cross_entropy(x, y, shift=1, client=client))
    local, local_dtypes = train(lambda x, y: F.cross_entropy(x[:, :-1].reshape(-1, VOCAB), y[:, 1:].reshape(-1)))
    dev = max(abs(a - b) / abs(b) for a, b in zip(remote, local))
    print(f"autocast (cpu, bfloat16): logits/loss dtypes clce {sorted(map(str, remote_dtypes))}, "
          f"F.cross_entropy {sorted(map(str, local_dtypes))}; {STEPS} steps, max rel. deviation {dev:.2e}")
    assert remote_dtypes == local_dtypes == {(torch.bfloat16, torch.float32)} and dev < 1e-4
    print("RESULT " + json.dumps({"integration": "autocast", "steps": STEPS, "policy": "fp32",
                                  "loss_dtype": "float32", "max_rel_loss_dev": dev}))


if __name__ == "__main__":
    main()
