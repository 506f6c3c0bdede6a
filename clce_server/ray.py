"""Scale-out on Ray Serve: the same FastAPI app (same paths, same client) in N replicas.

    pip install ".[server,ray]"              # in the clce checkout; ray[serve]
    serve run clce_server.ray:app            # replicas from CLCE_REPLICAS (default 1)
    CLCE_REPLICAS=4 CLCE_RAY_GPUS=1 serve run clce_server.ray:app
    serve run clce_server.ray:build_app replicas=2 autoscale=1 max_replicas=8   # builder arguments

Clients point at Serve's HTTP proxy (http://HOST:8000 by default) exactly as at one server; the
proxy load-balances the replicas. Each replica is one Ray actor running the app from
`clce_server.app.build_app` (the whole server: its body timeout, host pool, metrics listener and
draining at shutdown), with its own devices, scheduler and metrics (`instance_id` in /v1/info and
/v1/status tells which replica answered). Serve's proxy is the HTTP server, so its own limits
apply in place of `clce-server`'s header timeout and connection limit.

Environment (read where the application is built, i.e. by `serve run`; each replica builds its
`Settings` from its own environment, which Ray inherits from the cluster's processes):

* ``CLCE_REPLICAS`` (1): number of replicas; with autoscaling, the initial number.
* ``CLCE_AUTOSCALE`` (0): 1 scales on ongoing requests per replica between ``CLCE_MIN_REPLICAS``
  (1) and ``CLCE_MAX_REPLICAS`` (max(4, CLCE_REPLICAS)), aiming at ``CLCE_TARGET_ONGOING`` (8).
* ``CLCE_RAY_GPUS`` (0): 1 gives each replica one GPU (``num_gpus=1``): Ray sets
  CUDA_VISIBLE_DEVICES (ROCR_VISIBLE_DEVICES on AMD) for the actor, so the replica's OpenCL
  default device, the first GPU it sees, is its own. Otherwise replicas run on CPUs.
* ``CLCE_RAY_CPUS`` (1): CPUs reserved per replica.
* ``CLCE_RAY_MAX_ONGOING`` (CLCE_MAX_QUEUED or 64): requests Serve lets into one replica at once.
  Serve's default (5) would leave the replica's own weighted fair scheduler with almost nothing
  to schedule; admission (429) stays the replica's.

* ``CLCE_RAY_MAX_WEIGHTS`` (64): stored weights one replica keeps (Serve's
  ``max_num_models_per_replica``, below); beyond it the least recently used one is dropped.

Stored weights are Serve's multiplexed models. The client sends every request about a stored
weight (its upload, the linear calls that use it, its flush) with the weight's affinity key in
the ``serve_multiplexed_model_id`` header (clce_client.client.AFFINITY_HEADER). Serve's proxy
routes a model's requests to the replica that has loaded it, and loads it on another one (the
replica with the fewest) only when none has. Here "loading" is the upload: a PUT of the weight
loads it into the replica's multiplexed cache (`ClceDeployment.weight_slot`, a `@serve.multiplexed`
loader) and the weight store keeps its bytes; the other requests only mark it recently used. So
a weight's versions, its micro-batches and its flush all reach the replica holding its
accumulator, and a weight crosses the wire once per version. The cache is the store's routing
table: when Serve evicts a weight from it (``CLCE_RAY_MAX_WEIGHTS``), the replica deletes the
weight from its store; a weight the store dropped on its own (budget, idle) answers "not stored"
and the client uploads it again to that replica. A replica that dies takes its weights with it:
their next request is routed to another replica, which answers "not stored", the client uploads
the weight there, and a flush missing micro-batches replays them (clce_client/linear.py).

Lifespan: Serve runs the FastAPI lifespan when a replica starts. The app's lifespan opens the
devices in a background thread; here it is wrapped so that start-up also waits until the kernels
are built and warm, so Serve marks a replica RUNNING (and routes to it) only once it can compute,
and a device that cannot be opened fails the replica with the error instead of serving 503s.
Serve's health check (`check_health`) fails a replica whose initialisation failed or whose
scheduler reports a stopped device worker (`Scheduler.check_health`).
"""

from __future__ import annotations

import asyncio
import importlib
import inspect
import os
import re
import threading
import time
from contextlib import asynccontextmanager
from typing import Any

from ray import serve

from .app import build_app as build_server_app
from .config import Settings

__all__ = ["app", "build_app", "ClceDeployment", "deployment_options", "fastapi_app"]

READY_TIMEOUT_S = float(os.environ.get("CLCE_RAY_READY_TIMEOUT_S", "900"))
#: the multiplexing header Serve's proxy routes on, which the client sends with a stored weight's
#: requests (clce_client.client.AFFINITY_HEADER; Ray >= 2.32 reads it with '_', newer ones '-' too)
MODEL_ID_HEADER = "serve_multiplexed_model_id"
#: how long an upload that loaded a weight onto this replica waits before it answers: Serve's
#: replica pushes its model ids to the controller every 0.1 s, which passes them on to the routers;
#: answering after they know sends the weight's next request here, rather than to the replica with
#: the fewest models (which would answer "not stored" and take a second upload). Once per weight
#: and replica, not per version. Serve exposes no event for it, hence a time.
ROUTE_SETTLE_S = float(os.environ.get("CLCE_RAY_ROUTE_SETTLE_S", "0.5"))
_PUT_WEIGHT = re.compile(r"^/v1/weights/([^/]+)$")


def _env_int(name: str, default: int) -> int:
    v = os.environ.get(name, "").strip()
    return int(v) if v else default


def _env_float(name: str, default: float) -> float:
    v = os.environ.get(name, "").strip()
    return float(v) if v else default


def _env_flag(name: str, default: bool = False) -> bool:
    v = os.environ.get(name, "").strip().lower()
    if not v:
        return default
    return v in ("1", "true", "yes", "on")


def _wait_ready_on_startup(fastapi_app) -> None:
    """Wrap the app's lifespan: after it starts, wait until the devices are open and warm."""
    inner = fastapi_app.router.lifespan_context

    @asynccontextmanager
    async def lifespan(a):
        async with inner(a) as value:
            state = a.state.clce
            t0 = time.monotonic()
            while not state.ready.is_set():
                if state.init_error:
                    raise RuntimeError(f"clce replica: OpenCL initialisation failed: {state.init_error}")
                if time.monotonic() - t0 > READY_TIMEOUT_S:
                    raise RuntimeError(f"clce replica: devices not ready after {READY_TIMEOUT_S:.0f} s")
                await asyncio.sleep(0.05)
            yield value

    fastapi_app.router.lifespan_context = lifespan


class BytesBodies:
    """ASGI middleware: response body chunks as bytes.

    The app streams msgpack responses as memoryview slices of the result arrays (no copies under
    uvicorn); Serve pickles every ASGI message from the replica to its proxy, and memoryviews do
    not pickle. Serve copies each message anyway, so converting here costs little.
    """

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def send_bytes(message) -> None:
            if message.get("type") == "http.response.body":
                body = message.get("body")
                if body is not None and not isinstance(body, bytes):
                    message = {**message, "body": bytes(body)}
            await send(message)

        await self.app(scope, receive, send_bytes)


def _env_max_weights() -> int:
    n = _env_int("CLCE_RAY_MAX_WEIGHTS", 64)
    if n < 1:
        raise ValueError(f"CLCE_RAY_MAX_WEIGHTS must be >= 1, got {n}")
    return n


class WeightSlot:
    """A stored weight in a replica's multiplexed-model cache: its model id (the affinity key)
    and what the replica's weight store holds under it, each (tenant, name) that was uploaded.
    Serve calls `__del__` when it evicts the slot (in a thread): the store lets those go too, so
    that the store holds what Serve routes here."""

    def __init__(self, model_id: str, replica: "ClceDeployment"):
        self.model_id = model_id
        self.replica = replica
        self.uploaded: dict[tuple[str, str], tuple[Any, str]] = {}
        self._lock = threading.Lock()
        self._released = False

    def note_upload(self, tenant: Any, name: str) -> None:
        with self._lock:
            self.uploaded[(tenant.name, name)] = (tenant, name)

    def __del__(self) -> None:
        # Serve calls this at eviction, and the garbage collector again later: release once
        with self._lock:
            if self._released:
                return
            self._released = True
            uploaded, self.uploaded = list(self.uploaded.values()), {}
        self.replica._slot_released(self)
        store = self.replica._weight_store()
        for tenant, name in uploaded:
            store.delete(tenant, name)


class WeightAffinity:
    """ASGI middleware: a request about a stored weight (it carries Serve's multiplexed model id)
    goes through the replica's multiplexed cache: an upload (PUT /v1/weights/NAME) loads the weight
    here, any other request about it marks it recently used. Serve's proxy routes by that cache."""

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        replica = _REPLICA[0]
        if scope["type"] == "http" and replica is not None:
            model_id = _model_id(scope)
            if model_id:
                await replica.weight_request(model_id, scope)
        await self.app(scope, receive, send)


def _model_id(scope) -> str:
    """The request's multiplexed model id: Serve's request context, else the header itself."""
    try:
        model_id = serve.get_multiplexed_model_id()
    except Exception:   # outside a Serve request context (the app served some other way)
        model_id = ""
    if model_id:
        return model_id
    for key, value in scope.get("headers", ()):
        if key.decode("latin-1").lower().replace("-", "_") == MODEL_ID_HEADER:
            return value.decode("latin-1")
    return ""


#: this process's replica (each Serve replica is an actor process of its own), set by its constructor
_REPLICA: list[Any] = [None]

# The app every replica serves: exactly build_app's (same routes, errors, metrics, status page).
fastapi_app = build_server_app(Settings())
_wait_ready_on_startup(fastapi_app)
fastapi_app.add_middleware(WeightAffinity)
fastapi_app.add_middleware(BytesBodies)


@serve.deployment(name="clce")
@serve.ingress(fastapi_app)
class ClceDeployment:
    """One replica: the clce FastAPI app, its devices and its scheduler, in one Ray actor."""

    def __init__(self) -> None:
        # The app's lifespan (run by Serve right after this constructor) opens the devices.
        self.created = time.time()
        self._slots: dict[str, WeightSlot] = {}
        #: the loop this replica's requests (and its multiplexed cache) run on: Serve's user-code loop
        self._loop = asyncio.get_running_loop()
        # Serve ships this class (made by serve.ingress) and the app to the replica by value, with
        # copies of the module's globals; the middleware is this module's by reference: it finds
        # the replica in the module as imported here
        importlib.import_module(__name__)._REPLICA[0] = self

    @serve.multiplexed(max_num_models_per_replica=_env_max_weights())
    async def weight_slot(self, model_id: str) -> WeightSlot:
        """Serve's multiplexed loader: a weight's slot on this replica (the upload that called it
        brings the bytes). Serve routes the model id's requests here from now on."""
        slot = self._slots[model_id] = WeightSlot(model_id, self)
        await asyncio.sleep(ROUTE_SETTLE_S)   # see ROUTE_SETTLE_S: the routers learn of it meanwhile
        return slot

    async def weight_request(self, model_id: str, scope) -> None:
        """A request about a stored weight: an upload loads its slot here (and notes what it
        stores, for the eviction), another request marks a slot already here recently used; a
        request for a weight this replica never took gets "not stored" from the route, and its
        upload then loads it where Serve routes it."""
        put = _PUT_WEIGHT.match(scope.get("path", "")) if scope.get("method") == "PUT" else None
        if put is None and model_id not in self._slots:
            return
        slot = await self.weight_slot(model_id)
        if put is not None:
            from .rails.deps import tenant_for

            state = self._app_state()
            headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", ())}
            try:
                tenant = tenant_for(state, headers.get("authorization"))
            except Exception:   # the route answers it (401); nothing is stored
                return
            slot.note_upload(tenant, put.group(1))

    def _slot_released(self, slot: WeightSlot) -> None:
        if self._slots.get(slot.model_id) is slot:
            del self._slots[slot.model_id]

    def _weight_store(self):
        return self._app_state().weight_store

    def _app_state(self):
        state = self._state()
        if state is None:   # the lifespan runs before Serve routes a request here
            raise RuntimeError("clce replica: the app's state is not set up yet")
        return state

    def _state(self):
        asgi = getattr(self, "app", None) or getattr(self, "_asgi_app", None)
        return getattr(getattr(asgi, "state", None), "clce", None)

    async def check_health(self) -> None:
        """Called by Serve periodically; raising marks the replica unhealthy (and replaces it)."""
        state = self._state()
        if state is None:
            return   # lifespan not started yet: Serve does not health-check before start-up ends
        if state.init_error:
            raise RuntimeError(f"OpenCL initialisation failed: {state.init_error}")
        if state.scheduler is not None and not state.draining:
            state.scheduler.check_health()


def _supported(params: dict[str, Any]) -> dict[str, Any]:
    """Drop options this Ray version's serve.deployment does not know (2.9 .. current)."""
    known = set(inspect.signature(serve.deployment).parameters)
    out = dict(params)
    if "max_ongoing_requests" in out and "max_ongoing_requests" not in known:
        out["max_concurrent_queries"] = out.pop("max_ongoing_requests")   # Ray < 2.10
    return {k: v for k, v in out.items() if k in known or k == "max_concurrent_queries"}


def deployment_options(
    replicas: int | None = None,
    autoscale: bool | None = None,
    gpus: bool | None = None,
    *,
    min_replicas: int | None = None,
    max_replicas: int | None = None,
    target_ongoing: float | None = None,
    cpus: float | None = None,
    max_ongoing: int | None = None,
) -> dict[str, Any]:
    """`ClceDeployment.options(...)` keyword arguments; every unset one comes from CLCE_* env."""
    replicas = replicas if replicas is not None else _env_int("CLCE_REPLICAS", 1)
    if replicas < 1:
        raise ValueError(f"CLCE_REPLICAS must be >= 1, got {replicas}")
    autoscale = autoscale if autoscale is not None else _env_flag("CLCE_AUTOSCALE")
    gpus = gpus if gpus is not None else _env_flag("CLCE_RAY_GPUS")
    cpus = cpus if cpus is not None else _env_float("CLCE_RAY_CPUS", 1.0)
    max_ongoing = max_ongoing if max_ongoing is not None else _env_int(
        "CLCE_RAY_MAX_ONGOING", _env_int("CLCE_MAX_QUEUED", 64))

    actor: dict[str, Any] = {"num_cpus": cpus}
    if gpus:
        actor["num_gpus"] = 1
    opts: dict[str, Any] = {"ray_actor_options": actor, "max_ongoing_requests": max_ongoing,
                            "health_check_period_s": 10, "health_check_timeout_s": 30,
                            "graceful_shutdown_timeout_s": _env_float("CLCE_DRAIN_TIMEOUT_S", 120.0)}
    if autoscale:
        lo = min_replicas if min_replicas is not None else _env_int("CLCE_MIN_REPLICAS", 1)
        hi = max_replicas if max_replicas is not None else _env_int("CLCE_MAX_REPLICAS", max(4, replicas))
        if not 0 <= lo <= hi or hi < 1:
            raise ValueError(f"need 0 <= min_replicas <= max_replicas, max >= 1; got {lo}, {hi}")
        target = target_ongoing if target_ongoing is not None else _env_float("CLCE_TARGET_ONGOING", 8.0)
        auto = {"min_replicas": lo, "max_replicas": hi, "initial_replicas": min(max(replicas, lo), hi),
                "target_ongoing_requests": target}
        if "target_ongoing_requests" not in _autoscaling_fields():   # Ray < 2.32
            auto["target_num_ongoing_requests_per_replica"] = auto.pop("target_ongoing_requests")
        opts["autoscaling_config"] = auto
    else:
        opts["num_replicas"] = replicas
    return _supported(opts)


def _autoscaling_fields() -> set[str]:
    try:
        from ray.serve.config import AutoscalingConfig
    except ImportError:  # pragma: no cover
        return {"target_ongoing_requests"}
    fields = getattr(AutoscalingConfig, "model_fields", None) or getattr(AutoscalingConfig, "__fields__", {})
    return set(fields)


def build_app(args: dict[str, str] | None = None):
    """Application builder (`serve run clce_server.ray:build_app replicas=2 autoscale=1 ...`).

    Arguments (strings, as `serve run` passes them) override the CLCE_* environment: replicas,
    autoscale, gpus, min_replicas, max_replicas, target_ongoing, cpus, max_ongoing.
    """
    args = dict(args or {})
    flag = lambda v: None if v is None else str(v).strip().lower() in ("1", "true", "yes", "on")  # noqa: E731
    num = lambda v, t: None if v is None else t(v)  # noqa: E731
    opts = deployment_options(
        num(args.pop("replicas", None), int), flag(args.pop("autoscale", None)), flag(args.pop("gpus", None)),
        min_replicas=num(args.pop("min_replicas", None), int), max_replicas=num(args.pop("max_replicas", None), int),
        target_ongoing=num(args.pop("target_ongoing", None), float), cpus=num(args.pop("cpus", None), float),
        max_ongoing=num(args.pop("max_ongoing", None), int))
    if args:
        raise ValueError(f"unknown clce_server.ray arguments: {sorted(args)}")
    return ClceDeployment.options(**opts).bind()


# `serve run clce_server.ray:app`
app = build_app()
