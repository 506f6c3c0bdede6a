"""Language-model batches on the default path (issue 26): the README's call, default client and
default server, at the sizes language models send (0.5-1 GB of logits here; the suite keeps to
what a 24 GiB machine holds beside torch's reference), against torch.

Also: a shared-memory budget smaller than the batch splits it into row chunks (bit-identical to one
request), pipelined TCP scores shifted labels exactly, the server's own memory does not grow with
the batch, every program is built before /readyz, and kernel sources are read at start.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import clce_client
from clce_client import errors
from tests.support.serverproc import ServerProcess, server_fixture

MiB = 1 << 20
server = server_fixture()          # the default server: no flag changed


def _torch_loss_and_grad(x: torch.Tensor, t: torch.Tensor, shift: int = 0, **kw):
    """torch's loss and the input's gradient, in float32 for a bf16 input (the reference)."""
    xr = x.detach().float().requires_grad_()
    if shift:
        V = x.shape[-1]
        loss = F.cross_entropy(xr[..., :-shift, :].reshape(-1, V), t[..., shift:].reshape(-1), **kw)
        if kw.get("reduction") == "none":
            loss = loss.view(*t.shape[:-1], -1)
    else:
        loss = F.cross_entropy(xr, t, **kw)
    loss.sum().backward()
    return loss.detach(), xr.grad


@pytest.mark.slow
@pytest.mark.parametrize("shape, dtype, shift", [
    ((8192, 32000), torch.float32, 0),              # 1.05 GB of logits
    ((2, 2048, 128256), torch.bfloat16, 1),         # 1.05 GB, Llama 3's vocabulary, labels shifted
], ids=["8192x32000-fp32", "2x2048x128256-bf16-shift"])
def test_language_model_batches_run_on_the_default_path(server, shape, dtype, shift):
    gen = torch.Generator().manual_seed(0)
    x = (torch.randn(*shape, generator=gen) * 2).to(dtype).requires_grad_()
    t = torch.randint(0, shape[-1], shape[:-1], generator=gen)
    t.view(-1)[::97] = -100
    with clce_client.Client(server.url) as client:          # transport "auto": shared memory here
        loss = client.cross_entropy(x, t, shift=shift) if shift else client.cross_entropy(x, t)
        loss.backward()
        assert client._arena is not None, "the default client on the server's host uses shared memory"
    ref_loss, ref_grad = _torch_loss_and_grad(x, t, shift)
    if dtype == torch.float32:
        torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(x.grad, ref_grad, rtol=1e-4, atol=1e-9)
    else:   # bf16: the loss and gradient come back in bf16, as torch's own bf16 call gives them
        assert loss.dtype == torch.bfloat16 and x.grad.dtype == torch.bfloat16
        torch.testing.assert_close(loss.float(), ref_loss, rtol=1e-2, atol=0)
        torch.testing.assert_close(x.grad.float(), ref_grad, rtol=2e-2, atol=1e-9)
        assert torch.count_nonzero(x.grad[:, -1]) == 0      # the last position has no label


def _rows_sampler(pid: int, field: str = "RssAnon"):
    """A thread sampling /proc/PID/status's `field` (kB -> bytes) every 2 ms; returns (stop, peak)."""
    peak = [0]
    done = threading.Event()

    def sample():
        path = Path(f"/proc/{pid}/status")
        while not done.is_set():
            for line in path.read_text().splitlines():
                if line.startswith(field + ":"):
                    peak[0] = max(peak[0], int(line.split()[1]) * 1024)
            time.sleep(0.002)

    th = threading.Thread(target=sample, daemon=True)
    th.start()

    def stop() -> int:
        done.set()
        th.join()
        return peak[0]

    return stop


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs Linux's /proc")
def test_the_servers_own_memory_does_not_grow_with_the_batch():
    """Logits in shared memory are the client's memory (RssShmem in the server, bounded by the
    shared-memory budget); what the server allocates itself (RssAnon) is per row and per chunk:
    a batch 8x larger adds at most a few MiB to its peak."""
    peaks = {}
    with ServerProcess(env={"CLCE_ACCESS_LOG": "false"}) as srv, clce_client.Client(srv.url) as client:
        gen = torch.Generator().manual_seed(1)
        for rows in (1024, 8192, 1024, 8192):            # each size twice: the second is the steady one
            x = torch.randn(rows, 32000, generator=gen).requires_grad_()
            t = torch.randint(0, 32000, (rows,), generator=gen)
            stop = _rows_sampler(srv.proc.pid)
            client.cross_entropy(x, t).backward()
            peaks[rows] = stop()
            del x
    growth = peaks[8192] - peaks[1024]
    assert growth <= 16 * MiB, f"server RssAnon peak {peaks[1024] / MiB:.0f} MiB at 1024 rows, " \
                               f"{peaks[8192] / MiB:.0f} MiB at 8192 rows"


@pytest.mark.parametrize("shape, shift, reduction, extra", [
    ((1024, 3000), 0, "mean", {"label_smoothing": 0.1}),
    ((6, 512, 2000), 1, "mean", {"lse_square_scale": 1e-4}),
    ((6, 512, 2000), 1, "none", {"return_lse": True, "return_argmax": True}),
    ((1000, 3000), 0, "sum", {"weight": "classes"}),
])
def test_a_shared_memory_budget_smaller_than_the_batch_splits_it_bit_identically(shape, shift, reduction, extra):
    """A tenant whose shared-memory budget (--shm-max-bytes) is smaller than the batch gets the
    batch's answer, as row chunks that fit: the same bits as one request on a server whose budget
    takes it whole (the chunks start on the reduction's blocks and carry the whole batch's
    normaliser, as pipelined TCP's do)."""
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(*shape, generator=gen) * 2
    t = torch.randint(0, shape[-1], shape[:-1], generator=gen)
    t.view(-1)[::13] = -100
    opts = dict(extra, reduction=reduction, shift=shift, return_grad=True)
    if opts.get("weight") == "classes":
        opts["weight"] = torch.rand(shape[-1], generator=gen) + 0.5
    nbytes = x.numel() * 4
    results = []
    for budget in (16 * nbytes, nbytes // 3):            # whole, then 6+ chunks
        with ServerProcess(args=["--shm-max-bytes", str(budget)]) as srv, clce_client.Client(srv.url) as client:
            results.append(client.cross_entropy(x, t, **opts))
            stats = client._arena.stats
            if budget < nbytes:
                assert stats["reused"] >= 3, stats        # the chunks went one by one through one region
    whole, split = results
    for key in ("loss", "grad", "lse", "argmax", "z_loss"):
        a, b = getattr(whole, key), getattr(split, key)
        assert (a is None) == (b is None), key
        if a is not None:
            assert a.shape == b.shape and torch.equal(a, b), key
    ref_loss, _ = _torch_loss_and_grad(x, t, shift, reduction=reduction,
                                       **{k: v for k, v in opts.items() if k in ("label_smoothing", "weight")})
    if "lse_square_scale" not in extra:
        torch.testing.assert_close(split.loss, ref_loss, rtol=1e-5, atol=1e-5)


def test_only_a_sample_larger_than_the_budget_is_refused():
    with ServerProcess(args=["--shm-max-bytes", str(1 * MiB)]) as srv, clce_client.Client(srv.url) as client:
        x = torch.randn(4, 600_000)                       # one sample: 2.4 MB, and its gradient
        with pytest.raises(errors.PayloadTooLarge) as ei:
            client.cross_entropy(x, torch.zeros(4, dtype=torch.long), return_grad=True)
        msg = str(ei.value)
        assert "shm_max_bytes=1048576" in msg and "--shm-max-bytes" in msg and "transport='tcp'" in msg, msg


def test_pipelined_tcp_scores_shifted_labels_exactly(server):
    """Row chunks of a (B, T, V) batch with shift=1 count the labels the server scores (the
    whole batch's normaliser), so the loss is torch's: pipelining once scored one label per
    sequence too many into the mean."""
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(16, 1024, 1000, generator=gen).requires_grad_()     # 65 MB: pipelined
    t = torch.randint(0, 1000, (16, 1024), generator=gen)
    with clce_client.Client(server.url, transport="tcp", pipeline_bytes=4 * MiB) as client:
        loss = client.cross_entropy(x, t, shift=1)
        loss.backward()
    ref_loss, ref_grad = _torch_loss_and_grad(x, t, shift=1)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-6, atol=0)
    torch.testing.assert_close(x.grad, ref_grad, rtol=1e-5, atol=1e-10)


def test_every_program_is_built_and_warmed_before_ready(cpu_device):
    """What state.open_devices does before /readyz answers 200: every cross-entropy program (each
    dtype, soft-capped or not) and the fused linear path's GEMM programs for each dtype."""
    from clce_server.cross_entropy.engine import LossEngine
    from clce_server.linear.engine import LINEAR_DTYPES, LinearCrossEntropy

    cpu_device.build_startup_programs()
    keys = set(cpu_device.programs)
    for dt in ("float32", "bfloat16", "float16"):
        assert {("ce", dt, dt, False), ("ce", dt, dt, True), ("reduce", dt, dt, False)} <= keys, dt
    engine = LossEngine(cpu_device)
    lce = LinearCrossEntropy(engine)          # one per device, as ServerState.open_devices makes it
    lce.warm_up()
    built = set(lce.gemm._programs)
    programs = set(cpu_device.programs)
    # a request of any dtype, with a bias or without, at a size of its own, builds nothing more
    from clce_server.cross_entropy.engine import _np_dtype
    from clce_server.linear.engine import check

    rng = np.random.default_rng(5)
    for dt in LINEAR_DTYPES:
        h, w, b = (rng.standard_normal(s).astype(np.float32).astype(_np_dtype(dt))
                   for s in ((1500, 96), (700, 96), (700,)))
        for bias in (None, b):
            lce(check(h, w, rng.integers(0, 700, 1500), bias, reduction="sum"))
    assert set(lce.gemm._programs) == built and set(cpu_device.programs) == programs


def test_kernel_sources_are_read_when_the_server_starts(tmp_path):
    """Replacing the installed package under a running server (a reinstall) changes nothing it
    builds until it restarts: the sources are read once, at start."""
    import shutil

    import clce_server

    pkg = tmp_path / "clce_server"
    shutil.copytree(Path(clce_server.__file__).parent, pkg)
    srv = ServerProcess(cwd=tmp_path, env={"PYTHONPATH": str(tmp_path)})
    with srv:
        for cl in (pkg / "kernels").glob("*.cl"):
            cl.write_text("#error the installed sources changed under the running server\n")
        shutil.rmtree(pkg / "kernels")
        with clce_client.Client(srv.url) as client:
            gen = torch.Generator().manual_seed(4)
            h, w = torch.randn(64, 32, generator=gen), torch.randn(50, 32, generator=gen)
            y = torch.randint(0, 50, (64,), generator=gen)
            res = client.linear_cross_entropy(h, w, y, stateless=True, softcap=20.0)
            ref = F.cross_entropy(torch.tanh((h @ w.T) / 20.0) * 20.0, y)
            torch.testing.assert_close(res, ref, rtol=1e-5, atol=1e-6)
            x = torch.randn(8, 70, generator=gen).to(torch.float16)
            out = client.cross_entropy(x, torch.randint(0, 70, (8,), generator=gen), softcap=30.0)
            assert torch.isfinite(out)


def test_the_arena_keeps_a_language_models_region_for_the_next_step():
    """By default the client keeps free shared memory up to the tenant's budget (it counts against
    that budget cached or not): a step whose logits and gradient take more than the TCP pool's
    2 GiB default reuses last step's region instead of touching GBs of new pages each step. Here
    scaled down: a 48 MiB budget and 40 MB per call."""
    with ServerProcess(args=["--shm-max-bytes", str(48 * MiB)]) as srv, clce_client.Client(srv.url) as client:
        x = torch.randn(625, 8000).requires_grad_()                # 20 MB, and its gradient
        t = torch.randint(0, 8000, (625,))
        for _ in range(3):
            x.grad = None
            client.cross_entropy(x, t).backward()
        stats = client._arena.stats
    assert stats["created"] == 1 and stats["reused"] == 2, stats
    with ServerProcess(args=["--shm-max-bytes", str(48 * MiB)]) as srv, \
            clce_client.Client(srv.url, max_cached_bytes=MiB) as client:   # bounded by the caller
        for _ in range(2):
            x.grad = None
            client.cross_entropy(x, t).backward()
        assert client._arena.stats["created"] == 2
