"""torch glue: tensor <-> wire conversion and the autograd hook-up. Imports nothing of the
client (the client imports it, lazily: importing torch takes seconds).

bfloat16 tensors travel as their raw bits (viewed as int16), so torch users do not need ml_dtypes.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from clce_wire.protocol import WireTensor, decode_tensor, encode_tensor

try:
    import torch
except ImportError:
    torch = None

__all__ = ["to_wire", "from_wire", "wire_dtype", "attach_grad", "input_grad", "autocast_fp32"]

if torch is not None:
    _WIRE_BY_TORCH = {
        torch.float32: "float32",
        torch.float64: "float64",
        torch.float16: "float16",
        torch.bfloat16: "bfloat16",
        torch.int64: "int64",
        torch.int32: "int32",
        torch.int16: "int16",
        torch.uint8: "uint8",
        torch.bool: "bool",
    }


def wire_dtype(dtype: Any) -> str:
    """The wire name of a torch dtype."""
    name = _WIRE_BY_TORCH.get(dtype) if torch is not None else None
    if name is None:
        raise TypeError(f"clce does not support dtype {dtype}")
    return name


def to_wire(x: Any) -> WireTensor:
    """A WireTensor for a torch tensor (copied to the CPU if needed) or anything numpy takes."""
    if torch is None or not isinstance(x, torch.Tensor):
        return encode_tensor(np.asarray(x))
    name = wire_dtype(x.dtype)
    t = x.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    t = t.resolve_conj().resolve_neg().contiguous()
    # the numpy view keeps the tensor's storage alive for as long as the memoryview lives
    arr = (t.view(torch.int16) if name == "bfloat16" else t).numpy()
    return WireTensor(name, tuple(t.shape), memoryview(arr.reshape(-1).view(np.uint8)))


def from_wire(wt: Any, *, name: str, device: Any = None) -> Any:
    """A torch tensor over a received WireTensor (no copy on the CPU when the bytes allow)."""
    if not isinstance(wt, WireTensor):
        return torch.as_tensor(decode_tensor(wt, name=name))  # raises the ProtocolError
    bf16 = wt.dtype == "bfloat16"
    arr = decode_tensor(WireTensor("int16", wt.shape, wt.data) if bf16 else wt, name=name)
    # Copy when torch could not safely use the bytes in place: read-only memory warns, and
    # misaligned pointers (msgpack does not align bin payloads) are undefined behaviour for
    # vectorized kernels.
    if not arr.flags.writeable or not arr.flags.aligned:
        arr = arr.copy()
    t = torch.from_numpy(arr)
    if bf16:
        t = t.view(torch.bfloat16)
    if device is not None and torch.device(device).type != "cpu":
        t = t.to(device)
    return t


def autocast_fp32(input: Any, target: Any, options: dict) -> tuple[Any, Any, dict]:
    """torch's autocast policy for cross_entropy ("fp32": half-precision floating tensors cast to
    float32, float64 left alone), applied to an eager call's tensors while autocast is on for the
    input's device: what `torch.library.register_autocast` does for the operator under
    torch.compile (clce_client/ops.py), so both give a float32 loss. The casts are differentiable:
    the gradient reaches a bf16 input as bf16, as F.cross_entropy's does."""
    if not torch.is_autocast_enabled(input.device.type):
        return input, target, options

    def cast(t: Any) -> Any:
        half = isinstance(t, torch.Tensor) and t.dtype in (torch.float16, torch.bfloat16)
        return t.float() if half else t

    if isinstance(options.get("weight"), torch.Tensor):
        options = {**options, "weight": cast(options["weight"])}
    return cast(input), cast(target), options


def input_grad(grad: Any, grad_output: Any, *, class_dim: Any, shift: int, dtype: Any, owned: bool) -> Any:
    """The input's gradient, ``grad * grad_output``, from the server's gradient ``grad`` (which is
    for grad_output = 1). The one place where backward meets the server's buffer.

    The server's gradient is as big as the logits (262 MB at 2048x32000 fp32), and on these hosts a
    fresh buffer that size costs more in page faults than the whole remote call. So when `owned`
    (nobody but this graph holds the buffer: not the caller, not another call) and the graph is not
    kept for another backward, the buffer itself becomes the gradient: scaled in place when
    grad_output is not 1, handed over as it is when it is. Autograd then owns it: AccumulateGrad
    adopts a gradient that nothing else references as ``.grad`` (no copy) when ``.grad`` is None,
    and adds it into an existing ``.grad`` otherwise. The memory stays the buffer's: a shared-memory
    region (or a pooled receive buffer) comes back to its pool only when the last tensor over it is
    gone, so a later call can never write into a ``.grad`` that is still held.

    Out of place (a new tensor, the buffer left untouched) when the buffer is not ours alone, when
    retain_graph/create_graph keeps the graph (a later backward reads the buffer again), when the
    dtype changes, and while torch.compile traces the backward (its graph owns its buffers).

    reduction='none': grad_output has the loss's shape, the input's without the class dimension
    (`class_dim`); with `shift`, the loss covers positions 0..T-shift-1 of dim -2 and the dropped
    positions' gradient rows are zero, so grad_output is padded with zeros to T.
    """
    if class_dim is not None:
        if shift:
            grad_output = torch.nn.functional.pad(grad_output, (0, shift))
        grad_output = grad_output.unsqueeze(class_dim)
    if (not owned or grad.dtype != dtype or torch.compiler.is_compiling()
            or torch._C._autograd._get_current_graph_task_keep_graph()):
        return (grad * grad_output).to(dtype)
    if grad_output.numel() > 1 and not any(grad_output.stride()):
        grad_output = grad_output.as_strided((), ())    # an expanded scalar: loss.sum() of reduction='none'
    if grad_output.numel() != 1 or grad_output.item() != 1:
        grad.mul_(grad_output)
    return grad


if torch is not None:

    class _RemoteCrossEntropy(torch.autograd.Function):
        """Gives a server-computed loss a grad_fn whose backward uses the server's gradient."""

        @staticmethod
        def forward(ctx, input, loss, grad, class_dim, shift=0, owned=True):
            # saved as a tensor, not an attribute: autograd frees it right after backward (before
            # AccumulateGrad runs, so the buffer can be adopted as .grad), unless retain_graph
            ctx.save_for_backward(grad)
            ctx.class_dim = class_dim
            ctx.shift = shift
            ctx.owned = owned
            ctx.input_dtype = input.dtype
            # a fresh tensor, not a view of an input: views returned by a Function cannot be
            # modified in place (loss /= accumulation_steps). The loss is tiny next to the grad.
            return loss.clone()

        @staticmethod
        def backward(ctx, grad_output):
            (grad,) = ctx.saved_tensors
            return (input_grad(grad, grad_output, class_dim=ctx.class_dim, shift=ctx.shift,
                               dtype=ctx.input_dtype, owned=ctx.owned), None, None, None, None, None)


def attach_grad(input: Any, loss: Any, grad: Any, reduction: str, *, classes_last: bool = False,
                shift: int = 0, owned: bool = True) -> Any:
    """`loss` with a grad_fn: backward() puts grad * grad_output into input.grad. `classes_last`
    and `shift` describe the request's layout (the server's gradient has the input's shape).
    `owned`: `grad` is this call's alone (the caller did not ask for it too), so backward may
    make it the input's gradient without a copy (`input_grad`)."""
    if input.is_leaf and input.grad is not None and input.grad.data_ptr() == grad.data_ptr():
        # inplace_grad=True over logits whose .grad is their own memory (a previous call's adopted
        # gradient): the server has just written over that .grad, and accumulating into it would
        # double this call's gradient
        raise RuntimeError("inplace_grad=True wrote over the input's own .grad (the previous call's gradient, "
                           "which lives in the input's memory); set input.grad = None before the next call")
    class_dim = None
    if reduction == "none":
        class_dim = -1 if classes_last else (0 if input.dim() == 1 else 1)
    with torch.enable_grad():
        return _RemoteCrossEntropy.apply(input, loss, grad, class_dim, shift, owned)
