"""POST /v1/cross_entropy: one endpoint, as named stages.

    admit    the tenant's API key, a server that takes work, a format we speak (deps.py)
    read     read_body: the body into one aligned, pooled buffer, within the size limits
    decode   decode: msgpack or JSON into the request's options (clce_wire.options)
    schedule schedule: a LossJob through the tenant's fair queue to a device; cancelled if the
             client goes
    encode   encode: loss, gradient and extras in the request's format, streamed

`LossEndpoint` is the route's ASGI app (a `leased.LeasedEndpoint`): it makes the request's record
and lease, runs the stages with a typed context (`LossRequest`), renders any failure through
`responses.error_for`, sends the answer, then closes the lease and publishes the record, once. `route()` declares it to
FastAPI for the OpenAPI document only: FastAPI's request handling (dependency solving, body
parsing) is not on this path, which a small request would pay for in CPU.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
from fastapi import Request
from fastapi.responses import JSONResponse, Response
from fastapi.routing import APIRoute
from pydantic import BaseModel

from clce_wire import fastpath, options, protocol
from clce_wire.shm import RegionRef, parse_ref, ref_map

from . import layouts
from ..rails.deps import check_ready, tenant_for
from ..rails.errors import ApiError, ArgumentError
from .job import LossJob, inflight_bytes
from ..rails.lease import RequestLease
from ..rails.recording import RequestRecord
from ..rails.shm import view as region_view
from ..state import ServerState
from ..tenants import Tenant
from ..rails import endpoint as leased
from ..rails.endpoint import LeasedEndpoint, msgpack_answer, receive_body, timing_headers, unless_disconnected

PATH = "/v1/cross_entropy"


class CrossEntropyResponse(BaseModel):
    """The JSON form of the answer (msgpack carries the same keys, tensors as binary)."""

    loss: float | list[Any] | str
    grad: list[Any] | None = None
    lse: list[Any] | None = None
    argmax: list[Any] | None = None
    accuracy: float | None = None
    z_loss: float | list[Any] | None = None
    partials: list[Any] | None = None

WATCH_DISCONNECT_BYTES = 1 << 16  # requests at least this big are cancelled when the client goes
JSON_IN_THREAD_BYTES = 1 << 20  # JSON bodies bigger than this are parsed off the event loop
JSON_OUT_THREAD_ROWS = 4096     # and JSON answers with more rows are rendered off it


@dataclass
class LossRequest:
    """One loss request as the stages see it: established by `admit`."""

    request: Request
    state: ServerState
    tenant: Tenant
    lease: RequestLease            # owns what the request holds; closed by the endpoint
    as_msgpack: bool
    body_limit: int
    shm_bytes: int = 0             # bytes of the tensors it references in shared memory

    @property
    def record(self) -> RequestRecord:
        return self.lease.record


class LossEndpoint(LeasedEndpoint):
    """The ASGI app of POST /v1/cross_entropy."""

    async def handle(self, request: Request, state: ServerState, lease: RequestLease) -> Response:
        return await cross_entropy(admit(request, state, lease))


def route() -> APIRoute:
    """The endpoint as FastAPI's router and OpenAPI document know it."""

    async def cross_entropy_operation() -> CrossEntropyResponse:   # pragma: no cover  (never called)
        """Loss and gradient of torch.nn.functional.cross_entropy (msgpack or JSON body)."""

    r = APIRoute(
        PATH, cross_entropy_operation, methods=["POST"], name="cross_entropy",
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
    r.app = LossEndpoint()
    return r


# ---- admit ---------------------------------------------------------------------------------------

def admit(request: Request, state: ServerState, lease: RequestLease) -> LossRequest:
    headers = request.headers
    tenant = tenant_for(state, headers.get("authorization"))
    lease.record.tenant = tenant.name
    check_ready(state)
    ctype = headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype not in (protocol.MSGPACK, protocol.JSON):
        raise ApiError("unsupported_media_type",
                       f"Content-Type must be {protocol.MSGPACK} or {protocol.JSON}, got {ctype or 'none'!r}")
    return LossRequest(request, state, tenant, lease, ctype == protocol.MSGPACK,
                       min(state.settings.max_request_bytes, tenant.max_request_bytes))


async def cross_entropy(req: LossRequest) -> Response:
    record = req.record
    # The body's bytes count against the in-flight budgets from before it is read until the
    # response has gone out (the lease gives them back): a burst is answered 429 before its
    # bodies are in memory, and peak memory stays near max_inflight_bytes + the host pool.
    req.lease.hold(req.state.scheduler.reserve(req.tenant, announced_length(req)))
    t0 = time.perf_counter()
    body = await read_body(req)
    record.stage("body", time.perf_counter() - t0)
    record.body_bytes = body.nbytes
    args = await decode(body, req)
    # Tensors referenced in shared memory are the client's memory, bounded by the tenant's
    # shared-memory budget when they were registered: only the body and what the server allocates
    # to answer count against max_request_bytes and the in-flight budgets (jobs.inflight_bytes).
    result = await schedule(req, args, body.nbytes)
    if result is None:                     # the client left; nobody to answer
        record.outcome = "cancelled"
        return Response(status_code=499)
    return await encode(result, args, req)


def announced_length(req: LossRequest) -> int:
    return leased.announced_length(req.request, req.body_limit)


# ---- read ----------------------------------------------------------------------------------------

async def read_body(req: LossRequest) -> np.ndarray:
    """The body in one writable buffer, placed so its first tensor is aligned (it is decoded in
    place: tensors are views into it, and the CPU device computes on them directly); a pooled
    buffer of the request's lease when Content-Length says how big."""
    return await receive_body(req.request, req.body_limit, req.lease.buffer)


# ---- decode --------------------------------------------------------------------------------------

async def decode(body: np.ndarray, req: LossRequest) -> dict[str, Any]:
    t0 = time.perf_counter()
    try:
        if req.as_msgpack:
            args = options.parse_request(fastpath.decode_small(memoryview(body)))
        elif body.nbytes > JSON_IN_THREAD_BYTES:
            args = await asyncio.to_thread(lambda: options.parse_request(protocol.loads_json(body), json=True))
        else:
            args = options.parse_request(protocol.loads_json(body), json=True)
    except protocol.RefusedArgument as exc:   # a value torch refuses too: its type and message
        raise ArgumentError(exc.error) from None
    except protocol.ProtocolError as exc:     # loads_json and decode_message raise only this
        raise ApiError("bad_request", f"malformed request: {exc}") from None
    resolve_regions(args, req)
    if args["return_grad"] and args.get("grad_out") is None:
        args["grad_out"] = gradient_over_body(args, body) if req.as_msgpack else None
        if args["grad_out"] is None:
            args["grad_out"] = gradient_buffer(args, req.lease)
    req.record.stage("decode", time.perf_counter() - t0)
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


def gradient_buffer(args: dict[str, Any], lease: RequestLease) -> np.ndarray | None:
    """A pooled buffer of the request's lease for its gradient: the input's shape in the gradient's
    dtype. None, for the engine to allocate an array of its own, when the pool would not pool it
    (small: a coalesced launch computes it elsewhere anyway) or the input is not floating point
    (the engine refuses it as PyTorch would)."""
    x = args["input"]
    name = args["grad_dtype"] or protocol.dtype_name(x.dtype)
    if not isinstance(x, np.ndarray) or name not in _GRAD_DTYPES:
        return None
    dtype = protocol.numpy_dtype(name)
    if x.size * dtype.itemsize < lease.pool.min_bytes:
        return None
    return lease.array(x.shape, dtype)


_GRAD_DTYPES = frozenset(("float32", "float64", "float16", "bfloat16"))


# Tensors used where they lie in shared memory (the client may keep writing them: garbage in,
# garbage out, never out of bounds). Class indices and weights are copied out first: they are
# bounds-checked and then used as indices, and a client must not change them in between.
_IN_PLACE = frozenset(("input",))


def resolve_regions(args: dict[str, Any], req: LossRequest) -> None:
    """Replace region references (clce_wire.shm.RegionRef) by arrays over the tenant's regions,
    checked and pinned until the response is out; map `grad_region` to `args["grad_out"]`."""
    refs = [o.name for o in options.OPTIONS if isinstance(args.get(o.name), RegionRef)]
    if not refs and args["grad_region"] is None:
        return
    if req.state.shm_registry is None:
        raise ApiError("bad_request", "this server does not allow shared memory (see /v1/info)")
    if not req.as_msgpack:
        raise ApiError("bad_request", "shared-memory references need application/msgpack")
    # Not a request body: what it references lies in the tenant's registered regions, counted
    # against its shared-memory budget (shm_max_bytes) when they were registered.
    req.shm_bytes = sum(args[name].nbytes for name in refs)
    pinned: dict[str, Any] = {}

    def region(name: str):
        if name not in pinned:
            pinned[name] = req.lease.pin(req.tenant.name, name)
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

async def schedule(req: LossRequest, args: dict[str, Any], body_len: int):
    """The engine's LossResult, or None when the client disconnected first (the job is dropped)."""
    state, settings, record = req.state, req.state.settings, req.record
    scheduler = state.scheduler
    deadline = None
    if args["deadline_ms"] is not None:
        if not args["deadline_ms"] > 0:
            raise ApiError("bad_request", "deadline_ms must be positive")
        deadline = scheduler.clock() + args["deadline_ms"] / 1000.0
    # FIFO runs whole requests: the baseline that chunked fair queueing is measured against
    chunk_s = settings.chunk_ms / 1000.0 if settings.scheduling == "fair" else None
    job = LossJob(args, state.engines, chunk_s=chunk_s,
                  max_batch_elements=settings.batch_max_elements if settings.max_batch > 1 else 0)
    timings: dict = {}
    submit = scheduler.submit(req.tenant, inflight_bytes(args, body_len), job, deadline=deadline,
                              timings=timings, request_bytes=body_len, reservation=req.lease.reservation)
    if body_len + req.shm_bytes < WATCH_DISCONNECT_BYTES:
        # A small job is cheaper to finish than to watch; if its client went, the answer is
        # dropped harmlessly.
        result = await submit
    else:
        result = await unless_disconnected(submit, req.request)
        if result is None:
            return None
    record.stage("queue", timings.get("queue_s", 0.0))
    record.stage("run", timings.get("compute_s", 0.0))   # the job on its worker thread
    record.stage("kernel", result.kernel_seconds)        # of which device time
    record.rows = result.rows
    return result


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
    elif args.get("return_z_loss"):   # asked for: zeros, the z-loss of lse_square_scale 0 (Liger's)
        out["z_loss"] = np.zeros(np.shape(result.loss), np.float32)
    if args.get("return_partials"):
        sums = result.block_sums if result.block_sums is not None else np.zeros((0, 4))
        out["partials"] = np.ascontiguousarray(sums[:, :3], np.float64)
    return out


async def encode(result, args: dict[str, Any], req: LossRequest) -> Response:
    record = req.record
    t0 = time.perf_counter()
    # The answer carries no bytes of a shared-memory region (the gradient is already in it, the
    # answer names it), so the regions are let go before it is sent.
    req.lease.unpin()
    msg = result_message(result, args)
    response = await _encoded(msg, result, req)
    record.stage("encode", time.perf_counter() - t0)
    return response


async def _encoded(msg: dict[str, Any], result, req: LossRequest) -> Response:
    headers = timing_headers(req.record)
    # The body and the gradient stay the lease's until the response is out (LeasedEndpoint).
    if req.as_msgpack:
        return msgpack_answer(msg, headers)
    if result.rows > JSON_OUT_THREAD_ROWS:
        payload = await asyncio.to_thread(protocol.message_to_json, msg)
    else:
        payload = protocol.message_to_json(msg)
    return JSONResponse(payload, headers=headers)
