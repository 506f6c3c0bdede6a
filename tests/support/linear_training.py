"""The training loop of the replica and restart tests (tests/linear/test_replicas.py, tests/rails/test_ray.py,
tests/linear/test_restart_replay.py): a small
model whose LM head (2000x64) accumulates on the server over K micro-batches per optimizer step,
flushed by `client.weights.attach(optimizer)`, and the same loop in torch alone."""

from __future__ import annotations

from typing import NamedTuple

import torch

from clce_client.linear import AccumulationLost

F = torch.nn.functional

class Loop(NamedTuple):
    """A training loop's sizes (the replica tests use DEFAULT; the restart tests their own)."""

    steps: int          # optimizer steps
    k: int              # micro-batches per step
    n: int              # rows per micro-batch
    d: int              # input features
    h: int              # hidden
    v: int              # vocabulary
    ignore_every: int   # every this-th label is ignore_index


DEFAULT = Loop(4, 4, 96, 24, 64, 2000, 7)
STEPS, K, N, D, H, V = DEFAULT[:6]
KILL = (1, 2)                   # (step, micro-batch): where a test kills the weight's replica


# ---- the model and torch's own run -----------------------------------------------------------------

def data(seed: int = 0, loop: Loop = DEFAULT):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(loop.steps * loop.k):
        x = torch.randn(loop.n, loop.d, generator=g)
        y = torch.randint(0, loop.v, (loop.n,), generator=g)
        y[::loop.ignore_every] = -100
        out.append((x, y))
    return out


def make_model(loop: Loop = DEFAULT):
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(loop.d, loop.h), torch.nn.Tanh()), torch.nn.Linear(loop.h, loop.v)


def params(body, head):
    return {**{f"body.{k}": v.detach().clone() for k, v in body.state_dict().items()},
            **{f"head.{k}": v.detach().clone() for k, v in head.state_dict().items()}}


def local_steps(loop: Loop = DEFAULT):
    """Each step's parameters, trained by torch alone (loss / K accumulated over K micro-batches)."""
    body, head = make_model(loop)
    opt = torch.optim.SGD([*body.parameters(), *head.parameters()], lr=0.5, momentum=0.9)
    batches = iter(data(loop=loop))
    out = []
    for _ in range(loop.steps):
        for _ in range(loop.k):
            x, y = next(batches)
            (F.cross_entropy(head(body(x)), y) / loop.k).backward()
        opt.step()
        opt.zero_grad()
        out.append(params(body, head))
    return out


def compare(step: int, got: dict, want: dict) -> float:
    worst = 0.0
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-4, atol=1e-5,
                                   msg=lambda m, name=name: f"step {step}, parameter {name}: {m}")
        worst = max(worst, float((got[name] - want[name]).abs().max()))
    return worst


def train(client, local, kill=None, replay=True, loop: Loop = DEFAULT, at: tuple[int, int] = KILL):
    """The head accumulating on the server over `loop.k` micro-batches per step, flushed by the
    optimizer's pre-step hook. `kill()` runs once, before micro-batch `at` (step, micro-batch).
    Returns the worst difference from torch per step taken and the steps the flush refused
    (AccumulationLost); a refused step is taken again."""
    body, head = make_model(loop)
    opt = torch.optim.SGD([*body.parameters(), *head.parameters()], lr=0.5, momentum=0.9)
    weights = client.weights
    weights.replay = replay
    weights.attach(opt)
    batches = data(loop=loop)
    worst, refused = [], []
    step = 0
    while step < loop.steps:
        for mb in range(loop.k):
            if (step, mb) == at and kill is not None:
                kill()
                kill = None
            x, y = batches[step * loop.k + mb]
            loss = client.linear_cross_entropy(body(x), head.weight, y, head.bias, weight_name="head",
                                               accumulate=True)
            (loss / loop.k).backward()
        before = params(body, head)
        try:
            opt.step()
        except AccumulationLost as exc:
            refused.append((step, str(exc)))
            for name, value in params(body, head).items():   # no step on a partial sum
                assert torch.equal(value, before[name]), name
            opt.zero_grad()
            continue             # the step's micro-batches again (the server has none of them now)
        opt.zero_grad()
        worst.append(compare(step, params(body, head), local[step]))
        step += 1
    return worst, refused


def per_version(weights) -> dict[tuple[str, str], list[str]]:
    """The instances each (name, version) was uploaded to, in order."""
    out: dict[tuple[str, str], list[str]] = {}
    for name, version, instance in weights.upload_log:
        out.setdefault((name, version), []).append(instance)
    return out
