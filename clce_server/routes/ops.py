"""Operational endpoints: liveness, readiness, info, live status, Prometheus metrics, status page."""

from __future__ import annotations

import time
from importlib import resources

from fastapi import APIRouter, Depends
from fastapi.responses import HTMLResponse, Response

from clce_wire import protocol
from clce_wire.shm import host_id

from .. import __version__
from ..deps import admin_only, ready_state, server_state, status_viewer
from ..state import ServerState

router = APIRouter()


@router.get("/healthz", summary="The process is alive")
async def healthz():
    return {"status": "ok"}


@router.get("/readyz", summary="Devices built and serving (503 while starting or draining)",
            dependencies=[Depends(ready_state)])
async def readyz():
    return {"status": "ready"}


@router.get("/v1/info", summary="Version, devices, dtypes, limits and this instance's id")
async def info(state: ServerState = Depends(server_state)):
    s = state.settings
    return {
        "name": "clce", "version": __version__, "protocol": protocol.PROTOCOL_VERSION,
        "instance_id": state.instance_id, "started": state.started, "ready": state.serving,
        "devices": [d.describe() for d in state.devices],
        "input_dtypes": ["float32", "float16", "bfloat16", "float64"],
        "target_dtypes": ["int64", "int32", "int16", "uint8"],
        "auth_required": state.registry.auth_required,
        "limits": {"max_request_bytes": s.max_request_bytes, "max_inflight_bytes": s.max_inflight_bytes,
                   "max_queued": s.max_queued, "chunk_ms": s.chunk_ms},
        "shm": _shm_info(state),
    }


def _shm_info(state: ServerState) -> dict:
    """What a client needs to decide on shared memory: whether it is allowed, the host it is on,
    the registration socket (docs/protocol.md, "Shared memory")."""
    if state.shm_server is None:
        return {"enabled": False}
    return {"enabled": True, "host_id": host_id(), "socket": state.shm_server.path,
            **state.shm_registry.stats(), "pool_held_bytes": state.pool.held_bytes()}


@router.get("/v1/status", summary="Live scheduler state: devices, tenants, queues, throughput "
            "(a tenant's key sees its own row; the admin key sees all)")
async def status(state: ServerState = Depends(server_state), viewer: str | None = Depends(status_viewer)):
    stats = state.scheduler.stats() if state.scheduler is not None else {}
    if viewer is not None and stats:
        stats = own_rows(stats, viewer)
    return {"instance_id": state.instance_id, "ready": state.serving,
            "uptime_s": time.time() - state.started, "inflight_http": state.inflight_http,
            "devices": [{"name": d.name, "kind": d.kind, "platform": d.platform} for d in state.devices],
            "scheduler": stats}


def own_rows(stats: dict, tenant: str) -> dict:
    """The scheduler's snapshot as one tenant may see it: its own row, no other tenant's name."""
    return {**stats, "tenants": {k: v for k, v in stats["tenants"].items() if k == tenant},
            "devices": [{**d, "backlogged_tenants": [t for t in d["backlogged_tenants"] if t == tenant]}
                        for d in stats["devices"]]}


@router.get("/metrics", summary="Prometheus metrics (with a tenants file: the admin key, unless "
            "--public-metrics; or scrape --metrics-bind)", dependencies=[Depends(admin_only)])
async def metrics(state: ServerState = Depends(server_state)):
    body, ctype = state.metrics.render()
    return Response(body, media_type=ctype)


@router.get("/", response_class=HTMLResponse, include_in_schema=False)
async def index():
    return HTMLResponse(resources.files("clce_server").joinpath("static/index.html").read_text())
