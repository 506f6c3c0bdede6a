"""PyTorch Lightning with clce's loss: a LightningModule whose training_step calls the server.

    CLCE_URL=http://127.0.0.1:8000 python examples/lightning_module.py

The module is an ordinary LightningModule; its loss is `clce_client.ops.cross_entropy` with the
causal LM shift done by the server. The same module with torch.nn.functional.cross_entropy is the
reference: from the same initial weights and data, the losses agree at every step.
"""

from __future__ import annotations

import json
import logging
import os
import warnings

import lightning as L
import torch
import torch.nn.functional as F

import clce_client
from clce_client import ops

VOCAB, DIM, BATCH, SEQ, STEPS = 64, 32, 8, 16, 6


class CausalLM(L.LightningModule):
    def __init__(self, use_clce: bool, client=None):
        super().__init__()
        torch.manual_seed(0)
        self.emb = torch.nn.Embedding(VOCAB, DIM)
        self.mlp = torch.nn.Linear(DIM, DIM)
        self.head = torch.nn.Linear(DIM, VOCAB)
        self.use_clce, self.client = use_clce, client
        self.losses: list[float] = []

    def forward(self, tokens):
        return self.head(torch.tanh(self.mlp(self.emb(tokens))))     # (B, T, V)

    def training_step(self, batch, batch_idx):
        tokens, labels = batch
        logits = self(tokens)
        if self.use_clce:
            # (B, T, V) and (B, T) as they are: the server drops the last position / first label
            loss = ops.cross_entropy(logits, labels, shift=1, client=self.client)
        else:
            loss = F.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), labels[:, 1:].reshape(-1))
        self.losses.append(loss.item())
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-2)


def data():
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, VOCAB, (BATCH * STEPS, SEQ), generator=g)
    tokens[:, 1::2] = (tokens[:, 0::2] * 7 + 2) % VOCAB
    labels = tokens.clone()
    labels[torch.rand(labels.shape, generator=g) < 0.15] = -100
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(tokens, labels), batch_size=BATCH)


def fit(module):
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=STEPS, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, deterministic=True)
    trainer.fit(module, data())
    return module


def main():
    logging.getLogger("lightning").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    with clce_client.Client(os.environ.get("CLCE_URL", clce_client.DEFAULT_URL)) as client:
        remote = fit(CausalLM(use_clce=True, client=client))
    local = fit(CausalLM(use_clce=False))
    assert len(remote.losses) == len(local.losses) == STEPS
    dev = max(abs(a - b) / abs(b) for a, b in zip(remote.losses, local.losses))
    wdev = max(((p - q).abs().max() / q.abs().max()).item() for p, q in zip(remote.parameters(), local.parameters()))
    print(f"Lightning: {STEPS} steps, losses {local.losses[0]:.4f} -> {local.losses[-1]:.4f}; max rel. deviation "
          f"from the local loss {dev:.2e}, of the trained weights {wdev:.2e}")
    assert dev < 1e-5 and wdev < 1e-4
    print("RESULT " + json.dumps({"integration": "lightning", "steps": STEPS, "max_rel_loss_dev": dev,
                                  "max_rel_weight_dev": wdev}))


if __name__ == "__main__":
    main()
