"""The FastAPI service: POST /v1/cross_entropy and the operational endpoints.

Long-lived resources (OpenCL devices, programs, engines, scheduler, metrics) are created in the
lifespan. Devices are opened in a background thread, so /healthz answers at once and /readyz
turns 200 when the kernels are built and warmed. All OpenCL work runs on the scheduler's device
threads; the event loop only moves bytes.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
import uuid
from contextlib import asynccontextmanager
from importlib import resources
from typing import Any, Literal

import numpy as np
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, Field
from starlette.background import BackgroundTask
from starlette.exceptions import HTTPException as StarletteHTTPException

from clce_wire import options, protocol

from . import __version__, layouts
from .config import Settings
from .hostmem import POOL
from .metrics import Metrics
from .scheduler import Scheduler, SchedulerError
from .tenants import Tenant, TenantRegistry

log = logging.getLogger("clce.server")
access_log = logging.getLogger("clce.access")

STREAM_CHUNK = 1 << 20          # response bodies leave in 1 MiB slices: backpressure, no copies
WATCH_DISCONNECT_BYTES = 1 << 16  # requests at least this big are cancelled when the client goes
_CODE_FOR_STATUS = {401: "unauthorized", 404: "not_found", 405: "bad_request", 413: "payload_too_large",
                    415: "unsupported_media_type", 429: "queue_full", 503: "not_ready",
                    504: "deadline_exceeded"}


class ApiError(Exception):
    """An error answered as {"error": {"code", "message"}} with the code's HTTP status."""

    def __init__(self, code: str, message: str, *, retry_after: float | None = None):
        super().__init__(message)
        self.code = code
        self.status = protocol.ERROR_CODES[code][0]
        self.retry_after = retry_after


# ---- request model: documents the JSON form in OpenAPI (the msgpack form has the same fields) ----

class TensorJSON(BaseModel):
    dtype: str = Field(..., examples=["float32"], description="float32, float64, float16, bfloat16, int64, "
                       "int32, int16, uint8")
    data: list[Any] = Field(..., description="nested or flat list; NaN/Infinity as strings")
    shape: list[int] | None = None


TensorField = list[Any] | TensorJSON


class CrossEntropyRequest(BaseModel):
    """Arguments of torch.nn.functional.cross_entropy, plus what to return."""

    v: int = Field(protocol.PROTOCOL_VERSION, description="protocol version")
    input: TensorField = Field(..., description="logits (C), (N, C) or (N, C, d1, ..., dk); a bare "
                               "nested list is float32", examples=[[[2.0, 0.5, -1.0], [0.1, 0.2, 3.0]]])
    target: TensorField = Field(..., description="class indices (), (N) or (N, d1, ..., dk), or "
                                "probabilities shaped like input; bare ints are int64", examples=[[0, 2]])
    weight: TensorField | None = Field(None, description="class weights (C)")
    ignore_index: int = -100
    reduction: Literal["mean", "sum", "none"] = "mean"
    label_smoothing: float = Field(0.0, ge=0.0, le=1.0)
    return_grad: bool = Field(False, description="also return d loss / d input for grad_output = 1")
    grad_dtype: Literal["float32", "float64", "float16", "bfloat16"] | None = Field(
        None, description="dtype of the returned gradient (default: the input's)")
    return_lse: bool = Field(False, description="per-row log-sum-exp")
    return_argmax: bool = Field(False, description="per-row argmax, and accuracy for class targets")
    lse_square_scale: float = Field(0.0, ge=0.0, description="z-loss coefficient (PaLM): adds c * lse^2 per row")
    softcap: float | None = Field(None, gt=0, description="Gemma soft-capping: logits -> cap * tanh(logits / cap)")
    classes_last: bool = Field(False, description="input (..., C), target (...): class dimension last")
    shift: int = Field(0, ge=0, description="causal LM shift (implies classes_last): input (..., T, C) "
                       "is scored against target[..., shift:]; 0 <= shift < T")
    deadline_ms: float | None = Field(None, gt=0, description="answer 504 if not done within this time")


class CrossEntropyResponse(BaseModel):
    loss: float | list[Any] | str
    grad: list[Any] | None = None
    lse: list[Any] | None = None
    argmax: list[Any] | None = None
    accuracy: float | None = None
    z_loss: float | list[Any] | None = None


def _error_response(code: str, message: str, *, json_body: bool = True, retry_after: float | None = None,
                    headers: dict | None = None) -> Response:
    status = protocol.ERROR_CODES[code][0]
    body = protocol.error_body(code, message)
    hdrs = dict(headers or {})
    if retry_after is not None:
        hdrs["Retry-After"] = str(max(1, int(np.ceil(retry_after))))
    if json_body:
        return JSONResponse(body, status_code=status, headers=hdrs)
    return Response(b"".join(bytes(s) for s in protocol.encode_message(body)), status_code=status,
                    media_type=protocol.MSGPACK, headers=hdrs)


class ServerState:
    """What the lifespan creates and the endpoints use."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self.instance_id = uuid.uuid4().hex[:12]
        self.started = time.time()
        self.devices: list = []
        self.engines: dict[int, Any] = {}
        self.registry = self._registry(settings)
        self.metrics = Metrics(tenants=[t.name for t in self.registry.tenants], version=__version__,
                               instance=self.instance_id)
        self.scheduler: Scheduler | None = None
        self.ready = threading.Event()
        self.draining = False
        self.init_error: str | None = None
        self.inflight_http = 0

    @staticmethod
    def _registry(s: Settings) -> TenantRegistry:
        defaults = {"max_request_bytes": s.max_request_bytes, "max_inflight_bytes": s.tenant_max_inflight_bytes,
                    "max_queued": s.max_queued}
        if s.tenants:
            return TenantRegistry.from_toml(s.tenants, defaults)
        return TenantRegistry.open(defaults)

    def open_devices(self) -> None:
        """Runs in a thread: open and build, warm the kernels, then start the scheduler."""
        try:
            from .device import open_devices
            from .engine import LossEngine

            devices = open_devices(self.settings.device_selectors)
            for dev in devices:
                dev.build_startup_programs()
                eng = dev.engine = LossEngine(dev)
                if self.settings.warmup:
                    _warm_up(eng)
                self.engines[dev.index] = eng
            self.devices = devices
            self.scheduler = Scheduler(devices, self.registry, max_inflight_bytes=self.settings.max_inflight_bytes,
                                       metrics=self.metrics, policy=self.settings.scheduling,
                                       max_batch=self.settings.max_batch)
            self.scheduler.start()
            self.ready.set()
            log.info("ready: %s", ", ".join(f"{d.name} [{d.platform}]" for d in devices))
        except Exception as exc:   # surfaced by /readyz and every request, and logged
            self.init_error = str(exc)
            log.error("OpenCL initialisation failed: %s", exc)


def _warm_up(engine) -> None:
    """One small call per program built at start-up and per kernel shape in it (rows of classes,
    and spatial rows where the device has that shape), so PoCL's lazy per-kernel compile is not
    paid by a user."""
    from .engine import _np_dtype

    rng = np.random.default_rng(0)
    shapes = [((4, 67), (4,)), ((1, 5, 8), (1, 8))]
    for kind, in_dt, grad_dt, softcap in list(engine.device.programs):
        if kind != "ce" or softcap:
            continue
        for xs, ts in shapes:
            x = rng.standard_normal(xs).astype(np.float32).astype(_np_dtype(in_dt))
            t = rng.integers(0, xs[1], ts)
            t.reshape(-1)[0] = -100
            engine.cross_entropy(x, t, return_grad=True, grad_dtype=grad_dt)


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        state = ServerState(settings)
        app.state.clce = state
        threading.Thread(target=state.open_devices, name="clce-init", daemon=True).start()
        try:
            yield
        finally:
            state.draining = True
            if state.scheduler is not None:
                await state.scheduler.drain(settings.drain_timeout_s)
                await asyncio.to_thread(state.scheduler.shutdown, 10.0)

    app = FastAPI(title="clce", version=__version__, lifespan=lifespan,
                  description="Remote fused cross-entropy: loss and input gradient of "
                              "torch.nn.functional.cross_entropy, computed by OpenCL kernels. "
                              "The fast path is application/msgpack (docs/protocol.md); the JSON "
                              "form below is for curl.")

    def openapi() -> dict:
        if app.openapi_schema is None:
            schema = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
            body = CrossEntropyRequest.model_json_schema(ref_template="#/components/schemas/{model}")
            comps = schema.setdefault("components", {}).setdefault("schemas", {})
            comps.update(body.pop("$defs", {}))
            op = schema["paths"]["/v1/cross_entropy"]["post"]
            op["requestBody"]["content"]["application/json"]["schema"] = body
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi

    def state_of(request: Request) -> ServerState:
        return request.app.state.clce

    # ---- errors: always {"error": {"code", "message"}}, never FastAPI's {"detail"} ----
    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError):
        return _error_response(exc.code, str(exc), json_body=not _wants_msgpack(request), retry_after=exc.retry_after)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):
        code = _CODE_FOR_STATUS.get(exc.status_code, "bad_request")
        return _error_response(code, str(exc.detail), json_body=not _wants_msgpack(request))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError):
        return _error_response("bad_request", str(exc.errors()), json_body=not _wants_msgpack(request))

    # ---- operational endpoints ----
    @app.get("/healthz", summary="The process is alive")
    async def healthz():
        return {"status": "ok"}

    @app.get("/readyz", summary="Devices built and serving (503 while starting or draining)")
    async def readyz(request: Request):
        st = state_of(request)
        if st.init_error:
            return _error_response("not_ready", f"OpenCL initialisation failed: {st.init_error}")
        if st.draining:
            return _error_response("not_ready", "draining: finishing in-flight work before exit")
        if not st.ready.is_set():
            return _error_response("not_ready", "building and warming the OpenCL kernels")
        return {"status": "ready"}

    @app.get("/v1/info", summary="Version, devices, dtypes, limits and this instance's id")
    async def info(request: Request):
        st = state_of(request)
        return {
            "name": "clce", "version": __version__, "protocol": protocol.PROTOCOL_VERSION,
            "instance_id": st.instance_id, "started": st.started,
            "ready": st.ready.is_set() and not st.draining,
            "devices": [d.describe() for d in st.devices],
            "input_dtypes": ["float32", "float16", "bfloat16", "float64"],
            "target_dtypes": ["int64", "int32", "int16", "uint8"],
            "auth_required": st.registry.auth_required,
            "limits": {"max_request_bytes": settings.max_request_bytes,
                       "max_inflight_bytes": settings.max_inflight_bytes,
                       "max_queued": settings.max_queued, "chunk_ms": settings.chunk_ms},
        }

    @app.get("/v1/status", summary="Live scheduler state: devices, tenants, queues, throughput")
    async def status(request: Request):
        st = state_of(request)
        stats = st.scheduler.stats() if st.scheduler is not None else {}
        return {"instance_id": st.instance_id, "ready": st.ready.is_set() and not st.draining,
                "uptime_s": time.time() - st.started, "inflight_http": st.inflight_http,
                "devices": [{"name": d.name, "kind": d.kind, "platform": d.platform} for d in st.devices],
                "scheduler": stats}

    @app.get("/metrics", summary="Prometheus metrics", include_in_schema=True)
    async def metrics(request: Request):
        body, ctype = state_of(request).metrics.render()
        return Response(body, media_type=ctype)

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def index():
        return HTMLResponse(resources.files("clce_server").joinpath("static/index.html").read_text())

    # ---- the loss ----
    @app.post(
        "/v1/cross_entropy",
        summary="Cross-entropy loss (and gradient) of a batch",
        response_model=CrossEntropyResponse,
        openapi_extra={"requestBody": {"required": True, "content": {
            "application/json": {"schema": {}},   # filled in by openapi() with its $defs in components
            "application/msgpack": {"schema": {"type": "string", "format": "binary",
                                               "description": "the same fields, msgpack-encoded (docs/protocol.md)"}},
        }}},
        responses={400: {"description": "bad arguments: the message PyTorch would give"},
                   401: {"description": "missing or invalid API key"}, 413: {"description": "body too large"},
                   415: {"description": "not msgpack or JSON"}, 429: {"description": "queue or byte budget full"},
                   503: {"description": "starting or draining"}, 504: {"description": "deadline exceeded"}},
    )
    async def cross_entropy(request: Request):
        return await _serve_loss(state_of(request), settings, request)

    return app


def _wants_msgpack(request: Request) -> bool:
    """Answer in the request's format; when its Content-Type is neither (an error about to be
    raised for it), in the format the client Accepts."""
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype in (protocol.MSGPACK, protocol.JSON):
        return ctype == protocol.MSGPACK
    accept = request.headers.get("accept", "").lower()
    return protocol.MSGPACK in accept and protocol.JSON not in accept


async def _read_body(request: Request, limit: int) -> tuple[np.ndarray, np.ndarray | None]:
    """The body in one writable buffer, placed so its first tensor is aligned (it is decoded in
    place: tensors are views into it, and the CPU device computes on them directly). The limit
    is checked from Content-Length before anything is read, and while streaming when there is
    none. Returns (body, pooled backing to give back after the response, or None)."""
    length = request.headers.get("content-length")
    if length is None:
        buf = bytearray()
        async for chunk in request.stream():
            buf += chunk
            if len(buf) > limit:
                raise ApiError("payload_too_large", f"request body exceeds the limit of {limit} bytes")
        return np.frombuffer(buf, np.uint8), None
    try:
        n = int(length)
    except ValueError:
        raise ApiError("bad_request", "invalid Content-Length") from None
    if n < 0:
        raise ApiError("bad_request", "invalid Content-Length")
    if n > limit:
        raise ApiError("payload_too_large", f"request body of {n} bytes exceeds the limit of {limit} bytes")
    head = bytearray()
    body: np.ndarray | None = None
    backing = None
    view = None
    pos = 0
    async for chunk in request.stream():
        if body is None:
            head += chunk
            if len(head) < min(n, 512):
                continue
            backing = POOL.backing(n)
            body = protocol.aligned_body(n, head, backing)
            view = memoryview(body)
            chunk, head = head, None
        end = pos + len(chunk)
        if end > n:
            raise ApiError("bad_request", "body longer than its Content-Length")
        view[pos:end] = chunk
        pos = end
    if body is None:                       # shorter than the head we wait for: all in `head`
        if len(head) != n:
            raise ApiError("bad_request", f"body ended after {len(head)} of {n} bytes")
        return np.frombuffer(head, np.uint8), None
    if pos != n:
        raise ApiError("bad_request", f"body ended after {pos} of {n} bytes")
    return body, backing


def _nbytes_in_flight(args: dict, body_len: int) -> int:
    """What a request holds until it finishes: its body, plus the gradient it will send back."""
    x = args["input"]
    extra = 0
    if args.get("return_grad"):
        gdt = args.get("grad_dtype") or protocol.dtype_name(x.dtype)
        extra = x.size * protocol.DTYPES.get(gdt, 4)
    return body_len + extra


_ENGINE_ARGS = ("weight", "ignore_index", "reduction", "label_smoothing", "return_grad", "grad_dtype",
                "return_lse", "return_argmax", "lse_square_scale", "softcap")


@layouts.rows_layout   # classes_last / shift: rewritten into (N, C) rows, results mapped back
def _make_job(state: ServerState, args: dict, chunk_s: float | None, settings: Settings):
    """The generator the scheduler steps on a device thread: validate + prepare, chunks, finish.
    Small 2-D requests also carry a batch key, so the scheduler can coalesce them into one launch."""
    request = {"input": args["input"], "target": args["target"], **{k: args[k] for k in _ENGINE_ARGS}}

    def job(device):
        engine = state.engines[device.index]
        prep = engine.prepare(**request)
        try:
            for chunk in prep.chunks(chunk_s):
                yield engine.run_chunk(prep, chunk)
            return engine.finish(prep)
        finally:
            prep.release()

    x, w = args["input"], args["weight"]
    if (settings.max_batch > 1 and x.ndim == 2 and 0 < x.size <= settings.batch_max_elements
            and not args["lse_square_scale"] and (w is None or w.size <= 4096)):
        job.request = request
        job.batch_cost = x.size
        job.batch_run = _run_batch
        # what one launch shares; the engine regroups by the exact validated problem anyway
        job.batch_key = (x.shape[1], x.dtype.str, args["target"].shape == x.shape, args["target"].dtype.kind,
                         args["label_smoothing"], args["softcap"], None if w is None else (w.dtype.str, w.tobytes()),
                         args["return_grad"], args["return_lse"], args["return_argmax"])
    return job


def _run_batch(device, fns) -> list:
    return device.engine.cross_entropy_many([f.request for f in fns])


async def _recycle(*arrays) -> None:
    # async: a sync background task would cost a threadpool hop per response
    for a in arrays:
        POOL.release(a)


def _result_message(res, args: dict) -> dict:
    # The gradient goes first: a receiver finds its offset in the first bytes and places the
    # body so the gradient lands aligned, usable in place.
    out: dict[str, Any] = {}
    if args["return_grad"]:
        out["grad"] = res.grad
    out["v"] = protocol.PROTOCOL_VERSION
    out["loss"] = res.loss
    if args["return_lse"]:
        out["lse"] = res.lse
    if args["return_argmax"]:
        out["argmax"] = res.argmax
        if res.accuracy is not None:
            out["accuracy"] = float(res.accuracy)
    if res.z_loss is not None:
        out["z_loss"] = res.z_loss
    return out


def _msgpack_stream(segments):
    for seg in segments:
        mv = memoryview(seg).cast("B")
        for i in range(0, len(mv), STREAM_CHUNK):
            yield mv[i:i + STREAM_CHUNK]


async def _watch_disconnect(request: Request) -> None:
    while True:
        msg = await request.receive()
        if msg["type"] == "http.disconnect":
            return


async def _serve_loss(state: ServerState, settings: Settings, request: Request) -> Response:
    t0 = time.perf_counter()
    tenant: Tenant | None = None
    outcome, status, timings, body_len, out_len, rows = "client_error", 400, {}, 0, 0, 0
    as_msgpack = _wants_msgpack(request)
    state.inflight_http += 1
    try:
        tenant = state.registry.authenticate(request.headers.get("authorization"))
        if tenant is None:
            outcome = "unauthorized"
            raise ApiError("unauthorized", "missing or invalid API key (send Authorization: Bearer <key>)")
        if state.draining:
            outcome = "rejected"
            raise ApiError("not_ready", "draining: this server takes no new work", retry_after=1)
        if state.init_error:
            outcome = "error"
            raise ApiError("not_ready", f"OpenCL initialisation failed: {state.init_error}")
        if not state.ready.is_set():
            outcome = "rejected"
            raise ApiError("not_ready", "building and warming the OpenCL kernels", retry_after=2)
        ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if ctype not in (protocol.MSGPACK, protocol.JSON):
            raise ApiError("unsupported_media_type",
                           f"Content-Type must be {protocol.MSGPACK} or {protocol.JSON}, got {ctype or 'none'!r}")
        limit = min(settings.max_request_bytes, tenant.max_request_bytes)
        try:
            body, backing = await _read_body(request, limit)
        except ApiError as exc:
            outcome = "too_large" if exc.code == "payload_too_large" else outcome
            raise
        body_len = body.nbytes
        t_decode = time.perf_counter()
        try:
            if as_msgpack:
                args = options.parse_request(protocol.decode_message(memoryview(body)))
            else:
                text = body.tobytes()
                if body_len > (1 << 20):
                    msg = await asyncio.to_thread(json.loads, text)
                    args = await asyncio.to_thread(options.parse_request, msg, json=True)
                else:
                    args = options.parse_request(json.loads(text), json=True)
        except (protocol.ProtocolError, json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ApiError("bad_request", f"malformed request: {exc}") from None
        timings["decode"] = time.perf_counter() - t_decode
        deadline = None
        if args.get("deadline_ms") is not None:
            if not args["deadline_ms"] > 0:
                raise ApiError("bad_request", "deadline_ms must be positive")
            deadline = time.monotonic() + args["deadline_ms"] / 1000.0
        # FIFO runs whole requests: the baseline that chunked fair queueing is measured against
        chunk_s = settings.chunk_ms / 1000.0 if settings.scheduling == "fair" else None
        job = _make_job(state, args, chunk_s, settings)
        sched_t: dict = {}
        submit = asyncio.ensure_future(state.scheduler.submit(
            tenant, _nbytes_in_flight(args, body_len), job, deadline=deadline, timings=sched_t,
            request_bytes=body_len))
        if body_len >= WATCH_DISCONNECT_BYTES:
            # Worth cancelling: watch the connection, and drop the job if the client goes. A small
            # job is cheaper to finish than to watch; its result is then dropped harmlessly.
            watcher = asyncio.ensure_future(_watch_disconnect(request))
            try:
                done, _ = await asyncio.wait({submit, watcher}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                watcher.cancel()
            if submit not in done:   # the client left: the job is dropped, nobody to answer
                submit.cancel()
                outcome, status = "cancelled", 499
                try:
                    await submit
                except BaseException:
                    pass
                return Response(status_code=499)
        else:
            try:
                await submit
            except Exception:
                pass            # raised again by submit.result() below
        try:
            res = submit.result()
        except SchedulerError as exc:
            outcome = {"payload_too_large": "too_large", "queue_full": "rejected", "deadline_exceeded": "deadline",
                       "not_ready": "rejected"}.get(exc.code, "rejected")
            raise ApiError(exc.code, str(exc), retry_after=getattr(exc, "retry_after", None)) from None
        except (ValueError, IndexError, RuntimeError, TypeError) as exc:
            if _is_device_error(exc):
                raise
            outcome = "client_error"
            raise ApiError(protocol.code_for_exception(exc), str(exc)) from None
        timings["queue"] = sched_t.get("queue_s", 0.0)
        timings["kernel"] = res.kernel_seconds
        rows = res.rows
        msg = _result_message(res, args)
        timings["total"] = time.perf_counter() - t0
        headers = {"Server-Timing": protocol.format_server_timing({k: v * 1000 for k, v in timings.items()})}
        outcome, status = "ok", 200
        # Once the response is out, nothing refers to the body or the gradient: back to the pool.
        recycle = BackgroundTask(_recycle, backing, res.grad) if backing is not None or res.grad is not None else None
        if as_msgpack:
            segments = protocol.encode_message(msg)
            out_len = protocol.message_nbytes(segments)
            if out_len <= STREAM_CHUNK:   # small: one write, no per-chunk threadpool hop
                return Response(b"".join(segments), media_type=protocol.MSGPACK, headers=headers,
                                background=recycle)
            headers["Content-Length"] = str(out_len)
            return StreamingResponse(_msgpack_stream(segments), media_type=protocol.MSGPACK, headers=headers,
                                     background=recycle)
        payload = await asyncio.to_thread(protocol.message_to_json, msg) if res.rows > 4096 else protocol.message_to_json(msg)
        resp = JSONResponse(payload, headers=headers, background=recycle)
        out_len = len(resp.body)
        return resp
    except ApiError as exc:
        status = exc.status
        return _error_response(exc.code, str(exc), json_body=not as_msgpack, retry_after=exc.retry_after)
    except Exception as exc:   # a server bug or a device failure: logged, answered, never a dropped connection
        outcome, status = "error", 500
        log.exception("request failed")
        return _error_response("internal", f"internal error: {type(exc).__name__}: {exc}", json_body=not as_msgpack)
    finally:
        state.inflight_http -= 1
        total = time.perf_counter() - t0
        name = tenant.name if tenant is not None else "unknown"
        state.metrics.observe_request(name, outcome, total, timings.get("queue"), timings.get("kernel"),
                                      body_len, out_len, rows)
        if settings.access_log and access_log.isEnabledFor(logging.INFO):
            access_log.info(json.dumps({
                "tenant": name, "outcome": outcome, "status": status, "bytes_in": body_len, "bytes_out": out_len,
                "rows": rows, "ms": round(total * 1000, 3),
                **{f"{k}_ms": round(v * 1000, 3) for k, v in timings.items() if k != "total"},
                "client": request.client.host if request.client else None}))


def _is_device_error(exc: BaseException) -> bool:
    """pyopencl's errors (device out of memory, lost device) are the server's, not the client's."""
    return type(exc).__module__.startswith("pyopencl")
