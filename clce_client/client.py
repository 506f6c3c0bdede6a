"""`Client` and `AsyncClient`: torch.nn.functional.cross_entropy computed by a clce server.

Return values of ``cross_entropy``:

* numpy (or array-like) input: the loss as a numpy array (0-d for ``reduction="mean"``/``"sum"``,
  the input's dtype, like torch). If ``return_grad``, ``return_lse`` or ``return_argmax`` is set, a
  `CrossEntropyResult` instead, holding the loss and the extras (numpy arrays).
* torch input: the same with torch tensors, on the input's device. When ``input.requires_grad``
  and grad mode is on, the gradient comes back with the loss (one round trip) and the loss has a
  ``grad_fn``: ``loss.backward()`` fills ``input.grad``. ``return_grad=False`` opts out (the loss
  is then detached); use ``torch.no_grad()`` for evaluation to skip the gradient transfer.

Several replicas (a list, or a comma-separated ``CLCE_URL``) are used round-robin; a replica that
refuses connections or drops one costs a retry on the next one (at most ``retries``), and is
avoided for a few seconds. 429 (``Overloaded``) and 503 (``ServiceUnavailable``) are transient by
their nature: the client tries another replica, or waits for Retry-After (with jitter, so clients
turned away together do not return together), within ``retry_budget_s`` (env
``CLCE_RETRY_BUDGET_S``, default 30 s; 0 raises at once), then raises the last error. Resending is
always safe: a request is a pure function of its body, so a retry can never count twice.

A restart costs no call. A replica that has answered this client and then refuses connections is
taken to be restarting, and is waited for (with backoff) within ``retry_budget_s``. Over shared
memory, a new server instance (the registration socket closed, a region unknown to the server,
or /v1/info naming another instance_id) gets the arena's regions registered again, under the same
names and with the same memory, and the call is repeated; a region unknown to the same instance
is a real NotFound.

Layout (as httpx): `_BaseClient` holds the one constructor and every step that does no I/O (the
shared-memory decision, planning, encoding, the retry policy, pipelining, decoding); a call is a
flow of typed I/O steps (clce_client/flows.py; one loop, `flows.renewing`, owns the arena's
renewal and the retry deadline), which `Client` does in the calling thread and `AsyncClient` on
its event loop, with blocking work (registration, big copies) in a thread.

What a client does is logged on ``logging.getLogger("clce")``: the transport it chose and why
(INFO, once), every retry, reconnection and shared-memory renewal with its cause (INFO, WARNING
when the wait is longer than a second or the server is down or not ready), so a call that waits
says why at once. Errors that retrying cannot repair are raised at once, with their cause: a TLS
certificate that does not verify (naming the CAs), an answer that is not a clce server's, a
client error (4xx). `describe()` tells which transport a client uses.
"""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import logging
import os
import random
import ssl
import sys
import threading
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from typing import Any, Union

import httpx
import numpy as np

from . import errors, pipeline
from .buffers import BufferPool, size_class
from .flows import Blocking, Chunks, Done, Send, Try, is_torch_tensor as _is_torch_tensor, prepared, renewing, resume
from .linear import LinearCall, LinearWeights, _Request
from .results import CrossEntropyResult
from clce_wire.options import options_doc, request_message
from clce_wire.protocol import (
    ALIGN,
    DTYPES,
    JSON,
    first_data_offset,
    aligned_body,
    MSGPACK,
    ProtocolError,
    Segment,
    decode_message,
    decode_tensor,
    dtype_name,
    encode_message,
    encode_tensor,
    message_nbytes,
    parse_server_timing,
)

__all__ = [
    "Client",
    "AsyncClient",
    "CrossEntropyResult",
    "cross_entropy",
    "default_client",
    "DEFAULT_URL",
    "DEFAULT_TIMEOUT",
]

__version__ = "0.1.0"
log = logging.getLogger("clce")

DEFAULT_URL = "http://127.0.0.1:8000"
DEFAULT_TIMEOUT = httpx.Timeout(120, connect=5)
CROSS_ENTROPY_PATH = "/v1/cross_entropy"
_TRANSPORTS = ("auto", "shm", "tcp")
# transport="auto" asks the server about shared memory (/v1/info) on the first call at least
# this big; smaller calls are as fast over TCP and do not pay for the question
_SHM_PROBE_BYTES = 1 << 18
_SHM_INLINE_BYTES = 64 << 10


def _nbytes(x: Any) -> int:
    if _is_torch_tensor(x):
        return x.numel() * x.element_size()
    return int(getattr(x, "nbytes", 0))

# Small message parts are merged into one write; large tensors are sent as slices of themselves.
_COALESCE_BYTES = 64 * 1024
_DOWN_SECONDS = 5.0  # how long a replica that failed is tried only after the others
_BACKOFF_SECONDS = 0.05
_MAX_BACKOFF_SECONDS = 2.0
DEFAULT_RETRY_BUDGET_S = 30.0
DEFAULT_MAX_CACHED_BYTES = 2 << 30
_JITTER = 0.25          # waits are stretched by up to this fraction, at random
_TRANSIENT_STATUS = (429, 503)
#: the header naming a stored weight's affinity key (clce_client/linear.py sends it with every request
#: about a stored weight): this client's replica choice hashes it, a load balancer hashes on it
#: (docker/haproxy.cfg), and Ray Serve's proxy routes on it: the name is that of Serve's model
#: multiplexing, so a weight is a multiplexed model (clce_server/ray.py)
AFFINITY_HEADER = "serve_multiplexed_model_id"

# Failures where the request certainly or possibly never reached a working server. The computation
# is a pure function, so re-sending is always safe.
_RETRYABLE = (
    httpx.ConnectError,
    httpx.ConnectTimeout,
    httpx.RemoteProtocolError,
    httpx.ReadError,
    httpx.WriteError,
)


def _torch_support():
    from . import torch_support

    return torch_support


def _compiling() -> bool:
    """True while torch.compile traces the caller: torch tensors then go through the operators of
    clce_client/operators.py (one opaque node each) instead of being traced into the client; that
    module is imported then, and imports nothing of this one."""
    torch = sys.modules.get("torch")
    return torch is not None and torch.compiler.is_compiling()



def _wire_dtype(dtype: Any) -> str | None:
    if dtype is None:
        return None
    if type(dtype).__module__ == "torch":
        return _torch_support().wire_dtype(dtype)
    return dtype_name(dtype)


class _Call:
    """One cross_entropy call: its request message and how to turn the response into results.
    `options` are the request's options by name (clce_wire.options), as the caller gave them."""

    method, path, affinity = "POST", CROSS_ENTROPY_PATH, None   # where `Send` sends it

    def __init__(self, input: Any, target: Any, options: dict[str, Any], arena: Any = None, split: bool = False):
        inplace = bool(options.pop("inplace_grad", False))
        self.placement = None
        self.torch = _is_torch_tensor(input)
        self.input = input
        self.reduction = options.get("reduction", "mean")
        self.shift = options.get("shift") or 0
        self.classes_last = bool(options.get("classes_last")) or self.shift != 0
        return_grad = options.get("return_grad")
        self.return_grad = bool(return_grad)
        self.want_result = any(bool(options.get(k)) for k in ("return_grad", "return_lse", "return_argmax",
                                                               "return_z_loss"))
        self.autograd = False
        if self.torch:
            import torch

            self.autograd = return_grad is not False and input.requires_grad and torch.is_grad_enabled()
            to_wire = _torch_support().to_wire
        else:
            input = np.asarray(input)
            to_wire = encode_tensor
        values = {**options, "input": to_wire(input), "target": to_wire(target)}
        if values.get("weight") is not None:
            values["weight"] = to_wire(values["weight"])
        values["return_grad"] = self.return_grad or self.autograd
        if "grad_dtype" in values:
            values["grad_dtype"] = _wire_dtype(values["grad_dtype"])
        if inplace and not values["return_grad"]:
            raise ValueError("inplace_grad=True needs the gradient (return_grad, or autograd)")
        #: the arena when the batch goes as row chunks over shared memory, each placed on its own
        #: (`split`, or more than the tenant's shared-memory budget: _BaseClient._prepare)
        self.shm_split = None
        if arena is not None and not inplace and (split or _over_budget(arena, values)):
            self.shm_split = arena
        elif arena is not None:
            self._place(arena, values, inplace)
        elif inplace:
            raise ValueError("inplace_grad=True needs the shared-memory transport")
        self.values = values
        self.message = request_message(values)
        # how it is sent (`_BaseClient._prepare`): as row chunks, or as one request of these segments
        self.pipe: pipeline.Pipeline | None = None
        self.segments: list[Segment] | None = None
        self.nbytes = 0

    def _place(self, arena: Any, values: dict[str, Any], inplace: bool) -> None:
        self.placement = _place_values(arena, values, inplace)

    def finish(self, msg: dict[str, Any], server_timing: dict[str, float]) -> Any:
        if "loss" not in msg:
            raise ProtocolError("the response has no loss")
        if self.placement is not None and isinstance(msg.get("grad"), dict):   # in shared memory
            msg["grad"] = self.placement.tensor(msg["grad"], "grad")
        if self.torch:
            ts = _torch_support()
            device = self.input.device

            def get(key: str) -> Any:
                return ts.from_wire(msg[key], name=key, device=device) if key in msg else None

        else:

            def get(key: str) -> Any:
                return decode_tensor(msg[key], name=key) if key in msg else None

        loss, grad = get("loss"), get("grad")
        if self.autograd:
            if grad is None:
                raise ProtocolError("the response has no grad, which autograd needs")
            loss = _torch_support().attach_grad(self.input, loss, grad, self.reduction, classes_last=self.classes_last,
                                                shift=self.shift, owned=not self.return_grad)
        if not self.want_result:
            return loss
        accuracy = msg.get("accuracy")
        return CrossEntropyResult(
            loss=loss,
            grad=grad if self.return_grad else None,
            lse=get("lse"),
            argmax=get("argmax"),
            accuracy=None if accuracy is None else float(accuracy),
            z_loss=get("z_loss"),
            server_timing=server_timing,
        )


def _shm_need(values: dict[str, Any]) -> int:
    """Bytes of shared memory a call places: its tensors and the gradient's room."""
    x = values["input"]
    need = sum(memoryview(values[k].data).nbytes for k in ("input", "target", "weight") if values.get(k) is not None)
    if values["return_grad"]:
        need += int(np.prod(x.shape, dtype=np.int64)) * DTYPES[values.get("grad_dtype") or x.dtype]
    return need


def _over_budget(arena: Any, values: dict[str, Any]) -> bool:
    """Whether placing the call whole would need more shared memory than the tenant's budget (an
    input already in the arena is not copied: it goes whole, and the gradient over it or beside)."""
    budget = arena.max_bytes
    x = values["input"]
    xb = memoryview(x.data).nbytes
    if not budget or (xb and arena.locate(np.frombuffer(x.data, np.uint8).ctypes.data, xb) is not None):
        return False
    return size_class(_shm_need(values)) > budget


def _place_values(arena: Any, values: dict[str, Any], inplace: bool) -> Any:
    """Shared memory: `values`' tensors become references into the arena's regions (copied there
    unless they already live in one), and the gradient gets a place (the input's own bytes when
    `inplace`). Returns the Placement, which maps the answer's references back to this memory."""
    from .shm import Placement

    wire = {k: values[k] for k in ("input", "target", "weight") if values.get(k) is not None}
    parts = [(k, np.frombuffer(wt.data, np.uint8) if memoryview(wt.data).nbytes else None,
              memoryview(wt.data).nbytes) for k, wt in wire.items()]
    x = wire["input"]
    gdt = values.get("grad_dtype") or x.dtype
    if inplace and gdt != x.dtype:
        raise ValueError(f"inplace_grad=True needs grad_dtype equal to the input's ({x.dtype}), got {gdt}")
    if values["return_grad"] and not inplace:
        parts.append(("grad", None, int(np.prod(x.shape, dtype=np.int64)) * DTYPES[gdt]))
    pl = Placement(arena, parts)
    for k, wt in wire.items():
        values[k] = pl.ref(k, wt.dtype, wt.shape)
    if values["return_grad"]:
        values["grad_region"], values["grad_offset"] = pl.refs["input" if inplace else "grad"]
    return pl


class _ShmChunk:
    """One row chunk of a batch split over shared memory (`_BaseClient._shm_split`): its tensors
    placed in the arena, its request, and where its answer goes (the Pipeline's buffers)."""

    method, path, affinity = "POST", CROSS_ENTROPY_PATH, None   # where `Send` sends it

    def __init__(self, arena: Any, pipe: pipeline.Pipeline, i: int, values: dict[str, Any]):
        self.pipe, self.i = pipe, i
        self.placement = _place_values(arena, values, inplace=False)
        self.segments = encode_message(request_message(values))
        self.nbytes = message_nbytes(self.segments)

    def add(self, msg: dict[str, Any]) -> None:
        if isinstance(msg.get("grad"), dict):        # written into this chunk's region
            msg["grad"] = self.placement.tensor(msg["grad"], "grad")
        self.pipe.add(self.i, msg)     # copies the gradient into its rows of the whole batch's


def _parse_urls(url: Union[str, Sequence[str], None]) -> list[str]:
    if url is None:
        url = os.environ.get("CLCE_URL") or DEFAULT_URL
    parts = url.split(",") if isinstance(url, str) else list(url)
    urls = []
    for part in parts:
        if not isinstance(part, str):
            raise TypeError(f"url must be a str or a list of str, got {type(part).__name__}")
        part = part.strip().rstrip("/")
        if not part:
            continue
        if "://" not in part:
            part = "http://" + part
        if not part.startswith(("http://", "https://")):
            raise ValueError(f"clce URLs must be http:// or https://, got {part!r}")
        urls.append(part)
    if not urls:
        raise ValueError("no clce server URL given")
    return urls


class _Replicas:
    """Round-robin over replicas (the loss routes), or a stored weight's own order (`order_for`);
    ones that failed recently go to the back of the line."""

    def __init__(self, urls: list[str]):
        self.urls = urls
        self._next = itertools.count()
        self._down_until = [0.0] * len(urls)
        #: replicas that have answered this client: one of them refusing connections is restarting
        self.answered = [False] * len(urls)

    def order(self) -> list[int]:
        n = len(self.urls)
        start = next(self._next) % n  # itertools.count is atomic under the GIL
        rotated = [(start + i) % n for i in range(n)]
        now = time.monotonic()
        return sorted(rotated, key=lambda i: self._down_until[i] > now)

    def order_for(self, key: str) -> list[int]:
        """A stored weight's replicas, by rendezvous (highest random weight) hashing of its affinity
        key with each URL: every request about the weight (uploads, micro-batches, the flush) goes
        to the first one that is up, where its version and accumulator are; when that one fails,
        the next in this order, the same for every client, takes the weight over, and a replica
        added or removed moves only the weights it ranks first."""
        now = time.monotonic()
        ranked = sorted(range(len(self.urls)), reverse=True, key=lambda i: hashlib.blake2b(
            f"{key}\n{self.urls[i]}".encode(), digest_size=8).digest())
        return sorted(ranked, key=lambda i: self._down_until[i] > now)

    def mark_down(self, i: int) -> None:
        self._down_until[i] = time.monotonic() + _DOWN_SECONDS

    def mark_up(self, i: int) -> None:
        self._down_until[i] = 0.0


def _chunks(segments: list[Segment], chunk_bytes: int) -> Iterator[Union[bytearray, memoryview]]:
    """The body as chunks of at most chunk_bytes; tensor bytes are sliced, not copied."""
    pending = bytearray()
    small = min(_COALESCE_BYTES, chunk_bytes)
    for seg in segments:
        mv = memoryview(seg)
        if mv.nbytes < small:
            pending += mv
            if len(pending) >= chunk_bytes:
                out, pending = pending, bytearray()
                yield out
            continue
        if pending:
            out, pending = pending, bytearray()
            yield out
        for off in range(0, mv.nbytes, chunk_bytes):
            yield mv[off : off + chunk_bytes]
    if pending:
        yield pending


class _Response:
    __slots__ = ("status", "headers", "body")

    def __init__(self, status: int, headers: httpx.Headers, body: bytearray):
        self.status = status
        self.headers = headers
        self.body = body


class _BodyReader:
    """Collects a response body into one preallocated buffer, placed so the first tensor (the
    gradient, which the server sends first) lands 64-byte aligned: decoded views of it can be
    handed to numpy and torch as they are, without a copy."""

    _HEAD = 512   # enough to see where the first tensor's bytes start

    def __init__(self, resp: httpx.Response, pool: BufferPool):
        self.pool = pool
        length = resp.headers.get("content-length")
        encoded = resp.headers.get("content-encoding", "identity").lower() not in ("", "identity")
        self.raw = not encoded  # with a content-encoding, Content-Length is the encoded size
        self.size = int(length) if length and length.isdigit() and self.raw else None
        self.head = bytearray()
        self.buf: np.ndarray | None = None
        self.view: memoryview | None = None
        self.pos = 0

    def add(self, chunk: bytes) -> None:
        if self.buf is None:
            self.head += chunk
            if self.size is None or len(self.head) < min(self.size, self._HEAD):
                return
            self.buf = aligned_body(self.size, self.head, self.pool.empty_bytes(self.size + ALIGN))
            self.view = memoryview(self.buf)
            chunk, self.head = self.head, bytearray()
        end = self.pos + len(chunk)
        if end > self.size:
            raise errors.TransportError(f"response longer than its Content-Length {self.size}")
        self.view[self.pos : end] = chunk
        self.pos = end

    def done(self) -> Union[bytearray, np.ndarray]:
        if self.buf is None:   # no Content-Length, or shorter than the head
            if self.size is not None and len(self.head) != self.size:
                raise errors.TransportError(f"the response ended after {len(self.head)} of {self.size} bytes")
            return self.head
        self.view.release()
        if self.pos != self.size:
            raise errors.TransportError(f"the response ended after {self.pos} of {self.size} bytes")
        return self.buf


def _retry_budget(value: float | None) -> float:
    if value is None:
        env = os.environ.get("CLCE_RETRY_BUDGET_S")
        try:
            value = float(env) if env else DEFAULT_RETRY_BUDGET_S
        except ValueError:
            raise ValueError(f"CLCE_RETRY_BUDGET_S must be a number of seconds, got {env!r}") from None
    value = float(value)
    if not value >= 0:
        raise ValueError("retry_budget_s must be >= 0")
    return value


def _ssl_verify(verify: Union[bool, str, os.PathLike, ssl.SSLContext]) -> Union[bool, ssl.SSLContext]:
    # httpx takes a bool or an SSLContext; a CA bundle path becomes a context (as requests did)
    if isinstance(verify, (str, os.PathLike)):
        return ssl.create_default_context(cafile=os.fspath(verify))
    return verify


def _ca_description(verify: Any) -> str:
    """The CAs a client trusts, in words, for the error that says one did not verify."""
    if isinstance(verify, ssl.SSLContext):
        return "the CAs of the ssl.SSLContext given as verify"
    if isinstance(verify, (str, os.PathLike)):
        return f"the CA bundle {os.fspath(verify)} (verify)"
    for env in ("SSL_CERT_FILE", "SSL_CERT_DIR"):   # httpx's order (trust_env)
        if os.environ.get(env):
            return f"{os.environ[env]} ({env})"
    try:
        import certifi

        return f"certifi's CA bundle {certifi.where()} (httpx's default)"
    except ImportError:   # pragma: no cover (httpx depends on certifi)
        return "the default CA bundle"


def _tls_failure(exc: BaseException) -> ssl.SSLCertVerificationError | None:
    """The certificate verification error under an httpx connection error, if that is what it is."""
    seen: set[int] = set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:
        if isinstance(e, ssl.SSLCertVerificationError):
            return e
        seen.add(id(e))
        e = e.__cause__ or e.__context__
    return None


def _permanent(err: errors.ServerError) -> bool:
    """A 503 that no wait repairs: the device failed and the server names no time to come back
    (a server whose devices never opened; a device failure that may pass carries Retry-After)."""
    return err.code == "device_unavailable" and err.retry_after is None


def _cause(exc: BaseException) -> str:
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


class _Attempts:
    """The retry policy of one request, without I/O (the clients do the sending and sleeping).

    ``next()`` says which replica to try and how long to wait first, or raises when the request
    has used up its connection retries or its time budget. A connection failure moves on to the
    next replica (a full round of failures backs off briefly). A 429 or 503 moves on to the next
    replica not yet tried in this round, and once all were, waits for the shortest Retry-After
    (or a backoff when none was given), stretched by jitter, if that ends within the budget.

    Every retry is logged with its cause on the "clce" logger: at WARNING when the replica is
    down or not ready (the first time in a request) or when the wait is longer than a second,
    else at INFO."""

    def __init__(self, client: _BaseClient, affinity: str | None = None):
        self.client = client
        self.replicas = client._replicas
        #: a stored weight's affinity key: its replicas in their hash order, and a busy one (429)
        #: is waited for rather than left (moving would upload the weight and split its accumulator)
        self.affinity = affinity
        self.order = self.replicas.order() if affinity is None else self.replicas.order_for(affinity)
        self.started = time.monotonic()
        self.connection_failures = 0
        self.rounds = 0
        self.tried: list[int] = []       # replicas tried in this round
        self.wait: float | None = None   # Retry-After of the round (the shortest), when given
        self.last: BaseException | None = None
        self.pending: tuple[int, float] | None = (self.order[0], 0.0)
        self.warned: set[str] = set()        # kinds of trouble already logged at WARNING

    def _log(self, kind: str | None, delay: float, text: str, *args: Any) -> None:
        """A retry: at WARNING the first time this request meets trouble of `kind` (down, restarting,
        not ready), or when the wait is longer than a second; else at INFO."""
        loud = delay > 1.0 or (kind is not None and kind not in self.warned)
        if kind is not None and loud:
            self.warned.add(kind)
        log.log(logging.WARNING if loud else logging.INFO, text, *args)

    def next(self) -> tuple[int, float]:
        if self.pending is None:
            raise self.client._exhausted(self.connection_failures, self.last)
        step, self.pending = self.pending, None
        return step

    def _next_replica(self) -> int | None:
        for i in self.order:
            if i not in self.tried:
                return i
        return None

    def _new_round(self, delay: float) -> None:
        self.rounds += 1
        self.tried, self.wait = [], None
        self.order = self.replicas.order() if self.affinity is None else self.replicas.order_for(self.affinity)
        self.pending = (self.order[0], delay)

    def connection_failed(self, i: int, exc: BaseException) -> None:
        """A connection refused or dropped. Beyond ``retries`` such failures, the request goes on
        only while a replica that has answered this client before is among the failed ones: that
        server exists and is restarting, and is waited for with backoff within the budget (a URL
        that never answered fails after ``retries``, as a typo should)."""
        self.replicas.mark_down(i)
        self.last = exc
        self.tried.append(i)
        self.connection_failures += 1
        urls = self.replicas.urls
        over = self.connection_failures > self.client.retries
        if over and not any(self.replicas.answered[j] for j in self.tried):
            return
        nxt = self._next_replica()
        if nxt is not None:
            self._log("down", 0.0, "%s: %s; trying %s", urls[i], _cause(exc), urls[nxt])
            self.pending = (nxt, 0.0)
            return
        delay = self.client._backoff(self.rounds + 1)
        budget = self.client.retry_budget_s
        if over and time.monotonic() + delay - self.started > budget:
            return
        if over:
            self._log("restarting", delay, "%s: %s; it answered this client before, so it is taken to be "
                      "restarting and waited for (%.0f s of retry_budget_s left); retrying in %.2f s", urls[i],
                      _cause(exc), budget - (time.monotonic() - self.started), delay)
        else:
            self._log("down", delay, "%s: %s; retry %d of %d in %.2f s", urls[i], _cause(exc),
                      self.connection_failures, self.client.retries, delay)
        self._new_round(delay)

    def answered(self, resp: _Response, i: int, path: str = "") -> bool:
        """True when `resp` is the answer. Raises a non-transient error status (and a transient
        one once retrying is over); False when `next()` has another try."""
        url = self.replicas.urls[i]
        if resp.status != 503:
            # a replica that only ever said "not ready" has not served this client: if it then
            # refuses connections it died starting (a device that did not open), not restarting
            self.replicas.answered[i] = True
        if resp.status < 400:
            self.replicas.mark_up(i)
            media = resp.headers.get("content-type", "").split(";")[0].strip().lower()
            if memoryview(resp.body).nbytes and media not in (MSGPACK, JSON):
                raise errors.NotAClceServer(
                    f"{url}{path} answered HTTP {resp.status} with {media or 'no content type'}, not as a "
                    f"clce server does: is {url} a clce server's base URL?")
            return True
        err = errors.error_from_response(
            resp.status, bytes(memoryview(resp.body)), resp.headers.get("content-type"), resp.headers,
            url=url + path)
        if resp.status not in _TRANSIENT_STATUS or _permanent(err):
            raise err
        if resp.status == 503:
            self.replicas.mark_down(i)
        self.last = err
        self.tried.append(i)
        if err.retry_after is not None:
            self.wait = err.retry_after if self.wait is None else min(self.wait, err.retry_after)
        budget = self.client.retry_budget_s
        kind = "unavailable" if resp.status == 503 else None   # 429 is a busy server's ordinary answer
        nxt = self._next_replica() if resp.status == 503 or self.affinity is None else None
        if nxt is not None and budget > 0:
            self._log(kind, 0.0, "%s answered %d (%s): %s; trying %s", url + path, resp.status, err.code,
                      err.message, self.replicas.urls[nxt])
            self.pending = (nxt, 0.0)
            return False
        delay = self.wait if self.wait is not None else self.client._backoff(self.rounds + 1)
        delay *= 1.0 + _JITTER * random.random()
        if time.monotonic() + delay - self.started > budget:
            raise err
        self._log(kind, delay, "%s answered %d (%s): %s; retrying in %.2f s (retry_budget_s: %.0f s)",
                  url + path, resp.status, err.code, err.message, delay, budget)
        self._new_round(delay)
        return False
class _SplitReader(_BodyReader):
    """A row chunk's answer: the gradient's bytes (the first tensor, which the server sends first)
    go straight into `into`, that chunk's rows of the whole batch's gradient; the rest of the
    message is kept with the gradient's bin header rewritten to an empty bin. Falls back to
    `_BodyReader` when the answer is not shaped so (an error, another size)."""

    def __init__(self, resp: httpx.Response, pool: BufferPool, into: np.ndarray):
        super().__init__(resp, pool)
        self.into = memoryview(into).cast("B")
        self.split: int | None = None
        self.kept = bytearray()

    def add(self, chunk: bytes) -> None:
        if self.split is None:
            if self.buf is not None or self.into is None:
                return super().add(chunk)
            self.head += chunk
            if self.size is None or len(self.head) < min(self.size, self._HEAD):
                return
            head, self.head = self.head, bytearray()
            n = self.into.nbytes
            off = first_data_offset(head)
            hdr = _bin_header_len(head, off, n) if off is not None and off + n <= self.size else None
            if hdr is None:
                self.into = None
                return super().add(bytes(head))
            self.split = off
            self.kept = bytearray(head[:off - hdr]) + b"\xc4\x00"
            chunk = bytes(head[off:])
            self.pos = off
        end = self.pos + len(chunk)
        if end > self.size:
            raise errors.TransportError(f"response longer than its Content-Length {self.size}")
        a, b = self.split, self.split + self.into.nbytes
        lo, hi = max(self.pos, a), min(end, b)
        if lo < hi:
            self.into[lo - a:hi - a] = chunk[lo - self.pos:hi - self.pos]
        if end > b:
            self.kept += chunk[max(b, self.pos) - self.pos:]
        self.pos = end

    def done(self) -> Union[bytearray, np.ndarray]:
        if self.split is None:
            return super().done()
        if self.pos != self.size:
            raise errors.TransportError(f"the response ended after {self.pos} of {self.size} bytes")
        return self.kept


def _bin_header_len(head: Union[bytes, bytearray], off: int, n: int) -> int | None:
    """The size of the msgpack bin header that ends at `off`, if it announces n bytes."""
    for size, tag in ((5, 0xC6), (3, 0xC5), (2, 0xC4)):
        if off >= size and head[off - size] == tag and int.from_bytes(head[off - size + 1:off], "big") == n:
            return size
    return None


class _Cancelled(Exception):
    """A pipelined chunk stopped because another chunk of its call failed (never raised to callers)."""


class _ChunkRun:
    """The row chunks of one pipelined call, in flight (pipeline.Pipeline planned them).

    `workers` workers (threads of `Client`, tasks of `AsyncClient`) each `take()` the next chunk,
    send it, and report `answered()` or `failed()`, until no chunk is left. The first failure
    cancels the others: no chunk starts after it, a chunk being sent or received stops at its next
    network read or write (`check()` raises `_Cancelled` there), and the client raises the error
    only once every worker has stopped, so nothing writes into the gradient after the call ended.
    The answers' Server-Timing phases are added up over the chunks."""

    def __init__(self, pipe: pipeline.Pipeline, connections: int):
        self.pipe = pipe
        self._todo = pipe.messages()
        self._lock = threading.Lock()
        self.error: BaseException | None = None
        self.cancelled = False
        self.timing: dict[str, float] = {}
        self.workers = max(1, min(connections, len(pipe.bounds)))

    def take(self) -> tuple[int, list[Segment], int, Any] | None:
        """(chunk index, its request segments, their size, where its gradient goes), or None."""
        with self._lock:
            item = None if self.cancelled else next(self._todo, None)
        if item is None:
            return None
        i, msg = item
        segments = encode_message(msg)
        return i, segments, message_nbytes(segments), self.pipe.grad_rows(i)

    def check(self) -> None:
        if self.cancelled:
            raise _Cancelled()

    def answered(self, i: int, resp: _Response) -> None:
        self.pipe.add(i, _BaseClient._decode(resp))
        timing = parse_server_timing(resp.headers.get("server-timing"))
        with self._lock:
            for k, v in timing.items():
                self.timing[k] = self.timing.get(k, 0.0) + v

    def failed(self, exc: BaseException) -> None:
        with self._lock:
            if self.error is None and not isinstance(exc, _Cancelled):
                self.error = exc
            self.cancelled = True

    def result(self) -> tuple[dict[str, Any], dict[str, float]]:
        """The whole batch's answer and timing, once every worker has stopped; or the first error."""
        if self.error is not None:
            raise self.error
        return self.pipe.result(), self.timing




_CLIENT_ARGS = """
    ``url``: a URL, a list of replica URLs, or a comma-separated string (default: env
    ``CLCE_URL``, else http://127.0.0.1:8000). ``api_key`` (default: env ``CLCE_API_KEY``) is sent
    as ``Authorization: Bearer``. ``retries`` bounds the re-sends after connection failures to
    replicas that never answered (one that answered before and now refuses is restarting, and is
    waited for); ``retry_budget_s`` (env ``CLCE_RETRY_BUDGET_S``, default 30; 0 disables) is how
    long 429 and 503 answers and restarts are retried, honouring Retry-After. ``verify`` checks
    https servers' certificates as httpx does: True (system CAs), False, a CA bundle path or an
    ``ssl.SSLContext``. ``chunk_bytes`` is the upload chunk size. ``transport`` (default: env
    ``CLCE_TRANSPORT``, else "auto"): "auto" uses shared memory when the server allows it and runs
    on this host (its /v1/info says so), else TCP; "shm" insists on shared memory
    (SharedMemoryUnavailable says why not); "tcp" never uses it. ``pipeline_bytes``: over TCP,
    batches of at least twice this (and pipeline.MIN_BYTES) go as row chunks of about this size on
    up to ``connections`` connections (0: one request). ``shm_min_bytes``: over shared memory,
    smaller inputs travel inline. ``max_cached_bytes``: free memory kept for the next calls, at
    most, by each of the two pools (shared-memory regions; buffers received over TCP), so that a
    training loop's steps write into memory already touched (clce_client.buffers). Default: 2 GiB
    of TCP buffers, and shared-memory regions up to the tenant's shared-memory budget (the
    server's --shm-max-bytes, 8 GiB by default; they count against it cached or not), so a
    language model's GBs of logits reuse last step's region (a region made anew pays its first
    touch each step: 4.2 GB, 11.7 s against 0.85 s reused); pass a value to bound both.
"""


_CE_DOC = """Compute F.cross_entropy(input, target, ...) on the server.

        Positional arguments mirror torch.nn.functional.cross_entropy. Every request option
        (clce_wire.options) is a keyword argument; return_grad=None (the default) sends the
        gradient back for torch tensors that require grad, so loss.backward() works.
        Returns the loss, or a CrossEntropyResult when return_grad/return_lse/return_argmax is set.

        Options:
        """ + "\n".join("        " + line for line in options_doc(skip=("input", "target")).splitlines()) + "\n"

_LINEAR_DOC = """F.cross_entropy(F.linear(hidden, weight, bias), target, ...) on the server, which never
        holds the (N, V) logits (clce_client/linear.py). torch tensors get autograd for hidden,
        weight and bias; numpy arrays get a dict of loss and gradients.

        Options: class_weight, ignore_index, reduction, label_smoothing, lse_square_scale,
        softcap, shift, return_z_loss; weight_name (the stored weight's name; a torch weight is
        stored under one made for it), accumulate (its gradient stays on the server until
        client.weights.flush()), stateless (the weight travels with every call)."""

_EMPTY_DOC = """An uninitialised array (numpy, or torch for a torch dtype) in memory shared with the
        server: logits computed into it travel without a copy, and ``inplace_grad=True`` writes the
        gradient over them. Without shared memory (another host, transport="tcp"), an ordinary
        array. Asks the server about shared memory first, as a big call does."""


class _BaseClient:
    """What `Client` and `AsyncClient` share: the constructor, the API and every step of a call that
    does no I/O. The shared-memory decision, planning (one request or row chunks), encoding, the
    retry policy (`_Attempts`), pipelining (`_ChunkRun`) and decoding live here; a call is a flow
    (clce_client/flows.py) of the typed I/O steps it needs, which the subclass's `_run` does. The
    subclasses only do that I/O, the same code but for `await`: send and receive, sleep, wait,
    lock, and run blocking work (in a thread, for AsyncClient).

    The constructor's arguments are listed under `_CLIENT_ARGS` (clce_client.client).
    """

    def __init__(
        self,
        url: Union[str, Sequence[str], None] = None,
        api_key: str | None = None,
        timeout: Union[httpx.Timeout, float, None] = DEFAULT_TIMEOUT,
        retries: int = 3,
        chunk_bytes: int = 1 << 20,
        retry_budget_s: float | None = None,
        verify: Union[bool, str, os.PathLike, ssl.SSLContext] = True,
        transport: str | None = None,
        pipeline_bytes: int = pipeline.CHUNK_BYTES,
        connections: int = pipeline.CONNECTIONS,
        shm_min_bytes: int = _SHM_INLINE_BYTES,
        max_cached_bytes: int | None = None,
    ):
        self._replicas = _Replicas(_parse_urls(url))
        self.shm_min_bytes = int(shm_min_bytes)
        if int(pipeline_bytes) < 0 or int(connections) < 1:
            raise ValueError("pipeline_bytes must be >= 0 and connections >= 1")
        self.pipeline_bytes = int(pipeline_bytes)    # 0: big batches go as one request
        self.connections = int(connections)
        transport = transport or os.environ.get("CLCE_TRANSPORT") or "auto"
        if transport not in _TRANSPORTS:
            raise ValueError(f"transport must be one of {', '.join(_TRANSPORTS)}, got {transport!r}")
        self.transport = transport
        self._api_key = api_key if api_key is not None else (os.environ.get("CLCE_API_KEY") or None)
        self.timeout = timeout if isinstance(timeout, httpx.Timeout) else httpx.Timeout(timeout)
        if int(retries) < 0:
            raise ValueError("retries must be >= 0")
        if int(chunk_bytes) < 1:
            raise ValueError("chunk_bytes must be >= 1")
        self.retries = int(retries)
        self.chunk_bytes = int(chunk_bytes)
        self.retry_budget_s = _retry_budget(retry_budget_s)
        self.max_cached_bytes = None if max_cached_bytes is None else int(max_cached_bytes)
        # what TCP receives
        self._buffers = BufferPool(DEFAULT_MAX_CACHED_BYTES if max_cached_bytes is None else self.max_cached_bytes)
        self._arena: Any = None          # shm.Arena once shared memory is chosen
        self._shm_error: BaseException | None = None
        self._shm_socket: str | None = None    # the registration socket of the arena
        self._shm_decided = False
        self._instance_id: str | None = None   # /v1/info's instance_id, last seen (one replica)
        self._ca = _ca_description(verify)     # named when a server's certificate does not verify
        self._announced = False                # the transport was logged (once per client)
        self._http = self._open_io(self.timeout, _ssl_verify(verify))
        #: the weights this client has stored on its server (linear_cross_entropy), by name: their
        #: versions, uploads and accumulated micro-batches; ``weights.flush()`` takes the gradients
        #: accumulated there, ``weights.attach(optimizer)`` does it before every step
        self.weights = LinearWeights(self)

    def _open_io(self, timeout: httpx.Timeout, verify: Any) -> Any:
        """The subclass's I/O state (its locks, workers), and its HTTP client, which it returns."""
        raise NotImplementedError

    @property
    def urls(self) -> list[str]:
        return list(self._replicas.urls)

    @property
    def buffers(self) -> BufferPool:
        """The pool that what this client receives over TCP lands in (gradients included): a
        caller that needs a gradient-sized buffer for a short while (``buffers.empty(shape,
        dtype)``) gets memory a training loop has already touched, and gives it back by dropping
        it (clce_client.buffers)."""
        return self._buffers

    def describe(self) -> dict[str, Any]:
        """Where this client's calls go and how, without I/O: ``urls``; ``transport``, what the
        next big call uses ("shm" or "tcp"); ``decided``, whether the server was asked about
        shared memory yet (transport="auto" asks at the first call of at least 256 KiB, or at
        ``empty()``); ``reason``, why; ``socket``, the shared-memory socket when in use."""
        arena = self._arena
        doc: dict[str, Any] = {"urls": self.urls, "requested": self.transport, "decided": self._shm_decided}
        if arena is not None:
            return {**doc, "transport": "shm", "socket": self._shm_socket,
                    "reason": "the server is on this host and allows shared memory"}
        if self.transport == "tcp":
            return {**doc, "decided": True, "transport": "tcp", "reason": "transport='tcp' (or CLCE_TRANSPORT=tcp)"}
        if self._shm_decided or self._shm_error is not None:
            return {**doc, "transport": "tcp", "reason": f"no shared memory: {self._shm_error}"}
        return {**doc, "transport": "tcp", "reason": f"shared memory not asked yet: calls under "
                f"{_SHM_PROBE_BYTES >> 10} KiB go over TCP, and the first larger one asks the server"}

    def _announce(self) -> None:
        """Logs the transport once it is chosen (INFO, once per client)."""
        if self._announced or not (self._shm_decided or self.transport == "tcp"):
            return
        self._announced = True
        d = self.describe()
        log.info("clce client for %s: %s (%s)", ", ".join(d["urls"]),
                 "shared memory via " + d["socket"] if d["transport"] == "shm" else "TCP", d["reason"])

    def __repr__(self) -> str:  # never shows the key
        key = "'***'" if self._api_key else "None"
        return f"{type(self).__name__}(url={self.urls!r}, api_key={key})"

    # ---- requests: headers, bodies, errors, decoding ----
    def _headers(self, nbytes: int | None = None) -> dict[str, str]:
        headers = {
            "Accept": f"{MSGPACK}, {JSON};q=0.5",
            "Accept-Encoding": "identity",  # keeps Content-Length the size to preallocate
            "User-Agent": f"clce-client/{__version__}",
        }
        if nbytes is not None:
            headers["Content-Type"] = MSGPACK
            # explicit, so that httpx does not fall back to chunked encoding for an iterator body
            headers["Content-Length"] = str(nbytes)
        if self._api_key:
            headers["Authorization"] = f"Bearer {self._api_key}"
        return headers

    def _outgoing(self, segments: list[Segment] | None, nbytes: int, cancel: Any,
                  affinity: str | None) -> tuple[dict[str, str], Any]:
        """A request's headers and content: none, its bytes, or (big) its chunks (`_body_chunks`)."""
        headers = self._headers(nbytes if segments is not None else None)
        if affinity is not None:
            headers[AFFINITY_HEADER] = affinity
        content = None
        if segments is not None:
            content = b"".join(segments) if nbytes <= self.chunk_bytes else self._body_chunks(segments, cancel)
        return headers, content

    def _failed(self, exc: httpx.HTTPError, attempts: _Attempts, i: int, url: str) -> None:
        """A request to replica `i` raised `exc`: a connection failure is the retry policy's to
        judge (`attempts.next()` then says what is next); anything else is raised as clce's error."""
        if isinstance(exc, _RETRYABLE):
            self._raise_if_permanent(exc, i)
            attempts.connection_failed(i, exc)
        elif isinstance(exc, httpx.TimeoutException):
            self._raise_for_timeout(exc, url)
        else:
            raise errors.TransportError(f"{url}: {type(exc).__name__}: {exc}") from exc

    def _body_chunks(self, segments: list[Segment], cancel: Any) -> Iterator[Any]:
        """A big body as chunks (an iterator: httpx re-copies the unsent rest of a bytes body
        after every partial send); a cancelled pipelined chunk stops between two of them."""
        for chunk in _chunks(segments, self.chunk_bytes):
            if cancel is not None:
                cancel()
            yield chunk

    def _reader(self, resp: httpx.Response, into: Any) -> _BodyReader:
        return _BodyReader(resp, self._buffers) if into is None else _SplitReader(resp, self._buffers, into)

    def _backoff(self, cycle: int) -> float:
        return min(_BACKOFF_SECONDS * 2 ** (cycle - 1), _MAX_BACKOFF_SECONDS)

    @staticmethod
    def _raise_for_timeout(exc: httpx.TimeoutException, url: str) -> None:
        if isinstance(exc, httpx.ReadTimeout):
            raise errors.ReadTimeout(f"{url}: no response within the read timeout") from exc
        raise errors.Timeout(f"{url}: {type(exc).__name__}") from exc

    def _exhausted(self, attempts: int, last: BaseException | None) -> BaseException:
        if isinstance(last, errors.ServerError):
            return last
        return errors.ConnectError(
            f"{', '.join(self.urls)} unreachable: no clce server answered after {attempts} attempts"
            + (f" ({_cause(last)})" if last is not None else "")
        )

    def _raise_if_permanent(self, exc: BaseException, i: int) -> None:
        """A connection failure that no retry can repair is raised at once, with its cause: the
        server's TLS certificate failing verification."""
        failure = _tls_failure(exc)
        if failure is None and "CERTIFICATE_VERIFY_FAILED" in str(exc):
            failure = exc
        if failure is not None:
            raise errors.TLSVerificationError(
                f"{self._replicas.urls[i]}: the server's TLS certificate failed verification against "
                f"{self._ca} ({failure}); pass the CA that signed it as verify=<path to its PEM bundle>"
            ) from exc

    def _json_or_msgpack(self, resp: _Response) -> Any:
        media = resp.headers.get("content-type", "").split(";")[0].strip().lower()
        try:
            if media == MSGPACK:
                doc = decode_message(memoryview(resp.body))
            else:
                import json

                doc = json.loads(bytes(memoryview(resp.body)))
        except ValueError as exc:
            raise ProtocolError(f"undecodable response body: {exc}") from None
        return self._note_info(doc)

    @staticmethod
    def _decode(resp: _Response) -> dict[str, Any]:
        media = resp.headers.get("content-type", "").split(";")[0].strip().lower()
        if media != MSGPACK:
            raise ProtocolError(f"expected a {MSGPACK} response, got {media or 'none'!r}")
        return decode_message(memoryview(resp.body))

    @classmethod
    def _finish(cls, call: _Call, resp: _Response) -> Any:
        return call.finish(cls._decode(resp), parse_server_timing(resp.headers.get("server-timing")))

    # ---- shared memory: the decision ----
    def _shm_wanted(self, nbytes: int | None) -> bool:
        """Whether this call must first ask the server about shared memory (once per client; "auto"
        asks on the first call at least _SHM_PROBE_BYTES big, or for empty())."""
        if self.transport == "tcp" or self._shm_decided:
            return False
        return not (self.transport == "auto" and nbytes is not None and nbytes < _SHM_PROBE_BYTES)

    def _shm_choice(self, info: Any) -> None:
        """Decide on shared memory from the server's /v1/info, or from the error asking for it
        raised. Connects to the registration socket (the async client runs this in a thread)."""
        from . import shm

        if isinstance(info, BaseException) and self.transport == "shm":
            raise info              # undecided: the next call asks again
        try:
            if isinstance(info, BaseException):
                raise info
            if len(self._replicas.urls) > 1:
                raise shm.SharedMemoryUnavailable("shared memory takes one server URL, not several replicas")
            self._arena = shm.connect(info, self._api_key, max_cached_bytes=self.max_cached_bytes)
            self._shm_socket = shm.socket_path(info)
        except (shm.SharedMemoryUnavailable, errors.ClceError) as exc:
            self._shm_error = exc
        self._shm_decided = True
        self._announce()

    def _use_arena(self) -> Any:
        if self._arena is not None:
            return self._arena
        if self.transport == "shm" and self._shm_error is not None:
            raise self._shm_error
        return None

    def _outdated_arena(self) -> Any:
        """The arena, when the server instance holding its registrations has gone (to renew)."""
        arena = self._use_arena()
        return arena if arena is not None and self._arena_outdated(arena) else None

    def _arena_in_use(self) -> Any:
        """The arena a call may use now (None: TCP), once the transport is chosen (logged once)."""
        arena = self._use_arena()
        self._announce()
        return arena

    def _arena_outdated(self, arena: Any) -> bool:
        """The server holding the arena's registrations has gone: its socket closed, or /v1/info
        (asked by anyone through this client) named another instance."""
        return arena.lost() or (self._instance_id is not None and self._instance_id != arena.instance_id)

    def _note_info(self, doc: Any) -> Any:
        if isinstance(doc, dict) and isinstance(doc.get("instance_id"), str) and len(self._replicas.urls) == 1:
            self._instance_id = doc["instance_id"]
        return doc

    def _move_arena(self, arena: Any, info: Any, cause: BaseException) -> None:
        """After a call over shared memory met a closed registration socket or an unknown region:
        re-register the arena with the instance that sent /v1/info `info`. When that instance is
        the one already holding the registrations (same id, socket open), the region really is
        unknown to it: `cause` is raised. When the new instance cannot share memory, "auto" goes
        on over TCP and "shm" raises why. Does Unix-socket I/O (the async client runs it in a
        thread)."""
        from . import shm

        if isinstance(info, dict) and info.get("instance_id") == arena.instance_id and not arena.lost():
            raise cause
        t0 = time.monotonic()
        try:
            shm.reconnect(arena, info)
        except shm.SharedMemoryUnavailable as exc:
            self._arena, self._shm_error = None, exc
            arena.close()
            log.warning("%s: shared memory lost (%s) and not renewed: %s; calls go over %s", self.urls[0],
                        _cause(cause), exc, "nothing (transport='shm')" if self.transport == "shm" else "TCP")
            if self.transport == "shm":
                raise
            return
        self._shm_socket = shm.socket_path(info)
        took = time.monotonic() - t0
        log.log(logging.WARNING if took > 1.0 else logging.INFO,
                "%s: shared memory registered again with server instance %s in %.2f s (cause: %s)",
                self.urls[0], arena.instance_id, took, _cause(cause))

    def _close_arena(self) -> None:
        arena, self._arena = self._arena, None
        if arena is not None:
            arena.close()

    # ---- a call, as a flow of I/O-free steps ----
    def _prepare(self, input: Any, target: Any, options: dict[str, Any], arena: Any, split: bool = False) -> _Call:
        """The call's request: in shared memory (copied into a region unless already there) or
        encoded for TCP, as one request or as row chunks (`call.pipe`). Over shared memory a batch
        that would not fit the tenant's budget (or `split`: one that did not) goes as row chunks,
        each placed on its own (`call.shm_split`)."""
        call = _Call(input, target, dict(options), arena, split=split)
        if call.shm_split is not None:
            call.pipe = self._shm_chunks(call, arena)
        elif arena is None and self.pipeline_bytes:
            call.pipe = pipeline.Pipeline.plan(
                call.values, min_bytes=max(pipeline.MIN_BYTES, 2 * self.pipeline_bytes),
                chunk_bytes=self.pipeline_bytes, alloc=self._buffers.empty_bytes)
        if call.pipe is None:
            call.segments = encode_message(call.message)
            call.nbytes = message_nbytes(call.segments)
        return call

    #: a batch split over shared memory goes in chunks of about this share of the tenant's budget
    #: (input and gradient): room for the caller's other regions and for the arena's cache
    SHM_CHUNK_SHARE = 8

    def _shm_chunks(self, call: _Call, arena: Any) -> pipeline.Pipeline:
        """The row chunks of a batch split over shared memory (bit-identical to one request, as
        pipelined TCP's; pipeline.Pipeline). Only a sample that alone exceeds the budget is refused."""
        budget = arena.max_bytes or self.pipeline_bytes or pipeline.CHUNK_BYTES
        rows, _ = pipeline.as_rows(call.values)
        x = rows["input"]
        per_sample = _shm_need(rows) / max(x.shape[0], 1)
        if size_class(int(per_sample) + 1) > budget:
            raise errors.PayloadTooLarge(
                f"one sample of this batch needs {int(per_sample)} bytes of shared memory (input and "
                f"gradient): over the tenant's shm_max_bytes={budget}. Raise it with --shm-max-bytes "
                "(CLCE_SHM_MAX_BYTES), or send over TCP (transport='tcp')", status=413, code="payload_too_large")
        input_share = memoryview(x.data).nbytes / max(_shm_need(rows), 1)
        samples = pipeline.Pipeline.chunk_samples(x, int(budget // self.SHM_CHUNK_SHARE * input_share),
                                                  limit_bytes=int(budget // 2 * input_share))
        return pipeline.Pipeline(call.values, samples, alloc=self._buffers.empty_bytes)

    def _shm_chunks_flow(self, call: _Call, arena: Any) -> Any:
        """Send a split batch's chunks over shared memory, one after another (the server computes
        each where it lies; nothing is uploaded to overlap), each placed in the arena as its turn
        comes (so they reuse one region). Returns (message, timing) of the whole batch."""
        pipe = call.pipe
        timing: dict[str, float] = {}
        for i, values in pipe.chunk_values():
            chunk = yield from prepared(_ShmChunk, (arena, pipe, i, values), arena=arena, nbytes=0)
            resp = yield Send(chunk)
            chunk.add(self._decode(resp))
            for k, v in parse_server_timing(resp.headers.get("server-timing")).items():
                timing[k] = timing.get(k, 0.0) + v
            chunk = resp = None       # its region goes back to the arena for the next chunk
        return pipe.result(), timing

    def _cross_entropy_flow(self, input: Any, target: Any, options: dict[str, Any]) -> Any:
        """One cross_entropy call (flows.renewing: a call that meets a new server instance over
        shared memory has the arena moved there and runs again, within the retry budget)."""
        if _is_torch_tensor(input):   # torch's autocast policy for cross_entropy (fp32), as the operator's
            input, target, options = _torch_support().autocast_fp32(input, target, options)
        nbytes = _nbytes(input)
        inplace = bool(options.get("inplace_grad"))
        split = [False]   # once a batch did not fit the tenant's shared memory, its renewals split too

        def attempt(t: Try) -> Any:
            arena = t.arena
            try:
                call = yield from prepared(self._prepare, (input, target, options, arena, split[0]),
                                           arena=arena, nbytes=nbytes)
            except errors.PayloadTooLarge:
                # the tenant's shared memory is taken (by regions the caller still holds, or
                # other clients of the tenant): the batch goes as row chunks that fit
                if arena is None or split[0] or inplace:
                    raise
                split[0] = True
                call = yield from prepared(self._prepare, (input, target, options, arena, True),
                                           arena=arena, nbytes=nbytes)
            t.placed = call.placement is not None or call.shm_split is not None
            if call.shm_split is not None:
                return call.finish(*(yield from self._shm_chunks_flow(call, arena)))
            if call.pipe is not None:
                return call.finish(*(yield Chunks(call.pipe)))
            return self._finish(call, (yield Send(call)))

        return (yield from renewing(self, nbytes, attempt, inline=nbytes < self.shm_min_bytes and not inplace))

    def _empty_flow(self, shape: Any, dtype: Any) -> Any:
        def attempt(t: Try) -> Any:
            if t.arena is None:
                return _ordinary_empty(shape, dtype)
            return (yield Blocking(t.arena.empty, (shape, dtype)))   # may register a region

        return (yield from renewing(self, None, attempt))

    # ---- the API: flows, which `_run` runs (in an AsyncClient, a coroutine to await) ----
    def cross_entropy(self, input: Any, target: Any, weight: Any = None, ignore_index: int = -100,
                      reduction: str = "mean", label_smoothing: float = 0.0, **options: Any) -> Any:
        if _compiling():
            from . import operators

            return operators.traced_cross_entropy(operators.client_key(self), input, target, weight, ignore_index,
                                                  reduction, label_smoothing, options)
        return self._run(self._cross_entropy_flow(
            input, target, self._options(weight, ignore_index, reduction, label_smoothing, options)))

    cross_entropy.__doc__ = _CE_DOC

    def linear_cross_entropy(self, hidden: Any, weight: Any, target: Any, bias: Any = None, **options: Any) -> Any:
        if _compiling() and _is_torch_tensor(hidden):
            from . import operators

            return operators.linear_cross_entropy(hidden, weight, target, bias, key=operators.client_key(self),
                                                  **options)
        return self._run(LinearCall(self, hidden, weight, target, bias, **options).finished())

    linear_cross_entropy.__doc__ = _LINEAR_DOC

    def empty(self, shape: Any, dtype: Any = np.float32) -> Any:
        return self._run(self._empty_flow(shape, dtype))

    empty.__doc__ = _EMPTY_DOC

    def info(self) -> Any:
        """The server's /v1/info document (version, devices, limits, instance_id)."""
        return self._run(self._info_flow())

    def _info_flow(self) -> Any:
        return self._json_or_msgpack((yield Send(_Request("GET", "/v1/info", None))))

    def healthz(self) -> Any:
        """True when some replica is alive (GET /healthz answers 2xx)."""
        return self._probe("/healthz")

    def readyz(self) -> Any:
        """True when some replica is ready to compute (GET /readyz answers 2xx)."""
        return self._probe("/readyz")

    @staticmethod
    def _options(weight: Any, ignore_index: int, reduction: str, label_smoothing: float,
                 options: dict[str, Any]) -> dict[str, Any]:
        return dict(weight=weight, ignore_index=ignore_index, reduction=reduction,
                    label_smoothing=label_smoothing, **options)


def _restarted() -> BaseException:
    from .shm import ArenaLost

    return ArenaLost("the server restarted")


def _ordinary_empty(shape: Any, dtype: Any) -> Any:
    if type(dtype).__module__ == "torch":
        import torch

        return torch.empty(shape, dtype=dtype)
    return np.empty(shape, dtype)


class Client(_BaseClient):
    __doc__ = "Synchronous client; thread-safe, with pooled keep-alive connections.\n" + _CLIENT_ARGS

    def _open_io(self, timeout: httpx.Timeout, verify: Any) -> httpx.Client:
        self._shm_lock = threading.Lock()
        self._pool: Any = None     # threads that send the row chunks of big batches
        return httpx.Client(timeout=timeout, verify=verify)

    def close(self) -> None:
        self._close_arena()
        if self._pool is not None:
            self._pool.shutdown(wait=False)
        self._buffers.close()
        self._http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()

    # ---- the I/O the flows ask for (flows.Step.on names these) ----
    def _run(self, flow: Any) -> Any:
        result, error = None, None
        while not isinstance(step := resume(flow, result, error), Done):
            result, error = None, None
            try:
                result = step.on(self)
            except Exception as exc:     # thrown into the flow, which decides
                error = exc
        return step.value

    @staticmethod
    def _blocking(fn: Any, *args: Any) -> Any:
        return fn(*args)

    def _lock(self) -> threading.Lock:
        return self._shm_lock

    def _shm_ready(self, nbytes: int | None = None) -> Any:
        """The arena when this call goes through shared memory, else None (TCP)."""
        if self._shm_wanted(nbytes):
            with self._lock():
                if self._shm_wanted(nbytes):
                    try:
                        info: Any = self.info() if len(self._replicas.urls) == 1 else {}
                    except errors.ClceError as exc:
                        info = exc
                    self._blocking(self._shm_choice, info)
        if (arena := self._outdated_arena()) is not None:
            self._renew_arena(arena, arena.generation, _restarted())
        return self._arena_in_use()

    def _renew_arena(self, arena: Any, generation: int, cause: BaseException) -> None:
        with self._lock():
            if arena is self._arena and arena.generation == generation:   # else another call did it
                self._blocking(self._move_arena, arena, self.info(), cause)

    def _once(self, method: str, url: str, segments: list[Segment] | None, nbytes: int, into: Any = None,
              cancel: Any = None, affinity: str | None = None) -> _Response:
        headers, content = self._outgoing(segments, nbytes, cancel, affinity)
        with self._http.stream(method, url, content=content, headers=headers) as resp:
            reader = self._reader(resp, into)
            for chunk in resp.iter_raw() if reader.raw else resp.iter_bytes():
                if cancel is not None:
                    cancel()
                reader.add(chunk)
            return _Response(resp.status_code, resp.headers, reader.done())

    def _request(self, method: str, path: str, segments: list[Segment] | None = None, nbytes: int = 0,
                 into: Any = None, cancel: Any = None, affinity: str | None = None) -> _Response:
        attempts = _Attempts(self, affinity)
        while True:
            i, delay = attempts.next()
            if delay:
                time.sleep(delay)
            if cancel is not None:
                cancel()
            url = self._replicas.urls[i] + path
            try:
                resp = self._once(method, url, segments, nbytes, into, cancel, affinity)
            except httpx.HTTPError as exc:
                self._failed(exc, attempts, i, url)
                continue
            if attempts.answered(resp, i, path):
                return resp

    def _send_chunks(self, pipe: pipeline.Pipeline) -> tuple[dict[str, Any], dict[str, float]]:
        from concurrent.futures import ThreadPoolExecutor, wait

        run = _ChunkRun(pipe, self.connections)
        if self._pool is None:
            with self._shm_lock:
                if self._pool is None:
                    self._pool = ThreadPoolExecutor(self.connections, thread_name_prefix="clce-chunk")

        def worker() -> None:
            while (job := run.take()) is not None:
                i, segments, nbytes, into = job
                try:
                    run.answered(i, self._request("POST", CROSS_ENTROPY_PATH, segments, nbytes, into, run.check))
                except BaseException as exc:   # noqa: BLE001  (recorded; raised by run.result())
                    run.failed(exc)
                    return

        wait([self._pool.submit(worker) for _ in range(run.workers)])
        return run.result()

    def _probe(self, path: str) -> bool:
        for i in self._replicas.order():
            try:
                resp = self._once("GET", self._replicas.urls[i] + path, None, 0)
            except httpx.HTTPError:
                continue
            if resp.status < 300:
                return True
        return False


class AsyncClient(_BaseClient):
    __doc__ = """`Client` for asyncio: the same constructor, and the same methods, each returning an
    awaitable (``empty`` and ``weights.flush()`` included). Registration with the server's shared-memory socket and the copies of big inputs
    run in a thread (asyncio.to_thread), never on the event loop.
""" + _CLIENT_ARGS

    def _open_io(self, timeout: httpx.Timeout, verify: Any) -> httpx.AsyncClient:
        self._shm_alock: asyncio.Lock | None = None   # made on first use, in the client's loop
        return httpx.AsyncClient(timeout=timeout, verify=verify)

    async def aclose(self) -> None:
        await asyncio.to_thread(self._close_arena)     # unmapping big regions takes a while
        self._buffers.close()
        await self._http.aclose()

    close = aclose

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc_info: Any) -> None:
        await self.aclose()

    def _lock(self) -> asyncio.Lock:
        if self._shm_alock is None:
            self._shm_alock = asyncio.Lock()
        return self._shm_alock

    # ---- the I/O the flows ask for (flows.Step.on names these) ----
    async def _run(self, flow: Any) -> Any:
        result, error = None, None
        while not isinstance(step := resume(flow, result, error), Done):
            result, error = None, None
            try:
                result = await step.on(self)
            except Exception as exc:     # thrown into the flow, which decides
                error = exc
        return step.value

    @staticmethod
    async def _blocking(fn: Any, *args: Any) -> Any:
        return await asyncio.to_thread(fn, *args)

    async def _shm_ready(self, nbytes: int | None = None) -> Any:
        if self._shm_wanted(nbytes):
            async with self._lock():
                if self._shm_wanted(nbytes):
                    try:
                        info: Any = await self.info() if len(self._replicas.urls) == 1 else {}
                    except errors.ClceError as exc:
                        info = exc
                    await self._blocking(self._shm_choice, info)
        if (arena := self._outdated_arena()) is not None:
            await self._renew_arena(arena, arena.generation, _restarted())
        return self._arena_in_use()

    async def _renew_arena(self, arena: Any, generation: int, cause: BaseException) -> None:
        async with self._lock():
            if arena is self._arena and arena.generation == generation:   # else another call did it
                await self._blocking(self._move_arena, arena, await self.info(), cause)

    async def _once(self, method: str, url: str, segments: list[Segment] | None, nbytes: int, into: Any = None,
                    cancel: Any = None, affinity: str | None = None) -> _Response:
        headers, content = self._outgoing(segments, nbytes, cancel, affinity)
        async with self._http.stream(method, url, content=content, headers=headers) as resp:
            reader = self._reader(resp, into)
            async for chunk in resp.aiter_raw() if reader.raw else resp.aiter_bytes():
                if cancel is not None:
                    cancel()
                reader.add(chunk)
            return _Response(resp.status_code, resp.headers, reader.done())

    async def _request(self, method: str, path: str, segments: list[Segment] | None = None, nbytes: int = 0,
                       into: Any = None, cancel: Any = None, affinity: str | None = None) -> _Response:
        attempts = _Attempts(self, affinity)
        while True:
            i, delay = attempts.next()
            if delay:
                await asyncio.sleep(delay)
            if cancel is not None:
                cancel()
            url = self._replicas.urls[i] + path
            try:
                resp = await self._once(method, url, segments, nbytes, into, cancel, affinity)
            except httpx.HTTPError as exc:
                self._failed(exc, attempts, i, url)
                continue
            if attempts.answered(resp, i, path):
                return resp

    def _body_chunks(self, segments: list[Segment], cancel: Any) -> Any:
        return _aiter(super()._body_chunks(segments, cancel))

    async def _send_chunks(self, pipe: pipeline.Pipeline) -> tuple[dict[str, Any], dict[str, float]]:
        run = _ChunkRun(pipe, self.connections)

        async def worker() -> None:
            while (job := run.take()) is not None:
                i, segments, nbytes, into = job
                try:
                    run.answered(i, await self._request("POST", CROSS_ENTROPY_PATH, segments, nbytes, into,
                                                        run.check))
                except BaseException as exc:   # noqa: BLE001  (recorded; raised by run.result())
                    run.failed(exc)
                    return

        tasks = {asyncio.ensure_future(worker()) for _ in range(run.workers)}
        try:
            while tasks and not run.cancelled:
                _, tasks = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        finally:
            # a failure (or our own cancellation) stops the others now; they are awaited, so that
            # none is still writing into the gradient when the error is raised
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        return run.result()

    async def _probe(self, path: str) -> bool:
        for i in self._replicas.order():
            try:
                resp = await self._once("GET", self._replicas.urls[i] + path, None, 0)
            except httpx.HTTPError:
                continue
            if resp.status < 300:
                return True
        return False


async def _aiter(chunks: Iterator[Any]) -> AsyncIterator[Any]:
    for chunk in chunks:
        yield chunk


_default: Client | None = None
_default_lock = threading.Lock()


def default_client() -> Client:
    """The module-level Client, created on first use from CLCE_URL / CLCE_API_KEY."""
    global _default
    with _default_lock:
        if _default is None:
            _default = Client()
        return _default


def cross_entropy(
    input: Any,
    target: Any,
    weight: Any = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    **options: Any,
) -> Any:
    """`Client.cross_entropy` on the default client (CLCE_URL, CLCE_API_KEY)."""
    if _compiling():
        from . import operators

        return operators.traced_cross_entropy(operators.client_key(None, default_client), input, target, weight,
                                              ignore_index, reduction, label_smoothing, options)
    return default_client().cross_entropy(
        input, target, weight, ignore_index, reduction, label_smoothing, **options
    )
