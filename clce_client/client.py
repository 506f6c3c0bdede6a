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
"""

from __future__ import annotations

import asyncio
import itertools
import os
import random
import ssl
import sys
import threading
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Union

import httpx
import numpy as np

from . import errors, pipeline
from clce_wire.options import options_doc, request_message
from clce_wire.protocol import (
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
_JITTER = 0.25          # waits are stretched by up to this fraction, at random
_TRANSIENT_STATUS = (429, 503)

# Failures where the request certainly or possibly never reached a working server. The computation
# is a pure function, so re-sending is always safe.
_RETRYABLE = (
    httpx.ConnectError,
    httpx.ConnectTimeout,
    httpx.RemoteProtocolError,
    httpx.ReadError,
    httpx.WriteError,
)


@dataclass
class CrossEntropyResult:
    """The loss and the extras asked for; a field is None when not requested.

    Arrays are numpy arrays for numpy input, torch tensors (on the input's device) for torch input.
    ``server_timing`` holds the server's phases in milliseconds (decode, queue, kernel, total).
    """

    loss: Any
    grad: Any = None
    lse: Any = None
    argmax: Any = None
    accuracy: float | None = None
    z_loss: Any = None
    server_timing: dict[str, float] = field(default_factory=dict)


def _torch_support():
    from . import torch_support

    return torch_support


def _is_torch_tensor(x: Any) -> bool:
    torch = sys.modules.get("torch")  # a tensor exists only if torch was imported already
    return torch is not None and isinstance(x, torch.Tensor)


def _wire_dtype(dtype: Any) -> str | None:
    if dtype is None:
        return None
    if type(dtype).__module__ == "torch":
        return _torch_support().wire_dtype(dtype)
    return dtype_name(dtype)


class _Call:
    """One cross_entropy call: its request message and how to turn the response into results.
    `options` are the request's options by name (clce_wire.options), as the caller gave them."""

    def __init__(self, input: Any, target: Any, options: dict[str, Any], arena: Any = None):
        inplace = bool(options.pop("inplace_grad", False))
        self.placement = None
        self.torch = _is_torch_tensor(input)
        self.input = input
        self.reduction = options.get("reduction", "mean")
        self.shift = options.get("shift") or 0
        self.classes_last = bool(options.get("classes_last")) or self.shift != 0
        return_grad = options.get("return_grad")
        self.return_grad = bool(return_grad)
        self.want_result = any(bool(options.get(k)) for k in ("return_grad", "return_lse", "return_argmax"))
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
        if arena is not None:
            self._place(arena, values, inplace)
        elif inplace:
            raise ValueError("inplace_grad=True needs the shared-memory transport")
        self.values = values
        self.message = request_message(values)

    def _place(self, arena: Any, values: dict[str, Any], inplace: bool) -> None:
        """Shared memory: the tensors become references into the arena's regions (copied there
        unless they already live in one), and the gradient gets a place (the input's own bytes
        when `inplace`)."""
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
        self.placement = pl = Placement(arena, parts)
        for k, wt in wire.items():
            values[k] = pl.ref(k, wt.dtype, wt.shape)
        if values["return_grad"]:
            values["grad_region"], values["grad_offset"] = pl.refs["input" if inplace else "grad"]

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
            loss = _torch_support().attach_grad(self.input, loss, grad, self.reduction,
                                                classes_last=self.classes_last, shift=self.shift)
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
    """Round-robin over replicas; ones that failed recently go to the back of the line."""

    def __init__(self, urls: list[str]):
        self.urls = urls
        self._next = itertools.count()
        self._down_until = [0.0] * len(urls)

    def order(self) -> list[int]:
        n = len(self.urls)
        start = next(self._next) % n  # itertools.count is atomic under the GIL
        rotated = [(start + i) % n for i in range(n)]
        now = time.monotonic()
        return sorted(rotated, key=lambda i: self._down_until[i] > now)

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

    def __init__(self, resp: httpx.Response):
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
            self.buf = aligned_body(self.size, self.head)
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


class _Attempts:
    """The retry policy of one request, without I/O (the clients do the sending and sleeping).

    ``next()`` says which replica to try and how long to wait first, or raises when the request
    has used up its connection retries or its time budget. A connection failure moves on to the
    next replica (a full round of failures backs off briefly). A 429 or 503 moves on to the next
    replica not yet tried in this round, and once all were, waits for the shortest Retry-After
    (or a backoff when none was given), stretched by jitter, if that ends within the budget."""

    def __init__(self, client: _Base):
        self.client = client
        self.replicas = client._replicas
        self.order = self.replicas.order()
        self.started = time.monotonic()
        self.connection_failures = 0
        self.rounds = 0
        self.tried: list[int] = []       # replicas tried in this round
        self.wait: float | None = None   # Retry-After of the round (the shortest), when given
        self.last: BaseException | None = None
        self.pending: tuple[int, float] | None = (self.order[0], 0.0)

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
        self.order = self.replicas.order()
        self.pending = (self.order[0], delay)

    def connection_failed(self, i: int, exc: BaseException) -> None:
        self.replicas.mark_down(i)
        self.last = exc
        self.tried.append(i)
        self.connection_failures += 1
        if self.connection_failures > self.client.retries:
            return
        nxt = self._next_replica()
        if nxt is not None:
            self.pending = (nxt, 0.0)
        else:
            self._new_round(self.client._backoff(self.rounds + 1))

    def answered(self, resp: _Response, i: int) -> bool:
        """True when `resp` is the answer. Raises a non-transient error status (and a transient
        one once retrying is over); False when `next()` has another try."""
        if resp.status < 400:
            self.replicas.mark_up(i)
            return True
        err = errors.error_from_response(
            resp.status, bytes(memoryview(resp.body)), resp.headers.get("content-type"), resp.headers
        )
        if resp.status not in _TRANSIENT_STATUS:
            raise err
        if resp.status == 503:
            self.replicas.mark_down(i)
        self.last = err
        self.tried.append(i)
        if err.retry_after is not None:
            self.wait = err.retry_after if self.wait is None else min(self.wait, err.retry_after)
        budget = self.client.retry_budget_s
        nxt = self._next_replica()
        if nxt is not None and budget > 0:
            self.pending = (nxt, 0.0)
            return False
        delay = self.wait if self.wait is not None else self.client._backoff(self.rounds + 1)
        delay *= 1.0 + _JITTER * random.random()
        if time.monotonic() + delay - self.started > budget:
            raise err
        self._new_round(delay)
        return False
class _SplitReader(_BodyReader):
    """A row chunk's answer: the gradient's bytes (the first tensor, which the server sends first)
    go straight into `into`, that chunk's rows of the whole batch's gradient; the rest of the
    message is kept with the gradient's bin header rewritten to an empty bin. Falls back to
    `_BodyReader` when the answer is not shaped so (an error, another size)."""

    def __init__(self, resp: httpx.Response, into: np.ndarray):
        super().__init__(resp)
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


class _Base:
    def __init__(
        self,
        url: Union[str, Sequence[str], None] = None,
        api_key: str | None = None,
        timeout: Union[httpx.Timeout, float, None] = DEFAULT_TIMEOUT,
        retries: int = 3,
        chunk_bytes: int = 1 << 20,
        retry_budget_s: float | None = None,
        transport: str | None = None,
        pipeline_bytes: int = pipeline.CHUNK_BYTES,
        connections: int = pipeline.CONNECTIONS,
        shm_min_bytes: int = _SHM_INLINE_BYTES,
    ):
        self._replicas = _Replicas(_parse_urls(url))
        #: over shared memory, calls whose input is smaller than this send their tensors inline (as
        #: over TCP): for a few KB the copy costs nothing and the references buy nothing
        self.shm_min_bytes = int(shm_min_bytes)
        if int(pipeline_bytes) < 0 or int(connections) < 1:
            raise ValueError("pipeline_bytes must be >= 0 and connections >= 1")
        self.pipeline_bytes = int(pipeline_bytes)    # 0: big batches go as one request
        self.connections = int(connections)
        transport = transport or os.environ.get("CLCE_TRANSPORT") or "auto"
        if transport not in _TRANSPORTS:
            raise ValueError(f"transport must be one of {', '.join(_TRANSPORTS)}, got {transport!r}")
        self.transport = transport
        self._arena: Any = None          # shm.Arena once shared memory is chosen
        self._shm_error: BaseException | None = None
        self._shm_decided = False
        self._shm_lock = threading.Lock()
        self._api_key = api_key if api_key is not None else (os.environ.get("CLCE_API_KEY") or None)
        self.timeout = timeout if isinstance(timeout, httpx.Timeout) else httpx.Timeout(timeout)
        if int(retries) < 0:
            raise ValueError("retries must be >= 0")
        if int(chunk_bytes) < 1:
            raise ValueError("chunk_bytes must be >= 1")
        self.retries = int(retries)
        self.chunk_bytes = int(chunk_bytes)
        self.retry_budget_s = _retry_budget(retry_budget_s)

    @property
    def urls(self) -> list[str]:
        return list(self._replicas.urls)

    def __repr__(self) -> str:  # never shows the key
        key = "'***'" if self._api_key else "None"
        return f"{type(self).__name__}(url={self.urls!r}, api_key={key})"

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
            f"no clce server reachable at {', '.join(self.urls)} after {attempts} attempts"
            + (f": {type(last).__name__}: {last}" if last is not None else "")
        )

    @staticmethod
    def _json_or_msgpack(resp: _Response) -> Any:
        media = resp.headers.get("content-type", "").split(";")[0].strip().lower()
        try:
            if media == MSGPACK:
                return decode_message(memoryview(resp.body))
            import json

            return json.loads(bytes(memoryview(resp.body)))
        except ValueError as exc:
            raise ProtocolError(f"undecodable response body: {exc}") from None

    @staticmethod
    def _finish(call: _Call, resp: _Response) -> Any:
        media = resp.headers.get("content-type", "").split(";")[0].strip().lower()
        if media != MSGPACK:
            raise ProtocolError(f"expected a {MSGPACK} response, got {media or 'none'!r}")
        timing = parse_server_timing(resp.headers.get("server-timing"))
        return call.finish(decode_message(memoryview(resp.body)), timing)

    def _shm_choice(self, info: Any) -> None:
        """Decide on shared memory from the server's /v1/info (once per client)."""
        from . import shm

        try:
            if isinstance(info, BaseException):
                raise info
            if len(self._replicas.urls) > 1:
                raise shm.SharedMemoryUnavailable("shared memory takes one server URL, not several replicas")
            self._arena = shm.connect(info, self._api_key)
        except (shm.SharedMemoryUnavailable, errors.ClceError) as exc:
            self._shm_error = exc
        self._shm_decided = True

    def _use_arena(self) -> Any:
        if self._arena is not None:
            return self._arena
        if self.transport == "shm" and self._shm_error is not None:
            raise self._shm_error
        return None

    def _close_arena(self) -> None:
        arena, self._arena = self._arena, None
        if arena is not None:
            arena.close()

    def empty(self, shape: Any, dtype: Any = np.float32) -> Any:
        """An uninitialised array (numpy, or torch for a torch dtype) in memory shared with the
        server: logits computed into it travel without a copy, and ``inplace_grad=True`` writes the
        gradient over them. Without shared memory (another host, transport="tcp"), an ordinary
        array."""
        arena = self._shm_ready()
        if arena is not None:
            return arena.empty(shape, dtype)
        if type(dtype).__module__ == "torch":
            import torch

            return torch.empty(shape, dtype=dtype)
        return np.empty(shape, dtype)

    def _call(self, input: Any, target: Any, arena: Any = None, **options: Any) -> tuple[_Call, list[Segment], int]:
        call = _Call(input, target, options, arena)
        segments = encode_message(call.message)
        return call, segments, message_nbytes(segments)

    def _pipeline(self, call: _Call, arena: Any) -> Any:
        """The row-chunk plan for a big batch over TCP, or None (one request)."""
        if arena is not None or not self.pipeline_bytes:
            return None
        return pipeline.Pipeline.plan(call.values, min_bytes=max(pipeline.MIN_BYTES, 2 * self.pipeline_bytes),
                                      chunk_bytes=self.pipeline_bytes)

    def _chunk_answer(self, resp: _Response) -> dict[str, Any]:
        media = resp.headers.get("content-type", "").split(";")[0].strip().lower()
        if media != MSGPACK:
            raise ProtocolError(f"expected a {MSGPACK} response, got {media or 'none'!r}")
        return decode_message(memoryview(resp.body))


_CE_DOC = """Compute F.cross_entropy(input, target, ...) on the server.

        Positional arguments mirror torch.nn.functional.cross_entropy. Every request option
        (clce_wire.options) is a keyword argument; return_grad=None (the default) sends the
        gradient back for torch tensors that require grad, so loss.backward() works.
        Returns the loss, or a CrossEntropyResult when return_grad/return_lse/return_argmax is set.

        Options:
        """ + "\n".join("        " + line for line in options_doc(skip=("input", "target")).splitlines()) + "\n"


class Client(_Base):
    """Synchronous client; thread-safe, with pooled keep-alive connections.

    ``url``: a URL, a list of replica URLs, or a comma-separated string (default: env
    ``CLCE_URL``, else http://127.0.0.1:8000). ``api_key`` (default: env ``CLCE_API_KEY``) is sent
    as ``Authorization: Bearer``. ``retries`` bounds the re-sends after connection failures;
    ``retry_budget_s`` (env ``CLCE_RETRY_BUDGET_S``, default 30; 0 disables) is how long 429 and
    503 answers are retried, honouring Retry-After. ``verify`` checks https servers' certificates
    as httpx does: True (system CAs), False, a CA bundle path or an ``ssl.SSLContext``.
    ``chunk_bytes`` is the upload chunk size. ``transport`` (default: env ``CLCE_TRANSPORT``, else
    "auto"): "auto" uses shared memory when the server allows it and runs on this host (its
    /v1/info says so), else TCP; "shm" insists on shared memory (SharedMemoryUnavailable says why
    not); "tcp" never uses it.
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
    ):
        super().__init__(url, api_key, timeout, retries, chunk_bytes, retry_budget_s, transport, pipeline_bytes,
                         connections, shm_min_bytes)
        self._http = httpx.Client(timeout=self.timeout, verify=_ssl_verify(verify))
        self._pool: Any = None     # threads that send the row chunks of big batches

    def close(self) -> None:
        self._close_arena()
        if self._pool is not None:
            self._pool.shutdown(wait=False)
        self._http.close()

    def _shm_ready(self, nbytes: int | None = None) -> Any:
        """The arena when this call goes through shared memory, else None (TCP)."""
        if self.transport == "auto" and nbytes is not None and nbytes < _SHM_PROBE_BYTES and not self._shm_decided:
            return None
        if self.transport != "tcp" and not self._shm_decided:
            with self._shm_lock:
                if not self._shm_decided:
                    try:
                        info = self.info() if len(self._replicas.urls) == 1 else {}
                    except errors.ClceError as exc:
                        if self.transport == "shm":
                            raise
                        info = exc
                    self._shm_choice(info)
        return self._use_arena()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()

    def _content(self, segments: list[Segment] | None, nbytes: int) -> Any:
        if segments is None:
            return None
        if nbytes <= self.chunk_bytes:
            return b"".join(segments)
        # An iterator: httpx re-copies the unsent rest of a bytes body after every partial send.
        return _chunks(segments, self.chunk_bytes)

    def _once(
        self, method: str, url: str, segments: list[Segment] | None, nbytes: int, into: Any = None
    ) -> _Response:
        headers = self._headers(nbytes if segments is not None else None)
        content = self._content(segments, nbytes)
        with self._http.stream(method, url, content=content, headers=headers) as resp:
            reader = _BodyReader(resp) if into is None else _SplitReader(resp, into)
            for chunk in resp.iter_raw() if reader.raw else resp.iter_bytes():
                reader.add(chunk)
            return _Response(resp.status_code, resp.headers, reader.done())

    def _request(
        self, method: str, path: str, segments: list[Segment] | None = None, nbytes: int = 0,
        into: Any = None,
    ) -> _Response:
        attempts = _Attempts(self)
        while True:
            i, delay = attempts.next()
            if delay:
                time.sleep(delay)
            url = self._replicas.urls[i] + path
            try:
                resp = self._once(method, url, segments, nbytes, into)
            except _RETRYABLE as exc:
                attempts.connection_failed(i, exc)
                continue
            except httpx.TimeoutException as exc:
                self._raise_for_timeout(exc, url)
            except httpx.HTTPError as exc:
                raise errors.TransportError(f"{url}: {type(exc).__name__}: {exc}") from exc
            if attempts.answered(resp, i):
                return resp

    def cross_entropy(
        self,
        input: Any,
        target: Any,
        weight: Any = None,
        ignore_index: int = -100,
        reduction: str = "mean",
        label_smoothing: float = 0.0,
        **options: Any,
    ) -> Any:
        nbytes = _nbytes(input)
        arena = self._shm_ready(nbytes)
        if arena is not None and nbytes < self.shm_min_bytes and not options.get("inplace_grad"):
            arena = None
        call = _Call(input, target, dict(weight=weight, ignore_index=ignore_index, reduction=reduction,
                                         label_smoothing=label_smoothing, **options), arena)
        pipe = self._pipeline(call, arena)
        if pipe is not None:
            return call.finish(self._send_chunks(pipe), {})
        segments = encode_message(call.message)
        return self._finish(call, self._request("POST", CROSS_ENTROPY_PATH, segments, message_nbytes(segments)))

    def linear_cross_entropy(self, hidden: Any, weight: Any, target: Any, bias: Any = None, **options: Any) -> Any:
        """The fused linear cross-entropy (clce_client/linear.py) on this client's server."""
        from .linear import linear_cross_entropy

        return linear_cross_entropy(hidden, weight, target, bias, client=self, **options)

    def _send_chunks(self, pipe: Any) -> dict[str, Any]:
        from concurrent.futures import ThreadPoolExecutor

        if self._pool is None:
            with self._shm_lock:
                if self._pool is None:
                    self._pool = ThreadPoolExecutor(self.connections, thread_name_prefix="clce-chunk")

        def one(item):
            i, msg = item
            segments = encode_message(msg)
            resp = self._request("POST", CROSS_ENTROPY_PATH, segments, message_nbytes(segments),
                                 into=pipe.grad_rows(i))
            pipe.add(i, self._chunk_answer(resp))

        for f in [self._pool.submit(one, item) for item in pipe.messages()]:
            f.result()
        return pipe.result()

    cross_entropy.__doc__ = _CE_DOC

    def info(self) -> dict[str, Any]:
        """The server's /v1/info document (version, devices, limits)."""
        return self._json_or_msgpack(self._request("GET", "/v1/info"))

    def _probe(self, path: str) -> bool:
        for i in self._replicas.order():
            try:
                if self._once("GET", self._replicas.urls[i] + path, None, 0).status < 300:
                    return True
            except httpx.HTTPError:
                continue
        return False

    def healthz(self) -> bool:
        """True when some replica is alive (GET /healthz answers 2xx)."""
        return self._probe("/healthz")

    def readyz(self) -> bool:
        """True when some replica is ready to compute (GET /readyz answers 2xx)."""
        return self._probe("/readyz")


async def _achunks(segments: list[Segment], chunk_bytes: int) -> AsyncIterator[Any]:
    for chunk in _chunks(segments, chunk_bytes):
        yield chunk


class AsyncClient(_Base):
    """`Client` for asyncio: the same constructor, and the same methods as coroutines."""

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
    ):
        super().__init__(url, api_key, timeout, retries, chunk_bytes, retry_budget_s, transport, pipeline_bytes,
                         connections, shm_min_bytes)
        self._http = httpx.AsyncClient(timeout=self.timeout, verify=_ssl_verify(verify))

    async def aclose(self) -> None:
        self._close_arena()
        await self._http.aclose()

    def _shm_ready(self) -> Any:   # for empty(): decided by the first call
        return self._use_arena()

    async def _ashm_ready(self, nbytes: int) -> Any:
        if self.transport == "auto" and nbytes < _SHM_PROBE_BYTES and not self._shm_decided:
            return None
        if self.transport != "tcp" and not self._shm_decided:
            try:
                info = await self.info() if len(self._replicas.urls) == 1 else {}
            except errors.ClceError as exc:
                if self.transport == "shm":
                    raise
                info = exc
            if not self._shm_decided:
                self._shm_choice(info)
        return self._use_arena()

    close = aclose

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc_info: Any) -> None:
        await self.aclose()

    def _content(self, segments: list[Segment] | None, nbytes: int) -> Any:
        if segments is None:
            return None
        if nbytes <= self.chunk_bytes:
            return b"".join(segments)
        return _achunks(segments, self.chunk_bytes)

    async def _once(
        self, method: str, url: str, segments: list[Segment] | None, nbytes: int, into: Any = None
    ) -> _Response:
        headers = self._headers(nbytes if segments is not None else None)
        content = self._content(segments, nbytes)
        async with self._http.stream(method, url, content=content, headers=headers) as resp:
            reader = _BodyReader(resp) if into is None else _SplitReader(resp, into)
            async for chunk in resp.aiter_raw() if reader.raw else resp.aiter_bytes():
                reader.add(chunk)
            return _Response(resp.status_code, resp.headers, reader.done())

    async def _request(
        self, method: str, path: str, segments: list[Segment] | None = None, nbytes: int = 0,
        into: Any = None,
    ) -> _Response:
        attempts = _Attempts(self)
        while True:
            i, delay = attempts.next()
            if delay:
                await asyncio.sleep(delay)
            url = self._replicas.urls[i] + path
            try:
                resp = await self._once(method, url, segments, nbytes, into)
            except _RETRYABLE as exc:
                attempts.connection_failed(i, exc)
                continue
            except httpx.TimeoutException as exc:
                self._raise_for_timeout(exc, url)
            except httpx.HTTPError as exc:
                raise errors.TransportError(f"{url}: {type(exc).__name__}: {exc}") from exc
            if attempts.answered(resp, i):
                return resp

    async def cross_entropy(
        self,
        input: Any,
        target: Any,
        weight: Any = None,
        ignore_index: int = -100,
        reduction: str = "mean",
        label_smoothing: float = 0.0,
        **options: Any,
    ) -> Any:
        nbytes = _nbytes(input)
        arena = await self._ashm_ready(nbytes)
        if arena is not None and nbytes < self.shm_min_bytes and not options.get("inplace_grad"):
            arena = None
        call = _Call(input, target, dict(weight=weight, ignore_index=ignore_index, reduction=reduction,
                                         label_smoothing=label_smoothing, **options), arena)
        pipe = self._pipeline(call, arena)
        if pipe is not None:
            sem = asyncio.Semaphore(self.connections)

            async def one(i, msg):
                async with sem:
                    segments = encode_message(msg)
                    resp = await self._request("POST", CROSS_ENTROPY_PATH, segments, message_nbytes(segments),
                                               into=pipe.grad_rows(i))
                pipe.add(i, self._chunk_answer(resp))

            await asyncio.gather(*(one(i, m) for i, m in pipe.messages()))
            return call.finish(pipe.result(), {})
        segments = encode_message(call.message)
        resp = await self._request("POST", CROSS_ENTROPY_PATH, segments, message_nbytes(segments))
        return self._finish(call, resp)

    cross_entropy.__doc__ = _CE_DOC

    async def info(self) -> dict[str, Any]:
        """The server's /v1/info document (version, devices, limits)."""
        return self._json_or_msgpack(await self._request("GET", "/v1/info"))

    async def _probe(self, path: str) -> bool:
        for i in self._replicas.order():
            try:
                resp = await self._once("GET", self._replicas.urls[i] + path, None, 0)
            except httpx.HTTPError:
                continue
            if resp.status < 300:
                return True
        return False

    async def healthz(self) -> bool:
        """True when some replica is alive (GET /healthz answers 2xx)."""
        return await self._probe("/healthz")

    async def readyz(self) -> bool:
        """True when some replica is ready to compute (GET /readyz answers 2xx)."""
        return await self._probe("/readyz")


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
    return default_client().cross_entropy(
        input, target, weight, ignore_index, reduction, label_smoothing, **options
    )
