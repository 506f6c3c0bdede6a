"""The FastAPI service, assembled: lifespan, routers, exception handlers, request records.

Long-lived resources (devices, engines, scheduler, metrics: `state.ServerState`) are created in
the lifespan; devices open in a background thread, so /healthz answers at once and /readyz turns
200 when the kernels are built and warmed. All OpenCL work runs on the scheduler's device threads;
the event loop only moves bytes. A request's path through the code is in docs/architecture.md.
"""

from __future__ import annotations

import asyncio
import threading
from contextlib import asynccontextmanager
from typing import Any, Literal

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel, Field, create_model

from clce_wire import options

from . import __version__
from .config import Settings
from .recording import RecordRequests
from .responses import install_exception_handlers
from .routes import linear, loss, ops
from .state import ServerState

LOSS_PATH = "/v1/cross_entropy"


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        state = ServerState(settings)
        app.state.clce = state
        state.open_shm()
        threading.Thread(target=state.open_devices, name="clce-init", daemon=True).start()
        try:
            yield
        finally:
            state.draining = True
            if state.scheduler is not None:
                await state.scheduler.drain(settings.drain_timeout_s)
                await asyncio.to_thread(state.scheduler.shutdown, 10.0)
            state.close_shm()

    app = FastAPI(title="clce", version=__version__, lifespan=lifespan,
                  description="Remote fused cross-entropy: loss and input gradient of "
                              "torch.nn.functional.cross_entropy, computed by OpenCL kernels. "
                              "The fast path is application/msgpack (docs/protocol.md); the JSON "
                              "form below is for curl.")
    app.include_router(ops.router)
    app.include_router(loss.router)
    app.include_router(linear.router)   # fused linear cross-entropy (routes/linear.py)
    install_exception_handlers(app)
    app.add_middleware(loss.LossLane, path=LOSS_PATH)
    app.add_middleware(RecordRequests, paths=frozenset({LOSS_PATH}))
    app.openapi = lambda: _openapi(app)
    return app


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
