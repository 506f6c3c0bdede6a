"""FastAPI dependencies: the server state, the caller's tenant (auth), readiness.

All `async def` and one level deep: FastAPI runs a plain `def` dependency in its thread pool (a
thread hop per request), and each node of a dependency tree costs microseconds that small
requests feel."""

from __future__ import annotations

from fastapi import Request

from .errors import ApiError
from .state import ServerState
from .tenants import Tenant


async def server_state(request: Request) -> ServerState:
    return request.app.state.clce


async def authenticated_tenant(request: Request) -> Tenant:
    """The tenant whose API key the request carries (the open tenant when no tenants file is set)."""
    tenant = request.app.state.clce.registry.authenticate(request.headers.get("authorization"))
    ctx = request.scope.get("state", {}).get("clce_request")
    if tenant is None:
        raise ApiError("unauthorized", "missing or invalid API key (send Authorization: Bearer <key>)")
    if ctx is not None:
        ctx.tenant = tenant.name
    return tenant


async def ready_state(request: Request) -> ServerState:
    """The state of a server that takes work now; 503 (with Retry-After when it is transient) while
    starting, draining or after a failed start."""
    state: ServerState = request.app.state.clce
    if state.draining:
        raise ApiError("not_ready", "draining: this server takes no new work", retry_after=1)
    if state.init_error:
        raise ApiError("not_ready", f"OpenCL initialisation failed: {state.init_error}")
    if not state.ready.is_set():
        raise ApiError("not_ready", "building and warming the OpenCL kernels", retry_after=2)
    return state
