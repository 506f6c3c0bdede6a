"""The fused linear cross-entropy endpoints: hidden states in, loss and gradients out.

  PUT    /v1/weights/{name}        {version, weight, bias?}: store a weight version (weights.py)
  POST   /v1/linear_cross_entropy  {hidden, target, weight_name + weight_version | weight (+ bias),
                                    options...}: loss, z_loss, grad_hidden; the weight's and bias's
                                    gradients answered (stateless: `accumulate` false) or added
                                    to the stored version's accumulators (`accumulate` true)
  POST   /v1/weights/{name}/grad   {version}: the accumulated gradients, taken once
  DELETE /v1/weights/{name}

msgpack only (docs/protocol.md's tensor maps). The stages follow routes/loss.py: the API key names
a tenant, the server must take work, the body is read against the tenant's size limit, arguments
fail with PyTorch's exception type and message (400), and the work goes through the scheduler's
fair queue to a device thread (clce_server/linear.py, a chunk per step).
"""

from __future__ import annotations

import threading
import weakref
from typing import Any

import numpy as np
from fastapi import APIRouter, Depends, Request, Response
from fastapi.responses import StreamingResponse

from clce_wire import protocol

from ..deps import authenticated_tenant, ready_state
from ..errors import ApiError, ArgumentError
from ..linear import LinearCrossEntropy, check
from ..scheduler import FunctionJob
from ..state import ServerState
from ..tenants import Tenant
from ..weights import WeightStore
from .loss import receive_body

router = APIRouter(tags=["linear cross-entropy"])

#: the request's options with their defaults (F.cross_entropy's where they apply)
OPTION_DEFAULTS: dict[str, Any] = dict(ignore_index=-100, reduction="mean", label_smoothing=0.0,
                                       lse_square_scale=0.0, softcap=None, shift=0)
FIELDS = frozenset({"v", "hidden", "target", "weight", "bias", "class_weight", "weight_name", "weight_version",
                    "accumulate", "want_grad", *OPTION_DEFAULTS})
SEND_CHUNK = 1 << 20

_store_lock = threading.Lock()
_linear: "weakref.WeakKeyDictionary[Any, LinearCrossEntropy]" = weakref.WeakKeyDictionary()


def weight_store(state: ServerState) -> WeightStore:
    """The server's weight store (made on first use; it lives as long as the state)."""
    with _store_lock:
        store = getattr(state, "weight_store", None)
        if store is None:
            store = state.weight_store = WeightStore()
        return store


def _for_engine(engine) -> LinearCrossEntropy:
    with _store_lock:
        lce = _linear.get(engine)
        if lce is None:
            lce = _linear[engine] = LinearCrossEntropy(engine)
        return lce


async def _message(request: Request, tenant: Tenant, state: ServerState) -> dict[str, Any]:
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype != protocol.MSGPACK:
        raise ApiError("unsupported_media_type", f"Content-Type must be {protocol.MSGPACK}, got {ctype or 'none'!r}")
    # a buffer of its own, not the host pool's: a stored weight keeps viewing its body
    body = await receive_body(request, min(state.settings.max_request_bytes, tenant.max_request_bytes))
    try:
        msg = protocol.decode_message(memoryview(body))
    except protocol.ProtocolError as exc:
        raise ApiError("bad_request", f"malformed request: {exc}") from None
    unknown = sorted(set(msg) - FIELDS)
    if unknown:
        raise ApiError("bad_request", f"unknown request field {unknown[0]!r}")
    return msg


def _tensor(msg: dict[str, Any], name: str, required: bool = False) -> np.ndarray | None:
    value = msg.get(name)
    if value is None:
        if required:
            raise ApiError("bad_request", f"missing request field {name!r}")
        return None
    try:
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


async def _respond(msg: dict[str, Any]) -> Response:
    segments = protocol.encode_message(msg)

    def slices():
        for seg in segments:
            mv = memoryview(seg).cast("B")
            for i in range(0, len(mv), SEND_CHUNK):
                yield mv[i:i + SEND_CHUNK]

    return StreamingResponse(slices(), media_type=protocol.MSGPACK,
                             headers={"Content-Length": str(protocol.message_nbytes(segments))})


@router.put("/v1/weights/{name}", summary="Store a weight version for the linear cross-entropy")
async def put_weight(name: str, request: Request, tenant: Tenant = Depends(authenticated_tenant),
                     state: ServerState = Depends(ready_state)) -> Response:
    msg = await _message(request, tenant, state)
    version = _required_version(msg)
    weight, bias = _tensor(msg, "weight", required=True), _tensor(msg, "bias")
    if weight.ndim != 2:
        raise ArgumentError(RuntimeError(f"weight must be 2-D (vocabulary, hidden), got shape {list(weight.shape)}"))
    if bias is not None and (bias.shape != (weight.shape[0],) or bias.dtype != weight.dtype):
        raise ArgumentError(RuntimeError(f"bias must be a ({weight.shape[0]},) tensor of the weight's dtype"))
    # the arrays view the received body, kept (not pooled) for as long as the weight is stored;
    # aligned once here (a tensor in a msgpack body may start at any byte), not on every call
    weight = np.require(weight, requirements=("C", "A"))
    bias = None if bias is None else np.require(bias, requirements=("C", "A"))
    weight_store(state).put(tenant, name, version, weight, bias)
    return await _respond({"v": protocol.PROTOCOL_VERSION, "weight_name": name, "weight_version": version})


@router.post("/v1/weights/{name}/grad", summary="Take a stored weight version's accumulated gradients")
async def take_grad(name: str, request: Request, tenant: Tenant = Depends(authenticated_tenant),
                    state: ServerState = Depends(ready_state)) -> Response:
    msg = await _message(request, tenant, state)
    version = _required_version(msg)
    gw, gb, n = weight_store(state).take_grad(tenant, name, version)
    out: dict[str, Any] = {"v": protocol.PROTOCOL_VERSION, "micro_batches": n}
    if gw is not None:
        out["grad_weight"] = gw
        if gb is not None:
            out["grad_bias"] = gb
    return await _respond(out)


@router.delete("/v1/weights/{name}", summary="Drop a stored weight")
async def delete_weight(name: str, tenant: Tenant = Depends(authenticated_tenant),
                        state: ServerState = Depends(ready_state)) -> Response:
    if not weight_store(state).delete(tenant, name):
        raise ApiError("not_found", f"no weight {name!r} is stored")
    return Response(status_code=204)


@router.post("/v1/linear_cross_entropy", summary="Fused linear cross-entropy: loss and gradients from hidden states")
async def linear_cross_entropy(request: Request, tenant: Tenant = Depends(authenticated_tenant),
                               state: ServerState = Depends(ready_state)) -> Response:
    msg = await _message(request, tenant, state)
    hidden, target = _tensor(msg, "hidden", required=True), _tensor(msg, "target", required=True)
    accumulate = bool(_field(msg, "accumulate", (bool,), False))
    want_grad = bool(_field(msg, "want_grad", (bool,), True))
    opts = {name: _field(msg, name, {"ignore_index": (int,), "reduction": (str,), "shift": (int,)}.get(
        name, (float, int)), default) for name, default in OPTION_DEFAULTS.items()}
    stored = None
    if msg.get("weight_name") is not None:
        name = _field(msg, "weight_name", (str,), None)
        version = _field(msg, "weight_version", (str,), None)
        if version is None:
            raise ApiError("bad_request", "weight_name needs weight_version")
        stored = weight_store(state).get(tenant, name, version)
        weight, bias = stored.weight, stored.bias
    else:
        weight, bias = _tensor(msg, "weight", required=True), _tensor(msg, "bias")
        if accumulate:
            raise ApiError("bad_request", "accumulate needs a stored weight (weight_name, weight_version)")
    try:
        problem = check(hidden, weight, target, bias, class_weight=_tensor(msg, "class_weight"), **opts)
    except (TypeError, ValueError, RuntimeError, IndexError) as exc:
        raise ArgumentError(exc) from None

    def job(device):
        lce = _for_engine(state.engines[device.index])
        if stored is not None and accumulate and want_grad:
            with stored.lock:
                gw, gb = stored.accumulators()
                result = yield from lce.steps(problem, grad_weight=gw, grad_bias=gb)
                stored.micro_batches += 1
            return result
        return (yield from lce.steps(problem, want_grad_hidden=want_grad, want_grad_weight=want_grad,
                                     want_grad_bias=want_grad and bias is not None))

    nbytes = hidden.nbytes * 2 + target.nbytes + 4 * min(problem.hidden.shape[0], 1024) * weight.shape[0]
    if stored is None and want_grad:
        nbytes += weight.shape[0] * weight.shape[1] * 4
    result = await state.scheduler.submit(tenant, nbytes, FunctionJob(job))
    out: dict[str, Any] = {"v": protocol.PROTOCOL_VERSION}
    if result.grad_hidden is not None:
        out["grad_hidden"] = result.grad_hidden.reshape(hidden.shape)
    out["loss"] = result.loss
    if result.z_loss is not None:
        out["z_loss"] = result.z_loss
    if not accumulate and result.grad_weight is not None:
        out["grad_weight"] = result.grad_weight
        if result.grad_bias is not None:
            out["grad_bias"] = result.grad_bias
    return await _respond(out)
