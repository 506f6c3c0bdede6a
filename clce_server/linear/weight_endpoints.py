"""The weight store's endpoints (weights.py), on the same admit and read rails as the operations:

  PUT    /v1/weights/{name}        {weight_version, weight, bias?}: store a weight version
  POST   /v1/weights/{name}/grad   {weight_version}: the accumulated gradients, taken once
  DELETE /v1/weights/{name}

msgpack only; their fields are declared in clce_wire.options (`WEIGHT_PUT_OPTIONS`,
`WEIGHT_GRAD_OPTIONS`). Each is a `HandlerEndpoint`: a request owns a record and a lease (its byte
reservation, taken before the body is read; its pins on shared-memory regions), all given back
once the answer is out. A PUT's weight and bias may be region references (stored as references;
each request that uses them resolves them through its own lease); `grad_weight_region` places a
taken gradient in the client's region.
"""

from __future__ import annotations

import asyncio
from typing import Any

import numpy as np
from fastapi.responses import Response
from fastapi.routing import APIRoute

from clce_wire import options, protocol
from clce_wire.shm import RegionRef, ref_map

from ..rails.endpoint import Call, HandlerEndpoint, decode_fields, msgpack_answer, read, timing_headers
from ..rails.errors import ApiError, ArgumentError
from .engine import LINEAR_DTYPES
from .operation import ANSWERS, MSGPACK_BODY
from .weights import check_name


def _reserve(call: Call, first: str | None = None):
    """The body's bytes, the tenant's least recently used stored weights making room for them
    (`first`: an upload's own old version, which it replaces)."""
    store, scheduler, tenant = call.state.weight_store, call.state.scheduler, call.tenant
    return lambda nbytes: store.making_room(tenant, lambda: scheduler.reserve(tenant, nbytes), first=first)


class _ThenRelease:
    """A response that gives its reservation back once it has been sent (or given up): a flush's
    gradient counts against the budgets until then, not only while it was accumulated."""

    def __init__(self, response, reservation):
        self.response, self.reservation = response, reservation

    def __getattr__(self, name):
        return getattr(self.response, name)

    async def __call__(self, scope, receive, send) -> None:
        try:
            await self.response(scope, receive, send)
        finally:
            self.reservation.release()


# ---- PUT /v1/weights/{name} ----------------------------------------------------------------------

async def put_weight(call: Call) -> Response:
    name = call.request.path_params["name"]
    check_name(name)             # before its body is read
    # The body in a buffer of its own, not the lease's pooled one: the stored weight keeps viewing
    # it for as long as it is stored (no copy of what may be the largest tensor of the model).
    body = await read(call, _reserve(call, first=name), pooled=False)
    msg = decode_fields(body, options.WEIGHT_PUT_OPTIONS)
    version = msg["weight_version"]
    parts = {"weight": msg["weight"], "bias": msg["bias"]}
    # references: checked against their regions' bounds (pinned for this request only)
    arrays = {k: call.lease.resolve(v, what=k) if isinstance(v, RegionRef) else v for k, v in parts.items()}
    weight, bias = arrays["weight"], arrays["bias"]
    # what the operation cannot use is refused now, not at its first use
    if weight.ndim != 2:
        raise ArgumentError(RuntimeError(f"weight must be 2-D (vocabulary, hidden), got shape {list(weight.shape)}"))
    if 0 in weight.shape:
        raise ArgumentError(RuntimeError(f"fused linear cross-entropy needs a weight with rows and columns, "
                                         f"got shape {list(weight.shape)}"))
    dtype = protocol.dtype_name(weight.dtype)
    if dtype not in LINEAR_DTYPES:
        raise ArgumentError(RuntimeError(f"fused linear cross-entropy runs float32, bfloat16 and float16 weights, "
                                         f"got {dtype}"))
    if bias is not None and (bias.shape != (weight.shape[0],) or bias.dtype != weight.dtype):
        raise ArgumentError(RuntimeError(f"bias must be a ({weight.shape[0]},) tensor of the weight's dtype"))
    # Inline parts are aligned once here (a tensor in a msgpack body may start at any byte), not
    # on every call. Region parts are stored as their references, with no pin held: each call
    # pins and views them again (WeightStore.resolve).
    stored = {k: parts[k] if isinstance(parts[k], RegionRef) else np.require(arrays[k], requirements=("C", "A"))
              for k in parts if parts[k] is not None}
    store = call.state.weight_store
    store.put(call.tenant, name, version, stored["weight"], stored.get("bias"), regions=call.lease.pinned(),
              body=call.lease.reservation if any(isinstance(v, np.ndarray) for v in stored.values()) else None)
    store.keep_sweeping(asyncio.get_running_loop())
    call.lease.unpin()
    return msgpack_answer({"v": protocol.PROTOCOL_VERSION, "weight_name": name, "weight_version": version,
                           "instance": store.instance}, timing_headers(call.record))


# ---- POST /v1/weights/{name}/grad ----------------------------------------------------------------

async def take_grad(call: Call) -> Response:
    name = call.request.path_params["name"]
    msg = decode_fields(await read(call, _reserve(call)), options.WEIGHT_GRAD_OPTIONS)
    version = msg["weight_version"]
    store = call.state.weight_store
    entry = store.get(call.tenant, name, version)
    ref = dest = None
    if msg["grad_weight_region"] is not None:
        # checked before the gradient is taken: a refused region must not lose it
        ref, dest = call.lease.output("grad_weight", "float32", entry.shape, msg["grad_weight_region"],
                                      msg["grad_weight_offset"])
    # A job accumulating into the version holds its lock across its chunks: waited for here
    # without blocking the event loop (the job wakes this request when it lets go).
    await entry.acquire()
    try:
        if not store.current(entry):      # replaced, evicted or expired while this waited
            raise ApiError("weight_not_stored", f"weight {name!r} version {version!r} was dropped while its gradient was "
                           "being taken (replaced, evicted or expired); upload it again")
        accumulation = entry.accumulation
        gw, gb, n, charge = store.take_grad(entry)
    finally:
        entry.release()
    out: dict[str, Any] = {"v": protocol.PROTOCOL_VERSION, "micro_batches": n, "instance": store.instance,
                           "accumulation": accumulation}
    try:
        if gw is not None:
            if dest is not None:
                await asyncio.to_thread(np.copyto, dest, gw)   # (V, H) floats: off the event loop
                out["grad_weight"] = ref_map(*ref)
            else:
                out["grad_weight"] = gw
            if gb is not None:
                out["grad_bias"] = gb
        call.lease.unpin()
        answer = msgpack_answer(out, timing_headers(call.record))
    except BaseException:
        if charge is not None:
            charge.release()
        raise
    if charge is None:
        return answer
    if dest is not None:                 # in the client's region now: the accumulators can go
        out = gw = gb = None
        charge.release()
        return answer
    return _ThenRelease(answer, charge)  # counted until the gradient has left


# ---- DELETE /v1/weights/{name} -------------------------------------------------------------------

async def delete_weight(call: Call) -> Response:
    name = call.request.path_params["name"]
    check_name(name)
    if not call.state.weight_store.delete(call.tenant, name):
        raise ApiError("not_found", f"no weight {name!r} is stored")
    return Response(status_code=204)


def routes() -> list[APIRoute]:
    """The three endpoints; each route's ASGI app is its HandlerEndpoint (FastAPI's request
    handling, dependency solving and body parsing, is not on the path)."""

    async def put_weight_operation(name: str) -> None:   # pragma: no cover  (never called)
        """Store a weight version (inline, or region references) for the linear cross-entropy."""

    async def take_grad_operation(name: str) -> None:   # pragma: no cover
        """Take a stored weight version's accumulated gradients (once)."""

    async def delete_weight_operation(name: str) -> None:   # pragma: no cover
        """Drop a stored weight."""

    table = [
        ("/v1/weights/{name}", "PUT", put_weight_operation, put_weight, True,
         "Store a weight version for the linear cross-entropy"),
        ("/v1/weights/{name}/grad", "POST", take_grad_operation, take_grad, True,
         "Take a stored weight version's accumulated gradients"),
        ("/v1/weights/{name}", "DELETE", delete_weight_operation, delete_weight, False, "Drop a stored weight"),
    ]
    out = []
    for path, method, operation, handler, reads_body, summary in table:
        r = APIRoute(path, operation, methods=[method], name=handler.__name__, summary=summary,
                     tags=["linear cross-entropy"], openapi_extra=MSGPACK_BODY if reads_body else None,
                     responses=ANSWERS, status_code=204 if method == "DELETE" else None)
        r.app = HandlerEndpoint(handler, reads_body=reads_body)
        out.append(r)
    return out
