"""The fused linear cross-entropy endpoints: hidden states in, loss and gradients out.

  PUT    /v1/weights/{name}        {weight_version, weight, bias?}: store a weight version (weights.py)
  POST   /v1/linear_cross_entropy  {hidden, target, weight_name + weight_version | weight (+ bias),
                                    options...}: loss, z_loss, grad_hidden; the weight's and bias's
                                    gradients answered (stateless: `accumulate` false) or added
                                    to the stored version's accumulators (`accumulate` true)
  POST   /v1/weights/{name}/grad   {weight_version}: the accumulated gradients, taken once
  DELETE /v1/weights/{name}

msgpack only (docs/protocol.md, "Fused linear cross-entropy"). Each endpoint is a
`leased.LeasedEndpoint`, as the loss endpoint is: a request owns a RequestRecord and a
RequestLease (its byte reservation, taken before the body is read; its pooled body and
hidden-gradient buffers; its pins on shared-memory regions), all given back once the answer is
out, or when a job still computing into them ends. The stages: the API key names a tenant, the
server must take work, the body is read against the tenant's size limit, arguments fail with
PyTorch's exception type and message (400), the work goes through the scheduler's fair queue to a
device thread (clce_server/linear/engine.py, a chunk per step), and the answer leaves by
`leased.msgpack_answer`.

Shared memory: any tensor of a POST (hidden, target, weight, bias, class_weight) or of a PUT
(weight, bias) may be a region reference. hidden, weight and bias are used where they lie (a
client changing them meanwhile gets garbage, never an out-of-bounds read); target and
class_weight are copied out first (they are bounds-checked, then used as indices). `grad_region`
places the hidden's gradient, `grad_weight_region` the weight's: a stateless call's, or the
accumulated one that POST .../grad takes.
"""

from __future__ import annotations

import asyncio
import errno
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable

import numpy as np
from fastapi import Request
from fastapi.responses import Response
from fastapi.routing import APIRoute

from clce_wire import fastpath, protocol
from clce_wire import options as wire_options
from clce_wire.shm import RegionRef, is_ref_map, parse_ref, ref_map

from ..rails.deps import check_ready, tenant_for
from ..rails.errors import ApiError, ArgumentError
from ..rails.lease import RequestLease
from .engine import LINEAR_DTYPES, LinearCrossEntropy, check
from ..rails.recording import RequestRecord
from ..rails.scheduler import FunctionJob
from ..rails.shm import Region
from ..rails.shm import view as region_view
from ..state import ServerState
from ..tenants import Tenant
from .weights import IDLE_S, MAX_ENTRIES, NO_MEMORY, WeightStore, accumulator_bytes, check_name, no_memory
from ..rails.endpoint import (LeasedEndpoint, announced_length, msgpack_answer, receive_body, timing_headers,
                     unless_disconnected)

#: the request's options: the loss request's of these names (clce_wire.options.OPTIONS), with
#: their defaults and wire types from there
LOSS_OPTIONS = ("ignore_index", "reduction", "label_smoothing", "lse_square_scale", "softcap", "shift",
                "return_lse", "return_argmax")
OPTION_DEFAULTS: dict[str, Any] = {name: wire_options.OPTION_BY_NAME[name].default for name in LOSS_OPTIONS}
_WIRE_TYPES = {"int": (int,), "str": (str,), "bool": (bool,), "float": (float, int)}
_OPTION_TYPES = {name: _WIRE_TYPES[wire_options.OPTION_BY_NAME[name].kind] for name in LOSS_OPTIONS}
#: grad_output: autograd's per-row grad_output of a 'none' loss (the gradients are computed for it)
TENSORS = ("hidden", "target", "weight", "bias", "class_weight", "grad_output")
# copied out of shared memory before they are checked: bounds-checked, then used as indices
_COPIED = frozenset(("target", "class_weight"))
FIELDS = frozenset({"v", *TENSORS, "weight_name", "weight_version", "accumulate", "want_grad", "grad_region",
                    "grad_offset", "grad_weight_region", "grad_weight_offset", *OPTION_DEFAULTS})
PUT_FIELDS = frozenset({"v", "weight_version", "weight", "bias"})
GRAD_FIELDS = frozenset({"v", "weight_version", "grad_weight_region", "grad_weight_offset"})
WATCH_DISCONNECT_BYTES = 1 << 16  # stateless requests at least this big are cancelled when the client goes
CHUNK_ROWS = 1024                 # LinearCrossEntropy's rows per chunk: one (chunk, V) fp32 buffer

_store_lock = threading.Lock()


def weight_store(state: ServerState) -> WeightStore:
    """The server's weight store (made on first use; it lives as long as the state)."""
    with _store_lock:
        store = getattr(state, "weight_store", None)
        if store is None:
            settings = state.settings
            store = state.weight_store = WeightStore(
                state.scheduler, max_entries=getattr(settings, "max_stored_weights", MAX_ENTRIES),
                idle_s=getattr(settings, "weight_idle_s", IDLE_S), instance=state.instance_id)
        return store


def _for_engine(engine) -> LinearCrossEntropy:
    return LinearCrossEntropy.for_engine(engine)   # built and warmed at start-up (state.open_devices)


class _Scratch:
    """A request's scratch buffers, taken from its lease's pool before its job runs; the job's
    LinearCrossEntropy.steps asks for them by shape (anything else: a plain allocation, reserved
    with them by LinearCrossEntropy.work_bytes)."""

    def __init__(self, lease, shapes):
        self._free: dict[tuple, list[np.ndarray]] = {}
        for shape, dtype in shapes:
            self._free.setdefault((tuple(shape), np.dtype(dtype)), []).append(lease.array(shape, dtype))

    def take(self, shape, dtype) -> np.ndarray:
        kept = self._free.get((tuple(shape), np.dtype(dtype)))
        return kept.pop() if kept else np.empty(shape, dtype)


def _allocating(nbytes: int, make: Callable[[], Any]) -> Any:
    """`make()`, whose allocations the budgets allowed: one the OS refuses anyway answers 503 with
    Retry-After (the host is short of memory now), never 500."""
    try:
        return make()
    except NO_MEMORY as exc:
        raise no_memory(nbytes, exc) from None
    except OSError as exc:
        if exc.errno in (errno.ENOMEM, errno.EAGAIN):   # mmap's answer for a pool buffer
            raise no_memory(nbytes, exc) from None
        raise


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


# ---- admit ---------------------------------------------------------------------------------------

@dataclass
class LinearRequest:
    """One request of these endpoints as the stages see it: established by `admit`."""

    request: Request
    state: ServerState
    tenant: Tenant
    lease: RequestLease            # owns what the request holds; closed by the endpoint
    body_limit: int
    shm_bytes: int = 0             # bytes of the tensors it references in shared memory
    copied_bytes: int = 0          # of which copied out of it (checked, then used as indices)
    pinned: dict[str, Region] = field(default_factory=dict)   # region name -> pinned through the lease

    @property
    def record(self) -> RequestRecord:
        return self.lease.record

    def pin(self, region_name: str) -> Region:
        """The tenant's region of that name, pinned (once per request) until the lease lets go."""
        _require_shm(self)
        region = self.pinned.get(region_name)
        if region is None:
            region = self.pinned[region_name] = self.lease.pin(self.tenant.name, region_name)
        return region

    def unpin(self) -> None:
        """The job is over and the answer carries no bytes of a region: let them go now."""
        self.pinned.clear()
        self.lease.unpin()


def admit(request: Request, state: ServerState, lease: RequestLease, reads_body: bool = True) -> LinearRequest:
    headers = request.headers
    tenant = tenant_for(state, headers.get("authorization"))
    lease.record.tenant = tenant.name
    check_ready(state)
    if reads_body:
        ctype = headers.get("content-type", "").split(";")[0].strip().lower()
        if ctype != protocol.MSGPACK:
            raise ApiError("unsupported_media_type",
                           f"Content-Type must be {protocol.MSGPACK}, got {ctype or 'none'!r}")
    return LinearRequest(request, state, tenant, lease, min(state.settings.max_request_bytes, tenant.max_request_bytes))


class LinearEndpoint(LeasedEndpoint):
    """One of this module's endpoints: admit, then its handler."""

    def __init__(self, handler: Callable[[LinearRequest], Awaitable[Response]], reads_body: bool = True):
        self.handler = handler
        self.reads_body = reads_body

    async def handle(self, request: Request, state: ServerState, lease: RequestLease):
        return await self.handler(admit(request, state, lease, self.reads_body))


# ---- read and decode -----------------------------------------------------------------------------

async def read_message(req: LinearRequest, fields: frozenset, *, pooled: bool = True,
                       replacing: str | None = None) -> tuple[dict, np.ndarray]:
    """The decoded message and its body. The body's bytes are reserved against the in-flight
    budgets before it is read (a burst is answered 429 before its bodies are in memory) and stay
    so until the lease closes. `pooled`: the body in the lease's pooled buffer; else in one of its
    own (a stored weight keeps viewing it)."""
    record = req.record
    # the tenant's least recently used stored weights make room for the body when its budget is full
    nbytes = announced_length(req.request, req.body_limit)
    # (an upload's own old version first: it is being replaced)
    req.lease.hold(weight_store(req.state).making_room(
        req.tenant, lambda: req.state.scheduler.reserve(req.tenant, nbytes), first=replacing))
    t0 = time.perf_counter()
    body = await receive_body(req.request, req.body_limit, req.lease.buffer if pooled else None)
    record.stage("body", time.perf_counter() - t0)
    record.body_bytes = body.nbytes
    try:
        msg = fastpath.decode_small(memoryview(body))
    except protocol.ProtocolError as exc:
        raise ApiError("bad_request", f"malformed request: {exc}") from None
    unknown = sorted(set(msg) - fields)
    if unknown:
        raise ApiError("bad_request", f"unknown request field {unknown[0]!r}")
    v = msg.get("v", protocol.PROTOCOL_VERSION)
    if type(v) is not int or v != protocol.PROTOCOL_VERSION:
        raise ApiError("bad_request", f"unsupported protocol version {v!r}; this server speaks version "
                                      f"{protocol.PROTOCOL_VERSION}")
    return msg, body


def _tensor(msg: dict[str, Any], name: str, required: bool = False) -> np.ndarray | RegionRef | None:
    """An inline tensor (a view of the body) or a shared-memory reference; None when absent."""
    value = msg.get(name)
    if value is None:
        if required:
            raise ApiError("bad_request", f"missing request field {name!r}")
        return None
    try:
        if is_ref_map(value):
            return parse_ref(value, name=name)
        return protocol.decode_tensor(value, name=name)
    except protocol.ProtocolError as exc:
        raise ApiError("bad_request", f"malformed request: {exc}") from None


def _field(msg: dict[str, Any], name: str, types: tuple, default: Any) -> Any:
    value = msg.get(name, default)
    if value is not None and type(value) not in types:
        raise ApiError("bad_request", f"{name}: expected {' or '.join(t.__name__ for t in types)}, "
                                      f"got {type(value).__name__}")
    return value


def _required_version(msg: dict[str, Any]) -> str:
    version = _field(msg, "weight_version", (str,), None)
    if version is None:
        raise ApiError("bad_request", "missing request field 'weight_version'")
    return version


# ---- shared memory -------------------------------------------------------------------------------

def _require_shm(req: LinearRequest) -> None:
    if req.state.shm_registry is None:
        raise ApiError("bad_request", "this server does not allow shared memory (see /v1/info)")


def resolve_regions(req: LinearRequest, tensors: dict[str, Any]) -> dict[str, Any]:
    """`tensors` with each region reference replaced by an array over the tenant's region, checked
    against its bounds and pinned until the lease lets go. Not a request body, as on the loss
    path: what they reference is the client's memory, bounded by the tenant's shared-memory budget
    when it was registered; only the copies made here (`copied_bytes`) are the server's."""
    refs = [name for name, value in tensors.items() if isinstance(value, RegionRef)]
    if not refs:
        return tensors
    _require_shm(req)
    req.shm_bytes = sum(tensors[name].nbytes for name in refs)
    req.copied_bytes = sum(tensors[name].nbytes for name in refs if name in _COPIED)
    out = dict(tensors)
    for name in refs:
        ref = tensors[name]
        arr = region_view(req.pin(ref.region), ref, name=name)
        out[name] = arr.copy() if name in _COPIED else arr
    return out


def output_region(req: LinearRequest, what: str, region: str, offset: Any, dtype: str,
                  shape: tuple[int, ...]) -> tuple[RegionRef, np.ndarray]:
    """Where a gradient `what` goes in the tenant's region: the reference the answer names, and the
    writable array over it (pinned; checked as any reference is, and refused in a read-only region)."""
    _require_shm(req)
    if type(offset) is not int or offset < 0:
        raise ApiError("bad_request", f"{what}: the offset must be a non-negative integer, got {offset!r}")
    try:
        ref = parse_ref(ref_map(dtype, shape, region, offset), name=what)
    except protocol.ProtocolError as exc:
        raise ApiError("bad_request", str(exc)) from None
    pinned = req.pin(ref.region)
    if pinned.read_only:
        raise ApiError("bad_request", f"{what}: region {ref.region!r} is read-only (sealed against writes, or "
                       "passed read-only): it cannot take the gradient")
    return ref, region_view(pinned, ref, name=what)


# ---- PUT /v1/weights/{name} ----------------------------------------------------------------------

async def put_weight(req: LinearRequest) -> Response:
    name = req.request.path_params["name"]
    check_name(name)             # before its body is read
    # The body in a buffer of its own, not the lease's pooled one: the stored weight keeps viewing
    # it for as long as it is stored (no copy of what may be the largest tensor of the model).
    msg, _ = await read_message(req, PUT_FIELDS, pooled=False, replacing=name)
    version = _required_version(msg)
    parts = {"weight": _tensor(msg, "weight", required=True), "bias": _tensor(msg, "bias")}
    arrays = resolve_regions(req, parts)     # references: checked against their regions' bounds
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
    store = weight_store(req.state)
    store.put(req.tenant, name, version, stored["weight"], stored.get("bias"), regions=dict(req.pinned),
              body=req.lease.reservation if any(isinstance(v, np.ndarray) for v in stored.values()) else None)
    store.keep_sweeping(asyncio.get_running_loop())
    req.unpin()
    return msgpack_answer({"v": protocol.PROTOCOL_VERSION, "weight_name": name, "weight_version": version,
                           "instance": store.instance}, timing_headers(req.record))


# ---- POST /v1/weights/{name}/grad ----------------------------------------------------------------

async def take_grad(req: LinearRequest) -> Response:
    name = req.request.path_params["name"]
    msg, _ = await read_message(req, GRAD_FIELDS)
    version = _required_version(msg)
    region = _field(msg, "grad_weight_region", (str,), None)
    store = weight_store(req.state)
    entry = store.get(req.tenant, name, version)
    ref = dest = None
    if region is not None:
        # checked before the gradient is taken: a refused region must not lose it
        ref, dest = output_region(req, "grad_weight", region, _field(msg, "grad_weight_offset", (int,), 0),
                                  "float32", entry.shape)
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
        req.unpin()
        answer = msgpack_answer(out, timing_headers(req.record))
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

async def delete_weight(req: LinearRequest) -> Response:
    name = req.request.path_params["name"]
    check_name(name)
    if not weight_store(req.state).delete(req.tenant, name):
        raise ApiError("not_found", f"no weight {name!r} is stored")
    return Response(status_code=204)


# ---- POST /v1/linear_cross_entropy ---------------------------------------------------------------

async def linear_cross_entropy(req: LinearRequest) -> Response:
    state, record = req.state, req.record
    msg, body = await read_message(req, FIELDS)
    t0 = time.perf_counter()
    tensors = {name: _tensor(msg, name, required=name in ("hidden", "target")) for name in TENSORS}
    accumulate = bool(_field(msg, "accumulate", (bool,), False))
    want_grad = bool(_field(msg, "want_grad", (bool,), True))
    opts = {name: _field(msg, name, _OPTION_TYPES[name], default) for name, default in OPTION_DEFAULTS.items()}
    grad_region = _field(msg, "grad_region", (str,), None)
    gw_region = _field(msg, "grad_weight_region", (str,), None)
    store = weight_store(state)
    stored = None
    if msg.get("weight_name") is not None:
        name = _field(msg, "weight_name", (str,), None)
        version = _field(msg, "weight_version", (str,), None)
        if version is None:
            raise ApiError("bad_request", "weight_name needs weight_version")
        if tensors["weight"] is not None or tensors["bias"] is not None:
            raise ApiError("bad_request", "send a stored weight (weight_name, weight_version) or the weight "
                                          "itself (weight, bias), not both")
        stored = store.get(req.tenant, name, version)
    else:
        if tensors["weight"] is None:
            raise ApiError("bad_request", "missing request field 'weight'")
        if accumulate:
            raise ApiError("bad_request", "accumulate needs a stored weight (weight_name, weight_version)")
    accumulating = stored is not None and accumulate and want_grad
    if not want_grad and (grad_region is not None or gw_region is not None):
        raise ApiError("bad_request", "grad_region and grad_weight_region need want_grad")
    if accumulating and gw_region is not None:
        raise ApiError("bad_request", "grad_weight_region is for the stateless mode (accumulate false); an "
                                      "accumulated gradient is taken with POST /v1/weights/{name}/grad")
    arrays = resolve_regions(req, tensors)
    if stored is not None:
        weight, bias = store.resolve(stored, req.pin)
    else:
        weight, bias = arrays["weight"], arrays["bias"]
    hidden = arrays["hidden"]
    try:
        problem = check(hidden, weight, arrays["target"], bias, class_weight=arrays["class_weight"],
                        grad_output=arrays["grad_output"], **opts)
    except (TypeError, ValueError, RuntimeError, IndexError) as exc:
        raise ArgumentError(exc) from None
    R, H = problem.hidden.shape
    V = problem.weight.shape[0]
    lce = _for_engine(state.engines[0])
    # Every buffer the request will hold is counted against the budgets before any of it exists:
    # the hidden's gradient (unless it goes to a region), a fresh weight gradient (stateless,
    # unless it goes to a region), the chunk's scratch; an accumulating version's accumulators are
    # the stored weight's own (reserved once per accumulation, below).
    fresh_gw = want_grad and not accumulating and gw_region is None
    need = (req.copied_bytes + (hidden.size * problem.hidden.dtype.itemsize if want_grad and grad_region is None else 0)
            + lce.work_bytes(problem, want_grad_hidden=want_grad, fresh_grad_weight=fresh_gw,
                             fresh_grad_bias=want_grad and bias is not None and not accumulating))
    if stored is not None:   # what can never fit beside the weight (and its accumulators) is 413, not 429s
        acc = accumulator_bytes(stored.shape, stored.bias is not None) if accumulating else 0
        state.scheduler.check_fits(req.tenant, req.lease.reservation.nbytes + need + stored.nbytes
                                   + (acc if stored.grad_weight is None else 0),
                                   f"this request with weight {stored.name!r}"
                                   + (" and its gradient accumulators" if acc else ""))
    store.making_room(req.tenant, lambda: state.scheduler.grow(req.lease.reservation, need), keep=stored)
    if accumulating:
        store.reserve_accumulators(stored, req.tenant)
        store.keep_sweeping(asyncio.get_running_loop())

    def buffers():
        # where the gradients go: the client's regions, or a pooled buffer of the lease (the hidden's)
        grad_ref = gw_ref = grad_hidden = gw_dest = None
        if want_grad:
            if grad_region is not None:
                grad_ref, grad_hidden = output_region(req, "grad_hidden", grad_region,
                                                      _field(msg, "grad_offset", (int,), 0), problem.dtype,
                                                      hidden.shape)
            else:
                grad_hidden = req.lease.array(hidden.shape, problem.hidden.dtype)
            grad_hidden = grad_hidden.reshape(R, H)
            if gw_region is not None:
                gw_ref, gw_dest = output_region(req, "grad_weight", gw_region,
                                                _field(msg, "grad_weight_offset", (int,), 0), "float32", (V, H))
            if fresh_gw and gw_dest is None:   # a fresh weight gradient, written whole
                gw_dest = req.lease.array((V, H), np.float32)
        # The chunk's scratch from the lease's pool, taken here on the event loop (the lease's
        # owner): fresh (chunk, V) pages would fault in on every call
        scratch = _Scratch(req.lease, lce.scratch_shapes(problem, want_grad_hidden=want_grad))
        return grad_ref, gw_ref, grad_hidden, gw_dest, scratch

    grad_ref, gw_ref, grad_hidden, gw_dest, scratch = _allocating(need, buffers)
    record.stage("decode", time.perf_counter() - t0)

    def job(device):
        lce = _for_engine(state.engines[device.index])
        if accumulating:
            stored.lock.acquire()
            try:
                gw, gb = stored.grad_weight, stored.grad_bias
                if gw is None:   # taken by a flush, or dropped, while this micro-batch waited
                    raise ApiError("weight_not_stored", f"weight {stored.name!r} version {stored.version!r}: its "
                                   "accumulated gradient was taken or dropped while this micro-batch waited; "
                                   "upload it again")
                added = False
                try:
                    result = yield from lce.steps(problem, grad_weight=gw, grad_bias=gb, grad_hidden=grad_hidden,
                                                  empty=scratch.take, weight_key=stored)
                    added = True
                finally:
                    if added:
                        stored.micro_batches += 1
                        count, accumulation = stored.micro_batches, stored.accumulation
                    else:   # stopped part way: the sum is no longer one of whole micro-batches
                        store.drop(stored)
            finally:
                stored.release()
            return result, count, accumulation
        return (yield from lce.steps(problem, want_grad_hidden=want_grad, want_grad_weight=want_grad,
                                     want_grad_bias=want_grad and bias is not None, grad_weight=gw_dest,
                                     overwrite_grad_weight=True, grad_hidden=grad_hidden, empty=scratch.take,
                                     weight_key=stored)), None, None   # a stored version stays in device memory

    request_bytes = body.nbytes                # what crossed HTTP: max_request_bytes bounds it
    nbytes = req.lease.reservation.nbytes      # the body and everything above, held already
    timings: dict = {}
    submit = state.scheduler.submit(req.tenant, nbytes, FunctionJob(job), timings=timings,
                                    request_bytes=request_bytes, reservation=req.lease.reservation)
    if accumulating or request_bytes + req.shm_bytes < WATCH_DISCONNECT_BYTES:
        # An accumulating job runs to its end even if its client goes: stopped part way it would
        # cost the version its gradient. A small job is cheaper to finish than to watch.
        result = await submit
    else:
        result = await unless_disconnected(submit, req.request)
        if result is None:                 # the client left; nobody to answer
            record.outcome = "cancelled"
            return Response(status_code=499)
    result, count, accumulation = result
    record.stage("queue", timings.get("queue_s", 0.0))
    record.stage("run", timings.get("compute_s", 0.0))
    record.stage("kernel", result.kernel_seconds)
    record.rows = result.rows
    req.unpin()      # the job is over, and the answer carries no bytes of a region
    # the hidden's gradient first: a receiver finds its offset in the first bytes
    out: dict[str, Any] = {}
    if want_grad:
        out["grad_hidden"] = ref_map(*grad_ref) if grad_ref is not None else result.grad_hidden.reshape(hidden.shape)
    out["v"] = protocol.PROTOCOL_VERSION
    out["instance"] = store.instance
    if stored is not None:   # the micro-batches the version's accumulators hold, this one included
        out["accumulation"] = stored.accumulation if count is None else accumulation
        out["micro_batches"] = stored.micro_batches if count is None else count
    # the loss request's answer fields (routes/loss.py's result_message), the z-loss always
    out["loss"] = result.loss
    out["z_loss"] = result.z_loss
    if result.lse is not None:
        out["lse"] = result.lse
    if result.argmax is not None:
        out["argmax"] = result.argmax
        if result.accuracy is not None:
            out["accuracy"] = float(result.accuracy)
    if not accumulating and result.grad_weight is not None:
        out["grad_weight"] = ref_map(*gw_ref) if gw_ref is not None else result.grad_weight
        if result.grad_bias is not None:
            out["grad_bias"] = result.grad_bias
    return msgpack_answer(out, timing_headers(record))


# ---- the routes, as FastAPI's router and OpenAPI document know them ----------------------------

_MSGPACK_BODY = {"requestBody": {"required": True, "content": {"application/msgpack": {"schema": {
    "type": "string", "format": "binary", "description": "msgpack fields (docs/protocol.md, "
    "\"Fused linear cross-entropy\")"}}}}}
_ANSWERS = {400: {"description": "bad arguments: the message PyTorch would give"},
            401: {"description": "missing or invalid API key"},
            404: {"description": "the weight version (or a region) is not there: upload it again"},
            413: {"description": "request too large"}, 415: {"description": "not msgpack"},
            429: {"description": "queue or byte budget full"},
            503: {"description": "starting, draining, or the device failed (Retry-After)"}}


def routes() -> list[APIRoute]:
    """The four endpoints; each route's ASGI app is its LinearEndpoint (FastAPI's request handling,
    dependency solving and body parsing, is not on the path)."""

    async def linear_cross_entropy_operation() -> None:   # pragma: no cover  (never called)
        """Loss and the gradients of hidden, weight and bias of
        F.cross_entropy(F.linear(hidden, weight, bias), target) (msgpack body)."""

    async def put_weight_operation(name: str) -> None:   # pragma: no cover
        """Store a weight version (inline, or region references) for the linear cross-entropy."""

    async def take_grad_operation(name: str) -> None:   # pragma: no cover
        """Take a stored weight version's accumulated gradients (once)."""

    async def delete_weight_operation(name: str) -> None:   # pragma: no cover
        """Drop a stored weight."""

    table = [
        ("/v1/linear_cross_entropy", "POST", linear_cross_entropy_operation, linear_cross_entropy, True,
         "Fused linear cross-entropy: loss and gradients from hidden states"),
        ("/v1/weights/{name}", "PUT", put_weight_operation, put_weight, True,
         "Store a weight version for the linear cross-entropy"),
        ("/v1/weights/{name}/grad", "POST", take_grad_operation, take_grad, True,
         "Take a stored weight version's accumulated gradients"),
        ("/v1/weights/{name}", "DELETE", delete_weight_operation, delete_weight, False, "Drop a stored weight"),
    ]
    out = []
    for path, method, operation, handler, reads_body, summary in table:
        r = APIRoute(path, operation, methods=[method], name=handler.__name__, summary=summary,
                     tags=["linear cross-entropy"], openapi_extra=_MSGPACK_BODY if reads_body else None,
                     responses=_ANSWERS, status_code=204 if method == "DELETE" else None)
        r.app = LinearEndpoint(handler, reads_body)
        out.append(r)
    return out
