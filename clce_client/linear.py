"""The fused linear cross-entropy from the client: send the hidden states, not the logits.

    loss = clce_client.linear_cross_entropy(hidden, lm_head.weight, labels, shift=1)
    loss.backward()           # hidden, weight (and bias) get their gradients

    loss_fn = clce_client.LinearCrossEntropyLoss(client)   # Liger's argument order (linear_nn.py):
    loss = loss_fn(lm_head.weight, hidden, labels)  # forward(lin_weight, _input, target, bias=None)

The server computes `F.cross_entropy(F.linear(hidden, weight, bias), target, **options)` in row
chunks and never holds the (N, V) logits (clce_server/linear.py). Options are cross_entropy's
where they apply: class_weight (cross_entropy's `weight`), ignore_index, reduction,
label_smoothing, lse_square_scale (z-loss), softcap, shift (causal LMs), return_z_loss.

Two ways for the weight:
  * stateless (default): the weight travels with every call and its gradient comes back with
    every call;
  * stored (`weight_name=`): uploaded once per version (the version is its storage and torch's
    in-place counter, `tensor._version`, so an optimizer step re-uploads by itself), then each
    call sends only hidden states and targets. With `accumulate=True` the weight's gradient adds
    up on the server over the micro-batches and comes back once, in `LinearWeights.flush()`,
    which `LinearWeights.attach(optimizer)` runs before every optimizer step. A version the
    server no longer has (evicted, restarted) is uploaded again and the call retried.

The gradients the server returns are those of grad_output = 1 ('none': of the summed rows); the
autograd backward scales them by the actual grad_output, which must be one value (for 'none',
the same for every row, as loss.sum() or loss.mean() give).
"""

from __future__ import annotations

import threading
from typing import Any

import numpy as np

from clce_wire.protocol import PROTOCOL_VERSION, decode_tensor, encode_message, message_nbytes

from . import errors

OPTION_NAMES = ("ignore_index", "reduction", "label_smoothing", "lse_square_scale", "softcap", "shift")


def _to_numpy(t: Any) -> np.ndarray:
    """A torch tensor's (or an array's) data as a C-contiguous numpy array, without a copy when
    it already is one (bf16 through ml_dtypes)."""
    try:
        import torch
    except ImportError:   # pragma: no cover - numpy-only installs
        torch = None
    if torch is not None and isinstance(t, torch.Tensor):
        t = t.detach()
        if t.device.type != "cpu":
            t = t.cpu()
        t = t.contiguous()
        if t.dtype == torch.bfloat16:
            import ml_dtypes
            return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
        return t.numpy()
    return np.ascontiguousarray(t)


def _array(msg: dict, name: str) -> np.ndarray | None:
    v = msg.get(name)
    return None if v is None else decode_tensor(v, name=name)


def _widened(a: np.ndarray) -> np.ndarray:
    """A copy torch can take: float64 stays, anything else (bf16 included) as float32."""
    return np.array(a, np.float64 if a.dtype == np.float64 else np.float32)


def _post(client, path: str, msg: dict) -> dict:
    segments = encode_message(msg)
    resp = client._request("POST" if not path.startswith("PUT ") else "PUT", path.removeprefix("PUT "),
                           segments, message_nbytes(segments))
    return client._json_or_msgpack(resp)


class LinearWeights:
    """The weights one client has stored on its server, by name: which version is there, and the
    grad_output scale of the micro-batches accumulated since (one value per version)."""

    def __init__(self, client):
        self.client = client
        self._lock = threading.Lock()
        self._uploaded: dict[str, str] = {}
        self._pending: dict[str, tuple[Any, Any, str, float | None]] = {}   # name -> (weight, bias, version, scale)
        #: flushes per name: a flush precedes an optimizer step, which makes a new version even
        #: where the step leaves tensor._version alone (torch's fused AdamW does)
        self._generation: dict[str, int] = {}

    @staticmethod
    def version_of(weight: Any, bias: Any = None) -> str:
        """Storage address and in-place version counters: an optimizer step changes them."""
        parts = []
        for t in (weight, bias):
            if t is None:
                continue
            if hasattr(t, "_version"):
                parts.append(f"{t.untyped_storage().data_ptr():x}.{t.storage_offset()}.{t._version}")
            else:
                parts.append(f"{np.asarray(t).ctypes.data:x}.{hash(np.asarray(t).tobytes())}")
        return "-".join(parts)

    def upload(self, name: str, weight: Any, bias: Any, version: str) -> None:
        msg = {"v": PROTOCOL_VERSION, "weight_version": version, "weight": _to_numpy(weight)}
        if bias is not None:
            msg["bias"] = _to_numpy(bias)
        _post(self.client, f"PUT /v1/weights/{name}", msg)
        with self._lock:
            self._uploaded[name] = version

    def ensure(self, name: str, weight: Any, bias: Any) -> str:
        with self._lock:
            version = f"{self._generation.get(name, 0)}:{self.version_of(weight, bias)}"
            have = self._uploaded.get(name)
        if have != version:
            if name in self._pending and self._pending[name][2] != version:
                raise RuntimeError(f"weight {name!r} changed before its accumulated gradient was taken: "
                                   "call flush() (LinearWeights.attach(optimizer) does it before each step)")
            self.upload(name, weight, bias, version)
        return version

    def note_micro_batch(self, name: str, weight: Any, bias: Any, version: str, scale: float) -> None:
        """A backward ran for a micro-batch accumulated on the server, with this grad_output."""
        with self._lock:
            prev = self._pending.get(name)
            if prev is not None and prev[3] is not None and prev[3] != scale:
                raise RuntimeError(
                    f"weight {name!r}: micro-batches accumulated on the server need one grad_output for all "
                    f"of them (got {prev[3]} and {scale}); use accumulate=False for varying scales")
            self._pending[name] = (weight, bias, version, scale)

    def flush(self) -> None:
        """Take every accumulated gradient from the server into the weights' .grad (added)."""
        import torch

        with self._lock:
            pending, self._pending = self._pending, {}
            for name in pending:
                self._generation[name] = self._generation.get(name, 0) + 1
        for name, (weight, bias, version, scale) in pending.items():
            msg = _post(self.client, f"/v1/weights/{name}/grad", {"v": PROTOCOL_VERSION, "weight_version": version})
            for param, key in ((weight, "grad_weight"), (bias, "grad_bias")):
                g = _array(msg, key)
                if param is None or g is None:
                    continue
                g = (torch.from_numpy(np.array(g)) * scale).to(param.dtype)
                param.grad = g.reshape(param.shape) if param.grad is None else param.grad.add_(g.reshape(param.shape))

    def attach(self, optimizer) -> Any:
        """Flush before every step of `optimizer`; returns the hook's handle."""
        return optimizer.register_step_pre_hook(lambda opt, args, kwargs: self.flush())


def _request(client, hidden, weight, target, bias, class_weight, opts, *, weight_name, weights,
             accumulate, want_grad) -> dict:
    msg: dict[str, Any] = {"v": PROTOCOL_VERSION, "hidden": _to_numpy(hidden), "target": _to_numpy(target),
                           "accumulate": bool(accumulate), "want_grad": bool(want_grad),
                           **{k: v for k, v in opts.items() if v is not None}}
    if class_weight is not None:
        msg["class_weight"] = _to_numpy(class_weight)
    if weight_name is None:
        msg["weight"] = _to_numpy(weight)
        if bias is not None:
            msg["bias"] = _to_numpy(bias)
        return _post(client, "/v1/linear_cross_entropy", msg)
    for attempt in range(2):
        msg["weight_name"], msg["weight_version"] = weight_name, weights.ensure(weight_name, weight, bias)
        try:
            return _post(client, "/v1/linear_cross_entropy", msg)
        except errors.NotFound:
            if attempt:   # uploaded and at once missing again: the store cannot hold it
                raise
            with weights._lock:
                weights._uploaded.pop(weight_name, None)   # evicted or restarted: upload again
    raise AssertionError("unreachable")


def _torch_function():
    import torch

    class _RemoteLinearCrossEntropy(torch.autograd.Function):
        @staticmethod
        def forward(ctx, hidden, weight, bias, target, class_weight, client, opts, weight_name, weights, accumulate):
            opts = dict(opts)
            want = opts.pop("_want_grad")   # decided by the caller: inside forward autograd is off
            msg = _request(client, hidden, weight, target, bias, class_weight, opts, weight_name=weight_name,
                           weights=weights, accumulate=accumulate, want_grad=want)
            ctx.grads = {k: _array(msg, k) for k in ("grad_hidden", "grad_weight", "grad_bias")}
            ctx.stored = (weight_name, weights, weight, bias, msg_version(weights, weight_name)) if accumulate else None
            ctx.shapes = (hidden.shape, hidden.dtype, weight.dtype)
            z = _array(msg, "z_loss")
            loss = torch.from_numpy(_widened(_array(msg, "loss")))
            return loss.to(hidden.dtype), (torch.from_numpy(_widened(z)) if z is not None else None)

        @staticmethod
        def backward(ctx, grad_loss, grad_z):
            if grad_z is not None and bool((grad_z != 0).any()):
                raise RuntimeError("z_loss is reported, not differentiated separately: "
                                   "its gradient is already part of loss's")
            g = grad_loss.reshape(-1).float()
            if g.numel() > 1 and not bool((g == g[0]).all()):
                raise RuntimeError("reduction='none': the remote gradient needs one grad_output for every row "
                                   "(loss.sum() or loss.mean())")
            scale = float(g[0]) if g.numel() else 0.0
            h_shape, h_dtype, w_dtype = ctx.shapes

            def scaled(arr, dtype, shape=None):
                if arr is None:
                    return None
                t = torch.from_numpy(_widened(arr))
                t = (t * scale).to(dtype)
                return t.reshape(shape) if shape is not None else t

            gh = scaled(ctx.grads["grad_hidden"], h_dtype, h_shape)
            gw = scaled(ctx.grads["grad_weight"], w_dtype)
            gb = scaled(ctx.grads["grad_bias"], w_dtype)
            if ctx.stored is not None:
                name, weights, weight, bias, version = ctx.stored
                weights.note_micro_batch(name, weight, bias, version, scale)
            ctx.grads = None
            return gh, gw, gb, None, None, None, None, None, None, None

    return _RemoteLinearCrossEntropy


def msg_version(weights: LinearWeights | None, name: str | None) -> str | None:
    if weights is None or name is None:
        return None
    with weights._lock:
        return weights._uploaded.get(name)


_FUNCTION = None


def linear_cross_entropy(hidden, weight, target, bias=None, *, client, class_weight=None,
                         ignore_index: int = -100, reduction: str = "mean", label_smoothing: float = 0.0,
                         lse_square_scale: float = 0.0, softcap: float | None = None, shift: int = 0,
                         return_z_loss: bool = False, weight_name: str | None = None,
                         weights: LinearWeights | None = None, accumulate: bool = False):
    """`F.cross_entropy(F.linear(hidden, weight, bias), target, ...)` computed by a clce server.

    torch tensors get autograd (hidden, weight, bias); numpy arrays get a dict of loss and
    gradients. `client`: a clce_client.Client.
    `weight_name` stores the weight on the server (uploaded once per version, `weights`
    remembers which); `accumulate` keeps its gradient there until `weights.flush()`.
    (clce_client.linear_cross_entropy is this with the default client.)"""
    global _FUNCTION
    if accumulate and weight_name is None:
        raise ValueError("accumulate=True needs weight_name (the weight is stored on the server)")
    if weight_name is not None and weights is None:
        weights = weights_of(client)
    opts = dict(ignore_index=ignore_index, reduction=reduction, label_smoothing=label_smoothing,
                lse_square_scale=lse_square_scale, softcap=softcap, shift=shift)
    try:
        import torch
        is_torch = isinstance(hidden, torch.Tensor)
    except ImportError:   # pragma: no cover
        is_torch = False
    if not is_torch:
        msg = _request(client, hidden, weight, target, bias, class_weight, opts, weight_name=weight_name,
                       weights=weights, accumulate=accumulate, want_grad=True)
        return {k: _array(msg, k) for k in ("loss", "z_loss", "grad_hidden", "grad_weight", "grad_bias")}
    if _FUNCTION is None:
        _FUNCTION = _torch_function()
    want = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (hidden, weight, bias))
    loss, z = _FUNCTION.apply(hidden, weight, bias, target, class_weight, client,
                              {**opts, "_want_grad": want}, weight_name, weights, accumulate and want)
    return (loss, z) if return_z_loss else loss


_weights_lock = threading.Lock()


def weights_of(client) -> LinearWeights:
    """The LinearWeights of a client (one per client object)."""
    with _weights_lock:
        w = getattr(client, "_linear_weights", None)
        if w is None:
            w = client._linear_weights = LinearWeights(client)
        return w


