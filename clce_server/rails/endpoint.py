"""What every endpoint whose requests own a `RequestLease` shares: the loss endpoint (loss.py) and
the fused linear cross-entropy's (linear.py).

    LeasedEndpoint     the ASGI app: a record and a lease per request, the handler, any failure
                       rendered by responses.error_for, the answer sent, then the lease closed and
                       the record published, once
    announced_length   the body's size from Content-Length, reserved before it is read
    receive_body       the body into one aligned buffer (the lease's pooled one, or its own)
    unless_disconnected  a scheduled job's result, or None when the client went first
    msgpack_answer     a msgpack answer: packed at once when small, else sent by SlicedResponse
"""

from __future__ import annotations

import asyncio
import time
from typing import Callable

import numpy as np
from fastapi import Request
from fastapi.responses import Response
from starlette.requests import ClientDisconnect

from clce_wire import fastpath, protocol

from ..config import over_limit
from .errors import ApiError
from .lease import RequestLease
from .recording import RequestRecord, new_request_id
from .responses import error_for
from ..state import ServerState

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
