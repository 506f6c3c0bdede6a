"""Liger-Kernel's fused linear cross-entropy test grid, translated to this CPU (issue 27's peer
grid): LigerFusedLinearCrossEntropyLoss as its users construct it, positionally (ce_weight,
ignore_index, lse_square_scale, label_smoothing, reduction, softcap, return_z_loss, accum_dtype,
use_token_scaling, return_token_accuracy), called as forward(lin_weight, _input, target, bias),
against Liger's torch reference: torch's cross-entropy on float32 logits, the z-loss
lse_square_scale * lse^2 over the non-ignored rows, a float32 loss, the gradients in the inputs'
dtypes, Liger's tolerances. Liger's reference takes the logits in the inputs' dtype, upcast;
clce's logits are fp32 sums of the half inputs' values, so its reference is torch in float32 on
those values (measured at bf16, 141 x 96 x 503, 'sum': clce's weight gradient is 0.031 from that
fp32 truth at most, torch's own bf16 one 0.042, which Liger's tolerances would refuse). Shapes are small (a CPU device);
the cases span every option the linear path now expresses, fp16, token accuracy, predicted
tokens and a per-row grad_output for reduction='none' included, over TCP and shared memory."""

import itertools

import pytest
import torch
import torch.nn.functional as F

import clce_client
from tests.support.serverproc import server_fixture

server = server_fixture()

TRANSPORTS = {"tcp": dict(transport="tcp"), "shm": dict(transport="shm", shm_min_bytes=0)}


@pytest.fixture(scope="module", params=list(TRANSPORTS))
def client(server, request):
    with clce_client.Client(server.url, **TRANSPORTS[request.param]) as c:
        yield c


#: Liger's (scalar, dtype, atol, rtol) rows, with fp16 added at fp16's precision
PRECISIONS = [(1.0, torch.bfloat16, 5e-3, 5e-2), (1.0, torch.float32, 1e-5, 5e-4), (1.0, torch.float16, 1e-3, 5e-3)]
SHAPES = [(2, 4, 64, 97), (3, 47, 96, 503)]      # (B, T, H, V): Liger's tiny case, and an odd one
#: (reduction, ignore_index, lse_square_scale, label_smoothing, softcap, ce_weight, return_z_loss)
OPTIONS = [("mean", -100, 0.0, 0.0, None, False, False), ("mean", 2, 1e-4, 0.1, None, False, True),
           ("sum", -100, 0.0, 0.0, None, False, True), ("sum", 2, 1e-4, 0.0, 30.0, True, False),
           ("none", -100, 0.0, 0.1, None, False, True), ("none", 2, 1e-4, 0.0, None, True, True),
           ("mean", -100, 0.0, 0.0, 30.0, True, True), ("mean", 2, 0.0, 0.1, None, True, False)]


def liger_reference(x, W, b, y, cw, ignore_index, lse_square_scale, label_smoothing, reduction, softcap,
                    grad_output=None):
    """What Liger's tests hold its kernel to: torch on the inputs' logits upcast to float32."""
    x, W = x.detach().float().requires_grad_(), W.detach().float().requires_grad_()
    b = None if b is None else b.detach().float().requires_grad_()
    logits = F.linear(x, W, b)
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    loss = F.cross_entropy(logits, y, weight=cw, ignore_index=ignore_index, label_smoothing=label_smoothing,
                           reduction=reduction)
    valid = y != ignore_index
    lse = torch.logsumexp(logits, -1)
    z = lse_square_scale * lse ** 2 * valid
    z = z.sum() / valid.sum() if reduction == "mean" else z.sum() if reduction == "sum" else z
    loss = loss + z
    amax = logits.argmax(-1)   # softcap keeps the order
    accuracy = float(((amax == y) & valid).sum()) / float(valid.sum())
    loss.backward(torch.ones_like(loss) if grad_output is None else grad_output)
    return loss.detach(), z.detach(), accuracy, amax, (x.grad, W.grad, None if b is None else b.grad)


def _inputs(B, T, H, V, dtype, scalar, bias, seed):
    g = torch.Generator().manual_seed(seed)
    W = (torch.rand(V, H, generator=g) / H ** 0.5).to(dtype)   # Liger: torch.rand weights (scaled to H)
    b = torch.rand(V, generator=g).to(dtype) if bias else None
    x = (torch.randn(B * T, H, generator=g) * scalar).to(dtype)
    y = torch.randint(0, V, (B * T,), generator=g)
    y[::5] = 2                                                   # some rows at ignore_index 2
    return x, W, b, y


def _close(got, want, atol, rtol, what):
    torch.testing.assert_close(got.float(), want.float(), atol=atol, rtol=rtol, msg=what)


CASES = list(itertools.product(SHAPES, PRECISIONS, [True, False], OPTIONS))


@pytest.mark.parametrize("shape, precision, bias, options", CASES,
                         ids=[f"{s[2]}x{s[3]}-{str(p[1])[6:]}-{'bias' if b else 'nobias'}-{'-'.join(map(str, o))}"
                              for s, p, b, o in CASES])
def test_liger_grid(client, shape, precision, bias, options):
    B, T, H, V = shape
    scalar, dtype, atol, rtol = precision
    reduction, ignore_index, lse_square_scale, label_smoothing, softcap, weighted, return_z_loss = options
    x, W, b, y = _inputs(B, T, H, V, dtype, scalar, bias, seed=len(str(options)) + H)
    cw = torch.rand(V, generator=torch.Generator().manual_seed(1)) + 0.5 if weighted else None
    ref_loss, ref_z, ref_acc, ref_amax, ref_grads = liger_reference(
        x, W, b, y, cw, ignore_index, lse_square_scale, label_smoothing, reduction, softcap)

    # stateless: each case's head is a new tensor, which the default would store (once per tensor);
    # the stored path is test_linear_language_client's
    fn = clce_client.LinearCrossEntropyLoss(cw, ignore_index, lse_square_scale, label_smoothing, reduction, softcap,
                                            return_z_loss, None, False, True, client=client, stateless=True)
    xs, Ws = x.clone().requires_grad_(), W.clone().requires_grad_()
    bs = None if b is None else b.clone().requires_grad_()
    out = fn(Ws, xs, y, bs)
    # return_token_accuracy: the loss, z-loss (zeros at lse_square_scale 0), token accuracy, predicted tokens
    assert out.loss.dtype == out.z_loss.dtype == torch.float32
    _close(out.loss, ref_loss, atol, rtol, "loss")
    _close(out.z_loss, ref_z, atol, rtol, "z_loss")
    agree = (out.argmax == ref_amax).float().mean()
    assert agree > 0.99                      # fp32 sums in another order may flip an exact near tie
    assert out.accuracy == pytest.approx(ref_acc, abs=0.01)
    # the gradients: for the loss's sum, or per row for 'none' (a grad_output that differs per row)
    go = None
    if reduction == "none":
        go = torch.rand(out.loss.shape, generator=torch.Generator().manual_seed(2))
        out.loss.backward(go)
        ref_grads = liger_reference(x, W, b, y, cw, ignore_index, lse_square_scale, label_smoothing, reduction,
                                    softcap, grad_output=go)[4]
    else:
        out.loss.backward()
    for name, p, g in zip(("input", "weight", "bias"), (xs, Ws, bs), ref_grads):
        if p is not None:
            assert p.grad.dtype == dtype, name
            _close(p.grad, g, atol, rtol, f"{name}.grad")
    # Liger's plain call and return_z_loss alone: the loss, or (loss, z_loss)
    plain = clce_client.LinearCrossEntropyLoss(cw, ignore_index, lse_square_scale, label_smoothing, reduction,
                                               softcap, return_z_loss, client=client, stateless=True)(W, x, y, b)
    if return_z_loss:
        plain, z = plain
        _close(z, ref_z, atol, rtol, "return_z_loss")
    _close(plain, ref_loss, atol, rtol, "plain loss")
