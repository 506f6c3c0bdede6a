"""clce's loss as a PyTorch operator: ``torch.ops.clce.cross_entropy``.

`cross_entropy` here is F.cross_entropy computed by a clce server, usable where training code
already lives:

* torch.compile: the op is registered with `torch.library.custom_op`, with a fake (meta)
  implementation and `register_autograd`, so the compiler sees one opaque node and never traces
  the HTTP client. ``Client.cross_entropy``, ``clce_client.cross_entropy`` and
  ``CrossEntropyLoss`` come here while dynamo traces them (`traced_cross_entropy`). The op
  returns the loss and the server's gradient (for grad_output = 1), as Liger-Kernel does;
  backward scales that gradient by grad_output in place and hands it to autograd, without a copy
  (`torch_support.input_grad` says when it may). A caller of ``torch.ops.clce.cross_entropy``
  who keeps the gradient output gets a copy made instead; that output is not differentiable.
* autocast: registered with `torch.library.register_autocast` as float32, which is torch's CPU
  and CUDA autocast policy for ``cross_entropy_loss`` (it is on the "fp32" list): under
  ``torch.autocast(..., dtype=torch.bfloat16)`` the logits are cast to float32 first and the loss
  is float32, exactly as F.cross_entropy does under autocast.
* layouts: ``shift`` and ``classes_last`` as the server takes them (docs/protocol.md): a causal
  LM's (B, T, V) logits and (B, T) labels are sent as they are, with no shifted copy.

The operator takes plain values, so the client is named by a small int key: `client_key` registers
a `Client` (0 is the default client, from CLCE_URL). Importing this module imports torch.
"""

from __future__ import annotations

import itertools
import threading
import weakref
from typing import Optional

import torch
from torch import Tensor

from .client import Client, default_client
from .torch_support import input_grad

__all__ = ["cross_entropy", "client_key"]

# key -> Client, weakly: a client made per step is not kept alive by having been used here
_clients: weakref.WeakValueDictionary[int, Client] = weakref.WeakValueDictionary()
_next_key = itertools.count(1)
_lock = threading.Lock()


@torch.compiler.assume_constant_result
def client_key(client: Optional[Client]) -> int:
    """The operator's key for `client` (0: the default client). A compiled graph holds the key as a
    constant (dynamo guards on the client object, so another client recompiles)."""
    if client is None:
        return 0
    if not isinstance(client, Client):
        raise TypeError(f"clce's operator needs a clce_client.Client, got {type(client).__name__}")
    with _lock:
        key = getattr(client, "_clce_op_key", None)
        if key is None or _clients.get(key) is not client:
            key = next(_next_key)
            _clients[key] = client
            client._clce_op_key = key
        return key


def _client(key: int) -> Client:
    if key == 0:
        return default_client()
    client = _clients.get(key)
    if client is None:
        raise RuntimeError(f"clce::cross_entropy: the Client registered as {key} no longer exists; keep a "
                           "reference to the client for as long as the model uses it")
    return client


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


def cross_entropy(input: Tensor, target: Tensor, weight: Optional[Tensor] = None, ignore_index: int = -100,
                  reduction: str = "mean", label_smoothing: float = 0.0, *, shift: int = 0,
                  classes_last: bool = False, client: Optional[Client] = None) -> Tensor:
    """F.cross_entropy computed by a clce server, as one operator (see the module's doc).

    ``shift`` and ``classes_last``: the request layouts of docs/protocol.md; ``shift=1`` with
    (B, T, V) logits and (B, T) labels is the causal LM loss without the shifted copy.
    """
    need_grad = torch.is_grad_enabled() and input.requires_grad
    loss, _ = torch.ops.clce.cross_entropy(input, target, weight, int(ignore_index), reduction,
                                           float(label_smoothing), int(shift), bool(classes_last),
                                           client_key(client), need_grad)
    return loss


# what Client.cross_entropy takes that the operator computes too; the other options ask for more
# than the loss (return_lse, ...) or for memory the client manages (inplace_grad)
_OPERATOR_OPTIONS = frozenset({"shift", "classes_last", "return_grad"})


@torch.compiler.disable
def _eager_cross_entropy(client: Optional[Client], input, target, weight, ignore_index, reduction, label_smoothing,
                         options: dict):
    # outside the compiled graph (a graph break): the client as in eager mode
    return (client or default_client()).cross_entropy(input, target, weight, ignore_index, reduction,
                                                      label_smoothing, **options)


def traced_cross_entropy(client: Optional[Client], input, target, weight, ignore_index, reduction,
                         label_smoothing, options: dict):
    """`Client.cross_entropy` (and clce_client.cross_entropy, CrossEntropyLoss) while
    torch.compile traces it: the operator, so the graph holds one node and never the HTTP client.
    What the operator does not compute (return_lse, return_grad=True, inplace_grad, ...; numpy
    input) runs as in eager mode, after a graph break."""
    if (not isinstance(input, Tensor) or options.get("return_grad")
            or any(k not in _OPERATOR_OPTIONS and v not in (None, False) for k, v in options.items())):
        return _eager_cross_entropy(client, input, target, weight, ignore_index, reduction, label_smoothing, options)
    layout = dict(shift=options.get("shift") or 0, classes_last=bool(options.get("classes_last")), client=client)
    if options.get("return_grad") is False:    # as in eager mode: a loss without a grad_fn, no gradient sent
        with torch.no_grad():
            return cross_entropy(input, target, weight, ignore_index, reduction, label_smoothing, **layout)
    return cross_entropy(input, target, weight, ignore_index, reduction, label_smoothing, **layout)
