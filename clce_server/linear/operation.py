"""POST /v1/linear_cross_entropy: the fused linear cross-entropy as an operation of the staged
endpoint (rails/endpoint.py), as the loss is one.

    {hidden, target, weight_name + weight_version | weight (+ bias), options...}: loss, z_loss,
    grad_hidden; the weight's and bias's gradients answered (stateless: `accumulate` false) or
    added to the stored version's accumulators (`accumulate` true; taken by POST
    /v1/weights/{name}/grad, weight_endpoints.py)

msgpack only (docs/protocol.md, "Fused linear cross-entropy"). Its fields are declared in
clce_wire.options (`LINEAR_OPTIONS`, the loss request's options that apply taken by name) and
parsed as the loss request's are. The stages: the rails admit the request and read its body (the
tenant's least recently used stored weights make room for it when its budget is full);
`resolve` finds the weight (stored, or sent), resolves shared-memory references through the lease
and runs PyTorch's checks (engine.check, 400 with PyTorch's exception type and message); `work`
counts what the request will hold (job.held_bytes) and makes its `LinearJob`; `encode` answers.

Shared memory: any tensor may be a region reference. hidden, weight, bias and grad_output are read
where they lie (a client changing them meanwhile gets garbage, never an out-of-bounds read);
target and class_weight are copied out first (they are bounds-checked, then used as indices).
`grad_region` places the hidden's gradient, `grad_weight_region` the weight's.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

import numpy as np
from fastapi.responses import Response
from fastapi.routing import APIRoute

from clce_wire import options, protocol
from clce_wire.shm import RegionRef, ref_map

from ..rails.endpoint import (Call, Operation, StagedEndpoint, Work, decode_fields, msgpack_answer,
                              timing_headers)
from ..rails.errors import ApiError
from ..rails.scheduler import Reservation
from .engine import LinearProblem, check
from .job import LinearJob, Scratch, allocating, held_bytes
from .weights import StoredWeight

PATH = "/v1/linear_cross_entropy"
#: the request's tensors; grad_output: autograd's per-row grad_output of a 'none' loss
TENSORS = ("hidden", "target", "weight", "bias", "class_weight", "grad_output")
# copied out of shared memory before they are checked: bounds-checked, then used as indices
_COPIED = frozenset(("target", "class_weight"))
WATCH_DISCONNECT_BYTES = 1 << 16  # stateless requests at least this big are cancelled when the client goes


@dataclass
class LinearRequest:
    """A request after `resolve`: its checked problem, and where its gradients go (`work`)."""

    args: dict[str, Any]
    problem: LinearProblem
    hidden_shape: tuple[int, ...]
    stored: StoredWeight | None
    accumulating: bool
    grad_ref: RegionRef | None = None     # the hidden's gradient in the client's region
    gw_ref: RegionRef | None = None       # the weight's


class LinearCrossEntropyOperation(Operation):
    media_types = (protocol.MSGPACK,)

    def reserve(self, call: Call):
        store, scheduler, tenant = call.state.weight_store, call.state.scheduler, call.tenant

        def reserve(nbytes: int) -> Reservation:
            # the tenant's least recently used stored weights make room for the body when its budget is full
            return store.making_room(tenant, lambda: scheduler.reserve(tenant, nbytes))
        return reserve

    async def decode(self, body: np.ndarray, call: Call) -> dict[str, Any]:
        return decode_fields(body, options.LINEAR_OPTIONS)

    def resolve(self, args: dict[str, Any], body: np.ndarray, call: Call) -> LinearRequest:
        store, lease = call.state.weight_store, call.lease
        stored = None
        if args["weight_name"] is not None:
            if args["weight_version"] is None:
                raise ApiError("bad_request", "weight_name needs weight_version")
            if args["weight"] is not None or args["bias"] is not None:
                raise ApiError("bad_request", "send a stored weight (weight_name, weight_version) or the weight "
                                              "itself (weight, bias), not both")
            stored = store.get(call.tenant, args["weight_name"], args["weight_version"])
        else:
            if args["weight"] is None:
                raise ApiError("bad_request", "missing request field 'weight'")
            if args["accumulate"]:
                raise ApiError("bad_request", "accumulate needs a stored weight (weight_name, weight_version)")
        want_grad = args["want_grad"]
        accumulating = stored is not None and args["accumulate"] and want_grad
        if not want_grad and (args["grad_region"] is not None or args["grad_weight_region"] is not None):
            raise ApiError("bad_request", "grad_region and grad_weight_region need want_grad")
        if accumulating and args["grad_weight_region"] is not None:
            raise ApiError("bad_request", "grad_weight_region is for the stateless mode (accumulate false); an "
                                          "accumulated gradient is taken with POST /v1/weights/{name}/grad")
        arrays = {name: lease.resolve(args[name], what=name, copy=name in _COPIED)
                  if isinstance(args[name], RegionRef) else args[name] for name in TENSORS}
        weight, bias = store.resolve(stored, lease) if stored is not None else (arrays["weight"], arrays["bias"])
        problem = check(arrays["hidden"], weight, arrays["target"], bias, class_weight=arrays["class_weight"],
                        grad_output=arrays["grad_output"], **{n: args[n] for n in options.LINEAR_LOSS_OPTIONS})
        return LinearRequest(args, problem, tuple(arrays["hidden"].shape), stored, accumulating)

    def work(self, req: LinearRequest, body: np.ndarray, call: Call) -> Work:
        state, lease, args, p = call.state, call.lease, req.args, req.problem
        store = state.weight_store
        want_grad = args["want_grad"]
        R, H = p.hidden.shape
        V = p.weight.shape[0]
        lce = state.linear_engines[state.devices[0].index]
        fresh_gw = want_grad and not req.accumulating and args["grad_weight_region"] is None
        need = held_bytes(lce, p, want_grad=want_grad, grad_hidden_in_region=args["grad_region"] is not None,
                          fresh_grad_weight=fresh_gw, accumulating=req.accumulating, copied_bytes=lease.copied_bytes)
        store.admit(call.tenant, lease.reservation, need, req.stored, req.accumulating)
        if req.accumulating:
            store.keep_sweeping(asyncio.get_running_loop())

        def buffers():
            # where the gradients go: the client's regions, or pooled buffers of the lease
            grad_hidden = gw_dest = None
            if want_grad:
                if args["grad_region"] is not None:
                    req.grad_ref, grad_hidden = lease.output("grad_hidden", p.dtype, req.hidden_shape,
                                                             args["grad_region"], args["grad_offset"])
                else:
                    grad_hidden = lease.array(req.hidden_shape, p.hidden.dtype)
                grad_hidden = grad_hidden.reshape(R, H)
                if args["grad_weight_region"] is not None:
                    req.gw_ref, gw_dest = lease.output("grad_weight", "float32", (V, H), args["grad_weight_region"],
                                                       args["grad_weight_offset"])
                if fresh_gw and gw_dest is None:   # a fresh weight gradient, written whole
                    gw_dest = lease.array((V, H), np.float32)
            return grad_hidden, gw_dest, Scratch(lease, lce.scratch_shapes(p, want_grad_hidden=want_grad))

        grad_hidden, gw_dest, scratch = allocating(need, buffers)
        job = LinearJob(p, state.linear_engines, want_grad=want_grad, grad_hidden=grad_hidden, grad_weight=gw_dest,
                        scratch=scratch, stored=req.stored, store=store, accumulating=req.accumulating)
        # An accumulating job runs to its end even if its client goes: stopped part way it would
        # cost the version its gradient. A small job is cheaper to finish than to watch.
        return Work(job, lease.reservation.nbytes, body.nbytes,
                    watch=not req.accumulating and body.nbytes + lease.shm_bytes >= WATCH_DISCONNECT_BYTES)

    async def encode(self, result, req: LinearRequest, call: Call) -> Response:
        # the hidden's gradient first: a receiver finds its offset in the first bytes
        out: dict[str, Any] = {}
        if req.args["want_grad"]:
            out["grad_hidden"] = (ref_map(*req.grad_ref) if req.grad_ref is not None
                                  else result.grad_hidden.reshape(req.hidden_shape))
        out["v"] = protocol.PROTOCOL_VERSION
        out["instance"] = call.state.weight_store.instance
        if req.stored is not None:   # the micro-batches the version's accumulators hold, this one included
            accumulated = result.micro_batches is not None
            out["accumulation"] = result.accumulation if accumulated else req.stored.accumulation
            out["micro_batches"] = result.micro_batches if accumulated else req.stored.micro_batches
        # the loss request's answer fields, the z-loss always
        out["loss"] = result.loss
        out["z_loss"] = result.z_loss
        if result.lse is not None:
            out["lse"] = result.lse
        if result.argmax is not None:
            out["argmax"] = result.argmax
            if result.accuracy is not None:
                out["accuracy"] = float(result.accuracy)
        if not req.accumulating and result.grad_weight is not None:
            out["grad_weight"] = ref_map(*req.gw_ref) if req.gw_ref is not None else result.grad_weight
            if result.grad_bias is not None:
                out["grad_bias"] = result.grad_bias
        return msgpack_answer(out, timing_headers(call.record))


MSGPACK_BODY = {"requestBody": {"required": True, "content": {"application/msgpack": {"schema": {
    "type": "string", "format": "binary", "description": "msgpack fields (docs/protocol.md, "
    "\"Fused linear cross-entropy\")"}}}}}
ANSWERS = {400: {"description": "bad arguments: the message PyTorch would give"},
           401: {"description": "missing or invalid API key"},
           404: {"description": "the weight version (or a region) is not there: upload it again"},
           413: {"description": "request too large"}, 415: {"description": "not msgpack"},
           429: {"description": "queue or byte budget full"},
           500: {"description": "a server bug; the body and X-Request-ID carry the request id"},
           503: {"description": "starting, draining, or the device failed (Retry-After)"}}


def route() -> APIRoute:
    """The endpoint as FastAPI's router and OpenAPI document know it; its ASGI app is the staged
    endpoint of `LinearCrossEntropyOperation` (FastAPI's request handling is not on the path)."""

    async def linear_cross_entropy_operation() -> None:   # pragma: no cover  (never called)
        """Loss and the gradients of hidden, weight and bias of
        F.cross_entropy(F.linear(hidden, weight, bias), target) (msgpack body)."""

    r = APIRoute(PATH, linear_cross_entropy_operation, methods=["POST"], name="linear_cross_entropy",
                 summary="Fused linear cross-entropy: loss and gradients from hidden states",
                 tags=["linear cross-entropy"], openapi_extra=MSGPACK_BODY, responses=ANSWERS)
    r.app = StagedEndpoint(LinearCrossEntropyOperation())
    return r

