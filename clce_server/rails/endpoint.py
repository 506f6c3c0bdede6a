"""The endpoint every operation goes through, and the rails its stages run on.

    StagedEndpoint     the ASGI app of an operation's POST: admit -> read -> decode -> resolve ->
                       schedule -> encode, each stage filled in by the `Operation` (the loss:
                       cross_entropy/operation.py; the fused linear cross-entropy:
                       linear/operation.py)
    LeasedEndpoint     the ASGI app underneath: a record and a lease per request, the handler, any
                       failure rendered by responses.error_for, the answer sent, then the lease
                       closed and the record published, once (the weight endpoints' handlers run
                       on it directly: linear/weight_endpoints.py)
    admit, read        the tenant, readiness and media type; the body's bytes reserved before it is
                       read, then the body into one aligned buffer (the lease's pooled one)
    schedule           the job through the tenant's fair queue to a device; None when the client
                       went first
    msgpack_answer     a msgpack answer: packed at once when small, else sent by SlicedResponse
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
from fastapi import Request
from fastapi.responses import Response
from starlette.requests import ClientDisconnect

from clce_wire import fastpath, options, protocol

from ..config import over_limit
from ..state import ServerState
from ..tenants import Tenant
from .deps import check_ready, tenant_for
from .errors import ApiError, ArgumentError
from .lease import RequestLease
from .recording import RequestRecord, new_request_id
from .responses import error_for
from .scheduler import Job, Reservation

STREAM_CHUNK = 1 << 20          # response bodies leave in 1 MiB slices: backpressure, no copies


class LeasedEndpoint:
    """An ASGI app whose requests each own a RequestLease and a RequestRecord. Subclasses give
    `handle`, which returns the answer or raises; the lease stays open until the answer is out
    (its buffers may be the answer's bytes)."""

    async def handle(self, request: Request, state: ServerState, lease: RequestLease):
        raise NotImplementedError

    async def __call__(self, scope, receive, send) -> None:
        state: ServerState = scope["app"].state.clce
        lease = RequestLease(RequestRecord(new_request_id()), state.pool, state.shm_registry)
        record = lease.record
        request = Request(scope, receive, send)
        state.inflight_http += 1
        try:
            try:
                response = await self.handle(request, state, lease)
            except ClientDisconnect:       # gone mid-body: nobody to answer, and no server error
                record.outcome = "cancelled"
                response = Response(status_code=499)
            except Exception as exc:
                response = error_for(exc, request, record)
            await record.send(response, scope, receive, send)
        finally:
            state.inflight_http -= 1
            lease.close()
            record.publish(state, scope.get("client"))


@dataclass
class Call:
    """One request as the stages see it: established by `admit`."""

    request: Request
    state: ServerState
    tenant: Tenant
    lease: RequestLease            # owns what the request holds; closed by the endpoint
    as_msgpack: bool
    body_limit: int

    @property
    def record(self) -> RequestRecord:
        return self.lease.record


@dataclass
class Work:
    """What the schedule stage submits: the job and the bytes it holds against the in-flight
    budgets until it ends (`nbytes`; `request_bytes`: what crossed HTTP, which max_request_bytes
    bounds)."""

    job: Job
    nbytes: int
    request_bytes: int
    deadline: float | None = None  # on the scheduler's clock
    watch: bool = True             # cancelled when the client goes (else finished whatever happens)


class Operation:
    """What one operation gives the staged endpoint: it parses, makes the job and shapes the
    answer; the endpoint owns the order, the lease and the scheduling."""

    media_types: tuple[str, ...] = (protocol.MSGPACK, protocol.JSON)

    def reserve(self, call: Call) -> Callable[[int], Reservation] | None:
        """How the body's announced bytes are reserved (None: the scheduler's reserve)."""
        return None

    async def decode(self, body: np.ndarray, call: Call) -> Any:
        """The request's fields, wire types checked (`decode_fields`)."""
        raise NotImplementedError

    def resolve(self, args: Any, body: np.ndarray, call: Call) -> Any:
        """The request's arrays where they are (shared memory through the lease) and where its
        answer goes; PyTorch's checks. Returns what `work` and `encode` take."""
        raise NotImplementedError

    def work(self, request: Any, body: np.ndarray, call: Call) -> Work:
        raise NotImplementedError

    async def encode(self, result: Any, request: Any, call: Call) -> Response:
        raise NotImplementedError


class StagedEndpoint(LeasedEndpoint):
    """The ASGI app of one operation's endpoint: its stages in order, on the rails."""

    def __init__(self, operation: Operation):
        self.operation = operation

    async def handle(self, request: Request, state: ServerState, lease: RequestLease) -> Response:
        op = self.operation
        call = admit(request, state, lease, op.media_types)
        body = await read(call, op.reserve(call))
        t0 = time.perf_counter()
        args = await op.decode(body, call)
        resolved = op.resolve(args, body, call)
        work = op.work(resolved, body, call)
        call.record.stage("decode", time.perf_counter() - t0)
        result = await schedule(call, work)
        if result is None:                     # the client left; nobody to answer
            call.record.outcome = "cancelled"
            return Response(status_code=499)
        t0 = time.perf_counter()
        # The job is over and the answer carries no bytes of a shared-memory region (a gradient
        # is in it already, the answer names it): the regions are let go before it is sent.
        lease.unpin()
        response = await op.encode(result, resolved, call)
        call.record.stage("encode", time.perf_counter() - t0)
        return response


class HandlerEndpoint(LeasedEndpoint):
    """An endpoint that is one handler of a `Call` (the weight store's), admitted as operations are."""

    def __init__(self, handler: Callable[[Call], Any], media_types: tuple[str, ...] = (protocol.MSGPACK,),
                 reads_body: bool = True):
        self.handler, self.media_types, self.reads_body = handler, media_types, reads_body

    async def handle(self, request: Request, state: ServerState, lease: RequestLease):
        return await self.handler(admit(request, state, lease, self.media_types, self.reads_body))


# ---- admit ---------------------------------------------------------------------------------------

def admit(request: Request, state: ServerState, lease: RequestLease,
          media_types: tuple[str, ...] = (protocol.MSGPACK, protocol.JSON), reads_body: bool = True) -> Call:
    """The tenant's API key (401), a server that takes work (503), a format the operation speaks (415)."""
    headers = request.headers
    tenant = tenant_for(state, headers.get("authorization"))
    lease.record.tenant = lease.tenant = tenant.name
    check_ready(state)
    ctype = headers.get("content-type", "").split(";")[0].strip().lower()
    if reads_body and ctype not in media_types:
        raise ApiError("unsupported_media_type",
                       f"Content-Type must be {' or '.join(media_types)}, got {ctype or 'none'!r}")
    return Call(request, state, tenant, lease, ctype == protocol.MSGPACK,
                min(state.settings.max_request_bytes, tenant.max_request_bytes))


# ---- read ----------------------------------------------------------------------------------------

async def read(call: Call, reserve: Callable[[int], Reservation] | None = None, *,
               pooled: bool = True) -> np.ndarray:
    """The body in one writable buffer, placed so its first tensor is aligned (it is decoded in
    place: tensors are views into it, and the CPU device computes on them directly). Its bytes
    count against the in-flight budgets from before it is read until the lease closes (`reserve`,
    the scheduler's by default): a burst is answered 429 before its bodies are in memory.
    `pooled`: in the lease's pooled buffer; else in one of its own (a stored weight keeps it)."""
    nbytes = announced_length(call.request, call.body_limit)
    call.lease.hold(reserve(nbytes) if reserve is not None else call.state.scheduler.reserve(call.tenant, nbytes))
    t0 = time.perf_counter()
    body = await receive_body(call.request, call.body_limit, call.lease.buffer if pooled else None)
    call.record.stage("body", time.perf_counter() - t0)
    call.record.body_bytes = body.nbytes
    return body


@contextlib.contextmanager
def wire_errors():
    """Decoding a message: a value torch refuses too is an ArgumentError with its type and
    message; anything else malformed is 400 bad_request."""
    try:
        yield
    except protocol.RefusedArgument as exc:
        raise ArgumentError(exc.error) from None
    except protocol.ProtocolError as exc:
        raise ApiError("bad_request", f"malformed request: {exc}") from None


def decode_fields(body: np.ndarray, fields: tuple[options.Option, ...]) -> dict[str, Any]:
    """A msgpack body's fields, declared by `fields` (clce_wire.options), wire types checked and
    defaults filled in."""
    with wire_errors():
        return options.parse_fields(fastpath.decode_small(memoryview(body)), fields)


# ---- schedule ------------------------------------------------------------------------------------

async def schedule(call: Call, work: Work):
    """The job's result, or None when the client disconnected first (the job is dropped, or closed
    after its current step)."""
    timings: dict = {}
    submit = call.state.scheduler.submit(call.tenant, work.nbytes, work.job, deadline=work.deadline,
                                         timings=timings, request_bytes=work.request_bytes,
                                         reservation=call.lease.reservation)
    if work.watch:
        result = await unless_disconnected(submit, call.request)
        if result is None:
            return None
    else:
        result = await submit
    record = call.record
    record.stage("queue", timings.get("queue_s", 0.0))
    record.stage("run", timings.get("compute_s", 0.0))   # the job on its worker thread
    record.stage("kernel", result.kernel_seconds)        # of which device time
    record.rows = result.rows
    return result


# ---- the transport -------------------------------------------------------------------------------

def announced_length(request: Request, limit: int) -> int:
    """The body's size from Content-Length, to reserve before reading it (0 without one, or when
    it is over the size limit: receive_body answers 413 for that)."""
    try:
        n = int(request.headers.get("content-length", ""))
    except ValueError:
        return 0
    return n if 0 < n <= limit else 0


async def receive_body(request: Request, limit: int,
                       backing: Callable[[int], np.ndarray] | None = None) -> np.ndarray:
    """The body, ALIGN-placed in `backing(n)` (a new allocation when None) when Content-Length
    gives n. The limit is checked from Content-Length before anything is read, and while
    streaming when there is none."""
    length = request.headers.get("content-length")
    if length is None:
        buf = bytearray()
        async for chunk in request.stream():
            buf += chunk
            if len(buf) > limit:
                raise ApiError("payload_too_large", over_limit("request body", "max_request_bytes", limit))
        return np.frombuffer(buf, np.uint8)
    try:
        n = int(length)
    except ValueError:
        raise ApiError("bad_request", "invalid Content-Length") from None
    if n < 0:
        raise ApiError("bad_request", "invalid Content-Length")
    if n > limit:
        raise ApiError("payload_too_large", over_limit(f"request body of {n} bytes", "max_request_bytes", limit))
    head = bytearray()
    body: np.ndarray | None = None
    view = None
    pos = 0
    async for chunk in request.stream():
        if body is None:
            head += chunk
            if len(head) < min(n, 512):
                continue
            body = protocol.aligned_body(n, head, backing(n) if backing is not None else None)
            view = memoryview(body)
            chunk, head = head, None
        end = pos + len(chunk)
        if end > n:
            raise ApiError("bad_request", "body longer than its Content-Length")
        view[pos:end] = chunk
        pos = end
    if body is None:                       # shorter than the head we wait for: all in `head`
        if len(head) != n:
            raise ApiError("bad_request", f"body ended after {len(head)} of {n} bytes")
        return np.frombuffer(head, np.uint8)
    if pos != n:
        raise ApiError("bad_request", f"body ended after {pos} of {n} bytes")
    return body


async def unless_disconnected(submit, request: Request):
    """`submit`'s result, or None when the client goes first (the job is then cancelled: the
    scheduler drops it, or closes it after its current chunk)."""
    task = asyncio.ensure_future(submit)
    watcher = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait((task, watcher), return_when=asyncio.FIRST_COMPLETED)
    except BaseException:            # this request is cancelled itself (shutdown)
        task.cancel()
        raise
    finally:
        watcher.cancel()
    if not task.done():
        task.cancel()
        await asyncio.wait((task,))
        return None
    if task.exception() is None:
        return task.result()
    # Raised without a local holding the task: a failed task keeps its exception, whose
    # traceback would hold this frame and so the task, a cycle freed only by the collector.
    try:
        raise task.exception()
    finally:
        task = None


async def _disconnected(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


def timing_headers(record: RequestRecord) -> dict[str, str]:
    record.stage("total", time.perf_counter() - record.started)
    return {"Server-Timing": protocol.format_server_timing({k: v * 1000 for k, v in record.timings.items()})}


def msgpack_answer(msg: dict, headers: dict[str, str]):
    """`msg` as a msgpack answer. Its arrays may be the lease's buffers: they stay the lease's
    until the response is out (LeasedEndpoint closes it after sending)."""
    if sum(v.nbytes for v in msg.values() if isinstance(v, np.ndarray)) <= fastpath.SMALL_BYTES:
        return Response(fastpath.encode_small(msg), media_type=protocol.MSGPACK, headers=headers)
    segments = protocol.encode_message(msg)
    size = protocol.message_nbytes(segments)
    if size <= STREAM_CHUNK:   # one write, no per-chunk threadpool hop
        return Response(b"".join(segments), media_type=protocol.MSGPACK, headers=headers)
    return SlicedResponse(segments, size, headers)


class SlicedResponse:
    """A msgpack answer sent from its segments (a gradient is one: a view of the lease's buffer)
    in 1 MiB memoryview slices: no copy, flow control per slice, no thread hop per slice. Unlike
    starlette's StreamingResponse, no task group watches for a disconnect (uvicorn drops what is
    sent to a client that left), so a client that goes mid-download leaves no cancelled task
    whose traceback would keep a slice of the buffer, and with it the buffer, until the garbage
    collector ran."""

    status_code = 200

    def __init__(self, segments: list, size: int, headers: dict[str, str]):
        self.segments = segments
        self.size = size
        self.raw_headers = [(b"content-type", protocol.MSGPACK.encode()), (b"content-length", str(size).encode()),
                            *((k.lower().encode(), v.encode()) for k, v in headers.items())]

    async def __call__(self, scope, receive, send) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": self.raw_headers})
        for seg in self.segments:
            mv = memoryview(seg).cast("B")
            for i in range(0, len(mv), STREAM_CHUNK):
                await send({"type": "http.response.body", "body": mv[i:i + STREAM_CHUNK], "more_body": True})
        await send({"type": "http.response.body", "body": b"", "more_body": False})
