"""The real app in this process: ``clce_server.app.build_app`` served by uvicorn on a thread (real
HTTP on a loopback port), so that a test can reach into its state, put a failing or held engine
behind a worker, and wait on the state the server reaches on its own.

    with InProcessServer(max_batch=1) as srv:
        restore = inject(srv, RuntimeError("bug"), where="prepare")
        ...
        assert_all_given_back(srv.state)
"""

from __future__ import annotations

import copy
import threading
import time
from contextlib import contextmanager

import pytest

pytest.importorskip("uvicorn")
import uvicorn  # noqa: E402

from clce_server.app import build_app  # noqa: E402
from clce_server.config import Settings  # noqa: E402
from tests.support.serverproc import READY_TIMEOUT_S  # noqa: E402


@contextmanager
def app_client(**settings):
    """starlette's TestClient on build_app(Settings(**settings)): the app's routes called in this
    process through ASGI (no socket, no uvicorn), its lifespan run, once its devices are ready."""
    from starlette.testclient import TestClient

    app = build_app(Settings(port=0, warmup=False, **settings))
    with TestClient(app, base_url="http://127.0.0.1") as client:
        assert app.state.clce.ready.wait(READY_TIMEOUT_S), "the app did not become ready"
        client.app_state = app.state.clce
        yield client


def inprocess_fixture(name: str = "server", scope: str = "module", **settings):
    """A pytest fixture named `name`: the server in this process (InProcessServer, configured as
    the console script configures uvicorn), one per scope. For tests of routes and of what the
    server answers, which need no process of their own; assign it to a module-level variable of
    the same name: ``server = inprocess_fixture()``."""

    @pytest.fixture(scope=scope, name=name)
    def _fixture():
        with InProcessServer(as_main=True, **settings) as srv:
            yield srv

    return _fixture


class InProcessServer:
    """build_app(Settings(**settings)) under uvicorn on a thread, on a free loopback port; ready
    once uvicorn has started and the app's state says ready. `as_main`: uvicorn configured as the
    console script configures it (clce_server.__main__.uvicorn_config), else a bare uvicorn.
    Settings are the server's fields (max_request_bytes=..., not --max-request-bytes)."""

    def __init__(self, *, as_main: bool = False, **settings):
        self.settings = Settings(port=0, warmup=False, **settings)
        self.app = build_app(self.settings)
        if as_main:   # uvicorn as `python -m clce_server` configures it: header timeout, connection limit
            from clce_server.__main__ import uvicorn_config

            config = uvicorn_config(self.app, self.settings)
        else:         # a bare uvicorn: what build_app brings by itself
            config = uvicorn.Config(self.app, host="127.0.0.1", port=0, log_level="warning", lifespan="on")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self):
        self.thread.start()
        deadline = time.monotonic() + READY_TIMEOUT_S
        while not (self.server.started and self.app.state.clce.ready.is_set()):
            assert time.monotonic() < deadline, "server did not become ready"
            time.sleep(0.02)
        port = self.server.servers[0].sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        return self

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(30)

    @property
    def state(self):
        return self.app.state.clce


class FailingEngine:
    """The device's engine, except that its method `where` raises `error` on the next `times` calls."""

    def __init__(self, engine, where: str, error: BaseException, times: int = 1):
        self.engine, self.where, self.error, self.left = engine, where, error, times

    def __getattr__(self, name):
        real = getattr(self.engine, name)
        if name != self.where:
            return real

        def failing(*args, **kwargs):
            if self.left:
                self.left -= 1
                # a fresh copy each time: one instance, raised again and again, would keep the
                # frames (and arrays) of the last call in its traceback
                raise copy.copy(self.error)
            return real(*args, **kwargs)
        return failing


def inject(server, error, where="run_chunk", times=1):
    """Put a FailingEngine behind the first device's worker; returns the function that restores it."""
    index = server.state.devices[0].index
    real = server.state.engines[index]
    server.state.engines[index] = FailingEngine(real, where, error, times)
    return lambda: server.state.engines.__setitem__(index, real)


def wait_for(condition, what, timeout_s: float = 20.0) -> None:
    """Wait for a condition the server reaches on its own after answering (its endpoint closes
    the lease once the response has gone); fail naming it (`what`: a text, or a function that
    says it as things stand when the wait fails)."""
    end = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < end, f"timed out waiting for {what() if callable(what) else what}"
        time.sleep(0.01)


def held(state) -> dict:
    return {"pooled": state.pool.held_bytes(), "reserved": state.scheduler.stats()["inflight_bytes"],
            "requests": state.inflight_http}


def assert_all_given_back(state) -> None:
    wait_for(lambda: state.inflight_http == 0, "the endpoint to finish")
    wait_for(lambda: held(state) == {"pooled": 0, "reserved": 0, "requests": 0},
              lambda: f"the request's memory to be given back: {held(state)}")
    if state.shm_registry is not None:
        assert state.shm_registry.stats()["pinned"] == 0

