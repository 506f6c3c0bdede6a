"""Memory reuse for real training loops (clce_client.buffers): with dynamic padding (a different
row count every step) and mixed dtypes, a loop's shared-memory regions and its TCP receive buffers
are made a few times and then reused, so the server's kernel and the client write into memory
already touched. Counted, not timed: `created` is the number of buffers made, each one a first
touch of its pages. The times are in bench/bench_arena.py."""

from __future__ import annotations

import gc

import numpy as np
import pytest

import clce_client
from clce_client.buffers import TAKE_RATIO, BufferPool, FreeList, size_class
from tests.support.serverproc import server_fixture

torch = pytest.importorskip("torch")
F = torch.nn.functional

server = server_fixture()

STEPS = 20
CLASSES = 32000


def lengths(seed=0, lo=512, hi=2048, n=STEPS):
    return [int(v) for v in np.random.default_rng(seed).integers(lo, hi + 1, n)]


# ---- the policy, on sizes alone -----------------------------------------------------------------

def simulate(sizes, *, concurrent=1, max_cached=8 << 30):
    """A loop that holds `concurrent` buffers at once per step (e.g. the logits and the call's
    region), each of the step's size, and frees them at the end of the step. Returns `created`."""
    free: FreeList[int] = FreeList(max_cached)
    ids = iter(range(10**6))
    made = {}
    for n in sizes:
        held = []
        for _ in range(concurrent):
            buf = free.take(n)
            if buf is None:
                free.grow(size_class(n))
                buf = next(ids)
                made[buf] = size_class(n)
            assert made[buf] >= n
            held.append(buf)
        for buf in held:
            free.give(made[buf], buf)
        assert free.cached <= max_cached
    return free.created


def test_size_classes_round_up_by_at_most_a_quarter():
    for n in [1, 63, 64, 65, 1000, 4096, 5000, 1 << 20, (1 << 20) + 1, 262_144_000, 3 * 2**27 + 5]:
        c = size_class(n)
        assert n <= c <= max(64, n * 1.25 + 64) and c % 64 == 0, (n, c)
    # nearby sizes share a class: 2048 rows and 2040 rows of 32000 fp32 classes
    assert size_class(2048 * CLASSES * 4) == size_class(2040 * CLASSES * 4)


@pytest.mark.parametrize("seed", range(5))
def test_a_dynamic_padding_loop_makes_few_buffers(seed):
    """20 random lengths of 512-2048 rows x 32000 classes: the logits' bytes plus the gradient's
    (one region per call over shared memory). Exact-size reuse would make about 20."""
    sizes = [2 * n * CLASSES * 4 + n * 8 for n in lengths(seed)]
    assert len({size_class(s) for s in sizes}) > 6           # exact or fine classes would miss
    assert simulate(sizes) <= 5
    assert simulate(sizes, concurrent=2) <= 10


def test_mixed_dtypes_reuse_the_same_buffers():
    """fp32 and bf16 steps alternating: the bf16 step fits in the fp32 step's buffer."""
    sizes = [n * CLASSES * (4 if k % 2 else 2) for k, n in enumerate(lengths(1))]
    assert simulate(sizes) <= 5


def test_a_small_request_does_not_take_a_huge_buffer():
    free: FreeList[str] = FreeList(1 << 40)
    free.give(1 << 30, "big")
    assert free.take((1 << 30) // (TAKE_RATIO + 1)) is None
    assert free.take((1 << 30) // TAKE_RATIO) == "big"


def test_what_is_kept_is_bounded():
    free: FreeList[int] = FreeList(100)
    assert free.give(60, 1) == [] and free.give(30, 2) == []
    assert free.give(50, 3) == [2, 3]       # over the bound: the smallest go first
    assert free.cached == 60 and free.take(60) == 1


# ---- the TCP receive pool ------------------------------------------------------------------------

def test_buffer_pool_reuses_released_memory_and_never_what_is_held():
    pool = BufferPool(1 << 30)
    a = pool.empty_bytes(5 << 20)
    a[:] = 1
    addr = a.ctypes.data
    b = pool.empty_bytes(5 << 20)                    # a is held: b is other memory
    assert not np.shares_memory(a, b)
    view = a[10:20]
    del a
    d = pool.empty_bytes(5 << 20)
    assert d.ctypes.data != addr                     # a view keeps a out of the pool
    del view
    gc.collect()
    c = pool.empty_bytes(4 << 20)                    # smaller: reuses the same pages
    assert c.ctypes.data == addr and c[0] == 1
    assert pool.stats["created"] == 3                # a, b, and one while a's view lived
    t = pool.empty((1000, 1000), torch.float32)
    assert isinstance(t, torch.Tensor) and t.shape == (1000, 1000) and t.data_ptr() % 4096 == 0
    assert pool.empty(10, np.float64).shape == (10,)  # small: not pooled


def test_buffer_pool_keeps_at_most_its_bound():
    pool = BufferPool(8 << 20)
    held = [pool.empty_bytes(5 << 20) for _ in range(3)]
    del held
    assert pool.stats["cached_bytes"] <= 8 << 20 and pool.stats["free"] == 1
    nothing = BufferPool(0)
    x = nothing.empty_bytes(2 << 20)
    del x
    assert nothing.stats["cached_bytes"] == 0 and nothing.stats["free"] == 0


# ---- real loops against a server ------------------------------------------------------------------

LOOP_CLASSES = 1000          # 2-8 MB of logits per step: the policy is relative, the test quick


def train_with_padding(loss_of, seed=0, dtype=torch.float32):
    """A classifier trained on batches of random row counts (dynamic padding)."""
    torch.manual_seed(seed)
    model = torch.nn.Linear(32, LOOP_CLASSES).to(dtype)
    optim = torch.optim.SGD(model.parameters(), lr=0.1)
    g = torch.Generator().manual_seed(seed)
    losses = []
    for n in lengths(seed):
        x = torch.randn(n, 32, generator=g).to(dtype)
        y = torch.randint(0, LOOP_CLASSES, (n,), generator=g)
        loss = loss_of(model(x), y)
        optim.zero_grad()
        loss.backward()
        optim.step()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("transport", ["shm", "tcp"])
def test_a_padding_loop_touches_new_memory_a_few_times(server, transport):
    with clce_client.Client(server.url, transport=transport) as client:
        remote = train_with_padding(lambda x, y: client.cross_entropy(x, y))
        pool = client._arena.stats if transport == "shm" else client._buffers.stats
        assert pool["created"] <= 6, pool
        assert pool["reused"] >= STEPS - pool["created"], pool
    local = train_with_padding(lambda x, y: F.cross_entropy(x, y))
    np.testing.assert_allclose(remote, local, rtol=1e-5)


def test_fp32_and_bf16_steps_share_regions(server):
    with clce_client.Client(server.url, transport="shm") as client:
        for k, n in enumerate(lengths(2)):
            dtype = torch.float32 if k % 2 else torch.bfloat16
            x = torch.randn(n, LOOP_CLASSES, dtype=dtype, requires_grad=True)
            y = torch.randint(0, LOOP_CLASSES, (n,))
            client.cross_entropy(x, y).backward()
            ref = x.detach().float().requires_grad_()
            F.cross_entropy(ref, y).backward()
            torch.testing.assert_close(x.grad.float(), ref.grad, rtol=2e-2, atol=1e-4)
        assert client._arena.stats["created"] <= 6, client._arena.stats


def test_a_closed_pool_keeps_nothing_and_held_arrays_stay_valid():
    pool = BufferPool(1 << 30)
    kept = pool.empty_bytes(3 << 20)
    kept[:] = 7
    free = pool.empty_bytes(3 << 20)
    del free
    pool.close()
    assert pool.stats["cached_bytes"] == 0 and pool.stats["free"] == 0
    assert int(kept.sum()) == 7 * (3 << 20)          # still mapped while held
    del kept
    assert pool.stats["free"] == 0 and not pool._returned
