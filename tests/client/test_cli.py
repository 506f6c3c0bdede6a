"""The `clce` command (clce_client/cli.py), run as a user runs it: the installed console script's
module in a subprocess, against a real server, a dead port, and a web server that is not clce."""

from __future__ import annotations

import functools
import http.server
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from tests.support.serverproc import free_port, server_fixture  # noqa: E402

server = server_fixture()


def clce(*args: str, timeout: float = 120) -> tuple[subprocess.CompletedProcess, float]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CLCE_")}
    t0 = time.monotonic()
    out = subprocess.run([sys.executable, "-m", "clce_client.cli", *args], capture_output=True, text=True,
                         timeout=timeout, env=env)
    return out, time.monotonic() - t0


def test_the_console_script_is_declared():
    text = (Path(__file__).parents[2] / "pyproject.toml").read_text()
    assert 'clce = "clce_client.cli:main"' in text


def test_check_a_served_url(server):
    out, took = clce("check", server.url)
    assert out.returncode == 0, out.stderr
    lines = {line.split()[0]: line for line in out.stdout.splitlines()}
    assert lines["server"].startswith(f"server     clce 0.1.0 (protocol 1) at {server.url}")
    assert "[" in lines["device"] and "cpu" in lines["device"]
    # a loopback server allows shared memory, and this host is its host
    assert lines["transport"].startswith("transport  shared memory (")
    assert "loss + grad = 0.175456, as numpy's float64 reference" in lines["call"]
    assert lines["ok"].startswith("ok")
    assert took < 10


def test_check_over_tcp_says_why(server):
    out, _ = clce("check", server.url, "--transport", "tcp")
    assert out.returncode == 0, out.stderr
    assert "transport  TCP: transport='tcp'" in out.stdout


def test_check_a_dead_url_says_unreachable_at_once():
    url = f"http://127.0.0.1:{free_port()}"
    out, took = clce("check", url, timeout=30)
    assert out.returncode == 1
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith(f"clce check: {url} unreachable: no clce server answered"), out.stderr
    assert "Connection refused" in last
    # the interpreter's start-up (numpy, ml_dtypes) is most of it
    assert took < 10, took
    print(f"clce check on a dead URL answered in {took:.2f} s")


@pytest.fixture
def not_clce(tmp_path):
    """A plain web server with a file where /v1/info would be."""
    (tmp_path / "v1").mkdir()
    (tmp_path / "v1" / "info").write_bytes(b"\x00not json")
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(tmp_path))
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()


def test_check_a_url_that_is_not_clce(not_clce):
    out, _ = clce("check", not_clce)
    assert out.returncode == 1
    assert f"answered HTTP 200 with application/octet-stream, not as a clce server does" in out.stderr
    out, _ = clce("check", not_clce + "/elsewhere")
    assert out.returncode == 1
    assert f"{not_clce}/elsewhere/v1/info answered HTTP 404" in out.stderr
    assert "is this a clce server's base URL?" in out.stderr


def test_info_prints_the_servers_description(server):
    out, _ = clce("info", server.url)
    assert out.returncode == 0, out.stderr
    doc = json.loads(out.stdout)
    assert doc["name"] == "clce" and doc["ready"] is True and doc["devices"]


def test_bench_prints_the_ratio(server):
    pytest.importorskip("torch")
    out, _ = clce("bench", server.url, "--shape", "64x1000", "--blocks", "2", "--calls", "2")
    assert out.returncode == 0, out.stderr
    last = out.stdout.strip().splitlines()[-1]
    assert last.startswith("clce/torch  ") and last.endswith("x (clce's time over torch's: lower is better)")
    assert float(last.split()[1].rstrip("x")) > 0
    assert "clce bench" in out.stderr      # the progress bar


def test_bench_rejects_a_bad_shape():
    out, _ = clce("bench", "--shape", "64by1000")
    assert out.returncode == 2 and "expected ROWSxCLASSES" in out.stderr


def test_check_a_server_that_never_answers_gives_up_within_10_s():
    """A port that accepts connections but never answers (a hung process): the read timeout."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(16)          # the kernel completes the handshakes; nobody reads or answers
        url = f"http://127.0.0.1:{s.getsockname()[1]}"
        out, took = clce("check", url, timeout=30)
    assert out.returncode == 1
    assert out.stderr.strip().endswith(f"clce check: unreachable: {url}/v1/info: no response within the read timeout")
    assert took < 10, took


def test_check_with_tenants_says_what_the_key_lacks(tmp_path):
    from tests.support.serverproc import ServerProcess

    tenants = tmp_path / "tenants.toml"
    tenants.write_text('[tenants.t]\napi_key = "sk-tenant-Check123"\n')
    with ServerProcess(tenants=tenants) as srv:
        out, _ = clce("check", srv.url)
        assert out.returncode == 1
        assert "device     (not shown without a key" in out.stdout
        assert "the check's call failed: AuthenticationError: missing or invalid API key" in out.stderr
        out, _ = clce("check", srv.url, "--api-key", "sk-tenant-Check123")
        assert out.returncode == 0, out.stderr
        assert "transport  shared memory" in out.stdout


def test_check_verbose_shows_the_clients_log(server):
    out, _ = clce("check", server.url, "-v")
    assert out.returncode == 0, out.stderr
    assert f"INFO clce: clce client for {server.url}: shared memory via " in out.stderr
    assert "httpx" not in out.stderr        # httpx's line per request stays out
