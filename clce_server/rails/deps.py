"""Who may use the server and when: the caller's tenant (auth) and readiness, defined once.

`tenant_for` and `check_ready` are what the loss endpoint calls; the `async def` functions are
the same checks as FastAPI dependencies for the other routes (a plain `def` dependency would cost
a thread hop per request)."""

from __future__ import annotations

from fastapi import Request

from .errors import ApiError
from ..state import ServerState
from ..tenants import Tenant


async def server_state(request: Request) -> ServerState:
    return request.app.state.clce


def tenant_for(state: ServerState, authorization: str | None) -> Tenant:
    """The tenant whose API key the request carries (the open tenant when no tenants file is set)."""
    tenant = state.registry.authenticate(authorization)
    if tenant is None:
        if state.registry.is_admin(authorization):   # a valid key, for the wrong job: say so
            raise ApiError("unauthorized", "this is the admin key; compute calls need a tenant key "
                           "(the api_key of a [tenants.NAME] table of the tenants file)")
        raise ApiError("unauthorized", "missing or invalid API key (send Authorization: Bearer <key>)")
    return tenant


async def authenticated_tenant(request: Request) -> Tenant:
    """`tenant_for` as a FastAPI dependency (the routes other than the loss endpoint)."""
    return tenant_for(request.app.state.clce, request.headers.get("authorization"))


async def status_viewer(request: Request) -> str | None:
    """Whose rows /v1/status shows: None for all of them (the admin key; or an open server, which
    has one tenant and no secrets), else the caller's own tenant. 401 without a valid key."""
    registry = request.app.state.clce.registry
    header = request.headers.get("authorization")
    if registry.is_admin(header):
        return None
    tenant = registry.authenticate(header)
    if tenant is None:
        raise ApiError("unauthorized", "missing or invalid API key (send Authorization: Bearer <key>)")
    return tenant.name


async def admin_only(request: Request) -> None:
    """The admin key (declared under [admin] in the tenants file), unless the server is open or
    --public-metrics says so."""
    state: ServerState = request.app.state.clce
    if state.settings.public_metrics or state.registry.is_admin(request.headers.get("authorization")):
        return
    raise ApiError("unauthorized", "this endpoint needs the admin key (the [admin] table of the tenants file)")


async def ready_state(request: Request) -> ServerState:
    return check_ready(request.app.state.clce)


def check_ready(state: ServerState) -> ServerState:
    """The state of a server that takes work now; 503 while starting or draining (not_ready, with
    Retry-After), or for good after a failed start (device_unavailable, without Retry-After)."""
    if state.draining:
        raise ApiError("not_ready", "draining: this server takes no new work", retry_after=1)
    if state.init_error:
        # device_unavailable without Retry-After: the device will not come back, so clients raise
        # at once (a device failure that may pass always carries Retry-After)
        raise ApiError("device_unavailable", f"OpenCL initialisation failed, so this server will never be "
                       f"ready: {state.init_error}")
    if not state.ready.is_set():
        raise ApiError("not_ready", "building and warming the OpenCL kernels", retry_after=2)
    return state
