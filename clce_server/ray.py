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

Lifespan: Serve runs the FastAPI lifespan when a replica starts. The app's lifespan opens the
devices in a background thread; here it is wrapped so that start-up also waits until the kernels
are built and warm, so Serve marks a replica RUNNING (and routes to it) only once it can compute,
and a device that cannot be opened fails the replica with the error instead of serving 503s.
Serve's health check (`check_health`) fails a replica whose initialisation failed or whose
scheduler reports a stopped device worker (`Scheduler.check_health`).
"""

from __future__ import annotations

import asyncio
import inspect
import os
import time
from contextlib import asynccontextmanager
from typing import Any

from ray import serve

from .app import build_app as build_server_app
from .config import Settings

__all__ = ["app", "build_app", "ClceDeployment", "deployment_options", "fastapi_app"]

READY_TIMEOUT_S = float(os.environ.get("CLCE_RAY_READY_TIMEOUT_S", "900"))


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


# The app every replica serves: exactly build_app's (same routes, errors, metrics, status page).
fastapi_app = build_server_app(Settings())
_wait_ready_on_startup(fastapi_app)
fastapi_app.add_middleware(BytesBodies)


@serve.deployment(name="clce")
@serve.ingress(fastapi_app)
class ClceDeployment:
    """One replica: the clce FastAPI app, its devices and its scheduler, in one Ray actor."""

    def __init__(self) -> None:
        # The app's lifespan (run by Serve right after this constructor) opens the devices.
        self.created = time.time()

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
