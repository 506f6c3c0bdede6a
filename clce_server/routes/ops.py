"""Operational endpoints: liveness, readiness, info, live status, Prometheus metrics, status page."""

from __future__ import annotations

import time
from importlib import resources

from fastapi import APIRouter, Depends, Request
from fastapi.responses import HTMLResponse, Response

from clce_wire import protocol
from clce_wire.shm import host_id

from .. import __version__
from ..rails.deps import admin_only, ready_state, server_state, status_viewer
from ..rails.errors import ApiError
from ..state import ServerState

router = APIRouter()


@router.get("/healthz", summary="The process is alive")
async def healthz():
    return {"status": "ok"}


@router.get("/readyz", summary="Devices built and serving (503 while starting or draining)",
            dependencies=[Depends(ready_state)])
async def readyz():
    return {"status": "ready"}


@router.get("/v1/info", summary="What a client needs to connect; with a tenant's key also the devices, "
            "limits and that tenant's shared-memory figures; with the admin key the server's")
async def info(request: Request, state: ServerState = Depends(server_state)):
    """Three views (docs/protocol.md, "Who may call what"): without a key, only what a client needs
    to connect; a tenant's key adds the server's description and that tenant's own shared-memory
    figures; the admin key (everyone, on an open server) the server-wide figures. A key that is
    not valid is 401, as everywhere."""
    viewer = _viewer(request, state)
    doc = {"name": "clce", "version": __version__, "protocol": protocol.PROTOCOL_VERSION,
           "auth_required": state.registry.auth_required, "ready": state.serving,
           "shm": _shm_info(state, viewer)}
    if viewer is _PUBLIC:
        return doc
    s = state.settings
    return {**doc, "instance_id": state.instance_id, "started": state.started,
            "devices": [d.describe() for d in state.devices],
            "input_dtypes": ["float32", "float16", "bfloat16", "float64"],
            "target_dtypes": ["int64", "int32", "int16", "uint8"],
            "limits": {"max_request_bytes": s.max_request_bytes, "max_inflight_bytes": s.max_inflight_bytes,
                       "max_queued": s.max_queued, "chunk_ms": s.chunk_ms}}


_PUBLIC = object()      # no key: the connect fields only


def _viewer(request: Request, state: ServerState):
    """None for the admin (every figure), a tenant's name (its own figures), or _PUBLIC (no key)."""
    header = request.headers.get("authorization")
    registry = state.registry
    if registry.is_admin(header):
        return None
    if header is None:
        return _PUBLIC
    tenant = registry.authenticate(header)
    if tenant is None:
        raise ApiError("unauthorized", "missing or invalid API key (send Authorization: Bearer <key>)")
    return tenant.name


def _shm_info(state: ServerState, viewer) -> dict:
    """Whether shared memory is allowed, the host it is on and the registration socket (all a
    client needs: docs/protocol.md, "Shared memory"); then the viewer's own figures, or the
    server's for the admin."""
    if state.shm_server is None:
        return {"enabled": False}
    doc = {"enabled": True, "host_id": host_id(), "socket": state.shm_server.path}
    if viewer is _PUBLIC:
        return doc
    if viewer is not None:
        return {**doc, "scope": "tenant", **state.shm_registry.stats(viewer)}
    return {**doc, "scope": "server", **state.shm_registry.stats(), **state.shm_server.stats(),
            "pool_held_bytes": state.pool.held_bytes()}


@router.get("/v1/status", summary="Live scheduler state: devices, tenants, queues, throughput "
            "(a tenant's key sees its own row; the admin key sees all)")
async def status(state: ServerState = Depends(server_state), viewer: str | None = Depends(status_viewer)):
    stats = state.scheduler.stats() if state.scheduler is not None else {}
    doc = {"instance_id": state.instance_id, "ready": state.serving, "uptime_s": time.time() - state.started,
           "devices": [{"name": d.name, "kind": d.kind, "platform": d.platform} for d in state.devices]}
    if viewer is not None:
        return {**doc, "scheduler": own_rows(stats, viewer) if stats else {}}
    return {**doc, "inflight_http": state.inflight_http, "scheduler": stats}


def own_rows(stats: dict, tenant: str) -> dict:
    """The scheduler's snapshot as one tenant may see it: its own row, and of the server only
    what says nothing of other tenants' work (no steps, busy time, queues or bytes in flight)."""
    return {"accepting": stats["accepting"], "max_inflight_bytes": stats["max_inflight_bytes"],
            "tenants": {k: v for k, v in stats["tenants"].items() if k == tenant},
            "devices": [{"name": d["name"], "backlogged_tenants": [t for t in d["backlogged_tenants"] if t == tenant]}
                        for d in stats["devices"]]}


@router.get("/metrics", summary="Prometheus metrics (with a tenants file: the admin key, unless "
            "--public-metrics; or scrape --metrics-bind)", dependencies=[Depends(admin_only)])
async def metrics(state: ServerState = Depends(server_state)):
    body, ctype = state.metrics.render()
    return Response(body, media_type=ctype)


@router.get("/", response_class=HTMLResponse, include_in_schema=False)
async def index():
    return HTMLResponse(resources.files("clce_server").joinpath("static/index.html").read_text())
