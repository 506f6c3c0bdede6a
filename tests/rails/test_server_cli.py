"""clce-server's flags: every setting has one, and bad values are refused as argparse refuses."""

from __future__ import annotations

import pytest

pytest.importorskip("uvicorn")

from clce_server.__main__ import parse_args  # noqa: E402
from clce_server.config import Settings  # noqa: E402


@pytest.mark.parametrize("name", sorted(Settings.model_fields))
def test_every_setting_has_a_flag(name, capsys):
    with pytest.raises(SystemExit):
        parse_args(["--help"])
    assert "--" + name.replace("_", "-") in capsys.readouterr().out


def test_flags_reach_the_settings():
    s = parse_args(["--tenant-max-inflight-bytes", "123", "--batch-max-elements", "77", "--no-access-log",
                    "--no-warmup", "--drain-timeout", "5", "--device", "0", "--device", "cpu"])
    assert (s.tenant_max_inflight_bytes, s.batch_max_elements, s.access_log, s.warmup) == (123, 77, False, False)
    assert s.drain_timeout_s == 5.0 and s.device_selectors == ["0", "cpu"]
    assert parse_args([]).access_log is True


def test_bad_values_are_usage_errors(capsys):
    with pytest.raises(SystemExit) as info:
        parse_args(["--scheduling", "lifo"])
    assert info.value.code == 2
    assert "--scheduling" in capsys.readouterr().err


def test_device_threads_bound_the_cpu_device(tmp_path):
    """--device-threads reaches PoCL before OpenCL starts: the CPU device reports that many units."""
    import sys
    from pathlib import Path

    import httpx
    from tests.support.serverproc import ServerProcess

    with ServerProcess(args=["--device-threads", "1"]) as srv:
        devices = httpx.get(srv.url + "/v1/info", timeout=10).json()["devices"]
    cpu = [d for d in devices if d["kind"] == "cpu"]
    if not cpu:
        pytest.skip("no CPU OpenCL device")
    assert all(d["compute_units"] == 1 for d in cpu), cpu


def test_every_option_is_described(capsys):
    """--help describes every option: a description of its own, not only its variable and default."""
    assert [n for n, f in Settings.model_fields.items() if not (f.description or "").strip()] == []
    with pytest.raises(SystemExit):
        parse_args(["--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "--port PORT TCP port" in out and "--log-level LOG_LEVEL Server log level" in out
    assert "always loopback by default" in out and "Loopback unless" not in out


def test_version(capsys):
    from clce_server import __version__

    with pytest.raises(SystemExit) as info:
        parse_args(["--version"])
    assert info.value.code == 0 and capsys.readouterr().out.strip() == f"clce-server {__version__}"


def test_a_device_that_never_opens_exits_1_saying_why():
    """A server whose devices fail to open stops (status 1) with the reason, instead of serving 503s."""
    import subprocess
    import sys
    import time
    from pathlib import Path
    from tests.support.serverproc import free_port

    t0 = time.monotonic()
    out = subprocess.run([sys.executable, "-m", "clce_server", "--port", str(free_port()), "--device",
                          "no-such-device-anywhere"], capture_output=True, text=True, timeout=60)
    took = time.monotonic() - t0
    assert out.returncode == 1, out.stderr
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith("clce-server: no device opened, exiting: no OpenCL device matches"), out.stderr
    assert "--list-devices" in last
    print(f"exited 1 after {took:.1f} s")
