"""clce's two operations as PyTorch operators, beneath the client: ``torch.ops.clce.cross_entropy``
and ``torch.ops.clce.linear_cross_entropy`` (their public face, with the default client, is
clce_client.ops; docs/integrations/compile.md).

Each is registered with `torch.library.custom_op`, a fake (meta) implementation and
`register_autograd`, so torch.compile sees one opaque node and never traces the HTTP client.
``Client.cross_entropy``, ``Client.linear_cross_entropy`` and ``clce_client.cross_entropy`` come
here while dynamo traces them (`traced_cross_entropy`, `linear_cross_entropy`): this module imports
nothing of client.py, which imports it then.

* clce::cross_entropy returns the loss and the server's gradient (for grad_output = 1), as
  Liger-Kernel does; backward scales that gradient by grad_output in place and hands it to
  autograd, without a copy (`torch_support.input_grad` says when it may). A caller of the op who
  keeps the gradient output gets a copy made instead; that output is not differentiable.
  Registered with `torch.library.register_autocast` as float32, torch's CPU and CUDA autocast
  policy for ``cross_entropy_loss`` (the "fp32" list). ``shift`` and ``classes_last`` are the
  server's layouts (docs/protocol.md): a causal LM's (B, T, V) logits go as they are.
* clce::linear_cross_entropy returns the loss and the gradients of hidden, weight and bias (for
  grad_output = 1); backward multiplies them by grad_output. The weight travels with every call
  (the stateless mode of clce_client/linear.py: a compiled graph holds no per-version state), over
  shared memory when the client has it. Reductions 'mean' and 'sum'; the loss is float32 for
  every input dtype. Under torch.autocast the wrapper casts hidden, weight and bias to the
  autocast dtype first (torch's policy for F.linear), as the eager call does.

The operators take plain values, so a client is named by a small int key (`client_key`), held
weakly here: a client made per step is not kept alive by having been used. Importing this module
imports torch.
"""

from __future__ import annotations

import itertools
import threading
import weakref
from typing import Any, Callable, Optional

import torch
from torch import Tensor

from .linear import LinearCall
from .torch_support import input_grad

# key <-> client, weakly both ways; the keys are this module's, nothing is set on a client
_clients: weakref.WeakValueDictionary[int, Any] = weakref.WeakValueDictionary()
_keys: weakref.WeakKeyDictionary[Any, int] = weakref.WeakKeyDictionary()
_next_key = itertools.count(1)
_lock = threading.Lock()


@torch.compiler.assume_constant_result
def client_key(client: Any, default: Optional[Callable[[], Any]] = None) -> int:
    """The operators' key for `client` (None: the client `default()` gives, the default client).
    A compiled graph holds the key as a constant (dynamo guards on the client object, so another
    client recompiles)."""
    if client is None:
        client = default()
    with _lock:
        key = _keys.get(client)
        if key is None:
            key = _keys[client] = next(_next_key)
            _clients[key] = client
        return key


def _client(key: int) -> Any:
    client = _clients.get(key)
    if client is None:
        raise RuntimeError(f"clce's operators: the Client registered as {key} no longer exists; keep a "
                           "reference to the client for as long as the model uses it")
    return client


# ---- clce::cross_entropy ------------------------------------------------------------------------

def _loss_shape(input: Tensor, target: Tensor, reduction: str, shift: int, classes_last: bool) -> list[int]:
    if reduction != "none":
        return []
    soft = input.dim() >= 1 and target.shape == input.shape and target.is_floating_point()
    if classes_last or shift:
        rows = list(input.shape[:-1])
        if shift:
            rows[-1] -= shift
        return rows
    if soft:
        return [] if input.dim() == 1 else [input.shape[0], *input.shape[2:]]
    return list(target.shape)


@torch.library.custom_op("clce::cross_entropy", mutates_args=())
def _op(input: Tensor, target: Tensor, weight: Optional[Tensor], ignore_index: int, reduction: str,
        label_smoothing: float, shift: int, classes_last: bool, client: int,
        need_grad: bool) -> tuple[Tensor, Tensor]:
    out = _client(client).cross_entropy(
        input.detach(), target, weight, ignore_index, reduction, label_smoothing,
        shift=shift, classes_last=classes_last, return_grad=need_grad)
    # outputs must not alias anything the caller holds; the client's tensors are fresh
    if need_grad:
        return out.loss, out.grad
    return out, input.new_empty(0)


@_op.register_fake
def _fake(input, target, weight, ignore_index, reduction, label_smoothing, shift, classes_last, client,
          need_grad):
    dtype = input.dtype
    if target.is_floating_point():
        dtype = torch.promote_types(dtype, target.dtype)
    loss = input.new_empty(_loss_shape(input, target, reduction, shift, classes_last), dtype=dtype)
    grad = input.new_empty(input.shape if need_grad else (0,))
    return loss, grad


def _setup_context(ctx, inputs, output):
    input, target, weight, ignore_index, reduction, label_smoothing, shift, classes_last, client, need_grad = inputs
    ctx.save_for_backward(output[1])   # freed by autograd right after backward, unless retain_graph
    # autograd must not zero-fill a gradient for the gradient output (as big as the logits) to
    # call backward with. (Not mark_non_differentiable: ctx would keep the output alive.)
    ctx.set_materialize_grads(False)
    # the op's second output is the server's gradient; backward may make it the input's gradient
    # without a copy only if the caller let go of it (`cross_entropy` below always does)
    ctx.returned_grad = weakref.ref(output[1])
    ctx.reduction, ctx.shift = reduction, shift
    ctx.class_dim = -1 if (classes_last or shift) else (0 if input.dim() == 1 else 1)


def _backward(ctx, grad_loss, grad_grad):
    (grad,) = ctx.saved_tensors
    if grad_grad is not None:
        raise RuntimeError("clce::cross_entropy: its gradient output is not differentiable (no second derivative)")
    if grad_loss is None:
        return (None,) * 10
    if grad.numel() == 0 and grad_loss.numel() != 0:
        raise RuntimeError("clce::cross_entropy ran without need_grad; call it with input.requires_grad")
    grad_input = input_grad(grad, grad_loss, class_dim=ctx.class_dim if ctx.reduction == "none" else None,
                            shift=ctx.shift, dtype=grad.dtype, owned=ctx.returned_grad() is None)
    return grad_input, None, None, None, None, None, None, None, None, None


_op.register_autograd(_backward, setup_context=_setup_context)
# torch's autocast runs cross_entropy_loss in float32 (the "fp32" policy) on CPU and CUDA: the same
torch.library.register_autocast("clce::cross_entropy", "cpu", torch.float32)
torch.library.register_autocast("clce::cross_entropy", "cuda", torch.float32)


def cross_entropy(input: Tensor, target: Tensor, weight: Optional[Tensor], ignore_index: int, reduction: str,
                  label_smoothing: float, *, shift: int, classes_last: bool, key: int) -> Tensor:
    """The loss of clce::cross_entropy for the client of `key`, differentiable when the input is."""
    need_grad = torch.is_grad_enabled() and input.requires_grad
    loss, _ = torch.ops.clce.cross_entropy(input, target, weight, int(ignore_index), reduction,
                                           float(label_smoothing), int(shift), bool(classes_last), key, need_grad)
    return loss


# what Client.cross_entropy takes that the operator computes too; the other options ask for more
# than the loss (return_lse, ...) or for memory the client manages (inplace_grad)
_OPERATOR_OPTIONS = frozenset({"shift", "classes_last", "return_grad"})


@torch.compiler.disable
def _eager_cross_entropy(key: int, input, target, weight, ignore_index, reduction, label_smoothing, options: dict):
    # outside the compiled graph (a graph break): the client as in eager mode
    return _client(key).cross_entropy(input, target, weight, ignore_index, reduction, label_smoothing, **options)


def traced_cross_entropy(key: int, input, target, weight, ignore_index, reduction, label_smoothing, options: dict):
    """`Client.cross_entropy` (and clce_client.cross_entropy, CrossEntropyLoss) while
    torch.compile traces it: the operator, so the graph holds one node and never the HTTP client.
    What the operator does not compute (return_lse, return_grad=True, inplace_grad, ...; numpy
    input) runs as in eager mode, after a graph break."""
    if (not isinstance(input, Tensor) or options.get("return_grad")
            or any(k not in _OPERATOR_OPTIONS and v not in (None, False) for k, v in options.items())):
        return _eager_cross_entropy(key, input, target, weight, ignore_index, reduction, label_smoothing, options)
    layout = dict(shift=options.get("shift") or 0, classes_last=bool(options.get("classes_last")), key=key)
    if options.get("return_grad") is False:    # as in eager mode: a loss without a grad_fn, no gradient sent
        with torch.no_grad():
            return cross_entropy(input, target, weight, ignore_index, reduction, label_smoothing, **layout)
    return cross_entropy(input, target, weight, ignore_index, reduction, label_smoothing, **layout)


# ---- clce::linear_cross_entropy -----------------------------------------------------------------

@torch.library.custom_op("clce::linear_cross_entropy", mutates_args=())
def _linear_op(hidden: Tensor, weight: Tensor, target: Tensor, bias: Optional[Tensor],
               class_weight: Optional[Tensor], ignore_index: int, reduction: str, label_smoothing: float,
               lse_square_scale: float, softcap: float, shift: int, client: int,
               need_grad: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
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


@_linear_op.register_fake
def _linear_fake(hidden, weight, target, bias, class_weight, ignore_index, reduction, label_smoothing,
                 lse_square_scale, softcap, shift, client, need_grad):
    loss = hidden.new_empty((), dtype=torch.float32)   # float32 for every input dtype (Liger's, CCE's)
    if not need_grad:
        return loss, hidden.new_empty(0), weight.new_empty(0), weight.new_empty(0)
    return (loss, hidden.new_empty(hidden.shape), weight.new_empty(weight.shape),
            weight.new_empty(bias.shape if bias is not None else (0,)))


def _linear_setup_context(ctx, inputs, output):
    ctx.save_for_backward(*output[1:])
    ctx.has_bias = inputs[3] is not None


def _linear_backward(ctx, grad_loss, _gh, _gw, _gb):
    gh, gw, gb = ctx.saved_tensors
    if gh.numel() == 0 and grad_loss.numel() != 0:
        raise RuntimeError("clce::linear_cross_entropy ran without need_grad")
    g = grad_loss.to(torch.float32)
    # one gradient per input: hidden, weight, target, bias, then the options
    return ((gh * g).to(gh.dtype), (gw * g).to(gw.dtype), None, (gb * g).to(gb.dtype) if ctx.has_bias else None,
            None, None, None, None, None, None, None, None, None)


_linear_op.register_autograd(_linear_backward, setup_context=_linear_setup_context)


def linear_cross_entropy(hidden: Tensor, weight: Tensor, target: Tensor, bias: Optional[Tensor] = None, *, key: int,
                         class_weight: Optional[Tensor] = None, ignore_index: int = -100, reduction: str = "mean",
                         label_smoothing: float = 0.0, lse_square_scale: float = 0.0,
                         softcap: Optional[float] = None, shift: int = 0, weight_name: Optional[str] = None,
                         accumulate: bool = False, stateless: bool = True, return_z_loss: bool = False) -> Tensor:
    """F.cross_entropy(F.linear(hidden, weight, bias), target, ...) as one operator, for the client
    of `key` (what Client.linear_cross_entropy runs while torch.compile traces it). The weight
    travels with every call: `weight_name` is accepted and not used; a server-side accumulation
    and the z-loss output are not available under the compiler."""
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
        float(lse_square_scale), float(softcap or 0.0), int(shift), key, need_grad)
    return loss
