"""POST /v1/cross_entropy: the loss as an operation of the staged endpoint (rails/endpoint.py).

    admit    the tenant's API key, a server that takes work, msgpack or JSON (the rails)
    read     the body into one aligned, pooled buffer, within the size limits (the rails)
    decode   msgpack or JSON into the request's options (clce_wire.options)
    resolve  shared-memory references through the lease; where the gradient goes (the client's
             region, over the body, or a pooled buffer of the lease)
    schedule a LossJob (job.py) through the tenant's fair queue to a device; big requests are
             cancelled if the client goes
    encode   loss, gradient and extras in the request's format, streamed

`route()` declares the endpoint to FastAPI for the OpenAPI document only: its ASGI app is the
`StagedEndpoint` of `CrossEntropy`, and FastAPI's request handling (dependency solving, body
parsing) is not on this path, which a small request would pay for in CPU.
"""

from __future__ import annotations

import asyncio
from typing import Any

import numpy as np
from fastapi.responses import JSONResponse, Response
from fastapi.routing import APIRoute
from pydantic import BaseModel

from clce_wire import fastpath, options, protocol
from clce_wire.shm import RegionRef, ref_map

from ..rails.endpoint import Call, Operation, StagedEndpoint, Work, msgpack_answer, timing_headers, wire_errors
from ..rails.errors import ApiError
from ..rails.lease import RequestLease
from . import layouts
from .job import LossJob, inflight_bytes

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


class CrossEntropy(Operation):
    """The loss: F.cross_entropy's arguments and the request's options in, LossJob's result out."""

    async def decode(self, body: np.ndarray, call: Call) -> dict[str, Any]:
        with wire_errors():
            if call.as_msgpack:
                return options.parse_request(fastpath.decode_small(memoryview(body)))
            if body.nbytes > JSON_IN_THREAD_BYTES:
                return await asyncio.to_thread(lambda: options.parse_request(protocol.loads_json(body), json=True))
            return options.parse_request(protocol.loads_json(body), json=True)

    def resolve(self, args: dict[str, Any], body: np.ndarray, call: Call) -> dict[str, Any]:
        resolve_regions(args, call)
        if args["return_grad"] and args.get("grad_out") is None:
            args["grad_out"] = gradient_over_body(args, body) if call.as_msgpack else None
            if args["grad_out"] is None:
                args["grad_out"] = gradient_buffer(args, call.lease)
        return args

    def work(self, args: dict[str, Any], body: np.ndarray, call: Call) -> Work:
        state, settings = call.state, call.state.settings
        deadline = None
        if args["deadline_ms"] is not None:
            if not args["deadline_ms"] > 0:
                raise ApiError("bad_request", "deadline_ms must be positive")
            deadline = state.scheduler.clock() + args["deadline_ms"] / 1000.0
        # FIFO runs whole requests: the baseline that chunked fair queueing is measured against
        chunk_s = settings.chunk_ms / 1000.0 if settings.scheduling == "fair" else None
        job = LossJob(args, state.engines, chunk_s=chunk_s,
                      max_batch_elements=settings.batch_max_elements if settings.max_batch > 1 else 0)
        # Tensors referenced in shared memory are the client's memory, bounded by the tenant's
        # shared-memory budget when they were registered: only the body and what the server
        # allocates to answer count against max_request_bytes and the in-flight budgets.
        # A small job is cheaper to finish than to watch; if its client went, the answer is
        # dropped harmlessly.
        return Work(job, inflight_bytes(args, body.nbytes), body.nbytes, deadline,
                    watch=body.nbytes + call.lease.shm_bytes >= WATCH_DISCONNECT_BYTES)

    async def encode(self, result, args: dict[str, Any], call: Call) -> Response:
        return await _encoded(result_message(result, args), result, call)


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
    r.app = StagedEndpoint(CrossEntropy())
    return r


# ---- resolve -------------------------------------------------------------------------------------

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


def resolve_regions(args: dict[str, Any], call: Call) -> None:
    """Replace region references (clce_wire.shm.RegionRef) by arrays over the tenant's regions,
    resolved by the request's lease (checked, pinned until the job is over); map `grad_region` to
    `args["grad_out"]`. The logits and probability targets are read where they lie (the client
    may keep writing them: garbage in, garbage out, never out of bounds); class indices and class
    weights are copied out first: they are bounds-checked and then used as indices, and a client
    must not change them in between."""
    refs = [o.name for o in options.OPTIONS if isinstance(args.get(o.name), RegionRef)]
    if not refs and args["grad_region"] is None:
        return
    if not call.as_msgpack:
        raise ApiError("bad_request", "shared-memory references need application/msgpack")
    for name in refs:
        ref = args[name]
        as_indices = name != "input" and not (name == "target" and protocol.numpy_dtype(ref.dtype).kind == "f")
        args[name] = call.lease.resolve(ref, what=name, copy=as_indices)
    args["grad_out"] = None
    if args["grad_region"] is not None:
        if not args["return_grad"]:
            raise ApiError("bad_request", "grad_region needs return_grad")
        x = args["input"]
        gdt = args["grad_dtype"] or protocol.dtype_name(x.dtype)
        args["grad_ref"], args["grad_out"] = call.lease.output("grad", gdt, x.shape, args["grad_region"],
                                                               args["grad_offset"])


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


async def _encoded(msg: dict[str, Any], result, call: Call) -> Response:
    headers = timing_headers(call.record)
    # The body and the gradient stay the lease's until the response is out (LeasedEndpoint).
    if call.as_msgpack:
        return msgpack_answer(msg, headers)
    if result.rows > JSON_OUT_THREAD_ROWS:
        payload = await asyncio.to_thread(protocol.message_to_json, msg)
    else:
        payload = protocol.message_to_json(msg)
    return JSONResponse(payload, headers=headers)
