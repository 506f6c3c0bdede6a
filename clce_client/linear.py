"""The fused linear cross-entropy from the client: send the hidden states, not the logits.

    loss = clce_client.linear_cross_entropy(hidden, lm_head.weight, labels, shift=1)
    loss.backward()           # hidden, weight (and bias) get their gradients

    loss_fn = clce_client.LinearCrossEntropyLoss(client=client)  # Liger's constructor (nn.py)
    loss = loss_fn(lm_head.weight, hidden, labels)  # forward(lin_weight, _input, target, bias=None)

The server computes `F.cross_entropy(F.linear(hidden, weight, bias), target, **options)` in row
chunks and never holds the (N, V) logits (clce_server/linear.py). Options are cross_entropy's
where they apply: class_weight (cross_entropy's `weight`), ignore_index, reduction,
label_smoothing, lse_square_scale (z-loss), softcap, shift (causal LMs), return_z_loss.

The weight crosses the wire once per version. A torch weight is stored on the server under a
name (`weight_name`, or one made for the tensor object) and version: the object, torch's in-place
counter (`tensor._version`), and the flushes and optimizer steps so far (a global post-step hook:
torch's fused AdamW leaves `_version` alone), so an optimizer step re-uploads by itself and a new
tensor at a recycled address never passes for an old one. An update that bypasses both (writing
`.data`) is not seen: step through an optimizer or update in place under no_grad. Between versions a
call sends only hidden states and targets. Its gradient:
  * comes back with every call (default), through autograd, so clipping, DDP and optimizers
    see it as usual;
  * or, with `accumulate=True`, adds up on the server over the micro-batches of one version and
    comes back once, in `LinearWeights.flush()`, which `LinearWeights.attach(optimizer)` runs
    before every optimizer step.
A version the server no longer has (evicted, expired, restarted) is uploaded again and the call
retried.

Accumulation never forgets silently. Every accumulating answer names the server's instance, its
accumulation and how many micro-batches that accumulation holds; the flush answers the same for
what it took. A flush that finds fewer micro-batches than were sent for the version (the server
restarted, or evicted or expired the version, between micro-batches) replays the lost ones from
their inputs, which `LinearWeights` keeps until the flush: a copy of each micro-batch's hidden
states and targets, so up to one optimizer step's worth of hidden states in host memory. With
`LinearWeights.replay = False` nothing is kept, and such a flush raises `AccumulationLost`
before the optimizer step instead (`attach`'s hook runs the flush before it): a step is never
taken on a partial sum.
`stateless=True` (numpy weights without a `weight_name` too) sends the weight with every call.

On shared memory (a client on the server's host; clce_client/shm.py) nothing large is copied
into a request: hidden states and targets go into a region of the client's arena (used where
they lie when they already live in one), the server writes the hidden's and the weight's
gradients into the arena, and a stored weight is a reference to a region. `share_weight` moves a
parameter into shared memory once, so its versions cost no copy at all; otherwise each version
is copied into a region once.

What comes back is the loss path's: the loss (float32 for every input dtype, as Liger-Kernel and
Cut Cross-Entropy return it; the gradients in the inputs' dtypes), and with `return_lse` /
`return_argmax` a `CrossEntropyResult` holding the loss, the per-row lse, the argmax (Liger's
predicted tokens) and the accuracy over the non-ignored rows (Liger's token accuracy), with the
z-loss (zeros without lse_square_scale); `return_z_loss=True` alone gives (loss, z_loss), as
Liger's. Inputs are float32, bfloat16 or float16. Under torch.autocast the hidden states, the
weight and the bias go in the autocast dtype (torch's policy for F.linear, and Liger's), the
loss stays float32 (torch's for cross_entropy), eagerly and compiled alike.

The gradients the server returns are those of grad_output = 1 ('none': of the summed rows); the
autograd backward scales them by the actual grad_output. For 'none' with a grad_output that
differs per row, backward asks the server again, with that grad_output (the weight's gradient is
a sum over rows: it cannot be rescaled afterwards); an accumulating call cannot (its unscaled
gradient is already added on the server), nor an AsyncClient's (backward cannot await).

`LinearCall.flow` and the flush are flows of I/O steps (clce_client/flows.py), so `Client` and
`AsyncClient` run the same call; autograd is attached after the I/O, never inside it.
"""

from __future__ import annotations

import collections
import hashlib
import inspect
import itertools
import os
import threading
import time
import weakref
from typing import Any

import numpy as np

from clce_wire.protocol import (PROTOCOL_VERSION, ProtocolError, decode_tensor, dtype_name, encode_message,
                                message_nbytes)
from clce_wire.shm import is_ref_map

from . import errors
from .flows import Blocking, Send, Try, is_torch_tensor as _is_torch_tensor, prepared, renewing
from .results import CrossEntropyResult

LINEAR_PATH = "/v1/linear_cross_entropy"
OPTION_NAMES = ("ignore_index", "reduction", "label_smoothing", "lse_square_scale", "softcap", "shift",
                "return_lse", "return_argmax")
RESULT_NAMES = ("loss", "z_loss", "lse", "argmax", "accuracy", "grad_hidden", "grad_weight", "grad_bias")
#: how many times one call uploads its weight again after the server said it no longer has it,
#: beyond one per replica (the weight moving to the next replica as each fails), within the
#: client's retry budget
_REUPLOADS = 2
#: how many rounds of replay a flush tries (each round: replay what is lost, take it again)
_REPLAY_ROUNDS = 3


class AccumulationLost(RuntimeError):
    """A flush found that the server's accumulated gradient is missing micro-batches (a restart,
    an eviction or an expiry) and could not replay them: the optimizer step must not run."""


def _to_numpy(t: Any, dtype: Any = None) -> np.ndarray:
    """A torch tensor's (or an array's) data as a C-contiguous numpy array, without a copy when
    it already is one (bf16 through ml_dtypes); `dtype`: a torch floating dtype to cast to first."""
    if _is_torch_tensor(t):
        import torch

        t = t.detach()
        if dtype is not None and t.is_floating_point():
            t = t.to(dtype)
        if t.device.type != "cpu":
            t = t.cpu()
        t = t.contiguous()
        if t.dtype == torch.bfloat16:
            import ml_dtypes
            return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
        return t.numpy()
    return np.ascontiguousarray(t)


def _autocast_dtype(t: Any) -> Any:
    """The autocast dtype of `t`'s device while autocast is on there, else None."""
    import torch

    dev = t.device.type
    if not torch.is_autocast_enabled(dev):
        return None
    return torch.get_autocast_dtype(dev)


def _widened(a: np.ndarray) -> np.ndarray:
    """A copy torch can take: float64 stays, anything else (bf16 included) as float32."""
    return np.array(a, np.float64 if a.dtype == np.float64 else np.float32)


class _Request:
    """One request of a flow, as `Send` sends it; `placement`: the shared memory it uses;
    `affinity`: a stored weight's affinity key (sent to the weight's replica, as a header)."""

    def __init__(self, method: str, path: str, msg: dict[str, Any], placement: Any = None,
                 affinity: str | None = None):
        self.method, self.path, self.placement, self.affinity = method, path, placement, affinity
        self.segments = None if msg is None else encode_message(msg)      # None: no body (DELETE)
        self.nbytes = 0 if msg is None else message_nbytes(self.segments)


def _place(arena: Any, parts: list[tuple[str, Any, int]]) -> Any:
    from .shm import Placement

    return Placement(arena, [(k, None if a is None else a.reshape(-1).view(np.uint8), n) for k, a, n in parts])


def _received(msg: dict[str, Any], key: str, placement: Any) -> Any:
    """A result field: a WireTensor (inline, or over the arena's memory the answer names)."""
    value = msg.get(key)
    if placement is not None and is_ref_map(value):
        return placement.tensor(value, key)
    return value


# ---- the weights a client has stored --------------------------------------------------------------

class LinearWeights:
    """The weights one client has stored on its server, by name: which version is there (and the
    shared memory it lives in, when the client copied it into a region), and the grad_output
    scale of the micro-batches accumulated since (one value per version)."""

    def __init__(self, client, replay: bool = True):
        self._client = weakref.ref(client)   # the client owns its weights (client.weights), not the reverse
        #: keep each accumulated micro-batch's inputs until the flush, to replay what the server
        #: lost; False: keep nothing, and a flush that finds micro-batches missing raises
        self.replay = replay
        self._lock = threading.Lock()
        self._stored: dict[str, tuple[str, Any]] = {}      # name -> (version, placement kept alive)
        self._pending: dict[str, _Pending] = {}             # name -> the version's micro-batches so far
        #: flushes per name: a flush precedes an optimizer step, which makes a new version even
        #: where the step leaves tensor._version alone (torch's fused AdamW does)
        self._generation: dict[str, int] = {}
        #: a token per tensor object (weakly held): a new object is a new version even at an old address
        self._tokens: dict[int, tuple[weakref.ref, int]] = {}
        self._next_token = itertools.count(1)
        #: auto-named weights (a torch weight without a weight_name) by their tensor's token, and
        #: the names of those whose tensor is gone: deleted from the server by the next call, so
        #: that a loop making new head tensors does not fill the tenant's --max-stored-weights
        self._auto: dict[int, str] = {}
        self._gone: collections.deque[str] = collections.deque()
        #: this object's versions are its own: another process (or client) of the same tenant
        #: storing under the same name replaces them, and is never taken for them
        self.owner = f"{os.getpid():x}.{os.urandom(4).hex()}"

        #: what the affinity keys of this client's weights start with: its tenant's API key, hashed
        #: (a tenant's weight of a name is another tenant's weight of another key; the key never
        #: leaves in the clear)
        key = getattr(client, "_api_key", None) or ""
        self._tenant_tag = hashlib.blake2b(key.encode(), digest_size=6, person=b"clce-affinity").hexdigest()

        #: uploads made (a version crossing the wire), for tests and benchmarks
        self.uploads = 0
        #: the latest uploads as (name, version, instance of the server that took it): where each
        #: version went, so that a test or a benchmark can check one upload per replica and version
        self.upload_log: collections.deque = collections.deque(maxlen=1024)
        #: micro-batches replayed at a flush because the server had lost them
        self.replayed = 0

    @property
    def client(self) -> Any:
        client = self._client()
        if client is None:
            raise RuntimeError("these LinearWeights' client is gone: keep the client (client.weights is its own)")
        return client

    def affinity(self, name: str) -> str:
        """The affinity key of the weight `name`: "<tenant tag>.<name>", sent in the
        serve_multiplexed_model_id header with every request about the weight (its uploads, its
        micro-batches, its flush). The multi-replica client, a load balancer hashing the header,
        and Ray Serve's multiplexing (the weight as a model) all send them to one replica, where
        the weight and its accumulator are."""
        return f"{self._tenant_tag}.{name}"

    def _token(self, t: Any) -> int:
        key = id(t)
        entry = self._tokens.get(key)
        if entry is not None and entry[0]() is t:
            return entry[1]
        token = next(self._next_token)
        self._tokens[key] = (weakref.ref(t, lambda _, key=key, token=token: self._dropped(key, token)), token)
        return token

    def _dropped(self, key: int, token: int) -> None:
        # a weakref callback: it may run inside the lock (the GC), so no lock and no I/O here
        entry = self._tokens.get(key)
        if entry is not None and entry[1] == token:
            self._tokens.pop(key, None)
        name = self._auto.pop(token, None)
        if name is not None:
            self._gone.append(name)

    def auto_name(self, weight: Any) -> str:
        """The name a torch weight without a weight_name is stored under: one per tensor object,
        deleted from the server once the tensor is gone (`take_gone`)."""
        with self._lock:
            token = self._token(weight)
            return self._auto.setdefault(token, f"auto-{self.owner}-{token}")

    def take_gone(self) -> list[str]:
        """Auto-named weights whose tensors are gone, to delete from the server (once each)."""
        out = []
        while self._gone:
            name = self._gone.popleft()
            with self._lock:
                self._stored.pop(name, None)
            out.append(name)
        return out

    def version_of(self, name: str, weight: Any, bias: Any = None) -> str:
        """This weight's version: the flushes of `name`, the optimizer steps taken in this process,
        and per tensor its object's token and torch's in-place counter (an array's: its bytes'
        digest; numpy keeps no counter)."""
        steps = _optimizer_steps() if _is_torch_tensor(weight) else 0
        with self._lock:
            parts = [self.owner, str(self._generation.get(name, 0)), str(steps)]
            for t in (weight, bias):
                if t is None:
                    continue
                if hasattr(t, "_version"):
                    parts.append(f"{self._token(t)}.{t._version}")
                else:
                    parts.append(hashlib.blake2b(memoryview(_to_numpy(t)).cast("B"), digest_size=12).hexdigest())
            return "-".join(parts)

    def is_stored(self, name: str, version: str) -> bool:
        with self._lock:
            entry = self._stored.get(name)
            return entry is not None and entry[0] == version

    def check_unchanged(self, name: str, version: str) -> None:
        with self._lock:
            if name in self._pending and self._pending[name].version != version:
                raise RuntimeError(f"weight {name!r} changed before its accumulated gradient was taken: "
                                   "call flush() (LinearWeights.attach(optimizer) does it before each step)")

    def stored(self, name: str, version: str, placement: Any, instance: str | None = None) -> None:
        """The server (its `instance`) holds `version` of `name` (in `placement`'s shared memory,
        kept until replaced)."""
        with self._lock:
            self._stored[name] = (version, placement)
            self.uploads += 1
            self.upload_log.append((name, version, instance))

    def forget(self, name: str) -> None:
        """The server no longer has `name` (evicted, restarted): the next call uploads it."""
        with self._lock:
            self._stored.pop(name, None)

    def _pending_of(self, name: str, weight: Any, bias: Any, version: str) -> "_Pending":
        p = self._pending.get(name)
        if p is None or p.version != version:
            p = self._pending[name] = _Pending(weight, bias, version)
        return p

    def record_micro_batch(self, name: str, weight: Any, bias: Any, version: str, answer: dict[str, Any],
                           inputs: dict[str, np.ndarray], options: dict[str, Any]) -> None:
        """The server answered an accumulating micro-batch: what it said it holds, and (replay on)
        a copy of the micro-batch's inputs, kept until the flush."""
        kept = {k: np.array(a, copy=True) for k, a in inputs.items()} if self.replay else None
        with self._lock:
            self._pending_of(name, weight, bias, version).batches.append(_MicroBatch(kept, dict(options), answer))

    def note_micro_batch(self, name: str, weight: Any, bias: Any, version: str, scale: float) -> None:
        """A backward ran for a micro-batch accumulated on the server, with this grad_output."""
        with self._lock:
            p = self._pending_of(name, weight, bias, version)
            if p.scale is not None and p.scale != scale:
                raise RuntimeError(
                    f"weight {name!r}: micro-batches accumulated on the server need one grad_output for all "
                    f"of them (got {p.scale} and {scale}); use accumulate=False for varying scales")
            p.scale = scale

    def flush(self) -> Any:
        """Take every accumulated gradient from the server into the weights' .grad (added). With
        an AsyncClient this is a coroutine: ``await weights.flush()``."""
        return self.client._run(self._flush_flow())

    def _flush_flow(self) -> Any:
        with self._lock:
            pending, self._pending = self._pending, {}
        # the weights as they are now, before the generation moves on: a replay is only right
        # for the version the micro-batches ran with
        unchanged = {name: self.version_of(name, p.weight, p.bias) == p.version for name, p in pending.items()}
        with self._lock:
            for name in pending:
                self._generation[name] = self._generation.get(name, 0) + 1
        for name, p in pending.items():
            if p.scale is None:   # no backward ran for its micro-batches: nobody asked for the gradient
                continue
            grads = yield from self._gradient_flow(name, p, unchanged[name])
            scale = p.scale
            for param, g in zip((p.weight, p.bias), grads):
                if param is None or g is None:
                    continue
                g = _scaled(g, scale, param.dtype).reshape(param.shape)
                # .grad may keep the received buffer (or region) itself: nothing else uses it
                param.grad = g if param.grad is None else param.grad.add_(g)

    def _gradient_flow(self, name: str, p: "_Pending", unchanged: bool) -> Any:
        """The version's whole accumulated gradient (weight, bias) as torch tensors: taken, checked
        against the micro-batches sent, and what the server lost replayed and taken again."""
        todo = p.batches
        total: list[Any] = [None, None]
        for _ in range(_REPLAY_ROUNDS):
            answer, grads = yield from self._take_flow(name, p)
            held = [b for b in todo if b.accumulation == (answer.get("instance"), answer.get("accumulation"))]
            count = int(answer.get("micro_batches") or 0)
            if count == len(held) and sorted(b.count for b in held) == list(range(1, count + 1)):
                lost = [b for b in todo if b not in held]   # what the server holds is theirs alone
                for i, g in enumerate(grads):
                    if g is not None:
                        total[i] = g if total[i] is None else total[i].add_(g)
            else:   # not a sum of micro-batches this client knows: none of it is used
                lost = todo
            if not lost:
                return tuple(total)
            why = (f"weight {name!r}: the server's accumulated gradient is missing {len(lost)} of the "
                   f"{len(p.batches)} micro-batches sent for version {p.version!r} (the server restarted, or "
                   "evicted or expired the version, in between)")
            if not self.replay or any(b.inputs is None for b in lost):
                raise AccumulationLost(f"{why}; replay is off (LinearWeights.replay = False), so the optimizer "
                                       "step must not be taken: run the step's micro-batches again")
            if not unchanged:
                raise AccumulationLost(f"{why}; the weight changed since they ran, so they cannot be replayed: "
                                       "run the step's micro-batches again")
            for b in lost:
                call = LinearCall(self.client, b.inputs["hidden"], p.weight, b.inputs["target"], p.bias,
                                  class_weight=b.inputs.get("class_weight"), weight_name=name, weights=self,
                                  accumulate=True, want_grad=True, **b.options)
                call.replay_version = p.version
                yield from call.flow()
                b.note(call.answered)
                with self._lock:
                    self.replayed += 1
            todo = lost
        raise AccumulationLost(f"weight {name!r}: the server kept losing the accumulated gradient of version "
                               f"{p.version!r} during {_REPLAY_ROUNDS} rounds of replay; the optimizer step must "
                               "not be taken")

    def _take_flow(self, name: str, p: "_Pending") -> Any:
        """POST .../grad: (the answer, (grad_weight, grad_bias) as torch tensors or None). A version
        the server no longer has is an answer of 0 micro-batches; a restarted server's arena moves."""
        client = self.client
        nbytes = p.weight.numel() * 4

        def attempt(t: Try) -> Any:
            msg: dict[str, Any] = {"v": PROTOCOL_VERSION, "weight_version": p.version}
            placement = None
            try:
                if t.arena is not None and nbytes >= client.shm_min_bytes:
                    placement = yield Blocking(_place, (t.arena, [("grad_weight", None, nbytes)]))
                    msg["grad_weight_region"], msg["grad_weight_offset"] = placement.refs["grad_weight"]
                    t.placed = True
                request = _Request("POST", f"/v1/weights/{name}/grad", msg, placement, self.affinity(name))
                answer = client._decode((yield Send(request)))
            except errors.WeightNotStored:
                self.forget(name)
                return {}, (None, None)
            grads = []
            for key in ("grad_weight", "grad_bias"):
                g = _received(answer, key, placement)
                grads.append(None if g is None else _tensor(g, key))
            return answer, tuple(grads)

        return (yield from renewing(client, nbytes, attempt))

    def attach(self, optimizer) -> Any:
        """Flush before every step of `optimizer`; returns the hook's handle (a Client's weights:
        an AsyncClient's flush is a coroutine, awaited before the step)."""
        if _is_async(self.client):
            raise TypeError("attach(optimizer) needs a Client; with an AsyncClient, await weights.flush() "
                            "before optimizer.step()")
        return optimizer.register_step_pre_hook(lambda opt, args, kwargs: self.flush())


class _MicroBatch:
    """One micro-batch accumulated on the server: its inputs (kept for a replay, or None), its
    options, and what the server answered (instance, accumulation, its count there)."""

    __slots__ = ("inputs", "options", "accumulation", "count")

    def __init__(self, inputs: dict[str, np.ndarray] | None, options: dict[str, Any], answer: dict[str, Any]):
        self.inputs, self.options = inputs, options
        self.note(answer)

    def note(self, answer: dict[str, Any]) -> None:
        """What the server answered for it (again, after a replay)."""
        self.accumulation = (answer.get("instance"), answer.get("accumulation"))
        self.count = answer.get("micro_batches")


class _Pending:
    """A stored weight's version with micro-batches accumulated on the server, not yet flushed."""

    __slots__ = ("weight", "bias", "version", "scale", "batches")

    def __init__(self, weight: Any, bias: Any, version: str):
        self.weight, self.bias, self.version = weight, bias, version
        self.scale: float | None = None          # the grad_output of their backward
        self.batches: list[_MicroBatch] = []


_steps_lock = threading.Lock()
_steps: list[int] | None = None


def _optimizer_steps() -> int:
    """Optimizer steps taken in this process (any torch optimizer), counted by a global post-step
    hook installed on first use. A step is a new version of every weight it may have updated:
    torch's fused AdamW updates in place without touching tensor._version."""
    global _steps
    if _steps is None:
        with _steps_lock:
            if _steps is None:
                from torch.optim.optimizer import register_optimizer_step_post_hook

                counter = [0]

                def count(optimizer, args, kwargs) -> None:
                    counter[0] += 1

                register_optimizer_step_post_hook(count)
                _steps = counter
    return _steps[0]


def _is_async(client: Any) -> bool:
    return inspect.iscoroutinefunction(client._run)


def share_weight(param: Any, client: Any) -> bool:
    """Move a parameter's data into memory shared with `client`'s server (a Client on its host),
    once, before training: each version of the weight is then read by the server where it lies,
    with no copy at all. False (nothing moved) without shared memory. Do it before wrapping the
    model (DDP) or building the optimizer's state."""
    shared = client.empty(tuple(param.shape), param.dtype)
    arena = client._arena
    if arena is None or arena.locate(shared.data_ptr(), shared.numel() * shared.element_size()) is None:
        return False
    shared.copy_(param.detach())
    param.data = shared
    return True


# ---- torch glue ----------------------------------------------------------------------------------

def _tensor(wt: Any, name: str) -> Any:
    """A torch tensor over a received tensor (no copy where torch_support allows)."""
    from .torch_support import from_wire

    return from_wire(wt, name=name)


def _scaled(t: Any, scale: float, dtype: Any) -> Any:
    """t * scale in `dtype`: no copy when the scale is one and the dtype already right."""
    import torch

    if scale == 1.0 and t.dtype == dtype:
        return t
    wide = t if t.dtype in (torch.float32, torch.float64) else t.float()
    return (wide * scale).to(dtype)


def _autograd_function():
    import torch

    class _ServerGradients(torch.autograd.Function):
        """The loss computed by the server, with its gradients (for grad_output = 1) handed to
        autograd: forward does no I/O (the call already ran), backward scales."""

        @staticmethod
        def forward(ctx, hidden, weight, bias, call):
            ctx.call = call
            loss, z = call.loss_tensors()
            if z is not None:
                ctx.mark_non_differentiable(z)
            return loss, z

        @staticmethod
        def backward(ctx, grad_loss, grad_z):
            call, ctx.call = ctx.call, None
            if grad_z is not None and bool((grad_z != 0).any()):
                raise RuntimeError("z_loss is reported, not differentiated separately: "
                                   "its gradient is already part of loss's")
            g = grad_loss.reshape(-1).float()
            if g.numel() > 1 and not bool((g == g[0]).all()):
                # per-row: the rows' gradients summed into the weight's cannot be rescaled, so
                # the server computes them again for this grad_output
                return (*call.regrad(grad_loss.float()), None)
            scale = float(g[0]) if g.numel() else 0.0
            return (*call.gradients(scale), None)

    return _ServerGradients


_FUNCTION = None


# ---- one call --------------------------------------------------------------------------------------

class LinearCall:
    """One linear_cross_entropy call: its arguments, its flow of I/O steps (`flow`, run by a
    Client or an AsyncClient), and its result (`finish`)."""

    def __init__(self, client, hidden, weight, target, bias=None, *, class_weight=None, ignore_index: int = -100,
                 reduction: str = "mean", label_smoothing: float = 0.0, lse_square_scale: float = 0.0,
                 softcap: float | None = None, shift: int = 0, return_z_loss: bool = False,
                 weight_name: str | None = None, weights: LinearWeights | None = None, accumulate: bool = False,
                 stateless: bool = False, want_grad: bool | None = None, return_lse: bool = False,
                 return_argmax: bool = False, grad_output: Any = None):
        if accumulate and stateless:
            raise ValueError("accumulate=True keeps the gradient with a stored weight; it cannot be stateless")
        self.client = client
        self.torch = _is_torch_tensor(hidden)
        if want_grad is None:
            if self.torch:
                import torch
                want_grad = torch.is_grad_enabled() and any(
                    t is not None and t.requires_grad for t in (hidden, weight, bias))
            else:
                want_grad = True
        self.want_grad = bool(want_grad)
        self.hidden, self.weight, self.bias = hidden, weight, bias
        self.options = {k: v for k, v in dict(ignore_index=ignore_index, reduction=reduction,
                                              label_smoothing=label_smoothing, lse_square_scale=lse_square_scale,
                                              softcap=softcap, shift=shift).items() if v is not None}
        # the extras are asked for only when wanted (the answer's lse and argmax are per row)
        self.options.update({k: True for k, v in (("return_lse", return_lse), ("return_argmax", return_argmax)) if v})
        self.return_z_loss = return_z_loss
        self.want_result = bool(return_lse or return_argmax)
        #: under torch.autocast: the dtype hidden, weight and bias travel in (torch's F.linear policy)
        self.cast = _autocast_dtype(hidden) if self.torch else None
        self.arrays = {"hidden": _to_numpy(hidden, self.cast), "target": _to_numpy(target)}
        if class_weight is not None:
            self.arrays["class_weight"] = _to_numpy(class_weight)
        if grad_output is not None:
            self.arrays["grad_output"] = _to_numpy(grad_output)
        # stored unless asked not to; a numpy weight without a name has no version counter
        if weight_name is None and not stateless and _is_torch_tensor(weight):
            weights = weights or client.weights
            weight_name = weights.auto_name(weight)
        if weight_name is not None and self.cast is not None:
            # the version under autocast is the weight's bytes in the autocast dtype: stored apart
            # from the weight's own (a name is 1-64 of A-Z a-z 0-9 _ . -)
            weight_name = f"{weight_name[:64 - 9]}.{str(self.cast).removeprefix('torch.')[:8]}"
        self.weight_name = None if stateless else weight_name
        if accumulate and self.weight_name is None:
            raise ValueError("accumulate=True needs a stored weight (a torch weight, or weight_name=)")
        self.weights = (weights or client.weights) if self.weight_name is not None else None
        self.accumulate = bool(accumulate) and self.want_grad
        self.version: str | None = None
        #: a replay's: the version its micro-batch ran with (set by the flush), not the weight's now
        self.replay_version: str | None = None
        #: an accumulating call's answer: instance, accumulation, micro_batches
        self.answered: dict[str, Any] = {}
        self.result: dict[str, Any] = {}
        self.placement: Any = None
        w = _to_numpy(weight, self.cast)
        self._weight_np = w
        self._bias_np = None if bias is None else _to_numpy(bias, self.cast)
        self.grad_weight_bytes = int(w.shape[0]) * int(w.shape[1]) * 4 if w.ndim == 2 else 0
        self.nbytes = self.arrays["hidden"].nbytes + (w.nbytes if self.weight_name is None else 0)

    # ---- the requests ----
    def _upload(self, arena: Any) -> _Request:
        msg: dict[str, Any] = {"v": PROTOCOL_VERSION, "weight_version": self.version}
        parts = [("weight", self._weight_np, self._weight_np.nbytes)]
        if self._bias_np is not None:
            parts.append(("bias", self._bias_np, self._bias_np.nbytes))
        placement = _place(arena, parts) if arena is not None else None
        for key, arr, _ in parts:
            msg[key] = placement.ref(key, dtype_name(arr.dtype), arr.shape) if placement is not None else arr
        return _Request("PUT", f"/v1/weights/{self.weight_name}", msg, placement, self.weights.affinity(self.weight_name))

    def _request(self, arena: Any) -> _Request:
        msg: dict[str, Any] = {"v": PROTOCOL_VERSION, "accumulate": self.accumulate, "want_grad": self.want_grad,
                               **self.options}
        tensors = dict(self.arrays)
        if self.weight_name is None:
            tensors["weight"] = self._weight_np
            if self._bias_np is not None:
                tensors["bias"] = self._bias_np
        else:
            msg["weight_name"], msg["weight_version"] = self.weight_name, self.version
        placement = None
        if arena is not None:
            parts = [(k, a, a.nbytes) for k, a in tensors.items()]
            if self.want_grad:
                parts.append(("grad", None, self.arrays["hidden"].nbytes))
                if not self.accumulate:
                    parts.append(("grad_weight", None, self.grad_weight_bytes))
            placement = _place(arena, parts)
            for k, a in tensors.items():
                tensors[k] = placement.ref(k, dtype_name(a.dtype), a.shape)
            if self.want_grad:
                msg["grad_region"], msg["grad_offset"] = placement.refs["grad"]
                if not self.accumulate:
                    msg["grad_weight_region"], msg["grad_weight_offset"] = placement.refs["grad_weight"]
        msg.update(tensors)
        affinity = None if self.weight_name is None else self.weights.affinity(self.weight_name)
        return _Request("POST", LINEAR_PATH, msg, placement, affinity)

    def flow(self) -> Any:
        """The call as I/O steps (clce_client/flows.py); returns the result fields.
        Uploads the weight first when the server lacks this version; uploads again (and retries)
        when the server answers that it no longer has it (evicted, expired, restarted, or the weight
        moved to this replica because its own failed), to the replica that answered, since the
        upload goes where the call goes (the weight's affinity), within the retry budget; moves the
        arena to a restarted server."""
        client = self.client
        reuploads = 0
        max_reuploads = _REUPLOADS + len(client.urls)

        def again(exc: BaseException, t: Try) -> bool:
            nonlocal reuploads
            if (isinstance(exc, errors.WeightNotStored) and self.weight_name is not None
                    and reuploads < max_reuploads and time.monotonic() < t.deadline):
                reuploads += 1
                self.weights.forget(self.weight_name)
                return True
            return False

        return (yield from renewing(client, self.nbytes, self._attempt, inline=self.nbytes < client.shm_min_bytes,
                                    again=again))

    def _attempt(self, t: Try) -> Any:
        client, arena = self.client, t.arena
        for gone in self.weights.take_gone() if self.weights is not None else ():
            # best effort: a name the server no longer has (evicted, expired) is as good
            try:
                yield Send(_Request("DELETE", f"/v1/weights/{gone}", None, None, self.weights.affinity(gone)))
            except errors.ClceError:
                pass
        if self.weight_name is not None:
            if self.replay_version is not None:
                self.version = self.replay_version
            else:
                self.version = self.weights.version_of(self.weight_name, self.weight, self.bias)
                self.weights.check_unchanged(self.weight_name, self.version)
            if not self.weights.is_stored(self.weight_name, self.version):
                request = yield from prepared(self._upload, (arena,), arena=arena, nbytes=self._weight_np.nbytes)
                t.placed = request.placement is not None
                put = client._decode((yield Send(request)))
                self.weights.stored(self.weight_name, self.version, request.placement, put.get("instance"))
        request = yield from prepared(self._request, (arena,), arena=arena, nbytes=self.nbytes)
        t.placed = request.placement is not None
        msg = client._decode((yield Send(request)))
        self.placement = request.placement
        self.result = {k: _received(msg, k, request.placement) for k in RESULT_NAMES}
        if self.result["loss"] is None:
            raise ProtocolError("the response has no loss")
        if self.accumulate:
            self.answered = {k: msg.get(k) for k in ("instance", "accumulation", "micro_batches")}
            if self.replay_version is None:
                self.weights.record_micro_batch(self.weight_name, self.weight, self.bias, self.version,
                                                self.answered, self.arrays, self.options)
        return self.result

    def finished(self) -> Any:
        """The call as I/O steps, then its result as the caller gets it (`finish`)."""
        return self.finish((yield from self.flow()))

    # ---- results ----
    def finish(self, result: dict[str, Any]) -> Any:
        """numpy inputs: a dict of arrays (loss, z_loss, lse, argmax, grad_hidden, grad_weight,
        grad_bias; None where not asked) and accuracy (a float, or None); torch: the loss (and
        z-loss with return_z_loss), differentiable when a gradient was asked, or with return_lse
        / return_argmax the loss path's CrossEntropyResult."""
        if not self.torch:
            out = {k: (None if v is None or k == "accuracy" else decode_tensor(v, name=k)) for k, v in result.items()}
            out["accuracy"] = None if result.get("accuracy") is None else float(result["accuracy"])
            return out
        global _FUNCTION
        extras = self._extras() if self.want_result else {}
        if self.want_grad:
            if _FUNCTION is None:
                _FUNCTION = _autograd_function()
            loss, z = _FUNCTION.apply(self.hidden, self.weight, self.bias, self)
        else:
            loss, z = self.loss_tensors()
        if self.want_result:
            return CrossEntropyResult(loss=loss, z_loss=z, **extras)
        return (loss, z) if self.return_z_loss else loss

    def _extras(self) -> dict[str, Any]:
        """lse, argmax (torch tensors, on the hidden's device) and accuracy, as asked."""
        import torch

        out: dict[str, Any] = {}
        for key in ("lse", "argmax"):
            wt = self.result.get(key)
            out[key] = None if wt is None else _tensor(wt, key).to(self.hidden.device)
        acc = self.result.get("accuracy")
        out["accuracy"] = None if acc is None else float(acc)
        if out["argmax"] is not None and out["argmax"].dtype != torch.int64:
            out["argmax"] = out["argmax"].long()
        return out

    def loss_tensors(self) -> tuple[Any, Any]:
        """The loss and z-loss, float32 whatever the inputs' dtype (the z-loss zeros without
        lse_square_scale: a server that leaves it out means none)."""
        import torch

        loss = torch.from_numpy(_widened(decode_tensor(self.result["loss"], name="loss")))
        z = self.result.get("z_loss")
        z = torch.zeros_like(loss) if z is None else torch.from_numpy(_widened(decode_tensor(z, name="z_loss")))
        dev = self.hidden.device
        return loss.to(dev), z.to(dev)

    def regrad(self, grad_output: Any) -> tuple[Any, Any, Any]:
        """The gradients of hidden, weight and bias for a per-row `grad_output` ('none'): a second
        request, the same call with grad_output (the first call's gradients are dropped)."""
        self.result = {}
        if self.accumulate:
            raise RuntimeError("reduction='none' with a grad_output that differs per row cannot accumulate on the "
                               "server (the micro-batch's gradient for grad_output = 1 is already added there): use "
                               "accumulate=False, or a grad_output of one value (loss.sum(), loss.mean())")
        if _is_async(self.client):
            raise RuntimeError("reduction='none' with a grad_output that differs per row needs a second request from "
                               "backward, which an AsyncClient cannot make (backward cannot await): use a Client, or "
                               "a grad_output of one value (loss.sum(), loss.mean())")
        opts = {k: v for k, v in self.options.items() if k not in ("return_lse", "return_argmax")}
        again = LinearCall(self.client, self.hidden, self.weight, self.arrays["target"], self.bias,
                           class_weight=self.arrays.get("class_weight"), weight_name=self.weight_name,
                           weights=self.weights, stateless=self.weight_name is None, want_grad=True,
                           grad_output=grad_output.detach().cpu(), **opts)
        again.cast = self.cast   # the dtype the forward ran in (backward runs outside autocast)
        again.arrays["hidden"] = self.arrays["hidden"]
        again._weight_np, again._bias_np = self._weight_np, self._bias_np
        again.client._run(again.flow())
        return again.gradients(1.0)

    def gradients(self, scale: float) -> tuple[Any, Any, Any]:
        """The gradients of hidden, weight and bias for this grad_output (None where not sent:
        an accumulated weight's stay on the server until the flush). Each result is handed out
        once: autograd owns it (it may keep the server's buffer as .grad, without a copy)."""
        res, self.result = self.result, {}
        out = []
        for key, like in (("grad_hidden", self.hidden), ("grad_weight", self.weight), ("grad_bias", self.bias)):
            wt = res.get(key)
            out.append(None if wt is None or like is None else _scaled(_tensor(wt, key), scale, like.dtype)
                       .reshape(like.shape))
        if self.accumulate:
            self.weights.note_micro_batch(self.weight_name, self.weight, self.bias, self.version, scale)
        return tuple(out)

    def tensors(self) -> tuple[Any, Any, Any, Any, Any]:
        """(loss, z_loss, grad_hidden, grad_weight, grad_bias) as torch tensors for grad_output = 1,
        no autograd (the torch.compile operator's body)."""
        loss, z = self.loss_tensors()
        gh, gw, gb = self.gradients(1.0) if self.want_grad else (None, None, None)
        return loss, z, gh, gw, gb


def linear_cross_entropy(hidden, weight, target, bias=None, *, client, **options):
    """`F.cross_entropy(F.linear(hidden, weight, bias), target, ...)` computed by a clce server:
    `client.linear_cross_entropy` (a Client; clce_client.linear_cross_entropy is this with the
    default client). torch tensors get autograd (hidden, weight, bias); numpy arrays get a dict
    of loss and gradients. Options: see the module's docstring."""
    return client.linear_cross_entropy(hidden, weight, target, bias, **options)


def _post(client, path: str, msg: dict) -> dict:
    """One request by hand (tests, tools; "PUT /v1/..." for a PUT): its decoded answer."""
    method, path = ("PUT", path.removeprefix("PUT ")) if path.startswith("PUT ") else ("POST", path)
    req = _Request(method, path, msg)
    return client._json_or_msgpack(client._request(req.method, req.path, req.segments, req.nbytes))


__all__ = ["AccumulationLost", "LinearCall", "LinearWeights", "linear_cross_entropy", "share_weight"]
