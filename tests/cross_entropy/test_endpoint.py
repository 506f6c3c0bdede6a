"""End to end: the real app over real HTTP (build_app under uvicorn as `python -m clce_server`
configures it, in this process: tests/support/inprocess.py) against PyTorch.

Every loss and gradient is compared with torch.nn.functional.cross_entropy (computed in float64
from the exact same input values, with tolerances suited to the dtype that travels), every
argument error with the exception PyTorch raises for the same arguments. Requests go through
`clce_client.Client` / `AsyncClient`, and through raw httpx as curl would send them.
"""

from __future__ import annotations

import asyncio
import json
import math
import threading
from concurrent.futures import ThreadPoolExecutor

import httpx
import msgpack
import numpy as np
import pytest

import clce_client  # noqa: E402
from clce_wire import options, protocol  # noqa: E402
from clce_wire.protocol import encode_message, encode_tensor  # noqa: E402
from tests.support.inprocess import inprocess_fixture  # noqa: E402

torch = pytest.importorskip("torch")
ml_dtypes = pytest.importorskip("ml_dtypes")
F = torch.nn.functional

MiB = 1 << 20
SMALL_LIMIT = 64 * 1024

server = inprocess_fixture()
small_server = inprocess_fixture("small_server", max_request_bytes=SMALL_LIMIT)


@pytest.fixture(scope="module")
def client(server):
    with clce_client.Client(server.url, timeout=120) as c:
        yield c


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.url, timeout=120) as h:
        yield h


# ---------------------------------------------------------------------------------------------
# helpers

# relative tolerance per transported dtype; atol is the same fraction of the largest |expected|
TOL = {torch.float32: 2e-5, torch.float64: 1e-10, torch.float16: 4e-3, torch.bfloat16: 2e-2}
NP_DTYPES = {torch.float32: np.float32, torch.float64: np.float64, torch.float16: np.float16,
             torch.bfloat16: ml_dtypes.bfloat16}


def as_f64(a) -> torch.Tensor:
    """A float64 torch tensor with exactly the values of a (torch tensor or numpy array)."""
    if isinstance(a, torch.Tensor):
        return a.detach().to(torch.float64)
    a = np.asarray(a)
    return torch.from_numpy(a.astype(np.float64))


def as_index(t) -> torch.Tensor:
    return t if isinstance(t, torch.Tensor) else torch.from_numpy(np.asarray(t).astype(np.int64))


def reference(x, t, weight=None, **kw):
    """torch's loss and input gradient (for grad_output = 1), in float64 from the same values."""
    xr = as_f64(x).requires_grad_()
    soft = tuple(np.shape(t)) == tuple(np.shape(x)) and (
        t.is_floating_point() if isinstance(t, torch.Tensor) else np.asarray(t).dtype.kind in "fV"
    )
    tr = as_f64(t) if soft else as_index(t)
    w = None if weight is None else as_f64(weight)
    loss = F.cross_entropy(xr, tr, w, **kw)
    loss.sum().backward()
    return loss.detach(), xr.grad


def assert_close(actual, expected, dtype, *, rtol=None, what=""):
    rtol = TOL[dtype] if rtol is None else rtol
    a, e = as_f64(actual), as_f64(expected)
    assert tuple(a.shape) == tuple(e.shape), f"{what}: shape {tuple(a.shape)} != {tuple(e.shape)}"
    finite = e[torch.isfinite(e)]
    scale = float(finite.abs().max()) if finite.numel() else 1.0
    torch.testing.assert_close(a, e, rtol=rtol, atol=rtol * scale + 1e-300, equal_nan=True,
                               msg=lambda m: f"{what}: {m}")


def to_numpy(a: torch.Tensor) -> np.ndarray:
    """The same values as a numpy array (bfloat16 as ml_dtypes.bfloat16; exact)."""
    if a.dtype == torch.bfloat16:
        return a.float().numpy().astype(ml_dtypes.bfloat16)
    return a.numpy()


def rand(shape, dtype=torch.float32, seed=0, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g, dtype=torch.float64) * scale).to(dtype)


def targets(n, classes, seed=1, ignore=None, every=3):
    g = torch.Generator().manual_seed(seed)
    t = torch.randint(0, classes, (n,), generator=g)
    if ignore is not None:
        t[::every] = ignore
    return t


def soft_targets(shape, dtype=torch.float32, seed=2, dim=1):
    return torch.softmax(rand(shape, torch.float64, seed, 1.0), dim=dim).to(dtype)


def torch_error(fn):
    try:
        fn()
    except Exception as exc:   # noqa: BLE001 - we want whatever torch raises
        return exc
    raise AssertionError("torch raised no error for these arguments")


BUILTIN_ERRORS = (IndexError, ValueError, TypeError, RuntimeError)


def assert_same_error(server_exc, torch_exc):
    """The client's exception is an instance of torch's builtin exception type (the protocol has
    four: torch's NotImplementedError for integer input arrives as RuntimeError), same message."""
    base = next(b for b in BUILTIN_ERRORS if isinstance(torch_exc, b))
    assert isinstance(server_exc, clce_client.BadRequest), repr(server_exc)
    assert isinstance(server_exc, base), f"{type(server_exc).__name__} is not a {base.__name__}"
    assert str(server_exc) == str(torch_exc)
    assert server_exc.status == 400


def post_msgpack(h: httpx.Client, msg: dict, **headers) -> httpx.Response:
    body = b"".join(bytes(s) for s in encode_message(msg))
    return h.post("/v1/cross_entropy", content=body,
                  headers={"Content-Type": protocol.MSGPACK, **headers})


def post_json(h: httpx.Client, obj, **headers) -> httpx.Response:
    return h.post("/v1/cross_entropy", content=json.dumps(obj).encode(),
                  headers={"Content-Type": protocol.JSON, **headers})


def decode_body(resp: httpx.Response) -> dict:
    ctype = resp.headers["content-type"].split(";")[0]
    if ctype == protocol.MSGPACK:
        return protocol.decode_message(bytearray(resp.content))
    assert ctype == protocol.JSON, ctype
    return resp.json()


def assert_error_body(resp: httpx.Response, status: int, code: str, message: str | None = None) -> str:
    assert resp.status_code == status, (resp.status_code, resp.text)
    body = decode_body(resp)
    assert set(body) == {"error"}, body
    assert set(body["error"]) == {"code", "message"}, body
    assert body["error"]["code"] == code, body
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]
    if message is not None:
        assert body["error"]["message"] == message
    return body["error"]["message"]


# ---------------------------------------------------------------------------------------------
# parity with torch: class-index targets

REDUCTIONS = ["mean", "sum", "none"]


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("weighted", [False, True], ids=["unweighted", "weighted"])
@pytest.mark.parametrize("ignore_index", [-100, 3, -1])
@pytest.mark.parametrize("label_smoothing", [0.0, 0.15])
def test_class_indices_match_torch(client, reduction, weighted, ignore_index, label_smoothing):
    N, C = 13, 11
    x = rand((N, C), seed=N)
    t = targets(N, C, ignore=ignore_index)
    w = (torch.rand(C, generator=torch.Generator().manual_seed(5)) + 0.25) if weighted else None
    kw = dict(ignore_index=ignore_index, reduction=reduction, label_smoothing=label_smoothing)
    res = client.cross_entropy(x, t, w, return_grad=True, **kw)
    loss, grad = reference(x, t, w, **kw)
    assert isinstance(res.loss, torch.Tensor) and res.loss.dtype == torch.float32
    assert res.grad.dtype == torch.float32 and res.grad.shape == x.shape
    assert_close(res.loss, loss, torch.float32, what="loss")
    assert_close(res.grad, grad, torch.float32, what="grad")
    # the ignored rows really are ignored: no gradient at all
    if ignore_index != -100:
        assert torch.count_nonzero(res.grad[t == ignore_index]) == 0


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_numpy_input_returns_numpy(client, reduction):
    N, C = 9, 7
    x = rand((N, C), seed=3).numpy()
    t = targets(N, C, ignore=-100).numpy()
    w = np.linspace(0.5, 2.0, C, dtype=np.float32)
    loss_only = client.cross_entropy(x, t, w, reduction=reduction, label_smoothing=0.05)
    assert isinstance(loss_only, np.ndarray) and loss_only.dtype == np.float32
    assert loss_only.shape == (() if reduction != "none" else (N,))
    res = client.cross_entropy(x, t, w, reduction=reduction, label_smoothing=0.05, return_grad=True)
    assert isinstance(res, clce_client.CrossEntropyResult)
    assert isinstance(res.grad, np.ndarray) and res.grad.dtype == np.float32
    loss, grad = reference(x, t, w, reduction=reduction, label_smoothing=0.05)
    assert_close(loss_only, loss, torch.float32, what="loss")
    np.testing.assert_array_equal(res.loss, loss_only)   # deterministic
    assert_close(res.grad, grad, torch.float32, what="grad")


@pytest.mark.parametrize("kind", ["torch", "numpy"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16],
                         ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_dtypes_match_torch(client, kind, dtype, reduction):
    N, C = 10, 37
    x = rand((N, C), dtype, seed=7)
    t = targets(N, C, ignore=-100, every=4)
    w = torch.linspace(0.5, 1.5, C).to(dtype)
    kw = dict(reduction=reduction, label_smoothing=0.1)
    if kind == "numpy":
        xs, ts, ws = to_numpy(x), t.numpy(), to_numpy(w)
    else:
        xs, ts, ws = x, t, w
    res = client.cross_entropy(xs, ts, ws, return_grad=True, **kw)
    loss, grad = reference(x, t, w, **kw)
    want = dtype if kind == "torch" else np.dtype(NP_DTYPES[dtype])
    assert res.loss.dtype == want and res.grad.dtype == want
    assert_close(res.loss, loss, dtype, what="loss")
    assert_close(res.grad, grad, dtype, what="grad")
    # also what torch itself gives in this dtype (torch computes fp16/bf16 via float internally)
    if dtype != torch.float64:
        local = F.cross_entropy(x, t, w, **kw)
        assert_close(res.loss, local, dtype, rtol=2 * TOL[dtype], what="loss vs torch in dtype")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bfloat16", "float16"])
def test_grad_dtype(client, dtype):
    N, C = 8, 50
    x = rand((N, C), dtype, seed=11)
    t = targets(N, C)
    loss, grad = reference(x, t)
    default = client.cross_entropy(x, t, return_grad=True)
    assert default.grad.dtype == dtype
    wide = client.cross_entropy(x, t, return_grad=True, grad_dtype=torch.float32)
    assert wide.grad.dtype == torch.float32 and wide.loss.dtype == dtype
    # the float32 gradient is the exact math on the same low-precision inputs: float32 accuracy
    assert_close(wide.grad, grad, torch.float32, rtol=1e-5, what="float32 grad")
    assert_close(default.grad, grad, dtype, what="low-precision grad")
    # the low-precision gradient is the float32 one rounded (within one rounding step)
    assert_close(default.grad, wide.grad.to(dtype), dtype, rtol=TOL[dtype] / 2, what="rounding")
    # numpy: grad_dtype as a numpy dtype
    xs = to_numpy(x)
    res = client.cross_entropy(xs, t.numpy(), return_grad=True, grad_dtype=np.float32)
    assert res.grad.dtype == np.float32
    np.testing.assert_array_equal(res.grad, wide.grad.numpy())
    # float64 gradient for a float32 input
    x32 = rand((N, C), seed=12)
    res = client.cross_entropy(x32, t, return_grad=True, grad_dtype=torch.float64)
    assert res.grad.dtype == torch.float64
    assert_close(res.grad, reference(x32, t)[1], torch.float32, what="float64 grad of float32")


def test_all_targets_ignored(client):
    x, t = rand((4, 5)), torch.full((4,), -100)
    for reduction in REDUCTIONS:
        res = client.cross_entropy(x, t, reduction=reduction, return_grad=True)
        loss, grad = reference(x, t, reduction=reduction)
        assert_close(res.loss, loss, torch.float32, what=reduction)   # mean: NaN, like torch
        assert_close(res.grad, grad, torch.float32, what=reduction)


def test_int_target_dtypes(client):
    """uint8 class indices (PyTorch accepts Long and Byte) give the int64 result."""
    x = rand((6, 9), seed=21)
    t = targets(6, 9)
    base = client.cross_entropy(x, t, return_grad=True)
    res = client.cross_entropy(x, t.to(torch.uint8), return_grad=True)
    torch.testing.assert_close(res.loss, base.loss, rtol=0, atol=0)
    torch.testing.assert_close(res.grad, base.grad, rtol=0, atol=0)
    assert_close(res.loss, F.cross_entropy(x, t.to(torch.uint8)), torch.float32)


# ---------------------------------------------------------------------------------------------
# soft targets, K-dim, unbatched

@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("weighted", [False, True], ids=["unweighted", "weighted"])
@pytest.mark.parametrize("label_smoothing", [0.0, 0.2])
def test_soft_targets_match_torch(client, reduction, weighted, label_smoothing):
    N, C = 12, 9
    x = rand((N, C), seed=31)
    p = soft_targets((N, C))
    w = torch.linspace(0.2, 2.0, C) if weighted else None
    kw = dict(reduction=reduction, label_smoothing=label_smoothing)
    res = client.cross_entropy(x, p, w, return_grad=True, **kw)
    loss, grad = reference(x, p, w, **kw)
    assert_close(res.loss, loss, torch.float32, what="loss")
    assert_close(res.grad, grad, torch.float32, what="grad")


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16], ids=["float64", "bfloat16"])
def test_soft_targets_other_dtypes(client, dtype):
    x = rand((5, 17), dtype, seed=32)
    p = soft_targets((5, 17), dtype)
    res = client.cross_entropy(x, p, reduction="sum", return_grad=True)
    loss, grad = reference(x, p, reduction="sum")
    assert res.loss.dtype == dtype and res.grad.dtype == dtype
    assert_close(res.loss, loss, dtype, what="loss")
    assert_close(res.grad, grad, dtype, what="grad")


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("spatial", [(5,), (3, 4), (2, 3, 2)], ids=["1d", "2d", "3d"])
def test_k_dimensional_match_torch(client, reduction, spatial):
    N, C = 3, 6
    x = rand((N, C, *spatial), seed=41)
    g = torch.Generator().manual_seed(42)
    t = torch.randint(0, C, (N, *spatial), generator=g)
    t.view(-1)[::5] = 2   # an ignore_index that is also a real class
    w = torch.linspace(0.5, 1.5, C)
    kw = dict(reduction=reduction, ignore_index=2, label_smoothing=0.1)
    res = client.cross_entropy(x, t, w, return_grad=True, **kw)
    loss, grad = reference(x, t, w, **kw)
    assert tuple(res.loss.shape) == (() if reduction != "none" else (N, *spatial))
    assert_close(res.loss, loss, torch.float32, what="loss")
    assert_close(res.grad, grad, torch.float32, what="grad")
    # soft targets over the class dimension
    p = soft_targets(x.shape)
    res = client.cross_entropy(x, p, reduction=reduction, return_grad=True)
    loss, grad = reference(x, p, reduction=reduction)
    assert_close(res.loss, loss, torch.float32, what="soft loss")
    assert_close(res.grad, grad, torch.float32, what="soft grad")


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_unbatched_match_torch(client, reduction):
    C = 10
    x = rand((C,), seed=51)
    for t in (torch.tensor(4), soft_targets((C,), dim=0)):
        res = client.cross_entropy(x, t, reduction=reduction, label_smoothing=0.1, return_grad=True)
        loss, grad = reference(x, t, reduction=reduction, label_smoothing=0.1)
        assert res.loss.shape == () and res.grad.shape == (C,)
        assert_close(res.loss, loss, torch.float32, what="loss")
        assert_close(res.grad, grad, torch.float32, what="grad")
    # numpy, 0-d target
    res = client.cross_entropy(x.numpy(), np.int64(4), reduction=reduction, return_grad=True)
    loss, grad = reference(x, torch.tensor(4), reduction=reduction)
    assert_close(res.loss, loss, torch.float32)
    assert_close(res.grad, grad, torch.float32)


# ---------------------------------------------------------------------------------------------
# torch autograd

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_backward_fills_input_grad(client, dtype, reduction):
    x = rand((16, 21), dtype, seed=61).requires_grad_()
    t = targets(16, 21, ignore=-100)
    w = torch.linspace(0.5, 1.5, 21).to(dtype)
    loss = client.cross_entropy(x, t, w, reduction=reduction, label_smoothing=0.1)
    assert loss.requires_grad and loss.grad_fn is not None and loss.dtype == dtype
    loss.backward()
    xr = x.detach().clone().requires_grad_()
    ref = F.cross_entropy(xr, t, w, reduction=reduction, label_smoothing=0.1)
    ref.backward()
    assert x.grad.dtype == dtype
    assert_close(loss, ref, dtype, what="loss")
    assert_close(x.grad, xr.grad, dtype, what="input.grad")


@pytest.mark.parametrize("shape", [(7, 5), (3, 5, 4), (5,)], ids=["2d", "kdim", "unbatched"])
def test_backward_reduction_none_with_grad_output(client, shape):
    x = rand(shape, seed=71).requires_grad_()
    C = shape[0] if len(shape) == 1 else shape[1]
    row_shape = () if len(shape) == 1 else (shape[0], *shape[2:])
    t = torch.randint(0, C, row_shape, generator=torch.Generator().manual_seed(72))
    g = rand(row_shape, seed=73, scale=1.0)
    loss = client.cross_entropy(x, t, reduction="none")
    assert loss.shape == row_shape
    loss.backward(g)
    xr = x.detach().clone().requires_grad_()
    F.cross_entropy(xr, t, reduction="none").backward(g)
    assert_close(x.grad, xr.grad, torch.float32)


def test_loss_inside_a_bigger_graph(client):
    torch.manual_seed(0)
    base = rand((6, 8), seed=81).requires_grad_()
    t = targets(6, 8)

    def run(ce):
        x = base.detach().clone().requires_grad_()
        logits = torch.tanh(x) * 3 + 0.5          # a non-leaf input
        loss = ce(logits, t)
        total = loss * 2 + x.sum() + (logits ** 2).mean()
        total.backward()
        return loss.detach(), x.grad

    loss, grad = run(lambda a, b: client.cross_entropy(a, b, label_smoothing=0.05))
    ref_loss, ref_grad = run(lambda a, b: F.cross_entropy(a, b, label_smoothing=0.05))
    assert_close(loss, ref_loss, torch.float32)
    assert_close(grad, ref_grad, torch.float32)


def test_backward_twice_accumulates_and_no_grad_skips(client):
    x = rand((4, 6), seed=91).requires_grad_()
    t = targets(4, 6)
    for _ in range(2):
        client.cross_entropy(x, t).backward()
    xr = x.detach().clone().requires_grad_()
    for _ in range(2):
        F.cross_entropy(xr, t).backward()
    assert_close(x.grad, xr.grad, torch.float32)
    with torch.no_grad():
        loss = client.cross_entropy(x, t)
    assert loss.grad_fn is None and not loss.requires_grad
    assert_close(loss, F.cross_entropy(x.detach(), t), torch.float32)
    # return_grad=False opts out: a detached loss
    loss = client.cross_entropy(x, t, return_grad=False)
    assert loss.grad_fn is None


# ---------------------------------------------------------------------------------------------
# extras

def test_return_lse_and_argmax(client):
    N, C = 20, 13
    x = rand((N, C), seed=101)
    t = x.argmax(1).clone()
    t[::3] = (t[::3] + 1) % C          # wrong on every third row
    t[1::7] = -100                     # some ignored
    res = client.cross_entropy(x, t, return_lse=True, return_argmax=True)
    assert res.grad is None
    assert res.lse.dtype == torch.float32 and res.lse.shape == (N,)
    assert_close(res.lse, torch.logsumexp(x.double(), 1), torch.float32, what="lse")
    assert res.argmax.dtype == torch.int64
    torch.testing.assert_close(res.argmax, x.argmax(1), rtol=0, atol=0)
    valid = t != -100
    expected_acc = float((x.argmax(1)[valid] == t[valid]).double().mean())
    assert res.accuracy == pytest.approx(expected_acc, abs=1e-6)
    assert_close(res.loss, F.cross_entropy(x.double(), t), torch.float32)
    # soft targets: argmax but no accuracy
    res = client.cross_entropy(x, soft_targets((N, C)), return_argmax=True)
    assert res.accuracy is None
    torch.testing.assert_close(res.argmax, x.argmax(1), rtol=0, atol=0)
    # K-dim: row-shaped extras
    xk = rand((2, C, 3), seed=102)
    res = client.cross_entropy(xk, torch.zeros(2, 3, dtype=torch.long), return_lse=True, return_argmax=True)
    assert res.lse.shape == (2, 3) and res.argmax.shape == (2, 3)
    assert_close(res.lse, torch.logsumexp(xk.double(), 1), torch.float32)
    torch.testing.assert_close(res.argmax, xk.argmax(1), rtol=0, atol=0)


def z_loss_reference(x, t, scale, reduction, ignore_index=-100):
    xr = x.detach().double().requires_grad_()
    ce = F.cross_entropy(xr, t, reduction="none", ignore_index=ignore_index)
    valid = (t != ignore_index).double()
    z = scale * torch.logsumexp(xr, 1) ** 2 * valid
    w_ce = F.cross_entropy(xr, t, reduction=reduction, ignore_index=ignore_index)
    if reduction == "mean":
        zr = z.sum() / valid.sum()
    elif reduction == "sum":
        zr = z.sum()
    else:
        zr = z
    loss = w_ce + zr
    loss.sum().backward()
    z_report = zr
    del ce
    return loss.detach(), xr.grad, z_report.detach()


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_z_loss_lse_square_scale(client, reduction):
    N, C = 15, 19
    x = rand((N, C), seed=111)
    t = targets(N, C, ignore=-100, every=5)
    res = client.cross_entropy(x, t, reduction=reduction, lse_square_scale=1e-2, return_grad=True)
    loss, grad, z = z_loss_reference(x, t, 1e-2, reduction)
    assert_close(res.loss, loss, torch.float32, what="loss")
    assert_close(res.grad, grad, torch.float32, what="grad")
    assert res.z_loss.dtype == torch.float32
    if reduction != "none":
        assert res.z_loss.shape == ()
        assert_close(res.z_loss, z, torch.float32, what="z_loss")
    # and without it there is no z_loss in the result
    assert client.cross_entropy(x, t, return_lse=True).z_loss is None


def test_z_loss_reduction_none_is_per_row(client):
    N, C = 15, 19
    x = rand((N, C), seed=111)
    t = targets(N, C, ignore=-100, every=5)
    res = client.cross_entropy(x, t, reduction="none", lse_square_scale=1e-2, return_lse=True)
    _, _, z = z_loss_reference(x, t, 1e-2, "none")
    assert res.z_loss.shape == (N,)
    assert_close(res.z_loss, z, torch.float32, what="z_loss")


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_softcap_matches_torch_reference(client, reduction):
    N, C, cap = 11, 23, 5.0
    x = rand((N, C), seed=121, scale=8.0)
    t = targets(N, C, ignore=-100)
    res = client.cross_entropy(x, t, reduction=reduction, softcap=cap, return_grad=True, return_lse=True,
                               label_smoothing=0.1)
    xr = x.double().requires_grad_()
    capped = cap * torch.tanh(xr / cap)
    loss = F.cross_entropy(capped, t, reduction=reduction, label_smoothing=0.1)
    loss.sum().backward()
    assert_close(res.loss, loss.detach(), torch.float32, what="loss")
    assert_close(res.grad, xr.grad, torch.float32, what="grad")
    assert_close(res.lse, torch.logsumexp(capped.detach(), 1), torch.float32, what="lse after softcap")


# ---------------------------------------------------------------------------------------------
# argument errors: exactly PyTorch's exception type and message

def _x():
    return rand((4, 5), seed=131)


ERROR_CASES = {
    "target_out_of_bounds": lambda: dict(input=_x(), target=torch.tensor([0, 1, 7, 2])),
    "negative_target_out_of_bounds": lambda: dict(input=_x(), target=torch.tensor([0, 1, -3, 2])),
    "ignore_index_does_not_cover_others": lambda: dict(input=_x(), target=torch.tensor([0, -1, -2, 2]),
                                                       ignore_index=-1),
    "batch_mismatch": lambda: dict(input=_x(), target=torch.tensor([0, 1, 2])),
    "weight_length": lambda: dict(input=_x(), target=torch.tensor([0, 1, 2, 3]), weight=torch.ones(3)),
    "weight_dtype": lambda: dict(input=_x(), target=torch.tensor([0, 1, 2, 3]),
                                 weight=torch.ones(5, dtype=torch.float64)),
    "label_smoothing_above_1": lambda: dict(input=_x(), target=torch.tensor([0, 1, 2, 3]), label_smoothing=1.5),
    "ignore_index_with_probabilities": lambda: dict(input=_x(), target=soft_targets((4, 5)), ignore_index=1),
    "int_soft_targets": lambda: dict(input=_x(), target=torch.ones(4, 5, dtype=torch.long)),
    "float_class_indices": lambda: dict(input=_x(), target=torch.tensor([0.0, 1.0, 2.0, 3.0])),
    "bad_reduction": lambda: dict(input=_x(), target=torch.tensor([0, 1, 2, 3]), reduction="avg"),
    "kdim_target_shape": lambda: dict(input=rand((2, 5, 3)), target=torch.zeros(2, 4, dtype=torch.long)),
    "integer_input": lambda: dict(input=torch.ones(4, 5, dtype=torch.long), target=torch.tensor([0, 1, 2, 3])),
    "unbatched_target_size": lambda: dict(input=rand((5,)), target=torch.tensor([1, 2])),
}


@pytest.mark.parametrize("case", list(ERROR_CASES))
def test_argument_errors_are_torchs(client, case):
    kwargs = ERROR_CASES[case]()
    expected = torch_error(lambda: F.cross_entropy(**kwargs))
    with pytest.raises(clce_client.BadRequest) as info:
        client.cross_entropy(**kwargs)
    assert_same_error(info.value, expected)
    # numpy in, the same answer
    np_kwargs = {k: (v.numpy() if isinstance(v, torch.Tensor) else v) for k, v in kwargs.items()}
    with pytest.raises(clce_client.BadRequest) as info:
        client.cross_entropy(**np_kwargs)
    assert_same_error(info.value, expected)


def test_argument_error_is_catchable_like_torchs(client):
    with pytest.raises(IndexError, match="Target 7 is out of bounds."):
        client.cross_entropy(_x(), torch.tensor([0, 1, 7, 2]))
    with pytest.raises(ValueError, match=r"Expected input batch_size \(4\) to match target batch_size \(3\)\."):
        client.cross_entropy(_x(), torch.tensor([0, 1, 2]))
    # the error did not break autograd inputs: a correct call right after works
    x = _x().requires_grad_()
    client.cross_entropy(x, torch.tensor([0, 1, 2, 3])).backward()
    assert x.grad is not None


def test_argument_error_in_json_and_msgpack_bodies(http):
    resp = post_json(http, {"input": [[1.0, 2.0, 3.0]], "target": [3]})
    assert_error_body(resp, 400, "index_error", "Target 3 is out of bounds.")
    assert resp.headers["content-type"].startswith(protocol.JSON)
    resp = post_msgpack(http, {"input": encode_tensor(np.zeros((2, 3), np.float32)),
                               "target": encode_tensor(np.array([0, 1])), "label_smoothing": 2.0})
    assert resp.headers["content-type"].startswith(protocol.MSGPACK)
    assert_error_body(resp, 400, "runtime_error", "label_smoothing must be between 0.0 and 1.0. Got: 2")


# ---------------------------------------------------------------------------------------------
# JSON form (raw httpx, as curl would send it)

def test_json_nested_lists_match_msgpack(http, client):
    x = rand((3, 4), seed=141)
    t = torch.tensor([0, 3, 1])
    resp = post_json(http, {"input": x.tolist(), "target": t.tolist(), "return_grad": True,
                            "reduction": "sum", "label_smoothing": 0.1})
    assert resp.status_code == 200, resp.text
    assert resp.headers["content-type"].startswith(protocol.JSON)
    body = resp.json()
    assert set(body) <= {"v", "loss", "grad"} and {"loss", "grad"} <= set(body)
    via_msgpack = client.cross_entropy(x, t, reduction="sum", label_smoothing=0.1, return_grad=True)
    # the JSON numbers are the float32 results in full precision: the same values
    assert np.float32(body["loss"]) == via_msgpack.loss.numpy()
    np.testing.assert_array_equal(np.array(body["grad"], dtype=np.float32), via_msgpack.grad.numpy())
    loss, grad = reference(x, t, reduction="sum", label_smoothing=0.1)
    assert_close(torch.tensor(body["grad"]), grad, torch.float32)


def test_json_doc_example(http):
    """The curl example of docs/protocol.md, including -Infinity."""
    resp = post_json(http, {"input": [[2.0, 0.5, -1.0], [0.1, 0.2, "-Infinity"]], "target": [0, 1],
                            "return_grad": True})
    assert resp.status_code == 200, resp.text
    body = resp.json()
    x = torch.tensor([[2.0, 0.5, -1.0], [0.1, 0.2, -math.inf]])
    loss, grad = reference(x, torch.tensor([0, 1]))
    assert body["loss"] == pytest.approx(0.4429, abs=1e-4)
    assert_close(torch.tensor(body["loss"]), loss, torch.float32)
    assert_close(torch.tensor(body["grad"]), grad, torch.float32)
    assert body["grad"][1][2] == 0.0


def test_json_object_form_with_dtype(http, client):
    x = rand((2, 3), torch.float64, seed=151)
    resp = post_json(http, {
        "input": {"dtype": "float64", "data": x.flatten().tolist(), "shape": [2, 3]},
        "target": {"dtype": "int64", "data": [2, 0]},
        "weight": {"dtype": "float64", "data": [1.0, 0.5, 2.0]},
        "reduction": "none", "return_grad": True, "return_lse": True, "return_argmax": True})
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert {"loss", "grad", "lse", "argmax", "accuracy"} <= set(body)
    w = torch.tensor([1.0, 0.5, 2.0], dtype=torch.float64)
    loss, grad = reference(x, torch.tensor([2, 0]), w, reduction="none")
    assert_close(torch.tensor(body["loss"], dtype=torch.float64), loss, torch.float64)
    assert_close(torch.tensor(body["grad"], dtype=torch.float64), grad, torch.float64)
    assert body["argmax"] == x.argmax(1).tolist()
    via_msgpack = client.cross_entropy(x, torch.tensor([2, 0]), w, reduction="none", return_grad=True)
    assert body["loss"] == via_msgpack.loss.tolist()
    assert body["grad"] == via_msgpack.grad.tolist()
    # bfloat16 over JSON: values are rounded to bfloat16 first, like torch.tensor(..., dtype=bfloat16)
    vals = [[0.1234, 2.5, -1.75]]
    resp = post_json(http, {"input": {"dtype": "bfloat16", "data": vals}, "target": [1], "return_grad": True})
    assert resp.status_code == 200, resp.text
    xb = torch.tensor(vals).to(torch.bfloat16)
    loss, grad = reference(xb, torch.tensor([1]))
    assert_close(torch.tensor(resp.json()["loss"]), loss, torch.bfloat16)
    assert_close(torch.tensor(resp.json()["grad"]), grad, torch.bfloat16)


def test_json_non_finite_values_are_strings(http):
    resp = post_json(http, {"input": [[1.0, "NaN", 0.5], [0.0, 1.0, 2.0], ["Infinity", 0.0, 0.0]],
                            "target": [0, 2, 1], "reduction": "none", "return_grad": True})
    assert resp.status_code == 200, resp.text
    body = resp.json()
    x = torch.tensor([[1.0, math.nan, 0.5], [0.0, 1.0, 2.0], [math.inf, 0.0, 0.0]])
    loss, _ = reference(x, torch.tensor([0, 2, 1]), reduction="none")
    assert body["loss"][0] == "NaN"
    assert loss[2].isnan() and body["loss"][2] == "NaN"
    assert body["loss"][1] == pytest.approx(float(loss[1]), rel=1e-6)
    assert body["grad"][0] == ["NaN", "NaN", "NaN"]
    assert "Infinity" not in resp.text.replace('"Infinity"', "")   # never a bare Infinity token
    assert "NaN" not in resp.text.replace('"NaN"', "")


def test_json_soft_targets_and_kdim(http):
    x = rand((2, 3, 2), seed=161)
    p = soft_targets((2, 3, 2))
    resp = post_json(http, {"input": x.tolist(), "target": p.tolist(), "return_grad": True})
    assert resp.status_code == 200, resp.text
    loss, grad = reference(x, p)
    assert_close(torch.tensor(resp.json()["loss"]), loss, torch.float32)
    assert_close(torch.tensor(resp.json()["grad"]), grad, torch.float32)


def test_json_response_carries_version(http):
    resp = post_json(http, {"input": [[1.0, 2.0]], "target": [0]})
    assert resp.status_code == 200
    assert resp.json()["v"] == 1


# ---------------------------------------------------------------------------------------------
# service errors

def test_unsupported_media_type(http):
    resp = http.post("/v1/cross_entropy", content=b'{"input": [[1.0]], "target": [0]}',
                     headers={"Content-Type": "text/plain"})
    assert_error_body(resp, 415, "unsupported_media_type")
    resp = http.post("/v1/cross_entropy", content=b"abc")
    assert_error_body(resp, 415, "unsupported_media_type")


@pytest.mark.parametrize("body", [b"", b"\xc1", b"\x81\xa5input", b"\x90", b"\x80\x00", b"\xff" * 10,
                                  msgpack.packb({"input": 1, "target": 2}) + b"\x00"],
                         ids=["empty", "c1", "truncated", "array", "trailing", "junk", "trailing2"])
def test_malformed_msgpack(http, body):
    resp = http.post("/v1/cross_entropy", content=body, headers={"Content-Type": protocol.MSGPACK})
    assert resp.headers["content-type"].startswith(protocol.MSGPACK)
    assert_error_body(resp, 400, "bad_request")


@pytest.mark.parametrize("body", [b"", b"{", b"[1, 2]", b'"x"', b"\xff\xfe", b'{"input": [[1.0]], "target": [0]} x',
                                  b'{"input": [[1.0, 2.0], [1.0]], "target": [0, 1]}',
                                  b'{"input": [["nan"]], "target": [0]}', b'{"input": [[1.0]], "target": [[0.5]], '
                                  b'"weight": {"dtype": "float32"}}'],
                         ids=["empty", "open", "array", "string", "bad-utf8", "trailing", "ragged", "lowercase-nan",
                              "tensor-without-data"])
def test_malformed_json(http, body):
    resp = http.post("/v1/cross_entropy", content=body, headers={"Content-Type": protocol.JSON})
    assert resp.headers["content-type"].startswith(protocol.JSON)
    assert_error_body(resp, 400, "bad_request")


def test_unknown_and_missing_fields(http):
    good = {"input": [[1.0, 2.0]], "target": [0]}
    msg = assert_error_body(post_json(http, {**good, "ignore_idx": 3}), 400, "bad_request")
    assert "ignore_idx" in msg
    msg = assert_error_body(post_json(http, {"input": [[1.0, 2.0]]}), 400, "bad_request")
    assert "target" in msg
    resp = post_msgpack(http, {"input": encode_tensor(np.zeros((1, 2), np.float32)),
                               "target": encode_tensor(np.zeros(1, np.int64)), "reduce": "sum"})
    assert "reduce" in assert_error_body(resp, 400, "bad_request")
    assert "version" in assert_error_body(post_json(http, {**good, "v": 2}), 400, "bad_request")


WIRE_TYPE_CASES = {
    "input_as_list": {"input": [1.0, 2.0]},
    "target_as_str": {"target": "0"},
    "ignore_index_float": {"ignore_index": 1.0},
    "ignore_index_bool": {"ignore_index": True},
    "reduction_int": {"reduction": 1},
    "label_smoothing_str": {"label_smoothing": "0.1"},
    "return_grad_int": {"return_grad": 1},
    "grad_dtype_int": {"grad_dtype": 32},
    "weight_as_list": {"weight": [1.0, 1.0]},
    "bin_outside_tensor": {"reduction": b"mean"},
    "tensor_bad_dtype": {"input": {"dtype": "float128", "shape": [1, 2], "data": b"\x00" * 32}},
    "tensor_size_mismatch": {"input": {"dtype": "float32", "shape": [1, 3], "data": b"\x00" * 8}},
    "tensor_extra_key": {"input": {"dtype": "float32", "shape": [1, 2], "data": b"\x00" * 8, "x": 1}},
    "tensor_negative_dim": {"input": {"dtype": "float32", "shape": [-1, 2], "data": b"\x00" * 8}},
}


@pytest.mark.parametrize("case", list(WIRE_TYPE_CASES))
def test_wrong_wire_types(http, case):
    msg = {"input": {"dtype": "float32", "shape": [1, 2], "data": np.zeros(2, np.float32).tobytes()},
           "target": {"dtype": "int64", "shape": [1], "data": np.zeros(1, np.int64).tobytes()}}
    msg.update(WIRE_TYPE_CASES[case])
    resp = http.post("/v1/cross_entropy", content=msgpack.packb(msg, use_bin_type=True),
                     headers={"Content-Type": protocol.MSGPACK})
    assert_error_body(resp, 400, "bad_request")


def test_invalid_option_values_are_client_errors(client):
    """Values the wire types allow but the semantics do not: 400, never 500."""
    x, t = _x(), torch.tensor([0, 1, 2, 3])
    for kwargs in (dict(softcap=-1.0), dict(lse_square_scale=-0.5), dict(grad_dtype="int64", return_grad=True),
                   dict(deadline_ms=-5.0)):
        with pytest.raises(clce_client.BadRequest) as info:
            client.cross_entropy(x, t, **kwargs)
        assert info.value.status == 400, kwargs


def test_not_found(http):
    for method, path in (("GET", "/nope"), ("POST", "/v1/cross_entropy/x"), ("GET", "/v2/cross_entropy")):
        resp = http.request(method, path)
        assert_error_body(resp, 404, "not_found")
    with clce_client.Client(str(http.base_url).rstrip("/") + "/prefix") as c:
        with pytest.raises(clce_client.NotFound) as info:
            c.cross_entropy(_x(), torch.tensor([0, 1, 2, 3]))
        assert info.value.status == 404 and info.value.code == "not_found"


def test_wrong_method(http):
    # the protocol has no code for 405: it is answered as 400 bad_request, in the usual error body
    resp = http.get("/v1/cross_entropy")
    assert_error_body(resp, 400, "bad_request")


def test_errors_before_format_is_known_honour_accept(http):
    resp = http.get("/nope", headers={"Accept": protocol.MSGPACK})
    assert resp.headers["content-type"].startswith(protocol.MSGPACK)
    assert_error_body(resp, 404, "not_found")


# ---------------------------------------------------------------------------------------------
# request size limit (413)

def test_payload_too_large_with_content_length(small_server):
    with httpx.Client(base_url=small_server.url, timeout=60) as h:
        x = np.zeros((100, 200), np.float32)       # 80 kB > 64 KiB
        msg = {"input": encode_tensor(x), "target": encode_tensor(np.zeros(100, np.int64))}
        body = b"".join(bytes(s) for s in encode_message(msg))
        resp = h.post("/v1/cross_entropy", content=body, headers={"Content-Type": protocol.MSGPACK})
        assert "content-length" in {k.lower() for k in resp.request.headers}
        message = assert_error_body(resp, 413, "payload_too_large")
        assert str(SMALL_LIMIT) in message
        # JSON too
        resp = post_json(h, {"input": x.tolist(), "target": [0] * 100})
        assert_error_body(resp, 413, "payload_too_large")
        # just under the limit still works
        x = rand((50, 300), seed=171)     # 60 kB
        t = targets(50, 300)
        resp = post_msgpack(h, {"input": encode_tensor(x.numpy()), "target": encode_tensor(t.numpy())})
        assert resp.status_code == 200
        assert_close(protocol.decode_tensor(decode_body(resp)["loss"]), F.cross_entropy(x.double(), t),
                     torch.float32)
    with clce_client.Client(small_server.url) as c:
        with pytest.raises(clce_client.PayloadTooLarge) as info:
            c.cross_entropy(np.zeros((100, 200), np.float32), np.zeros(100, np.int64))
        assert info.value.status == 413 and info.value.code == "payload_too_large"


def test_payload_too_large_chunked(small_server):
    x = np.zeros((100, 200), np.float32)
    body = b"".join(bytes(s) for s in encode_message(
        {"input": encode_tensor(x), "target": encode_tensor(np.zeros(100, np.int64))}))

    def stream():
        for i in range(0, len(body), 8192):
            yield body[i:i + 8192]

    with httpx.Client(base_url=small_server.url, timeout=60) as h:
        resp = h.post("/v1/cross_entropy", content=stream(), headers={"Content-Type": protocol.MSGPACK})
        assert resp.request.headers.get("transfer-encoding") == "chunked"
        assert "content-length" not in {k.lower() for k in resp.request.headers}
        assert_error_body(resp, 413, "payload_too_large")
    # a chunked body under the limit is fine
    small = rand((8, 16), seed=172)
    t = targets(8, 16)
    body = b"".join(bytes(s) for s in encode_message(
        {"input": encode_tensor(small.numpy()), "target": encode_tensor(t.numpy()), "return_grad": True}))
    with httpx.Client(base_url=small_server.url, timeout=60) as h:
        resp = h.post("/v1/cross_entropy", content=iter([body[:100], body[100:]]),
                      headers={"Content-Type": protocol.MSGPACK})
        assert resp.request.headers.get("transfer-encoding") == "chunked"
        assert resp.status_code == 200, resp.content
        out = decode_body(resp)
        loss, grad = reference(small, t)
        assert_close(protocol.decode_tensor(out["loss"]), loss, torch.float32)
        assert_close(protocol.decode_tensor(out["grad"]), grad, torch.float32)


def test_limits_in_info(server, small_server):
    a = httpx.get(server.url + "/v1/info").json()
    b = httpx.get(small_server.url + "/v1/info").json()
    assert a["limits"]["max_request_bytes"] == 256 * MiB
    assert b["limits"]["max_request_bytes"] == SMALL_LIMIT
    assert a["instance_id"] != b["instance_id"]


# ---------------------------------------------------------------------------------------------
# concurrency: bad requests never disturb good ones

def test_bad_requests_do_not_disturb_concurrent_good_ones(server, client):
    good_inputs = [(rand((32, 64), seed=200 + i), targets(32, 64, seed=300 + i, ignore=-100)) for i in range(12)]
    bad_bodies = [
        ("msgpack", b"\xc1\x00", 400, "bad_request"),
        ("json", b'{"input": [[1.0, 2.0]], "target": [9]}', 400, "index_error"),
        ("json", b'{"input": [[1.0, 2.0]], "target": [0], "label_smoothing": 7}', 400, "runtime_error"),
        ("json", b'{"input": [[1.0, 2.0]], "target": [0, 1]}', 400, "value_error"),
        ("text", b"hello", 415, "unsupported_media_type"),
        ("json", b'{"input": [[1.0, 2.0]], "target": [0], "bogus": 1}', 400, "bad_request"),
    ] * 3

    def good(i):
        x, t = good_inputs[i]
        res = client.cross_entropy(x, t, return_grad=True, label_smoothing=0.1)
        return i, res

    def bad(j):
        kind, body, status, code = bad_bodies[j]
        ctype = {"msgpack": protocol.MSGPACK, "json": protocol.JSON, "text": "text/plain"}[kind]
        with httpx.Client(base_url=server.url, timeout=60) as h:
            return h.post("/v1/cross_entropy", content=body, headers={"Content-Type": ctype}), status, code

    with ThreadPoolExecutor(max_workers=8) as pool:
        futures = []
        for k in range(max(len(good_inputs), len(bad_bodies))):
            if k < len(bad_bodies):
                futures.append(("bad", pool.submit(bad, k)))
            if k < len(good_inputs):
                futures.append(("good", pool.submit(good, k)))
        results = [(kind, f.result()) for kind, f in futures]
    for kind, r in results:
        if kind == "good":
            i, res = r
            x, t = good_inputs[i]
            loss, grad = reference(x, t, label_smoothing=0.1)
            assert_close(res.loss, loss, torch.float32, what=f"good {i} loss")
            assert_close(res.grad, grad, torch.float32, what=f"good {i} grad")
        else:
            resp, status, code = r
            assert_error_body(resp, status, code)


def test_async_client_concurrent_requests(server):
    inputs = [(rand((8 + i, 30), seed=400 + i), targets(8 + i, 30, seed=500 + i)) for i in range(6)]

    async def main():
        async with clce_client.AsyncClient(server.url) as ac:
            info = await ac.info()
            assert await ac.healthz() and await ac.readyz()
            results = await asyncio.gather(*(ac.cross_entropy(x, t, return_grad=True, reduction="sum")
                                             for x, t in inputs))
            with pytest.raises(IndexError, match="Target 30 is out of bounds."):
                await ac.cross_entropy(inputs[0][0], torch.full((8,), 30))
            x = inputs[0][0].clone().requires_grad_()
            loss = await ac.cross_entropy(x, inputs[0][1])
            loss.backward()
            return info, results, x.grad

    info, results, xgrad = asyncio.run(main())
    assert info["protocol"] == 1
    for (x, t), res in zip(inputs, results):
        loss, grad = reference(x, t, reduction="sum")
        assert_close(res.loss, loss, torch.float32)
        assert_close(res.grad, grad, torch.float32)
    assert_close(xgrad, reference(*inputs[0])[1], torch.float32)


# ---------------------------------------------------------------------------------------------
# operational endpoints

def test_server_timing(client, http):
    res = client.cross_entropy(rand((4, 8)), targets(4, 8), return_grad=True)
    assert set(res.server_timing) >= {"decode", "queue", "kernel", "total"}
    assert all(v >= 0 and math.isfinite(v) for v in res.server_timing.values())
    resp = post_json(http, {"input": [[1.0, 2.0]], "target": [0]})
    header = resp.headers["server-timing"]
    names = [entry.split(";")[0].strip() for entry in header.split(",")]
    assert names == ["body", "decode", "queue", "run", "kernel", "total"], header
    t = protocol.parse_server_timing(header)
    assert t["kernel"] <= t["run"] and t["body"] + t["decode"] + t["queue"] + t["run"] <= t["total"] + 0.01


def test_healthz_readyz_info(server, client, http):
    assert http.get("/healthz").status_code == 200
    assert http.get("/healthz").json() == {"status": "ok"}
    resp = http.get("/readyz")
    assert resp.status_code == 200 and resp.json() == {"status": "ready"}
    assert client.healthz() and client.readyz()
    info = http.get("/v1/info").json()
    assert info == client.info()
    import clce_server

    assert info["version"] == clce_server.__version__ == clce_client.__version__
    assert info["protocol"] == clce_client.PROTOCOL_VERSION == 1
    assert info["ready"] is True and info["auth_required"] is False
    assert isinstance(info["instance_id"], str) and info["instance_id"]
    assert len(info["devices"]) >= 1 and all(d["name"] for d in info["devices"])
    assert {"float32", "float64", "float16", "bfloat16"} <= set(info["input_dtypes"])
    assert {"int64", "uint8"} <= set(info["target_dtypes"])
    assert {"max_request_bytes", "max_inflight_bytes", "max_queued", "chunk_ms"} <= set(info["limits"])


def _requests_total(text: str) -> dict[tuple[str, str], float]:
    from prometheus_client.parser import text_string_to_metric_families

    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if s.name == "clce_requests_total":
                out[(s.labels["tenant"], s.labels["outcome"])] = s.value
    return out


def test_metrics(http, client):
    before = _requests_total(http.get("/metrics").text)
    client.cross_entropy(rand((4, 8)), targets(4, 8))
    client.cross_entropy(rand((4, 8)), targets(4, 8))
    with pytest.raises(IndexError):
        client.cross_entropy(rand((4, 8)), torch.full((4,), 8))
    resp = http.get("/metrics")
    assert resp.status_code == 200 and resp.headers["content-type"].startswith("text/plain")
    text = resp.text
    after = _requests_total(text)
    assert after[("default", "ok")] - before.get(("default", "ok"), 0) == 2
    assert after[("default", "client_error")] - before.get(("default", "client_error"), 0) == 1
    assert 'clce_requests_total{outcome="ok",tenant="default"}' in text
    for name in ("clce_request_duration_seconds", "clce_rows_total", "clce_build_info",
                 "clce_device_busy_seconds_total"):
        assert name in text
    instance = http.get("/v1/info").json()["instance_id"]
    assert f'instance="{instance}"' in text


def test_openapi_documents_cross_entropy(http):
    doc = http.get("/openapi.json").json()
    op = doc["paths"]["/v1/cross_entropy"]["post"]
    content = op["requestBody"]["content"]
    assert {"application/json", "application/msgpack"} <= set(content)
    schema = content["application/json"]["schema"]
    assert options.OPTION_NAMES <= set(schema["properties"])
    assert {"input", "target"} <= set(schema.get("required", []))
    assert schema["properties"]["reduction"]["enum"] == ["mean", "sum", "none"]
    assert {"400", "413", "415"} <= set(op["responses"])


def test_openapi_refs_resolve(http):
    doc = http.get("/openapi.json").json()

    def refs(node):
        if isinstance(node, dict):
            if "$ref" in node:
                yield node["$ref"]
            for v in node.values():
                yield from refs(v)
        elif isinstance(node, list):
            for v in node:
                yield from refs(v)

    for ref in refs(doc):
        assert ref.startswith("#/")
        node = doc
        for part in ref[2:].split("/"):
            assert part in node, f"dangling $ref {ref}"
            node = node[part]


# ---------------------------------------------------------------------------------------------
# big batches

def big_batch(n, c, seed):
    rng = np.random.default_rng(seed)
    x = rng.random((n, c), dtype=np.float32)
    x *= 8.0
    x -= 4.0
    t = rng.integers(0, c, n)
    t[::17] = -100
    return x, t


def test_healthz_answers_while_a_big_batch_computes(server):
    # 1024 x 32000 float32 with its gradient: the biggest batch the default limits admit
    x, t = big_batch(1024, 32000, seed=1)
    segments = encode_message({"input": encode_tensor(x), "target": encode_tensor(t),
                               "return_grad": True, "reduction": "sum"})
    nbytes = protocol.message_nbytes(segments)
    uploaded, finished = threading.Event(), threading.Event()
    out = {}

    def body():
        for seg in segments:
            mv = memoryview(seg).cast("B")
            for off in range(0, len(mv), MiB):
                yield bytes(mv[off:off + MiB])
        uploaded.set()

    def big():
        try:
            with httpx.Client(timeout=300) as h:
                out["resp"] = h.post(server.url + "/v1/cross_entropy", content=body(),
                                     headers={"Content-Type": protocol.MSGPACK, "Content-Length": str(nbytes)})
        finally:
            finished.set()

    th = threading.Thread(target=big)
    th.start()
    try:
        assert uploaded.wait(120), "the upload did not finish"
        with httpx.Client(timeout=60) as h:
            health = h.get(server.url + "/healthz")
        answered_first = not finished.is_set()
    finally:
        th.join(300)
    assert health.status_code == 200
    assert answered_first, "/healthz waited for the big batch"
    resp = out["resp"]
    assert resp.status_code == 200, resp.content[:500]
    msg = decode_body(resp)
    loss = protocol.decode_tensor(msg["loss"])
    grad = protocol.decode_tensor(msg["grad"])
    assert grad.shape == x.shape
    rows = [0, 1, 17, 500, 1023]
    xr, tr = torch.from_numpy(x[rows]), torch.from_numpy(t[rows])
    _, g = reference(xr, tr, reduction="sum")
    assert_close(grad[rows], g, torch.float32, what="grad rows")
    ref_loss = F.cross_entropy(torch.from_numpy(x).double(), torch.from_numpy(t), reduction="sum")
    assert_close(loss, ref_loss, torch.float32, what="loss")


def test_large_upload_loss(client):
    """A 217 MB body (1700 x 32000 float32): per-row losses and lse against torch."""
    x, t = big_batch(1700, 32000, seed=2)
    assert x.nbytes >= 200e6
    res = client.cross_entropy(x, t, reduction="none", return_lse=True)
    xt = torch.from_numpy(x)
    assert_close(res.loss, F.cross_entropy(xt, torch.from_numpy(t), reduction="none"), torch.float32)
    assert_close(res.lse, torch.logsumexp(xt, 1), torch.float32)


def test_large_upload_with_grad(client):
    x, t = big_batch(1700, 32000, seed=3)
    assert x.nbytes >= 200e6
    res = client.cross_entropy(x, t, return_grad=True, label_smoothing=0.1)
    rows = [0, 1, 17, 999, 1699]
    _, g = reference(torch.from_numpy(x[rows]), torch.from_numpy(t[rows]), reduction="sum", label_smoothing=0.1)
    valid = int((t != -100).sum())
    assert_close(res.grad[rows], g / valid, torch.float32, what="grad rows")
    loss = F.cross_entropy(torch.from_numpy(x), torch.from_numpy(t), label_smoothing=0.1)
    assert_close(res.loss, loss, torch.float32, what="loss")


def test_gradient_arrives_aligned_and_is_used_in_place(client):
    """The server sends the gradient first and the client places the body so it lands 64-byte
    aligned: numpy and torch get it without a copy."""
    x = rand((256, 1000), seed=5)
    t = targets(256, 1000)
    res = client.cross_entropy(x.numpy(), t.numpy(), return_grad=True)
    assert res.grad.ctypes.data % 64 == 0 and res.grad.flags.writeable
    xt = x.clone().requires_grad_()
    loss = client.cross_entropy(xt, t)
    loss.backward()
    ref = x.clone().requires_grad_()
    F.cross_entropy(ref, t).backward()
    assert_close(xt.grad, ref.grad, torch.float32, what="grad")
