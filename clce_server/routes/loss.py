"""POST /v1/cross_entropy, as named stages:

    admit   (dependencies)  the tenant's API key, a server that takes work, a format we speak
    read    read_body       the body into one aligned, pooled buffer, within the size limits
    decode  decode          msgpack or JSON into the request's options (clce_wire.options)
    schedule schedule       a LossJob through the tenant's fair queue to a device; cancelled if
                            the client goes
    encode  encode          loss, gradient and extras in the request's format, streamed

Failures raise; the exception handlers (responses.py) render them, and RecordRequests
(recording.py) records the outcome and the stage timings once per request.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel
from starlette.background import BackgroundTask

from clce_wire import fastpath, options, protocol
from clce_wire.shm import RegionRef, parse_ref, ref_map

from ..deps import authenticated_tenant, ready_state
from ..errors import ApiError, ArgumentError
from .. import layouts
from ..hostmem import POOL
from ..jobs import LossJob, inflight_bytes
from ..shm import view as region_view
from ..recording import RequestRecord
from ..state import ServerState
from ..tenants import Tenant

router = APIRouter()


class CrossEntropyResponse(BaseModel):
    """The JSON form of the answer (msgpack carries the same keys, tensors as binary)."""

    loss: float | list[Any] | str
    grad: list[Any] | None = None
    lse: list[Any] | None = None
    argmax: list[Any] | None = None
    accuracy: float | None = None
    z_loss: float | list[Any] | None = None
    partials: list[Any] | None = None

STREAM_CHUNK = 1 << 20          # response bodies leave in 1 MiB slices: backpressure, no copies
WATCH_DISCONNECT_BYTES = 1 << 16  # requests at least this big are cancelled when the client goes
JSON_IN_THREAD_BYTES = 1 << 20  # JSON bodies bigger than this are parsed off the event loop
JSON_OUT_THREAD_ROWS = 4096     # and JSON answers with more rows are rendered off it


@dataclass
class Admission:
    """What the admit stage established about a request."""

    state: ServerState
    tenant: Tenant
    as_msgpack: bool
    body_limit: int
    record: RequestRecord
    pins: list = field(default_factory=list)   # shared-memory regions this request uses
    shm_bytes: int = 0                          # bytes of the tensors it references there


def unpin_all(adm: Admission) -> None:
    pins, adm.pins = adm.pins, []
    for region in pins:
        adm.state.shm_registry.unpin(region)


async def admit(request: Request, tenant: Tenant = Depends(authenticated_tenant),
          state: ServerState = Depends(ready_state)) -> Admission:
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype not in (protocol.MSGPACK, protocol.JSON):
        raise ApiError("unsupported_media_type",
                       f"Content-Type must be {protocol.MSGPACK} or {protocol.JSON}, got {ctype or 'none'!r}")
    return Admission(state, tenant, ctype == protocol.MSGPACK,
                     min(state.settings.max_request_bytes, tenant.max_request_bytes),
                     request.scope["state"]["clce_request"])


@router.post(
    "/v1/cross_entropy",
    summary="Cross-entropy loss (and gradient) of a batch",
    response_model=CrossEntropyResponse,
    openapi_extra={"requestBody": {"required": True, "content": {
        "application/json": {"schema": {}},   # filled in by app.openapi() from clce_wire.options
        "application/msgpack": {"schema": {"type": "string", "format": "binary",
                                           "description": "the same fields, msgpack-encoded (docs/protocol.md)"}},
    }}},
    responses={400: {"description": "bad arguments: the message PyTorch would give"},
               401: {"description": "missing or invalid API key"}, 413: {"description": "body too large"},
               415: {"description": "not msgpack or JSON"}, 429: {"description": "queue or byte budget full"},
               500: {"description": "a server bug; the body and X-Request-ID carry the request id"},
               503: {"description": "starting, draining, or the device failed (Retry-After)"},
               504: {"description": "deadline exceeded"}},
)
async def cross_entropy(request: Request, adm: Admission = Depends(admit)) -> Response:
    # The body's bytes count against the in-flight budgets from before it is read until the
    # response has gone out (released by RecordRequests): a burst is answered 429 before its bodies
    # are in memory, and peak memory stays near max_inflight_bytes + the host pool.
    reservation = reserve_body(request, adm)
    if reservation is not None:
        adm.record.on_done.append(reservation.release)
    t0 = time.perf_counter()
    body, backing = await read_body(request, adm.body_limit)
    adm.record.stage("body", time.perf_counter() - t0)
    adm.record.body_bytes = body.nbytes
    try:
        args = await decode(body, adm)
    except BaseException:
        POOL.release(backing)
        unpin_all(adm)
        raise
    # From here a device thread may read the body until the job is over: it is given back to the
    # pool only with the response (a failed or abandoned job's body is left to the collector).
    # Shared-memory regions are unpinned on every path; an abandoned job's arrays still keep the
    # mapping alive (a mapped region cannot be unmapped while arrays over it exist).
    try:
        # referenced tensors count as the request's bytes (budgets and fair shares do not depend
        # on the transport)
        result = await schedule(request, adm, args, body.nbytes + adm.shm_bytes, reservation)
        if result is None:                     # the client left; nobody to answer
            adm.record.outcome = "cancelled"
            unpin_all(adm)
            return Response(status_code=499)
        return await encode(result, args, adm, backing)
    except BaseException:
        unpin_all(adm)
        raise


class LossLane:
    """ASGI middleware that serves POST /v1/cross_entropy itself: the route above, its two
    dependencies called directly, and its failures rendered by the app's own exception handlers.

    The route stays declared (OpenAPI, and the one definition of the stages); only FastAPI's
    router, dependency solver and its inner middleware are skipped, which cost a small request
    more CPU than all of its stages (bench/bench_small_requests.py). Every other method and
    path goes on to the app unchanged."""

    def __init__(self, app, *, path: str):
        self.app = app
        self.path = path

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["path"] != self.path or scope["method"] != "POST":
            return await self.app(scope, receive, send)
        request = Request(scope, receive, send)
        try:
            adm = await admit(request, await authenticated_tenant(request), await ready_state(request))
            response = await cross_entropy(request, adm)
        except Exception as exc:
            response = await self._handled(request, exc)
        await response(scope, receive, send)

    @staticmethod
    async def _handled(request: Request, exc: Exception) -> Response:
        handlers = request.app.exception_handlers
        for cls in type(exc).__mro__:
            if cls in handlers:
                return await handlers[cls](request, exc)
        raise exc   # pragma: no cover  (Exception itself has a handler)


def reserve_body(request: Request, adm: Admission):
    """A scheduler reservation for the body announced by Content-Length (None without one, or
    when it is over the size limit: read_body answers 413 for that)."""
    try:
        n = int(request.headers.get("content-length", ""))
    except ValueError:
        return None
    if not 0 < n <= adm.body_limit:
        return None
    return adm.state.scheduler.reserve(adm.tenant, n)


# ---- read ----------------------------------------------------------------------------------------

async def read_body(request: Request, limit: int) -> tuple[np.ndarray, np.ndarray | None]:
    """The body in one writable buffer, placed so its first tensor is aligned (it is decoded in
    place: tensors are views into it, and the CPU device computes on them directly). The limit
    is checked from Content-Length before anything is read, and while streaming when there is
    none. Returns (body, pooled backing to give back after the response, or None)."""
    length = request.headers.get("content-length")
    if length is None:
        buf = bytearray()
        async for chunk in request.stream():
            buf += chunk
            if len(buf) > limit:
                raise ApiError("payload_too_large", f"request body exceeds the limit of {limit} bytes")
        return np.frombuffer(buf, np.uint8), None
    try:
        n = int(length)
    except ValueError:
        raise ApiError("bad_request", "invalid Content-Length") from None
    if n < 0:
        raise ApiError("bad_request", "invalid Content-Length")
    if n > limit:
        raise ApiError("payload_too_large", f"request body of {n} bytes exceeds the limit of {limit} bytes")
    head = bytearray()
    body: np.ndarray | None = None
    backing = view = None
    pos = 0
    try:
        async for chunk in request.stream():
            if body is None:
                head += chunk
                if len(head) < min(n, 512):
                    continue
                backing = POOL.backing(n)
                body = protocol.aligned_body(n, head, backing)
                view = memoryview(body)
                chunk, head = head, None
            end = pos + len(chunk)
            if end > n:
                raise ApiError("bad_request", "body longer than its Content-Length")
            view[pos:end] = chunk
            pos = end
    except BaseException:
        POOL.release(backing)
        raise
    if body is None:                       # shorter than the head we wait for: all in `head`
        if len(head) != n:
            raise ApiError("bad_request", f"body ended after {len(head)} of {n} bytes")
        return np.frombuffer(head, np.uint8), None
    if pos != n:
        POOL.release(backing)
        raise ApiError("bad_request", f"body ended after {pos} of {n} bytes")
    return body, backing


# ---- decode --------------------------------------------------------------------------------------

async def decode(body: np.ndarray, adm: Admission) -> dict[str, Any]:
    t0 = time.perf_counter()
    try:
        if adm.as_msgpack:
            args = options.parse_request(fastpath.decode_small(memoryview(body)))
        elif body.nbytes > JSON_IN_THREAD_BYTES:
            args = await asyncio.to_thread(lambda: options.parse_request(protocol.loads_json(body), json=True))
        else:
            args = options.parse_request(protocol.loads_json(body), json=True)
    except protocol.RefusedArgument as exc:   # a value torch refuses too: its type and message
        raise ArgumentError(exc.error) from None
    except protocol.ProtocolError as exc:     # loads_json and decode_message raise only this
        raise ApiError("bad_request", f"malformed request: {exc}") from None
    resolve_regions(args, adm)
    if adm.as_msgpack and args.get("grad_out") is None:
        args["grad_out"] = gradient_over_body(args, body)
    adm.record.stage("decode", time.perf_counter() - t0)
    return args


def gradient_over_body(args: dict[str, Any], body: np.ndarray) -> np.ndarray | None:
    """The logits' own bytes in the received body, when the gradient can be written over them
    (engine.prepare: each logit is read before its gradient is written) and sent from there: the
    server then holds one copy of a large request's payload, not two. None: a buffer of its own
    (no gradient asked for, another dtype, or a layout the job rewrites into other rows)."""
    x = args["input"]
    if not args["return_grad"] or layouts.wanted(args) or not isinstance(x, np.ndarray):
        return None
    if (args["grad_dtype"] or protocol.dtype_name(x.dtype)) != protocol.dtype_name(x.dtype):
        return None
    start, end = body.ctypes.data, body.ctypes.data + body.nbytes
    if not (x.flags.c_contiguous and x.flags.writeable and start <= x.ctypes.data
            and x.ctypes.data + x.nbytes <= end):
        return None
    return x


# Tensors used where they lie in shared memory (the client may keep writing them: garbage in,
# garbage out, never out of bounds). Class indices and weights are copied out first: they are
# bounds-checked and then used as indices, and a client must not change them in between.
_IN_PLACE = frozenset(("input",))


def resolve_regions(args: dict[str, Any], adm: Admission) -> None:
    """Replace region references (clce_wire.shm.RegionRef) by arrays over the tenant's regions,
    checked and pinned until the response is out; map `grad_region` to `args["grad_out"]`."""
    refs = [o.name for o in options.OPTIONS if isinstance(args.get(o.name), RegionRef)]
    if not refs and args["grad_region"] is None:
        return
    registry = adm.state.shm_registry
    if registry is None:
        raise ApiError("bad_request", "this server does not allow shared memory (see /v1/info)")
    if not adm.as_msgpack:
        raise ApiError("bad_request", "shared-memory references need application/msgpack")
    # the request's size limit holds whatever the transport: what it references counts as its body
    adm.shm_bytes = sum(args[name].nbytes for name in refs)
    size = adm.record.body_bytes + adm.shm_bytes
    if size > adm.body_limit:
        raise ApiError("payload_too_large", f"request of {size} bytes (with its shared-memory tensors) "
                       f"exceeds the limit of {adm.body_limit} bytes")
    pinned: dict[str, Any] = {}

    def region(name: str):
        if name not in pinned:
            pinned[name] = registry.pin(adm.tenant.name, name)
            adm.pins.append(pinned[name])
        return pinned[name]

    for name in refs:
        ref = args[name]
        arr = region_view(region(ref.region), ref, name=name)
        if name not in _IN_PLACE and not (name == "target" and arr.dtype.kind == "f"):
            arr = arr.copy()
        args[name] = arr
    args["grad_out"] = None
    if args["grad_region"] is not None:
        if not args["return_grad"]:
            raise ApiError("bad_request", "grad_region needs return_grad")
        x = args["input"]
        gdt = args["grad_dtype"] or protocol.dtype_name(x.dtype)
        if type(args["grad_offset"]) is not int or args["grad_offset"] < 0:
            raise ApiError("bad_request", "grad_offset must be a non-negative integer")
        try:
            gref = RegionRef(gdt, tuple(x.shape), args["grad_region"], args["grad_offset"])
            parse_ref(ref_map(*gref), name="grad")     # the same checks as any reference
        except protocol.ProtocolError as exc:
            raise ApiError("bad_request", str(exc)) from None
        args["grad_ref"] = gref
        args["grad_out"] = region_view(region(gref.region), gref, name="grad")


# ---- schedule ------------------------------------------------------------------------------------

async def schedule(request: Request, adm: Admission, args: dict[str, Any], body_len: int, reservation=None):
    """The engine's LossResult, or None when the client disconnected first (the job is dropped)."""
    state, settings = adm.state, adm.state.settings
    deadline = None
    if args["deadline_ms"] is not None:
        if not args["deadline_ms"] > 0:
            raise ApiError("bad_request", "deadline_ms must be positive")
        deadline = time.monotonic() + args["deadline_ms"] / 1000.0
    # FIFO runs whole requests: the baseline that chunked fair queueing is measured against
    chunk_s = settings.chunk_ms / 1000.0 if settings.scheduling == "fair" else None
    job = LossJob(args, state.engines, chunk_s=chunk_s,
                  max_batch_elements=settings.batch_max_elements if settings.max_batch > 1 else 0)
    sched_timings: dict = {}
    submit = asyncio.ensure_future(state.scheduler.submit(
        adm.tenant, inflight_bytes(args, body_len), job, deadline=deadline, timings=sched_timings,
        request_bytes=body_len, reservation=reservation))
    if body_len >= WATCH_DISCONNECT_BYTES:
        # Worth cancelling: watch the connection, and drop the job if the client goes. A small
        # job is cheaper to finish than to watch; its result is then dropped harmlessly.
        watcher = asyncio.ensure_future(_disconnected(request))
        try:
            done, _ = await asyncio.wait({submit, watcher}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            watcher.cancel()
        if submit not in done:
            submit.cancel()
            try:
                await submit
            except BaseException:
                pass
            return None
    try:
        result = await submit
    finally:
        # A failed task holds its exception, whose traceback holds this frame and so the task:
        # a cycle that would keep the request's body alive until the collector ran.
        submit = watcher = done = None
    adm.record.stage("queue", sched_timings.get("queue_s", 0.0))
    adm.record.stage("run", sched_timings.get("compute_s", 0.0))   # the job on its worker thread
    adm.record.stage("kernel", result.kernel_seconds)              # of which device time
    adm.record.rows = result.rows
    return result


async def _disconnected(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


# ---- encode --------------------------------------------------------------------------------------

def result_message(result, args: dict[str, Any]) -> dict[str, Any]:
    # The gradient goes first: a receiver finds its offset in the first bytes and places the
    # body so the gradient lands aligned, usable in place.
    out: dict[str, Any] = {}
    if args["return_grad"] and args.get("grad_ref") is not None:   # written into shared memory
        out["grad"] = ref_map(*args["grad_ref"])
    elif args["return_grad"]:
        out["grad"] = result.grad
    out["v"] = protocol.PROTOCOL_VERSION
    out["loss"] = result.loss
    if args["return_lse"]:
        out["lse"] = result.lse
    if args["return_argmax"]:
        out["argmax"] = result.argmax
        if result.accuracy is not None:
            out["accuracy"] = float(result.accuracy)
    if result.z_loss is not None:
        out["z_loss"] = result.z_loss
    if args.get("return_partials"):
        sums = result.block_sums if result.block_sums is not None else np.zeros((0, 4))
        out["partials"] = np.ascontiguousarray(sums[:, :3], np.float64)
    return out


async def encode(result, args: dict[str, Any], adm: Admission, backing) -> Response:
    record = adm.record
    t0 = time.perf_counter()
    # The answer carries no bytes of a shared-memory region (the gradient is already in it, the
    # answer names it), so the regions are let go before it is sent.
    unpin_all(adm)
    msg = result_message(result, args)
    response = await _encoded(msg, result, adm, backing)
    record.stage("encode", time.perf_counter() - t0)
    return response


async def _encoded(msg: dict[str, Any], result, adm: Admission, backing) -> Response:
    record = adm.record
    record.stage("total", time.perf_counter() - record.started)
    headers = {"Server-Timing": protocol.format_server_timing({k: v * 1000 for k, v in record.timings.items()})}
    # Once the response is out, nothing refers to the body or the gradient: back to the pool.
    # (A gradient written over the body is the body's buffer: given back once, with the body.)
    grad = result.grad
    if grad is not None and backing is not None and np.may_share_memory(grad, backing):
        grad = None
    recycle = BackgroundTask(_recycle, backing, grad) if backing is not None or grad is not None else None

    if adm.as_msgpack:
        if sum(v.nbytes for v in msg.values() if isinstance(v, np.ndarray)) <= fastpath.SMALL_BYTES:
            return Response(fastpath.encode_small(msg), media_type=protocol.MSGPACK, headers=headers,
                            background=recycle)
        segments = protocol.encode_message(msg)
        size = protocol.message_nbytes(segments)
        if size <= STREAM_CHUNK:   # one write, no per-chunk threadpool hop
            return Response(b"".join(segments), media_type=protocol.MSGPACK, headers=headers, background=recycle)
        headers["Content-Length"] = str(size)
        return StreamingResponse(_slices(segments), media_type=protocol.MSGPACK, headers=headers,
                                 background=recycle)
    if result.rows > JSON_OUT_THREAD_ROWS:
        payload = await asyncio.to_thread(protocol.message_to_json, msg)
    else:
        payload = protocol.message_to_json(msg)
    return JSONResponse(payload, headers=headers, background=recycle)


def _slices(segments):
    for seg in segments:
        mv = memoryview(seg).cast("B")
        for i in range(0, len(mv), STREAM_CHUNK):
            yield mv[i:i + STREAM_CHUNK]


async def _recycle(*arrays) -> None:
    # async: a sync background task would cost a threadpool hop per response
    for a in arrays:
        POOL.release(a)
