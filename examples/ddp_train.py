"""DDP with clce's loss: two processes (gloo, CPU), each sending its own shard to the clce server.

    CLCE_URL=http://127.0.0.1:8000 python examples/ddp_train.py

Each rank computes the causal LM loss of its shard with `clce_client.ops.cross_entropy` (the
server does the shift); DDP all-reduces the gradients as usual. The same run with
torch.nn.functional.cross_entropy, in the same processes and from the same initial weights, is the
reference: the losses and the all-reduced gradients must agree at every step.
"""

from __future__ import annotations

import gc
import json
import os
import socket
import tempfile

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

import clce_client
from clce_client import ops

WORLD, STEPS = 2, 4
VOCAB, DIM, BATCH, SEQ = 64, 32, 4, 12        # BATCH sequences per rank


class TinyLM(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = torch.nn.Embedding(VOCAB, DIM)
        self.mlp = torch.nn.Linear(DIM, DIM)
        self.head = torch.nn.Linear(DIM, VOCAB)

    def forward(self, tokens):
        return self.head(torch.tanh(self.mlp(self.emb(tokens))))      # (B, T, V)


def global_batch(step):
    g = torch.Generator().manual_seed(1000 + step)
    tokens = torch.randint(0, VOCAB, (WORLD * BATCH, SEQ), generator=g)
    tokens[:, 1::2] = (tokens[:, 0::2] * 3 + 1) % VOCAB
    labels = tokens.clone()
    labels[torch.rand(labels.shape, generator=g) < 0.2] = -100
    return tokens, labels


def worker(rank, port, url, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    torch.manual_seed(0)
    init = TinyLM().state_dict()
    client = clce_client.Client(url)

    def clce_loss(logits, labels):
        return ops.cross_entropy(logits, labels, shift=1, client=client)

    def local_loss(logits, labels):
        return F.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), labels[:, 1:].reshape(-1))

    runs = {}
    for name in ("clce", "local"):
        model = TinyLM()
        model.load_state_dict(init)
        runs[name] = (DDP(model), torch.optim.SGD(model.parameters(), lr=0.5))
    worst_loss = worst_grad = 0.0
    for step in range(STEPS):
        tokens, labels = global_batch(step)
        shard = slice(rank * BATCH, (rank + 1) * BATCH)          # this rank's sequences only
        results = {}
        for name, loss_of in (("clce", clce_loss), ("local", local_loss)):
            ddp, opt = runs[name]
            opt.zero_grad()
            loss = loss_of(ddp(tokens[shard]), labels[shard])
            loss.backward()                                       # DDP all-reduces here
            results[name] = (loss.detach(), [p.grad.clone() for p in ddp.parameters()])
            opt.step()
        (lc, grads_clce), (ll, grads_local) = results["clce"], results["local"]
        worst_loss = max(worst_loss, abs(lc.item() - ll.item()) / abs(ll.item()))
        worst_grad = max(worst_grad, max(((a - b).abs().max() / b.abs().max()).item() for a, b in zip(grads_clce, grads_local)))
    # the all-reduce left every rank with the same gradients: check it across ranks too
    flat = torch.cat([p.grad.reshape(-1) for p in runs["clce"][0].parameters()])
    gathered = [torch.empty_like(flat) for _ in range(WORLD)]
    dist.all_gather(gathered, flat)
    same = all(torch.equal(gathered[0], t) for t in gathered)
    if rank == 0:
        with open(out, "w") as f:
            json.dump({"integration": "ddp", "world_size": WORLD, "steps": STEPS, "max_rel_loss_dev": worst_loss,
                       "max_rel_grad_dev": worst_grad, "ranks_agree": same}, f)
    client.close()
    # Teardown in this order, or a rank can hang for good: ProcessGroupGloo's destructor holds the
    # GIL while it waits for its work queue to drain, and a gloo worker that still has to drop a
    # Python tensor needs the GIL. The barrier drains every rank's queue; dropping the DDP models
    # (their reducers hold the group and its buckets) lets the group go with nothing pending.
    dist.barrier()
    del runs, ddp, opt, results, gathered, flat
    gc.collect()
    dist.destroy_process_group()


def main():
    url = os.environ.get("CLCE_URL", clce_client.DEFAULT_URL)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "result.json")
        mp.spawn(worker, args=(port, url, out), nprocs=WORLD, join=True)
        with open(out) as f:
            result = json.load(f)
    print(f"DDP x{WORLD}: {STEPS} steps, max rel. deviation from local DDP: "
          f"loss {result['max_rel_loss_dev']:.2e}, gradients {result['max_rel_grad_dev']:.2e}")
    assert result["ranks_agree"] and result["max_rel_loss_dev"] < 1e-5 and result["max_rel_grad_dev"] < 1e-5
    print("RESULT " + json.dumps(result))


if __name__ == "__main__":
    main()
