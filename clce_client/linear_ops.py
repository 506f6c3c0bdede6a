"""The fused linear cross-entropy as a PyTorch operator, ``torch.ops.clce.linear_cross_entropy``,
for torch.compile: registered with `torch.library.custom_op`, a fake implementation and
`register_autograd`, so the compiler sees one opaque node and never traces the HTTP client.

The op returns the loss and the server's gradients of hidden, weight and bias (for grad_output =
1, as Liger-Kernel's fused linear cross-entropy does); backward multiplies them by grad_output.
The weight travels with every call (the stateless mode of clce_client/linear.py: a compiled
graph holds no per-version state), over shared memory when the client has it. Reductions 'mean' and 'sum' (one grad_output value).
The loss is float32 for every input dtype, as in eager mode. Under torch.autocast the wrapper
casts hidden, weight and bias to the autocast dtype before the operator (torch's policy for
F.linear; the cross-entropy's fp32 policy holds: the logits are fp32 on the server and the loss
is float32), as the eager call does: eager and compiled give the same dtypes.
Clients are named by ops.client_key. Importing this module imports torch.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .client import Client
from .linear import LinearCall
from .ops import _client, client_key

__all__ = ["linear_cross_entropy"]


@torch.library.custom_op("clce::linear_cross_entropy", mutates_args=())
def _op(hidden: Tensor, weight: Tensor, target: Tensor, bias: Optional[Tensor], class_weight: Optional[Tensor],
        ignore_index: int, reduction: str, label_smoothing: float, lse_square_scale: float, softcap: float,
        shift: int, client: int, need_grad: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    call = LinearCall(_client(client), hidden, weight, target, bias, class_weight=class_weight,
                      ignore_index=ignore_index, reduction=reduction, label_smoothing=label_smoothing,
                      lse_square_scale=lse_square_scale, softcap=softcap or None, shift=shift, stateless=True,
                      want_grad=need_grad)
    call.client._run(call.flow())
    loss, _, gh, gw, gb = call.tensors()
    # outputs must not alias each other or the inputs, and the op owns them: the received
    # buffers are handed out as they are (no copy), the empty placeholders are fresh
    if not need_grad:
        return loss, hidden.new_empty(0), weight.new_empty(0), weight.new_empty(0)
    return loss, gh, gw, gb if gb is not None else weight.new_empty(0)


@_op.register_fake
def _fake(hidden, weight, target, bias, class_weight, ignore_index, reduction, label_smoothing, lse_square_scale,
          softcap, shift, client, need_grad):
    loss = hidden.new_empty((), dtype=torch.float32)   # float32 for every input dtype (Liger's, CCE's)
    if not need_grad:
        return loss, hidden.new_empty(0), weight.new_empty(0), weight.new_empty(0)
    return (loss, hidden.new_empty(hidden.shape), weight.new_empty(weight.shape),
            weight.new_empty(bias.shape if bias is not None else (0,)))


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(*output[1:])
    ctx.has_bias = inputs[3] is not None


def _backward(ctx, grad_loss, _gh, _gw, _gb):
    gh, gw, gb = ctx.saved_tensors
    if gh.numel() == 0 and grad_loss.numel() != 0:
        raise RuntimeError("clce::linear_cross_entropy ran without need_grad")
    g = grad_loss.to(torch.float32)
    # one gradient per input: hidden, weight, target, bias, then the options
    return ((gh * g).to(gh.dtype), (gw * g).to(gw.dtype), None, (gb * g).to(gb.dtype) if ctx.has_bias else None,
            None, None, None, None, None, None, None, None, None)


_op.register_autograd(_backward, setup_context=_setup_context)


def linear_cross_entropy(hidden: Tensor, weight: Tensor, target: Tensor, bias: Optional[Tensor] = None, *,
                         class_weight: Optional[Tensor] = None, ignore_index: int = -100, reduction: str = "mean",
                         label_smoothing: float = 0.0, lse_square_scale: float = 0.0,
                         softcap: Optional[float] = None, shift: int = 0,
                         client: Optional[Client] = None, weight_name: Optional[str] = None,
                         accumulate: bool = False, stateless: bool = True, return_z_loss: bool = False) -> Tensor:
    """F.cross_entropy(F.linear(hidden, weight, bias), target, ...) as one operator (what
    Client.linear_cross_entropy runs while torch.compile traces it). The weight travels with every
    call: `weight_name` is accepted and not used; a server-side accumulation and the z-loss
    output are not available under the compiler."""
    if accumulate or return_z_loss:
        raise ValueError("torch.ops.clce.linear_cross_entropy: accumulate=True and return_z_loss=True run "
                         "eagerly only (the operator keeps no per-version state and returns the loss)")
    if reduction not in ("mean", "sum"):
        raise ValueError(f"torch.ops.clce.linear_cross_entropy takes reduction 'mean' or 'sum', got {reduction!r}")
    dev = hidden.device.type
    if torch.is_autocast_enabled(dev):   # F.linear's autocast policy: the autocast dtype (differentiable casts)
        dt = torch.get_autocast_dtype(dev)
        hidden, weight = hidden.to(dt), weight.to(dt)
        bias = None if bias is None else bias.to(dt)
    need_grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (hidden, weight, bias))
    loss, _, _, _ = torch.ops.clce.linear_cross_entropy(
        hidden, weight, target, bias, class_weight, int(ignore_index), reduction, float(label_smoothing),
        float(lse_square_scale), float(softcap or 0.0), int(shift), client_key(client), need_grad)
    return loss
