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

__all__ = ["to_wire", "from_wire", "wire_dtype", "attach_grad"]

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


if torch is not None:

    class _RemoteCrossEntropy(torch.autograd.Function):
        """Gives a server-computed loss a grad_fn whose backward uses the server's gradient."""

        @staticmethod
        def forward(ctx, input, loss, grad, class_dim, shift=0):
            ctx.grad = grad
            ctx.class_dim = class_dim
            ctx.shift = shift
            ctx.input_dtype = input.dtype
            # a fresh tensor, not a view of an input: views returned by a Function cannot be
            # modified in place (loss /= accumulation_steps). The loss is tiny next to the grad.
            return loss.clone()

        @staticmethod
        def backward(ctx, grad_output):
            # The server's gradient is for grad_output = 1. For reduction='none' grad_output has
            # the loss shape, which is the input shape without the class dimension.
            # With shift, the loss covers positions 0..T-shift-1 of dim -2: the dropped positions'
            # gradient rows are zero, so pad grad_output with zeros to T.
            if ctx.class_dim is not None:
                if ctx.shift:
                    grad_output = torch.nn.functional.pad(grad_output, (0, ctx.shift))
                grad_output = grad_output.unsqueeze(ctx.class_dim)
            grad = ctx.grad * grad_output
            return grad.to(ctx.input_dtype), None, None, None, None


def attach_grad(input: Any, loss: Any, grad: Any, reduction: str, *, classes_last: bool = False,
                shift: int = 0) -> Any:
    """`loss` with a grad_fn: backward() puts grad * grad_output into input.grad. `classes_last`
    and `shift` describe the request's layout (the server's gradient has the input's shape)."""
    class_dim = None
    if reduction == "none":
        class_dim = -1 if classes_last else (0 if input.dim() == 1 else 1)
    with torch.enable_grad():
        return _RemoteCrossEntropy.apply(input, loss, grad, class_dim, shift)
