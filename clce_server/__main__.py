"""`clce-server` / `python -m clce_server`: serve the loss with uvicorn.

SIGTERM (or Ctrl-C) drains: /readyz answers 503 at once so load balancers stop sending, new
requests get 503, work in flight finishes (up to --drain-timeout), then the process exits. A
second signal exits at once.

A server whose devices fail to open (no such device, a kernel that does not build) exits with
status 1 after logging why: it never serves, so it does not sit answering 503s (a supervisor,
Docker or Kubernetes, shows the failure and restarts it).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys

import uvicorn
from pydantic import ValidationError

from .config import Settings


def _flag_type(annotation):
    for t in (bool, int, float):
        if annotation is t or annotation == (t | None):
            return t
    return str


def parse_args(argv: list[str] | None = None) -> Settings:
    """Every Settings field is a flag (--max-batch for max_batch; --drain-timeout also names
    drain_timeout_s), so a new setting is one declaration in config.py."""
    from . import __version__

    p = argparse.ArgumentParser(prog="clce-server", description="Remote fused cross-entropy on OpenCL. "
                                "Every option can also be set by its CLCE_* environment variable.",
                                epilog="Exits with status 1 when no device opens (the log says why).")
    p.add_argument("--version", action="version", version=f"clce-server {__version__}")
    for name, field in Settings.model_fields.items():
        flag = "--" + name.replace("_", "-")
        names = [flag] + ([flag[:-2]] if flag.endswith("-s") else [])
        help_ = f"{field.description} (CLCE_{name.upper()}, default {field.default})"
        kind = _flag_type(field.annotation)
        if name == "device":
            p.add_argument(*names, dest=name, action="append", help=help_ + "; repeatable or comma-separated")
        elif kind is bool:
            p.add_argument(*names, dest=name, action=argparse.BooleanOptionalAction, default=None, help=help_)
        else:
            p.add_argument(*names, dest=name, type=kind, help=help_)
    p.add_argument("--list-devices", action="store_true", help="list OpenCL devices and whether they build")
    ns = p.parse_args(argv)
    if ns.list_devices:
        from .rails.device import describe_devices
        print(describe_devices())
        raise SystemExit(0)
    overrides = {k: v for k, v in vars(ns).items() if v is not None and k != "list_devices"}
    if "device" in overrides:
        overrides["device"] = ",".join(overrides["device"])
    try:
        return Settings(**overrides)
    except ValidationError as exc:
        p.error("; ".join(f"--{'-'.join(map(str, e['loc'])).replace('_', '-')}: {e['msg']}" for e in exc.errors()))


class DrainingServer(uvicorn.Server):
    """uvicorn, except that the first exit signal drains the app (`ServerState.drain`: /readyz
    and new requests answer 503 at once, so load balancers stop sending, and work in flight
    finishes) before uvicorn stops listening and shuts down."""

    def __init__(self, config: uvicorn.Config, app):
        super().__init__(config)
        self.app = app            # the FastAPI app itself: config.loaded_app is wrapped in middleware
        self._draining = False
        self.failed: str | None = None   # why the devices did not open: the process exits 1

    async def on_tick(self, counter: int) -> bool:
        """uvicorn's main loop, every 0.1 s: a server whose devices failed to open stops."""
        state = getattr(self.app.state, "clce", None)
        if self.failed is None and state is not None and state.init_error:
            self.failed = state.init_error
            self.should_exit = True
        return await super().on_tick(counter)

    def handle_exit(self, sig, frame) -> None:
        state = getattr(self.app.state, "clce", None)
        if self._draining or state is None:
            return super().handle_exit(sig, frame)
        self._draining = True
        state.draining = True
        logging.getLogger("clce.server").info("signal %s: draining before exit", sig)
        loop = asyncio.get_event_loop()
        loop.call_soon_threadsafe(lambda: loop.create_task(self._drain_then_exit(state)))

    async def _drain_then_exit(self, state) -> None:
        await state.drain(state.settings.drain_timeout_s)
        self.should_exit = True


_LOOPBACK = ("127.0.0.1", "localhost", "::1")


def main(argv: list[str] | None = None) -> None:
    settings = parse_args(argv)
    logging.basicConfig(level=settings.log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s %(message)s")
    if settings.tenants is None and settings.host not in _LOOPBACK:
        logging.getLogger("clce.server").warning(
            "serving on %s without a tenants file: anyone who can reach it can use it", settings.host)
    if settings.tenants is not None and settings.ssl_certfile is None and settings.host not in _LOOPBACK:
        logging.getLogger("clce.server").warning(
            "serving tenants on %s without --ssl-certfile: API keys cross the network in clear text", settings.host)
    from .app import build_app

    failed = serve(build_app(settings), settings)
    if failed is not None:
        sys.exit(f"clce-server: no device opened, exiting: {failed}")


def serve(app, settings: Settings) -> str | None:
    """Serve `build_app(settings)` with uvicorn, adding what only the HTTP server can do: the
    header timeout and connection limit (limits.http_protocol), TLS, and the first SIGTERM
    starting the drain. Returns why the devices failed to open, when they did (the server then
    stopped), else None."""
    server = DrainingServer(uvicorn_config(app, settings), app)
    server.run()
    return server.failed


def uvicorn_config(app, settings: Settings) -> uvicorn.Config:
    """uvicorn serving `app` with the limits on slow and vanishing clients, and TLS when asked."""
    from .limits import http_protocol

    ssl = {}
    if settings.ssl_certfile is not None:
        ssl = {"ssl_certfile": str(settings.ssl_certfile), "ssl_keyfile": str(settings.ssl_keyfile),
               "ssl_keyfile_password": settings.ssl_keyfile_password}
    return uvicorn.Config(app, host=settings.host, port=settings.port,
                          http=http_protocol(settings.header_timeout_s, settings.max_connections),
                          log_level=settings.log_level, access_log=False, timeout_keep_alive=30,
                          timeout_graceful_shutdown=max(settings.drain_timeout_s, 1.0), **ssl)


if __name__ == "__main__":
    main()
