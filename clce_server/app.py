"""The whole server as one ASGI app: `build_app(settings)`.

Everything a deployment needs is wired here, whoever serves the app (`python -m clce_server`
with uvicorn, the Ray Serve deployment, the tests): the lifespan creates a `state.ServerState`
(devices, engines, tenants, metrics, the scheduler, the host buffer pool), opens the devices in a
background thread (so /healthz answers at once and /readyz turns 200 when the kernels are built
and warmed), starts the private metrics listener when one is configured, and on shutdown drains:
new requests get 503, admitted work finishes (up to drain_timeout_s), then the workers stop.
`limits.ClientGuard` cuts off clients that stall mid-body. Only what needs the HTTP server itself
(header timeout, connection limit, the first SIGTERM starting the drain) is added by
`__main__.serve`. All OpenCL work runs on the scheduler's device threads; the event loop only
moves bytes. A request's path through the code is in docs/architecture.md.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from contextlib import asynccontextmanager
from typing import Any, Literal

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel, Field, create_model

from clce_wire import options

from . import __version__
from .config import Settings
from .limits import ClientGuard
from .cross_entropy import operation as loss
from .linear import operation as linear
from .linear import weight_endpoints
from .rails.responses import install_exception_handlers
from .routes import ops
from .state import ServerState

LOSS_PATH = loss.PATH
log = logging.getLogger("clce.server")


def build_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        state = ServerState(settings)
        app.state.clce = state
        state.open_shm()
        metrics_server = _metrics_listener(state)
        threading.Thread(target=state.open_devices, name="clce-init", daemon=True).start()
        try:
            yield
        finally:
            await state.drain(settings.drain_timeout_s)
            if state.scheduler is not None:
                await asyncio.to_thread(state.scheduler.shutdown, 10.0)
            state.close_shm()
            if metrics_server is not None:
                metrics_server.shutdown()

    # No /docs or /redoc: FastAPI's viewers load their scripts from a CDN, so offline (where GPU
    # hosts often are) they are blank pages. The schema itself, /openapi.json, loads into any
    # OpenAPI viewer; `clce info` and docs/protocol.md describe the rest.
    app = FastAPI(title="clce", version=__version__, lifespan=lifespan, docs_url=None, redoc_url=None,
                  description="Remote fused cross-entropy: loss and input gradient of "
                              "torch.nn.functional.cross_entropy, computed by OpenCL kernels. "
                              "The fast path is application/msgpack (docs/protocol.md); the JSON "
                              "form below is for curl.")
    app.router.routes.insert(0, loss.route())   # matched first: the path nearly every request takes
    app.include_router(ops.router)
    app.router.routes.extend([linear.route(), *weight_endpoints.routes()])   # fused linear cross-entropy
    install_exception_handlers(app)
    app.add_middleware(ClientGuard, body_timeout_s=settings.body_timeout_s)
    app.openapi = lambda: _openapi(app)
    return app


def _metrics_listener(state: ServerState):
    """Prometheus's own little server, in a thread: /metrics without a key, on an address the
    operator keeps private, so the main port needs no key for scraping (None when not asked)."""
    settings = state.settings
    address = settings.metrics_address
    if (state.registry.auth_required and not state.registry.has_admin and not settings.public_metrics
            and address is None):
        log.warning("the tenants file declares no [admin] key: /metrics and other tenants' status rows "
                    "are unreachable (add [admin], --metrics-bind or --public-metrics)")
    if address is None:
        return None
    from prometheus_client import start_http_server

    started = start_http_server(address[1], address[0], registry=state.metrics.registry)
    log.info("metrics on http://%s:%d/metrics", *address)
    return started[0] if isinstance(started, tuple) else None   # (server, thread) since 0.19


# ---- OpenAPI: the JSON request body, derived from the options ------------------------------------

class TensorJSON(BaseModel):
    dtype: str = Field(..., examples=["float32"], description="float32, float64, float16, bfloat16, int64, "
                       "int32, int16, uint8")
    data: list[Any] = Field(..., description="nested or flat list; NaN/Infinity as strings")
    shape: list[int] | None = None


_PY_TYPES = {"int": int, "float": float, "bool": bool, "str": str}


def _field(opt: options.Option) -> tuple[Any, Any]:
    if opt.kind == "tensor":
        typ: Any = list[Any] | TensorJSON
    elif opt.choices:
        typ = Literal[opt.choices]
    else:
        typ = _PY_TYPES[opt.kind]
    if opt.nullable:
        typ = typ | None
    bounds = {k: getattr(opt, k) for k in ("ge", "gt", "le") if getattr(opt, k) is not None}
    extra = {"examples": [opt.example]} if opt.example is not None else {}
    return typ, Field(... if opt.required else opt.default, description=opt.doc, **bounds, **extra)


CrossEntropyRequest = create_model(
    "CrossEntropyRequest", __doc__="Arguments of torch.nn.functional.cross_entropy, plus what to return.",
    v=(int, Field(1, description="protocol version")),
    **{o.name: _field(o) for o in options.OPTIONS})


def _openapi(app: FastAPI) -> dict:
    if app.openapi_schema is None:
        schema = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
        body = CrossEntropyRequest.model_json_schema(ref_template="#/components/schemas/{model}")
        schema.setdefault("components", {}).setdefault("schemas", {}).update(body.pop("$defs", {}))
        op = schema["paths"][LOSS_PATH]["post"]
        op["requestBody"]["content"]["application/json"]["schema"] = body
        app.openapi_schema = schema
    return app.openapi_schema
