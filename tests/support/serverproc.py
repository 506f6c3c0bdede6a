"""Run the real clce server (``python -m clce_server``) as a subprocess for end-to-end tests.

    from tests.support.serverproc import ServerProcess, server_fixture

    server = server_fixture()                                  # module-scoped fixture "server"
    small = server_fixture("small", args=["--max-request-bytes", "65536"])

    with ServerProcess(env={"CLCE_CHUNK_MS": "5"}) as srv:     # or by hand
        httpx.get(srv.url + "/healthz")

The server binds a free loopback port (found by binding a socket to port 0), is ready once
GET /readyz answers 200, and is stopped with SIGTERM (it drains), then SIGKILL if it lingers.
Its stdout and stderr go to a log file that `log()` returns, and that a start-up timeout or an
early exit puts in the failure message.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import httpx
import pytest

REPO = Path(__file__).resolve().parents[2]
READY_TIMEOUT_S = 180.0   # building and warming the kernels; minutes when the CPU is shared (CI: check-served --wait 180)
STOP_TIMEOUT_S = 20.0


def free_port(host: str = "127.0.0.1") -> int:
    """A port that was free a moment ago (the kernel's pick for a socket bound to port 0)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class ServerStartError(RuntimeError):
    pass


class ServerProcess:
    """One `python -m clce_server` subprocess on a free loopback port.

    ``args``: extra CLI flags (e.g. ``["--max-request-bytes", "65536"]``). ``env``: environment
    overrides (``CLCE_*`` and anything else); a value of None removes the variable. ``CLCE_*``
    variables of the test process itself are not inherited, so a developer's shell settings cannot
    change what the tests see. ``tenants``: path of a tenants TOML file (``--tenants``).
    ``port``: this port rather than a free one (a new process where an old one was: a restart).
    """

    def __init__(
        self,
        args: Sequence[str] = (),
        env: Mapping[str, str | None] | None = None,
        tenants: str | os.PathLike | None = None,
        ready_timeout: float = READY_TIMEOUT_S,
        command: Sequence[str] | None = None,
        cwd: str | os.PathLike | None = None,
        port: int | None = None,
    ):
        self.host = "127.0.0.1"
        self.args = list(args)
        if tenants is not None:
            self.args += ["--tenants", str(tenants)]
        self.env_overrides = dict(env or {})
        self.ready_timeout = ready_timeout
        # what starts the server: this checkout's by default, or e.g. an installed `clce-server`
        self.command = list(command) if command is not None else [sys.executable, "-m", "clce_server"]
        self.cwd = cwd if cwd is not None else REPO
        # a restart (here or behind a load balancer): the new process takes the old one's port
        self.fixed_port = port
        self.port: int | None = port
        self.proc: subprocess.Popen | None = None
        self._log_file = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def log(self) -> str:
        """Everything the server has written to stdout and stderr so far."""
        if self._log_file is None:
            return ""
        if not self._log_file.closed:
            self._log_file.flush()
        try:
            return Path(self._log_file.name).read_text(errors="replace")
        except OSError:
            return ""

    def _environ(self) -> dict[str, str]:
        # CLCE_DEVICE_MEMORY is the test run's mode, not a shell setting: CI runs the tests in both
        env = {k: v for k, v in os.environ.items() if not k.startswith("CLCE_") or k == "CLCE_DEVICE_MEMORY"}
        env.setdefault("PYTHONUNBUFFERED", "1")
        for key, value in self.env_overrides.items():
            if value is None:
                env.pop(key, None)
            else:
                env[key] = str(value)
        return env

    def start(self) -> ServerProcess:
        # The port is chosen before the server binds it; another process could take it in
        # between, which shows as an early exit ("address already in use"): try another one.
        for attempt in range(3):
            self.port = self.fixed_port or free_port(self.host)
            self._log_file = tempfile.NamedTemporaryFile(
                "w+", prefix=f"clce-server-{self.port}-", suffix=".log", delete=False
            )
            cmd = [*self.command, "--host", self.host, "--port", str(self.port), *self.args]
            self.proc = subprocess.Popen(
                cmd, cwd=self.cwd, env=self._environ(), stdout=self._log_file,
                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            )  # fmt: skip
            try:
                self._wait_ready()
                return self
            except ServerStartError:
                log = self.log()
                self.stop()
                if attempt < 2 and self.fixed_port is None and "address already in use" in log.lower():
                    continue
                raise
        raise AssertionError("unreachable")

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.ready_timeout
        last = "no answer yet"
        with httpx.Client(timeout=2.0) as http:
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    raise ServerStartError(
                        f"clce server exited with status {self.proc.returncode} before it was "
                        f"ready.\n--- server log ---\n{self.log()}"
                    )
                try:
                    resp = http.get(self.url + "/readyz")
                    if resp.status_code == 200:
                        return
                    last = f"{resp.status_code} {resp.text}"
                except httpx.HTTPError as exc:
                    last = f"{type(exc).__name__}: {exc}"
                time.sleep(0.1)
        raise ServerStartError(
            f"clce server at {self.url} not ready within {self.ready_timeout:.0f} s "
            f"(last /readyz: {last}).\n--- server log ---\n{self.log()}"
        )

    def stop(self) -> int | None:
        """SIGTERM (drain), then SIGKILL after STOP_TIMEOUT_S. Returns the exit status."""
        proc = self.proc
        if proc is None:
            return None
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(STOP_TIMEOUT_S)
        if self._log_file is not None:
            self._log_file.close()
        return proc.returncode

    def cleanup(self) -> None:
        """Stop the server and remove its log file."""
        self.stop()
        if self._log_file is not None:
            try:
                os.unlink(self._log_file.name)
            except OSError:
                pass

    def __enter__(self) -> ServerProcess:
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.cleanup()

    def __repr__(self) -> str:
        return f"ServerProcess({self.url}, args={self.args})"


def run_server(**kwargs) -> Iterator[ServerProcess]:
    """Generator for fixtures: yields a started ServerProcess, stops it afterwards. The log is
    printed on teardown (pytest shows it for failing tests)."""
    srv = ServerProcess(**kwargs).start()
    try:
        yield srv
    finally:
        srv.stop()
        print(f"--- clce server log ({srv.url}) ---\n{srv.log()}")
        srv.cleanup()


def server_fixture(name: str = "server", scope: str = "module", **kwargs):
    """A pytest fixture named `name` that runs one server (ServerProcess arguments) per scope.

    Assign it to a module-level variable of the same name: ``server = server_fixture()``."""

    @pytest.fixture(scope=scope, name=name)
    def _fixture() -> Iterator[ServerProcess]:
        yield from run_server(**kwargs)

    return _fixture
