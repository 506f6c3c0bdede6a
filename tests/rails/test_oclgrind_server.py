"""The whole server under Oclgrind: `oclgrind --data-races python -m clce_server`.

Oclgrind is a simulated OpenCL device of kind "gpu" with memory of its own, so the server takes
every GPU path on it: the GPU tuning rows (a work-group per row for the cross-entropy, read off
the device; the GEMM's GPU row), the discrete-memory paths of both operations (buffers in device
memory, copies in and out, the linear operation's resident weight, device accumulators and
second transfer queue). Both operations are checked against torch through the client across
their options (fp32, bf16, class weights, smoothing, z-loss, bias or none, `shift`, `accumulate`
over micro-batches), and every diagnostic Oclgrind writes (a data race, an uninitialised read,
an out-of-bounds access, a barrier divergence: its log) fails the module. Shapes are small: the
simulator runs every work-item's every instruction, checked.

Oclgrind's memory checks (out-of-bounds reads and writes, of global and local memory) are always
on; --data-races adds races and barrier divergence. --uninitialized is left out: under it this
Oclgrind (Debian 12's 21.10) dies with the server process on its first request (no diagnostic,
a crash; tests/cross_entropy/test_oclgrind_kernels.py runs the kernels one by one with it where it can).
"""

from __future__ import annotations

import shutil
import sys

import pytest
import torch
import torch.nn.functional as F

import clce_client
from tests.support.serverproc import ServerProcess

OCLGRIND = shutil.which("oclgrind")
pytestmark = pytest.mark.skipif(OCLGRIND is None, reason="oclgrind is not installed (apt-get install oclgrind; "
                                                          "scripts/setup.sh dev installs it)")

#: what the simulator may take to start the server and run a case (seconds)
READY_S = 180.0


@pytest.fixture(scope="module")
def grind(tmp_path_factory):
    """The server under Oclgrind, and its diagnostics log (read at the end of the module)."""
    log = tmp_path_factory.mktemp("oclgrind-server") / "oclgrind.log"
    cmd = [OCLGRIND, "--data-races", "--log", str(log), sys.executable, "-m", "clce_server"]
    # shared memory off: every tensor crosses the wire, the path a remote GPU host serves
    with ServerProcess(command=cmd, ready_timeout=READY_S,
                       env={"CLCE_DEVICE_MEMORY": None, "CLCE_ALLOW_SHM": "0"}) as srv:
        yield srv, log
        diagnostics = log.read_text() if log.exists() else ""
    assert not diagnostics.strip(), f"Oclgrind reported:\n{diagnostics[:6000]}"


@pytest.fixture()
def client(grind):
    with clce_client.Client(grind[0].url, timeout=READY_S) as c:
        yield c


def test_the_server_runs_oclgrind_as_a_gpu_with_memory_of_its_own(grind):
    import httpx

    (dev,) = httpx.get(grind[0].url + "/v1/info").json()["devices"]
    assert dev["name"] == "Oclgrind Simulator" and dev["kind"] == "gpu" and dev["memory"] == "discrete"
    assert dev["tuning"]["launch"]["rows"] == "group"


def _loss_case(dtype, opts):
    g = torch.Generator().manual_seed(len(str(opts)))
    x = torch.randn(37, 45, generator=g).to(dtype).requires_grad_()
    y = torch.randint(0, 45, (37,), generator=g)
    y[::5] = opts.get("ignore_index", -100)
    return x, y


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("opts", [dict(), dict(reduction="sum", label_smoothing=0.1),
                                  dict(reduction="none", weighted=True), dict(lse_square_scale=1e-2)], ids=str)
def test_loss_matches_torch_under_oclgrind(client, dtype, opts):
    opts = dict(opts)
    x, y = _loss_case(dtype, opts)
    if opts.pop("weighted", False):
        opts["weight"] = (torch.rand(45, generator=torch.Generator().manual_seed(1)) + 0.5).to(dtype)
    z = opts.pop("lse_square_scale", 0.0)
    loss = client.cross_entropy(x, y, **opts, **({"lse_square_scale": z} if z else {}))
    loss.sum().backward()
    x2 = x.detach().float().requires_grad_()
    ref = F.cross_entropy(x2, y, **{k: (v.float() if torch.is_tensor(v) else v) for k, v in opts.items()})
    if z:
        lse = torch.logsumexp(x2, -1)
        valid = y != -100
        ref = ref + z * (lse ** 2 * valid).sum() / valid.sum()
    ref.sum().backward()
    tol = dict(atol=1e-2, rtol=1.6e-2) if dtype == torch.bfloat16 else {}
    torch.testing.assert_close(loss.float(), ref, **tol)
    torch.testing.assert_close(x.grad.float(), x2.grad, **tol)


def _linear_case(seed, dtype, bias, rows=(2, 45), H=24, V=70):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(*rows, H, generator=g).to(dtype).requires_grad_()
    W = (torch.randn(V, H, generator=g) / H ** 0.5).to(dtype).requires_grad_()
    b = (torch.randn(V, generator=g) * 0.1).to(dtype).requires_grad_() if bias else None
    y = torch.randint(0, V, rows, generator=g)
    return h, W, b, y


def _linear_reference(h, W, b, y, shift=0, **opts):
    h2, W2 = h.detach().float().requires_grad_(), W.detach().float().requires_grad_()
    b2 = None if b is None else b.detach().float().requires_grad_()
    logits, tgt = F.linear(h2, W2, b2), y
    if shift:
        logits, tgt = logits[..., :-shift, :], y[..., shift:]
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tgt.reshape(-1), **opts)
    loss.backward()
    return loss, h2.grad, W2.grad, None if b2 is None else b2.grad


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("opts", [dict(bias=True), dict(bias=False, label_smoothing=0.1),
                                  dict(bias=True, shift=1, reduction="sum")], ids=str)
def test_linear_matches_torch_under_oclgrind(client, dtype, opts):
    opts = dict(opts)
    h, W, b, y = _linear_case(3, dtype, opts.pop("bias"))
    loss = client.linear_cross_entropy(h, W, y, b, **opts)
    loss.backward()
    ref, gh, gw, gb = _linear_reference(h, W, b, y, **opts)
    tol = dict(atol=1e-2, rtol=1.6e-2) if dtype == torch.bfloat16 else {}
    torch.testing.assert_close(loss.float(), ref, **tol)
    torch.testing.assert_close(h.grad.float(), gh, **tol)
    torch.testing.assert_close(W.grad.float(), gw, **tol)
    if b is not None:
        torch.testing.assert_close(b.grad.float(), gb, **tol)


def test_linear_accumulates_on_the_device_under_oclgrind(client):
    """A stored weight version: resident in the simulator's memory, its gradient accumulated
    there over micro-batches, taken once before the step: as local accumulation."""
    torch.manual_seed(5)
    W = torch.nn.Parameter(torch.randn(60, 16) / 4)
    b = torch.nn.Parameter(torch.zeros(60))
    W_ref, b_ref = torch.nn.Parameter(W.detach().clone()), torch.nn.Parameter(b.detach().clone())
    weights = client.weights
    k = 3
    for _ in range(k):
        h = torch.randn(50, 16)
        y = torch.randint(0, 60, (50,))
        (client.linear_cross_entropy(h, W, y, b, weight_name="head", accumulate=True) / k).backward()
        (F.cross_entropy(F.linear(h, W_ref, b_ref), y) / k).backward()
    weights.flush()
    torch.testing.assert_close(W.grad, W_ref.grad)
    torch.testing.assert_close(b.grad, b_ref.grad)
