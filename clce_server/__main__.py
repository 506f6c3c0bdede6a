"""`clce-server` / `python -m clce_server`: serve the loss with uvicorn.

SIGTERM (or Ctrl-C) drains: /readyz answers 503 at once so load balancers stop sending, new
requests get 503, work in flight finishes (up to --drain-timeout), then the process exits. A
second signal exits at once.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys

import uvicorn

from .config import Settings


def parse_args(argv: list[str] | None = None) -> Settings:
    p = argparse.ArgumentParser(prog="clce-server", description="Remote fused cross-entropy on OpenCL. "
                                "Every option can also be set by its CLCE_* environment variable.")
    p.add_argument("--host", help="bind address (CLCE_HOST, default 127.0.0.1)")
    p.add_argument("--port", type=int, help="port (CLCE_PORT, default 8000; 0 picks a free one)")
    p.add_argument("--device", action="append", help="OpenCL device selector, repeatable or comma-separated: "
                   "index, platform:device, gpu, cpu, or a name substring (CLCE_DEVICE)")
    p.add_argument("--tenants", help="tenants TOML file; without it the server runs open (CLCE_TENANTS)")
    p.add_argument("--max-request-bytes", type=int)
    p.add_argument("--max-inflight-bytes", type=int)
    p.add_argument("--max-queued", type=int)
    p.add_argument("--chunk-ms", type=float)
    p.add_argument("--max-batch", type=int, help="coalesce up to this many small requests per launch (1: off)")
    p.add_argument("--scheduling", choices=["fair", "fifo"], help="fair (default) or fifo, a baseline")
    p.add_argument("--drain-timeout", dest="drain_timeout_s", type=float)
    p.add_argument("--log-level")
    p.add_argument("--list-devices", action="store_true", help="list OpenCL devices and whether they build")
    ns = p.parse_args(argv)
    if ns.list_devices:
        from .device import describe_devices
        print(describe_devices())
        raise SystemExit(0)
    overrides = {k: v for k, v in vars(ns).items() if v is not None and k != "list_devices"}
    if "device" in overrides:
        overrides["device"] = ",".join(overrides["device"])
    return Settings(**overrides)


class DrainingServer(uvicorn.Server):
    """uvicorn, except that the first exit signal drains the app before uvicorn shuts down."""

    def __init__(self, config: uvicorn.Config, settings: Settings, app):
        super().__init__(config)
        self.settings = settings
        self.app = app            # the FastAPI app itself: config.loaded_app is wrapped in middleware
        self._draining = False

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
        if state.scheduler is not None:
            await state.scheduler.drain(self.settings.drain_timeout_s)
        # responses of finished jobs may still be streaming out
        while state.inflight_http > 0:
            await asyncio.sleep(0.02)
        self.should_exit = True


def main(argv: list[str] | None = None) -> None:
    settings = parse_args(argv)
    logging.basicConfig(level=settings.log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s %(message)s")
    if settings.tenants is None and settings.host not in ("127.0.0.1", "localhost", "::1"):
        logging.getLogger("clce.server").warning(
            "serving on %s without a tenants file: anyone who can reach it can use it", settings.host)
    from .app import create_app

    app = create_app(settings)
    config = uvicorn.Config(app, host=settings.host, port=settings.port,
                            log_level=settings.log_level, access_log=False, timeout_keep_alive=30,
                            timeout_graceful_shutdown=max(settings.drain_timeout_s, 1.0))
    DrainingServer(config, settings, app).run()


if __name__ == "__main__":
    main()
