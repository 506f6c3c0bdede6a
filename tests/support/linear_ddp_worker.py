"""Two DDP ranks (gloo, CPU), each sending its shard's hidden states to the clce server's fused
linear cross-entropy; run by tests/linear/test_ddp.py as `python tests/support/linear_ddp_worker.py URL OUT`.

The same model with the local F.cross_entropy(F.linear(...)) in the same processes, from the same
weights, is the reference: losses and all-reduced gradients (head weight and bias included) must
agree at every step, and every rank must hold the same gradients."""

from __future__ import annotations

import gc
import json
import os
import socket
import sys

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

WORLD, STEPS = 2, 3
VOCAB, DIM, BATCH, SEQ = 64, 32, 4, 12


class TinyLM(torch.nn.Module):
    """Returns its loss: the head and the loss together, as the fused loss takes them."""

    def __init__(self, loss):
        super().__init__()
        self.emb = torch.nn.Embedding(VOCAB, DIM)
        self.mlp = torch.nn.Linear(DIM, DIM)
        self.head = torch.nn.Linear(DIM, VOCAB)
        self.loss = loss

    def forward(self, tokens, labels):
        hidden = torch.tanh(self.mlp(self.emb(tokens)))
        return self.loss(hidden, self.head.weight, self.head.bias, labels)


def worker(rank, port, url, out):
    import clce_client

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    client = clce_client.Client(url)

    def remote(h, W, b, y):
        return client.linear_cross_entropy(h, W, y, b, shift=1)

    def local(h, W, b, y):
        return F.cross_entropy(F.linear(h, W, b)[:, :-1].reshape(-1, VOCAB), y[:, 1:].reshape(-1))

    torch.manual_seed(0)
    init = TinyLM(None).state_dict()
    runs = {}
    for name, fn in (("clce", remote), ("local", local)):
        model = TinyLM(fn)
        model.load_state_dict(init)
        runs[name] = (DDP(model), torch.optim.SGD(model.parameters(), lr=0.5))
    worst_loss = worst_grad = 0.0
    for step in range(STEPS):
        g = torch.Generator().manual_seed(100 + step)
        tokens = torch.randint(0, VOCAB, (WORLD * BATCH, SEQ), generator=g)
        labels = tokens.roll(-1, 1)
        labels[torch.rand(labels.shape, generator=g) < 0.2] = -100
        shard = slice(rank * BATCH, (rank + 1) * BATCH)
        results = {}
        for name, (ddp, opt) in runs.items():
            opt.zero_grad()
            loss = ddp(tokens[shard], labels[shard])
            loss.backward()                       # DDP all-reduces here, the head's too
            results[name] = (loss.detach(), [p.grad.clone() for p in ddp.parameters()])
            opt.step()
        (lc, grads_c), (ll, grads_l) = results["clce"], results["local"]
        worst_loss = max(worst_loss, abs(lc.item() - ll.item()) / abs(ll.item()))
        worst_grad = max(worst_grad, max(((a - b).abs().max() / b.abs().max()).item() for a, b in zip(grads_c, grads_l)))
    flat = torch.cat([p.grad.reshape(-1) for p in runs["clce"][0].parameters()])
    gathered = [torch.empty_like(flat) for _ in range(WORLD)]
    dist.all_gather(gathered, flat)
    if rank == 0:
        with open(out, "w") as f:
            json.dump({"steps": STEPS, "max_rel_loss_dev": worst_loss, "max_rel_grad_dev": worst_grad,
                       "ranks_agree": all(torch.equal(gathered[0], t) for t in gathered)}, f)
    client.close()
    # examples/ddp_train.py's teardown order: without it a rank can abort or hang in gloo's
    # destructor (it holds the GIL while a worker thread still needs it to drop a tensor)
    dist.barrier()
    del runs, ddp, opt, results, gathered, flat
    gc.collect()
    dist.destroy_process_group()


if __name__ == "__main__":
    url, out = sys.argv[1], sys.argv[2]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(worker, args=(port, url, out), nprocs=WORLD, join=True)
